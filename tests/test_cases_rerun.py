"""The shared cases re-run through the node as a user runs it (``casemask serve`` as a
subprocess, dcmtk's storescu as the modality, a folder destination): the cases whose
README expectation only shows over the network (02: a SOP Instance UID used as a path;
03: the same SOP Instance UID in another study), every other case's README outcome read
back from what the node delivered (or quarantined), and what the node's log may say
about them (no original UIDs, no patient data)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import numpy as np
from pydicom import dcmread

from node.deid.pseudonyms import Pseudonymizer, patient_key

from tests.conftest import ROOT, STORESCU, NodeProcess, dcmtk_env, needs_dcmtk, node_config, wait_until, write_toml

CASES = ROOT.parent / "shared" / "cases"
pytestmark = [needs_dcmtk, pytest.mark.skipif(not CASES.is_dir(), reason=f"the shared case folder {CASES} is absent")]


def case(name: str) -> Path:
    return next(CASES.glob(f"{name}*"))


def storescu_statuses(port: int, files: list[Path], *options: str) -> list[str]:
    """Send with dcmtk's storescu (``options``: say -xr to propose RLE Lossless); the
    status text of each C-STORE response, in order."""
    r = subprocess.run([STORESCU, "-v", "-R", *options, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)],
                       env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    return re.findall(r"Received Store Response \(([^)]*)\)", r.stdout + r.stderr)


def refused(status: str) -> bool:
    """Whether storescu's status text is a failure (the sender keeps its copy): not
    Success, and not a Warning (stored all the same)."""
    return bool(status) and not status.startswith(("Success", "Warning"))


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

    def start(**node_kw) -> tuple[NodeProcess, dict]:
        deep = tmp_path / "a" / "b" / "c" / "d" / "e" / "f" / "g" / "h"
        deep.mkdir(parents=True)
        cfg = node_config(deep, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], **node_kw)
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
    spooled = [p for p in spool.rglob("*") if p.is_file()]
    if statuses[0] == "Success":  # kept: only under a digest's name
        assert spooled and all(re.fullmatch(r"[0-9a-f]{16,}\.dcm", p.name) for p in spooled), [p.name for p in spooled]
    else:  # refused with a failure status, and nothing of it kept
        assert refused(statuses[0]) and not spooled, (statuses[0], len(spooled))
        log = (tmp_path / "node.log").read_text()
        assert re.search(r"WARNING node\.scp: .*SOP Instance UID not a valid UID -> 0x[ABC][0-9A-F]{3}", log)


def test_case03_same_sop_uid_in_another_study_is_not_dropped_with_success(tmp_path, serve):
    node, cfg = serve()
    files = [case("03") / "first.dcm", case("03") / "second.dcm"]
    statuses = storescu_statuses(cfg["node"]["port"], files)
    assert len(statuses) == 2 and statuses[0] == "Success"
    out = tmp_path / "out"
    if statuses[1] == "Success":  # acknowledged: it must reach the destination as its own object
        wait_until(lambda: len(list(out.rglob("*.dcm"))) >= 2, timeout=60, what="both objects delivered")
        outs = [dcmread(p) for p in out.rglob("*.dcm")]
        assert len({str(o.StudyInstanceUID) for o in outs}) == 2
        assert len({str(o.SOPInstanceUID) for o in outs}) == 2  # its own object: an archive would drop a second one under the first's UID
    else:  # refused: the sender keeps it, and the node keeps no copy of it
        assert refused(statuses[1]), statuses[1]
        spooled = [str(dcmread(p, force=True).PatientID) for p in (Path(cfg["node"]["data_dir"]) / "spool").rglob("*.dcm")]
        assert "PID11223344" not in spooled
    # A receiver process's records reach the node's log a moment later (node.receivers).
    wait_until(lambda: re.search(r"(WARNING|ERROR) node\.scp: .*(conflict|another|differ)", (tmp_path / "node.log").read_text()), timeout=60, what="the conflict logged")


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


SECRET = bytes(range(32))
DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's error lines for ``path`` (the messages, without the file's values)."""
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return {line.split(" - ", 1)[-1].strip() for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")}


def node_status(config: Path) -> dict:
    """``casemask status --json`` of the node on ``config``, as an operator reads it."""

    r = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def phi_values(files: list[Path]) -> set[bytes]:
    """Every identifying text of the inputs (names, IDs, accession and order numbers,
    institution, dates of birth, UIDs), five characters or more, as bytes."""
    found: set[bytes] = set()
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(f, force=True)
        for e in ds.iterall():
            if e.VR == "PN" and e.value:  # the whole name too: DOE^JANE, whose parts are short
                found.update(str(part) for part in (e.value, e.value.family_name, e.value.given_name) if len(str(part)) >= 5)
            elif e.keyword in ("PatientID", "AccessionNumber", "InstitutionName", "PatientBirthDate", "RequestedProcedureID",
                               "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest", "IssuerOfPatientID",
                               "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "ReferencedSOPInstanceUID") and e.value:
                found.add(str(e.value))
    return {v.encode() for v in found if len(v) >= 5}


def test_every_case_through_the_node_reaches_its_readme_outcome(tmp_path, serve):
    """Every other case's files (01, 04, 05, 06, 09, 10, 13, 15, 16) sent by storescu to a
    node whose one route de-identifies headers only (retain-longitudinal-modified-dates)
    into a folder, each README's outcome read back from what arrived: 04 (screen
    captures labelled CT) and 09 (PDF with BurnedInAnnotation YES) quarantined, never
    delivered; no input's name, ID, accession or order number, birth date or UID in any
    delivered file's bytes (01 UN sequences, 05 SR text, 09 DocumentTitle); 01's UN
    person name and order numbers emptied, 05's TextValues dummied; 06's presentation
    state points at the delivered CT, whose Type 3 references are removed, and neither
    has a dciodvfy error its input lacks; 10 has no bit above BitsStored and no
    overlay group; 13 arrives as a DICOM file with file meta; 15's two patients (ID 12345
    at two issuers) get different pseudonyms and date offsets; 16 has no birth date. The
    node's log quotes none of the inputs' identifying values."""
    key = tmp_path / "secret.key"
    key.write_text(SECRET.hex())
    key.chmod(0o600)
    node, cfg = serve(secret_path=str(key))
    config = tmp_path / "node.toml"
    quarantine = [case("04") / "dose_mono.dcm", case("04") / "dose_rgb.dcm", case("09") / "report_pdf.dcm"]
    delivered = [f for n in ("01", "05", "06", "10", "13", "15", "16") for f in sorted(case(n).glob("*.dcm"))]
    statuses = storescu_statuses(cfg["node"]["port"], quarantine + delivered)
    assert statuses == ["Success"] * (len(quarantine) + len(delivered))

    def settled() -> bool:
        counts = node_status(config)["counts"]
        return counts.get("instances", {}).get("QUARANTINED") == len(quarantine) and counts.get("destination:f", {}).get("SENT") == len(delivered)

    wait_until(settled, timeout=90, what="every case processed: delivered or quarantined")
    # What the operator reads about the quarantined ones: the step and why (04 whatever its
    # Modality CT says, 09 for its BurnedInAnnotation YES), never a value.
    r = subprocess.run([sys.executable, "-m", "node.cli", "quarantine", "list", "--json", "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    held = json.loads(r.stdout)
    reasons = sorted((q["modality"], q["step"], q["reason"]) for q in held)
    assert [m for m, _, _ in reasons] == ["CT", "CT", "DOC"] and all(step == "headers" for _, step, _ in reasons), reasons
    assert all("Secondary Capture" in why and "does not clean pixels" in why for m, _, why in reasons if m == "CT"), reasons
    assert "BurnedInAnnotation is YES" in reasons[2][2], reasons
    paths = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(paths) == len(delivered)
    secrets = phi_values(quarantine + delivered)
    leaked = sum(v in p.read_bytes() for p in paths for v in secrets)  # a count: the values stay out of test output
    assert leaked == 0, "a delivered file holds an input's identifying value"
    log = (tmp_path / "node.log").read_bytes()  # what the node said about every case, quarantined ones included
    assert b"-> QUARANTINED" in log and b"-> PROCESSED" in log  # it said something about them
    assert sum(v in log for v in secrets | {b"DOE^JANE", b"DOE JANE"}) == 0, "the node's log quotes an input's identifying value"
    outs = [dcmread(p) for p in paths]
    assert not [o for o in outs if o.Modality in ("DOC", "OT") or o.SOPClassUID.name.startswith(("Secondary", "Encapsulated"))]
    assert all(o.preamble is not None and o.file_meta.MediaStorageSOPInstanceUID == o.SOPInstanceUID for o in outs)  # 13 too
    assert all(o.get("PatientBirthDate", "") == "" and o.PatientIdentityRemoved == "YES" for o in outs)  # 16
    pr = next(o for o in outs if o.Modality == "PR")
    cts = {str(o.SOPInstanceUID) for o in outs if o.Modality == "CT"}
    assert str(pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID) in cts  # 06
    ct06 = next(o for o in outs if o.Modality == "CT" and str(o.SOPInstanceUID) == str(pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID))
    assert "ReferencedImageSequence" not in ct06 and "SourceImageSequence" not in ct06  # 06: Type 3 in CT, removed, not emptied
    if DCIODVFY:  # 06 (and the rest): no dciodvfy error the input lacks
        inputs = {dcmread(f, force=True).Modality: f for f in (case("06") / "ct.dcm", case("06") / "pr.dcm")}
        for o, p in ((ct06, next(q for q in paths if dcmread(q).SOPInstanceUID == ct06.SOPInstanceUID)), (pr, next(q for q in paths if dcmread(q).Modality == "PR"))):
            new = dciodvfy_errors(p) - dciodvfy_errors(inputs[o.Modality])
            assert not new, (o.Modality, sorted(new))
    srs = [o for o in outs if o.Modality == "SR"]
    assert len(srs) == 3  # 01 a, 01 b, 05
    for sr, p in ((o, q) for o, q in zip(outs, paths) if o.Modality == "SR"):  # 01: the UN person name emptied, as a PN
        assert sr.get("SecondaryReviewerName", "") == "" and b"\x14\x00\x04\x01UN" not in p.read_bytes()  # (bytes: pydicom reads UN as PN)
        assert {str(e.value) for e in sr.iterall() if e.keyword == "TextValue"} <= {"ANONYMIZED"}  # 05: the basic profile dummies every TextValue
        for item in sr.get("ReferencedRequestSequence", []):  # 01: the UN sequence's content cleaned like any SQ
            assert all(item.get(kw, "") == "" for kw in ("AccessionNumber", "RequestedProcedureID", "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest"))
    mr = next(o for o in outs if o.Modality == "MR")
    # 10: the raw words (pixel_array masks the bits above BitsStored away, so it cannot see them)
    words = np.frombuffer(mr.PixelData, "<u2")
    assert int(mr.BitsAllocated) == 16 and not (words >> int(mr.BitsStored)).any() and not any(0x6000 <= e.tag.group <= 0x601E for e in mr)
    pseudo = Pseudonymizer(SECRET)
    a, b = (pseudo.patient_id(patient_key("12345", issuer)) for issuer in ("HOSP_A", "HOSP_B"))
    dates = {str(o.PatientID): str(o.StudyDate) for o in outs if o.PatientID in (a, b)}  # 15: both input studies 20210314
    assert a != b and set(dates) == {a, b} and dates[a] != dates[b] and "20210314" not in dates.values()


def test_case05_and_16_through_a_node_whose_route_takes_the_options(tmp_path, serve):
    """The outcomes the cases' READMEs give under options, through the node (the test
    above runs the basic profile with modified dates only, so a route with
    clean-structured-content could keep SR text verbatim unseen): 05 with
    clean-structured-content arrives with every TextValue cleaned, none verbatim and
    none of the input's identifying values in its bytes; 16 under
    retain-longitudinal-full-dates arrives without its birth date, its study date kept."""
    route = {"name": "opts", "deid": {"profile": "basic", "options": ["retain-longitudinal-full-dates", "clean-structured-content"]}, "destinations": ["f"]}
    node, cfg = serve(routes=[route])
    files = [case("05") / "sr_phi.dcm", case("16") / "ct_age91.dcm"]
    assert storescu_statuses(cfg["node"]["port"], files) == ["Success", "Success"]
    out = tmp_path / "out"
    wait_until(lambda: len(list(out.rglob("*.dcm"))) == 2, timeout=60, what="both objects delivered")
    paths = sorted(out.rglob("*.dcm"))
    assert sum(v in p.read_bytes() for p in paths for v in phi_values(files)) == 0, "a delivered file holds an input's identifying value"
    outs = {o.Modality: o for o in map(dcmread, paths)}
    ins = {i.Modality: i for i in (dcmread(f, force=True) for f in files)}
    texts = [str(e.value) for e in outs["SR"].iterall() if e.keyword == "TextValue"]
    originals = {str(e.value) for e in ins["SR"].iterall() if e.keyword == "TextValue"}
    assert len(texts) == len(originals) and not set(texts) & originals and not set(texts) <= {"ANONYMIZED"}  # cleaned, not kept, not only dummied
    # What the README names (name, MRN, birth date, accession) in the forms the text
    # writes them, which the header's values do not all match: "Jane Doe", "1970-04-01".
    p = ins["SR"]
    birth = str(p.PatientBirthDate)
    named = {p.PatientName.family_name, p.PatientName.given_name, str(p.PatientID), str(p.AccessionNumber), birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"}
    words = {w for t in texts for w in re.findall(r"[\w-]+", t.lower())}
    assert not words & {v.lower() for v in named}, "a TextValue still holds the patient's name, MRN, birth date or accession"
    assert outs["CT"].get("PatientBirthDate", "") == "" and str(outs["CT"].StudyDate) == str(ins["CT"].StudyDate)


def test_variants_of_cases_04_10_16_through_the_node(tmp_path, serve):
    """Each case's kind one step aside, through the node's headers-only route: 10 with
    its overlay group already removed upstream (the bits stay in Pixel Data), 04 as CT
    Image Storage whose ImageType lost the sign and whose SeriesDescription says screen
    save, 16 with the birth date also written in an alternative calendar (LO), and 10
    as it comes in RLE Lossless (dcmtk's dcmcrle, sent as RLE: RLE codes every byte of a
    word, bit 12 with them), and 10 in JPEG Lossless (dcmtk's dcmcjpeg codes all 16 bits,
    bit 12 with them). 10 (native and RLE) and 16 are delivered without the name's bits or
    that date; 04 is quarantined, its reason naming SeriesDescription, and 10 in JPEG,
    its reason naming the bits above BitsStored (not cleaned without re-encoding)."""
    from pydicom.uid import generate_uid

    made = tmp_path / "variants"
    made.mkdir()

    def fresh(path: Path) -> object:
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        return ds

    mr = fresh(case("10") / "mr_embedded_overlay.dcm")
    for tag in [t for t in mr.keys() if t.group == 0x6000]:
        del mr[tag]
    mr.save_as(made / "mr.dcm")
    fresh(case("10") / "mr_embedded_overlay.dcm").save_as(made / "mr_native.dcm")
    subprocess.run(["dcmcrle", str(made / "mr_native.dcm"), str(made / "mr_rle.dcm")], check=True, capture_output=True)
    fresh(case("10") / "mr_embedded_overlay.dcm").save_as(made / "mr_native2.dcm")
    subprocess.run(["dcmcjpeg", str(made / "mr_native2.dcm"), str(made / "mr_jpeg.dcm")], check=True, capture_output=True)
    sc = fresh(case("04") / "dose_mono.dcm")
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    sc.ImageType, sc.SeriesDescription = ["DERIVED", "SECONDARY"], "Dose Screen Save"
    sc.save_as(made / "screen.dcm")
    ct = fresh(case("16") / "ct_age91.dcm")
    ct.add_new(0x00100033, "LO", "13481013")  # Patient's Birth Date in Alternative Calendar
    ct.save_as(made / "ct.dcm")
    node, cfg = serve()
    config = tmp_path / "node.toml"
    assert storescu_statuses(cfg["node"]["port"], [made / "mr.dcm", made / "screen.dcm", made / "ct.dcm"]) == ["Success"] * 3
    assert storescu_statuses(cfg["node"]["port"], [made / "mr_rle.dcm"], "-xr") == ["Success"]
    assert storescu_statuses(cfg["node"]["port"], [made / "mr_jpeg.dcm"], "-xs") == ["Success"]

    def settled() -> bool:
        counts = node_status(config)["counts"]
        return counts.get("instances", {}).get("QUARANTINED") == 2 and counts.get("destination:f", {}).get("SENT") == 3

    wait_until(settled, timeout=90, what="three delivered, two quarantined")
    paths = {dcmread(p).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5": p for p in (tmp_path / "out").rglob("*.dcm") if dcmread(p).Modality == "MR"}
    assert set(paths) == {True, False}  # the RLE one arrives as RLE: decoded by dcmtk to read its words
    subprocess.run(["dcmdrle", str(paths[True]), str(made / "rle_out.dcm")], check=True, capture_output=True)
    outs = {o.Modality: o for o in map(dcmread, (tmp_path / "out").rglob("*.dcm"))}
    assert set(outs) == {"MR", "CT"}
    mask = np.load(case("10") / "mask.npy").astype(bool)
    for mr in (dcmread(paths[False]), dcmread(made / "rle_out.dcm")):
        words = np.frombuffer(mr.PixelData, "<u2").reshape(mr.Rows, mr.Columns)
        assert int(((words >> 12) & 1)[mask].sum()) == 0 and not (words >> int(mr.BitsStored)).any()
    assert (0x0010, 0x0033) not in outs["CT"] and outs["CT"].get("PatientBirthDate", "") == ""
    r = subprocess.run([sys.executable, "-m", "node.cli", "quarantine", "list", "--json", "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    held = {q["modality"]: q for q in json.loads(r.stdout)}
    assert set(held) == {"CT", "MR"} and all(q["step"] == "headers" for q in held.values()), held
    assert "SeriesDescription names a screen save" in held["CT"]["reason"], held["CT"]["reason"]
    assert "bits above BitsStored set in compressed frames" in held["MR"]["reason"], held["MR"]["reason"]
