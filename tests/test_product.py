"""What the README and the Makefile promise a user, checked as the user would meet it:
`make clean` keeps the data, `make serve` installs no Debian package, the storescu
options of the README's sending page (docs/sending.md) send compressed files, the backup command copies a live database,
and `casemask demo` leaves no synthetic files behind."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import dcmtk_env, node_config, write_toml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
SENDING = (ROOT / "docs" / "sending.md").read_text()
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
STORESCU = "/usr/bin/storescu"

# One pydicom test file per compressed transfer syntax of the storescu table (docs/sending.md).
COMPRESSED = {
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg_dcmtk.dcm",
    "1.2.840.10008.1.2.4.51": "JPEG-lossy.dcm",
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.81": "SC_rgb_jls_lossy_line.dcm",
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
}


def _make(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-f", str(ROOT / "Makefile"), *args], cwd=tmp, capture_output=True, text=True, timeout=120)


def test_make_clean_removes_build_artefacts_and_never_data(tmp_path: Path) -> None:
    keep = [tmp_path / "var" / "secret.key", tmp_path / "var" / "casemask.db", tmp_path / "var" / "spool" / "x.dcm", tmp_path / "runs" / "ref" / "ckpt.pt"]
    gone = [tmp_path / ".venv" / "pyvenv.cfg", tmp_path / "build" / "lib" / "x.py", tmp_path / "dist" / "casemask-0.1.0-py3-none-any.whl",
            tmp_path / "casemask.egg-info" / "PKG-INFO", tmp_path / "node" / "__pycache__" / "x.pyc", tmp_path / ".pytest_cache" / "v"]
    for p in keep + gone:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    for d in ("engine", "config", "tests"):
        (tmp_path / d).mkdir(exist_ok=True)
    proc = _make(tmp_path, "clean")
    assert proc.returncode == 0, proc.stderr
    assert [p for p in keep if not p.exists()] == [], "make clean deleted data"
    assert [p for p in gone if p.exists()] == []


def test_make_serve_installs_no_debian_package_and_make_test_does(tmp_path: Path) -> None:
    """The Quick start's claim: `make serve` only makes the virtualenv."""
    for name in ("pyproject.toml", "setup.py", "constraints.txt"):
        (tmp_path / name).touch()
    serve = _make(tmp_path, "-n", "serve")
    test = _make(tmp_path, "-n", "test")
    assert serve.returncode == 0 and test.returncode == 0, serve.stderr + test.stderr
    assert "apt-get" not in serve.stdout
    assert "apt-get" in test.stdout
    # The node needs no PyTorch: `make serve` installs the package alone (750 MB against
    # 2.2 GB, docs/benchmarks.md); `make test` the training and test extras with torch.
    assert "install --quiet -e ." in serve.stdout and "torch" not in serve.stdout and "[train" not in serve.stdout, serve.stdout
    assert "torch==" in test.stdout and '-e ".[train,test]"' in test.stdout, test.stdout
    assert "PIP_CONSTRAINT" in (ROOT / "Makefile").read_text() and "+cpu" in (ROOT / "constraints.txt").read_text()


def _readme_storescu_options() -> dict[str, str]:
    """Transfer syntax UID -> storescu option, from the table the README links to."""
    assert "(docs/sending.md)" in README
    rows = re.findall(r"^\| [^|]+ \| `(-x\w)` \| ([\d.]+) \|$", SENDING, flags=re.M)
    assert len(rows) >= len(COMPRESSED), "docs/sending.md's storescu table is gone or changed shape"
    return {uid: opt for opt, uid in rows}


@pytest.mark.slow
def test_readme_storescu_options_send_compressed_files(tmp_path: Path, start_node) -> None:
    if not Path(STORESCU).exists():
        pytest.skip("dcmtk's storescu is not installed (make deps)")
    options = _readme_storescu_options()
    raw = node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    node = start_node(raw, schedule=False)
    port = str(raw["node"]["port"])
    env = dcmtk_env()
    sop_uids = set()
    for uid, name in COMPRESSED.items():
        f = PYDICOM_FILES / name
        ds = dcmread(f)
        assert str(ds.file_meta.TransferSyntaxUID) == uid
        if "StudyInstanceUID" not in ds:  # some of pydicom's files lack it; the node refuses those
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            f = tmp_path / name
            ds.save_as(f)  # the pixel data stays encapsulated as it was
        sop_uids.add(str(ds.SOPInstanceUID))
        sent = subprocess.run([STORESCU, options[uid], "-aec", "CASEMASK", "127.0.0.1", port, str(f)], env=env, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, f"{name} with {options[uid]}: {sent.stdout}{sent.stderr}"
    # Without the option, as the README warns, storescu cannot send a compressed file.
    plain = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", port, str(PYDICOM_FILES / COMPRESSED["1.2.840.10008.1.2.4.91"])],
                           env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    from sqlalchemy import func, select

    from node.db import Instance

    with node.engine.connect() as conn:
        # pydicom's MR_small variants share one SOP Instance UID: stored once, answered Success
        assert conn.scalar(select(func.count()).select_from(Instance)) == len(sop_uids)


def test_readme_backup_command_copies_a_live_database(tmp_path: Path) -> None:
    """The README's line, run by the shell as written (the node's interpreter and the
    backup folder swapped in): a consistent copy of a live WAL database, owner-only (the
    copy holds the pseudonym mapping; it was made 0644 before the line set umask 077)."""
    line = next(ln for ln in README.splitlines() if "sqlite3.connect(" in ln and ").backup(" in ln)
    assert line.startswith("(umask 077; .venv/bin/python -c ") and line.endswith(" var/casemask.db /backup/casemask.db)"), line
    (tmp_path / "var").mkdir()
    live = sqlite3.connect(tmp_path / "var" / "casemask.db")
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("CREATE TABLE t (x)")
    live.executemany("INSERT INTO t VALUES (?)", [(k,) for k in range(100)])
    live.commit()  # the node keeps its connection open; the WAL holds the rows
    target = tmp_path / "backup" / "casemask.db"
    target.parent.mkdir()
    command = line.replace(".venv/bin/python", shlex.quote(sys.executable)).replace("/backup/casemask.db", shlex.quote(str(target)))
    proc = subprocess.run(["bash", "-c", "umask 022; " + command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sqlite3.connect(target).execute("SELECT count(*) FROM t").fetchone() == (100,)
    assert target.stat().st_mode & 0o777 == 0o600
    live.close()
    # Run where there is no database (another folder, a data_dir elsewhere): it fails and
    # makes nothing (it made an empty var/casemask.db and backed that up, exit 0).
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "var").mkdir(parents=True)
    proc = subprocess.run(["bash", "-c", command.replace(shlex.quote(str(target)), shlex.quote(str(tmp_path / "backup" / "wrong.db")))],
                          cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unable to open database file" in proc.stderr, proc.stderr
    assert not (elsewhere / "var" / "casemask.db").exists() and not (tmp_path / "backup" / "wrong.db").exists()


@pytest.mark.slow
def test_demo_removes_its_synthetic_files_unless_out(tmp_path: Path, start_node) -> None:
    raw = node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}],
                      routes=[{"name": "all", "deid": {"profile": "basic"}, "destinations": ["out"]}])
    cfg = write_toml(raw, tmp_path / "casemask.toml")
    start_node(raw)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    casemask = str(Path(sys.executable).parent / "casemask")
    args = [casemask, "demo", "--running", "--config", str(cfg), "--patients", "1", "--visits", "1", "--size", "64", "--timeout", "60"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "processed 1" in proc.stdout
    # Each destination's deliveries as `casemask status` writes them (it printed a Python dict, {'SENT': 1}).
    assert re.search(r"^destination out \(folder\): (?:[A-Z_]+=\d+ ?)+ -> ", proc.stdout, flags=re.M), proc.stdout
    assert list(tmp.iterdir()) == [], "the demo left its synthetic files in the temporary folder"
    kept = tmp_path / "kept"
    proc = subprocess.run([*args, "--seed", "7", "--out", str(kept)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p for p in kept.rglob("*.dcm")], "--out keeps the synthetic files"
    shutil.rmtree(kept)


TRAIN_SWITCHES = ("--generator", "--rib-fit", "--privacy", "--disease-guide", "--width", "--ssim-weight")
REFINE_SWITCHES = ("--identity-guide", "--disease-guide")


def test_shipped_engine_cli_has_no_research_switch_and_casemask_research_has_each(capsys, tmp_path: Path) -> None:
    from engine.research.cli import TOOLS
    from engine.research.cli import main as research
    from node.cli import build_parser

    product = build_parser()
    for argv, switches in ((["engine", "train", "--help"], TRAIN_SWITCHES), (["engine", "refine", "--help"], REFINE_SWITCHES)):
        with pytest.raises(SystemExit):
            product.parse_args(argv)
        shown = capsys.readouterr().out
        assert [s for s in switches if s in shown] == [], f"casemask {' '.join(argv[:2])} shows research switches"
        with pytest.raises(SystemExit):
            research(argv[1:])
        shown = capsys.readouterr().out
        assert [s for s in switches if s not in shown] == []
    with pytest.raises(SystemExit) as exc:
        product.parse_args(["engine", "train", "--out", str(tmp_path), "--rib-fit", "1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        research(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in TOOLS)
    with pytest.raises(SystemExit) as exc:
        research(["sweep", "--help"])  # a tool parses its own arguments
    assert exc.value.code == 0 and "--variants" in capsys.readouterr().out


def test_every_research_switch_and_tool_is_documented() -> None:
    from engine.research.cli import TOOLS

    doc = (ROOT / "docs" / "engine-research.md").read_text()
    missing = [s for s in (*TRAIN_SWITCHES, *REFINE_SWITCHES, *(f"casemask-research {t}" for t in TOOLS)) if s not in doc]
    assert missing == [], f"docs/engine-research.md does not mention {missing}"


def _toml_block(text: str, after: str) -> str:
    """The first ```toml block after the heading ``after``."""
    section = text.split(after, 1)[1]
    return section.split("```toml\n", 1)[1].split("\n```", 1)[0]


def test_configuration_reference_names_every_key_with_its_default(tmp_path: Path) -> None:
    """docs/configuration.md is the code's reference: every key of every table in
    node/config.py appears in it, it loads as it stands, and the values it gives as
    defaults are the code's defaults."""
    import tomllib

    from node import config as c

    block = _toml_block(CONFIGURATION, "# Configuration reference")
    named = set(re.findall(r"(\w+)\s*=", block))
    tables = (c.NodeSettings, c.RetentionSettings, c.Source, c.Destination, c.Route, c.DeidSettings, c.ModelSettings, c.HttpSettings, c.HttpTls, c.AuditSettings)
    missing = {t.__name__: sorted(set(t.model_fields) - named) for t in tables if set(t.model_fields) - named}
    assert missing == {}, f"docs/configuration.md lacks {missing}"
    known = set(c.Settings.model_fields) - {"source_file", "warnings"}
    assert set(re.findall(r"^\[{1,2}(\w+)\]{1,2}", block, flags=re.M)) == known
    raw = tomllib.loads(block)
    c.parse(raw, "docs/configuration.md", base_dir=tmp_path)  # raises ConfigError with every problem
    for table, model in (("node", c.NodeSettings), ("retention", c.RetentionSettings), ("http", c.HttpSettings), ("audit", c.AuditSettings)):
        for key, value in raw[table].items():
            default = model.model_fields[key].default
            if table == "node" and key == "host":
                continue  # the line says what the built-in config writes instead
            assert str(value) == str(default) or value == default, f"docs/configuration.md [{table}] {key} = {value!r}, the code's default is {default!r}"
    for key, value in raw["models"][0].items():
        if key != "name":
            assert value == c.ModelSettings.model_fields[key].default, f"docs/configuration.md [[models]] {key} = {value!r}"


def test_readme_first_keys_load_and_link_to_the_full_reference(tmp_path: Path) -> None:
    """The README keeps the keys a site sets first, as a file that loads as it stands."""
    import tomllib

    from node import config as c

    block = _toml_block(README, "## Configure your site")
    settings = c.parse(tomllib.loads(block), "README", base_dir=tmp_path)
    assert {d.kind for d in settings.destinations} == {"dicom", "dicomweb", "folder"}
    assert "(docs/configuration.md)" in README


def test_readme_links_and_make_targets_exist() -> None:
    for link in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#[\w-]+)?\)", README):
        assert (ROOT / link).is_file(), link
    for link in re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]+)?\)", CONFIGURATION):
        assert (ROOT / "docs" / link).is_file(), f"docs/configuration.md links {link}"
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for target in re.findall(r"`make ([\w-]+)", README):
        assert target in targets, f"README names make {target}"
