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

from tests.conftest import child_pids, make_study, needs_dcmtk, wait_until
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
