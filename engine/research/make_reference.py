"""Rebuild the shipped reference bundle (engine/bundles/reference) from scratch.

    casemask-research make-reference [--out engine/bundles/reference] [--run runs/ref] [--device cuda]

One training, ``train(REFERENCE)``, on 1000 synthetic patients x (24 training + 4
validation) visits at 64x64 (seed 0): the fourier generator at width 32, the label-free
rib fit, privacy heads pushed towards a uniform prediction, the disease guide from the
first step, the SSIM term at weight 10, batches of 64; 8 stage-1 epochs (3000 steps) and
20 identity-VAE epochs. Then the generator alone is refined (engine.refine, ``REFINE``),
with the disease guide on reconstructions, anonymized images and counterfactuals: 7500
steps of 32 on the same training visits, then 3300 steps at a lower rate on 6000
patients of the training seed x 4 visits, with swap consistency (the first refinement
had begun to learn its 1000 patients, SSIM 0.865 on them and 0.842 on unseen ones, and
re-identification of its anonymized images had risen from 0.003 to 0.020), then 6500
steps of 64 on 12000 patients x 4 visits with the re-identification guard as well, then
4000 steps of 32 at 3e-4 on those patients without it.

The shipped weights: stage 1 and 2 on one NVIDIA H100 (stage 1 took 5 minutes while three
other recipes shared the GPU); the first, second and fourth refinements on 2 CPU cores
(0.6 s a step), the third on one NVIDIA H200 (53 ms a step while three other recipes
shared it, 6 minutes).
CUDA's convolution kernels are not bit-deterministic, so a rerun gives a model of the
same recipe, not the same weights; on the CPU the recipe is deterministic but stage 1 is
slow (4.5 s a step on 2 cores, nearly 4 hours).

Then it writes the bundle, fits its gates (``engine.gate_fit``, the defaults of
``casemask engine fit-gates``, 2 CPU threads), which also ships the graphs the node runs
(``graphs/``, fp32 ONNX), and runs the evaluation protocol on patients it never saw (seed
1000, 2 CPU threads), gates included, and stores the metrics in the bundle's model.json.
Other ONNX exports are made on first use, or by ``casemask engine export``.

The bundle says what it is: ``intended_use`` demonstration, ``training_data`` synthetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from engine import bundle
from engine.api import load_model
from engine.data import CLASSES
from engine.evaluate import EvalConfig, evaluate
from engine.gate_fit import GateFitConfig, fit_gates
from engine.model import DisentanglementModel
from engine.refine import RefineConfig, data_spec, monitor_set, refine
from engine.train import Dataset, TrainConfig, synthetic_split, train

log = logging.getLogger("make_reference")

REFERENCE = TrainConfig(
    patients=1000, visits=24, val_visits=4, epochs=8, vae_epochs=20, seed=0, batch_size=64,
    width=32, ssim_weight=10.0, generator="fourier", rib_fit=10.0, privacy="uniform",
    disease_guide=1.0, threads=2,
)
# Refinement stages: (recipe, (patients, visits) of the training seed, or None: the
# training visits themselves).
REFINE: tuple[tuple[RefineConfig, tuple[int, int] | None], ...] = (
    (RefineConfig(steps=7500, batch_size=32, guide_steps=600, threads=2), None),
    (RefineConfig(steps=3300, batch_size=32, lr=3e-4, guide_steps=600, swap_weight=0.5, threads=2), (6000, 4)),
    (RefineConfig(steps=6500, batch_size=64, lr=1e-3, guide_steps=600, swaps=16, swap_weight=0.5, identity_guide=1.0, threads=2), (12000, 4)),
    (RefineConfig(steps=4000, batch_size=32, lr=3e-4, guide_steps=600, swap_weight=0.5, threads=2), (12000, 4)),
)
REFERENCE_EVAL = EvalConfig(seed=1000, threads=2)
REFERENCE_GATES = GateFitConfig(threads=2)
INTENDED_USE = {
    "kind": "demonstration",
    "summary": "a demonstration of the method on synthetic 64x64 chest-radiograph-like images; it redraws any input as a synthetic chest, so it does not anonymize real patients' images",
}


def refinement_record(stages=REFINE, cfg: TrainConfig = REFERENCE, device: str = "cpu") -> list[dict]:
    """The bundle's ``refinement`` entry for ``stages`` (as ``casemask engine refine`` writes it)."""
    out = []
    for rcfg, pop in stages:
        patients, visits = pop or (cfg.patients, cfg.visits)
        out.append({**dataclasses.asdict(rcfg), "device": device, "data": data_spec(patients * visits, patients)})
    return out


def refined_data(cfg: TrainConfig, pop: tuple[int, int] | None, train_data: Dataset, made: dict | None = None) -> Dataset:
    """A refinement stage's data; ``made`` keeps populations already made for earlier
    stages (the last two share 12000 x 4)."""
    if pop is None:
        return train_data
    made = {} if made is None else made
    if pop not in made:
        made[pop] = synthetic_split(dataclasses.replace(cfg, patients=pop[0], visits=pop[1]), workers=2)[0]
    return made[pop]


def save_reference(
    model: DisentanglementModel, out: Path, cfg: TrainConfig = REFERENCE, trained_on: str = "cpu",
    refinement: list[dict] | None = None,
) -> bundle.Bundle:
    """Write ``model`` as the reference bundle with the recipe's metadata (no evaluation yet)."""
    meta = {
        "name": "reference",
        "description": "casemask reference model: 64x64 chest-radiograph-like synthetic patients",
        "classes": list(CLASSES),
        "modalities": ["CR", "DX"],
        "intended_use": INTENDED_USE,
        "training_data": training_data(cfg),
        "training": {**dataclasses.asdict(cfg), "data": "synthetic (engine.data.SyntheticPatients)", "trained_on": trained_on},
    }
    if refinement:
        meta["refinement"] = refinement
    return bundle.save(model.cpu(), out, meta)


def training_data(cfg: TrainConfig = REFERENCE) -> dict:
    """What the reference was trained on, as its model.json says (``training_data``)."""
    return {
        "kind": "synthetic",
        "summary": f"synthetic chest-radiograph-like patients (engine.data.SyntheticPatients, seed {cfg.seed}): {cfg.patients} patients x {cfg.visits} visits "
                   "for training, generator refinements on up to 12000 patients x 4 visits of the same seed; no real image",
        "patients": cfg.patients,
        "images": cfg.patients * cfg.visits,
        "image_size": cfg.image_size,
    }


def evaluate_reference(b: bundle.Bundle, out: Path) -> dict:
    """Run the protocol on ``b`` and store the report in its model.json."""
    report = evaluate(load_model(b.path, backend="torch"), out, REFERENCE_EVAL)
    meta_path = b.path / "model.json"
    full = json.loads(meta_path.read_text())
    full["evaluation"] = report
    meta_path.write_text(json.dumps(full, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="casemask-research make-reference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(bundle.BUILTIN_DIR / "reference"))
    ap.add_argument("--run", default="runs/ref", help="checkpoint folder (resumed if present; the refinement's in RUN/refine)")
    ap.add_argument("--eval-out", default="runs/ref-eval")
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="training device (default: cuda when present). On 2 CPU cores a step of this "
        "recipe took 4.5 s, so the 3000 steps take nearly 4 hours.",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    cfg = dataclasses.replace(REFERENCE, device=args.device)
    data = synthetic_split(cfg, workers=2)
    model = train(cfg, Path(args.run), data=data)
    made: dict = {}
    for n, (rcfg, pop) in enumerate(REFINE):
        rcfg = dataclasses.replace(rcfg, device=args.device)
        refine(model, rcfg, refined_data(cfg, pop, data[0], made), Path(args.run) / f"refine{n + 1}", monitor_set(cfg.image_size))
    on = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    b = save_reference(model, Path(args.out), cfg, on, refinement_record(REFINE, cfg, args.device))
    b = fit_gates(b, REFERENCE_GATES)
    print(json.dumps(evaluate_reference(b, Path(args.eval_out)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
