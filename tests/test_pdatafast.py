"""The P-DATA fast path (node.pdatafast): the same primitives as pynetdicom's decoding
and state machine, pynetdicom's own path (and its refusals) for anything malformed, and
pynetdicom left alone when its code is not the one this was written against."""

from __future__ import annotations

import logging
import struct

import pytest
from pynetdicom import _config, dimse
from pynetdicom import dul as _dul
from pynetdicom.pdu import P_DATA_TF

from node import dimsefast, pdatafast
from tests.conftest import node_config
from tests.rawdicom import CT_IMAGE_STORAGE, RELEASE_RQ, Raw, associate_rq, c_store_command, encode, p_data, store_status


def test_the_installed_pynetdicom_is_the_one_the_fast_path_was_written_for():
    assert pdatafast.check_pynetdicom() == [], f"pynetdicom's PDU reading / state machine changed: read them again, then update EXPECTED_SOURCES ({pdatafast.source_digests()})"


def _pynetdicom_list(pdu: bytes) -> list[tuple[int, bytes]]:
    """The presentation data value list pynetdicom's path makes of ``pdu`` (as DT-2 does)."""
    decoded = P_DATA_TF()
    decoded.decode(pdu)
    return decoded.to_primitive().presentation_data_value_list


def _pdus():
    """P-DATA-TF PDUs of many shapes: command and data, several PDVs, odd splits."""
    command = c_store_command(CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.9.9999.1.2.3", 7)
    data = bytes(range(256)) * 40 + b"\x01\x02\x03"
    yield p_data([(1, 0x03, command)])
    yield p_data([(1, 0x01, command[:5]), (1, 0x03, command[5:])])
    yield p_data([(1, 0x03, command), (1, 0x00, data[:1001]), (1, 0x02, data[1001:])])
    for size in (1, 2, 3, 17, 999, 4093, 4096, 4097, 16383, len(data)):
        parts = [data[k : k + size] for k in range(0, len(data), size)]
        yield p_data([(3, 0x00, part) for part in parts[:-1]] + [(3, 0x02, parts[-1])])
        yield p_data([(255, 0x00, parts[0])])
    yield p_data([(5, 0x02, b"")])  # a PDV of its control header alone
    yield p_data([(1, 0x03, command), (3, 0x03, command), (1, 0x02, b"x")])


@pytest.mark.parametrize("index", range(len(list(_pdus()))))
def test_a_p_data_becomes_the_list_pynetdicom_would_make(index):
    pdu = list(_pdus())[index]
    fast = pdatafast.pdv_list(pdu)
    assert fast == _pynetdicom_list(pdu)
    assert all(type(cid) is int and type(frag) is bytes for cid, frag in fast)  # as pynetdicom's: bytes, not views
    assert pdatafast.pdv_list(bytearray(pdu)) == fast  # what the socket gives


def _malformed():
    good = struct.pack(">IBB", 5, 1, 0x02) + b"abc"
    yield "no PDV", b""
    yield "an item length of 0", struct.pack(">IB", 0, 1)
    yield "an item length of 1 (no control header)", struct.pack(">IB", 1, 1)
    yield "an item past the PDU's end", struct.pack(">IBB", 50, 1, 0x02) + b"abc"
    yield "3 bytes after the last item", good + b"\x00\x00\x00"
    yield "an item header cut short", good + struct.pack(">I", 9)
    yield "a second item past the end", good + struct.pack(">IBB", 9, 1, 0x02) + b"ab"


@pytest.mark.parametrize("why,body", list(_malformed()), ids=[w for w, _ in _malformed()])
def test_a_malformed_p_data_is_left_to_pynetdicom(why, body):
    pdu = struct.pack(">BBI", 0x04, 0, len(body)) + body
    assert pdatafast.pdv_list(pdu) is None, why


# -- through a real association ------------------------------------------------------------------
def _folder(tmp_path):
    return {"name": "f", "kind": "folder", "path": str(tmp_path / "out")}


@pytest.fixture
def spies(monkeypatch):
    """Record what reaches the DIMSE layer (under the node's guard, which wraps what the
    class has when an association opens), how many P-DATA went the fast way and how many
    PDUs pynetdicom decoded; pdatafast.ENABLED is restored at the end. pynetdicom's
    logging handlers are not bound, as in the node unless `casemask -vv`."""
    seen = {"primitives": [], "fast": 0, "decoded": 0}
    assert dimsefast.install()  # as a node's start does (once per process): it then keeps the spy below
    receive, deliver, decode = dimse.DIMSEServiceProvider.receive_primitive, pdatafast.deliver, _dul.DULServiceProvider._decode_pdu

    def receive_primitive(self, primitive):
        seen["primitives"].append([(cid, bytes(frag)) for cid, frag in primitive.presentation_data_value_list])
        return receive(self, primitive)

    def counting_deliver(dul, primitive):
        seen["fast"] += 1
        return deliver(dul, primitive)

    def counting_decode(self, bytestream):
        seen["decoded"] += 1
        return decode(self, bytestream)

    monkeypatch.setattr(dimse.DIMSEServiceProvider, "receive_primitive", receive_primitive)
    monkeypatch.setattr(pdatafast, "deliver", counting_deliver)
    monkeypatch.setattr(_dul.DULServiceProvider, "_decode_pdu", counting_decode)
    monkeypatch.setattr(pdatafast, "ENABLED", pdatafast.ENABLED)
    # as the node runs unless `casemask -vv`: no logging handler bound to EVT_PDU_RECV (with
    # one, every PDU goes through pynetdicom so that it sees the PDU object)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    return seen


def _exchange(port: int, pdus: list[bytes], answers: int) -> list[tuple[int, bytes]]:
    """Associate, send ``pdus``, read ``answers`` PDUs back (fewer if the connection
    closes), then release and read until the node's A-RELEASE-RP, A-ABORT or close:
    every PDU the node sent after its A-ASSOCIATE-AC, in order."""
    got = []
    with Raw(port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU"))
        assert r.read_pdu()[0] == 0x02
        for pdu in pdus:
            if not r.send(pdu):
                break
        for _ in range(answers):
            if (answer := r.read_pdu()) is None:
                return got
            got.append(answer)
        r.send(RELEASE_RQ)
        while (answer := r.read_pdu()) is not None:
            got.append(answer)
            if answer[0] in (0x06, 0x07):
                break
    return got


def _object() -> tuple[str, bytes]:
    """A synthetic 64 x 64 CT: its SOP Instance UID and its data set, Explicit VR Little Endian."""
    from tests.test_attack import _ct

    ds = _ct()
    ds.Rows = ds.Columns = 64
    ds.PixelData = bytes(range(256)) * 16
    return str(ds.SOPInstanceUID), encode(ds, implicit=False)


def _stores(ds_bytes: list[tuple[str, bytes]]) -> list[bytes]:
    """C-STOREs cut in odd ways: fragments of 997 bytes one per PDU; the command and the
    first fragment in one PDU, then three PDVs per PDU; one-byte fragments, then the rest."""
    out = []
    for n, (uid, data) in enumerate(ds_bytes):
        command = c_store_command(CT_IMAGE_STORAGE, uid, n + 1)
        if n % 3 == 0:
            parts = [data[k : k + 997] for k in range(0, len(data), 997)]
            out.append(p_data([(1, 0x03, command)]))
            out += [p_data([(1, 0x02 if k == len(parts) - 1 else 0x00, part)]) for k, part in enumerate(parts)]
        elif n % 3 == 1:
            parts = [data[k : k + 1001] for k in range(0, len(data), 1001)]
            flags = [0x00] * (len(parts) - 1) + [0x02]
            out.append(p_data([(1, 0x03, command), (1, flags[0], parts[0])]))
            for k in range(1, len(parts), 3):
                out.append(p_data([(1, flags[j], parts[j]) for j in range(k, min(k + 3, len(parts)))]))
        else:
            out.append(p_data([(1, 0x01, command[:11]), (1, 0x03, command[11:])]))
            out += [p_data([(1, 0x00, data[k : k + 1])]) for k in range(5)]
            out.append(p_data([(1, 0x02, data[5:])]))
    return out


@pytest.mark.single_process  # counts calls in this process
def test_the_fast_path_hands_the_dimse_layer_what_pynetdicom_would(tmp_path, start_node, spies):
    """Three C-STOREs cut in odd ways, sent once through the fast path and once (the same
    bytes, a second association) through pynetdicom's state machine: the DIMSE layer gets
    the same primitives, the sender the same answers, and the objects are stored."""
    import sqlite3


    node = start_node(node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600), schedule=False)
    assert pdatafast.ENABLED
    objects = [_object() for _ in range(3)]
    pdus = _stores(objects)
    fast_answers = _exchange(node.settings.node.port, pdus, 3)
    fast_primitives, fast_count = list(spies["primitives"]), spies["fast"]
    spies["primitives"].clear()
    pdatafast.ENABLED = False
    slow_answers = _exchange(node.settings.node.port, pdus, 3)
    assert spies["fast"] == fast_count, "with the fast path off, every PDU goes through pynetdicom"
    assert fast_count == len(pdus), "every P-DATA of the first association went the fast way"
    assert fast_primitives == spies["primitives"]
    assert len(fast_primitives) == len(pdus)
    assert fast_primitives[0] == pdatafast.pdv_list(pdus[0])
    assert [store_status(a[1]) for a in fast_answers[:3]] == [0x0000] * 3
    assert [(kind, store_status(body)) for kind, body in fast_answers] == [(kind, store_status(body)) for kind, body in slow_answers]
    assert fast_answers[-1][0] == 0x06  # released
    with sqlite3.connect(node.settings.node.data_dir / "casemask.db") as db:
        assert db.execute("select count(*) from instances").fetchone()[0] == 3


def _raw_pdata(body: bytes) -> bytes:
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


@pytest.mark.single_process
@pytest.mark.parametrize("why,body", list(_malformed()), ids=[w for w, _ in _malformed()])
def test_a_malformed_p_data_is_refused_as_pynetdicom_refuses_it(why, body, tmp_path, start_node, spies):
    """After a well-formed C-STORE command, a malformed P-DATA-TF: with the fast path on,
    pynetdicom decodes it (none goes the fast way but the command), and the sender gets
    exactly what it gets with the fast path off (an A-ABORT where pynetdicom aborts)."""
    node = start_node(node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600), schedule=False)
    command = p_data([(1, 0x03, c_store_command(CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.9.9999.7", 1))])
    pdus = [command, _raw_pdata(body)]
    on = _exchange(node.settings.node.port, pdus, 0)
    assert spies["fast"] == 1, "only the command went the fast way"
    assert spies["decoded"] >= 1, "the malformed PDU was pynetdicom's to decode"
    pdatafast.ENABLED = False
    off = _exchange(node.settings.node.port, pdus, 0)
    assert spies["fast"] == 1
    assert [kind for kind, _ in on] == [kind for kind, _ in off], why
    assert on == off, why
    if why != "no PDV":
        assert on and on[0][0] == 0x07, f"{why}: aborted as pynetdicom aborts"


@pytest.mark.single_process
def test_a_p_data_longer_than_the_announced_maximum_is_pynetdicoms(tmp_path, start_node, spies):
    """A data set in one P-DATA-TF above the Maximum Length the node announced (within
    what node.admission lets be read): pynetdicom's path, as before (it stores it)."""
    import sqlite3

    from node.admission import MAX_PDU

    from tests.test_attack import _ct

    node = start_node(node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600), schedule=False)
    ds = _ct()
    data = encode(ds, implicit=False)
    ds.add_new(0x00091010, "OB", b"\x00" * (MAX_PDU + 16 - len(data) + (len(data) % 2)))  # a private element to make it long
    data = encode(ds, implicit=False)
    pdus = [p_data([(1, 0x03, c_store_command(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID), 1))]), p_data([(1, 0x02, data)])]
    assert len(pdus[1]) - 6 > MAX_PDU
    answers = _exchange(node.settings.node.port, pdus, 1)
    assert spies["fast"] == 1, "the command only; the long PDU went through pynetdicom"
    assert answers and answers[0][0] == 0x04
    with sqlite3.connect(node.settings.node.data_dir / "casemask.db") as db:
        stored = db.execute("select count(*) from instances").fetchone()[0]
    assert store_status(answers[0][1]) == 0x0000 and stored == 1


@pytest.mark.single_process
def test_pynetdicom_is_left_alone_when_a_digest_differs(tmp_path, start_node, spies, monkeypatch, caplog):
    """One of the functions the fast path stands in for has another digest (a new
    pynetdicom): install() says so, and every PDU goes through pynetdicom's path; the
    C-STOREs are answered and stored as ever."""
    import sqlite3


    monkeypatch.setitem(pdatafast.EXPECTED_SOURCES, "fsm.DT_2", "0" * 16)
    assert pdatafast.check_pynetdicom() == ["fsm.DT_2"]
    with caplog.at_level(logging.WARNING, logger="node.pdatafast"):
        node = start_node(node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600), schedule=False)
    assert not pdatafast.ENABLED
    assert any("fsm.DT_2" in r.getMessage() and "P-DATA fast path" in r.getMessage() for r in caplog.records)
    objects = [_object() for _ in range(2)]
    answers = _exchange(node.settings.node.port, _stores(objects), 2)
    assert spies["fast"] == 0
    assert spies["decoded"] >= len(_stores(objects))
    assert [store_status(a[1]) for a in answers[:2]] == [0x0000] * 2
    with sqlite3.connect(node.settings.node.data_dir / "casemask.db") as db:
        assert db.execute("select count(*) from instances").fetchone()[0] == 2
