"""Two-stage training: disentanglement, then the identity VAE.

Stage 1 trains encoder, generator, heads and discriminator with reconstruction,
classification, swap-consistency, privacy and adversarial losses. Stage 2 freezes all of
that and trains the identity VAE on the encoder's identity vectors with reconstruction +
KL + the max-entropy loss of the frozen identity head on sampled identities, so that a
synthetic identity belongs to nobody.

Checkpoints are written after every epoch (``DIR/checkpoint.pt``); running again with the
same ``out`` resumes where the last run stopped. Training is deterministic per seed on
the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from engine.data import SyntheticPatients
from engine.model import DisentanglementModel, ModelConfig, entropy_loss, grad_reverse, ssim
from engine.ribs import fit_ribs
from engine.threads import torch_threads

log = logging.getLogger(__name__)


PRIVACY_MODES = ("reverse", "uniform")


class ResumeError(ValueError):
    """The checkpoint in ``out`` was trained with settings this run cannot resume."""


@dataclasses.dataclass
class TrainConfig:
    """What to train on and for how long."""

    image_size: int = 64
    patients: int = 200
    visits: int = 16
    val_visits: int = 4
    seed: int = 0
    epochs: int = 20
    vae_epochs: int = 30
    batch_size: int = 16  # small batches: 6 epochs of autoencoding reach SSIM 0.68 vs 0.61 at 64
    lr: float = 1e-3
    rec_weight: float = 20.0
    ssim_weight: float = 5.0  # 1 - SSIM of the reconstruction, beside L1: sharper ribs and edges
    adv_weight: float = 0.02
    privacy_weight: float = 0.3
    swap_weight: float = 0.5
    vae_kl_weight: float = 1.0
    # Max-entropy term on sampled identities. Weighed against staying where the generator
    # can draw: at 0.5 the samples left the identity distribution (norm 3-12 against 68)
    # and disease accuracy on anonymized images fell to 0.52; at 0 the identity head named
    # a training patient in most samples. 0.05: median top identity probability 0.27.
    vae_entropy_weight: float = 0.05
    warmup: float = 0.3  # fraction of epochs on reconstruction and heads alone
    ramp: float = 0.2  # then this fraction ramps swap, privacy and adversarial terms in
    width: int = 24
    other_dim: int = 48
    generator: str = "conv"  # or "fourier" (engine.model.FourierGenerator)
    # Weight of a loss asking a linear head on the latent for the ribs as engine.ribs.fit_ribs
    # reads them from each training image (label-free); 0: off. See engine/ribs.py.
    rib_fit: float = 0.0
    # How the encoder defeats the privacy heads. "reverse": it maximizes their
    # cross-entropy through gradient reversal, which has no bound: a run with --rib-fit
    # drove it from chance (2 ln 200 = 10.6 nats for the two heads) to 20.6, making the
    # heads confidently wrong, which bends the kept vectors (swap loss 2.5 -> 6.3, SSIM
    # 0.839 -> 0.809). "uniform": the heads learn on detached vectors, and the encoder
    # pushes their prediction towards uniform, a loss whose minimum is chance itself.
    privacy: str = "reverse"
    # Weight of a loss asking the generated images (reconstruction, identity swap, medical
    # swap) to show their disease to an image classifier that learns from real training
    # images only and is held fixed for the generated ones; 0: off. Without it the swap
    # losses let the encoder find the disease in cues its own generator paints, and the
    # fourier generator with --rib-fit dropped most nodules (an independent evaluator
    # called the disease right on 0.57 of its reconstructions, 0.97 of the originals).
    disease_guide: float = 0.0
    device: str = "cpu"
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        if self.privacy not in PRIVACY_MODES:
            raise ValueError(f"privacy must be one of {PRIVACY_MODES}, not {self.privacy!r}")


@dataclasses.dataclass
class Dataset:
    images: torch.Tensor
    patient_ids: torch.Tensor
    labels: torch.Tensor


def synthetic_split(cfg: TrainConfig, workers: int = 0) -> tuple[Dataset, Dataset]:
    """Training and validation visits of the same synthetic patients (made by ``workers``
    processes when > 1)."""
    b = SyntheticPatients(cfg.patients, cfg.visits + cfg.val_visits, cfg.image_size, cfg.seed).batch(workers)
    val = b.visits >= cfg.visits
    to = lambda m: Dataset(torch.from_numpy(b.images[m]), torch.from_numpy(b.patient_ids[m]), torch.from_numpy(b.labels[m]))  # noqa: E731
    return to(~val), to(val)


def _progress(prefix: str, i: int, n: int, sums: dict, stream=sys.stderr) -> None:
    """A progress bar with the mean of ``sums`` (totals over ``i`` steps, floats or 0-d
    tensors) after step ``i`` of ``n``: at the end, and on a terminal every 1% of the way
    (reading a tensor waits for the device)."""
    if i != n and not (stream.isatty() and i % max(1, n // 100) == 0):
        return
    bar = "#" * int(30 * i / n)
    text = " ".join(f"{k}={float(v) / i:.3f}" for k, v in sums.items())
    stream.write(f"\r{prefix} [{bar:<30}] {i}/{n} {text}")
    if i == n:
        stream.write("\n")
    stream.flush()


def guide_classifier(width: int = 16, n_classes: int = 3) -> nn.Module:
    """A small image classifier for ``TrainConfig.disease_guide`` (training only).

    No batch normalisation: it is applied with fixed weights to generated images, and
    those must not move running statistics learnt on real ones.
    """
    layers: list[nn.Module] = []
    c = 1
    for w in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = w
    return nn.Sequential(*layers, nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, n_classes))


def frozen(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)`` with its weights held fixed: gradients reach the inputs only."""
    return functional_call(module, {n: w.detach() for n, w in module.named_parameters()}, args)



def _privacy_losses(model: DisentanglementModel, m: torch.Tensor, o: torch.Tensor, pid: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, the heads' cross-entropy on the patient) for the privacy heads.

    The second value is what the stats report in both modes: chance is 2 ln(n_identities).
    """
    heads = ((model.privacy_med, m), (model.privacy_other, o))
    if mode == "reverse":
        ce = sum(F.cross_entropy(head(grad_reverse(v)), pid) for head, v in heads)
        return ce, ce
    if mode != "uniform":
        raise ValueError(f"privacy must be one of {PRIVACY_MODES}, not {mode!r}")
    # The heads learn to find the patient on vectors the encoder does not answer for ...
    ce = sum(F.cross_entropy(head(v.detach()), pid) for head, v in heads)
    # ... and the encoder, through the heads' weights held fixed, makes their prediction
    # uniform: the cross-entropy against the uniform distribution, at least ln(classes).
    confusion = sum(-F.log_softmax(frozen(head, v), 1).mean(1).mean() for head, v in heads)
    return ce + confusion, ce


def stage1_step(
    model: DisentanglementModel,
    x: torch.Tensor,
    pid: torch.Tensor,
    y: torch.Tensor,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    cfg: TrainConfig,
    ramp: float = 1.0,
    ribs: tuple[nn.Module, torch.Tensor] | None = None,
    guide: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step of stage 1 on a batch; returns the loss terms as detached
    0-d tensors (reading one, ``.item()``, waits for the device: the training loop sums
    them where they are and reads them once an epoch, so a GPU runs ahead of Python).

    ``ramp`` (0 to 1) scales the swap, privacy and adversarial terms: starting them at
    full weight lets the encoder satisfy swap consistency with constant vectors.
    ``ribs``: a linear head on the identity and other vectors and the batch's standardised
    :func:`engine.ribs.fit_ribs` targets, weighted by ``cfg.rib_fit``. The head never reads
    the medical vector: on the whole latent it took from the disease (the model's own
    disease head on validation visits 0.886 against 0.941 at epoch 20 of the reference
    recipe), and the ribs are anatomy (identity) seen through the acquisition (other).
    ``guide``: the :func:`guide_classifier` of ``cfg.disease_guide``; it learns the disease
    from the real batch, and the generated images must show it to the fixed classifier
    (the medical swap, the donor's disease).
    """
    enc, gen = model.encoder, model.generator
    perm = torch.roll(torch.arange(x.shape[0], device=x.device), 1)
    m, i, o = enc(x)
    rec = gen(m, i, o)
    l_rec = F.l1_loss(rec, x)
    l_ssim = 1.0 - ssim(rec, x)
    l_cls = F.cross_entropy(model.disease_head(m), y) + F.cross_entropy(model.identity_head(i), pid)
    l_priv, priv_ce = _privacy_losses(model, m, o, pid, cfg.privacy)
    # Identity swap: source keeps medical and other, donor (perm) gives identity.
    x_id = gen(m, i[perm], o)
    m2, i2, o2 = enc(x_id)
    # Swap consistency compares the swapped slot with the DONOR's vector and the kept slots
    # with the SOURCE's. (The paper's released code compares the swapped slot with the
    # source, which would pull the new image back to the old identity and undo the swap.)
    l_swap = F.l1_loss(i2, i[perm].detach()) + F.l1_loss(m2, m.detach()) + F.l1_loss(o2, o.detach())
    l_swap = l_swap + F.cross_entropy(model.identity_head(i2), pid[perm]) + F.cross_entropy(model.disease_head(m2), y)
    # Medical swap: source keeps identity and other, donor gives the medical vector.
    x_md = gen(m[perm], i, o)
    m3, i3, o3 = enc(x_md)
    l_swap = l_swap + F.l1_loss(m3, m[perm].detach()) + F.l1_loss(i3, i.detach()) + F.l1_loss(o3, o.detach())
    l_swap = l_swap + F.cross_entropy(model.disease_head(m3), y[perm]) + F.cross_entropy(model.identity_head(i3), pid)
    fakes = torch.cat([rec, x_id, x_md])
    l_adv = F.softplus(-model.discriminator(fakes)).mean()
    loss = cfg.rec_weight * l_rec + cfg.ssim_weight * l_ssim + l_cls + ramp * (cfg.privacy_weight * l_priv + cfg.swap_weight * l_swap + cfg.adv_weight * l_adv)
    stats = {}
    if ribs is not None:
        head, target = ribs
        l_ribs = F.mse_loss(head(torch.cat([i, o], 1)), target)
        loss = loss + cfg.rib_fit * l_ribs
        stats["ribs"] = l_ribs.detach()
    if guide is not None:
        l_guide_real = F.cross_entropy(guide(x), y)
        # The swaps join as the other swap terms do (``ramp``): early swaps are not images.
        l_guide = F.cross_entropy(frozen(guide, rec), y) + ramp * (
            F.cross_entropy(frozen(guide, x_id), y) + F.cross_entropy(frozen(guide, x_md), y[perm])
        )
        loss = loss + l_guide_real + cfg.disease_guide * l_guide
        stats["guide_real"], stats["guide"] = l_guide_real.detach(), l_guide.detach()
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    # Discriminator step.
    d_real = model.discriminator(x)
    d_fake = model.discriminator(fakes.detach())
    l_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    opt_d.zero_grad(set_to_none=True)
    l_d.backward()
    opt_d.step()
    return {"rec": l_rec.detach(), "ssim": 1.0 - l_ssim.detach(), "cls": l_cls.detach(), "swap": l_swap.detach(), "priv": priv_ce.detach(), **stats}


@torch.no_grad()
def validate(model: DisentanglementModel, data: Dataset, batch: int = 256) -> dict[str, float]:
    """Reconstruction L1 and accuracy of the model's own heads on validation visits."""
    model.eval()
    l1, dis, ident, n = 0.0, 0, 0, 0
    for s in range(0, len(data.labels), batch):
        x = data.images[s : s + batch]
        m, i, o = model.encoder(x)
        l1 += F.l1_loss(model.generator(m, i, o), x, reduction="sum").item() / x[0].numel()
        dis += (model.disease_head(m).argmax(1) == data.labels[s : s + batch]).sum().item()
        ident += (model.identity_head(i).argmax(1) == data.patient_ids[s : s + batch]).sum().item()
        n += x.shape[0]
    model.train()
    return {"val_l1": l1 / n, "val_disease_acc": dis / n, "val_identity_acc": ident / n}


def stage2_step(model: DisentanglementModel, ident: torch.Tensor, opt: torch.optim.Optimizer, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    recon, mu, logvar = model.vae(ident)
    l_rec = F.mse_loss(recon, model.vae.standardize(ident))
    l_kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    z = torch.randn(ident.shape[0], model.cfg.vae_latent, device=ident.device)
    l_ent = entropy_loss(model.identity_head(model.vae.sample(z)))
    loss = l_rec + cfg.vae_kl_weight * l_kl + cfg.vae_entropy_weight * l_ent
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"vae_rec": l_rec.detach(), "kl": l_kl.detach(), "negent": l_ent.detach()}


@torch.no_grad()
def compute_prototypes(model: DisentanglementModel, data: Dataset) -> None:
    model.eval()
    meds = torch.cat([model.encoder(data.images[s : s + 512])[0] for s in range(0, len(data.labels), 512)])
    for c in range(model.cfg.n_classes):
        model.prototypes[c] = meds[data.labels == c].mean(0)


def train(
    cfg: TrainConfig,
    out: Path,
    data: tuple[Dataset, Dataset] | None = None,
    on_epoch: Callable[[str, int, dict[str, float]], None] | None = None,
) -> DisentanglementModel:
    """Train (or resume) both stages; writes ``out/checkpoint.pt`` and ``out/history.json``."""
    with torch_threads(cfg.threads):
        return _train(cfg, out, data, on_epoch)


def _train(
    cfg: TrainConfig,
    out: Path,
    data: tuple[Dataset, Dataset] | None,
    on_epoch: Callable[[str, int, dict[str, float]], None] | None,
) -> DisentanglementModel:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    train_data, val_data = data if data is not None else synthetic_split(cfg)
    n_ids = int(train_data.patient_ids.max()) + 1
    mcfg = ModelConfig(image_size=cfg.image_size, n_identities=n_ids, width=cfg.width, other_dim=cfg.other_dim, generator=cfg.generator)
    model = DisentanglementModel(mcfg).to(device)
    gen_params = [p for n, p in model.named_parameters() if not n.startswith(("discriminator", "vae"))]
    # A training-only head (not in the bundle): asks the latent for the ribs' fit.
    rib_head = nn.Linear(mcfg.id_dim + mcfg.other_dim, 5).to(device) if cfg.rib_fit else None
    if rib_head is not None:
        gen_params += list(rib_head.parameters())
    guide = guide_classifier(n_classes=mcfg.n_classes).to(device) if cfg.disease_guide else None
    if guide is not None:
        gen_params += list(guide.parameters())
    opt_g = torch.optim.Adam(gen_params, lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_v = torch.optim.Adam(model.vae.parameters(), lr=2e-3)
    history: list[dict] = []
    start_epoch, start_vae = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = ckpt.get("train_config", {})
        # Settings a resume may not change: (name, its value in checkpoints written before
        # it existed, compared only as on/off).
        for name, default, on_off in (("rib_fit", 0.0, True), ("privacy", "reverse", False), ("disease_guide", 0.0, True)):
            was, now = saved.get(name, default), getattr(cfg, name)
            if (bool(was) != bool(now)) if on_off else (was != now):
                raise ResumeError(
                    f"{ckpt_path} was trained with {name}={was!r}, not {now!r}: "
                    f"resume with the same --{name.replace('_', '-')}, or train into a new folder"
                )
        if rib_head is not None and ckpt["rib_head"]["weight"].shape != rib_head.weight.shape:
            raise ResumeError(
                f"{ckpt_path} has a rib head on the whole latent (before it read only the "
                "identity and other vectors): train into a new folder"
            )
        model.load_state_dict(ckpt["model"])
        if rib_head is not None:
            rib_head.load_state_dict(ckpt["rib_head"])
        if guide is not None:
            guide.load_state_dict(ckpt["guide"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        opt_v.load_state_dict(ckpt["opt_v"])
        start_epoch, start_vae, history = ckpt["epoch"], ckpt["vae_epoch"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"])
        log.info("resuming from %s at epoch %d, vae epoch %d", ckpt_path, start_epoch, start_vae)

    def save(epoch: int, vae_epoch: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "rib_head": rib_head.state_dict() if rib_head is not None else None,
                "guide": guide.state_dict() if guide is not None else None,
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "opt_v": opt_v.state_dict(),
                "epoch": epoch,
                "vae_epoch": vae_epoch,
                "history": history,
                "rng": torch.get_rng_state(),
                "model_config": dataclasses.asdict(mcfg),
                "train_config": dataclasses.asdict(cfg),
            },
            tmp,
        )
        tmp.replace(ckpt_path)
        (out / "history.json").write_text(json.dumps(history, indent=1))

    x_all, p_all, y_all = (t.to(device) for t in (train_data.images, train_data.patient_ids, train_data.labels))
    n = x_all.shape[0]
    steps = n // cfg.batch_size
    rib_targets = None
    if rib_head is not None:
        fitted = torch.from_numpy(fit_ribs(x_all))  # on the training device
        rib_targets = ((fitted - fitted.mean(0)) / fitted.std(0).clamp_min(1e-6)).to(device)
    if start_epoch:
        # The optimizer state carries the learning rate of the epoch it stopped at; the
        # scheduler must start from the base rate and replay its steps, or a resumed run
        # would apply the cosine decay twice.
        for group in opt_g.param_groups:
            group["lr"] = group["initial_lr"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=max(1, cfg.epochs * steps))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for _ in range(start_epoch * steps):
            sched.step()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g).to(device)
        t0, acc = time.time(), {}
        for k in range(steps):
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            progress = (epoch + k / steps) / cfg.epochs
            ramp = min(1.0, max(0.0, (progress - cfg.warmup) / max(cfg.ramp, 1e-9)))
            ribs = (rib_head, rib_targets[idx]) if rib_targets is not None else None
            stats = stage1_step(model, x_all[idx], p_all[idx], y_all[idx], opt_g, opt_d, cfg, ramp, ribs, guide)
            sched.step()
            acc = {key: acc.get(key, 0.0) + v.double() for key, v in stats.items()}
            _progress(f"stage 1 epoch {epoch + 1}/{cfg.epochs}", k + 1, steps, acc)
        entry = {"stage": 1, "epoch": epoch + 1, "seconds": round(time.time() - t0, 1)}
        entry.update({k: float(v) / steps for k, v in acc.items()})
        entry.update(validate(model, Dataset(val_data.images.to(device), val_data.patient_ids.to(device), val_data.labels.to(device))))
        history.append(entry)
        log.info("stage 1 epoch %d: %s", epoch + 1, entry)
        save(epoch + 1, start_vae)  # before the callback: an epoch it interrupts is kept
        if on_epoch:
            on_epoch("stage1", epoch + 1, entry)

    # Stage 2: the identity VAE on frozen identity vectors.
    with torch.no_grad():
        model.eval()
        idents = torch.cat([model.encoder(x_all[s : s + 512])[1] for s in range(0, n, 512)])
        if start_vae == 0:
            model.vae.center.copy_(idents.mean(0))
            model.vae.scale.copy_(idents.std(0).clamp_min(1e-6))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.vae.parameters():
        p.requires_grad_(True)
    for vepoch in range(start_vae, cfg.vae_epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + vepoch)
        order = torch.randperm(n, generator=g).to(device)
        acc = {}
        for k in range(steps):
            stats = stage2_step(model, idents[order[k * cfg.batch_size : (k + 1) * cfg.batch_size]], opt_v, cfg)
            acc = {key: acc.get(key, 0.0) + v.double() for key, v in stats.items()}
        entry = {"stage": 2, "epoch": vepoch + 1, **{k: float(v) / steps for k, v in acc.items()}}
        history.append(entry)
        _progress(f"stage 2 epoch {vepoch + 1}/{cfg.vae_epochs}", 1, 1, {k: v for k, v in entry.items() if k not in ("stage", "epoch")})
        save(cfg.epochs, vepoch + 1)  # before the callback: an epoch it interrupts is kept
        if on_epoch:
            on_epoch("stage2", vepoch + 1, entry)
    for p in model.parameters():
        p.requires_grad_(True)
    compute_prototypes(model, train_data if device.type == "cpu" else Dataset(x_all, p_all, y_all))
    save(cfg.epochs, cfg.vae_epochs)
    model.eval()
    return model
