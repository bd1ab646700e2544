"""A hostile DICOM sender: what the node's edge keeps counting after a connection it
could not serve."""

from __future__ import annotations

import socket
import threading
import time

from tests.test_attack_edge4 import _folder_node, _raw_store_ok


def test_a_connection_whose_thread_cannot_start_leaves_the_tcp_gate(tmp_path, start_node, monkeypatch):
    """When the thread for an accepted connection could not start (``RuntimeError: can't
    start new thread``: a flood, or the process's thread limit), socketserver closed the
    connection but the TCP gate still counted it as connecting, for good: after
    2 x max_associations_per_host such failures (16 by default), every later connection
    from that host was closed at once, a real sender's too. The connection now leaves
    the count when its thread cannot start."""
    from node import scp

    node = _folder_node(tmp_path, start_node, max_associations_per_host=2)
    port = node.settings.node.port
    real_start = threading.Thread.start
    failed = []

    def start(self):
        if getattr(self, "_target", None) is not None and getattr(self._target, "__func__", None) is scp.EdgeServer.process_request_thread:
            failed.append(1)
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    for _ in range(12):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            try:
                s.recv(1)  # closed by the node
            except OSError:
                pass
    deadline = time.monotonic() + 10
    while len(failed) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert len(failed) == 12, "every connection's thread failed to start"
    # socketserver closed each one; none may still count as connecting (a socket's id is
    # reused once it is freed, so the stale entries grow slower than the failures)
    assert not node.server.admission._connecting, "closed connections still counted at the TCP gate"
    assert _raw_store_ok(port), "a sender's connection after the failures is served"
