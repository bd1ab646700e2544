"""A hostile DICOM sender and a frozen receiver against a running ``casemask serve``
(docs/security.md, "Sixth attack"): silent connections from many addresses, a receiver
that was frozen and came back, a spool that cannot be written."""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import child_pids, make_study, needs_dcmtk, wait_until
from tests.test_tls import pki  # noqa: F401  (fixture)
from tests.test_attack_ingest import _flood, _rows_file, _serve, _sockets_to, _storescu


# -- 1. silent connections from many addresses ------------------------------------------------
@needs_dcmtk
def test_silent_connections_from_many_addresses_do_not_crowd_out_a_sender(tmp_path):
    """``max_associations = 4``, ``max_associations_per_host = 2``: the TCP gate keeps at
    most 8 connections open (4 per address). 8 addresses (127.0.0.2-9) open 6 connections
    each that never send an A-ASSOCIATE-RQ (48, of which the gate keeps 8), and go on
    opening one every 20 ms while storescu runs from 127.0.0.1. Every kept connection was
    silent, so storescu's was closed at once: a silent flood from a few addresses shut
    every sender out for ``acse_timeout_s`` at a time. Now a connection beyond the gate's
    total closes the oldest silent one of the address holding the most, and storescu
    (whose A-ASSOCIATE-RQ follows its connect at once) is stored."""
    node, raw = _serve(tmp_path, "silent", receivers=1, acse_timeout_s=60.0, max_associations=4, max_associations_per_host=2)
    port = raw["node"]["port"]
    files = make_study(tmp_path / "in", 1)
    node.start(port)
    flood: list[socket.socket] = []
    stop = threading.Event()

    def keep_flooding() -> None:
        i = 0
        while not stop.wait(0.02) and i < 1000:
            flood.extend(_flood(port, 1, f"127.0.0.{2 + i % 8}"))
            i += 1

    churn = threading.Thread(target=keep_flooding, daemon=True)
    try:
        for a in range(8):
            flood.extend(_flood(port, 6, f"127.0.0.{2 + a}"))
        wait_until(lambda: _sockets_to(port, node.proc.pid) >= 6, timeout=20, what="the gate to hold the silent connections")  # type: ignore[union-attr]
        churn.start()
        r = _storescu(port, files[0], 10)
        assert r.returncode == 0, r.stderr
        assert _rows_file(raw) == 1
        assert _sockets_to(port, node.proc.pid) >= 4, "the flood was closed wholesale"  # type: ignore[union-attr]
    finally:
        stop.set()
        churn.join(10) if churn.is_alive() else None
        for s in flood:
            s.close()
        node.stop()



@needs_dcmtk
def test_silent_tls_handshakes_from_many_addresses_do_not_crowd_out_a_sender(tmp_path, start_node, pki):
    """With ``[node.tls]``: 8 addresses open 6 connections each to the TLS port and send
    no ClientHello. The TCP gate (shared by both ports) keeps 8 of them, each for up to
    ``acse_timeout_s`` while its handshake waits. storescu on the *plain* port was
    closed at once (the gate could close only silent associations to make room, and a
    connection in its TLS handshake is not one yet); now the oldest handshake of the
    busiest address gives way (node.admission, ``handshake``)."""
    from tests.test_tls import tls_node

    node = tls_node(tmp_path, start_node, pki, acse_timeout_s=60.0, max_associations=4, max_associations_per_host=2)
    tls_port, port = node.settings.node.tls.port, node.settings.node.port
    files = make_study(tmp_path / "in", 1)
    flood: list[socket.socket] = []
    try:
        for a in range(8):
            flood.extend(_flood(tls_port, 6, f"127.0.0.{2 + a}"))
        wait_until(lambda: _sockets_to(tls_port, os.getpid()) >= 6, timeout=20, what="the gate to hold the handshakes")
        r = _storescu(port, files[0], 10)
        assert r.returncode == 0, r.stderr
    finally:
        for s in flood:
            s.close()



def test_a_connect_flood_from_one_address_is_not_a_log_flood(tmp_path):
    """300 connections from one address, held open, with ``max_associations_per_host =
    2`` (the TCP gate keeps 4): each of the 296 closed at once wrote a WARNING line, so
    a peer connecting in a loop wrote the node's log as fast as it connects; now one
    line a second per address, the next saying how many were left out, like the
    rejected associations' lines."""
    node, raw = _serve(tmp_path, "connflood", receivers=1, acse_timeout_s=60.0, max_associations_per_host=2)
    port = raw["node"]["port"]
    node.start(port)
    flood: list[socket.socket] = []
    try:
        flood += _flood(port, 300, "127.0.0.2")
        wait_until(lambda: node.logpath.read_text().count("closed at once") >= 5 or _sockets_to(port, node.proc.pid) >= 4, timeout=20, what="the gate to act")  # type: ignore[union-attr]
        time.sleep(2)
        lines = node.logpath.read_text().count("closed at once")
        assert lines <= 5, f"{lines} log lines for one address's connect flood of 300"
    finally:
        for s in flood:
            s.close()
        node.stop()


# -- 2. a receiver that was frozen and came back ------------------------------------------------
def _connect_held(port: int, source: str, holders: list[int], before: int) -> socket.socket:
    """One silent connection from ``source``; returns once one of ``holders`` (pids) holds
    ``before`` + 1 accepted sockets in all."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    wait_until(lambda: sum(_sockets_to(port, p) for p in holders) > before, timeout=20, what=f"the connection from {source} to be accepted")
    return s


def _board(pid: int) -> list[tuple[int, ...]]:
    """The accept board's records (node.sharedport), read through process ``pid``'s
    descriptor of it: (process id, connections open, times written) per place."""
    from node.sharedport import _RECORD

    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if "casemask-accept-board" in os.readlink(fd):
                data = fd.read_bytes()
                return [_RECORD.unpack_from(data, i) for i in range(0, len(data), _RECORD.size)]
        except OSError:
            continue
    raise AssertionError("no accept board")


def _state(pid: int) -> str:
    """The process's state letter (Linux /proc): "T" once a SIGSTOP took effect."""
    return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]


def _probe(port: int, source: str, main: int, receiver: int, stopped_s: float = 0.0) -> bool:
    """One silent connection, closed once accepted; whether the receiver took it.
    ``stopped_s``: the receiver is stopped when the connection comes and let go that
    many seconds later (less than the board's 0.1 s wait)."""
    if stopped_s:
        os.kill(receiver, signal.SIGSTOP)
        wait_until(lambda: _state(receiver) == "T", timeout=10, what="the receiver to stop")
    try:
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        time.sleep(stopped_s)
    finally:
        if stopped_s:
            os.kill(receiver, signal.SIGCONT)
    wait_until(lambda: sum(_sockets_to(port, p) for p in (main, receiver)) > 12, timeout=20, what=f"the connection from {source} to be accepted")
    took = _sockets_to(port, receiver) > 0
    s.close()
    wait_until(lambda: sum(_sockets_to(port, p) for p in (main, receiver)) == 12, timeout=20, what="the probe to be closed")
    return took


@needs_dcmtk
def test_a_receiver_frozen_once_takes_connections_again_once_it_moves(tmp_path):
    """receivers = 2. The receiver is stopped (SIGSTOP) while 12 silent connections come
    in and stay: the node process takes them all and, once a connection waited the
    board's full 0.1 s for the frozen receiver, passes it over. The receiver is let go
    (SIGCONT) and accepts a connection (by the race on accept), which is closed: it is
    live again, holding 0 against the node process's 12. Then, 8 times: a connection
    comes while the receiver is stopped for 0.02 s; the node process leaves it to the
    receiver, which takes it once let go. Before, the board compared the receiver's
    count with the one it was passed over at: back at 0 after its connection closed, it
    was passed over again, and the node process took every one of the 8 at once."""
    node, raw = _serve(tmp_path, "thaw", receivers=2, acse_timeout_s=120.0)
    port = raw["node"]["port"]
    node.start(port)
    main = node.proc.pid  # type: ignore[union-attr]
    (receiver,) = child_pids(main)
    held: list[socket.socket] = []
    try:
        # the start's own check that the port answers may still be open in the receiver
        wait_until(lambda: _sockets_to(port, main) + _sockets_to(port, receiver) == 0, timeout=20, what="no connection open")
        time.sleep(0.5)
        os.kill(receiver, signal.SIGSTOP)
        try:
            wait_until(lambda: _state(receiver) == "T", timeout=10, what="the receiver to stop")
            for i in range(12):
                held.append(_connect_held(port, f"127.0.1.{i + 1}", [main], i))
        finally:
            os.kill(receiver, signal.SIGCONT)
        took, source = 0, iter(f"127.0.{2 + n // 250}.{1 + n % 250}" for n in range(2000))
        for _ in range(8):
            # live again: it accepted a connection since (by the race on accept), now closed
            if not any(_probe(port, next(source), main, receiver) for _ in range(40)):
                raise AssertionError("the thawed receiver accepted none of 40 connections")
            took += _probe(port, next(source), main, receiver, stopped_s=0.02)
        assert took >= 5, f"the receiver took {took} of 8 connections left to it (the node process held 12, it 0)"
    finally:
        for s in held:
            s.close()
        node.stop()


# -- 3. a spool that cannot be written -----------------------------------------------------------
@needs_dcmtk
def test_a_disk_that_refuses_writes_logs_one_line_not_one_per_c_store(tmp_path):
    """``min_free_disk_mb = 0`` (the floor off) and every write of the node refused by the
    kernel (RLIMIT_FSIZE of 1 byte: EFBIG, as a full disk's ENOSPC): 20 objects sent by
    storescu are each answered 0xA700 (never Success, nothing stored), and the node logs
    one ERROR line for them. Each refusal wrote an ERROR line, a log flood for as long as
    the disk stayed full."""
    from tests.conftest import ROOT, STORESCU, dcmtk_env, node_config, port_listens, write_toml
    import subprocess
    import sys

    raw = node_config(tmp_path / "full", [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, receivers=1, min_free_disk_mb=0)
    Path(raw["node"]["data_dir"]).mkdir(parents=True, exist_ok=True)
    port = raw["node"]["port"]
    files = make_study(tmp_path / "in", 20)
    # the log goes to a pipe: the file-size limit would refuse a log file's growth too
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(write_toml(raw, tmp_path / "full.toml"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any(" started (id " in x for x in lines) and port_listens(port), timeout=120, what="the node to start")
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
        r = subprocess.run([STORESCU, "-v", "-nh", "-ta", "20", "-to", "20", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)],
                           env=dcmtk_env(), capture_output=True, text=True, timeout=120)
        assert (r.stdout + r.stderr).count("(Refused: OutOfResources)") == 20, (r.stdout + r.stderr)[-3000:]
        wait_until(lambda: any("-> 0xA700" in x for x in lines), timeout=20, what="the refusal's log line")
        time.sleep(1)
        refused = [x for x in lines if "-> 0xA700" in x]
        assert len(refused) == 1, f"{len(refused)} log lines for 20 refused C-STOREs"
        assert " ERROR node.scp: C-STORE " in refused[0]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        reader.join(10)


def test_write_failures_left_out_are_counted_in_the_next_line(monkeypatch, caplog):
    """The line after a minute says how many refusals like it were not logged."""
    from node import admission, scp

    now = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(scp, "_WRITE_FAILURES", admission.RejectionRecord(every_s=60.0))
    caplog.set_level("ERROR", logger="node.scp")
    for _ in range(5):
        scp._write_failed("C-STORE from %s: cannot write the incoming file (%s) -> 0xA700", "STORESCU", "EFBIG")
    now[0] += 61
    scp._write_failed("C-STORE from %s: cannot write the incoming file (%s) -> 0xA700", "STORESCU", "EFBIG")
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["C-STORE from STORESCU: cannot write the incoming file (EFBIG) -> 0xA700",
                      "C-STORE from STORESCU: cannot write the incoming file (EFBIG) -> 0xA700 (4 more like it since the last such line not logged)"]
