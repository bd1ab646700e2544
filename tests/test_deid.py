"""Header de-identification: Annex E profile, options, pseudonyms, leak-freedom, validity."""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.sequence import Sequence

from node.config import DeidSettings
from node.deid import Deidentifier, Pseudonymizer, QuarantineError, load_or_create_secret, to_bytes
from node.deid.profile import load_table
from tests.conftest import PYDICOM_FILES, ROOT, read_quietly

SECRET_A = bytes(range(32))
SECRET_B = bytes(range(1, 33))


def deid(options=(), secret=SECRET_A, **kw) -> Deidentifier:
    return Deidentifier(DeidSettings(options=list(options), **kw), Pseudonymizer(secret))


def bundled_files() -> list[Path]:
    return sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())


def roundtrip(ds: Dataset) -> Dataset:
    return dcmread(io.BytesIO(to_bytes(ds)))


def test_every_bundled_pydicom_file_goes_through_and_stays_readable():
    d = deid(["retain-longitudinal-modified-dates"], burned_in="allow")
    done = 0
    for f in bundled_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(f)
        except Exception:
            continue  # not a DICOM file (pydicom ships some raw streams too)
        res = d.apply(ds)
        back = roundtrip(res.dataset)
        assert back.PatientIdentityRemoved == "YES", f.name
        done += 1
    assert done > 100


@pytest.mark.parametrize("options", [[], ["retain-longitudinal-modified-dates"], ["clean-descriptors", "retain-uids", "retain-safe-private"]])
def test_byte_level_actions_write_what_the_decoded_path_writes(options, tmp_path):
    """The common actions work on raw bytes, and raw elements are copied to the output
    without pydicom's writer; the files must be byte for byte those of the decoded path
    (every action through pydicom values, written by pydicom's save_as)."""
    from tests.conftest import make_study

    files = [p for p in bundled_files() if p.suffix == ".dcm"] + make_study(tmp_path / "phi", 3)
    fast, ref = deid(options, burned_in="allow"), deid(options, burned_in="allow")
    ref.raw_fast = False
    compared = 0
    for f in files:
        a, b = read_quietly(f), read_quietly(f)
        if a is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ra, rb = fast.apply(a), ref.apply(b)
            out_fast = to_bytes(ra.dataset)
            rb.dataset.preamble = b"\x00" * 128 if getattr(rb.dataset, "preamble", None) is not None else None
            meta = getattr(rb.dataset, "file_meta", None)
            enforce = meta is not None and bool(meta.get("MediaStorageSOPClassUID")) and bool(meta.get("MediaStorageSOPInstanceUID"))
            buf = io.BytesIO()
            try:
                rb.dataset.save_as(buf, enforce_file_format=enforce)
            except (TypeError, ValueError):
                continue  # pydicom cannot write it as read (e.g. big endian to little): to_bytes repairs, nothing to compare
        assert out_fast == buf.getvalue(), f.name
        assert ra.uid_map == rb.uid_map and ra.patient_map == rb.patient_map, f.name
        compared += 1
    assert compared > 60


def test_preamble_is_not_carried_over(tmp_path):
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.preamble = b"Jane Doe 1970-01-01 ".ljust(128, b"!")
    path = tmp_path / "with-preamble.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = to_bytes(deid().apply(dcmread(path)).dataset)
    assert out[:128] == b"\x00" * 128 and out[128:132] == b"DICM"


def _plant(ds: Dataset, marker: str) -> list[str]:
    """Put PHI into an attribute of every text VR that the table lists, nested and private."""
    table = load_table()
    planted = []
    by_vr: dict[str, int] = {}
    for tag, action in table.by_tag.items():
        kw = keyword_for_tag(tag)
        if tag >> 16 < 0x0008:
            continue  # command and file meta groups are not dataset attributes
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if not kw or vr not in ("LO", "SH", "ST", "LT", "UT", "UC", "PN", "DA", "DT", "TM", "AE", "UI", "CS", "AS", "IS", "DS"):
            continue
        if action == "K" or vr in by_vr and by_vr[vr] >= 4:
            continue
        value = {"DA": "19610704", "DT": "19610704101010", "TM": "101010", "UI": "1.2.3.4.5.6.999", "AS": "061Y", "IS": "4711", "DS": "47.11", "AE": marker[:16], "CS": "SECRETCODE"}.get(vr, f"{marker} {kw}")
        setattr(ds, kw, value)
        planted.append(value)
        by_vr[vr] = by_vr.get(vr, 0) + 1
    inner = Dataset()
    inner.PatientName = f"{marker}^Nested"
    inner.ReferencedSOPInstanceUID = "1.2.3.4.5.6.777"
    deeper = Dataset()
    deeper.PersonName = f"{marker}^Deeper"
    deeper.PatientID = f"{marker}-DEEP"
    inner.ContentSequence = Sequence([deeper])
    ds.ReferencedImageSequence = Sequence([inner])
    ds.OtherPatientIDsSequence = Sequence([copy.deepcopy(inner)])
    planted += [f"{marker}^Nested", "1.2.3.4.5.6.777", f"{marker}^Deeper", f"{marker}-DEEP"]
    block = ds.private_block(0x0011, "ACME HOSPITAL", create=True)
    block.add_new(0x01, "LO", f"{marker} private")
    planted.append(f"{marker} private")
    return planted


def test_planted_phi_never_survives_the_basic_profile():
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    planted = _plant(ds, "ZEBRA")
    ds.PatientName = "Zebra^Quagga"
    ds.PatientID = "MRN-ZEBRA-1"
    res = deid().apply(ds)
    out = roundtrip(res.dataset)
    text = "\n".join(str(e.value) for e in out.iterall() if e.tag != 0x7FE00010)
    for value in planted + ["Zebra", "MRN-ZEBRA-1"]:
        assert value not in text, f"{value!r} survived"
    assert "ZEBRA" not in text.upper()
    assert not any(e.tag.is_private for e in out.iterall())


def test_options_keep_what_they_say():
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.PatientSex, ds.PatientAge, ds.InstitutionName, ds.StationName = "F", "061Y", "Synthetic Hospital", "CT01"
    sop = str(ds.SOPInstanceUID)
    out = deid(["retain-patient-characteristics", "retain-institution-identity", "retain-device-identity", "retain-uids"]).apply(copy.deepcopy(ds)).dataset
    assert (out.PatientSex, out.PatientAge, out.InstitutionName, out.StationName) == ("F", "061Y", "Synthetic Hospital", "CT01")
    assert str(out.SOPInstanceUID) == sop
    out = deid().apply(copy.deepcopy(ds)).dataset
    assert "PatientAge" not in out and out.get("InstitutionName", "") == "" and str(out.SOPInstanceUID) != sop
    codes = {i.CodeValue for i in deid(["clean-descriptors"]).apply(copy.deepcopy(ds)).dataset.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105"}


def test_clean_descriptors_scrubs_identifying_text_it_keeps():
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.PatientName, ds.PatientID = "Quillfeather^Marisol", "MRN4471920"
    ds.StudyDescription = "CT chest Quillfeather follow-up MRN4471920 tel 5550123"
    out = deid(["clean-descriptors"]).apply(ds).dataset
    text = str(out.StudyDescription)
    assert text.startswith("CT chest") and "Quillfeather" not in text and "4471920" not in text and "5550123" not in text


def test_marking_and_file_meta():
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    out = deid(["retain-longitudinal-modified-dates"]).apply(ds).dataset
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert {i.CodeValue for i in out.DeidentificationMethodCodeSequence} == {"113100", "113107"}
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.ImplementationVersionName.startswith("CASEMASK")
    assert out.file_meta.MediaStorageSOPInstanceUID != ds_uid(PYDICOM_FILES / "CT_small.dcm")


def ds_uid(path) -> str:
    return str(dcmread(path).SOPInstanceUID)


def test_file_meta_never_keeps_the_original_instance_uid():
    """Even a dataset without SOPInstanceUID: the file meta's copy is pseudonymised."""
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    original = str(ds.file_meta.MediaStorageSOPInstanceUID)
    del ds.SOPInstanceUID
    out = roundtrip(deid().apply(ds).dataset)
    assert str(out.file_meta.MediaStorageSOPInstanceUID) not in ("", original)
    assert original.encode() not in to_bytes(deid().apply(dcmread(PYDICOM_FILES / "CT_small.dcm")).dataset)


def test_pseudonyms_are_stable_across_instances_and_secrets():
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    a1 = deid(secret=SECRET_A).apply(copy.deepcopy(ds)).dataset
    a2 = deid(secret=SECRET_A).apply(copy.deepcopy(ds)).dataset  # a second "node" with the same secret
    b = deid(secret=SECRET_B).apply(copy.deepcopy(ds)).dataset
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName"):
        assert str(a1[kw].value) == str(a2[kw].value), kw
        assert str(a1[kw].value) != str(b[kw].value), kw
        assert str(a1[kw].value) != str(ds[kw].value), kw
    assert str(a1.SOPInstanceUID).startswith("2.25.") and len(str(a1.SOPInstanceUID)) <= 64


def test_secret_file_is_created_0600_and_reused(tmp_path):
    p = tmp_path / "secret.key"
    k1 = load_or_create_secret(p)
    assert p.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(p) == k1
    p.chmod(0o644)
    with pytest.raises(PermissionError):
        load_or_create_secret(p)


@pytest.mark.parametrize("content, mode, expected", [("00" * 32, 0o644, "chmod 600"), ("not hex", 0o600, "hex digits")])
def test_cli_with_a_bad_secret_file_says_what_to_do_without_a_traceback(tmp_path, content, mode, expected):
    """casemask deid and casemask status read the secret as serve does: a readable-by-others
    or malformed file is one line on stderr and exit status 2, never a traceback."""
    secret = tmp_path / "s.key"
    secret.write_text(content)
    secret.chmod(mode)
    src = tmp_path / "in.dcm"
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", src)
    r = subprocess.run([sys.executable, "-m", "node.cli", "deid", str(src), "--out", str(tmp_path / "out"), "--secret", str(secret)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nsecret_path = "{secret}"\n')
    (tmp_path / "data").mkdir(mode=0o700)
    (tmp_path / "data" / "casemask.db").touch(mode=0o600)  # a node's database: status reads the secret next
    r = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_modified_dates_keep_intervals():
    ds1 = dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds1.PatientID = "MRN-1"
    ds1.StudyDate, ds1.AcquisitionDate = "20240101", "20240115"
    ds2 = copy.deepcopy(ds1)
    ds2.StudyDate = "20240301"
    d = deid(["retain-longitudinal-modified-dates"], date_shift_days=(-400, -10))
    o1, o2 = d.apply(ds1).dataset, d.apply(ds2).dataset
    day = lambda s: dt.datetime.strptime(s, "%Y%m%d")  # noqa: E731
    assert o1.StudyDate != "20240101"
    assert (day(o2.StudyDate) - day(o1.StudyDate)).days == 60
    assert (day(o1.AcquisitionDate) - day(o1.StudyDate)).days == 14
    assert -400 <= (day(o1.StudyDate) - day("20240101")).days <= -10


def test_burned_in_text_is_quarantined_unless_pixels_are_cleaned():
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.Modality = "US"
    with pytest.raises(QuarantineError):
        deid().apply(copy.deepcopy(ds))
    ds.Modality, ds.BurnedInAnnotation = "CT", "YES"
    with pytest.raises(QuarantineError):
        deid().apply(copy.deepcopy(ds))
    Deidentifier(DeidSettings(), Pseudonymizer(SECRET_A), pixels_cleaned=True).apply(copy.deepcopy(ds))
    deid(burned_in="allow").apply(copy.deepcopy(ds))


def test_overrides_keep_remove_replace():
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.StudyDescription = "Chest"
    out = deid(keep=["StudyDescription"], remove=["Manufacturer"], replace={"BodyPartExamined": "CHEST"}).apply(ds).dataset
    assert out.StudyDescription == "Chest" and "Manufacturer" not in out and out.BodyPartExamined == "CHEST"


def test_cli_deid_diff_and_mapping_export(tmp_path):
    import sys

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", src / "a.dcm")
    (src / "notes.txt").write_text("not dicom")
    r = subprocess.run([sys.executable, "-m", "node.cli", "deid", str(src), "--out", str(tmp_path / "out"), "--diff", "--secret", str(tmp_path / "s.key")], capture_output=True, text=True, cwd=ROOT)
    assert "skipped" in r.stderr and r.returncode == 1  # the text file is reported, not fatal
    assert " X (0010,1010) PatientAge" in r.stdout
    kept = next(line for line in r.stdout.splitlines() if "kept" in line)
    assert "PatientAge" not in kept and "Manufacturer" in kept
    (out,) = (tmp_path / "out").glob("*.dcm")
    assert "PatientAge" not in dcmread(out)


def test_export_mapping_csv(tmp_path, start_node):
    """Every output kind's original -> final UIDs, patients (issuer + ID) with name
    pseudonyms, owner-only files (19.8)."""
    from tests.conftest import make_study, node_config, receive, write_toml

    cfg = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    cfg["routes"][0]["deid"] = {"profile": "basic", "options": ["retain-longitudinal-modified-dates"]}
    node = start_node(cfg, listen=False, schedule=False)
    files = make_study(tmp_path / "s", 2)
    for f in files:
        receive(node, dcmread(f))
    node.tick(stable_after_s=0)
    from node.cli import main

    path = write_toml(cfg, tmp_path / "c.toml")
    assert main(["export-mapping", "--config", str(path), "--out", str(tmp_path / "map")]) == 0
    assert (tmp_path / "map").stat().st_mode & 0o777 == 0o700
    for name in ("uids.csv", "patients.csv"):
        assert (tmp_path / "map" / name).stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader((tmp_path / "map" / "patients.csv").open()))
    assert len(rows) == 1 and rows[0]["patient_id"] == "MRN-99812734" and rows[0]["issuer"] == ""
    assert rows[0]["patient_id_new"].startswith("CM") and rows[0]["patient_name"] == "Doe^Janet^Q" and rows[0]["patient_name_new"].startswith("ANON^")
    assert -365 <= int(rows[0]["date_offset_days"]) <= -1
    uids = list(csv.DictReader((tmp_path / "map" / "uids.csv").open()))
    sop = {r["id_old"]: r["id_new"] for r in uids if r["level"] == "SOPInstanceUID" and r["output_kind"] == "deidentified"}
    delivered = {str(dcmread(p).SOPInstanceUID) for p in (tmp_path / "out").rglob("*.dcm")}
    assert {str(dcmread(f).SOPInstanceUID) for f in files} == set(sop) and set(sop.values()) == delivered
    assert any(r["level"] == "StudyInstanceUID" for r in uids) and any(r["level"] == "SeriesInstanceUID" for r in uids)


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy is not installed (apt-get install -y dicom3tools)")
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"])
def test_output_validates_no_worse_than_input(tmp_path, name):
    src = PYDICOM_FILES / name

    def errors(path: Path) -> set[str]:
        r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
        out = r.stdout + r.stderr
        return {line.split(" - ", 1)[-1].strip() for line in out.splitlines() if line.startswith("Error")}

    out = deid(["retain-longitudinal-modified-dates"]).apply(dcmread(src)).dataset
    dst = tmp_path / "out.dcm"
    dst.write_bytes(to_bytes(out))
    new = errors(dst) - errors(src)
    assert not new, f"errors the input did not have: {sorted(new)}"


def test_log_ids_are_keyed_short_and_stable():
    a, b = Pseudonymizer(SECRET_A), Pseudonymizer(SECRET_B)
    uid = "1.2.840.113619.2.55.3.20240311.1"
    assert a.log_id(uid) == a.log_id(uid) and a.log_id(uid) != b.log_id(uid)
    assert a.log_id(uid).startswith("h:") and len(a.log_id(uid)) == 14 and "20240311" not in a.log_id(uid)


def test_cli_deid_diff_keeps_only_what_is_unchanged_in_the_output(tmp_path):
    """`--diff`'s "kept" list was every keyword of the input minus the profile's lines:
    CodeMeaning read "kept" though one of its two places (inside a removed
    SourceImageSequence) was gone, and an object de-identified before listed
    LongitudinalTemporalInformationModified as kept while the marks rewrote it. Now a
    keyword is kept where its value is the same at the same place in the output, a
    keyword kept in some places says in how many, and a change the profile's table did
    not make (the marks) has its own line, M."""
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = Sequence([code])
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.7"
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "121320", "DCM", "Uncompressed predecessor"
    source.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.SourceImageSequence = Sequence([source])
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "a.dcm")
    (tmp_path / "s.key").write_text("5e" * 32)
    (tmp_path / "s.key").chmod(0o600)

    def diff(src: Path, out: Path, *options: str) -> list[str]:
        r = subprocess.run([sys.executable, "-m", "node.cli", "deid", str(src), "--out", str(out), "--diff", "--secret", str(tmp_path / "s.key"), *options],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    lines = diff(tmp_path / "in", tmp_path / "once")
    kept = next(line for line in lines if line.startswith("  kept "))
    assert "  X (0008,2112) SourceImageSequence" in lines
    for kw in ("CodeMeaning", "CodeValue", "CodingSchemeDesignator"):
        assert f"{kw} (in 1 of 2 places)" in kept, kept
    assert ", Manufacturer," in kept and "PatientName" not in kept and not any(line.startswith("  M ") for line in lines), lines
    assert "  X (0009,0010) (0009,0010)" in lines and "(0009,0010)" not in kept, lines  # a private creator whose block went: was "kept"
    # Again, with an option: the marks rewrite what the first run wrote.
    lines = diff(tmp_path / "once", tmp_path / "twice", "--option", "retain-longitudinal-modified-dates")
    kept = next(line for line in lines if line.startswith("  kept "))
    assert "  M (0028,0303) LongitudinalTemporalInformationModified" in lines and "LongitudinalTemporalInformationModified" not in kept, lines
    before, after = dcmread(next((tmp_path / "once").glob("*.dcm"))), dcmread(next((tmp_path / "twice").glob("*.dcm")))
    assert before.LongitudinalTemporalInformationModified != after.LongitudinalTemporalInformationModified
    for kw in kept.split(": ", 1)[1].split(", "):
        if " (in " not in kw:
            assert str(before.get(kw, "")) == str(after.get(kw, "")), kw  # every keyword said kept at the top level is unchanged
