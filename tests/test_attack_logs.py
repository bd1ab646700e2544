"""A hostile sender against the node's log (third attack pass, docs/security.md).

pynetdicom quotes the UID fields of what it receives as the sender wrote them: at
DEBUG ("Affected SOP Instance UID     : ...", ``-vv``) and at ERROR, at every verbosity
("No supported service class available for the SOP Class UID '...'"). The formatter
named only what looked like a UID of four or more components, so a patient's name or
ID in the command's Affected SOP Instance / Class UID, or a valid UID of one to three
components made of a birth date and a record number, reached the log in clear.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import warnings

from pydicom import dcmread

from node.logfmt import name_uids, name_uids_with
from tests.conftest import PHI, ROOT, make_study, node_config, wait_until, write_toml
from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, RELEASE_RQ, Raw, associate_rq, c_store_command, c_store_pdus, encode, store_status

BIRTH, MRN = PHI["PatientBirthDate"], PHI["PatientID"]


def test_uid_fields_are_named_whole_whatever_they_hold():
    name_uids_with(lambda uid: "h:named")
    try:
        assert name_uids("Affected SOP Instance UID     : Doe^Janet^Q") == "Affected SOP Instance UID     : h:named"
        assert name_uids(f"Affected SOP Instance UID     : 1.{BIRTH}.7") == "Affected SOP Instance UID     : h:named"
        assert name_uids(f"No supported service class available for the SOP Class UID '{MRN}', please") == \
            "No supported service class available for the SOP Class UID 'h:named', please"
        assert name_uids("    Abstract Syntax: =1.2.3") == "    Abstract Syntax: =h:named"
        # the standard's UIDs and the names pynetdicom prints for them stay readable
        for line in ("Affected SOP Class UID        : CT Image Storage", "    Accepted Transfer Syntax: =Explicit VR Little Endian",
                     "Application Context Name:    1.2.840.10008.3.1.1.1", "Requestor 127.0.0.1"):
            assert name_uids(line) == line
    finally:
        name_uids_with(None)


def _store(port: int, sop_class: str, sop_instance: str, dataset: bytes) -> int | None:
    with Raw(port, timeout=20) as r:
        r.send(associate_rq(contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]))
        ac = r.read_pdu()
        assert ac is not None and ac[0] == 0x02, "association not accepted"
        with warnings.catch_warnings():  # pydicom warns, quoting the invalid value, when the command is built
            warnings.simplefilter("ignore")
            command = c_store_command(sop_class, sop_instance)
        for pdu in c_store_pdus(command, dataset):
            r.send(pdu)
        rsp = r.read_pdu()
        r.send(RELEASE_RQ)
        r.read_pdu()
    return store_status(rsp[1]) if rsp is not None and rsp[0] == 0x04 else None


def test_hostile_uid_fields_never_reach_the_log_in_clear(tmp_path):
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    short = f"1.{BIRTH}.{MRN.split('-')[1]}"  # a valid UID of three components: birth date and record number
    ds.SOPInstanceUID = short
    ds.file_meta.MediaStorageSOPInstanceUID = short
    data = encode(ds, implicit=False)
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "archive")}], receivers=2)
    cfg = write_toml(raw, tmp_path / "node.toml")
    log = tmp_path / "node.log"
    port = raw["node"]["port"]
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "-vv", "serve", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_until(lambda: proc.poll() is not None or b"listening on" in log.read_bytes(), timeout=90, what="the node to listen")
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert _store(port, CT_IMAGE_STORAGE, "Doe^Janet^Q", data) == 0xC212  # a name as the command's SOP Instance UID
            assert _store(port, CT_IMAGE_STORAGE, BIRTH, data) == 0xC213  # valid, one component, not the data set's
            assert _store(port, MRN, short, data) is None  # a Patient ID as the SOP class: pynetdicom logs an ERROR and aborts
            assert _store(port, CT_IMAGE_STORAGE, short, data) == 0x0000
            wait_until(lambda: b"Affected SOP Instance UID" in log.read_bytes(), timeout=30, what="pynetdicom's debug lines")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    text = log.read_text(errors="replace")
    named = "No supported service class available for the SOP Class UID 'h:" in text
    assert named, "pynetdicom's ERROR line about the SOP class is missing or not named"  # (never print the log: it would hold PHI on failure)
    leaked = [n for n in ("Doe", "Janet", BIRTH, MRN, MRN.split("-")[1], short) if n in text]
    assert not leaked, f"{len(leaked)} planted values in the log"
