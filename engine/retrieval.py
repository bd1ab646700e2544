"""Similar cases by the medical vector: the case base of a case-based explanation
(Montenegro & Cardoso, arXiv 2311.04833, section 3: a decision on a query image is
explained by the cases nearest to it in the disentangled medical space).

Similarity is the cosine of the model's medical vectors. Vectors are scaled to unit
length once, so a query's similarities to N cases are one (N, d) x (d,) product.

Two searches, one interface (:class:`Searcher`):

- :class:`ExactSearch`: NumPy, every case compared; the top k by ``argpartition``.
  With the reference model's 16-dimensional vectors a query against 10^5 cases costs
  about a millisecond (tests/bench/bench_similar.py, docs/retrieval.md).
- :class:`HnswSearch`: an approximate HNSW graph (Malkov & Yashunin, arXiv 1603.09320)
  from faiss-cpu, optional (``pip install 'casemask[ann]'``), for case bases past the
  size where exact search stops being fast enough; chosen against usearch and
  sqlite-vec by the benchmark in docs/retrieval.md.

:class:`CaseBase` partitions cases by label, so that "the nearest cases whose label
differs from the query's" (the contrasting side of an explanation) is a search of the
other partitions rather than a filter after the fact.

No PyTorch here: the node queries this module.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

# Exact search is used up to this many cases in a partition, the approximate index (when
# installed and asked for) above it. The benchmark measured exact search of 10^5 cases at
# a few milliseconds a query, and building the approximate index at about 50 s per 10^5
# cases, so the cut-over lies well above the case bases a node builds in years
# (docs/retrieval.md).
APPROXIMATE_ABOVE = 1_000_000


def unit(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` (N, d) scaled to unit length, float32; an all-zero row stays zero
    (its cosine with anything is 0)."""
    v = np.asarray(v, np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be N x d, got shape {v.shape}")
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) cosine similarities of the rows of ``a`` and ``b``."""
    return unit(a) @ unit(b).T


class Searcher(Protocol):
    """Nearest cases of a fixed set of vectors."""

    size: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each (Q, min(k, size)), best first; rows index the
        vectors the searcher was built from."""


class ExactSearch:
    """Every case compared: exact cosine top-k in NumPy."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = unit(vectors)
        self.size = len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = unit(queries)
        k = min(k, self.size)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        sims = q @ self.vectors.T
        if k < self.size:
            part = np.argpartition(sims, self.size - k, axis=1)[:, self.size - k :]
        else:
            part = np.broadcast_to(np.arange(self.size), sims.shape)
        top = np.take_along_axis(sims, part, 1)
        # best first; ties by row, so that the order never depends on argpartition
        order = np.lexsort((part, -top), axis=1)
        rows = np.take_along_axis(part, order, 1).astype(np.int64)
        return np.take_along_axis(top, order, 1), rows


class HnswSearch:
    """Approximate: a faiss HNSW graph (``IndexHNSWFlat``) on inner products of unit
    vectors (= cosine).

    ``connectivity`` is HNSW's M; ``expansion_search`` (efSearch) trades speed for recall:
    the benchmark's setting (M 16, efConstruction 128, efSearch 64) kept recall@5 at 0.999
    on the reference model's vectors. Building costs about 50 s per 10^5 cases on one
    core, so it pays only in a process that keeps it (the HTTP server), never per query.

    Raises:
        ImportError: faiss-cpu is not installed (``pip install 'casemask[ann]'``).
    """

    kind = "hnsw"

    def __init__(self, vectors: np.ndarray, connectivity: int = 16, expansion_add: int = 128, expansion_search: int = 64) -> None:
        try:
            import faiss
        except ImportError as exc:
            raise ImportError("the approximate index needs faiss-cpu: pip install 'casemask[ann]'") from exc
        v = unit(vectors)
        self.size = len(v)
        self.index = faiss.IndexHNSWFlat(v.shape[1], connectivity, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = expansion_add
        self.index.hnsw.efSearch = expansion_search
        if self.size:
            self.index.add(v)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = unit(queries)
        k = min(k, self.size)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        sims, rows = self.index.search(q, k)  # rows -1 where the graph found fewer than k
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
        return sims, rows.astype(np.int64)


def approximate_available() -> str | None:
    """None when the approximate index can be built here; else what to install."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "faiss-cpu is not installed (pip install 'casemask[ann]')"
    return None


def make_searcher(vectors: np.ndarray, approximate: str = "auto", above: int = APPROXIMATE_ABOVE) -> Searcher:
    """A searcher for ``vectors``: exact, or the approximate index when ``approximate`` is
    ``"always"``, or ``"auto"`` with more than ``above`` cases and usearch installed.

    Raises:
        ValueError: an unknown ``approximate``.
        ImportError: ``approximate = "always"`` without usearch.
    """
    if approximate not in ("auto", "always", "never"):
        raise ValueError(f"approximate must be 'auto', 'always' or 'never', got {approximate!r}")
    if approximate == "always" or (approximate == "auto" and len(vectors) > above and approximate_available() is None):
        return HnswSearch(vectors)
    if approximate == "auto" and len(vectors) > above:
        log.warning("%d cases: exact search (%s)", len(vectors), approximate_available())
    return ExactSearch(vectors)


@dataclasses.dataclass(frozen=True)
class Hit:
    """One case found: its row in the case base, cosine similarity and label."""

    row: int
    similarity: float
    label: int


class CaseBase:
    """Cases (medical vectors with a label each), partitioned by label.

    ``vectors``: (N, d); ``labels``: (N,) integer classes.
    """

    def __init__(self, vectors: np.ndarray, labels: Sequence[int] | np.ndarray, approximate: str = "auto", above: int = APPROXIMATE_ABOVE) -> None:
        vectors = np.asarray(vectors, np.float32)
        self.labels = np.asarray(labels, np.int64)
        if vectors.ndim != 2 or len(vectors) != len(self.labels):
            raise ValueError(f"need N x d vectors and N labels, got {vectors.shape} and {self.labels.shape}")
        self.size = len(vectors)
        self.dim = vectors.shape[1] if vectors.ndim == 2 else 0
        self._parts: dict[int, tuple[np.ndarray, Searcher]] = {}
        for label in np.unique(self.labels):
            rows = np.flatnonzero(self.labels == label)
            self._parts[int(label)] = (rows, make_searcher(vectors[rows], approximate, above))

    @property
    def kinds(self) -> set[str]:
        """Which searches the partitions use (``exact``, ``hnsw``)."""
        return {getattr(s, "kind", "?") for _, s in self._parts.values()}

    def nearest(self, query: np.ndarray, k: int, exclude_label: int | None = None) -> list[Hit]:
        """The ``k`` cases most similar to ``query`` (d,), best first; with
        ``exclude_label``, only cases of the other labels (the contrasting cases)."""
        q = np.asarray(query, np.float32).reshape(1, -1)
        if q.shape[1] != self.dim and self.size:
            raise ValueError(f"query has {q.shape[1]} dimensions, the case base {self.dim}")
        found: list[Hit] = []
        for label, (rows, searcher) in self._parts.items():
            if label == exclude_label:
                continue
            sims, idx = searcher.search(q, k)
            found += [Hit(int(rows[i]), float(s), label) for s, i in zip(sims[0], idx[0]) if i >= 0]
        found.sort(key=lambda h: (-h.similarity, h.row))
        return found[:k]


def softmax_distance(medical: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities from medical vectors (N, d) and class prototypes
    (classes, d): softmax of minus half the squared distance to each prototype, the
    posterior of classes with equal priors and unit-variance Gaussians around their
    prototypes. Its arg-max is the nearest prototype, the rule the pixel step uses to
    pick a counterfactual's class."""
    d2 = ((np.asarray(medical, np.float64)[:, None] - np.asarray(prototypes, np.float64)[None]) ** 2).sum(-1)
    logits = -0.5 * d2
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Share of neighbours (Q, k) with their query's label (Q,)."""
    return float((neighbour_labels == np.asarray(query_labels)[:, None]).mean())


def leakage_at_k(neighbour_ids: np.ndarray, query_ids: np.ndarray) -> float:
    """Share of neighbours (Q, k) attributed to their query's own patient (Q,)."""
    return float((neighbour_ids == np.asarray(query_ids)[:, None]).mean())


def chance_leakage(gallery_ids: np.ndarray, query_ids: np.ndarray) -> float:
    """The leakage a retrieval that picks its neighbours at random would have: for each
    query, the share of the gallery attributed to the query's patient, averaged."""
    gallery_ids = np.asarray(gallery_ids)
    ids, counts = np.unique(gallery_ids, return_counts=True)
    share = dict(zip(ids.tolist(), (counts / len(gallery_ids)).tolist()))
    return float(np.mean([share.get(int(q), 0.0) for q in np.asarray(query_ids)]))
