"""Where the node's CPU goes per received object, step by step, under several senders.

    python tests/bench/cpu_steps_ingest.py [--instances 300] [--senders 4] [--node KEY=VALUE ...]

Runs a node in this process (``receivers = 1``, listening only: no scheduler), wraps the
steps below with ``time.thread_time_ns`` (the CPU time of the thread that runs them,
user + system, not the wall time), sends the corpus with ``--senders`` dcmtk storescu at
once, and prints microseconds of CPU per object for each step, and for each thread in
all (read from /proc at its end). Steps nest (indented: part of the line above).

DUL thread (one per association): ``_wait`` (node.reactor's poll), ``_is_transport_event``
(pynetdicom's select, then reading and decoding a PDU), ``do_action`` (the state
machine: a P-DATA handed to the DIMSE layer, ``receive_primitive``, or the response
sent, ``_send``); in ``receive_primitive``: making the incoming file
(``IncomingFile.__init__``) and writing a fragment into it (``IncomingFile.write``).
With node.pdatafast (the P-DATA fast path), its ``read_event``, ``_read_pdu`` and
``deliver`` are counted on the lines of what they stand in for (``_is_transport_event``,
``_read_pdu_data``, ``do_action``). Association thread: the node's C-STORE handler (``StoreHandler.__call__``), in it
placing the file (``_Placing.__init__``: flush, link, fsyncs handed to spool threads),
the row's group commit (``GroupCommit.record``: hand-off and wait), waiting for the
fsyncs (``_Placing.outcome``); pynetdicom's ``send_msg``; waiting for the next message
(``wait_for_message``). Committer thread: ``GroupCommit._commit``. Spool threads: the
data's fsync (``IncomingFile.sync``) and the folder's (``fsync_dir``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_ingest import _setting, send  # noqa: E402
from tests.conftest import make_study, node_config  # noqa: E402

_cpu: collections.Counter[str] = collections.Counter()
_calls: collections.Counter[str] = collections.Counter()
_threads: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def _timed(name: str, fn):
    def wrapped(*a, **kw):
        t0 = time.thread_time_ns()
        try:
            return fn(*a, **kw)
        finally:
            dt = time.thread_time_ns() - t0
            with _lock:
                _cpu[name] += dt
                _calls[name] += 1

    wrapped.__wrapped__ = fn
    return wrapped


def _thread_total(kind: str, fn):
    """Wrap a thread's body: its whole CPU time is added to ``kind`` when it ends."""

    def wrapped(*a, **kw):
        try:
            return fn(*a, **kw)
        finally:
            with _lock:
                _threads[kind] += time.thread_time_ns()

    return wrapped


STEPS = [
    ("DUL", "_wait (poll)"),
    ("DUL", "_is_transport_event"),
    ("DUL", "  _read_pdu_data (recv + decode PDU)"),
    ("DUL", "do_action (state machine)"),
    ("DUL", "  receive_primitive (DIMSE)"),
    ("DUL", "    IncomingFile.__init__"),
    ("DUL", "    IncomingFile.write"),
    ("DUL", "  _send (response to the socket)"),
    ("assoc", "StoreHandler.__call__"),
    ("assoc", "  _check_received"),
    ("assoc", "  invalid_uids"),
    ("assoc", "  _read (scan the data set)"),
    ("assoc", "  _identity"),
    ("assoc", "  log_id"),
    ("assoc", "  spool_path"),
    ("assoc", "  row_path"),
    ("assoc", "  observe_received"),
    ("assoc", "  on_stored"),
    ("assoc", "  IncomingFiles.take"),
    ("assoc", "  IncomingFile.discard"),
    ("assoc", "  _one_at_a_time"),
    ("assoc", "  _Placing.__init__"),
    ("assoc", "  GroupCommit.record"),
    ("assoc", "  _Placing.outcome"),
    ("assoc", "send_msg"),
    ("assoc", "wait_for_message"),
    ("commit", "GroupCommit._commit"),
    ("spool", "IncomingFile.sync"),
    ("spool", "fsync_dir"),
]


def instrument() -> None:
    """Wrap the steps of the module docstring (after the node installed its hooks)."""
    from pynetdicom import association, dimse, dul, fsm

    from node import groupcommit, incoming, reactor, scp

    try:
        from node import pdatafast
    except ImportError:  # a tree before the P-DATA fast path
        pdatafast = None

    reactor._wait = _timed("_wait (poll)", reactor._wait)
    dul.DULServiceProvider._is_transport_event = _timed("_is_transport_event", dul.DULServiceProvider._is_transport_event)
    dul.DULServiceProvider._read_pdu_data = _timed("  _read_pdu_data (recv + decode PDU)", dul.DULServiceProvider._read_pdu_data)
    fsm.StateMachine.do_action = _timed("do_action (state machine)", fsm.StateMachine.do_action)
    dimse.DIMSEServiceProvider.receive_primitive = _timed("  receive_primitive (DIMSE)", dimse.DIMSEServiceProvider.receive_primitive)
    incoming.IncomingFile.__init__ = _timed("    IncomingFile.__init__", incoming.IncomingFile.__init__)
    incoming.IncomingFile.write = _timed("    IncomingFile.write", incoming.IncomingFile.write)
    if getattr(pdatafast, "ENABLED", False):  # the P-DATA fast path: counted on the same lines
        pdatafast.read_event = _timed("_is_transport_event", pdatafast.read_event)
        pdatafast._read_pdu = _timed("  _read_pdu_data (recv + decode PDU)", pdatafast._read_pdu)
        pdatafast.deliver = _timed("do_action (state machine)", pdatafast.deliver)
    dul.DULServiceProvider._send = _timed("  _send (response to the socket)", dul.DULServiceProvider._send)
    scp.StoreHandler.__call__ = _timed("StoreHandler.__call__", scp.StoreHandler.__call__)
    scp._Placing.__init__ = _timed("  _Placing.__init__", scp._Placing.__init__)
    scp.StoreHandler._check_received = _timed("  _check_received", scp.StoreHandler._check_received)
    scp.invalid_uids = _timed("  invalid_uids", scp.invalid_uids)
    scp.StoreHandler._read = _timed("  _read (scan the data set)", scp.StoreHandler._read)
    scp._identity = _timed("  _identity", scp._identity)
    scp.Pseudonymizer.log_id = _timed("  log_id", scp.Pseudonymizer.log_id)
    scp.spool_path = _timed("  spool_path", scp.spool_path)
    scp.row_path = _timed("  row_path", scp.row_path)
    scp.metrics.observe_received = _timed("  observe_received", scp.metrics.observe_received)
    incoming.IncomingFiles.take = _timed("  IncomingFiles.take", incoming.IncomingFiles.take)
    incoming.IncomingFile.discard = _timed("  IncomingFile.discard", incoming.IncomingFile.discard)
    one = scp.StoreHandler._one_at_a_time

    @contextlib.contextmanager
    def _one(self, sop_uid):  # the lock's taking and release, not what runs inside it
        t0 = time.thread_time_ns()
        with one(self, sop_uid):
            t1 = time.thread_time_ns()
            yield
            t2 = time.thread_time_ns()
        with _lock:
            _cpu["  _one_at_a_time"] += t1 - t0 + time.thread_time_ns() - t2
            _calls["  _one_at_a_time"] += 1

    scp.StoreHandler._one_at_a_time = _one
    groupcommit.GroupCommit.record = _timed("  GroupCommit.record", groupcommit.GroupCommit.record)
    scp._Placing.outcome = _timed("  _Placing.outcome", scp._Placing.outcome)
    dimse.DIMSEServiceProvider.send_msg = _timed("send_msg", dimse.DIMSEServiceProvider.send_msg)
    reactor.wait_for_message = _timed("wait_for_message", reactor.wait_for_message)
    groupcommit.GroupCommit._commit = _timed("GroupCommit._commit", groupcommit.GroupCommit._commit)
    incoming.IncomingFile.sync = _timed("IncomingFile.sync", incoming.IncomingFile.sync)
    scp.fsync_dir = _timed("fsync_dir", scp.fsync_dir)
    dul.DULServiceProvider.run_reactor = _thread_total("DUL thread (all)", dul.DULServiceProvider.run_reactor)
    association.Association.run = _thread_total("association thread (all)", association.Association.run)


def _store_handlers():
    import gc

    from node import scp

    return [o for o in gc.get_objects() if isinstance(o, scp.StoreHandler)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300, help="objects per sender")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from node.app import Node
    from node.config import parse

    total = args.instances * args.senders
    with tempfile.TemporaryDirectory(prefix="casemask-cpu-steps-") as tmp:
        work = Path(tmp)
        corpora = [work / f"in{s}" for s in range(args.senders)]
        for c in corpora:
            make_study(c, args.instances)
        raw = node_config(work / "node", [{"name": "f", "kind": "folder", "path": str(work / "out")}], stable_after_s=86400, **{k: _setting(v) for k, v in (kv.split("=", 1) for kv in args.node)})
        node = Node(parse(raw, "bench", base_dir=work))
        node.start_listening(1)
        try:
            instrument()
            for h in _store_handlers():
                if h.on_stored is not None:
                    h.on_stored = _timed("  on_stored", h.on_stored)
            c0 = time.process_time()
            dt = send(raw["node"]["port"], corpora, "CASEMASK")
            time.sleep(0.5)  # the association threads end
            cpu = time.process_time() - c0
        finally:
            node.stop()
    print(f"{args.senders} sender(s) x {args.instances}: {total / dt:.1f}/s; process CPU {cpu * 1e6 / total:.0f} us per object (the wrappers included); load average {os.getloadavg()[0]:.1f}")
    print(f"{'thread':7s} {'step':40s} {'us/object':>9s} {'calls/object':>12s}")
    for kind, name in STEPS:
        print(f"{kind:7s} {name:40s} {_cpu[name] / 1000 / total:9.1f} {_calls[name] / total:12.2f}")
    for name, ns in _threads.items():
        print(f"{'':7s} {name:40s} {ns / 1000 / total:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
