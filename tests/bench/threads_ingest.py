"""CPU seconds per received object, per thread of the node, the load-independent side of
tests/bench/bench_ingest.py: which thread to make cheaper.

    python tests/bench/threads_ingest.py [--instances 500] [--senders 4] [--node KEY=VALUE ...]

Starts ``casemask serve`` (``receivers = 1`` unless --node says otherwise; with more, the
receivers' threads are not counted), waits until it has started, sends
the corpus with dcmtk storescu (one study per sender, all at once), and prints the
node's CPU seconds (utime + stime, /proc) per 1000 objects: in all, and per thread,
grouped by the thread's Python name (read once mid-run with ``py-spy dump``; pip install
py-spy). Association threads that ended are named from that reading too: pynetdicom's
``AcceptorThread@...`` is an association's DIMSE thread (the C-STORE handler runs on
it), ``Thread-N (_run_reactor)`` its DUL thread (reads and decodes PDUs).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_ingest import SHIPPED, Ceiling, _setting, cpu_s, node_rows, send  # noqa: E402
from tests.conftest import NodeProcess, make_study, node_config, write_toml  # noqa: E402


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (utime + stime) of each thread of ``pid`` now."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by thread id (py-spy dump)."""
    dump = subprocess.run([shutil.which("py-spy") or "py-spy", "dump", "-p", str(pid)], capture_output=True, text=True, timeout=60).stdout
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'Thread (\d+) \(\w+\): "([^"]*)"', dump)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=500, help="objects per sender")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE", help="a [node] setting, e.g. --node receivers=2")
    ap.add_argument("--ceiling", action="store_true", help="measure the ceiling (bench_ingest's pynetdicom SCP that stores nothing) instead of the node")
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    node_kw = {"receivers": 1, **SHIPPED, **{k: _setting(v) for k, v in (kv.split("=", 1) for kv in args.node)}}
    work = Path(tempfile.mkdtemp(prefix="casemask-threads-ingest-"))
    try:
        corpora = [work / f"in{s}" for s in range(args.senders)]
        for c in corpora:
            make_study(c, args.instances)
        raw = node_config(work / "node", [{"name": "f", "kind": "folder", "path": str(work / "out")}], stable_after_s=86400, **node_kw)
        if args.ceiling:
            node = Ceiling(work / "ceiling.log")
            port, aet = node.port, node.aet
        else:
            port, aet = raw["node"]["port"], raw["node"]["ae_title"]
            node = NodeProcess(write_toml(raw, work / "node.toml"), work / "node.log")
            node.start(port)  # every receiving process accepts once it says it started (node.sharedport)
        pid = node.proc.pid
        before = thread_cpu(pid)
        last = dict(before)
        names: dict[int, str] = {}
        sending = threading.Event()
        sending.set()

        def sample() -> None:  # keep the last reading of threads that end before the run does
            n = 0
            while sending.is_set():
                for tid, secs in thread_cpu(pid).items():
                    last[tid] = max(last.get(tid, 0.0), secs)
                n += 1
                if n == 20:
                    names.update(thread_names(pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        cpu0 = cpu_s(pid)
        sampler.start()
        t0 = time.perf_counter()
        send(port, corpora, aet)
        seconds = time.perf_counter() - t0
        cpu = cpu_s(pid) - cpu0
        sending.clear()
        sampler.join()
        for tid, secs in thread_cpu(pid).items():
            last[tid] = max(last.get(tid, 0.0), secs)
        names.update(thread_names(pid))
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(60)
        total = args.instances * args.senders
        per_name: collections.Counter[str] = collections.Counter()
        for tid, secs in last.items():
            per_name[re.sub(r"\d+", "N", names.get(tid, "(ended before it was named)"))] += secs - before.get(tid, 0.0)
        stored = "nothing (the ceiling)" if args.ceiling else node_rows(Path(raw["node"]["data_dir"]))
        print(f"settings: {'the ceiling' if args.ceiling else node_kw}; {args.senders} sender(s) x {args.instances}; stored {stored}; {total / seconds:.1f}/s; load average {os.getloadavg()[0]:.1f}")
        print(f"{'ceiling' if args.ceiling else 'node'} CPU {cpu / total * 1000:.2f} s per 1000 objects; per thread:")
        for name, secs in per_name.most_common():
            if secs > 0:
                print(f"  {secs / total * 1000:5.2f}  {name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
