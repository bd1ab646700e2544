"""A hostile DICOM sender, seventh pass (docs/security.md, "Seventh attack"): command
sets that lack what a C-STORE-RQ requires, connections closed as soon as they open,
data sets that contradict their command."""

from __future__ import annotations

import logging
import socket
import sqlite3
import struct
import time

from pydicom import Dataset

from tests.conftest import node_config
from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, RELEASE_RQ, Raw, associate_rq, c_store_pdus, encode, store_status
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
