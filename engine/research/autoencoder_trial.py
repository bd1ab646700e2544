"""Train the encoder and a generator as a plain autoencoder and say what they learnt.

    casemask-research autoencoder-trial --generator fourier --epochs 12 [--threads 1]

A quick trial of a decoder design before the two-stage training: L1 + SSIM
reconstruction only (the reference model's weights), on the reference model's training
population (200 synthetic patients x 16 visits, seed 0). After each epoch it prints the
reconstruction SSIM on patients it never saw (seed 1000, 40 x 4 visits); at the end, how
much of each anatomy parameter a linear read-out finds in the latent
(``engine.evaluate.latent_probe``; 1 = all of it, 0 or below = none).

``--fit-ribs W`` asks a linear head on the latent for the ribs as
:func:`engine.ribs.fit_ribs` reads them from each image (no labels; the same loss as
``casemask engine train --rib-fit W``) and prints the head's R^2 on unseen patients.

``--supervise-ribs W`` is a diagnostic, possible only on synthetic data: a linear head on
the latent must also predict the ribs' frequency, curvature and phase in the image (what
drew them, standardised), with weight W. It answers how well the generator draws ribs
once the latent carries them, apart from whether an encoder learns to keep them.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

from engine.data import SyntheticPatients
from engine.evaluate import latent_probe
from engine.model import GENERATORS, Encoder, ModelConfig, ssim
from engine.ribs import fit_ribs
from engine.threads import torch_threads


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the finite differences of two images: phase-sensitive, unlike a spectrum."""
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    return F.l1_loss(dy(a), dy(b)) + F.l1_loss(dx(a), dx(b))


def rib_targets(params: dict[str, np.ndarray]) -> torch.Tensor:
    """Frequency, curvature and image-frame phase (cos, sin) of the ribs."""
    phase = params["rib_phase_image"]
    t = np.stack([1 / params["rib_spacing"], params["rib_curv"], np.cos(phase), np.sin(phase)], 1)
    return torch.from_numpy(t.astype(np.float32))


def standardised(fit: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the mean and standard deviation of the first."""
    mean, std = fit.mean(0), fit.std(0)
    return (fit - mean) / std, (test - mean) / std


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default="conv", choices=sorted(GENERATORS))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="two trials side by side on two cores: 1 each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--supervise-ribs", type=float, default=0.0, metavar="W",
                    help="weight of a diagnostic loss asking the latent for the ribs' parameters (0: off)")
    ap.add_argument("--fit-ribs", type=float, default=0.0, metavar="W",
                    help="weight of a loss asking the latent for the ribs as engine.ribs.fit_ribs reads them "
                    "from the image (label-free; 0: off)")
    ap.add_argument("--edge-weight", type=float, default=0.0, metavar="W",
                    help="weight of an L1 loss on the image's horizontal and vertical differences (0: off)")
    args = ap.parse_args(argv)
    with torch_threads(args.threads):
        return trial(args)


def trial(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    cfg = ModelConfig(width=24, other_dim=48, n_identities=args.patients, generator=args.generator)
    enc, gen = Encoder(cfg), GENERATORS[cfg.generator](cfg)
    # Linear heads on the latent, each with its loss weight and standardised targets on the
    # training and the unseen images (both always built, so the random init is the same
    # whichever are switched on).
    rib_head, fit_head = torch.nn.Linear(cfg.latent_dim, 4), torch.nn.Linear(cfg.latent_dim, 5)
    params = [*enc.parameters(), *gen.parameters()]
    opt = torch.optim.Adam([*params, *rib_head.parameters(), *fit_head.parameters()], lr=1e-3, betas=(0.5, 0.999))
    train = SyntheticPatients(args.patients, 16, cfg.image_size, args.seed).batch()
    x = torch.from_numpy(train.images)
    unseen = SyntheticPatients(40, 4, cfg.image_size, 1000).batch()
    heads = []
    if args.supervise_ribs:
        targets = standardised(rib_targets(train.params), rib_targets(unseen.params))
        heads.append(("rib head R^2 on them (frequency, curvature, cos, sin)", args.supervise_ribs, rib_head, *targets))
    if args.fit_ribs:
        targets = standardised(torch.from_numpy(fit_ribs(train.images)), torch.from_numpy(fit_ribs(unseen.images)))
        heads.append(("fit head R^2 on them (frequency, curvature, tilt, cos, sin)", args.fit_ribs, fit_head, *targets))
    steps = len(x) // args.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps)
    print(f"{args.generator}: {sum(p.numel() for p in params)} parameters, {steps} steps an epoch", flush=True)

    @torch.no_grad()
    def encode(images: np.ndarray) -> list[np.ndarray]:
        enc.eval()
        out = [torch.cat(t) for t in zip(*(enc(torch.from_numpy(images[s : s + 256])) for s in range(0, len(images), 256)))]
        enc.train()
        return [t.numpy() for t in out]

    for epoch in range(args.epochs):
        t0 = time.time()
        order = torch.randperm(len(x))
        for k in range(steps):
            idx = order[k * args.batch_size : (k + 1) * args.batch_size]
            xb = x[idx]
            parts = enc(xb)
            rec = gen(*parts)
            loss = 20 * F.l1_loss(rec, xb) + 5 * (1 - ssim(rec, xb))
            if args.edge_weight:
                loss = loss + args.edge_weight * edge_l1(rec, xb)
            for _, weight, head, want, _ in heads:
                loss = loss + weight * F.mse_loss(head(torch.cat(parts, 1)), want[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        z_unseen = [torch.from_numpy(v) for v in encode(unseen.images)]
        gen.eval()
        with torch.no_grad():
            rec = gen(*z_unseen)
            got = {label: head(torch.cat(z_unseen, 1)) for label, _, head, _, _ in heads}
        gen.train()
        score = float(ssim(torch.from_numpy(unseen.images).double(), rec.double()))
        line = f"epoch {epoch + 1}: {time.time() - t0:.0f} s, SSIM on unseen patients {score:.4f}"
        for label, _, _, _, want in heads:
            r2 = 1 - ((got[label] - want) ** 2).mean(0) / want.var(0)
            line += f", {label} " + " ".join(f"{v:.3f}" for v in r2.tolist())
        print(line, flush=True)
    fit, test = encode(train.images), encode(unseen.images)
    probe = latent_probe((fit[1], np.concatenate(fit, 1), train.params), (test[1], np.concatenate(test, 1), unseen.params))
    for name, r2 in probe.items():
        print(f"latent read-out R^2 {name}: {r2['latent']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
