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
