"""The node without PyTorch: ``pip install casemask`` into a fresh virtualenv, then receive,
de-identify, anonymize pixels and gate them with ONNX Runtime alone (the bundle's shipped
graphs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import PYDICOM_FILES, ROOT, free_port, stop_process, wait_until, write_toml

pytestmark = pytest.mark.slow


def _copy_source(dest: Path) -> Path:
    """What a wheel is built from, outside the work tree (a build writes build/ and
    egg-info beside its sources), without exports and plans made here."""
    skip = shutil.ignore_patterns("__pycache__", "onnx", "plans", "*.pyc")
    for d in ("node", "engine", "config"):
        shutil.copytree(ROOT / d, dest / d, ignore=skip)
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / f, dest / f)
    return dest


def test_node_anonymizes_and_gates_pixels_in_a_virtualenv_without_torch(tmp_path):
    from tests.test_gates import dx_like, fixed_secret
    from tests.test_pixels import make_dx

    src = _copy_source(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The same indexes as `make venv` (pip's configuration); no [train]: no torch. A regular
    # (wheel) install: the configuration data ships as the package casemask_config.
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(src)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, "torch is installed without casemask[train]"
    r = subprocess.run([str(py), "-c", "import onnx"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, "onnx (the burned-in detector's graph is folded with it on load) is not installed: " + r.stderr[-500:]

    out = tmp_path / "archive"
    port = free_port()
    raw = {
        "node": {"ae_title": "CASEMASK", "host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "var"), "stable_after_s": 0.5, "poll_interval_s": 0.2,
                 "secret_path": fixed_secret(tmp_path)},  # the same synthetic identities, and verdicts, on every run
        "sources": [{"ae_title": "CASEMASK"}],
        "destinations": [{"name": "f", "kind": "folder", "path": str(out)}],
        "routes": [{"name": "chest", "match": {"Modality": ["DX", "CR"]}, "deid": {"profile": "basic"}, "pixels": "anonymize",
                    "model": "reference", "allow_demonstration_model": True, "partial": "skip-object", "destinations": ["f"]}],
        "models": [{"name": "reference", "path": "builtin:reference", "backend": "auto"}],
        "http": {"host": "127.0.0.1", "port": free_port()},  # not the default 8080, which another node on this machine may hold
    }
    cfg = write_toml(raw, tmp_path / "node.toml")
    files, _ = make_dx(tmp_path / "dx", n_patients=3, seed=2025)  # well inside the domain (see test_gates)
    ct = dcmread(PYDICOM_FILES / "CT_small.dcm").pixel_array.astype("int32")
    bad = dx_like(dcmread(files[0]), (ct - ct.min()).clip(0, 4095))  # a CT slice labelled DX
    bad.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    bad.save_as(tmp_path / "ct_as_dx.dcm", enforce_file_format=True)
    casemask = str(venv / "bin" / "casemask")
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen([casemask, "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        def listening() -> bool:
            if node.poll() is not None:
                raise AssertionError(f"node exited: {(tmp_path / 'node.log').read_text()[-3000:]}")
            return subprocess.run([casemask, "echo", f"CASEMASK@127.0.0.1:{port}", "--timeout", "2"], capture_output=True, env=env, cwd=tmp_path).returncode == 0

        wait_until(listening, timeout=120, interval=1, what="the torch-free node to listen")
        r = subprocess.run([casemask, "send", *map(str, files), str(tmp_path / "ct_as_dx.dcm"), "--to", f"CASEMASK@127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: len(list(out.rglob("*.dcm"))) >= len(files), timeout=120, what="the anonymized images in the archive folder")
        r = subprocess.run([casemask, "status", "--json", "--config", str(cfg)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
        status = json.loads(r.stdout)
        wait_until(lambda: json.loads(subprocess.run([casemask, "status", "--json", "--config", str(cfg)], capture_output=True, text=True, env=env, cwd=tmp_path).stdout)
                   ["counts"].get("instances", {}).get("QUARANTINED", 0) == 1, timeout=60, what="the CT slice quarantined")
    finally:
        stop_process(node, 20)
        log.close()
    assert status["models"]["reference"]["backend"] == "onnxruntime"
    delivered = [dcmread(p) for p in out.rglob("*.dcm")]
    assert len(delivered) == len(files)
    for d in delivered:
        assert "synthesised at 64x64 by model reference" in d.DerivationDescription and "DERIVED" in d.ImageType
    text = (tmp_path / "node.log").read_text()
    assert "gate domain failed" in text and "intended use: demonstration" in text
