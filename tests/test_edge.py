"""The network edge against real peers: untrusted UIDs never become paths, SOP Instance
UID conflicts are refused and counted, limits, and the pynetdicom hooks it relies on."""

from __future__ import annotations

import logging
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from node.db import Conflict, Instance
from tests.conftest import ROOT, make_study, needs_dcmtk, node_config, wait_logged, wait_until
from tests.test_node import c_store, storescu

CASES = ROOT.parent / "shared" / "cases"
needs_cases = pytest.mark.skipif(not CASES.is_dir(), reason=f"the shared DICOM cases are not in {CASES}")
TRAVERSAL = CASES / "02-sop-uid-path-traversal" / "traversal.dcm"
DUPLICATE = CASES / "03-duplicate-sop-uid-other-study"


def folder_node(tmp_path, start_node, **node_kw):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, **node_kw)
    return start_node(raw, schedule=False)


def instances(node) -> int:
    with node.sessions() as s:
        return s.scalar(select(func.count()).select_from(Instance))


def files_outside(root: Path, allowed: list[Path]) -> list[Path]:
    """Files under ``root`` that are not under one of ``allowed``."""
    return [p for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(a) for a in allowed)]


def escaped_anywhere(start: Path) -> list[Path]:
    """An 'escaped' folder (what the traversal UID aims at) in any ancestor of ``start``."""
    return [a / "escaped" for a in [start, *start.parents] if (a / "escaped").exists()]


# -- 18.1: untrusted values never become paths -----------------------------------------------
HOSTILE = {
    "SOPInstanceUID": ["1.2.3/../../../../../../../../escaped/evil", "1.2.3/../../escaped", "..", "1.2.840.10008.01.2", "1." + "2" * 63, "1.2.3.", "1.2.a", "1.2..3"],
    "StudyInstanceUID": ["1.2.3/../../../../escaped", "../../escaped"],
    "SeriesInstanceUID": ["1.2/../escaped", "1.02.3"],
}


@needs_dcmtk
@needs_cases
def test_hostile_uids_are_refused_and_nothing_is_written_outside_the_data_folder(tmp_path, start_node, caplog):
    node = folder_node(tmp_path, start_node)
    port = node.settings.node.port
    # The public bug report's file, sent by dcmtk as a modality would.
    r = storescu(port, [TRAVERSAL], aet="MODALITY1", extra=("-v",))
    assert "Error: CannotUnderstand" in r.stdout + r.stderr, r.stderr  # dcmtk's name for 0xCxxx
    assert "-> 0xC212" in wait_logged(caplog, "-> 0xC212")  # a receiver's log lines come through a pipe
    # Every kind of hostile UID, in every UID attribute the handler reads, sent by dcmtk.
    base = dcmread(make_study(tmp_path / "in", 1)[0])
    hostile = []
    for keyword, values in HOSTILE.items():
        for k, value in enumerate(values):
            ds = base.copy()
            setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
            hostile.append(tmp_path / "in" / f"hostile-{keyword}-{k}.dcm")
            ds.save_as(hostile[-1])
    r = storescu(port, hostile, aet="MODALITY1", extra=("-v", "--no-halt"))
    assert (r.stdout + r.stderr).count("Error: CannotUnderstand") == len(hostile), r.stdout + r.stderr
    # Each refused (above); logged at most once a second per AE title and kind of
    # refusal (node.admission.RefusedStoreLines: a refusal loop is no log flood).
    # And by pynetdicom (which refuses to send a UID of more than 64 characters itself).
    for keyword, values in HOSTILE.items():
        for value in values:
            if len(value) > 64:
                continue
            ds = base.copy()
            setattr(ds, keyword, value)
            assert c_store(port, ds) == 0xC212, (keyword, value)
    assert instances(node) == 0
    data_dir = node.settings.node.data_dir
    assert files_outside(tmp_path, [data_dir, tmp_path / "in"]) == []
    assert not list((data_dir / "spool").rglob("*.dcm")), "nothing is stored"
    assert not [p for p in (data_dir / "spool" / ".incoming").iterdir()], "no incoming file is left"
    assert escaped_anywhere(data_dir / "spool" / "aa" / "bb") == []
    # Refusals name the check, never the value.
    assert "escaped" not in caplog.text and "1.2.3/" not in caplog.text


def test_valid_uids_are_not_path_components_either(tmp_path, start_node):
    node = folder_node(tmp_path, start_node)
    files = make_study(tmp_path / "in", 2)
    assert storescu(node.settings.node.port, files).returncode == 0
    uids = set()
    for f in files:
        ds = dcmread(f)
        uids |= {str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)}
    spooled = [p for p in (node.settings.node.data_dir / "spool").rglob("*") if p.is_file()]
    assert len(spooled) == 2
    for p in spooled:
        rel = str(p.relative_to(node.settings.node.data_dir))
        assert not any(u in rel for u in uids), rel


def test_spool_files_and_folders_are_owner_only(tmp_path, start_node):
    node = folder_node(tmp_path, start_node)
    assert storescu(node.settings.node.port, make_study(tmp_path / "in", 2)).returncode == 0
    spool = node.settings.node.data_dir / "spool"
    for p in [spool, *spool.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p.relative_to(spool)} has mode {mode:o}"


def _deid(tmp_path: Path, files: list[Path], out: Path, *options: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "node.cli", "deid", *map(str, files), "--out", str(out), "--secret", str(tmp_path / "work" / "secret.key"), "--jobs", "1"]
    for o in options:
        args += ["--option", o]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


@needs_cases
def test_deid_output_names_stay_inside_out(tmp_path):
    out = tmp_path / "work" / "out"
    r = _deid(tmp_path, [TRAVERSAL], out)
    assert r.returncode == 0, r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.parent == out or p.name == "secret.key" for p in written), written
    assert escaped_anywhere(out) == []
    (target,) = out.iterdir()
    assert len(target.stem) == 32 and all(c in "0123456789abcdef" for c in target.stem)


@needs_cases
def test_deid_retain_uids_refuses_hostile_uids_with_a_clear_message(tmp_path):
    """With --option retain-uids a hostile UID would be written as it came: every such
    file is refused (quarantined, exit 1) with the attribute named, nothing is written
    outside or inside --out, no traceback, and the value is not printed."""
    source = make_study(tmp_path / "in", 1)[0]
    hostile = [TRAVERSAL]
    for keyword, values in HOSTILE.items():
        for k, value in enumerate(values):
            ds = dcmread(source)  # one hostile UID per file (Dataset.copy shares elements)
            setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
            hostile.append(tmp_path / "in" / f"hostile-{keyword}-{k}.dcm")
            ds.save_as(hostile[-1])
    out = tmp_path / "work" / "out"
    r = _deid(tmp_path, hostile, out, "retain-uids")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("invalid UID in the output") == len(hostile), r.stderr
    assert f"quarantined {len(hostile)}," in r.stderr
    assert "escaped" not in r.stderr and "1.2.a" not in r.stderr, "values are not printed"
    assert [p for p in out.rglob("*") if p.is_file()] == []
    assert files_outside(tmp_path, [tmp_path / "in", tmp_path / "work"]) == [] and escaped_anywhere(out) == []
    # A valid file in the same run is written; the run still says something was refused.
    r = _deid(tmp_path, [source, TRAVERSAL], out, "retain-uids")
    assert r.returncode == 1 and "de-identified 1," in r.stderr and "quarantined 1," in r.stderr, r.stderr
    (written,) = out.iterdir()
    assert dcmread(written).SOPInstanceUID == dcmread(source).SOPInstanceUID


def test_folder_destination_names_files_by_digest(tmp_path, start_node):
    out = tmp_path / "out"
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}], stable_after_s=0.2)
    raw["routes"][0]["deid"]["options"] = ["retain-uids"]  # the original UIDs go out
    node = start_node(raw)
    files = make_study(tmp_path / "in", 2)
    assert storescu(node.settings.node.port, files).returncode == 0
    wait_until(lambda: len(list(out.rglob("*.dcm"))) == 2, what="2 files in the folder destination")
    study = str(dcmread(files[0]).StudyInstanceUID)
    from node.spool import digest

    for p in out.rglob("*.dcm"):
        rel = p.relative_to(out)
        assert rel.parts[0] == digest(study) and len(rel.parts) == 3
        assert study not in str(rel)
        assert stat.S_IMODE(p.stat().st_mode) == 0o640


# -- 19.2: SOP Instance UID conflicts ------------------------------------------------------------
@needs_dcmtk
@needs_cases
def test_another_object_under_a_stored_sop_uid_is_refused_logged_and_counted(tmp_path, start_node, caplog):
    caplog.set_level(logging.DEBUG, logger="node")
    node = folder_node(tmp_path, start_node)
    first, second = DUPLICATE / "first.dcm", DUPLICATE / "second.dcm"
    r = storescu(node.settings.node.port, [first, second], aet="MODALITY1", extra=("-v",))
    assert "Error: CannotUnderstand" in r.stdout + r.stderr, r.stdout + r.stderr
    wait_logged(caplog, "-> 0xC214")  # a receiver's log lines come through a pipe
    wait_logged(caplog, "conflict")
    with node.sessions() as s:
        (inst,) = s.scalars(select(Instance)).all()
        assert inst.study.study_uid == str(dcmread(first).StudyInstanceUID)
        assert s.scalar(select(func.count()).select_from(Conflict)) == 1
    spooled = list((node.settings.node.data_dir / "spool").rglob("*.dcm"))
    assert len(spooled) == 1 and dcmread(spooled[0]).PatientID == dcmread(first).PatientID, "the second object left no file"
    sop = str(dcmread(first).SOPInstanceUID)
    assert "conflict" in caplog.text and sop not in caplog.text
    # Sending the second again is refused again (the sender keeps it); the first is idempotent.
    assert storescu(node.settings.node.port, [second], aet="MODALITY1").returncode != 0
    assert storescu(node.settings.node.port, [first], aet="MODALITY1").returncode == 0
    from node import queue

    with node.sessions() as s:
        assert queue.counts(s)["conflicts"] == {"refused": 2}
        assert s.scalar(select(func.count()).select_from(Instance)) == 1


def test_resend_in_another_transfer_syntax_is_the_same_object(tmp_path, start_node):
    node = folder_node(tmp_path, start_node)
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    port = node.settings.node.port
    assert c_store(port, ds) == 0
    spooled = next((node.settings.node.data_dir / "spool").rglob("*.dcm"))
    before = spooled.read_bytes()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.set_original_encoding(True, True)
    assert c_store(port, ds) == 0
    assert instances(node) == 1
    assert spooled.read_bytes() == before, "the first copy is kept"
    other = ds.copy()
    other.PatientID = "SOMEONE-ELSE"
    assert c_store(port, other) == 0xC214


def test_resend_after_retention_deleted_the_file_brings_it_back(tmp_path, start_node):
    """Retention deletes a delivered original's file; the same object sent again takes
    its place (queue.on_resend marks it for the next retention run)."""
    node = folder_node(tmp_path, start_node)
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    port = node.settings.node.port
    assert c_store(port, ds) == 0
    (spooled,) = list((node.settings.node.data_dir / "spool").rglob("*.dcm"))
    spooled.unlink()
    assert c_store(port, ds) == 0
    assert spooled.exists() and dcmread(spooled).SOPInstanceUID == ds.SOPInstanceUID
    assert instances(node) == 1


def test_scp_logs_never_carry_original_uids(tmp_path, start_node, caplog):
    caplog.set_level(logging.DEBUG, logger="node.scp")
    node = folder_node(tmp_path, start_node)
    files = make_study(tmp_path / "in", 3)
    port = node.settings.node.port
    assert storescu(port, files).returncode == 0
    assert storescu(port, files).returncode == 0  # "already stored" lines
    ds = dcmread(files[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"  # a mismatch with the command's
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    assert c_store(port, ds) == 0
    wait_logged(caplog, "already stored", 3)  # a receiver's log lines come through a pipe
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("node."))
    assert "already stored" in text and "h:" in text
    for f in files:
        d = dcmread(f)
        for uid in (d.SOPInstanceUID, d.StudyInstanceUID, d.SeriesInstanceUID):
            assert str(uid) not in text


# -- 18.3: limits ------------------------------------------------------------------------------------
def _associate(port: int, aet: str = "MODALITY1", bind: str = "127.0.0.1"):
    ae = AE(ae_title=aet)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.network_timeout = ae.acse_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="CASEMASK", bind_address=(bind, 0))


def test_association_limits_reject_transient_local_limit_exceeded(tmp_path, start_node):
    node = folder_node(tmp_path, start_node, max_associations=5, max_associations_per_host=3)
    port = node.settings.node.port
    held = [_associate(port) for _ in range(3)]
    try:
        assert all(a.is_established for a in held)
        over = _associate(port)
        assert over.is_rejected
        rj = over.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, presentation, local-limit-exceeded
        others = [_associate(port, bind="127.0.0.2"), _associate(port, bind="127.0.0.3")]
        held += others
        assert all(a.is_established for a in others), "another host still gets in"
        assert _associate(port, bind="127.0.0.4").is_rejected, "the total limit"
    finally:
        for a in held:
            if a.is_established:
                a.release()
    wait_until(lambda: (a := _associate(port)).is_established and (a.release() or True), what="associations accepted again once others closed")


def test_idle_association_is_closed_after_network_timeout(tmp_path, start_node):
    node = folder_node(tmp_path, start_node, network_timeout_s=1.0)
    assoc = _associate(node.settings.node.port)
    assert assoc.is_established
    wait_until(lambda: not assoc.is_established, timeout=10, what="the node to close an idle association")
    assert assoc.is_aborted


def test_a_peer_trickling_a_pdu_is_closed_after_network_timeout(tmp_path, start_node):
    """One byte every 0.3 s keeps every single read inside network_timeout_s (1 s); the
    node still closes the connection once one PDU has taken longer than that. Without
    the bound this PDU (1000 bytes) would hold the association for five minutes."""
    from tests import rawdicom as rd

    node = folder_node(tmp_path, start_node, network_timeout_s=1.0, max_associations_per_host=1)
    port = node.settings.node.port
    with rd.Raw(port, timeout=30.0) as c:  # the A-ASSOCIATE-AC from a loaded machine
        assert c.send(rd.associate_rq())
        kind, _ = c.read_pdu()
        assert kind == 0x02, "A-ASSOCIATE-AC"
        assert c.send(struct.pack(">BBI", 0x04, 0, 1000))  # a P-DATA-TF of 1000 bytes...
        c.sock.settimeout(0.3)
        closed_after = None
        for k in range(200):  # ...sent a byte at a time (bounded: 60 s)
            try:
                c.sock.sendall(b"\x00")
                if c.sock.recv(1) == b"":
                    closed_after = k
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = k
                break
        assert closed_after is not None, "the node kept a trickling peer for 60 s"
    # The slot is free again: the one association this host may hold is accepted.
    wait_until(lambda: (a := _associate(port)).is_established and (a.release() or True), what="an association accepted after the trickling one")


def test_a_c_store_that_never_ends_is_aborted_after_dimse_timeout(tmp_path, start_node):
    """Each P-DATA comes whole and inside network_timeout_s (2 s), so neither the idle
    timer nor the PDU deadline ends this; the C-STORE's data set arrives at 32 bytes per
    0.3 s (about 100 bytes/s), and the node aborts it once dimse_timeout_s (1 s) has
    passed at that rate. Nothing is stored, nothing is left in spool/.incoming. Without
    the bound the 40 KB data set would hold the association for seven minutes."""
    from tests import rawdicom as rd

    node = folder_node(tmp_path, start_node, network_timeout_s=2.0, dimse_timeout_s=1.0)
    port = node.settings.node.port
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    pdus = rd.c_store_pdus(rd.c_store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID)), rd.encode(ds, implicit=False), fragment=32)
    with rd.Raw(port, timeout=30.0) as c:  # the A-ASSOCIATE-AC from a loaded machine
        assert c.send(rd.associate_rq())
        kind, _ = c.read_pdu()
        assert kind == 0x02, "A-ASSOCIATE-AC"
        c.sock.settimeout(0.3)
        ended = None
        for k, pdu in enumerate(pdus[:200]):  # bounded: 60 s
            try:
                c.sock.sendall(pdu)
                reply = c.sock.recv(6)
                if reply == b"" or reply[:1] == b"\x07":  # closed, or A-ABORT
                    ended = k
                    break
            except TimeoutError:
                continue
            except OSError:
                ended = k
                break
        assert ended is not None and ended < len(pdus) - 1, "the node kept a C-STORE that never ends"
    assert instances(node) == 0
    incoming = node.settings.node.data_dir / "spool" / ".incoming"
    wait_until(lambda: not any(incoming.iterdir()), timeout=10, what="the partial data set deleted")
    # A normal sender right after, from the same host.
    assert c_store(port, ds) == 0


def test_presentation_contexts_are_checked_before_negotiation(tmp_path, start_node):
    """PS3.8 9.3.2.2: every presentation context has an odd ID of its own (1-255), an
    abstract syntax and at least one transfer syntax; a request that breaks this is
    refused (A-ASSOCIATE-RJ rejected-permanent), the node goes on serving. A context
    whose transfer syntaxes the node does not know is refused within an accepted
    association (PS3.8 Table 9-18, result 4)."""
    from tests import rawdicom as rd

    node = folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ct = rd.CT_IMAGE_STORAGE
    bad = {
        "one ID twice": [(1, ct, [rd.EXPLICIT_VR_LE]), (1, rd.VERIFICATION, [rd.IMPLICIT_VR_LE])],
        "no transfer syntax": [(1, ct, [])],
        "no abstract syntax": [(1, "", [rd.EXPLICIT_VR_LE])],
    }
    for what, contexts in bad.items():
        with rd.Raw(port, timeout=30.0) as c:
            assert c.send(rd.associate_rq(contexts=contexts))
            reply = c.read_pdu()
            assert reply is not None and reply[0] == 0x03, what
            assert reply[1][1] == 0x01, f"{what}: rejected-permanent"
    with rd.Raw(port, timeout=30.0) as c:
        assert c.send(rd.associate_rq(contexts=[(1, ct, ["1.2.3.4.5.6", "1.2.3/../x"]), (3, ct, [rd.EXPLICIT_VR_LE])]))
        kind, body = c.read_pdu()
        assert kind == 0x02
        results = {}
        pos = 68  # after the fixed fields of the A-ASSOCIATE-AC (PS3.8 9.3.3)
        while pos + 4 <= len(body):
            item, length = body[pos], struct.unpack(">H", body[pos + 2 : pos + 4])[0]
            if item == 0x21:
                results[body[pos + 4]] = body[pos + 6]
            pos += 4 + length
        assert results == {1: 0x04, 3: 0x00}, results  # transfer syntaxes not supported; accepted
        c.send(rd.RELEASE_RQ)
    a = _associate(port)
    assert a.is_established, "the node goes on serving"
    a.release()


def _big_object(folder: Path, mb: int) -> Path:
    import numpy as np

    p = make_study(folder, 1)[0]
    ds = dcmread(p)
    side = int((mb * 1024 * 1024 / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.zeros((side, side), dtype=np.uint16).tobytes()
    ds.save_as(p, enforce_file_format=True)
    return p


@needs_dcmtk
def test_object_above_max_object_mb_is_refused_without_holding_it_in_memory(tmp_path, start_node):
    node = folder_node(tmp_path, start_node, max_object_mb=4)
    big = _big_object(tmp_path / "in", 24)
    tracemalloc.start()
    try:
        r = storescu(node.settings.node.port, [big], extra=("-v",))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "Refused: OutOfResources" in r.stdout + r.stderr, r.stdout + r.stderr
    assert peak < 8 * 1024 * 1024, f"the node held {peak / 2**20:.1f} MiB while receiving a 24 MiB object"
    assert instances(node) == 0
    assert not [p for p in (node.settings.node.data_dir / "spool").rglob("*") if p.is_file()]
    small = make_study(tmp_path / "small", 1)
    assert storescu(node.settings.node.port, small).returncode == 0


@needs_dcmtk
@pytest.mark.single_process  # frees the disk by setting the node process's floor
def test_below_min_free_disk_answers_out_of_resources_then_recovers_by_itself(tmp_path, start_node, caplog):
    from node.incoming import free_bytes

    data_dir = tmp_path / "var"
    data_dir.mkdir()
    floor_mb = free_bytes(data_dir) // 2**20 + 10_000  # more than this disk has free
    node = folder_node(tmp_path, start_node, min_free_disk_mb=floor_mb)
    files = make_study(tmp_path / "in", 3)
    r = storescu(node.settings.node.port, files, extra=("-v", "--no-halt"))
    assert (r.stdout + r.stderr).count("Refused: OutOfResources") == 3, r.stdout + r.stderr
    assert instances(node) == 0
    assert sum("min_free_disk_mb" in rec.getMessage() for rec in caplog.records) == 1, "logged once, not per object"
    node.server.incoming.min_free_bytes = 0  # space is back (as if files were deleted)
    assert storescu(node.settings.node.port, files).returncode == 0
    assert instances(node) == 3
    assert any("accepted" in rec.getMessage() and "again" in rec.getMessage() for rec in caplog.records)


# -- the pynetdicom hooks ------------------------------------------------------------------------------
def test_pynetdicom_still_has_what_the_edge_hooks_into():
    """node.incoming and node.admission reach below pynetdicom's public API (see
    docs/security.md); if a new pynetdicom moves one of these, this fails: adapt them."""
    import inspect

    from pynetdicom import dimse_messages, dul, fsm, transport
    from pynetdicom.dimse import DIMSEServiceProvider

    decode = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    for name in ("NamedTemporaryFile(", "create_file_meta(", "write_file_meta_info(", "STORE_RECV_CHUNKED_DATASET"):
        assert name in decode, name
    read = inspect.getsource(dul.DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read and "self.socket.recv(pdu_length)" in read
    assert "dimse.receive_primitive(" in inspect.getsource(fsm)
    assert hasattr(DIMSEServiceProvider, "receive_primitive") and hasattr(fsm.StateMachine, "do_action")
    assert "to_user_queue.get(" in inspect.getsource(dul.DULServiceProvider.receive_pdu)
    assert hasattr(transport.AssociationSocket, "recv")


def test_association_cut_off_mid_object_leaves_no_file_and_no_row(tmp_path, start_node):
    """A sender that disappears in the middle of a data set: nothing acknowledged, so
    no row and no file remain; a proper C-STORE on the same raw client then works."""
    from tests import rawdicom as rd

    node = folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    data = rd.encode(ds, implicit=False)
    command = rd.c_store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    incoming = node.settings.node.data_dir / "spool" / ".incoming"
    with rd.Raw(port, timeout=30.0) as c:
        assert c.send(rd.associate_rq())
        assert c.read_pdu()[0] == 0x02  # A-ASSOCIATE-AC
        for pdu in rd.c_store_pdus(command, data, fragment=4000)[:4]:  # command + 3 of 10 fragments
            assert c.send(pdu)
        wait_until(lambda: any(incoming.iterdir()), timeout=10, what="the partial data set on disk")
    wait_until(lambda: not any(incoming.iterdir()), timeout=15, what="the partial data set to be deleted")
    assert instances(node) == 0
    with rd.Raw(port, timeout=30.0) as c:
        assert c.send(rd.associate_rq())
        assert c.read_pdu()[0] == 0x02
        for pdu in rd.c_store_pdus(command, data):
            assert c.send(pdu)
        kind, body = c.read_pdu()
        assert kind == 0x04 and rd.store_status(body) == 0x0000
        c.send(rd.RELEASE_RQ)
    assert instances(node) == 1


# -- 18.5: private and unknown SOP classes ---------------------------------------------------------
PRIVATE_CLASS = "1.2.826.0.1.3680043.8.498.4242.1.1"


def _private_objects(folder: Path, n: int = 2) -> list[Path]:
    files = make_study(folder, n)
    for f in files:
        ds = dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
        ds.save_as(f, enforce_file_format=True)
    return files


def test_private_sop_class_is_accepted_and_held_unless_a_route_names_it(tmp_path, start_node):
    out = tmp_path / "out"
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}], stable_after_s=0.2)
    node = start_node(raw)  # its one route has an empty match: it takes every *known* object
    # dcmtk's storescu proposes no SOP class it does not know: a vendor's own sender
    # (pynetdicom here) proposes its private class.
    for f in _private_objects(tmp_path / "in"):
        assert c_store(node.settings.node.port, dcmread(f)) == 0
    r = storescu(node.settings.node.port, make_study(tmp_path / "ct", 1))
    assert r.returncode == 0, r.stdout + r.stderr

    def states():
        with node.sessions() as s:
            return {(i.sop_class_uid, i.state.value, i.reason) for i in s.scalars(select(Instance))}

    from node.routing import UNKNOWN_SOP_CLASS

    wait_until(lambda: (PRIVATE_CLASS, "QUARANTINED", UNKNOWN_SOP_CLASS) in states() and len(list(out.rglob("*.dcm"))) == 1, what="private objects held, the CT delivered")
    assert {st for st in states() if st[0] == PRIVATE_CLASS} == {(PRIVATE_CLASS, "QUARANTINED", UNKNOWN_SOP_CLASS)}
    assert len(list(out.rglob("*.dcm"))) == 1, "only the known object was forwarded"


def test_a_route_that_names_the_sop_class_takes_it(tmp_path, start_node):
    out = tmp_path / "out"
    routes = [{"name": "vendor", "match": {"SOPClassUID": PRIVATE_CLASS}, "deid": {"profile": "basic"}, "destinations": ["f"]}]
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}], routes=routes, stable_after_s=0.2))
    ds = dcmread(_private_objects(tmp_path / "in", 1)[0])
    assert c_store(node.settings.node.port, ds) == 0
    wait_until(lambda: len(list(out.rglob("*.dcm"))) == 1, what="the private object, de-identified, in the folder")


# -- settings ------------------------------------------------------------------------------------------
def test_edge_settings_say_what_to_write(tmp_path):
    from node.config import ConfigError, parse

    raw = node_config(tmp_path, [
        {"name": "web", "kind": "dicomweb", "url": "http://archive/dicom-web", "auth": {"kind": "basic", "secret_env": "X"}},
        {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "tls": {"certificate": str(tmp_path / "missing.crt")}},
    ])
    raw["node"]["port"] = 0
    raw["node"]["tls"] = {"port": 2762, "certificate": "nope.crt", "private_key": "nope.key", "require_client_certificate": True}
    with pytest.raises(ConfigError) as exc:
        parse(raw, "test", base_dir=tmp_path)
    text = str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse(node_config(tmp_path, [], max_associations=0, min_free_disk_mb=-1), "test", base_dir=tmp_path)
    text += str(exc.value)
    for expected in (
        "[node] max_associations = 0: an integer, 1 or more",
        "[node] min_free_disk_mb = -1: megabytes",
        "[node.tls] certificate = 'nope.crt': no such file",
        "require_client_certificate = true needs ca_certificates",
        "auth needs an https:// url",
        "auth kind = \"basic\" needs username",
        "tls.certificate and tls.private_key go together",
    ):
        assert expected in text, (expected, text)


def test_deflated_objects_are_stored_and_a_deflate_bomb_is_refused(tmp_path, start_node, caplog):
    """A deflated data set is inflated in steps, never beyond max_object_mb: 1 MiB of
    zeros deflates to about a kilobyte."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    node = folder_node(tmp_path, start_node, max_object_mb=1)
    port = node.settings.node.port
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.set_original_encoding(False, True)
    assert c_store(port, ds) == 0
    assert instances(node) == 1
    bomb = ds.copy()
    bomb.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.31337"
    bomb.add_new(0x00091010, "OB", b"\x00" * (3 * 1024 * 1024))
    assert c_store(port, bomb) == 0xA700
    wait_logged(caplog, "inflates beyond max_object_mb")  # a receiver's log lines come through a pipe
    assert instances(node) == 1
