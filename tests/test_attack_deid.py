"""Hostile header content against de-identification (docs/security.md, "Hostile
headers"): synthetic identifiers planted where a de-identifier may not look, each sent
through ``casemask deid`` and through a node to a folder destination; then the output
bytes are searched for them (ASCII, UTF-8, UTF-16 and Latin-1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from tests.conftest import ROOT, node_config, wait_until

NAME, GIVEN, PID, BIRTH = "ZQXNAME", "ZQXGIVEN", "ZQXPID4711", "19610317"
DOCTOR, MOTHER = "ZQXDOC", "ZQXMOTHER"
LATIN = "ZQXMÜLLER"  # a family name with an accent, written in Latin-1 (ISO_IR 100)
TOKENS = (NAME, GIVEN, PID, BIRTH, DOCTOR, MOTHER, "ZQXN", LATIN)


def _base(implicit: bool = False) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{NAME}^{GIVEN}", PID, BIRTH
    ds.Modality, ds.StudyDate = "CT", "20200101"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.SamplesPerPixel, ds.PixelRepresentation = 7, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _items_as_bytes() -> bytes:
    """The value of a sequence (one item naming a physician and a mother), as bytes."""
    item = Dataset()
    item.ReferringPhysicianName, item.PatientMotherBirthName, item.TextValue = f"{DOCTOR}^ZQXFIRST", MOTHER, f"seen by {DOCTOR}"
    holder = Dataset()
    holder.ContentSequence = Sequence([item])
    bio = DicomBytesIO()
    bio.is_little_endian, bio.is_implicit_VR = True, False
    write_dataset(bio, holder)
    return bio.getvalue()[12:]  # after the sequence element's tag, VR, reserved bytes and length


def hostile() -> dict[str, Dataset]:
    """Variant name -> a data set carrying the synthetic identifiers somewhere odd."""
    v: dict[str, Dataset] = {}
    d = _base()
    d.add_new(0x00090010, "LO", "EVIL")
    d.add_new(0x00091001, "LO", NAME)
    v["private tag"] = d
    d = _base()
    cur = d
    for _ in range(50):
        item = Dataset()
        cur.ReferencedStudySequence = Sequence([item])
        cur = item
    cur.PatientName, cur.PatientID = f"{NAME}^{GIVEN}", PID
    v["50 nested sequences"] = d
    d = _base()
    d.add(DataElement(0x00101001, "UN", f"{NAME}^OTHER ".encode()))  # OtherPatientNames as UN
    v["PN as UN"] = d
    d = _base(implicit=True)
    d.add(DataElement(0x0040A123, "PN", f"{NAME}^{GIVEN}"))
    v["implicit VR PN"] = d
    d = _base()
    d.add_new(0x40080114, "PN", f"{NAME}^{GIVEN}")  # retired PhysicianApprovingInterpretation
    d.add_new(0x40080300, "ST", f"Impressions of {NAME}")  # retired
    v["retired tags"] = d
    d = _base()
    d.add_new(0x00420011, "OB", f"{NAME}^{GIVEN} born {BIRTH} {PID}\0".encode())
    d.MIMETypeOfEncapsulatedDocument = "text/plain"
    v["text in an encapsulated document"] = d
    d = _base()
    d.add_new(0x00204000, "LT", "x" * 10000 + f" {NAME} " + "y" * 10000)
    v["very long value"] = d
    d = _base()
    d.SpecificCharacterSet = ["", "ISO 2022 IR 100"]
    d.PatientName, d.ImageComments = f"{NAME}Ä^{GIVEN}", f"seen {NAME}Ä today"
    v["ISO 2022 escapes"] = d
    d = _base()
    d.SpecificCharacterSet = "ISO_IR 100"
    d.PatientName = f"{NAME}Ä^{GIVEN}"
    item = Dataset()
    item.SpecificCharacterSet, item.TextValue = "ISO_IR 192", f"{NAME}Ä"
    d.ContentSequence = Sequence([item])
    v["item with its own character set"] = d
    d = _base()
    d.file_meta.SourceApplicationEntityTitle = NAME
    d.file_meta.PrivateInformationCreatorUID = f"1.2.3.{BIRTH}"
    d.file_meta.PrivateInformation = f"{NAME}^{GIVEN}".encode()
    v["file meta"] = d
    d = _base()
    d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.{BIRTH}.4711"
    v["SOP Instance UID with a date"] = d
    d = _base()
    d.add(DataElement(0x00081032, "OB", _items_as_bytes()))  # ProcedureCodeSequence (K) sent as OB
    v["sequence sent as OB"] = d
    d = _base()
    d.add_new(0x00221096, "OB", f"{NAME}^{GIVEN}".encode("utf-16-le"))  # a sequence tag, as OB, UTF-16 text
    v["UTF-16 name in a sequence tag sent as OB"] = d
    d = _base()
    d.add_new(0x0008041B, "OB", f"{NAME} {GIVEN}".encode("utf-16-le"))  # RecordKey: binary, kept
    v["UTF-16 name in a kept binary attribute"] = d
    d = _base()
    d.add_new(0x0008041B, "OB", PID.encode("utf-16-be"))
    v["UTF-16 (big endian) Patient ID in a kept binary attribute"] = d
    d = _base()
    d.SpecificCharacterSet, d.PatientName = "ISO_IR 100", f"{LATIN}^{GIVEN}"
    d.add_new(0x0008041B, "OB", f"{LATIN} ".encode("latin-1"))  # the verifier searched UTF-8 and UTF-16 spellings only
    v["Latin-1 name in a kept binary attribute"] = d
    return v


def leaks(data: bytes) -> list[str]:
    """The planted tokens found in ``data``, in ASCII, UTF-8, UTF-16 or Latin-1."""
    found = []
    for t in TOKENS:
        spellings = (t.encode(), t.encode("utf-16-le"), t.encode("utf-16-be"), t.encode("latin-1"))
        if any(s in data for s in spellings):
            found.append(t)
    return found


@pytest.mark.parametrize("variant", list(hostile()))
def test_casemask_deid_lets_no_planted_identifier_out(tmp_path, variant):
    """Each variant is either written without any planted token, or quarantined (nothing
    written). Broke before: a sequence sent as OB kept its items (a physician's and a
    mother's name) whole, and UTF-16 text in binary values passed the verifier."""
    src = tmp_path / "in"
    src.mkdir()
    hostile()[variant].save_as(src / "x.dcm", enforce_file_format=True)
    r = subprocess.run([sys.executable, "-m", "node.cli", "deid", str(src), "--out", str(tmp_path / "out"), "--secret", str(tmp_path / "s.key"), "-j", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    outputs = list((tmp_path / "out").rglob("*.dcm"))
    assert r.returncode in (0, 1), r.stderr[-2000:]
    assert outputs or "quarantined" in r.stderr
    for out in outputs:
        assert leaks(out.read_bytes()) == [], f"{variant}: {leaks(out.read_bytes())} in the output"
    assert leaks((r.stdout + r.stderr).encode()) == []  # nor in what it printed


def test_the_node_delivers_no_planted_identifier_to_a_folder(tmp_path, start_node, caplog):
    """Every variant through a node (C-STORE by pynetdicom) to a folder destination:
    each object ends in the folder without a planted token, or quarantined; nor are the
    tokens in the node's log or quarantine reasons."""
    from pynetdicom import AE

    caplog.set_level("INFO")
    out = tmp_path / "out"
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}], stable_after_s=0.2))
    variants = hostile()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK")
    assert assoc.is_established
    try:
        for name, ds in variants.items():
            status = assoc.send_c_store(ds)
            assert status and status.Status in (0x0000, 0xC210), f"{name}: {status}"
    finally:
        assoc.release()
    from sqlalchemy import select

    from node.db import Instance, InstanceState, Job, JobState

    def settled() -> bool:
        with node.sessions() as s:
            jobs = list(s.scalars(select(Job)))
            loose = list(s.scalars(select(Instance).where(Instance.state == InstanceState.QUARANTINED)))
            return len(jobs) + len(loose) >= len(variants) - 1 and all(j.state in (JobState.DONE, JobState.QUARANTINED) for j in jobs)

    wait_until(settled, timeout=90, what="every variant delivered or quarantined")
    for f in out.rglob("*.dcm"):
        assert leaks(f.read_bytes()) == [], f"{leaks(f.read_bytes())} in {f.name}"
    with node.sessions() as s:
        reasons = " ".join(j.reason for j in s.scalars(select(Job))) + " ".join(i.reason for i in s.scalars(select(Instance)))
    assert leaks(reasons.encode()) == []
    assert leaks(caplog.text.encode()) == []
