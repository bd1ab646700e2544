"""Attacks on the network edge with several receiving processes (node.receivers,
node.slots): each test failed before its fix."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from tests.conftest import ROOT, node_config
from tests.rawdicom import IMPLICIT_VR_LE, RELEASE_RQ, VERIFICATION, Raw, associate_rq, encode, p_data

# In a receiver process: which byte of data_dir/receivers.lock the C-STORE handler locks
# for each SOP Instance UID given on the command line.
_LOCKED_BYTES = """
import fcntl, os, sys, tempfile
from node.scp import StoreHandler

locked = []
fcntl.lockf = lambda fd, op, length=0, start=0, whence=0: locked.append(start) if op == fcntl.LOCK_EX else None
handler = object.__new__(StoreHandler)
handler._locks = [__import__("threading").Lock() for _ in range(256)]
handler._lock_fd = os.open(os.devnull, os.O_RDONLY)
for uid in sys.argv[1:]:
    with handler._one_at_a_time(uid):
        pass
print(locked)
"""


def test_one_sop_instance_uid_locks_the_same_byte_in_every_receiver_process():
    """Two C-STOREs of one SOP Instance UID in two receiver processes must take the same
    byte lock of receivers.lock, else they race for one spool file (a conflicting
    object's clean-up can then delete the file of an object answered Success). The byte
    was ``hash(uid) % 256``, and Python salts str hashes per process (PYTHONHASHSEED):
    two processes locked different bytes."""
    uids = ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.840.113619.2.55.3.1", "2.25.1234567890", "1.2.3.4.5.6.7.8.9"]
    seen = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _LOCKED_BYTES, *uids], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        seen.append(out.stdout.strip().splitlines()[-1])
    assert seen[0] == seen[1], f"the byte locked for one SOP Instance UID differs between processes: {seen}"


def _request_without_maximum_length() -> bytes:
    """An A-ASSOCIATE-RQ whose User Information item has no Maximum Length sub-item
    (PS3.8 D.1 requires one)."""
    import struct

    from tests.rawdicom import APPLICATION_CONTEXT, _ae, _item

    items = _item(0x10, APPLICATION_CONTEXT.encode())
    sub = _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT_VR_LE.encode())
    items += _item(0x20, struct.pack(">BBBB", 1, 0, 0, 0) + sub)
    items += _item(0x50, _item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    body = struct.pack(">HH", 1, 0) + _ae("CASEMASK") + _ae("MODALITY1") + b"\x00" * 32 + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _echo_rq(context_id: int) -> bytes:
    import struct

    from pydicom import Dataset

    cmd = Dataset()
    cmd.AffectedSOPClassUID, cmd.CommandField, cmd.MessageID, cmd.CommandDataSetType = VERIFICATION, 0x0030, 1, 0x0101
    body = encode(cmd)
    return p_data([(context_id, 0x03, struct.pack("<HHII", 0, 0, 4, len(body)) + body)])


def test_a_maximum_pdu_length_the_node_cannot_answer_within_is_rejected_up_front(tmp_path, start_node):
    """An A-ASSOCIATE-RQ with a Maximum Length of 1 to 6 bytes (no room for a PDV's
    header) or none at all was accepted; the node's first answer then failed inside
    pynetdicom (ValueError, TypeError) and the association was aborted *after* the
    C-STORE was handled, so the sender never got a status, on every retry. It is
    rejected at once (A-ASSOCIATE-RJ); 0 (no limit) and 7 are answered."""
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600))
    port = node.settings.node.port
    for request in (associate_rq(max_pdu=1), associate_rq(max_pdu=6), _request_without_maximum_length()):
        with Raw(port, timeout=10) as r:
            r.send(request)
            answer = r.read_pdu()
            assert answer is not None and answer[0] == 0x03, f"answered PDU type {answer and answer[0]}, not A-ASSOCIATE-RJ"
    for max_pdu in (0, 7):
        with Raw(port, timeout=10) as r:
            r.send(associate_rq(max_pdu=max_pdu))
            assert r.read_pdu()[0] == 0x02
            r.send(_echo_rq(3))
            fragments = []
            while (pdu := r.read_pdu()) is not None and pdu[0] == 0x04:
                fragments.append(pdu)
                if pdu[1][5] & 0x02:  # the last fragment of the command
                    break
            assert fragments and fragments[-1][1][5] & 0x02, f"max_pdu = {max_pdu}: no C-ECHO response"
            r.send(RELEASE_RQ)


def test_a_sender_that_never_waits_for_answers_is_aborted_before_it_piles_up_data_sets(tmp_path, start_node):
    """One association sends 300 C-STOREs back to back without reading an answer (no
    asynchronous operations were negotiated: it must wait for each). pynetdicom queued
    them all (measured: thousands of incoming files and +230 MiB in ten seconds). The
    node aborts it after a few; every object it answered Success is stored, nothing is
    left in spool/.incoming, and a sender that waits is served afterwards."""
    import socket
    import sqlite3

    from pydicom.uid import generate_uid

    from tests.conftest import STORESCU, dcmtk_env, make_study, wait_until
    from tests.rawdicom import CT_IMAGE_STORAGE, c_store_command, c_store_pdus, store_status
    from tests.test_attack import _ct

    # short timeouts: an aborted association's connection closes within acse_timeout_s
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, acse_timeout_s=5, network_timeout_s=10))
    port = node.settings.node.port
    data = node.settings.node.data_dir
    ds = _ct()  # small objects: they arrive far faster than the handler makes them durable
    blob = b""
    for k in range(300):
        ds.SOPInstanceUID = generate_uid()
        blob += b"".join(c_store_pdus(c_store_command(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID), k + 1), encode(ds, implicit=False)))
    successes, aborted = 0, False
    with Raw(port, timeout=30) as r:
        r.send(associate_rq(calling="STORESCU"))
        assert r.read_pdu()[0] == 0x02
        r.sock.settimeout(30)
        try:
            r.sock.sendall(blob)  # never reads until all is sent (or the node closes)
        except OSError:
            pass  # closed by the node while sending
        while (pdu := r.read_pdu()) is not None:
            if pdu[0] == 0x07:
                aborted = True
                break
            if pdu[0] == 0x04 and store_status(pdu[1]) == 0x0000:
                successes += 1
        with contextlib.suppress(OSError):
            r.sock.shutdown(socket.SHUT_RDWR)
    assert successes < 50, f"{successes} of 300 pipelined C-STOREs were answered: the sender was not stopped"
    assert aborted or successes < 300
    with sqlite3.connect(data / "casemask.db") as db:
        rows = db.execute("select count(*) from instances").fetchone()[0]
    assert rows >= successes, "an object answered Success has no row"
    wait_until(lambda: not list((data / "spool" / ".incoming").glob("*")), timeout=60, what="the aborted association's data sets to be deleted")
    files = make_study(tmp_path / "in", 3)
    ok = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_a_data_set_repeating_an_element_out_of_order_is_refused(tmp_path, start_node):
    """The data set carries its SOP Instance UID (the command's) and, after the last
    element, a second SOP Instance UID (another object's) and Patient ID. The node's
    check read the first copy and answered Success; pydicom keeps the last, so the
    object de-identified and sent on would carry the other object's UID (its output
    UID too: the archive would get two objects under one). PS3.5 7.1 wants ascending
    tags, each once: 0xC210, nothing stored."""
    import sqlite3
    import struct

    from pydicom.uid import generate_uid

    from tests.rawdicom import CT_IMAGE_STORAGE, c_store_command, c_store_pdus, store_status
    from tests.test_attack import _ct

    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600))
    ds = _ct()
    other = generate_uid().encode()
    other += b"\0" * (len(other) % 2)
    tail = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(other)) + other + struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 8) + b"SYNTH-B2"
    with Raw(node.settings.node.port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU"))
        assert r.read_pdu()[0] == 0x02
        for pdu in c_store_pdus(c_store_command(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), encode(ds, implicit=False) + tail):
            r.send(pdu)
        answer = r.read_pdu()
        r.send(RELEASE_RQ)
    assert answer is not None and answer[0] == 0x04
    assert store_status(answer[1]) == 0xC210
    with sqlite3.connect(node.settings.node.data_dir / "casemask.db") as db:
        assert db.execute("select count(*) from instances").fetchone()[0] == 0


def test_a_rejected_peer_reconnecting_in_a_loop_does_not_fill_the_audit_trail(tmp_path, start_node):
    """A peer that is not in [[sources]] sends 60 A-ASSOCIATE-RQs as fast as it can.
    Each rejection was an audit row committed on its own and a log line (measured: 116
    a second from one client; ten million rows a day). Every one is still rejected, but
    the audit trail records at most about one a second per address (per receiving
    process), the next saying how many were left out; a sender that belongs is still
    recorded."""
    import time

    from sqlalchemy import select

    from node.db import AuditEvent
    from tests.conftest import TEST_RECEIVERS, database_engine, wait_until

    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600))
    port = node.settings.node.port
    t0 = time.monotonic()
    for k in range(60):
        with Raw(port, timeout=10) as r:
            r.send(associate_rq(calling=f"INTRUDER{k}"))
            answer = r.read_pdu()
            assert answer is not None and answer[0] == 0x03, "a peer not in [[sources]] was not rejected"
    elapsed = time.monotonic() - t0
    with Raw(port, timeout=10) as r:
        r.send(associate_rq(calling="MODALITY1"))
        assert r.read_pdu()[0] == 0x02
        r.send(RELEASE_RQ)
        r.read_pdu()
    engine = database_engine(node)
    try:
        def events():
            with engine.connect() as conn:
                return conn.execute(select(AuditEvent.actor, AuditEvent.detail).where(AuditEvent.event == "association")).all()

        wait_until(lambda: any(actor == "MODALITY1" for actor, _ in events()), timeout=10, what="the accepted association's audit row")
        rejected = [detail for actor, detail in events() if actor.startswith("INTRUDER")]
    finally:
        engine.dispose()
    bound = TEST_RECEIVERS * (int(elapsed) + 2)
    assert 1 <= len(rejected) <= bound, f"{len(rejected)} audit rows for 60 rejections in {elapsed:.1f} s (at most {bound} expected)"


def test_a_big_endian_object_smaller_than_the_incoming_buffer_is_stored(tmp_path, start_node):
    """Explicit VR Big Endian (retired) is read by pydicom from the incoming file by its
    name, which was done before the file's buffer (256 KiB) reached the kernel: every
    such object under 256 KiB was refused 0xC210 ("cannot be decoded"), found by the
    third attack pass."""
    import copy

    from pydicom import dcmread, dcmwrite
    from pydicom.uid import ExplicitVRBigEndian, generate_uid
    from pynetdicom import AE

    from tests.conftest import make_study

    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), schedule=False)
    ds = copy.deepcopy(dcmread(make_study(tmp_path / "in", 1)[0]))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path = tmp_path / "be.dcm"
    dcmwrite(path, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    ds = dcmread(path)
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRBigEndian)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status and status.Status == 0x0000, f"answered {status.Status:#06x}" if status else "no answer"
