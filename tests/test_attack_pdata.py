"""A hostile DICOM sender against the P-DATA fast path (node.pdatafast, docs/ingest.md
"A P-DATA fast path"): every attack is sent twice to one node, with the fast path on and
off, and must be answered the same way; nothing answered Success unless stored, no
incoming file or association thread left behind, and the node stores the next sender."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from node import pdatafast
from tests.rawdicom import ABORT, CT_IMAGE_STORAGE, EXPLICIT_VR_LE, RELEASE_RQ, Raw, associate_rq, encode, p_data, store_status
from tests.test_attack import _ct
from tests.test_attack_edge4 import _command, _folder_node, _incoming, _raw_store_ok, _rows, _store_fields

pytestmark = pytest.mark.single_process  # pdatafast.ENABLED is the node process's


def _answers(r: Raw, wait_s: float) -> list:
    """What the node sent until it closed the connection or ``wait_s`` passed in silence:
    (PDU type, C-STORE status or None) each, then "closed" or "open"."""
    out = []
    r.sock.settimeout(wait_s)
    while True:
        try:
            got = r.read_pdu()
        except OSError:
            got = None
        if got is None:
            try:
                r.sock.settimeout(0.01)
                still = r.sock.recv(1) if hasattr(r.sock, "pending") else r.sock.recv(1, socket.MSG_PEEK)  # TLS: no flags
                out.append("closed" if still == b"" else "open")
            except TimeoutError:
                out.append("open")
            except OSError:
                out.append("closed")
            return out
        out.append((got[0], store_status(got[1]) if got[0] == 0x04 else None))


def _assoc_threads() -> int:
    return sum(1 for t in threading.enumerate() if type(t).__name__ in ("Association", "DULServiceProvider") and t.is_alive())


def _both(node, send, wait_s: float = 2.0, contexts=None, settle_s: float = 5.0) -> list[list]:
    """``send(raw)`` on an association with the fast path on, then off; what the node
    answered each time. After each: no incoming file left, association threads gone."""
    port = node.settings.node.port
    seen = []
    for enabled in (True, False):
        pdatafast.ENABLED = enabled
        before = _assoc_threads()
        with Raw(port, timeout=10) as r:
            r.send(associate_rq(calling="STORESCU", contexts=contexts or [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])], max_pdu=1 << 20))
            assert r.read_pdu()[0] == 0x02
            send(r)
            seen.append(_answers(r, wait_s))
        deadline = time.monotonic() + settle_s
        while (_assoc_threads() > before or _incoming(node)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _incoming(node) == [], f"fast path {'on' if enabled else 'off'}: an incoming file left"
        assert _assoc_threads() <= before, f"fast path {'on' if enabled else 'off'}: association threads left"
    pdatafast.ENABLED = True
    return seen


@pytest.fixture
def node(tmp_path, start_node, monkeypatch):
    monkeypatch.setattr(pdatafast, "ENABLED", pdatafast.ENABLED)
    n = _folder_node(tmp_path, start_node, network_timeout_s=3, dimse_timeout_s=3, acse_timeout_s=3)
    assert pdatafast.ENABLED
    return n


def _store(ds=None, message_id: int = 1) -> tuple[bytes, bytes]:
    ds = ds or _ct()
    return _command(_store_fields(ds, message_id)), encode(ds, implicit=False)


def _same_and_no_success(seen: list[list], rows: int, node) -> None:
    assert seen[0] == seen[1], f"fast path on {seen[0]} / off {seen[1]}"
    assert _rows(node) == rows
    assert all(a[1] != 0x0000 for a in seen[0] if isinstance(a, tuple) and a[0] == 0x04) or rows


ITEM_LENGTHS = {"0": 0, "1": 1, "2": 2, "to the PDU's end": None, "one past": "+1", "0xFFFFFFFF": 0xFFFFFFFF}


@pytest.mark.parametrize("name", ITEM_LENGTHS)
def test_pdv_item_lengths(node, name):
    """A data set PDV whose item length is 0, 1, 2 (its control header alone), exactly the
    PDU's end, one past it, 0xFFFFFFFF: answered as pynetdicom answers it."""
    command, data = _store()
    body = struct.pack(">BB", 1, 0x02) + data  # context 1, last data fragment

    def send(r):
        length = ITEM_LENGTHS[name]
        real = len(body) if length is None else len(body) + 1 if length == "+1" else length
        r.send(p_data([(1, 0x03, command)]))
        r.send(struct.pack(">BBI", 0x04, 0, 4 + len(body)) + struct.pack(">I", real) + body)

    seen = _both(node, send)
    _same_and_no_success(seen, 1 if name == "to the PDU's end" else 0, node)
    assert _raw_store_ok(node.settings.node.port)


PDU_LENGTHS = {"0": 0, "shorter": -7, "longer": +7, "over the maximum": (1 << 20) + 1}


@pytest.mark.parametrize("name", PDU_LENGTHS)
def test_pdu_lengths_that_lie(node, name):
    """A P-DATA-TF whose PDU length is 0, shorter or longer than what follows, or above
    the Maximum Length the node announced (with that much following)."""
    command, data = _store()
    pdu = p_data([(1, 0x03, command)])
    body = pdu[6:]

    def send(r):
        delta = PDU_LENGTHS[name]
        if name == "0":
            r.send(struct.pack(">BBI", 0x04, 0, 0))
        elif name == "over the maximum":
            r.send(struct.pack(">BBI", 0x04, 0, delta) + struct.pack(">IBB", delta - 4, 1, 0x01) + b"\x00" * (delta - 6))
        else:
            r.send(struct.pack(">BBI", 0x04, 0, len(body) + delta) + body)

    seen = _both(node, send, wait_s=4.5)
    _same_and_no_success(seen, 0, node)
    assert _raw_store_ok(node.settings.node.port)


def test_p_data_in_the_segment_of_the_request(node):
    """A whole C-STORE in the TCP segment of the A-ASSOCIATE-RQ: before the node's
    A-ASSOCIATE-AC (Sta3), refused as pynetdicom refuses it."""
    port = node.settings.node.port
    command, data = _store()
    seen = []
    for enabled in (True, False):
        pdatafast.ENABLED = enabled
        with Raw(port, timeout=10) as r:
            r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]) + p_data([(1, 0x03, command)]) + p_data([(1, 0x02, data)]))
            seen.append(_answers(r, 2.0))
    _same_and_no_success(seen, 0, node)
    assert _raw_store_ok(port)


@pytest.mark.parametrize("after", ["release", "abort"])
def test_a_release_or_abort_in_the_segment_of_the_last_fragment(node, after):
    """The last data fragment and an A-RELEASE-RQ (or A-ABORT) in one TCP segment."""
    command, data = _store()
    tail = RELEASE_RQ if after == "release" else ABORT

    def send(r):
        r.send(p_data([(1, 0x03, command)]) + p_data([(1, 0x02, data)]) + tail)

    seen = _both(node, send)
    assert seen[0] == seen[1]
    if after == "release":
        assert seen[0][:2] == [(0x04, 0x0000), (0x06, None)]
    assert _raw_store_ok(node.settings.node.port)


def test_a_p_data_after_the_release_request(node):
    """A C-STORE sent after the A-RELEASE-RQ (Sta8): never goes the fast way, aborted as
    pynetdicom aborts it. Then, on either path, the node sometimes waits in Sta13 for
    the ARTIM timer (acse_timeout_s, 3 s here) although the sender closed at once
    (measured, 4 of 6 and 3 of 6 tries, fast path on and off): the close is left out of
    the comparison, and the threads get the ARTIM timer's time to end."""
    command, data = _store()

    def send(r):
        r.send(RELEASE_RQ + p_data([(1, 0x03, command)]) + p_data([(1, 0x02, data)]))

    seen = _both(node, send, wait_s=1.0, settle_s=8.0)
    assert [s[:-1] for s in seen] == [[(0x07, None)]] * 2, seen
    assert _rows(node) == 0


@pytest.mark.parametrize("context_id", [0, 2, 3, 5, 7, 255])
def test_presentation_context_ids_not_accepted(node, context_id):
    """A C-STORE on context 0, 2 (even), 3 (rejected: a transfer syntax the node does not
    know), 5 (never proposed), 7 (accepted for an unknown SOP class: 0x0122), 255."""
    command, data = _store()
    contexts = [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, CT_IMAGE_STORAGE, ["1.2.3.999"]), (7, "1.2.3.4.5.6.7.8.9", [EXPLICIT_VR_LE])]

    def send(r):
        r.send(p_data([(context_id, 0x03, command)]) + p_data([(context_id, 0x02, data)]))

    seen = _both(node, send, contexts=contexts)
    _same_and_no_success(seen, 0, node)
    assert _raw_store_ok(node.settings.node.port)


def test_two_whole_messages_in_one_p_data(node):
    """Two whole C-STOREs (command, data set, command, data set) in one P-DATA-TF."""
    def send(r):
        a, b = _store(), _store(message_id=2)
        r.send(p_data([(1, 0x03, a[0]), (1, 0x02, a[1]), (1, 0x03, b[0]), (1, 0x02, b[1])]))

    seen = _both(node, send)
    assert seen[0] == seen[1]
    assert _rows(node) == sum(1 for s in seen[0] + seen[1] if s == (0x04, 0x0000)), seen


def test_a_p_data_one_byte_at_a_time(node):
    """A slowloris: a C-STORE command's P-DATA-TF one byte every 0.1 s (170 bytes: 17 s).
    The PDU must arrive within network_timeout_s (3 s here) of its first byte: the
    connection is closed after 3-7 s, with the fast path on as off."""
    command, _ = _store()
    pdu = p_data([(1, 0x03, command)])
    ended = []

    def send(r):
        t0 = time.monotonic()
        for k in range(len(pdu)):
            if not r.send(pdu[k : k + 1]):
                break
            r.sock.settimeout(0.1)
            try:
                if r.sock.recv(1, socket.MSG_PEEK) in (b"", b"\x07"):
                    break
            except TimeoutError:
                pass
            except OSError:
                break
        ended.append(time.monotonic() - t0)

    seen = _both(node, send)
    _same_and_no_success(seen, 0, node)
    assert all(3 <= t < 8 for t in ended), ended
    assert _raw_store_ok(node.settings.node.port)


def test_a_reset_in_the_middle_of_a_data_pdu(node):
    """The connection reset (SO_LINGER 0) with half a data P-DATA-TF sent, the incoming
    file already open: deleted, the association threads end (checked by _both)."""
    ds = _ct()
    ds.Rows = ds.Columns = 316
    ds.PixelData = b"\0" * (316 * 316)
    command, data = _command(_store_fields(ds, 1)), encode(ds, implicit=False)
    opened = []

    def send(r):
        r.send(p_data([(1, 0x03, command)]) + p_data([(1, 0x00, data[:50000])]))
        pdu = p_data([(1, 0x02, data[50000:])])
        r.send(pdu[: len(pdu) // 2])
        time.sleep(0.3)
        opened.append(len(_incoming(node)))
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.sock.close()

    port = node.settings.node.port
    for enabled in (True, False):
        pdatafast.ENABLED = enabled
        before = _assoc_threads()
        r = Raw(port, timeout=10)
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])], max_pdu=1 << 20))
        assert r.read_pdu()[0] == 0x02
        send(r)
        deadline = time.monotonic() + 5
        while (_incoming(node) or _assoc_threads() > before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _incoming(node) == [] and _assoc_threads() <= before
    assert opened == [1, 1]
    assert _rows(node) == 0
    assert _raw_store_ok(port)


@pytest.mark.parametrize("how", ["silence", "trickle"])
def test_a_message_that_never_ends(node, how):
    """A C-STORE command, then silence, or a one-byte data fragment in a P-DATA-TF of its
    own every 0.5 s (each PDU restarts the idle timer): aborted within the timeouts
    (network_timeout_s, dimse_timeout_s = 3 s), the fast path on as off."""
    command, data = _store()
    took = []

    def send(r):
        t0 = time.monotonic()
        r.send(p_data([(1, 0x03, command)]))
        for k in range(20 if how == "trickle" else 0):
            if not r.send(p_data([(1, 0x00, data[k : k + 1])])):
                break
            time.sleep(0.5)
        took.append(time.monotonic() - t0)

    seen = _both(node, send, wait_s=6)
    _same_and_no_success(seen, 0, node)
    assert seen[0][-1] == "closed"
    assert all(t < 8 for t in took), took


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def test_a_big_data_set_in_many_pdvs_is_not_held_in_memory(node):
    """A 128 MiB data set in 1 MiB P-DATA-TFs of 16 PDVs each, fast path on, then off:
    stored, and the node's process (this one) grows by less than a quarter of it."""
    port = node.settings.node.port
    chunk = b"\0" * (64 << 10)
    for enabled in (True, False):
        pdatafast.ENABLED = enabled
        ds = _ct()
        del ds.PixelData
        ds.Rows = ds.Columns = 8192
        ds.BitsAllocated = ds.BitsStored = 16
        size = 8192 * 8192 * 2
        start, peak = _rss_mib(), 0
        with Raw(port, timeout=60) as r:
            r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])], max_pdu=1 << 20))
            assert r.read_pdu()[0] == 0x02
            r.send(p_data([(1, 0x03, _command(_store_fields(ds, 1)))]))
            r.send(p_data([(1, 0x00, encode(ds, implicit=False) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size))]))
            for k in range(size >> 20):
                r.send(p_data([(1, 0x00, chunk)] * 15 + [(1, 0x02 if k == (size >> 20) - 1 else 0x00, chunk)]))
                peak = max(peak, _rss_mib())
            got = r.read_pdu()
            assert got is not None and got[0] == 0x04 and store_status(got[1]) == 0x0000
        assert peak - start < 32, f"fast path {'on' if enabled else 'off'}: {start} -> {peak} MiB"
    assert _rows(node) == 2


def test_tcp_urgent_data_does_not_spin_the_reactor(node):
    """One byte of TCP urgent data (MSG_OOB) on an established association: the DUL
    thread's poll() reported POLLPRI at once, again and again, while the zero-timeout
    select behind it (which pynetdicom's own loop uses alone) does not count urgent data
    as readable: the thread spun (measured, 0.68 s of CPU per second, load 6) until the
    idle timeout ended the association (network_timeout_s, 60 s by default), one byte
    per connection. Urgent data is ignored now, as pynetdicom ignores it: the process
    stays idle, and the association stores the next object."""
    port = node.settings.node.port
    ds = _ct()
    command, data = _command(_store_fields(ds, 1)), encode(ds, implicit=False)
    with Raw(port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])], max_pdu=1 << 20))
        assert r.read_pdu()[0] == 0x02
        r.sock.send(b"!", socket.MSG_OOB)
        time.sleep(0.2)
        start = sum(os.times()[:2])
        time.sleep(1.0)
        spent = sum(os.times()[:2]) - start
        r.send(p_data([(1, 0x03, command)]) + p_data([(1, 0x02, data)]))
        got = r.read_pdu()
    assert spent < 0.25, f"{spent:.2f} s of CPU in 1 s after one urgent byte"
    assert got is not None and got[0] == 0x04 and store_status(got[1]) == 0x0000
    assert _rows(node) == 1


def test_a_half_close_right_after_the_last_fragment(node):
    """A whole C-STORE, then the sender's end shut (SHUT_WR: the node reads end-of-file
    right after the data set): pynetdicom takes the end-of-file for the connection's
    close, so the object is stored but never answered; alike with the fast path on and
    off (a Success would only be for a stored object)."""

    def send(r):
        command, data = _store()
        r.send(p_data([(1, 0x03, command)]) + p_data([(1, 0x02, data)]))
        r.sock.shutdown(socket.SHUT_WR)

    seen = _both(node, send)
    assert seen[0] == seen[1]
    assert _rows(node) >= sum(1 for s in seen[0] + seen[1] if s == (0x04, 0x0000)), seen
    assert _raw_store_ok(node.settings.node.port)


def test_pdus_in_one_tls_record_are_all_read(tmp_path, start_node, monkeypatch):
    """Over DICOM TLS, a C-STORE's command, its data set and an A-RELEASE-RQ in one TLS
    record: the reactor's poll() cannot see the PDUs the TLS layer holds decrypted after
    the first one; each is read (the fast path's skipped select included), stored,
    answered Success, released; fast path on and off alike."""
    import ssl

    from tests.pki import CA
    from tests.test_tls import tls_node

    monkeypatch.setattr(pdatafast, "ENABLED", pdatafast.ENABLED)
    ca = CA(tmp_path / "pki")
    pki = {"ca": ca, "node": ca.issue("casemask-node", server=True, client=True), "modality": ca.issue("modality-1", client=True)}
    node = tls_node(tmp_path, start_node, pki)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki["ca"].pair.cert))
    ctx.load_cert_chain(str(pki["modality"].cert), str(pki["modality"].key))
    seen = []
    for enabled in (True, False):
        pdatafast.ENABLED = enabled
        command, data = _store()
        with socket.create_connection(("127.0.0.1", node.settings.node.tls.port), timeout=10) as raw:
            r = Raw.__new__(Raw)
            r.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])], max_pdu=1 << 20))
            assert r.read_pdu()[0] == 0x02
            batch = p_data([(1, 0x03, command)]) + p_data([(1, 0x02, data)]) + RELEASE_RQ
            assert len(batch) < 16384  # one TLS record
            r.send(batch)
            seen.append(_answers(r, 3.0))
    assert seen[0] == seen[1] == [(0x04, 0x0000), (0x06, None), "closed"], seen
    assert _rows(node) == 2


def test_a_p_data_of_too_many_pdvs_is_refused(node):
    """A C-STORE whose data set follows a P-DATA-TF of 174762 empty data PDVs (1 MiB,
    item length 2 each): pynetdicom made each an object and handed it on, the fast path
    a tuple: measured, 30 MiB more resident and 0.8 s of CPU per such PDU on either path
    (load 4), and the C-STORE was answered Success after ten of them. More than
    admission.MAX_PDVS PDVs in one P-DATA-TF aborts the association now, on either
    path, and the fast path makes no more than that many into tuples first."""
    from node.admission import MAX_PDVS

    count = ((1 << 20) - 6) // 6

    def send(r):
        command, data = _store()
        r.send(p_data([(1, 0x03, command)]) + p_data([(1, 0x00, b"")] * count) + p_data([(1, 0x02, data)]))

    seen = _both(node, send)
    _same_and_no_success(seen, 0, node)
    assert seen[0][0] == (0x07, None), seen
    pdu = p_data([(1, 0x00, b"")] * count)
    assert len(pdatafast.pdv_list(pdu, limit=MAX_PDVS)) == MAX_PDVS + 1
    assert len(pdatafast.pdv_list(p_data([(1, 0x00, b"")] * MAX_PDVS), limit=MAX_PDVS)) == MAX_PDVS
    assert _raw_store_ok(node.settings.node.port)


def test_a_message_of_tiny_pdvs_in_many_p_data_is_refused(node):
    """1 MiB of empty data PDVs in P-DATA-TFs of 4096 PDVs each (43 PDUs), then the last
    fragment: each PDU passes the per-PDU limit, and the DUL thread spends about 0.8 s
    of CPU on the MiB (measured with one 1 MiB PDU, load 4), for a sender sending at
    1.3 MB/s a whole core. The association is aborted (a message's PDVs beyond its first
    64 must carry 256 bytes each on average), on both paths, and nothing is stored."""
    from node.admission import MAX_PDVS

    def send(r):
        command, data = _store()
        r.send(p_data([(1, 0x03, command)]))
        for _ in range(((1 << 20) // 6) // MAX_PDVS):
            r.send(p_data([(1, 0x00, b"")] * MAX_PDVS))
        r.send(p_data([(1, 0x02, data)]))

    seen = _both(node, send)
    assert seen[0][0] == seen[1][0] == (0x07, None), seen
