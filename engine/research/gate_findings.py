"""What the medical gate's failures are: the classifier's misreadings, or findings the image
does not show (docs/gates.md, "Why changed findings pass").

    casemask-research gate-findings --model builtin:reference [--seed 9000 --patients 600 --visits 4]
                                    [--replay] [--limits 0,0.6,0.7,0.8,0.9] [--json OUT]

1. The gates' classifier reads held-out synthetic patients (``--seed``, which neither the
   model, the gates' fitting, calibration nor the evaluation used), binned by how much of
   the finding the image shows (``engine.data.synthetic``: ``effusion_pixels``,
   ``nodule_r``): if a better classifier still reads none of the faintest findings, they
   are not in the pixels (a floor of the synthetic source), not a classifier's error.
2. ``--replay``: the evaluation's in-domain and changed-finding draws (``casemask engine
   evaluate --gates-only``: seed 1000, its noise stream, the node's draws), each image's
   outcome kept; prints the failures (true class, the classifier's reading, how much the
   finding shows, and the nearest prototype to the encoder's medical vector: the
   generator's own reading), and what each limit on the classifier's reading of the
   original (``fit-gates --medical-original``) would cost and prevent on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

EFFUSION_BINS = ((0, 1), (1, 6), (6, 12), (12, 20), (20, 35), (35, 60), (60, 10**6))
NODULE_BINS = ((0.09, 0.105), (0.105, 0.12), (0.12, 0.151))


def reading_by_visibility(probs: np.ndarray, labels: np.ndarray, params: dict[str, np.ndarray]) -> dict:
    """The classifier's reading (``probs`` (N, 3)) of each class, effusions binned by the
    pixels they brighten and nodules by their radius."""
    read = probs.argmax(1)
    out: dict = {"images": len(labels), "accuracy": round(float((read == labels).mean()), 4),
                 "per_class": [round(float((read[labels == c] == c).mean()), 4) for c in range(3)], "effusion": [], "nodule": []}
    e = params["effusion_pixels"]
    for lo, hi in EFFUSION_BINS:
        m = (labels == 2) & (e >= lo) & (e < hi)
        out["effusion"].append({"pixels": [lo, hi], "images": int(m.sum()), "read_effusion": round(float((read[m] == 2).mean()), 3) if m.any() else None})
    r = params["nodule_r"]
    for lo, hi in NODULE_BINS:
        m = (labels == 1) & (r >= lo) & (r < hi)
        out["nodule"].append({"radius": [lo, hi], "images": int(m.sum()), "read_nodule": round(float((read[m] == 1).mean()), 3) if m.any() else None})
    return out


def replay(model, limits: list[float]) -> dict:
    """The evaluation's gate draws on its 300 held-out images, image by image."""
    from engine.data.synthetic import SyntheticPatients, finding_shown
    from engine.evaluate import EvalConfig
    from engine.gates import DRAWS, RETRIED

    cfg = EvalConfig()
    pop = SyntheticPatients(cfg.patients, cfg.visits, model.image_size, cfg.seed).batch()
    held = pop.visits >= cfg.visits - cfg.held_out
    x, y = pop.images[held], pop.labels[held]
    params = {k: v[held] for k, v in pop.params.items()}
    rng = np.random.default_rng(cfg.seed + 17)  # the same stream as engine.evaluate.evaluate_gates
    latent = int(model.bundle.dims["vae_latent"])

    def run(xx, counterfactuals=True, medical=None):
        noise = rng.standard_normal((len(xx), latent)).astype(np.float32)
        targets = rng.integers(0, model.n_classes, len(xx)) if counterfactuals else None
        redraw = lambda attempt, rows: rng.standard_normal((len(rows), latent)).astype(np.float32)  # noqa: E731
        return model.anonymize_checked(xx, noise, targets, redraw=redraw, draws=DRAWS, medical=medical, retry=RETRIED).verdicts

    with_cf, anon_only = run(x), run(x, counterfactuals=False)
    k = model.n_classes
    drawn = np.repeat(np.arange(k), len(x))
    changed_v = run(np.concatenate([x] * k), counterfactuals=False, medical=model.prototypes[drawn])
    probs = model.classify(x)
    med, _, _ = model.encode(x)
    generator_reads = ((med[:, None] - model.prototypes[None]) ** 2).sum(-1).argmin(1)
    shown = finding_shown(params, y)

    def describe(i: int) -> dict:
        return {"image": i, "true": int(y[i]), "read": int(probs[i].argmax()), "p": [round(float(v), 3) for v in probs[i]],
                "generator_reads": int(generator_reads[i]), "effusion_pixels": float(params["effusion_pixels"][i]),
                "nodule_r": round(float(params["nodule_r"][i]), 3), "nodule_contrast": round(float(params["nodule_contrast"][i]), 3)}

    src = np.tile(np.arange(len(x)), k)
    through = np.array(["medical" not in v.failed for v in changed_v])
    changed = drawn != y[src]
    out = {"changed_through": [describe(int(src[j])) | {"drawn": int(drawn[j])} for j in np.flatnonzero(through & changed)],
           "medical_rejected": [describe(i) for i, v in enumerate(with_cf) if "medical" in v.failed],
           "generator_reads_right": round(float((generator_reads == y).mean()), 4), "rules": []}
    conf = probs.max(1)
    any_cf, any_an = np.array([not v.passed for v in with_cf]), np.array([not v.passed for v in anon_only])
    med_cf = np.array(["medical" in v.failed for v in with_cf])
    for c in limits:
        hold = conf < c
        out["rules"].append({"medical_original": c, "held_back": round(float(hold.mean()), 4), "medical": round(float((med_cf | hold).mean()), 4),
                             "any": round(float((any_cf | hold).mean()), 4), "any_anonymized_only": round(float((any_an | hold).mean()), 4),
                             "changed_through": int((through & changed & ~hold[src]).sum()),
                             "changed_through_shown": int((through & changed & ~hold[src] & shown[src]).sum()), "changed": int(changed.sum())})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--seed", type=int, default=9000)
    ap.add_argument("--patients", type=int, default=600)
    ap.add_argument("--visits", type=int, default=4)
    ap.add_argument("--replay", action="store_true", help="also replay the evaluation's gate draws (about 20 s quiet, minutes loaded)")
    ap.add_argument("--limits", default="0,0.6,0.7,0.8,0.9", help="limits on the classifier's reading of the original to cost")
    ap.add_argument("--json", type=Path, help="write everything here")
    args = ap.parse_args(argv)

    from engine import load_model
    from engine.data.synthetic import SyntheticPatients

    model = load_model(args.model, backend="onnxruntime", spin=False)
    try:
        pop = SyntheticPatients(args.patients, args.visits, model.image_size, args.seed).batch()
        report = {"reading": reading_by_visibility(model.classify(pop.images), pop.labels, pop.params)}
        if args.replay:
            report["replay"] = replay(model, [float(v) for v in args.limits.split(",")])
    finally:
        model.close()
    r = report["reading"]
    print(f"the gates' classifier on {r['images']} held-out images (seed {args.seed}): {r['accuracy']:.2%} read right; per class {r['per_class']}")
    for b in r["effusion"]:
        print(f"  effusion brightening {b['pixels'][0]}-{b['pixels'][1]} px: {b['images']} images, read as effusion {b['read_effusion']}")
    for b in r["nodule"]:
        print(f"  nodule radius {b['radius'][0]}-{b['radius'][1]}: {b['images']} images, read as nodule {b['read_nodule']}")
    if "replay" in report:
        rp = report["replay"]
        print(f"evaluation replay: the generator's medical vector (nearest prototype) reads {rp['generator_reads_right']:.2%} right")
        for key in ("changed_through", "medical_rejected"):
            print(f"  {key}: {len(rp[key])}")
            for row in rp[key]:
                print(f"    {json.dumps(row)}")
        for rule in rp["rules"]:
            print(f"  original read with p >= {rule['medical_original']}: held back {rule['held_back']:.3f}, medical {rule['medical']:.3f}, any {rule['any']:.3f} "
                  f"(anonymized only {rule['any_anonymized_only']:.3f}); changed findings through {rule['changed_through']} of {rule['changed']} "
                  f"({rule['changed_through_shown']} of originals that show their finding)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
