"""A hostile DICOM sender against the ingest code of 2026-11-30 (docs/security.md, "Fifth
attack"): the listening socket the node's processes share and their accept board
(node.sharedport), the hand-encoded C-STORE-RSP (node.dimsefast), and a C-STORE-RQ that
says "no data set" and sends one anyway."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from tests.conftest import STORESCU, NodeProcess, child_pids, dcmtk_env, is_alive, make_study, needs_dcmtk, node_config, wait_until, write_toml
from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, RELEASE_RQ, Raw, associate_rq, c_store_pdus, encode, p_data
from tests.test_attack import _ct
from tests.test_attack_edge2 import _command, _folder_node, _rows


# -- helpers --------------------------------------------------------------------------------------
def _serve(tmp_path: Path, name: str, **node_kw) -> tuple[NodeProcess, dict]:
    raw = node_config(tmp_path / name, [{"name": "f", "kind": "folder", "path": str(tmp_path / f"out-{name}")}], stable_after_s=3600, **node_kw)
    Path(raw["node"]["data_dir"]).mkdir(parents=True, exist_ok=True)
    return NodeProcess(write_toml(raw, tmp_path / f"{name}.toml"), tmp_path / f"{name}.log"), raw


def _flood(port: int, n: int, source: str, payload: bytes = b"") -> list[socket.socket]:
    """``n`` connections from ``source`` (non-blocking connects: they queue in the listen
    backlog as fast as the kernel takes them), each sending ``payload`` once connected."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        out.append(s)
    if payload:
        for s in out:
            try:
                s.setblocking(True)
                s.settimeout(2)
                s.sendall(payload)
            except OSError:
                pass  # closed at once by the node's TCP gate, or not yet connected
    return out


def _storescu(port: int, path: Path, acse_s: int) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-ta", str(acse_s), "-to", str(acse_s), "-aec", "CASEMASK", "127.0.0.1", str(port), str(path)],
                          env=dcmtk_env(), capture_output=True, text=True, timeout=acse_s * 3)


def _half_rq() -> bytes:
    rq = associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])])
    return rq[: len(rq) // 2]


# -- 1. the shared socket and its accept board ---------------------------------------------------
@needs_dcmtk
def test_a_flood_of_silent_and_half_requests_leaves_storescu_its_turn(tmp_path):
    """receivers = 2: 250 connections from 127.0.0.2 that send nothing and 50 that send
    half an A-ASSOCIATE-RQ, all held open. A storescu from 127.0.0.1 is still stored
    within its ACSE timeout, and the flood did not all land on one process (each of the
    two holds some of what the TCP gate kept)."""
    node, raw = _serve(tmp_path, "flood", receivers=2, acse_timeout_s=30.0)
    port = raw["node"]["port"]
    files = make_study(tmp_path / "in", 1)
    node.start(port)
    flood: list[socket.socket] = []
    try:
        pids = [node.proc.pid, *child_pids(node.proc.pid)]  # type: ignore[union-attr]
        assert len(pids) == 2
        flood += _flood(port, 250, "127.0.0.2")
        flood += _flood(port, 50, "127.0.0.2", _half_rq())
        r = _storescu(port, files[0], 20)
        assert r.returncode == 0, r.stderr
        assert _rows_file(raw) == 1
        held = {pid: _sockets_to(port, pid) for pid in pids}
        assert all(held.values()), f"the flood's kept connections by process: {held}"
    finally:
        for s in flood:
            s.close()
        node.stop()


def _rows_file(raw: dict) -> int:
    import sqlite3

    with sqlite3.connect(Path(raw["node"]["data_dir"]) / "casemask.db") as db:
        return db.execute("select count(*) from instances").fetchone()[0]


def _sockets_to(port: int, pid: int) -> int:
    """Accepted sockets on ``port`` that process ``pid`` holds (Linux /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] != "0A":
            inodes.add(f"socket:[{f[9]}]")
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd) in inodes
        except OSError:
            continue
    return n


@needs_dcmtk
def test_a_frozen_receiver_does_not_slow_the_others_accepting(tmp_path):
    """receivers = 2, the receiver process stopped (SIGSTOP: a process that no longer
    runs, as a frozen one before a reload kills it). Its board record says 0 open
    connections, so the node process, holding some, left every pending connection to it
    for the board's full wait (0.1 s) before taking it: 300 connects from another
    address made a storescu wait some 30 s for its A-ASSOCIATE-AC. A process that let a
    connection wait out the whole wait is not waited for again until its count moves."""
    node, raw = _serve(tmp_path, "frozen", receivers=2, acse_timeout_s=30.0)
    port = raw["node"]["port"]
    files = make_study(tmp_path / "in", 1)
    node.start(port)
    flood: list[socket.socket] = []
    (receiver,) = child_pids(node.proc.pid)  # type: ignore[union-attr]
    try:
        os.kill(receiver, signal.SIGSTOP)
        flood += _flood(port, 300, "127.0.0.2")
        r = _storescu(port, files[0], 10)
        assert r.returncode == 0, r.stderr
        assert _rows_file(raw) == 1
    finally:
        os.kill(receiver, signal.SIGCONT)
        for s in flood:
            s.close()
        node.stop()


def _fast_path_on() -> bool:
    """node.dimsefast answers plain C-STORE-RSPs in this process (not pynetdicom)."""
    from node import dimsefast

    return dimsefast._installed


# -- 2. the hand-encoded C-STORE-RSP --------------------------------------------------------------
def _responses(port: int, stores: list[tuple[str, str, int, bytes]]) -> list[bytes]:
    """One association: for each (class UID in the command, instance UID in the command,
    message ID, data set) a C-STORE-RQ; the command set of each response (None if none)."""
    out = []
    with Raw(port, timeout=15) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]))
        got = r.read_pdu()
        assert got is not None and got[0] == 0x02
        for cls, inst, mid, data in stores:
            cmd = _raw_command(cls, inst, mid)
            for pdu in c_store_pdus(cmd, data):
                r.send(pdu)
            got = r.read_pdu()
            assert got is not None and got[0] == 0x04, (mid, got)
            out.append(_command_set(got[1]))
        r.send(RELEASE_RQ)
        r.read_pdu()
    return out


def _raw_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _raw_command(cls: bytes | str, inst: bytes | str, mid: int) -> bytes:
    """A C-STORE-RQ command set with the UIDs' bytes exactly as given (odd lengths,
    padding, non-ASCII bytes kept)."""
    b = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
    body = (_raw_element(0x0002, b(cls)) + _raw_element(0x0100, struct.pack("<H", 1)) + _raw_element(0x0110, struct.pack("<H", mid))
            + _raw_element(0x0700, struct.pack("<H", 0)) + _raw_element(0x0800, struct.pack("<H", 0)) + _raw_element(0x1000, b(inst)))
    return _raw_element(0x0000, struct.pack("<I", len(body))) + body


def _command_set(pdata_body: bytes) -> bytes:
    """The command fragment(s) of a P-DATA-TF body, joined."""
    pos, out = 0, b""
    while pos + 6 <= len(pdata_body):
        length = struct.unpack(">I", pdata_body[pos : pos + 4])[0]
        assert pdata_body[pos + 5] & 0x01, "a response PDV that is not a command"
        out += pdata_body[pos + 6 : pos + 4 + length]
        pos += 4 + length
    return out


def _check_command_set(raw: bytes):
    """Decode a command set as pydicom (and so pynetdicom) reads it; its group length
    must be exactly the bytes after that element. Returns the dataset."""
    tag_group, tag_elem, vlen = struct.unpack("<HHI", raw[:8])
    assert (tag_group, tag_elem, vlen) == (0, 0, 4)
    assert struct.unpack("<I", raw[8:12])[0] == len(raw) - 12, "CommandGroupLength is not the length of what follows"
    ds = read_dataset(DicomBytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    for elem in ds:
        assert elem.tag.group == 0
    return ds


def test_store_responses_are_valid_command_sets_for_odd_uids_and_message_ids(tmp_path, start_node):
    """Raw C-STOREs whose Affected SOP Instance UID is 64 characters, odd-length with a
    NUL pad, with a trailing space, with a non-ASCII byte, and a Class UID
    with a trailing NUL; Message
    IDs 0 and 65535. Every response is a command set whose group length is right, which
    pydicom decodes, with the request's Message ID; Success exactly for the objects that
    were stored (their rows exist), never for the others. (An empty Affected SOP
    Instance UID is a request pynetdicom ignores: no response at all, never Success.)"""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    assert _fast_path_on()
    cases = []  # (class bytes, instance bytes in the command, message id, data set, stored?)

    def obj(uid: str):
        ds = _ct()
        ds.SOPInstanceUID = uid
        return ds

    u64 = "1.2." + "9" * 60  # 64 characters
    u63 = "1.2." + "8" * 59
    u_sp = "1.2.3.4.5.6.7.8.9.1"  # 19, odd: sent with a trailing space pad
    u65 = "1.2." + "7" * 61
    cases.append((CT_IMAGE_STORAGE, u64, 0, obj(u64), True))
    cases.append((CT_IMAGE_STORAGE, u63.encode() + b"\x00", 65535, obj(u63), True))
    cases.append((CT_IMAGE_STORAGE, u_sp.encode() + b" ", 7, obj(u_sp), True))
    cases.append((CT_IMAGE_STORAGE, b"1.2.3.\xe9", 8, obj("1.2.3.4"), False))
    cases.append((CT_IMAGE_STORAGE + "\x00", "1.2.3.6.7", 11, obj("1.2.3.6.7"), True))
    responses = _responses(port, [(c, i, m, encode(ds, implicit=False)) for c, i, m, ds, _ in cases])
    stored = 0
    for (cls, inst, mid, ds, should), rsp in zip(cases, responses):
        got = _check_command_set(rsp)
        assert got.CommandField == 0x8001 and got.MessageIDBeingRespondedTo == mid and got.CommandDataSetType == 0x0101
        if should:
            assert got.Status == 0x0000, (mid, hex(got.Status))
            assert got.AffectedSOPInstanceUID == str(ds.SOPInstanceUID)
            stored += 1
        else:
            assert got.Status != 0x0000, mid
    assert _rows(node) == stored


# -- 3. "no data set", and a data set anyway ------------------------------------------------------
def test_no_data_set_type_then_a_data_set_stores_nothing_and_leaves_no_file(tmp_path, start_node, monkeypatch):
    """A C-STORE-RQ with Command Data Set Type 0x0101 followed by a whole data set (and,
    on a second association, the data set's PDVs flagged as a command). Never Success,
    no row, no file in the spool or its .incoming folder, and nothing left in the
    system's temporary folder (pointed at an empty one for the test). The association
    then still stores a proper object, or was closed."""
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    assert _fast_path_on()
    data_dir = node.settings.node.data_dir
    for variant in ("data", "data-as-command"):
        ds = _ct()
        cmd = _command({"AffectedSOPClassUID": CT_IMAGE_STORAGE, "CommandField": 0x0001, "MessageID": 1, "Priority": 0,
                        "CommandDataSetType": 0x0101, "AffectedSOPInstanceUID": str(ds.SOPInstanceUID)})
        data = encode(ds, implicit=False)
        statuses = []
        with Raw(port, timeout=10) as r:
            r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]))
            assert r.read_pdu()[0] == 0x02
            r.send(p_data([(1, 0x03, cmd)]))
            r.send(p_data([(1, 0x02 if variant == "data" else 0x03, data)]))
            good = _ct()
            for pdu in c_store_pdus(_command({"AffectedSOPClassUID": CT_IMAGE_STORAGE, "CommandField": 0x0001, "MessageID": 2, "Priority": 0,
                                               "CommandDataSetType": 0x0000, "AffectedSOPInstanceUID": str(good.SOPInstanceUID)}), encode(good, implicit=False)):
                r.send(pdu)
            while (got := r.read_pdu()) is not None and got[0] == 0x04:
                ds_rsp = _check_command_set(_command_set(got[1]))
                statuses.append((ds_rsp.MessageIDBeingRespondedTo, ds_rsp.Status))
                if ds_rsp.MessageIDBeingRespondedTo == 2:
                    break
            r.send(RELEASE_RQ)
            r.read_pdu()
        assert all(s != 0x0000 for m, s in statuses if m == 1), (variant, statuses)  # answered a failure, or aborted
        stored_good = [s for m, s in statuses if m == 2] == [0x0000]
        wait_until(lambda: not any((data_dir / "spool" / ".incoming").glob("*")), timeout=10, what="no partial file left")
        spooled = [p for p in (data_dir / "spool").rglob("*") if p.is_file() and ".incoming" not in p.parts]
        assert len(spooled) == _rows(node), (variant, spooled)
        with __import__("sqlite3").connect(data_dir / "casemask.db") as db:
            uids = {u for (u,) in db.execute("select sop_instance_uid from instances")}
        assert str(ds.SOPInstanceUID) not in uids, variant
        assert (str(good.SOPInstanceUID) in uids) == stored_good, (variant, statuses)
    assert not list(tmp.iterdir()), "a temporary file left in the system's temporary folder"


def test_a_uid_too_long_for_pynetdicom_is_not_written_to_the_log(tmp_path, start_node, caplog):
    """A C-STORE-RQ whose Affected SOP Instance UID has 65 characters: pynetdicom refuses
    to read the message (the node aborted the association; since the seventh attack it
    answers 0xC210: never Success, nothing stored) and logged the exception, whose text
    quotes the UID (a sender's identifier, which the node's log never carries: it names
    objects by a keyed hash)."""
    node = _folder_node(tmp_path, start_node)
    uid = "1.2." + "7" * 61
    ds = _ct()
    ds.SOPInstanceUID = uid
    caplog.set_level("INFO")
    with Raw(node.settings.node.port, timeout=15) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]))
        assert r.read_pdu()[0] == 0x02
        for pdu in c_store_pdus(_raw_command(CT_IMAGE_STORAGE, uid, 1), encode(ds, implicit=False)):
            r.send(pdu)
        got = r.read_pdu()
        assert got is None or got[0] == 0x07 or (got[0] == 0x04 and _check_command_set(_command_set(got[1])).Status != 0x0000)
    # Answered 0xC210 "invalid command element: AffectedSOPInstanceUID" since the seventh
    # attack (node.dimsefast); an abort logged by pynetdicom before.
    wait_until(lambda: "invalid command element" in caplog.text or "Received an invalid DIMSE message" in caplog.text, timeout=10, what="the refusal in the log")
    assert "7" * 20 not in caplog.text
    assert _rows(node) == 0


def test_the_board_passes_over_an_idler_that_let_a_connection_wait_until_its_record_changes():
    """The accept board: a live other process (here this test's parent) with 0 open
    connections against this one's 1 is yielded to; once it has let a pending
    connection wait out the whole wait, it is not yielded to again, until it writes its
    record again (it accepted or closed something). Sixth attack: accepting one and
    closing it leaves its count where it was (0), and the board used to compare counts:
    a receiver frozen once was passed over for good after it thawed."""
    from node.sharedport import _RECORD, AcceptBoard, pending

    board = AcceptBoard.create(2)
    try:
        # the other process's record (place 1), written by hand: its pid, count, times written
        _RECORD.pack_into(board._map, _RECORD.size, os.getppid(), 0, 1)
        board.claim(0, lambda: 1)
        assert board.should_yield()
        with socket.socket() as srv, socket.create_connection(("127.0.0.1", _listen(srv))):
            wait_until(lambda: pending(srv), timeout=5, what="the connection to be pending")
            board.yield_to_idler(srv, limit_s=0.05)
            assert not board.should_yield(), "waited again for a process that let a connection wait out the whole wait"
            assert not board.should_yield(), "a record that did not move"
            _RECORD.pack_into(board._map, _RECORD.size, os.getppid(), 1, 2)
            _RECORD.pack_into(board._map, _RECORD.size, os.getppid(), 0, 3)  # it accepted one, and closed it
            assert board.should_yield(), "a process that accepted and closed a connection is yielded to again"
            board.yield_to_idler(srv, limit_s=0.05)  # frozen again
            assert not board.should_yield()
            _RECORD.pack_into(board._map, _RECORD.size, os.getppid(), 0, 4)
            assert board.should_yield(), "passed over again, it is yielded to again once it moves"
    finally:
        board.close()
        os.close(board.fd)


def _listen(srv: socket.socket) -> int:
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv.getsockname()[1]


def _associate(port: int, source: str = "127.0.0.1"):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title="CASEMASK", bind_address=(source, 0))


def test_a_frozen_receiver_killed_by_a_reload_is_replaced_and_the_replacement_accepts(tmp_path):
    """receivers = 2, max_associations = 2: the receiver is frozen (SIGSTOP) and a reload
    (SIGHUP) asked for. The reload kills it (it never confirms), the node starts another
    in its place, and that one accepts associations (the dead one's board record and
    slots do not keep it out); the node-wide limit still holds exactly."""
    from tests.test_receivers import _server_pid

    node, raw = _serve(tmp_path, "reload", receivers=2, max_associations=2)
    port = raw["node"]["port"]
    node.start(port)
    log = tmp_path / "reload.log"
    held = []
    try:
        node_pid = node.proc.pid  # type: ignore[union-attr]
        (first,) = child_pids(node_pid)
        os.kill(first, signal.SIGSTOP)
        os.kill(node_pid, signal.SIGHUP)
        wait_until(lambda: not is_alive(first), timeout=60, what="the reload to kill the frozen receiver")
        wait_until(lambda: "listening (started in place of one that died)" in log.read_text(), timeout=60, what="its replacement to listen")
        (second,) = [p for p in child_pids(node_pid) if is_alive(p)]
        owners = []
        for _ in range(20):
            a = _associate(port)
            assert a.is_established
            held.append(a)
            if len(held) == 2:
                owners = sorted(_server_pid(port, x.dul.socket.socket.getsockname()[1], [node_pid, second]) or 0 for x in held)
                third = _associate(port)
                assert third.is_rejected, "a third association admitted with max_associations = 2"
                if second in owners:
                    break
                for x in held:
                    x.release()
                held.clear()
        assert second in owners, "the replacement receiver never accepted an association"
    finally:
        for a in held:
            if a.is_established:
                a.release()
        if is_alive(first):
            os.kill(first, signal.SIGKILL)
        node.stop()


def test_node_wide_limits_hold_exactly_under_a_flood(tmp_path):
    """receivers = 2, max_associations = 3, max_associations_per_host = 2, while 150
    silent connections and 30 half A-ASSOCIATE-RQs from 127.0.0.2 are held open:
    127.0.0.1 gets exactly 2 associations, 127.0.0.3 then exactly 1 (the node's third),
    and every further request is rejected, whichever process accepts it."""
    node, raw = _serve(tmp_path, "limits", receivers=2, max_associations=3, max_associations_per_host=2, acse_timeout_s=30.0)
    port = raw["node"]["port"]
    node.start(port)
    flood: list[socket.socket] = []
    held = []
    try:
        flood += _flood(port, 150, "127.0.0.2")
        flood += _flood(port, 30, "127.0.0.2", _half_rq())
        results = []
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.3", "127.0.0.3", "127.0.0.4"):
            a = _associate(port, source)
            results.append((source, a.is_established))
            if a.is_established:
                held.append(a)
        assert results == [("127.0.0.1", True), ("127.0.0.1", True), ("127.0.0.1", False), ("127.0.0.3", True), ("127.0.0.3", False), ("127.0.0.4", False)], results
    finally:
        for a in held:
            a.release()
        for s in flood:
            s.close()
        node.stop()


@needs_dcmtk
def test_dcmtk_and_pynetdicom_read_the_hand_encoded_response_for_a_64_character_uid(tmp_path, start_node):
    """storescu and pynetdicom send objects whose SOP Instance UIDs are 64 and 63
    characters (the response pads the odd one): both read the node's response as
    Success, and both objects are stored."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    assert _fast_path_on()
    ds = _ct()
    ds.SOPInstanceUID = "1.2." + "5" * 60
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path = tmp_path / "u64.dcm"
    ds.save_as(path, enforce_file_format=True)
    r = _storescu(port, path, 20)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CASEMASK")
    assert assoc.is_established
    try:
        other = _ct()
        other.SOPInstanceUID = "1.2." + "4" * 59
        other.file_meta = FileMetaDataset()
        other.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        status = assoc.send_c_store(other)
        assert status is not None and status.Status == 0x0000 and "ErrorComment" not in status
    finally:
        assoc.release()
    assert _rows(node) == 2


@needs_dcmtk
def test_a_receiver_killed_mid_c_store_leaves_no_stall_and_no_success(tmp_path):
    """receivers = 2: a raw C-STORE sent half-way on an association the receiver process
    accepted, then SIGKILL that receiver. The sender gets no Success (the connection
    ends), nothing of it is stored, and storescu runs right after (before a replacement
    listens) are each stored: the dead process's board record does not hold connections
    back. Its partial file in spool/.incoming is the periodic sweep's (after 120 s)."""
    from tests.test_receivers import _server_pid

    node, raw = _serve(tmp_path, "kill", receivers=2)
    port = raw["node"]["port"]
    files = make_study(tmp_path / "in", 3)
    node.start(port)
    conns: list[Raw] = []
    try:
        node_pid = node.proc.pid  # type: ignore[union-attr]
        (receiver,) = child_pids(node_pid)
        target = None
        for _ in range(20):  # associations until one is the receiver's
            r = Raw(port, timeout=10)
            conns.append(r)
            r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]))
            assert r.read_pdu()[0] == 0x02
            if _server_pid(port, r.sock.getsockname()[1], [node_pid, receiver]) == receiver:
                target = r
                break
        assert target is not None, "no association went to the receiver process"
        ds = _ct()
        data = encode(ds, implicit=False) + b"\0" * 200_000
        pdus = c_store_pdus(_raw_command(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID), 1), data)
        for pdu in pdus[: len(pdus) // 2]:
            target.send(pdu)
        os.kill(receiver, signal.SIGKILL)
        got = target.read_pdu()
        assert got is None or got[0] != 0x04, "a response to a C-STORE whose receiver died"
        for f in files:
            r = _storescu(port, f, 10)
            assert r.returncode == 0, r.stderr
        assert _rows_file(raw) == 3
    finally:
        for c in conns:
            c.close()
        node.stop()
