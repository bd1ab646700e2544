"""The durable write of one received object, alone: the serial order of before against
the parallel one, alternated in blocks, on the file system of ``--dir``.

    python tests/bench/bench_durability.py [--dir var/bench-durability] [--blocks 10] [--per-block 50] [--kb 38]

Each object: ``--kb`` KB written to a temporary name (not timed), then, timed until all
is durable, beside a SQLite commit (WAL, ``synchronous=FULL``, one row) on another
thread, as the C-STORE handler and the group-commit thread do:

- serial (``parallel_durability = false``): fsync the data, link the final name, fsync
  the folder;
- parallel (the default): link the final name, then fsync the data and fsync the folder
  on two threads at once.

Prints the median and 90th percentile of each. Disk latency, not CPU, is what this
measures: it moves with what else uses the disk, so the blocks alternate (ABBA).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("var/bench-durability"), help="a folder on the file system to measure (made and removed)")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--per-block", type=int, default=50)
    ap.add_argument("--kb", type=int, default=38)
    args = ap.parse_args()
    root = args.dir
    incoming, spool = root / ".incoming", root / "spool"
    incoming.mkdir(parents=True, exist_ok=True)
    spool.mkdir(exist_ok=True)
    db = sqlite3.connect(root / "bench.db", check_same_thread=False, isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=full")
    db.execute("create table if not exists t (id integer primary key, v text)")
    data = os.urandom(args.kb * 1000)
    times: dict[bool, list[float]] = {True: [], False: []}
    with ThreadPoolExecutor(4) as pool:

        def commit() -> None:
            db.execute("begin")
            db.execute("insert into t (v) values (?)", (uuid.uuid4().hex,))
            db.execute("commit")

        def one(parallel: bool) -> float:
            tmp = incoming / f".{uuid.uuid4().hex}.tmp"
            final = spool / f"{uuid.uuid4().hex}.dcm"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                t0 = time.perf_counter()
                if parallel:
                    os.link(tmp, final)
                    waits = [pool.submit(os.fsync, fd), pool.submit(_fsync_dir, spool), pool.submit(commit)]
                else:
                    def serial() -> None:
                        os.fsync(fd)
                        os.link(tmp, final)
                        _fsync_dir(spool)
                    waits = [pool.submit(serial), pool.submit(commit)]
                for w in waits:
                    w.result()
                return time.perf_counter() - t0
            finally:
                os.close(fd)
                tmp.unlink()

        try:
            for block in range(args.blocks):
                for parallel in (True, False) if block % 2 == 0 else (False, True):
                    times[parallel] += [one(parallel) for _ in range(args.per_block)]
        finally:
            db.close()
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.kb} KB per object, {args.blocks} blocks of {args.per_block} each, alternated")
    for parallel in (False, True):
        v = sorted(times[parallel])
        print(f"{'parallel' if parallel else 'serial  '}: median {statistics.median(v) * 1000:.2f} ms, p90 {v[int(len(v) * 0.9)] * 1000:.2f} ms, n {len(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
