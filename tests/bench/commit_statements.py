"""CPU of the group commit's statements per batch: SQLAlchemy Core against the same
statements on the DBAPI cursor (node.queue.HotStatements), side by side.

    python tests/bench/commit_statements.py [--batches 300] [--rounds 5] [--url URL]

One SQLite database (under $TMPDIR; or ``--url``, e.g. a PostgreSQL one), WAL and
FULL sync as the node opens it. Each round commits ``--batches`` batches of 1 row (one
sender) and of 4 rows of 4 studies (4 senders) each way, alternating Core and the hot
statements batch by batch, and prints the median ``time.thread_time_ns`` (user +
system CPU of this thread) of the statements (``record_received_many``) and of the
COMMIT, in microseconds; then the median over rounds and its spread for each, and the
ratio Core / hot of the statements' CPU. The WAL is checkpointed every 16 batches as
node.groupcommit does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node import queue  # noqa: E402
from node.db import make_engine  # noqa: E402


def _row(study: str, n: int) -> queue.Received:
    sop = f"{study}.{n}"
    return queue.Received(sop, "1.2.840.10008.5.1.4.1.1.2", study, f"{study}.0", "CT", "1.2.840.10008.1.2.1", f"spool/{sop}.dcm", 38_000, "MODALITY1", "CASEMASK", "127.0.0.1", "0" * 32, "owner", "ab" * 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300, help="batches per way, size and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--url", default="", help="a database URL (default: a new SQLite file under $TMPDIR)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="commit-statements-")
    engine = make_engine(args.url or f"sqlite:///{folder}/db.sqlite")
    hot = queue.HotStatements(engine.dialect)
    studies = [f"1.2.826.0.1.3680043.10.1234.{os.getpid()}.{k}" for k in range(4)]
    counter = [0]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint = 0")
            conn.commit()
        for s in studies:
            with conn.begin():
                counter[0] += 1
                queue.record_received(conn, _row(s, counter[0]))
        print(f"{engine.dialect.name}, {args.batches} batches per way, size and round; load average {os.getloadavg()[0]:.1f}")
        for rnd in range(1, args.rounds + 1):
            times: dict[tuple[str, int], tuple[list[int], list[int]]] = {(way, size): ([], []) for way in ("core", "hot") for size in (1, 4)}
            for k in range(args.batches):
                for size in (1, 4):
                    for way in (("core", "hot") if k % 2 else ("hot", "core")):
                        rows = []
                        for j in range(size):
                            counter[0] += 1
                            rows.append(_row(studies[(k + j) % 4], counter[0]))
                        t0 = time.thread_time_ns()
                        tx = conn.begin()
                        queue.record_received_many(conn, rows, hot if way == "hot" else None)
                        t1 = time.thread_time_ns()
                        tx.commit()
                        t2 = time.thread_time_ns()
                        times[(way, size)][0].append(t1 - t0)
                        times[(way, size)][1].append(t2 - t1)
                if engine.dialect.name == "sqlite" and k % 16 == 0:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                    conn.commit()
            line = []
            for (way, size), (st, cm) in times.items():
                s, c = statistics.median(st) / 1000, statistics.median(cm) / 1000
                results.setdefault((way, size), []).append((s, c))
                line.append(f"{way} x{size} {s:.0f}+{c:.0f}")
            print(f"round {rnd} (load {os.getloadavg()[0]:.1f}): " + ", ".join(line) + " us (statements + COMMIT)")
    for size in (1, 4):
        core = [s for s, _ in results[("core", size)]]
        hot_ = [s for s, _ in results[("hot", size)]]
        ratios = sorted(c / h for c, h in zip(core, hot_))
        print(
            f"{size} row(s) a batch: statements core median {statistics.median(core):.0f} us ({min(core):.0f}-{max(core):.0f}), "
            f"hot {statistics.median(hot_):.0f} us ({min(hot_):.0f}-{max(hot_):.0f}); core / hot median {statistics.median(ratios):.2f} "
            f"(spread {ratios[0]:.2f}-{ratios[-1]:.2f}); COMMIT {statistics.median(c for _, c in results[('hot', size)]):.0f} us"
        )
    engine.dispose()


if __name__ == "__main__":
    main()
