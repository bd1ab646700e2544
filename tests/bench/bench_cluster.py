"""End to end on one and several nodes: instances/s from the first C-STORE to the last
delivery, for one node on SQLite, one node on PostgreSQL, and one ingest node with two
workers on PostgreSQL; same corpus, interleaved rounds.

    python tests/bench/bench_cluster.py [--instances 600] [--studies 6] [--rounds 3] [--pg-tcp]

Every configuration runs ``casemask serve`` processes (``--role all``, or ``--role
ingest`` + 2 x ``--role worker``) into a fresh data folder and a fresh database: SQLite
under the data folder, or a new database in a PostgreSQL cluster the benchmark starts
with PostgreSQL's durable defaults (fsync and synchronous_commit on, like SQLite's
synchronous=FULL here). One dcmtk storescu (TCP_NODELAY=1) sends the corpus (CT objects,
``--studies`` studies); the route de-identifies headers (Basic Profile, verifier) and
forwards to a pynetdicom archive in this process, which notes when each object arrives.
The clock starts when storescu starts and stops when the last object reaches the
archive. Each round runs every configuration once, in a rotated order; medians,
spreads (min-max) and ratios to SQLite are printed. PostgreSQL is reached over its Unix socket (a database on
the same host), or with ``--pg-tcp`` over loopback TCP.

The target on a 2-core machine is PostgreSQL single node within 15% of SQLite (ratio
>= 0.85). A 2-core machine cannot show what more workers bring (three processes share
two cores); docs/cluster.md says what to expect on a real cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import STORESCU, CountingArchive, NodeProcess, dcmtk_env, free_port, make_study, node_config, wait_until, write_toml  # noqa: E402
from tests.pg import PostgresCluster, missing  # noqa: E402

SECRET_ENV = "CASEMASK_BENCH_SECRET"
CONFIGS = ("sqlite-1", "postgresql-1", "postgresql-1+2")


class Clock:
    """When each distinct object reached the archive."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = 0.0
        self.count = 0

    def stored(self, _count: int) -> None:
        with self.lock:
            self.count += 1
            self.last = time.perf_counter()


def run_config(name: str, work: Path, corpus: list[Path], cluster: PostgresCluster | None, pg_tcp: bool, env: dict) -> dict:
    """One configuration, fresh data folder and database; returns its figures."""
    clock = Clock()
    archive = CountingArchive(after_store=clock.stored)
    dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port, "timeout_s": 30.0}
    url = ""
    dbname = None
    if name.startswith("postgresql"):
        assert cluster is not None
        dbname = cluster.create_database()
        url = cluster.url(dbname, socket_dir=not pg_tcp)
    port = free_port()
    roles = [("all", "node")] if name.endswith("-1") else [("ingest", "ingest"), ("worker", "worker-a"), ("worker", "worker-b")]
    procs = []
    for role, node_id in roles:
        raw = node_config(work, [dest], database_url=url, node_id=node_id, port=port, secret_env=SECRET_ENV, stable_after_s=1.0, poll_interval_s=0.2, lease_s=60.0)
        raw["node"]["data_dir"] = str(work / "var")
        procs.append(NodeProcess(write_toml(raw, work / f"{node_id}.toml"), work / f"{node_id}.log", role=role, env=env))
    try:
        for p in procs:
            p.start(port if p.role in ("all", "ingest") else None)
        t0 = time.perf_counter()
        r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, corpus)], env=dcmtk_env(), capture_output=True, text=True)
        t_sent = time.perf_counter()
        if r.returncode != 0:
            raise SystemExit(f"{name}: storescu failed: {r.stderr[-500:]}")
        n = len(corpus)
        wait_until(lambda: len(set(archive.received)) >= n, timeout=600, interval=0.05, what=f"{name}: {n} objects at the archive")
        duplicates = len(archive.received) - len(set(archive.received))
        return {"e2e": n / (clock.last - t0), "ingest": n / (t_sent - t0), "seconds": clock.last - t0, "duplicates": duplicates}
    finally:
        for p in procs:
            p.stop()
        archive.stop()
        if dbname is not None:
            cluster.drop_database(dbname)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=600)
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pg-tcp", action="store_true", help="reach PostgreSQL over loopback TCP instead of its Unix socket")
    args = ap.parse_args()
    why = missing()
    if why:
        raise SystemExit(f"bench_cluster needs PostgreSQL: {why}")
    work = Path(tempfile.mkdtemp(prefix="casemask-bench-cluster-"))
    corpus: list[Path] = []
    per = args.instances // args.studies
    for k in range(args.studies):
        corpus += make_study(work / "corpus" / f"s{k}", per)
    env = {**os.environ, SECRET_ENV: os.urandom(32).hex()}
    print(f"corpus: {len(corpus)} CT instances in {args.studies} studies; route: Basic Profile + verifier -> pynetdicom archive; "
          f"sender: dcmtk storescu, TCP_NODELAY=1; PostgreSQL over {'loopback TCP' if args.pg_tcp else 'its Unix socket'}, fsync on; {os.cpu_count()} CPUs")
    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    cluster = PostgresCluster(durable=True).start()
    try:
        for rnd in range(args.rounds):
            order = CONFIGS[rnd % len(CONFIGS):] + CONFIGS[:rnd % len(CONFIGS)]
            for name in order:
                folder = work / f"r{rnd}-{name}"
                folder.mkdir()
                res = run_config(name, folder, corpus, cluster, args.pg_tcp, env)
                results[name].append(res)
                print(f"round {rnd + 1}: {name:<16} {res['e2e']:6.1f} instances/s end to end ({res['seconds']:.2f} s; ingest {res['ingest']:.1f}/s; {res['duplicates']} duplicates)", flush=True)
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {c: statistics.median(r["e2e"] for r in results[c]) for c in CONFIGS}
    base = med["sqlite-1"]
    for c in CONFIGS:
        runs = [r["e2e"] for r in results[c]]
        print(f"{c:<16} median {med[c]:6.1f} instances/s end to end, spread {min(runs):.1f}-{max(runs):.1f} over {len(runs)} rounds, {med[c] / base:.2f} x SQLite; "
              f"duplicates {sum(r['duplicates'] for r in results[c])}")
    print(f"PostgreSQL single node / SQLite: {med['postgresql-1'] / base:.2f} (target >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
