"""A hostile DICOM sender, seventh pass (docs/security.md, "Seventh attack"): command
sets that lack what a C-STORE-RQ requires, connections closed as soon as they open,
data sets that contradict their command."""

from __future__ import annotations

import logging
import socket
import sqlite3
import struct
import time

import pytest
from pydicom import Dataset

from tests.conftest import node_config
from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, RELEASE_RQ, Raw, associate_rq, c_store_pdus, encode, p_data, store_status
from tests.test_attack import _ct


def _folder_node(tmp_path, start_node, **kw):
    return start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, **kw), schedule=False)


def _rows(node) -> int:
    with sqlite3.connect(node.settings.node.data_dir / "casemask.db") as db:
        return db.execute("select count(*) from instances").fetchone()[0]


def _incoming(node) -> list:
    folder = node.settings.node.data_dir / "spool" / ".incoming"
    return list(folder.iterdir()) if folder.exists() else []


def _command(fields: dict[str, object]) -> bytes:
    cmd = Dataset()
    for k, v in fields.items():
        setattr(cmd, k, v)
    body = encode(cmd)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _store_fields(ds, message_id: int) -> dict[str, object]:
    return {"AffectedSOPClassUID": CT_IMAGE_STORAGE, "CommandField": 0x0001, "MessageID": message_id, "Priority": 0,
            "CommandDataSetType": 0x0000, "AffectedSOPInstanceUID": str(ds.SOPInstanceUID)}


def _statuses(port: int, requests: list[tuple[bytes, bytes]]) -> list[int | None]:
    """One association: each (command, data set) sent as a C-STORE-RQ in turn, the
    status of each answer (None: no answer, the association ended)."""
    out: list[int | None] = []
    with Raw(port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]))
        assert r.read_pdu()[0] == 0x02
        for command, data in requests:
            for pdu in c_store_pdus(command, data):
                r.send(pdu)
            got = r.read_pdu()
            out.append(store_status(got[1]) if got and got[0] == 0x04 else None)
            if got is None or got[0] != 0x04:
                return out
        r.send(RELEASE_RQ)
        r.read_pdu()
    return out


def test_a_c_store_rq_lacking_an_affected_uid_element_is_refused_not_aborted(tmp_path, start_node):
    """A C-STORE-RQ whose command set has no (0000,1000) Affected SOP Instance UID at all
    (or no (0000,0002) Affected SOP Class UID), a data set following. An *empty* element
    is answered 0xC211; a missing one made pynetdicom's chunked reception raise
    AttributeError while it named the incoming file, and the association was aborted: the
    sender got no status for its request. Now each is answered 0xC211, nothing is stored
    or left in spool/.incoming, and the association goes on to store the next object."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    requests = []
    for k, missing in enumerate(("AffectedSOPInstanceUID", "AffectedSOPClassUID", None), start=1):
        ds = _ct()
        fields = _store_fields(ds, k)
        if missing:
            del fields[missing]
        requests.append((_command(fields), encode(ds, implicit=False)))
    statuses = _statuses(port, requests)
    assert statuses == [0xC211, 0xC211, 0x0000], [hex(s) if s is not None else None for s in statuses]
    assert _rows(node) == 1
    assert _incoming(node) == []


def _reset(port: int, payload: bytes = b"") -> None:
    """Connect, send ``payload``, then close with a TCP reset (SO_LINGER 0)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if payload:
        s.sendall(payload)
    time.sleep(0.01)
    s.close()


def test_connections_reset_by_the_peer_are_not_a_log_flood(tmp_path, start_node, caplog):
    """40 connections closed with a TCP reset (SO_LINGER 0): before an A-ASSOCIATE-RQ,
    after one, and after half a PDU. pynetdicom's DUL logged each reset as two ERROR
    lines and a ten-line traceback (``Connection closed before the entire PDU was
    received``, ``[Errno 104] Connection reset by peer``): measured, 1500 such connects
    in 12 s wrote 2000 log lines. A reset is the peer closing: it ends the association as
    a close does (Evt17), logged at most once a second per address, never with a
    traceback. storescu is stored after the flood."""
    caplog.set_level("INFO")
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    rq = associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])])
    for k in range(40):
        _reset(port, (b"", rq, rq[:30])[k % 3])
    time.sleep(1.0)
    assert _raw_store_ok(port)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks][:3]
    assert len(errors) <= 5, [r.getMessage() for r in errors][:5]
    assert _rows(node) == 1


def _raw_store_ok(port: int) -> bool:
    ds = _ct()
    return _statuses(port, [(_command(_store_fields(ds, 1)), encode(ds, implicit=False))]) == [0x0000]


def _aborted(r: Raw, pdus) -> bool:
    """Send ``pdus`` (stopping when the node closed the connection); True when the node
    then aborted (A-ABORT) or closed the association, False when it still waits for more."""
    for pdu in pdus:
        if not r.send(pdu):
            return True
    r.sock.settimeout(5)
    try:
        while True:
            head = r.sock.recv(6)
            if not head or head[0] == 0x07:
                return True
            r._read(struct.unpack(">I", head[2:6])[0])
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


MIB = 1024 * 1024
FRAGMENT = b"\x00" * (MIB - 64)
MORE = 48  # fragments of about 1 MiB: what the node read into memory before the fix


def _associated(port: int, contexts=None) -> Raw:
    r = Raw(port, timeout=10)
    r.send(associate_rq(calling="STORESCU", contexts=contexts or [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])], max_pdu=MIB))
    assert r.read_pdu()[0] == 0x02
    return r


def test_fragments_that_never_make_a_message_are_not_kept_in_memory(tmp_path, start_node):
    """pynetdicom keeps, in memory and without a bound, data set fragments that come
    before any command (or with a command still incomplete), the fragments of a command
    set whose last fragment never comes, and the data set of any message other than a
    C-STORE-RQ (a C-FIND-RQ on the Verification context): measured, 400 data fragments of
    1 MiB with no command took ``casemask serve`` from 134 to 540 MB resident, the same
    for command fragments; 32 associations could take gigabytes. The node aborts the
    association at a data fragment before its command, at a command set over 64 KiB, and
    at an in-memory data set over 1 MiB (the node serves none: C-ECHO has none, and a
    C-STORE's goes to a file bounded by ``max_object_mb``). A sender is stored after."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    with _associated(port) as r:
        assert _aborted(r, [p_data([(1, 0x00, FRAGMENT)]) for _ in range(MORE)]), "data fragments without a command were read on"
    with _associated(port) as r:
        assert _aborted(r, [p_data([(1, 0x01, FRAGMENT)]) for _ in range(MORE)]), "a command set that never ends was read on"
    find = _command({"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.1", "CommandField": 0x0020, "MessageID": 1, "Priority": 0, "CommandDataSetType": 0x0000})
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]) as r:
        assert _aborted(r, [p_data([(3, 0x03, find)])] + [p_data([(3, 0x00, FRAGMENT)]) for _ in range(MORE)]), "an in-memory data set was read on"
    assert _raw_store_ok(port)
    assert _incoming(node) == []


def test_a_second_command_before_the_data_set_is_refused(tmp_path, start_node):
    """A C-STORE-RQ's command for object A, then (a protocol violation: its data set was
    due) a command for object B of another SOP class, then A's data set. The node
    answered Success for A, and A's spool file carried B's SOP Instance UID and SOP class
    in its File Meta (the command sets were joined; the fast path read the first, the
    incoming file was named after the second). Now the association is aborted at the
    second command: no answer says Success, nothing is stored."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    mr = "1.2.840.10008.5.1.4.1.1.4"
    a, b = _ct(), _ct(pn="SYNTHETIC^OTHER")
    cmd_b = _store_fields(b, 2)
    cmd_b["AffectedSOPClassUID"] = mr
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, mr, [EXPLICIT_VR_LE])]) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1)))]))
        r.send(p_data([(1, 0x03, _command(cmd_b))]))
        r.send(p_data([(1, 0x02, encode(a, implicit=False))]))
        got = r.read_pdu()
    assert got is None or got[0] != 0x04 or store_status(got[1]) != 0x0000
    assert _rows(node) == 0
    time.sleep(0.5)  # the association's close deletes its partial data set
    assert _incoming(node) == []


def test_a_c_echo_loop_is_not_a_log_flood(tmp_path, start_node, caplog):
    """One association sending C-ECHO after C-ECHO: each was an INFO line (measured: 779
    lines in 10 s from pynetdicom on one association; a raw client goes faster, and 32
    associations at once). Every echo is still answered Success; the log says so at most
    once a second per calling AE title and address, with the count of those left out."""
    from pynetdicom import AE

    caplog.set_level("INFO")
    node = _folder_node(tmp_path, start_node)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK")
    assert assoc.is_established
    started = time.monotonic()
    statuses = [assoc.send_c_echo().Status for _ in range(60)]
    took = time.monotonic() - started
    time.sleep(1.1)
    statuses.append(assoc.send_c_echo().Status)
    assoc.release()
    assert statuses == [0] * 61
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C-ECHO from")]
    assert len(lines) <= 2 + took, lines
    assert "more" in lines[-1], lines


@pytest.mark.single_process
def test_a_loop_of_refused_c_stores_is_not_a_log_flood(tmp_path, start_node, caplog):
    """One association sending the same object, refused 0xC212 (a leading zero in its
    Study Instance UID), 40 times in a row: each refusal was a WARNING line (measured:
    1486 lines in 10 s). Each is still answered 0xC212 and counted in
    ``casemask_stores_refused_total``; the line is written at most once a second per AE
    title and kind of refusal, the next saying how many were left out."""
    from prometheus_client import REGISTRY

    def refused() -> float:
        return REGISTRY.get_sample_value("casemask_stores_refused_total", {"status": "0xC212"}) or 0.0

    caplog.set_level("INFO")
    node = _folder_node(tmp_path, start_node)
    before = refused()
    ds = _ct()
    ds.StudyInstanceUID = "1.2.03"
    request = (_command(_store_fields(ds, 1)), encode(ds, implicit=False))
    started = time.monotonic()
    statuses = _statuses(node.settings.node.port, [request] * 40)
    took = time.monotonic() - started
    time.sleep(1.1)
    statuses += _statuses(node.settings.node.port, [request])
    assert statuses == [0xC212] * 41
    lines = [r.getMessage() for r in caplog.records if "-> 0xC212" in r.getMessage()]
    assert len(lines) <= 2 + took, lines
    assert "more like it" in lines[-1], lines
    assert refused() - before == 41  # each counted (casemask_stores_refused_total)


def test_a_data_set_on_another_context_than_its_command_is_refused(tmp_path, start_node):
    """Two contexts accepted for CT (explicit and implicit VR little endian); a C-STORE-RQ
    command on the first, its data set (explicit VR) on the second. PS3.8 9.3.5.1 keeps a
    message on one presentation context; pynetdicom read the data set as the command's
    context's and the node answered Success. Now the association is aborted: no answer
    says Success, nothing stored; the next association stores the object."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, CT_IMAGE_STORAGE, ["1.2.840.10008.1.2"])]) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 1)))]))
        r.send(p_data([(3, 0x02, encode(ds, implicit=False))]))
        got = r.read_pdu()
    assert got is None or got[0] != 0x04 or store_status(got[1]) != 0x0000
    assert _rows(node) == 0
    assert _statuses(port, [(_command(_store_fields(ds, 1)), encode(ds, implicit=False))]) == [0x0000]


def test_a_command_element_of_an_invalid_value_is_answered_not_aborted(tmp_path, start_node):
    """C-STORE-RQs with a Message ID whose Priority is 5 (PS3.7: 0, 1 or 2), or whose
    Affected SOP Class UID has 80 characters: pynetdicom's primitive refused the value,
    and the association was aborted with no answer to the request. Now each is answered
    0xC210 naming the element, nothing is stored, and the association goes on to store
    the next object."""
    node = _folder_node(tmp_path, start_node)
    requests = []
    for k, change in enumerate(({"Priority": 5}, {"AffectedSOPClassUID": "1." * 40}, {}), start=1):
        ds = _ct()
        fields = {**_store_fields(ds, k), **change}
        requests.append((_command(fields), encode(ds, implicit=False)))
    statuses = _statuses(node.settings.node.port, requests)
    assert statuses == [0xC210, 0xC210, 0x0000], [hex(s) if s is not None else None for s in statuses]
    assert _rows(node) == 1
    assert _incoming(node) == []


def test_an_ipv6_sender_is_one_host_per_64_for_the_limits(tmp_path):
    """``max_associations_per_host`` counted per address: a sender on IPv6 (``[node]
    host = "::"``) picks any of its /64's 2**64 addresses, and one host could take every
    place the per-host limit leaves to others (at the TCP gate and at A-ASSOCIATE-RQ).
    Addresses of one /64 now count as one host; an IPv4-mapped address as its IPv4."""
    from node.admission import Admission, network_of
    from node.config import parse

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], max_associations=8, max_associations_per_host=2)
    admission = Admission(parse(raw, "test", base_dir=tmp_path))
    taken = [admission.connect(k, f"2001:db8:1:2::{k + 1:x}") for k in range(6)]
    assert taken == [True] * 4 + [False] * 2  # twice the per-host limit at the TCP gate
    assert admission.connect(100, "2001:db8:1:3::1")  # another /64
    assert network_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert network_of("10.1.2.3") == "10.1.2.3"


DEFLATED = "1.2.840.10008.1.2.1.99"


def _deflated(ds, pixel_bytes: int) -> bytes:
    """``ds`` with ``pixel_bytes`` of zeros as Pixel Data (OB), deflated (PS3.5 A.5)."""
    import zlib

    head = encode(ds, implicit=False)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = c.compress(head + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes))
    body += c.compress(b"\0" * pixel_bytes)
    return body + c.flush()


@pytest.mark.single_process
def test_deflate_bombs_share_a_memory_budget(tmp_path, start_node, monkeypatch):
    """A deflated data set is inflated in memory to be checked: 296 KB sent inflated to
    290 MB and took 546 MB of the node's memory (measured, ``max_object_mb = 300``); with
    the default ``max_object_mb = 4096`` a 4 MB send cost some 7.5 GB, and a few
    associations at once all the node's memory. Now the inflations of a process share
    ``INFLATE_BUDGET`` (here 8 MiB): a data set over half of it is refused 0xA700 (too
    large), one that finds the budget held by others 0xA700 (busy: the sender retries),
    and it is stored once the budget is free."""
    from node import scp

    monkeypatch.setattr(scp, "INFLATE_BUDGET", 8 * MIB)
    monkeypatch.setattr(scp, "_inflating", scp._Budget(8 * MIB))
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port

    def store(ds, pixel_bytes: int) -> list[int | None]:
        with _associated(port, [(1, CT_IMAGE_STORAGE, [DEFLATED])]) as r:
            for pdu in c_store_pdus(_command(_store_fields(ds, 1)), _deflated(ds, pixel_bytes)):
                r.send(pdu)
            got = r.read_pdu()
            r.send(RELEASE_RQ)
            r.read_pdu()
        return [store_status(got[1]) if got and got[0] == 0x04 else None]

    bomb, small = _ct(), _ct()
    del bomb.PixelData, small.PixelData
    assert store(bomb, 6 * MIB) == [0xA700]  # over half the budget: never fits
    assert scp._inflating.take(5 * MIB)  # another association's inflation in progress
    assert store(small, 2 * MIB) == [0xA700]  # busy
    scp._inflating.give(5 * MIB)
    assert store(small, 2 * MIB) == [0x0000]
    assert scp._inflating.used == 0
    assert _rows(node) == 1
