"""Where the wall time of one C-STORE goes, one sender: from the socket read of the
request's last P-DATA to the C-STORE-RSP on the wire, step by step.

    python tests/bench/latency_ingest.py [--instances 300] [--node KEY=VALUE ...]

Runs a node in this process (``receivers = 1``, listening only: no scheduler), wraps the
points below with ``time.perf_counter_ns`` stamps (the wrappers cost a few microseconds
each), sends the corpus with one dcmtk storescu, and prints per step the median, p90 and
mean in microseconds over the objects (the first 20 left out: warm-up):

    read      DUL thread: ``_read_pdu_data`` of the PDU that completes the message starts
    decoded   DUL thread: ``receive_primitive`` of it returned (command decoded, data written)
    handler   association thread: the node's C-STORE handler starts
    placed    handler: checks done, file flushed and linked, fsyncs submitted
    recorded  handler: the row's group commit returned
    durable   handler: the data and folder fsyncs returned
    returned  handler returns its status
    send_msg  pynetdicom's service calls ``send_msg`` with the response
    wire      DUL thread: the response's P-DATA handed to the socket
    next      the next request's first PDU is read (the sender's turn, not the node's)

Besides: how long the committer's transaction took (``commit``; ``sqlite commit``: the
COMMIT alone, every connection of the process), and the spool threads'
fsyncs (``fsync data``, ``fsync dir``), each from its own start to its own end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_ingest import _setting, send  # noqa: E402
from tests.conftest import make_study, node_config  # noqa: E402

_events: list[tuple[str, int]] = []
_spans: dict[str, list[int]] = {}
_local = threading.local()


def _mark(name: str, t: int | None = None) -> None:
    _events.append((name, time.perf_counter_ns() if t is None else t))


def _span(name: str, fn):
    def wrapped(*a, **kw):
        t0 = time.perf_counter_ns()
        try:
            return fn(*a, **kw)
        finally:
            _spans.setdefault(name, []).append(time.perf_counter_ns() - t0)

    return wrapped


def instrument() -> None:
    """Wrap the points named in the module docstring (after the node installed its hooks)."""
    from pynetdicom import dimse, dul, transport
    from sqlalchemy.engine import default

    from node import groupcommit, incoming, scp

    read = dul.DULServiceProvider._read_pdu_data

    def _read_pdu_data(self):
        _local.read = time.perf_counter_ns()
        if getattr(_local, "first_of_next", False):
            _mark("next", _local.read)
            _local.first_of_next = False
        return read(self)

    dul.DULServiceProvider._read_pdu_data = _read_pdu_data
    recv = dimse.DIMSEServiceProvider.receive_primitive

    def receive_primitive(self, primitive):
        out = recv(self, primitive)
        if self.message is None:  # a message completed
            _mark("read", _local.read)
            _mark("decoded")
        return out

    dimse.DIMSEServiceProvider.receive_primitive = receive_primitive
    call = scp.StoreHandler.__call__

    def handler(self, event):
        _mark("handler")
        try:
            return call(self, event)
        finally:
            _mark("returned")

    scp.StoreHandler.__call__ = handler
    placing_init = scp._Placing.__init__

    def placing(self, *a, **kw):
        placing_init(self, *a, **kw)
        _mark("placed")

    scp._Placing.__init__ = placing
    record = groupcommit.GroupCommit.record

    def record_(self, received):
        _mark("to committer")
        try:
            return record(self, received)
        finally:
            _mark("recorded")

    groupcommit.GroupCommit.record = record_
    outcome = scp._Placing.outcome

    def outcome_(self):
        try:
            return outcome(self)
        finally:
            _mark("durable")

    scp._Placing.outcome = outcome_
    send_msg = dimse.DIMSEServiceProvider.send_msg

    def send_msg_(self, primitive, context_id):
        _mark("send_msg")
        return send_msg(self, primitive, context_id)

    dimse.DIMSEServiceProvider.send_msg = send_msg_
    sock_send = transport.AssociationSocket.send

    def sock_send_(self, data):
        out = sock_send(self, data)
        if data[:1] == b"\x04":
            _mark("wire")
            _local.first_of_next = True
        return out

    transport.AssociationSocket.send = sock_send_
    commit = groupcommit.GroupCommit._commit

    def commit_(self, conn, batch):
        _mark("commit starts")
        try:
            return commit(self, conn, batch)
        finally:
            _mark("commit ends")

    groupcommit.GroupCommit._commit = _span("commit", commit_)
    groupcommit.queue.record_received = _span("record_received (SQL)", groupcommit.queue.record_received)
    default.DefaultDialect.do_commit = _span("sqlite commit", default.DefaultDialect.do_commit)
    incoming.IncomingFile.sync = _span("fsync data", incoming.IncomingFile.sync)
    scp.fsync_dir = _span("fsync dir", scp.fsync_dir)


STEPS = ("read", "decoded", "handler", "placed", "to committer", "commit starts", "commit ends", "recorded", "durable", "returned", "send_msg", "wire", "next")


def per_object(events: list[tuple[str, int]]) -> list[dict[str, int]]:
    """Split the stamps into objects (one sender: strictly one after another)."""
    objects, cur = [], {}
    for name, t in events:
        if name == "read" and cur:
            objects.append(cur)
            cur = {}
        cur.setdefault(name, t)
    if cur:
        objects.append(cur)
    return [o for o in objects if all(s in o for s in STEPS)]


def _us(values: list[float]) -> str:
    values = sorted(values)
    return f"median {statistics.median(values) / 1000:7.0f}  p90 {values[int(len(values) * 0.9)] / 1000:7.0f}  mean {statistics.fmean(values) / 1000:7.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from node.app import Node
    from node.config import parse

    with tempfile.TemporaryDirectory(prefix="casemask-latency-") as tmp:
        work = Path(tmp)
        make_study(work / "in", args.instances)
        raw = node_config(work / "node", [{"name": "f", "kind": "folder", "path": str(work / "out")}], stable_after_s=86400, **{k: _setting(v) for k, v in (kv.split("=", 1) for kv in args.node)})
        node = Node(parse(raw, "bench", base_dir=work))
        node.start_listening(1)
        try:
            instrument()
            dt = send(raw["node"]["port"], [work / "in"], "CASEMASK")
        finally:
            node.stop()
    objects = per_object(_events)[20:]
    print(f"{args.instances} objects in {dt:.2f} s ({args.instances / dt:.1f}/s); {len(objects)} objects timed")
    total = [o["wire"] - o["read"] for o in objects]
    print(f"{'read -> wire (the node)':28s} {_us(total)}")
    for a, b in zip(STEPS, STEPS[1:]):
        print(f"  {a + ' -> ' + b:26s} {_us([o[b] - o[a] for o in objects])}")
    for name, values in _spans.items():
        print(f"{name:28s} {_us(values[20:])}  ({len(values)} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
