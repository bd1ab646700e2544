"""Attacks by a hostile sender that the node does not handle yet (security review of the
network edge, issue #18). Each test fails while the problem is there."""

from __future__ import annotations

import struct

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import node_config, wait_until
from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, VERIFICATION, IMPLICIT_VR_LE, RELEASE_RQ, Raw, associate_rq, c_store_command, c_store_pdus, encode, store_status

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _ct(pn: str = "SYNTHETIC^ATTACK", pid: str = "SYNTH-ATTACK-1") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.StudyDate = pn, pid, "CT", "20200101"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.SamplesPerPixel, ds.PixelRepresentation = 7, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 16
    return ds


def _raw_store(port: int, ds: Dataset) -> int | None:
    """C-STORE ``ds`` (explicit VR little endian) with raw PDUs; the response status."""
    with Raw(port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, VERIFICATION, [IMPLICIT_VR_LE])]))
        assert r.read_pdu()[0] == 0x02  # A-ASSOCIATE-AC
        for pdu in c_store_pdus(c_store_command(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), encode(ds, implicit=False)):
            r.send(pdu)
        pdu = r.read_pdu()
        r.send(RELEASE_RQ)
        r.read_pdu()
        return store_status(pdu[1]) if pdu and pdu[0] == 0x04 else None


def _folder_node(tmp_path, start_node):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=0.2)
    return start_node(raw)


def test_file_meta_group_inside_the_data_set_does_not_relabel_the_output(tmp_path, start_node):
    """A sender puts (0002,0010) Transfer Syntax UID = JPEG Baseline inside a native,
    explicit VR little endian data set (group 0002 has no place in a C-STORE data set,
    PS3.10 7.1). The node answers Success, the spool file gets two File Meta groups
    (pydicom keeps the sender's), and the object reaching the destination says JPEG
    Baseline over native pixel data: a consumer cannot decode it. It must either be
    refused (0xC210) or the sender's group 0002 dropped, so the output's transfer syntax
    is the one the bytes are in."""
    node = _folder_node(tmp_path, start_node)
    ds = _ct()
    ds.add_new(0x00020010, "UI", JPEG_BASELINE)
    status = _raw_store(node.settings.node.port, ds)
    if status != 0x0000:
        assert status == 0xC210  # refused: fine, as long as nothing went out
        return
    out = tmp_path / "out"
    wait_until(lambda: list(out.rglob("*.dcm")), timeout=30, what="the object in the folder destination")
    got = dcmread(next(out.rglob("*.dcm")))
    assert got.file_meta.TransferSyntaxUID != JPEG_BASELINE
    got.pixel_array  # decodes: the bytes are what the File Meta says


def test_unknown_public_elements_never_reach_the_destination(tmp_path, start_node):
    """Public (even-group) elements that are in no DICOM dictionary, here in the Patient
    group (0010,9999) and in (0008,9999), as LO, UN or OB, pass the basic profile unchanged: the default
    for an attribute Table E.1-1 does not list is Keep, even when nothing is known about
    it. Synthetic identifying text planted there reaches the folder destination."""
    node = _folder_node(tmp_path, start_node)
    ds = _ct()
    ds.add_new(0x00109999, "LO", "PLANTED-PHI-PATIENT-GROUP")
    ds.add_new(0x00089999, "LO", "PLANTED-PHI-GROUP-8")
    ds.add_new(0x00189999, "UN", b"PLANTED-PHI-AS-UN")
    ds.add_new(0x00409999, "OB", b"PLANTED-PHI-AS-OB-")
    assert _raw_store(node.settings.node.port, ds) == 0x0000
    out = tmp_path / "out"
    wait_until(lambda: list(out.rglob("*.dcm")), timeout=30, what="the object in the folder destination")
    data = b"".join(p.read_bytes() for p in out.rglob("*.dcm"))
    assert b"PLANTED-PHI" not in data


def test_a_data_set_the_node_cannot_read_is_not_acknowledged(tmp_path, start_node):
    """Sequences nested 200 deep (undefined lengths, implicit VR): the edge's structure
    walk (wire.dataset_end) accepts them and answers Success, then routing cannot read the
    spooled file (pydicom RecursionError) and quarantines it. The sender has deleted its
    copy believing the object stored; docs/security.md promises 0xC210 for a data set
    that cannot be decoded. Either refuse it at the edge or process it."""
    node = _folder_node(tmp_path, start_node)
    ds = _ct()
    body = encode(ds, implicit=True)
    depth = 200
    nest = struct.pack("<HHI", 0x0008, 0x1140, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    at = body.find(struct.pack("<HH", 0x0028, 0x0002))  # (0008,1140) sorts before group 0028
    body = body[:at] + nest * depth + close * depth + body[at:]
    with Raw(node.settings.node.port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [IMPLICIT_VR_LE])]))
        assert r.read_pdu()[0] == 0x02
        for pdu in c_store_pdus(c_store_command(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), body):
            r.send(pdu)
        pdu = r.read_pdu()
        r.send(RELEASE_RQ)
        r.read_pdu()
    status = store_status(pdu[1])
    if status == 0xC210:
        return
    assert status == 0x0000
    from node.db import Instance
    from sqlalchemy import select

    def state():
        with node.sessions() as s:
            return s.scalars(select(Instance.state)).first()

    wait_until(lambda: str(state()).split(".")[-1].upper() in ("PROCESSED", "QUARANTINED"), timeout=30, what="the instance routed")
    assert "QUARANTINED" not in str(state()).upper()


def test_a_c_store_on_the_verification_context_is_refused(tmp_path, start_node):
    """A CT object sent on the presentation context negotiated for Verification
    (1.2.840.10008.1.1) is stored and answered Success: the abstract syntax a context
    was accepted for is never compared with the command's Affected SOP Class UID (PS3.7
    9.3.1: a DIMSE message travels on a context of its SOP Class), so a sender can store
    a SOP class whose context the node refused."""
    node = _folder_node(tmp_path, start_node)
    ds = _ct()
    with Raw(node.settings.node.port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(3, VERIFICATION, [IMPLICIT_VR_LE])]))
        assert r.read_pdu()[0] == 0x02
        for pdu in c_store_pdus(c_store_command(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), encode(ds, implicit=True), context_id=3):
            r.send(pdu)
        pdu = r.read_pdu()
        r.send(RELEASE_RQ)
        r.read_pdu()
    assert pdu is None or pdu[0] != 0x04 or store_status(pdu[1]) != 0x0000


def test_a_calling_ae_title_cannot_forge_log_lines(tmp_path, start_node, monkeypatch):
    """An A-ASSOCIATE-RQ whose calling AE title holds a line feed ("EV\\nFORGED ...")
    is rejected, but pynetdicom logs the title as received, so the node's log (as
    `casemask serve` configures it) gets a line of the sender's choosing."""
    import io
    import logging

    from node import cli

    node = _folder_node(tmp_path, start_node)
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root.handlers = []
    try:
        cli._setup_logging(0)
        rq = associate_rq(calling="STORESCU")
        at = rq.find(b"STORESCU        ")
        rq = rq[:at] + b"EV\nFORGED LINE".ljust(16) + rq[at + 16 :]
        with Raw(node.settings.node.port, timeout=5) as r:
            r.send(rq)
            r.read_pdu()
        wait_until(lambda: "EV" in stream.getvalue(), timeout=30, what="the rejection logged")
    finally:
        for h in root.handlers:
            root.removeHandler(h)
        root.handlers, root.level = saved, saved_level
        for name in ("pynetdicom", "apscheduler"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert not [line for line in stream.getvalue().splitlines() if line.startswith("FORGED")]


def test_an_association_request_without_presentation_contexts_is_rejected(tmp_path, start_node):
    """An A-ASSOCIATE-RQ with no presentation context (PS3.8 9.3.2 wants one at least)
    was accepted: an association on which nothing can be sent holds a slot until it
    times out. It is answered A-ASSOCIATE-RJ."""
    node = _folder_node(tmp_path, start_node)
    with Raw(node.settings.node.port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[]))
        pdu = r.read_pdu()
    assert pdu is not None and pdu[0] == 0x03  # A-ASSOCIATE-RJ
