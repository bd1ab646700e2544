"""engine.retrieval: exact cosine search, label partitions, the approximate index, and
the retrieval keys of the evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from engine.retrieval import (
    CaseBase,
    ExactSearch,
    HnswSearch,
    approximate_available,
    chance_leakage,
    cosine,
    leakage_at_k,
    make_searcher,
    precision_at_k,
    softmax_distance,
    unit,
)


def brute_force(vectors: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    """Nearest rows by cosine, written the slow obvious way."""
    sims = [float(np.dot(v, q) / (np.linalg.norm(v) * np.linalg.norm(q))) for v in vectors]
    return sorted(range(len(vectors)), key=lambda i: (-sims[i], i))[:k]


def test_exact_search_finds_what_comparing_every_case_finds():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    sims, rows = ExactSearch(v).search(q, 7)
    assert rows.shape == sims.shape == (20, 7)
    for i in range(20):
        assert rows[i].tolist() == brute_force(v, q[i], 7)
        assert np.all(np.diff(sims[i]) <= 0)  # best first
    np.testing.assert_allclose(sims, np.take_along_axis(cosine(q, v), rows, 1), rtol=1e-5)


def test_cosine_ignores_length_and_a_zero_vector_matches_nothing():
    v = np.array([[1, 0], [10, 0], [0, 3], [0, 0]], np.float32)
    sims, rows = ExactSearch(v).search(np.array([[2, 0]], np.float32), 4)
    assert rows[0].tolist() == [0, 1, 2, 3]  # ties (rows 0 and 1, rows 2 and 3) by row
    np.testing.assert_allclose(sims[0], [1, 1, 0, 0], atol=1e-6)
    assert np.all(np.isfinite(unit(v)))


def test_more_neighbours_asked_than_cases_gives_every_case():
    v = np.eye(3, dtype=np.float32)
    sims, rows = ExactSearch(v).search(np.array([[1, 0.5, 0]], np.float32), 10)
    assert rows[0].tolist() == [0, 1, 2]
    assert ExactSearch(np.zeros((0, 3), np.float32)).search(np.ones((1, 3), np.float32), 5)[1].shape == (1, 0)


def test_case_base_contrasting_search_returns_the_nearest_cases_of_other_labels():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((300, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 300)
    base = CaseBase(v, labels, approximate="never")
    q = rng.standard_normal(8).astype(np.float32)
    hits = base.nearest(q, 5)
    assert [h.row for h in hits] == brute_force(v, q, 5)
    assert all(h.label == labels[h.row] for h in hits)
    own = hits[0].label  # the query's label: that of its nearest case
    contrast = base.nearest(q, 5, exclude_label=own)
    others = np.flatnonzero(labels != own)
    assert [h.row for h in contrast] == [int(others[i]) for i in brute_force(v[others], q, 5)]
    assert all(h.label != own for h in contrast)
    assert base.kinds == {"exact"}
    with pytest.raises(ValueError, match="dimensions"):
        base.nearest(np.ones(3, np.float32), 5)


@pytest.mark.skipif(approximate_available() is not None, reason="faiss-cpu not installed (pip install 'casemask[ann]')")
def test_approximate_index_finds_nearly_every_exact_neighbour():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((3, 16)) * 3
    v = (centres[rng.integers(0, 3, 5000)] + rng.standard_normal((5000, 16))).astype(np.float32)
    q = (centres[rng.integers(0, 3, 50)] + rng.standard_normal((50, 16))).astype(np.float32)
    _, exact = ExactSearch(v).search(q, 5)
    ann = HnswSearch(v)
    sims, rows = ann.search(q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows.tolist(), exact.tolist())])
    assert recall >= 0.95
    one_s, one_r = ann.search(q[:1], 5)  # one query at a time, as the node asks
    assert one_r.shape == (1, 5) and one_r[0].tolist() == rows[0].tolist()
    np.testing.assert_allclose(sims, np.take_along_axis(cosine(q, v), rows, 1), atol=1e-4)
    assert isinstance(make_searcher(v, "auto", above=1000), HnswSearch)
    assert isinstance(make_searcher(v, "auto", above=10_000), ExactSearch)
    assert isinstance(make_searcher(v, "never", above=10), ExactSearch)


def test_probabilities_from_prototypes_pick_the_nearest_prototype():
    protos = np.array([[0, 0], [4, 0], [0, 4]], np.float32)
    p = softmax_distance(np.array([[0.1, 0], [3.9, 0.2], [0, 5]], np.float32), protos)
    assert p.argmax(1).tolist() == [0, 1, 2]
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)


def test_precision_leakage_and_chance():
    neighbours = np.array([[0, 0, 1], [1, 1, 1]])
    assert precision_at_k(neighbours, np.array([0, 1])) == pytest.approx(5 / 6)
    assert leakage_at_k(neighbours, np.array([1, 0])) == pytest.approx(1 / 6)
    # gallery: patient 0 twice, 1 once, 2 once; queries from patients 0 and 2
    assert chance_leakage(np.array([0, 0, 1, 2]), np.array([0, 2])) == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert chance_leakage(np.array([0, 1]), np.array([5])) == 0.0


def test_evaluation_reports_retrieval_precision_and_leakage_with_chance(tmp_path):
    from engine.api import load_model
    from engine.evaluate import EvalConfig, evaluate, meets

    m = load_model("builtin:reference", backend="torch")
    cfg = EvalConfig(seed=4244, patients=6, visits=4, held_out=1, disease_patients=12, disease_visits=3, epochs=1)
    report = evaluate(m, tmp_path, cfg)
    for key in ("retrieval_label_precision_at_5", "retrieval_identity_leakage_at_5", "retrieval_identity_leakage_chance",
                "retrieval_identity_leakage_at_5_original_gallery", "retrieval_identity_leakage_chance_original_gallery"):
        assert 0.0 <= report[key] <= 1.0, key
    r = report["retrieval"]
    assert r["gallery_images"] == 6 * 3 and r["queries"] == 6
    # every patient has 3 gallery visits of 18: random neighbours are the query's patient 1 time in 6
    for g in ("gallery_anonymized", "gallery_original"):
        assert r[g]["same_patient_chance"] == pytest.approx(1 / 6)
    assert isinstance(meets(report, "retrieval_identity_leakage_at_5"), bool)
    assert "Retrieval by the medical vector" in (tmp_path / "report.md").read_text()
