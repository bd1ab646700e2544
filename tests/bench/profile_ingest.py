"""CPU per received object of the node beside the ceiling's (a pynetdicom SCP that stores
nothing, tests/bench/bench_ingest.py's), same senders, and where each one's CPU goes.

    python tests/bench/profile_ingest.py [--instances 250] [--senders 4] [--rounds 2] [--node KEY=VALUE ...] [--pyspy DIR]

Each round starts a fresh node (``casemask serve``, the shipped settings unless --node
says otherwise) and a fresh ceiling, sends ``--senders`` dcmtk storescu at once (one
study each) to each of them in turn (order rotated per round), and prints the CPU
seconds (utime + stime of the process and its descendants, /proc) per 1000 objects of
each, and the difference: what the node spends beyond pynetdicom's own reception.

``--pyspy DIR``: also records each send with ``py-spy record -r 200 -f raw
--nonblocking`` (every process of the node, ``--subprocesses``) into DIR, and prints
the share of the samples per thread kind and, in each, per leaf (see :func:`summarize`).
py-spy costs CPU of its own on a 2-core machine: the CPU figures of a round with it
are higher than without.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_ingest import Ceiling, _setting, cpu_s, node_rows, send, start_node  # noqa: E402
from tests.conftest import make_study  # noqa: E402

def thread_kind(thread: str) -> str:
    """A py-spy thread label reduced to its kind (numbers dropped)."""
    return re.sub(r"\d+", "N", thread)


def _frame(frame: str) -> str:
    return re.sub(r" \((?:.*/)?(?:site-packages/)?([\w/<>. -]+?\.py|<[^>]*>):\d+\)", r" (\1)", frame)


def summarize(raw: Path) -> tuple[int, collections.Counter, dict[str, collections.Counter]]:
    """(samples, samples per thread kind, per thread kind the samples per leaf: the
    innermost Python frame and its caller) of a py-spy raw (collapsed) file. py-spy
    names the Python function a thread is in, also while it waits in a system call
    it does not know as idle (fsync, a file's creation, select): read a leaf as "time
    spent here", not as CPU."""
    per_thread: collections.Counter[str] = collections.Counter()
    per_leaf: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        thread = next((f for f in frames if f.startswith("thread (")), "?")
        where = "receiver " if "node.receivers" in stack.split(";thread (")[0] else ""
        kind = where + thread_kind(thread.split(": ", 1)[-1])
        per_thread[kind] += n
        code = [f for f in frames if not f.startswith("thread (")]
        per_leaf[kind][" < ".join(_frame(f) for f in code[-2:][::-1]) or "?"] += n
    return total, per_thread, per_leaf


def _record(pid: int, out: Path) -> subprocess.Popen:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([pyspy, "record", "-r", "200", "-f", "raw", "--nonblocking", "--subprocesses", "--threads", "-p", str(pid), "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=250, help="objects per sender")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--pyspy", type=Path, default=None, metavar="DIR")
    args = ap.parse_args()
    node_kw = {k: _setting(v) for k, v in (kv.split("=", 1) for kv in args.node)}
    total = args.instances * args.senders
    work = Path(tempfile.mkdtemp(prefix="casemask-profile-ingest-"))
    figures: dict[str, list[float]] = collections.defaultdict(list)
    try:
        corpora = [work / f"in{s}" for s in range(args.senders)]
        for c in corpora:
            make_study(c, args.instances)
        print(f"{args.senders} sender(s) x {args.instances}; node settings: {node_kw or 'defaults'}; load average {os.getloadavg()[0]:.1f}", flush=True)
        for rnd in range(args.rounds):
            ceiling = Ceiling(work / f"ceiling{rnd}.log")
            node, raw = start_node(work, f"n{rnd}", **node_kw)
            try:
                peers = [("node", node.proc.pid, raw["node"]["port"], raw["node"]["ae_title"]), ("ceiling", ceiling.proc.pid, ceiling.port, ceiling.aet)]
                if rnd % 2:
                    peers.reverse()
                line = []
                for name, pid, port, aet in peers:
                    spy = _record(pid, args.pyspy / f"{name}{rnd}.raw") if args.pyspy else None
                    if spy:
                        time.sleep(1.0)  # py-spy attaches
                    c0, t0 = cpu_s(pid), time.perf_counter()
                    send(port, corpora, aet)
                    dt, cpu = time.perf_counter() - t0, (cpu_s(pid) - c0) * 1000 / total
                    if spy:
                        _stop(spy)
                    figures[name].append(cpu)
                    line.append(f"{name} {total / dt:6.1f}/s cpu {cpu:.2f} s/1000")
                stored = node_rows(Path(raw["node"]["data_dir"]))
                print(f"round {rnd + 1} (load {os.getloadavg()[0]:.1f}): {'  '.join(line)}  node - ceiling {figures['node'][-1] - figures['ceiling'][-1]:.2f} s/1000; node rows {stored}", flush=True)
            finally:
                node.stop()
                ceiling.stop()
        n, c = statistics.median(figures["node"]), statistics.median(figures["ceiling"])
        print(f"median cpu per 1000 objects: node {n:.2f}, ceiling {c:.2f}, node - ceiling {n - c:.2f}; load average {os.getloadavg()[0]:.1f}")
        if args.pyspy:
            for name in ("ceiling", "node"):
                samples, per_thread, per_leaf = 0, collections.Counter(), collections.defaultdict(collections.Counter)
                for f in sorted(args.pyspy.glob(f"{name}*.raw")):
                    s, t, k = summarize(f)
                    samples += s
                    per_thread.update(t)
                    for kind, leaves in k.items():
                        per_leaf[kind].update(leaves)
                print(f"\n{name}: {samples} py-spy samples")
                for kind, n in per_thread.most_common(6):
                    print(f"  {100 * n / max(samples, 1):5.1f}%  {kind}")
                    for leaf, m in per_leaf[kind].most_common(8):
                        print(f"          {100 * m / max(samples, 1):5.1f}%  {leaf[:140]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
