"""Similar-case search: query latency (p50/p95) with 10^4 and 10^5 indexed cases, exact
against approximate.

    python tests/bench/bench_similar.py [--sizes 10000,100000] [--queries 300] [--real 3000]

Cases: the reference model's medical vectors. ``--real`` synthetic images of patients the
model never saw are encoded; per class, a Gaussian with their mean and covariance gives
the indexed cases (encoding 10^5 images would take tens of minutes on two shared cores,
and the search cost depends on the vectors' geometry, which the fit keeps); the queries
are real encoded images held out of the fit. Every search answers one query at a time,
as ``casemask similar`` and ``POST /api/v1/similar`` do, on one thread.

Searches compared (each when its library is installed):
- ``numpy exact``: :class:`engine.retrieval.ExactSearch` (what the node uses);
- ``numpy exact, by label``: :class:`engine.retrieval.CaseBase` (partitions by label,
  the node's call, with the contrasting search beside it);
- ``faiss flat``: faiss-cpu IndexFlatIP, exact, for reference;
- ``sqlite-vec``: a vec0 table's KNN query, in SQLite (exact: vec0 compares every row);
- ``faiss hnsw`` (:class:`engine.retrieval.HnswSearch`, the optional approximate index)
  and ``usearch hnsw``: approximate HNSW graphs, with recall@5 against exact.

The node's own load of the index table from SQLite (node.index) is timed too when
``--db`` is given. Figures depend on the machine's load: this machine is shared; see
docs/retrieval.md for a run and its caveats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.retrieval import CaseBase, ExactSearch, HnswSearch, softmax_distance, unit  # noqa: E402

CACHE = ROOT / "build" / "bench"


def real_vectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(medical vectors, labels, prototypes) of ``n`` encoded synthetic images, cached."""
    path = CACHE / f"medical_{n}_{seed}.npz"
    if path.exists():
        z = np.load(path)
        return z["medical"], z["labels"], z["prototypes"]
    from engine.api import load_model
    from engine.data import SyntheticPatients

    visits = 10
    pop = SyntheticPatients(max(1, n // visits), visits, 64, seed).batch()
    model = load_model("builtin:reference", backend="onnxruntime")
    med = np.concatenate([model.encode(pop.images[s : s + 500])[0] for s in range(0, len(pop.images), 500)])
    protos = np.asarray(model.bundle.meta["prototypes"], np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, medical=med, labels=pop.labels, prototypes=protos)
    return med, pop.labels, protos


def fitted_cases(med: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors drawn per class from a Gaussian fitted to that class's real vectors."""
    classes, counts = np.unique(labels, return_counts=True)
    per = rng.multinomial(n, counts / counts.sum())
    out, lab = [], []
    for c, m in zip(classes, per):
        v = med[labels == c].astype(np.float64)
        out.append(rng.multivariate_normal(v.mean(0), np.cov(v, rowvar=False), size=m))
        lab.append(np.full(m, c))
    order = rng.permutation(n)
    return np.concatenate(out).astype(np.float32)[order], np.concatenate(lab)[order]


def timed(fn, queries: np.ndarray) -> tuple[np.ndarray, list]:
    """Per-query seconds and results of ``fn(query)`` after a few warm-up calls."""
    for q in queries[:5]:
        fn(q)
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - t0)
    return np.array(times), results


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, t))) / len(t) for f, t in zip(found, truth)]))


def line(name: str, build_s: float, times: np.ndarray, rec: float | None) -> None:
    p50, p95 = np.percentile(times * 1000, [50, 95])
    r = f"{rec:.3f}" if rec is not None else "exact"
    print(f"  {name:<26} build {build_s:7.2f} s   p50 {p50:8.3f} ms   p95 {p95:8.3f} ms   recall@5 {r}")


def bench_size(n: int, med: np.ndarray, labels: np.ndarray, queries: np.ndarray, protos: np.ndarray, k: int, rng: np.random.Generator, db: Path | None) -> None:
    cases, case_labels = fitted_cases(med, labels, n, rng)
    print(f"{n} cases of {cases.shape[1]} dimensions, {len(queries)} queries, k = {k}")

    t0 = time.perf_counter()
    exact = ExactSearch(cases)
    build = time.perf_counter() - t0
    times, res = timed(lambda q: exact.search(q[None], k)[1][0], queries)
    truth = res
    line("numpy exact", build, times, None)

    t0 = time.perf_counter()
    base = CaseBase(cases, case_labels, approximate="never")
    build = time.perf_counter() - t0
    times, res = timed(lambda q: [h.row for h in base.nearest(q, k)], queries)
    line("numpy exact, by label", build, times, recall(res, truth))
    times, _ = timed(lambda q: base.nearest(q, k, exclude_label=int(softmax_distance(q[None], protos).argmax())), queries)
    line("  contrasting (other labels)", 0.0, times, None)

    try:
        import faiss

        faiss.omp_set_num_threads(1)
        u = unit(cases)
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(u.shape[1])
        flat.add(u)
        build = time.perf_counter() - t0
        times, res = timed(lambda q: flat.search(unit(q[None]), k)[1][0], queries)
        line("faiss flat (exact)", build, times, recall(res, truth))
        t0 = time.perf_counter()
        hnsw = HnswSearch(cases)  # engine.retrieval's: faiss IndexHNSWFlat, M 16, efSearch 64
        build = time.perf_counter() - t0
        times, res = timed(lambda q: hnsw.search(q[None], k)[1][0], queries)
        line("faiss hnsw (M 16, ef 64)", build, times, recall(res, truth))
    except ImportError:
        print("  faiss-cpu not installed")

    try:
        from usearch.index import Index

        u = unit(cases)
        t0 = time.perf_counter()
        us = Index(ndim=u.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)
        us.add(np.arange(len(u), dtype=np.uint64), u, threads=1)
        build = time.perf_counter() - t0
        times, res = timed(lambda q: np.asarray(us.search(unit(q[None])[0], k, threads=1).keys), queries)
        line("usearch hnsw (M 16, ef 64)", build, times, recall(res, truth))
    except ImportError:
        print("  usearch not installed")

    con = _sqlite_with_vec()
    if isinstance(con, str):
        print(f"  sqlite-vec: {con}")
    else:
        u = unit(cases)
        t0 = time.perf_counter()
        con.execute(f"CREATE VIRTUAL TABLE cases USING vec0(embedding float[{u.shape[1]}] distance_metric=cosine)")
        con.executemany("INSERT INTO cases(rowid, embedding) VALUES (?, ?)", ((i, u[i].tobytes()) for i in range(len(u))))
        build = time.perf_counter() - t0

        def sq(q: np.ndarray) -> np.ndarray:
            rows = con.execute("SELECT rowid FROM cases WHERE embedding MATCH ? AND k = ? ORDER BY distance", (unit(q[None])[0].tobytes(), k)).fetchall()
            return np.array([r[0] for r in rows])

        times, res = timed(sq, queries)
        line("sqlite-vec vec0 (exact)", build, times, recall(res, truth))
        con.close()

    if db is not None:
        bench_load(db, cases, case_labels)


def _sqlite_with_vec():
    """An in-memory SQLite connection with sqlite-vec loaded, or why there is none. The
    standard library's sqlite3 may be built without extension loading (it is here); apsw
    bundles an SQLite that has it."""
    try:
        import sqlite_vec
    except ImportError:
        return "not installed"
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        con = sqlite3.connect(":memory:")
        con.enable_load_extension(True)
        sqlite_vec.load(con)
        return con
    try:
        import apsw
    except ImportError:
        return "this Python's sqlite3 cannot load extensions (built without), and apsw is not installed"
    con = apsw.Connection(":memory:")
    con.enable_load_extension(True)
    con.load_extension(sqlite_vec.loadable_path())
    return con


def bench_load(db: Path, cases: np.ndarray, labels: np.ndarray) -> None:
    """The node's path: the index table written with these cases, then loaded (node.index)."""
    from sqlalchemy import delete

    from node.db import IndexEntry, make_engine, make_sessionmaker
    from node.index import load_case_base

    engine = make_engine(f"sqlite:///{db}")
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        s.execute(delete(IndexEntry))
        s.bulk_insert_mappings(IndexEntry, [
            {"output_id": None, "route": "bench", "frame": 0, "study_uid": "2.25.1", "series_uid": "2.25.2", "sop_uid": f"2.25.{i + 3}",
             "label": int(labels[i]), "probabilities": b"", "medical": cases[i].tobytes(), "model": "bench", "weights": "bench", "destinations": "[]"}
            for i in range(len(cases))])
        s.commit()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with sessions() as s:
            load_case_base(s, "bench", "bench")
        times.append(time.perf_counter() - t0)
    print(f"  node.index load of {len(cases)} rows from SQLite: median {np.median(times) * 1000:.0f} ms (each CLI query; the server reloads only when the index changed)")
    engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--real", type=int, default=3000, help="encoded synthetic images (the fit and the queries)")
    ap.add_argument("--seed", type=int, default=4242, help="synthetic patients' seed (not the reference model's training seed 0)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--db", type=Path, help="also time the node's load of the index table from a SQLite file here (overwritten)")
    args = ap.parse_args()
    med, labels, protos = real_vectors(args.real, args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(med))
    q_idx, fit_idx = order[: args.queries], order[args.queries :]
    import platform

    print(f"numpy {np.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{len(fit_idx)} encoded images fitted, {len(q_idx)} held out as queries")
    for n in [int(s) for s in args.sizes.split(",")]:
        bench_size(n, med[fit_idx], labels[fit_idx], med[q_idx], protos, args.k, rng, args.db)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
