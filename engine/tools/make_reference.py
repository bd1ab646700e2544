"""Rebuild the shipped reference bundle (engine/bundles/reference) from scratch.

    python -m engine.tools.make_reference [--out engine/bundles/reference] [--run runs/ref]

Two phases, both on 200 synthetic patients x (16 training + 4 validation) visits at 64x64
(seed 0, 2 CPU threads):

1. ``train(REFERENCE)``: the fourier generator, the label-free rib fit and the privacy
   heads pushed to a uniform prediction; 36 stage-1 epochs (about 80 minutes on 2 CPU
   cores; resumed from ``--run`` if present). Its identity VAE is not kept.
2. :func:`guided_finetune`: 8 more stage-1 epochs with the disease guide (a classifier
   that learns the disease from real images and, held fixed, asks the generated images to
   show it), then a fresh identity VAE (about 25 minutes).

Then it writes the bundle and runs the evaluation protocol on patients it never saw
(seed 1000) and stores the metrics in the bundle's model.json. The shipped ONNX files
come after: ``casemask engine export --model builtin:reference``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from engine import bundle
from engine.api import load_model
from engine.data import CLASSES
from engine.evaluate import EvalConfig, evaluate
from engine.model import DisentanglementModel, IdentityVAE, ModelConfig
from engine.ribs import fit_ribs
from engine.threads import torch_threads
from engine.train import (
    TrainConfig,
    compute_prototypes,
    guide_classifier,
    stage1_step,
    stage2_step,
    synthetic_split,
    train,
    validate,
)

log = logging.getLogger("make_reference")

REFERENCE = TrainConfig(
    patients=200, visits=16, val_visits=4, epochs=36, vae_epochs=40, seed=0,
    generator="fourier", rib_fit=10.0, privacy="uniform", threads=2,
)
FINETUNE = dataclasses.replace(REFERENCE, disease_guide=1.0)
FINETUNE_EPOCHS, FINETUNE_LR, FINETUNE_SEED, GUIDE_PRETRAIN_EPOCHS = 8, 3e-4, 1, 6


def guided_finetune(checkpoint: Path, cfg: TrainConfig = FINETUNE, epochs: int = FINETUNE_EPOCHS, lr: float = FINETUNE_LR, seed: int = FINETUNE_SEED) -> DisentanglementModel:
    """Phase 2 of the reference recipe, from phase 1's checkpoint; deterministic per seed."""
    with torch_threads(cfg.threads):
        torch.manual_seed(seed)
        ck = torch.load(checkpoint, weights_only=False)
        model = DisentanglementModel(ModelConfig(**ck["model_config"]))
        model.load_state_dict(ck["model"])
        rib_head = nn.Linear(model.cfg.id_dim + model.cfg.other_dim, 5)
        rib_head.load_state_dict(ck["rib_head"])
        tr, va = synthetic_split(cfg)
        fitted = torch.from_numpy(fit_ribs(tr.images))
        rib_t = (fitted - fitted.mean(0)) / fitted.std(0).clamp_min(1e-6)
        guide = guide_classifier(n_classes=model.cfg.n_classes)
        n, bs = len(tr.labels), cfg.batch_size
        steps = n // bs
        # The guide first learns the disease from real images alone.
        opt = torch.optim.Adam(guide.parameters(), lr=1e-3)
        for epoch in range(GUIDE_PRETRAIN_EPOCHS):
            order = torch.randperm(n)
            for k in range(steps):
                idx = order[k * bs : (k + 1) * bs]
                loss = F.cross_entropy(guide(tr.images[idx]), tr.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc = (guide(va.images).argmax(1) == va.labels).float().mean().item()
            log.info("guide epoch %d: validation accuracy %.3f", epoch + 1, acc)
        params = [p for name, p in model.named_parameters() if not name.startswith(("discriminator", "vae"))]
        opt_g = torch.optim.Adam(params + list(rib_head.parameters()) + list(guide.parameters()), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=epochs * steps)
        model.train()
        for epoch in range(epochs):
            order, acc, t0 = torch.randperm(n), {}, time.time()
            for k in range(steps):
                idx = order[k * bs : (k + 1) * bs]
                stats = stage1_step(model, tr.images[idx], tr.patient_ids[idx], tr.labels[idx], opt_g, opt_d, cfg, 1.0, (rib_head, rib_t[idx]), guide)
                sched.step()
                acc = {key: acc.get(key, 0.0) + v for key, v in stats.items()}
            entry = {key: round(v / steps, 4) for key, v in acc.items()}
            entry.update(validate(model, va))
            log.info("fine-tune epoch %d (%.0f s): %s", epoch + 1, time.time() - t0, entry)
        # A fresh identity VAE on the fine-tuned encoder's identity vectors.
        with torch.no_grad():
            model.eval()
            idents = torch.cat([model.encoder(tr.images[s : s + 512])[1] for s in range(0, n, 512)])
            center, scale = idents.mean(0), idents.std(0).clamp_min(1e-6)
        for p in model.parameters():
            p.requires_grad_(False)
        model.vae = IdentityVAE(model.cfg)
        model.vae.center.copy_(center)
        model.vae.scale.copy_(scale)
        opt_v = torch.optim.Adam(model.vae.parameters(), lr=2e-3)
        for _ in range(cfg.vae_epochs):
            order = torch.randperm(n)
            for k in range(steps):
                stage2_step(model, idents[order[k * bs : (k + 1) * bs]], opt_v, cfg)
        for p in model.parameters():
            p.requires_grad_(True)
        compute_prototypes(model, tr)
        model.eval()
        return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(bundle.BUILTIN_DIR / "reference"))
    ap.add_argument("--run", default="runs/ref", help="phase 1 checkpoint folder (resumed if present)")
    ap.add_argument("--eval-out", default="runs/ref-eval")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    train(REFERENCE, Path(args.run))
    model = guided_finetune(Path(args.run) / "checkpoint.pt")
    meta = {
        "name": "reference",
        "description": "casemask reference model: 64x64 chest-radiograph-like synthetic patients",
        "classes": list(CLASSES),
        "modalities": ["CR", "DX"],
        "training": {
            **dataclasses.asdict(REFERENCE),
            "data": "synthetic (engine.data.SyntheticPatients)",
            "finetune": {"epochs": FINETUNE_EPOCHS, "lr": FINETUNE_LR, "seed": FINETUNE_SEED, "disease_guide": FINETUNE.disease_guide, "guide_pretrain_epochs": GUIDE_PRETRAIN_EPOCHS},
        },
    }
    b = bundle.save(model.cpu(), Path(args.out), meta)
    report = evaluate(load_model(b.path, backend="torch"), Path(args.eval_out), EvalConfig(seed=1000, threads=2))
    meta_path = b.path / "model.json"
    full = json.loads(meta_path.read_text())
    full["evaluation"] = report
    meta_path.write_text(json.dumps(full, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
