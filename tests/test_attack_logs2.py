"""What a sender can write into the node's log, fourth pass (docs/security.md, "Fourth
attack"): each test is an attack that worked before its fix."""

from __future__ import annotations

import subprocess

from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import NodeProcess, dcmtk_env, node_config, wait_until, write_toml
from tests.test_attack import _ct

NAME = "DOE^CHARSET^SYN"


def test_a_name_in_specific_character_set_is_not_logged(tmp_path):
    """pydicom logs "Unknown encoding '<value>' - using default encoding instead" at
    WARNING (about ten times an object, while it is read, de-identified and verified) for
    a Specific Character Set it does not know, and `casemask serve` wrote it as sent: a
    name put there by a sender reached the log. (The output was quarantined by the
    verifier: nothing left the node.) Now pydicom's records are written with every quoted
    value withheld (node.logfmt), in the log of a real `casemask serve`."""
    ds = _ct(pn=NAME, pid="SYN-CS-0001")
    ds.SpecificCharacterSet = NAME
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    sent = tmp_path / "charset.dcm"
    ds.save_as(sent, enforce_file_format=True)
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=0.5)
    cfg = write_toml(raw, tmp_path / "node.toml")
    log = tmp_path / "serve.log"
    node = NodeProcess(cfg, log)
    node.start(raw["node"]["port"])
    try:
        r = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(raw["node"]["port"]), str(sent)],
                           env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: "QUARANTINED" in log.read_text(errors="replace"), timeout=60, what="the object quarantined by the verifier")
    finally:
        node.stop()
    text = log.read_text(errors="replace")
    assert "Unknown encoding" in text  # pydicom's record is still there, naming what went wrong
    assert NAME not in text and "DOE" not in text and "CHARSET^SYN" not in text
