"""Syscalls per received object, the load-independent side of tests/bench/bench_ingest.py.

    python tests/bench/strace_ingest.py [--instances 300] [--senders 1] [--node KEY=VALUE ...]

Starts ``casemask serve`` (``receivers = 1`` unless --node says otherwise, so one
process is traced), attaches ``strace -f -c -w`` to it (wall-clock time per call: how
long a C-STORE's thread waited in each fsync), sends the corpus with dcmtk storescu
(one study per sender, all senders at once), stops the node with SIGTERM, and prints per
object: the calls of the syscalls that matter for ingest, the milliseconds spent in
fsync / fdatasync per object, and the node's CPU seconds per 1000 objects. Start-up and
stop are included (a few hundred calls: small beside 300 objects' thousands).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_ingest import SHIPPED, _setting, cpu_s, node_rows, send  # noqa: E402
from tests.conftest import NodeProcess, make_study, node_config, wait_until, write_toml  # noqa: E402

SHOWN = ("futex", "fsync", "fdatasync", "link", "rename", "openat", "unlink", "pwrite64", "write", "poll", "pselect6", "clock_nanosleep", "recvfrom", "sendto", "fcntl")


def parse_summary(text: str) -> dict[str, tuple[float, int]]:
    """strace -c's table: syscall -> (seconds, calls)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and not parts[-1].startswith("total"):
            try:
                out[parts[-1]] = (float(parts[1]), int(parts[3]))
            except ValueError:
                continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300, help="objects per sender")
    ap.add_argument("--senders", type=int, default=1)
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE", help="a [node] setting, e.g. --node parallel_durability=false")
    args = ap.parse_args()
    if shutil.which("strace") is None:
        raise SystemExit("strace is not installed (apt-get install -y strace)")
    node_kw = {"receivers": 1, **SHIPPED, **{k: _setting(v) for k, v in (kv.split("=", 1) for kv in args.node)}}
    work = Path(tempfile.mkdtemp(prefix="casemask-strace-ingest-"))
    try:
        corpora = [work / f"in{s}" for s in range(args.senders)]
        for c in corpora:
            make_study(c, args.instances)
        raw = node_config(work / "node", [{"name": "f", "kind": "folder", "path": str(work / "out")}], stable_after_s=86400, **node_kw)
        cfg = write_toml(raw, work / "node.toml")
        node = NodeProcess(cfg, work / "node.log")
        node.start(raw["node"]["port"])
        out = work / "strace.txt"
        tracer = subprocess.Popen(["strace", "-f", "-c", "-w", "-o", str(out), "-p", str(node.proc.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # strace attaches to every thread
        cpu0 = cpu_s(node.proc.pid)
        send(raw["node"]["port"], corpora, raw["node"]["ae_title"])
        cpu = cpu_s(node.proc.pid) - cpu0
        total = args.instances * args.senders
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(60)
        tracer.wait(60)
        stored = node_rows(Path(raw["node"]["data_dir"]))
        wait_until(lambda: out.exists(), timeout=10, what="strace's summary")
        calls = parse_summary(out.read_text())
        print(f"settings: {node_kw}; {args.senders} sender(s) x {args.instances}; stored {stored}; node CPU {cpu / total * 1000:.2f} s per 1000 objects (traced: slower than untraced)")
        print("calls per object: " + ", ".join(f"{s} {calls[s][1] / total:.2f}" for s in SHOWN if s in calls))
        sync = {s: calls[s] for s in ("fsync", "fdatasync") if s in calls}
        print("wall ms in the call per object: " + ", ".join(f"{s} {secs / total * 1000:.2f} (per call {secs / n * 1000:.2f})" for s, (secs, n) in sync.items()))
        print(f"all syscalls: {sum(n for _, n in calls.values()) / total:.1f} per object")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
