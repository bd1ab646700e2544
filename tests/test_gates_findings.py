"""What a synthetic visit's finding shows in its image (``effusion_pixels``,
``nodule_contrast``), which the gates' evaluation uses to tell findings no reader of the
pixels can see from a classifier's misreadings (docs/gates.md)."""

from __future__ import annotations

import numpy as np

from engine.data.synthetic import SyntheticPatients, _stack, render


def _same_visits_as(labels: np.ndarray, ds: SyntheticPatients, record: dict) -> np.ndarray:
    """The first 64 patients' visits of ``ds`` rendered with ``labels`` (the same draws:
    the labels are drawn before the visits, and render draws the same for every label)."""
    anats = [ds.anatomy(p) for p in range(64)]
    rep = np.repeat(np.arange(64), ds.visits)
    stacked = {k: v[rep] for k, v in _stack(anats).items()}
    rng = np.random.default_rng([ds.seed, 2, 0])
    rng.integers(0, 3, size=rep.shape[0])  # the labels' draw
    return render(stacked, labels, rng, ds.size, record=record)[:, 0]


def test_effusion_pixels_count_what_the_effusion_adds_to_the_image():
    """The same visits drawn normal and with an effusion differ by at least 0.2 in about
    ``effusion_pixels`` pixels (the record is taken before noise and after the exposure's
    clipping; noise is the same draw in both), and an effusion below the diaphragm adds
    (nearly) nothing: some visits labelled effusion show fewer than 6 pixels of it."""
    ds = SyntheticPatients(64, 4, 64, seed=9000)
    n = 64 * ds.visits
    rec_eff: dict = {}
    with_eff = _same_visits_as(np.full(n, 2), ds, rec_eff)
    normal = _same_visits_as(np.zeros(n, np.int64), ds, {})
    changed = ((with_eff - normal) >= 0.2).sum(axis=(1, 2))
    assert np.abs(changed - rec_eff["effusion_pixels"]).max() <= 3, np.abs(changed - rec_eff["effusion_pixels"]).max()
    assert rec_eff["effusion_pixels"].min() < 6 and np.median(rec_eff["effusion_pixels"]) > 40
    # A nodule always shows: its brightening survives the exposure's clipping.
    rec_nod: dict = {}
    _same_visits_as(np.ones(n, np.int64), ds, rec_nod)
    assert rec_nod["nodule_contrast"].min() > 0.5
    # The batch records the same for its own labels.
    b = ds.patients(0, 64)
    assert np.array_equal(b.params["effusion_pixels"], rec_eff["effusion_pixels"])


def test_an_original_the_classifier_cannot_read_is_held_back_and_never_redrawn():
    """With the medical gate's ``original_limit``, an original whose reading is below it
    fails the medical gate on its own reading (the reason says so), whatever is drawn, and
    is never drawn again (the gate judged the input); the others are judged as before."""
    import dataclasses

    from engine import load_model

    model = load_model("builtin:reference", backend="onnxruntime", spin=False)
    try:
        x = SyntheticPatients(60, 2, 64, seed=7100).batch().images
        conf = model.classify(x).max(1)
        limit = float(np.quantile(conf, 0.2))  # about a fifth of the originals under it
        model._gates = dataclasses.replace(model.gates, original_limit=limit)
        latent = int(model.bundle.dims["vae_latent"])
        redrawn: list[int] = []

        def redraw(attempt, rows):
            redrawn.extend(int(r) for r in rows)
            return np.random.default_rng(attempt).standard_normal((len(rows), latent)).astype(np.float32)

        noise = np.random.default_rng(0).standard_normal((len(x), latent)).astype(np.float32)
        verdicts = model.anonymize_checked(x, noise, redraw=redraw, draws=3).verdicts
        low = np.flatnonzero(conf < limit)
        assert len(low) >= 10
        for i in low:
            v = verdicts[i]
            assert "medical" in v.failed and v.input_failed and v.draw == 1
            if v.gates["domain"]["passed"]:  # reason() names the first failed gate
                assert "original p(" in v.reason() and "cannot tell" in v.reason()
        assert not set(redrawn) & set(low.tolist())
        assert all(v.gates["medical"]["original_passed"] for i, v in enumerate(verdicts) if conf[i] >= limit)
    finally:
        model.close()
