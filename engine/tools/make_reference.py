"""Rebuild the shipped reference bundle (engine/bundles/reference) from scratch.

    python -m engine.tools.make_reference [--out engine/bundles/reference] [--run runs/ref] [--device cuda]

One training, ``train(REFERENCE)``, on 1000 synthetic patients x (24 training + 4
validation) visits at 64x64 (seed 0): the fourier generator at width 32, the label-free
rib fit, privacy heads pushed towards a uniform prediction, the disease guide from the
first step, the SSIM term at weight 10, batches of 64; 8 stage-1 epochs (3000 steps) and
20 identity-VAE epochs. The shipped weights were trained on one NVIDIA H100 (stage 1
took 5 minutes while three other recipes shared the GPU). CUDA's convolution kernels are
not bit-deterministic, so a rerun gives a model of the same recipe, not the same
weights; on the CPU the recipe is deterministic but slow (4.5 s a step on 2 cores, nearly
4 hours).

Then it writes the bundle and runs the evaluation protocol on patients it never saw
(seed 1000, 2 CPU threads) and stores the metrics in the bundle's model.json. ONNX
exports are not shipped: they are made on first use, or by ``casemask engine export``.
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
from engine.model import DisentanglementModel
from engine.train import TrainConfig, train

log = logging.getLogger("make_reference")

REFERENCE = TrainConfig(
    patients=1000, visits=24, val_visits=4, epochs=8, vae_epochs=20, seed=0, batch_size=64,
    width=32, ssim_weight=10.0, generator="fourier", rib_fit=10.0, privacy="uniform",
    disease_guide=1.0, threads=2,
)
REFERENCE_EVAL = EvalConfig(seed=1000, threads=2)


def save_reference(model: DisentanglementModel, out: Path, cfg: TrainConfig = REFERENCE, trained_on: str = "cpu") -> bundle.Bundle:
    """Write ``model`` as the reference bundle with the recipe's metadata (no evaluation yet)."""
    meta = {
        "name": "reference",
        "description": "casemask reference model: 64x64 chest-radiograph-like synthetic patients",
        "classes": list(CLASSES),
        "modalities": ["CR", "DX"],
        "training": {**dataclasses.asdict(cfg), "data": "synthetic (engine.data.SyntheticPatients)", "trained_on": trained_on},
    }
    return bundle.save(model.cpu(), out, meta)


def evaluate_reference(b: bundle.Bundle, out: Path) -> dict:
    """Run the protocol on ``b`` and store the report in its model.json."""
    report = evaluate(load_model(b.path, backend="torch"), out, REFERENCE_EVAL)
    meta_path = b.path / "model.json"
    full = json.loads(meta_path.read_text())
    full["evaluation"] = report
    meta_path.write_text(json.dumps(full, indent=1) + "\n")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(bundle.BUILTIN_DIR / "reference"))
    ap.add_argument("--run", default="runs/ref", help="checkpoint folder (resumed if present)")
    ap.add_argument("--eval-out", default="runs/ref-eval")
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="training device (default: cuda when present). On 2 CPU cores a step of this "
        "recipe took 4.5 s, so the 3000 steps take nearly 4 hours.",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    cfg = dataclasses.replace(REFERENCE, device=args.device)
    model = train(cfg, Path(args.run))
    trained_on = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    b = save_reference(model, Path(args.out), cfg, trained_on)
    print(json.dumps(evaluate_reference(b, Path(args.eval_out)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
