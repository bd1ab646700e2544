"""A hostile sender and a hostile network peer, eleventh pass (docs/security.md,
"Eleventh attack"): two DIMSE messages in one P-DATA-TF, PostgreSQL failing while
C-STOREs are committed, limits on what a sender or an archive can make the node read.
Synthetic values only."""

from __future__ import annotations

import struct

import pytest
from pydicom import Dataset

from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION, encode, p_data, store_status
from tests.test_attack import _ct
from tests.test_attack_edge4 import _associated, _command, _folder_node, _raw_store_ok, _rows, _store_fields


def _echo_command(message_id: int) -> bytes:
    return _command({"AffectedSOPClassUID": VERIFICATION, "CommandField": 0x0030, "MessageID": message_id, "CommandDataSetType": 0x0101})


def _answers(r, n: int) -> list[tuple[int, int | None]]:
    """Up to ``n`` PDUs read (type, C-STORE/C-ECHO status), stopping at the first that is
    not a P-DATA-TF or at the connection's end / the read timeout."""
    out = []
    for _ in range(n):
        got = r.read_pdu()
        if got is None:
            break
        out.append((got[0], store_status(got[1]) if got[0] == 0x04 else None))
        if got[0] != 0x04:
            break
    return out


# -- two messages in one P-DATA-TF (PS3.8 9.3.5: PDVs of several messages may share one) ------
def test_two_whole_c_stores_in_one_p_data_are_both_stored_and_answered(tmp_path, start_node):
    """Two complete C-STORE-RQs (command and data set each) in one P-DATA-TF. pynetdicom
    ended the first message at its data set's last fragment and dropped the PDVs after it:
    the first object was answered Success, the second never answered, the sender left
    waiting until its own timeout. Each message is now handed on in turn: two answers, two
    rows."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x02, encode(a, implicit=False)),
                       (1, 0x03, _command(_store_fields(b, 2))), (1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 2)
    assert answers == [(0x04, 0x0000), (0x04, 0x0000)], answers
    assert _rows(node) == 2
    assert _raw_store_ok(port)


def test_two_c_echoes_in_one_p_data_are_both_answered(tmp_path, start_node):
    """Two C-ECHO-RQs (command sets without a data set) in one P-DATA-TF, then a C-STORE
    in the next: the second echo was dropped unanswered (or the association aborted as
    "a command fragment after its command set was complete"). Both are answered now, and
    the association goes on."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, VERIFICATION, [IMPLICIT_VR_LE])]) as r:
        r.send(p_data([(3, 0x03, _echo_command(1)), (3, 0x03, _echo_command(2))]))
        echoes = _answers(r, 2)
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 3))), (1, 0x02, encode(ds, implicit=False))]))
        store = _answers(r, 1)
    assert echoes == [(0x04, 0x0000), (0x04, 0x0000)], echoes
    assert store == [(0x04, 0x0000)], store
    assert _rows(node) == 1


def test_a_store_then_a_command_and_its_data_in_the_next_p_data_are_both_stored(tmp_path, start_node):
    """A C-STORE-RQ whole and the next one's command in one P-DATA-TF, that command's data
    set in the next: the second command was dropped with the rest of the P-DATA, so its
    data set came without a command (aborted, the sender's second object refused for
    nothing). Both are stored now."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x02, encode(a, implicit=False)), (1, 0x03, _command(_store_fields(b, 2)))]))
        r.send(p_data([(1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 2)
    assert answers == [(0x04, 0x0000), (0x04, 0x0000)], answers
    assert _rows(node) == 2


def test_a_second_command_before_the_first_ones_data_set_is_still_aborted(tmp_path, start_node):
    """What the split must not open: a C-STORE-RQ's command, then another command in the
    same P-DATA (the first one's data set was due). Aborted, nothing stored."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x03, _command(_store_fields(b, 2))), (1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 1)
    assert answers in ([], [(0x07, None)]), answers
    assert _rows(node) == 0


# -- PostgreSQL failing while C-STOREs are committed ----------------------------------------
def _storescu_statuses(output: str) -> dict[str, str]:
    """storescu -v: each file sent and the status of its answer ("Success", "Out of
    Resources", ...); a file whose answer never came (the association ended) is absent."""
    import re

    out, current = {}, None
    for line in output.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Received Store Response \(([^)]*)\)", line)
        if m and current is not None:
            out[current] = m.group(1)
            current = None
    return out


def _sop_uid(path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _stored(url: str, data_dir) -> dict[str, bool]:
    """Per SOP Instance UID with a row: whether its spool file is there and matches the
    row's digest."""
    from sqlalchemy import create_engine, text

    from node.spool import matches_digest

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("select sop_instance_uid, path, digest from instances")).all()
    finally:
        engine.dispose()
    return {sop: (data_dir / path).is_file() and matches_digest(data_dir / path, digest) for sop, path, digest in rows}


def test_postgresql_crashing_while_c_stores_are_committed_loses_no_acknowledged_object(tmp_path, start_node):
    """Four dcmtk storescu send 12 objects each at once (their rows share the group
    commit's transactions) while PostgreSQL is crashed (immediate shutdown, every backend
    gone at once) and started again 2 s later (crash recovery). The server runs as
    production runs it: fsync and synchronous_commit on.

    Every object answered Success has its row after the restart and its spool file
    matching the row's digest; every other answer is a failure status (the sender keeps
    it), and sending all of them again afterwards stores each (a row the crash left
    committed without its answer is adopted by the re-send, not refused)."""
    import os
    import subprocess
    import threading
    import time

    from tests import pg
    from tests.conftest import dcmtk_env, make_study, node_config, wait_until

    why = pg.missing()
    if why:
        pytest.skip(why)
    cluster = pg.PostgresCluster(durable=True).start()
    procs: list[subprocess.Popen] = []
    try:
        name = cluster.create_database()
        url = cluster.url(name)
        raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, database_url=url)
        node = start_node(raw, schedule=False)
        port = node.settings.node.port
        folders = [tmp_path / f"send{k}" for k in range(4)]
        files = {k: make_study(folders[k], n=12) for k in range(4)}
        outputs: dict[int, str] = {}

        def send(k: int) -> None:
            proc = subprocess.Popen(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files[k])],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
            procs.append(proc)
            outputs[k] = proc.communicate(timeout=240)[0]

        def rows() -> int:
            try:
                import psycopg

                with psycopg.connect(host="127.0.0.1", port=cluster.port, user=pg.SUPERUSER, dbname=name, connect_timeout=5) as c:
                    return int(c.execute("select count(*) from instances").fetchone()[0])
            except Exception:
                return -1

        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: rows() >= 6, timeout=120, interval=0.02, what="some rows committed")
        cluster.crash()
        time.sleep(2)
        cluster.restart()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a storescu did not end"

        statuses: dict[str, str] = {}
        for k in range(4):
            statuses.update(_storescu_statuses(outputs[k]))
        assert statuses, "storescu printed no answer"
        succeeded = {_sop_uid(p) for p, s in statuses.items() if s == "Success"}
        failed = {_sop_uid(p) for p, s in statuses.items() if s != "Success"}
        stored = _stored(url, node.settings.node.data_dir)
        lost = [uid for uid in succeeded if not stored.get(uid)]
        assert not lost, f"{len(lost)} object(s) answered Success missing from the database or the spool"
        assert failed, "the crash cost no C-STORE a failure: nothing was tested"  # a test that cannot fail otherwise

        # Everything again, one storescu: each object is stored (or stored before) now.
        every = [p for k in range(4) for p in files[k]]
        again = subprocess.run(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, every)],
                               capture_output=True, text=True, env=dcmtk_env(), timeout=240)
        second = _storescu_statuses(again.stdout + again.stderr)
        assert set(second.values()) == {"Success"}, sorted(set(second.values()))
        stored = _stored(url, node.settings.node.data_dir)
        assert len(stored) == len(every) and all(stored.values()), f"{sum(stored.values())} of {len(every)} stored with their files"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.stop()


class _CommitCutter:
    """A TCP proxy on loopback in front of PostgreSQL that, once armed, forwards the next
    COMMIT (a simple Query message, as psycopg sends it) of a transaction that inserted
    into ``instances`` (a C-STORE's row) to the server, lets the server
    commit it, and then closes that connection both ways without forwarding the answer:
    the client cannot know whether its transaction committed (it did)."""

    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.target = port
        self.armed = threading.Event()
        self.cut = 0
        self._stop = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            held = threading.Event()  # set: the server's answers on this connection are never forwarded
            for a, b, watch in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pipe, args=(a, b, watch, (client, upstream), held), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src, dst, watch: bool, pair, held) -> None:
        import re
        import time

        inserted = False  # this transaction inserted a C-STORE's row
        names: set[bytes] = set()  # the INSERT's prepared statement names on this connection
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data or held.is_set():
                    break
                if watch:
                    # psycopg prepares the INSERT (Parse, with a statement name) and binds
                    # it by that name afterwards
                    for m in re.finditer(rb"P....([^\x00]*)\x00INSERT INTO instances ", data, re.S):
                        names.add(m.group(1))
                    inserted = inserted or b"INSERT INTO instances" in data or any(b"B" + n in data or b"\x00" + n + b"\x00" in data for n in names if n)
                if watch and self.COMMIT in data and inserted and self.armed.is_set():
                    self.armed.clear()
                    held.set()  # the server's answer (it committed) is dropped, the connection closed
                    self.cut += 1
                    dst.sendall(data)
                    time.sleep(0.5)
                    break
                if self.COMMIT in data:
                    inserted = False
                dst.sendall(data)
        except OSError:
            pass
        for s in pair:
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        self._threads[0].join(5)


def test_a_commit_whose_answer_is_lost_is_not_answered_success_and_its_resend_is_stored(tmp_path, start_node):
    """The connection to PostgreSQL breaks after the server committed a C-STORE's row but
    before its answer reached the node (a proxy cuts it after forwarding the COMMIT): the
    node cannot know, answers a failure status and removes the file no answer vouched for,
    leaving a row without its file. The sender's re-send must then be stored with its
    file (the row adopts it), never refused as a conflict nor answered Success without a
    file; an object sent next on the same association is stored too."""
    import subprocess

    from tests import pg
    from tests.conftest import dcmtk_env, make_study, node_config

    why = pg.missing()
    if why:
        pytest.skip(why)
    cluster = pg.PostgresCluster(durable=True).start()
    proxy = None
    try:
        name = cluster.create_database()
        proxy = _CommitCutter(cluster.port)
        url = f"postgresql+psycopg://{pg.SUPERUSER}@127.0.0.1:{proxy.port}/{name}"
        raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, database_url=url)
        node = start_node(raw, schedule=False)
        port = node.settings.node.port
        files = make_study(tmp_path / "send", n=3)

        def storescu(paths) -> dict[str, str]:
            r = subprocess.run(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, paths)],
                               capture_output=True, text=True, env=dcmtk_env(), timeout=120)
            return _storescu_statuses(r.stdout + r.stderr)

        assert set(storescu(files[:1]).values()) == {"Success"}
        proxy.armed.set()
        first = storescu(files[1:2])
        assert proxy.cut == 1, "the proxy cut no COMMIT"
        direct = cluster.url(name)
        assert _sop_uid(files[1]) in _stored(direct, node.settings.node.data_dir), "the cut COMMIT did not commit: nothing was tested"
        assert list(first.values()) != ["Success"] or _stored(direct, node.settings.node.data_dir)[_sop_uid(files[1])], "answered Success without its file"
        again = storescu(files[1:])
        assert list(again.values()) == ["Success", "Success"], again
        stored = _stored(direct, node.settings.node.data_dir)
        assert len(stored) == 3 and all(stored.values()), stored
    finally:
        if proxy is not None:
            proxy.close()
        cluster.stop()


# -- limits -------------------------------------------------------------------------------------

@pytest.mark.single_process  # holds the budget of this process
def test_a_big_endian_data_set_is_read_within_the_inflation_budget(tmp_path, start_node):
    """Explicit VR Big Endian (retired) is read whole by pydicom, without the byte walk:
    memory of its size, outside the budget that bounds deflated data sets read into
    memory (1 GiB a process). With the budget held by others (other big endian or deflated
    senders), a big endian C-STORE was still read whole and answered Success; it is
    refused 0xA700 now (the sender tries again) and stored once the budget is free."""
    import subprocess

    from node import scp
    from tests.conftest import dcmtk_env, make_study, node_config

    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    files = make_study(tmp_path / "send", n=2)

    def storescu(path) -> dict[str, str]:
        r = subprocess.run(["/usr/bin/storescu", "-v", "-xb", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), str(path)],
                           capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert "BigEndian" in r.stdout + r.stderr or "Big Endian" in r.stdout + r.stderr, "not sent big endian"
        return _storescu_statuses(r.stdout + r.stderr)

    assert scp._inflating.take(scp.INFLATE_BUDGET)
    try:
        held = storescu(files[0])
    finally:
        scp._inflating.give(scp.INFLATE_BUDGET)
    assert list(held.values()) == ["Refused: OutOfResources"], held
    assert _rows(node) == 0
    assert list(storescu(files[1]).values()) == ["Success"]
    assert scp._inflating.used == 0


class _HostileHTTP:
    """A loopback HTTP server whose every answer is ``mode``: "trickle" (the status line,
    then a header byte every 0.3 s, never ending) or "endless" (200, a multipart body
    that never ends, 1 MiB chunks as fast as they go). Stopped (connections closed) by
    ``close``."""

    def __init__(self, mode: str) -> None:
        import socket
        import threading

        self.mode = mode
        self.stop = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.sent = 0
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        import time

        conn.settimeout(1.0)
        with conn:
            try:
                request = b""
                while not self.stop.is_set():  # the request: its head, then its body (chunked or not)
                    try:
                        data = conn.recv(1 << 20)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    request += data
                    head, _, body = request.partition(b"\r\n\r\n")
                    if not _:
                        continue
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
                    if (length is not None and len(body) >= length) or body.endswith(b"0\r\n\r\n") or (length is None and b"chunked" not in head.lower()):
                        break
                if self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    while not self.stop.is_set():
                        conn.sendall(b"X")
                        self.sent += 1
                        time.sleep(0.3)
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; type=\"application/dicom+xml\"; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
                    chunk = b"x" * (1 << 20)
                    while not self.stop.is_set():
                        conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                        self.sent += len(chunk)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self._accepter.join(5)
        self.server.close()


def _stow_outcome(port: int, tmp_path, within_s: float) -> list:
    """One object sent by the node's STOW-RS sender to ``port`` (per-read timeout 1 s):
    the outcomes reported within ``within_s`` seconds (empty: still waiting)."""
    import threading

    from node.config import Destination
    from node.scu import DicomWebSender, Work
    from tests.conftest import make_study

    path = make_study(tmp_path / "out", n=1)[0]
    dest = Destination(name="web", kind="dicomweb", url=f"http://127.0.0.1:{port}/dicom-web", timeout_s=1.0)
    outcomes: list = []
    sender = DicomWebSender(dest)
    t = threading.Thread(target=sender.send, args=([Work(1, path, CT_IMAGE_STORAGE, EXPLICIT_VR_LE)], lambda w, o: outcomes.append(o)), daemon=True)
    t.start()
    t.join(within_s)
    return list(outcomes)  # as they were then (closing the server ends a waiting sender too)


def test_a_stow_rs_answer_trickled_a_byte_at_a_time_is_cut_at_its_deadline(tmp_path):
    """A destination that answers STOW-RS a header byte every 0.3 s (each read within the
    1 s timeout) held the sender for as long as it went on: requests' timeout bounds
    each read, not the answer. The whole exchange now has a deadline (4 per-read
    timeouts, plus the upload at 64 KiB/s): the object is retried, nothing taken for
    sent."""
    server = _HostileHTTP("trickle")
    try:
        outcomes = _stow_outcome(server.port, tmp_path, within_s=20)
    finally:
        server.close()
    assert outcomes, f"the sender still waited after 20 s ({server.sent} bytes trickled)"
    assert [o.kind for o in outcomes] == ["retry"] and "AnswerTooSlow" in outcomes[0].reason, outcomes


def test_an_endless_stow_rs_answer_is_not_read_whole(tmp_path):
    """A destination answering STOW-RS 200 with a body that never ends: requests read it
    whole into memory (dicomweb-client asks for it), gigabytes in a minute on loopback.
    Now at most 16 MiB are read: retried, nothing taken for sent."""
    server = _HostileHTTP("endless")
    try:
        outcomes = _stow_outcome(server.port, tmp_path, within_s=20)
        sent = server.sent
    finally:
        server.close()
    assert outcomes, f"the sender still read after 20 s ({sent >> 20} MiB sent to it)"
    assert [o.kind for o in outcomes] == ["retry"] and "AnswerTooLarge" in outcomes[0].reason, outcomes
    assert sent < 64 << 20, f"{sent >> 20} MiB read"


def test_a_health_probe_trickled_a_byte_at_a_time_ends(tmp_path):
    """The health probe (QIDO-RS, every interval_s, and `config check --destinations`)
    against a server trickling its headers: it ends within its deadline, unreachable."""
    import threading

    from node.config import Destination
    from node.health import probe

    server = _HostileHTTP("trickle")
    try:
        dest = Destination(name="web", kind="dicomweb", url=f"http://127.0.0.1:{server.port}/dicom-web")
        result: list = []
        t = threading.Thread(target=lambda: result.append(probe(dest, "CASEMASK", timeout_s=1.0, stow=False)), daemon=True)
        t.start()
        t.join(20)
        result = list(result)  # as it was then (closing the server ends a waiting probe too)
    finally:
        server.close()
    assert result, "the probe still waited after 20 s"
    assert not result[0].reachable, result[0]


def _with_items(n: int, item: bytes = b"") -> tuple[Dataset, bytes]:
    """A synthetic RT Structure Set and its data set (explicit VR little endian) with a
    ROI Contour Sequence of ``n`` defined-length items holding ``item`` each."""
    ds = _ct()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.Modality = "RTSTRUCT"
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel", "PixelRepresentation", "PhotometricInterpretation", "PixelData"):
        delattr(ds, kw)
    one = struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
    seq = struct.pack("<HH2sHI", 0x3006, 0x0039, b"SQ", 0, 0xFFFFFFFF) + one * n + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return ds, encode(ds, implicit=False) + seq  # (3006,0039) after every element _ct() has


def _store_rtstruct(port: int, ds: Dataset, data: bytes) -> int | None:
    from tests.rawdicom import Raw, associate_rq, c_store_pdus

    rtstruct = "1.2.840.10008.5.1.4.1.1.481.3"
    fields = _store_fields(ds, 1) | {"AffectedSOPClassUID": rtstruct}
    with Raw(port, timeout=60) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, rtstruct, [EXPLICIT_VR_LE])], max_pdu=1 << 20))
        assert r.read_pdu()[0] == 0x02
        for pdu in c_store_pdus(_command(fields), data, fragment=1 << 19):
            r.send(pdu)
        got = r.read_pdu()
    return store_status(got[1]) if got and got[0] == 0x04 else None


def test_a_data_set_of_many_empty_sequence_items_is_refused_at_the_edge(tmp_path, start_node):
    """200 000 empty sequence items (1.6 MB) passed the edge and cost the worker's pydicom
    5.3 s of CPU and 132 MB; 1M items (7.8 MB) 23.5 s and 659 MB (measured): within the
    default max_object_mb of 4096, one object could take the worker's memory many times
    over, again after each crash. More than 10 000 items of fewer than 32 bytes on
    average (or more than 1M items) are refused 0xC210, nothing stored; 20 000 items of
    a real element each (a Referenced SOP Instance UID) are stored."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds, data = _with_items(200_000)
    status = _store_rtstruct(port, ds, data)
    assert status == 0xC210, f"answered {status!r}"
    assert _rows(node) == 0
    uid = b"1.2.826.0.1.3680043.8.498.12345678901234567890123456789012\x00"
    element = struct.pack("<HH2sH", 0x0008, 0x1155, b"UI", len(uid)) + uid
    ds, data = _with_items(20_000, element)
    status = _store_rtstruct(port, ds, data)
    assert status == 0x0000, f"answered {status!r}"
    assert _rows(node) == 1


def test_the_item_limits_hold_for_big_endian_too(tmp_path):
    """Big endian data sets are not walked (pydicom reads them): their item tags are
    counted as bytes first."""
    import io

    from node.wire import item_tags_problem

    empty = b"\xff\xfe\xe0\x00\x00\x00\x00\x00"
    assert "fewer than 32 bytes" in item_tags_problem(io.BytesIO(empty * 200_000), 8 * 200_000)
    padded = (empty[:4] + struct.pack(">I", 56) + b"\x00" * 56) * 20_000
    assert item_tags_problem(io.BytesIO(padded), len(padded)) == ""
    # a tag cut by the 1 MiB read boundary is counted once
    straddling = b"\x00" * ((1 << 20) - 2) + empty + b"\x00" * 64
    from node import wire

    saved = wire.DENSE_ITEMS_FREE, wire.MIN_ITEM_BYTES
    try:
        wire.DENSE_ITEMS_FREE, wire.MIN_ITEM_BYTES = 0, 1 << 21
        assert item_tags_problem(io.BytesIO(straddling), len(straddling))
        assert not item_tags_problem(io.BytesIO(b"\x00" * len(straddling)), len(straddling))
    finally:
        wire.DENSE_ITEMS_FREE, wire.MIN_ITEM_BYTES = saved


def test_sqlite_on_a_full_disk_answers_no_c_store_success_it_did_not_keep(tmp_path, start_node):
    """The database (SQLite) on a file system of its own, filled up while the spool still
    has room: each C-STORE answered Success must be in the database once there is room
    again (read by another connection, the WAL included) with its spool file; the others
    were answered a failure status; sent again after, every object is stored."""
    import os
    import sqlite3
    import subprocess

    from node.spool import matches_digest
    from tests.conftest import dcmtk_env, make_study, node_config

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "db"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, database_url=f"sqlite:///{mnt}/casemask.db")
        node = start_node(raw, schedule=False)
        port = node.settings.node.port
        files = make_study(tmp_path / "send", n=40)

        def store(path) -> str:
            r = subprocess.run(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), str(path)],
                               capture_output=True, text=True, env=dcmtk_env(), timeout=120)
            return _storescu_statuses(r.stdout + r.stderr).get(str(path), "no answer")

        assert store(files[0]) == "Success"
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)  # the database's file system full
        try:
            while os.write(fd, b"\0" * 4096) == 4096:
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        answers = {p: store(p) for p in files[1:]}
        refused = [p for p, a in answers.items() if a != "Success"]
        assert refused, "every C-STORE answered Success on a full disk: nothing was tested"
        assert all(a.startswith("Refused") or a.startswith("Failed") or a == "no answer" for p, a in answers.items() if p in refused), set(answers.values())
        (mnt / "filler").unlink()

        def rows() -> dict[str, bool]:
            with sqlite3.connect(mnt / "casemask.db") as db:
                found = db.execute("select sop_instance_uid, path, digest from instances").fetchall()
            data = node.settings.node.data_dir
            return {sop: (data / path).is_file() and matches_digest(data / path, digest) for sop, path, digest in found}

        kept = rows()
        acknowledged = [_sop_uid(files[0])] + [_sop_uid(p) for p, a in answers.items() if a == "Success"]
        lost = [uid for uid in acknowledged if not kept.get(uid)]
        assert not lost, f"{len(lost)} object(s) answered Success missing from the database or the spool"
        assert [store(p) for p in refused] == ["Success"] * len(refused)
        kept = rows()
        assert len(kept) == len(files) and all(kept.values()), f"{sum(kept.values())} of {len(files)} stored with their files"
    finally:  # lazily: the node (stopped at teardown, after this) still holds the database open
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
