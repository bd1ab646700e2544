"""The shared cases re-run through the node as a user runs it (``casemask serve`` as a
subprocess, dcmtk's storescu as the modality, a folder destination): the cases whose
README expectation only shows over the network (02: a SOP Instance UID used as a path;
03: the same SOP Instance UID in another study), and what the node's log may say about
them (no original UIDs, no patient data)."""

from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import ROOT, STORESCU, NodeProcess, dcmtk_env, needs_dcmtk, node_config, wait_until, write_toml

CASES = ROOT.parent / "shared" / "cases"
pytestmark = [needs_dcmtk, pytest.mark.skipif(not CASES.is_dir(), reason=f"the shared case folder {CASES} is absent")]


def case(name: str) -> Path:
    return next(CASES.glob(f"{name}*"))


def storescu_statuses(port: int, files: list[Path]) -> list[str]:
    """Send with dcmtk's storescu; the status text of each C-STORE response, in order."""
    r = subprocess.run([STORESCU, "-v", "-R", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)],
                       env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    return re.findall(r"Received Store Response \(([^)]*)\)", r.stdout + r.stderr)


def originals(files: list[Path]) -> set[str]:
    """What must never appear in the node's log: the inputs' UIDs and patient data."""
    found: set[str] = set()
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(f, force=True)
        for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientBirthDate"):
            if ds.get(kw):
                found.add(str(ds.get(kw)))
        found.add(str(ds.PatientName.family_name))
    return found


@pytest.fixture
def serve(tmp_path: Path):
    """``casemask serve`` on a temporary config whose data folder lies eight folders deep
    in tmp_path (an escape by ``../`` x8 from the spool still lands inside tmp_path)."""
    procs: list[NodeProcess] = []

    def start() -> tuple[NodeProcess, dict]:
        deep = tmp_path / "a" / "b" / "c" / "d" / "e" / "f" / "g" / "h"
        deep.mkdir(parents=True)
        cfg = node_config(deep, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
        node = NodeProcess(write_toml(cfg, tmp_path / "node.toml"), tmp_path / "node.log")
        procs.append(node)
        node.start(cfg["node"]["port"])
        return node, cfg

    yield start
    for p in procs:
        p.stop()


def test_case02_sop_uid_never_becomes_a_path_outside_the_data_dir(tmp_path, serve):
    node, cfg = serve()
    data_dir = Path(cfg["node"]["data_dir"])
    statuses = storescu_statuses(cfg["node"]["port"], [case("02") / "traversal.dcm"])
    assert len(statuses) == 1
    outside = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and data_dir not in p.parents
               and p.parent != tmp_path and (tmp_path / "out") not in p.parents]
    assert not outside, f"written outside data_dir, answered {statuses[0]}: {outside}"
    spool = data_dir / "spool"
    assert all(".." not in p.relative_to(spool).parts and spool in p.resolve().parents for p in spool.rglob("*.dcm"))


def test_case03_same_sop_uid_in_another_study_is_not_dropped_with_success(tmp_path, serve):
    node, cfg = serve()
    files = [case("03") / "first.dcm", case("03") / "second.dcm"]
    statuses = storescu_statuses(cfg["node"]["port"], files)
    assert len(statuses) == 2 and statuses[0] == "Success"
    out = tmp_path / "out"
    if statuses[1] == "Success":  # acknowledged: it must reach the destination as its own object
        wait_until(lambda: len(list(out.rglob("*.dcm"))) >= 2, timeout=20, what="both objects delivered")
        assert len({str(dcmread(p).StudyInstanceUID) for p in out.rglob("*.dcm")}) == 2
    else:  # refused: the sender keeps it, and the node keeps no copy of it
        spooled = [str(dcmread(p, force=True).PatientID) for p in (Path(cfg["node"]["data_dir"]) / "spool").rglob("*.dcm")]
        assert "PID11223344" not in spooled
    # A receiver process's records reach the node's log a moment later (node.receivers).
    wait_until(lambda: re.search(r"(WARNING|ERROR) node\.scp: .*(conflict|another|differ)", (tmp_path / "node.log").read_text()), timeout=20, what="the conflict logged")


def test_case02_and_03_node_log_quotes_no_original_uid_or_patient_data(tmp_path, serve):
    node, cfg = serve()
    files = [case("02") / "traversal.dcm", case("03") / "first.dcm", case("03") / "second.dcm"]
    storescu_statuses(cfg["node"]["port"], files)
    storescu_statuses(cfg["node"]["port"], [case("03") / "first.dcm"])  # a plain re-send
    wait_until(lambda: list((tmp_path / "out").rglob("*.dcm")), timeout=60, what="a delivery")
    node.stop()
    log = (tmp_path / "node.log").read_text()
    quoted = sum(v in log for v in originals(files) | {"escaped/evil"})  # a count: the values stay out of test output
    assert quoted == 0, "the log quotes original values (UIDs or patient data)"
