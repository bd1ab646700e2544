"""Durable ingest rate: casemask vs Orthanc, same corpus, same sender, side by side.

    python tests/bench/bench_ingest.py [--instances 1000] [--rounds 3]

Both peers store durably (Orthanc with SyncStorageArea, casemask with fsync + committed
row before Success). dcmtk storescu sends the corpus over one association with
TCP_NODELAY=1; each round sends to both, in alternating order, into empty storage.
casemask runs with stable_after_s high so that only ingest is measured, as for Orthanc.
Prints instances/s for each and the ratio casemask/Orthanc (median over rounds).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import STORESCU, NodeProcess, Orthanc, dcmtk_env, make_study, node_config, wait_until, write_toml  # noqa: E402


def send(port: int, corpus: Path, aec: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([STORESCU, "-aec", aec, "+sd", "127.0.0.1", str(port), str(corpus)], env=dcmtk_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"storescu to {aec} failed: {r.stderr[-500:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="casemask-bench-ingest-"))
    corpus = work / "corpus"
    make_study(corpus, args.instances)
    size_kb = sum(p.stat().st_size for p in corpus.iterdir()) / args.instances / 1024
    print(f"corpus: {args.instances} CT instances, {size_kb:.0f} KB each; sender: dcmtk storescu, TCP_NODELAY=1")
    ours, theirs = [], []
    try:
        for rnd in range(args.rounds):
            orthanc = Orthanc(work / f"orthanc{rnd}")
            raw = node_config(work / f"node{rnd}", [{"name": "f", "kind": "folder", "path": str(work / f"out{rnd}")}], stable_after_s=86400)
            cfg = write_toml(raw, work / f"node{rnd}.toml")
            node = NodeProcess(cfg, work / f"node{rnd}.log")
            node.start(raw["node"]["port"])
            try:
                order = [("casemask", raw["node"]["port"], "CASEMASK"), ("orthanc", orthanc.dicom_port, orthanc.aet)]
                if rnd % 2:
                    order.reverse()
                for name, port, aec in order:
                    dt = send(port, corpus, aec)
                    (ours if name == "casemask" else theirs).append(args.instances / dt)
                    print(f"round {rnd + 1}: {name:<8} {args.instances / dt:7.1f} instances/s ({dt:.2f} s)")
                wait_until(lambda: orthanc.get("/statistics")["CountInstances"] == args.instances, timeout=60, what="Orthanc count")
            finally:
                node.stop()
                orthanc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median: casemask {a:.1f}/s, Orthanc {b:.1f}/s, ratio casemask/Orthanc {a / b:.2f} (target >= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
