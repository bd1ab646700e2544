"""The node's log at its most verbose (``casemask -vv serve``) holds no original
identifier: not the synthetic patient's name or ID, and not the original UIDs, which
pynetdicom's debug lines quote as received ("Affected SOP Instance UID : ...") and
SQLAlchemy's would quote as statement parameters. UIDs are named by the node's keyed
hash (``h:`` + 12 hex digits) as in its own lines."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from pydicom import dcmread

from node.logfmt import name_uids, name_uids_with
from tests.conftest import PHI, ROOT, STORESCU, dcmtk_env, make_study, needs_dcmtk, node_config, wait_until, write_toml


def test_name_uids_keeps_the_standards_uids_and_addresses():
    name_uids_with(lambda uid: "h:named")
    try:
        assert name_uids("Affected SOP Class UID : 1.2.840.10008.5.1.4.1.1.2") == "Affected SOP Class UID : 1.2.840.10008.5.1.4.1.1.2"
        line = "from 127.0.0.1 uid 1.2.826.0.1.3680043.8.498.123 ts 1.2.840.10008.1.2.1 v2.1.1"
        assert name_uids(line) == "from 127.0.0.1 uid h:named ts 1.2.840.10008.1.2.1 v2.1.1"
    finally:
        name_uids_with(None)
    assert name_uids("uid 1.2.826.0.1.3680043.8.498.123") == "uid h:?"


@needs_dcmtk
def test_the_most_verbose_log_holds_no_original_identifier(tmp_path):
    files = make_study(tmp_path / "in", 2)
    originals = [dcmread(f) for f in files]
    archive = tmp_path / "archive"
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(archive)}])
    cfg = write_toml(raw, tmp_path / "node.toml")
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "-vv", "serve", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_until(lambda: proc.poll() is not None or b"listening on" in log.read_bytes(), timeout=90, what="the node to listen")
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(raw["node"]["port"]), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            wait_until(lambda: len(list(archive.rglob("*.dcm"))) == len(files), timeout=90, what="both objects in the folder destination")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    text = log.read_text(errors="replace")
    assert "Affected SOP Instance UID" in text  # pynetdicom's debug lines were written (else this test proves nothing)
    assert re.search(r"Affected SOP Instance UID\s*: h:[0-9a-f]{12}", text)
    needles = {PHI["PatientID"], PHI["AccessionNumber"], "Janet", "Gregory", PHI["InstitutionName"]}
    for ds in originals:
        needles |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    found = sorted(n for n in needles if n in text)
    assert not found, f"{len(found)} original identifiers in the -vv log"
