"""Rebuild the shipped reference bundle (engine/bundles/reference) from scratch.

    python -m engine.tools.make_reference [--out engine/bundles/reference] [--run runs/ref]

Trains both stages on 200 synthetic patients x (16 training + 4 validation) visits at 64x64
(seed 0; about 50 min
on 2 CPU cores), writes the bundle, then runs the evaluation protocol on patients it
never saw (seed 1000) and stores the metrics in the bundle's model.json. The shipped ONNX
files come after: ``casemask engine export --model builtin:reference``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from engine import bundle
from engine.api import load_model
from engine.data import CLASSES
from engine.evaluate import EvalConfig, evaluate
from engine.train import TrainConfig, train

REFERENCE = TrainConfig(patients=200, visits=16, val_visits=4, epochs=36, vae_epochs=40, seed=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(bundle.BUILTIN_DIR / "reference"))
    ap.add_argument("--run", default="runs/ref", help="checkpoint folder (resumed if present)")
    ap.add_argument("--eval-out", default="runs/ref-eval")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    model = train(REFERENCE, Path(args.run))
    meta = {
        "name": "reference",
        "description": "casemask reference model: 64x64 chest-radiograph-like synthetic patients",
        "classes": list(CLASSES),
        "modalities": ["CR", "DX"],
        "training": {**dataclasses.asdict(REFERENCE), "data": "synthetic (engine.data.SyntheticPatients)"},
    }
    b = bundle.save(model.cpu(), Path(args.out), meta)
    report = evaluate(load_model(b.path, backend="torch"), Path(args.eval_out), EvalConfig(seed=1000))
    meta_path = b.path / "model.json"
    full = json.loads(meta_path.read_text())
    full["evaluation"] = report
    meta_path.write_text(json.dumps(full, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
