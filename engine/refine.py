"""Generator refinement: after :func:`engine.train.train`, more steps for the generator alone.

The encoder, heads, identity VAE and class prototypes stay as they are; only the
generator learns, from latent vectors computed once. A step of it costs about a third of
a stage-1 step at the same batch (no encoder passes, no discriminator; on 2 CPU cores
1.5 s for 64 images against 4.5 s), so a CPU can afford the steps that reconstruction
SSIM still wanted after stage 1.

The loss is stage 1's reconstruction loss (L1 + SSIM) plus the disease guide: a small
image classifier (:func:`engine.train.guide_classifier`) learns the disease from the real
images, and, held fixed, must find it in the reconstruction, in anonymized images (a
synthetic identity from the VAE, as the node makes them) and in counterfactuals (another
class's prototype). Without that term the generator spends its steps on anatomy and drops
the nodules: a run on reconstruction alone took SSIM from 0.801 to 0.840 and the disease
on anonymized images from 0.957 to 0.597 (README).

Checkpoints go to ``out/refine.pt`` every ``checkpoint_every`` steps; running again with
the same ``out`` resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from engine.data import SyntheticPatients
from engine.model import DisentanglementModel, ssim
from engine.threads import torch_threads
from engine.train import Dataset, ResumeError, frozen, guide_classifier

log = logging.getLogger(__name__)

# Settings a resumed refinement may change: where and how fast it runs.
_NOT_RECIPE = ("device", "threads", "checkpoint_every")


@dataclasses.dataclass
class RefineConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3  # cosine to 0 over ``steps``
    rec_weight: float = 20.0
    ssim_weight: float = 10.0
    disease_guide: float = 1.0  # 0: reconstruction alone (not advised, see above)
    guide_steps: int = 300  # the guide learns the real images alone before the generator moves
    swaps: int = 8  # anonymized and counterfactual images per step (each); at most batch_size // 2
    # Weight of swap consistency on those images, as in stage 1: the (fixed) encoder must
    # read back from an anonymized image the synthetic identity and the source's medical
    # and other vectors, and from a counterfactual the prototype and the source's identity
    # and other vectors; 0: off. Keeps a sharper generator from drawing the source's
    # identity back in through the kept vectors.
    swap_weight: float = 0.0
    # Weight of the re-identification guard: a second image classifier learns the training
    # patients from their real images and, held fixed, must not find the source patient in
    # the anonymized images; the loss is -log(1 - p(source | anonymized)), 0 when it gives
    # the source nothing. 0: off. A sharper generator otherwise redraws what identifies a
    # patient from the medical and other vectors, which the swap term's encoder does not see.
    identity_guide: float = 0.0
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.swap_weight and not self.disease_guide:
            raise ValueError("swap_weight needs the disease guide's swapped images (disease_guide > 0)")
        if self.identity_guide and not self.disease_guide:
            raise ValueError("identity_guide needs the disease guide's anonymized images (disease_guide > 0)")
        if self.disease_guide and not 0 < self.swaps <= self.batch_size // 2:
            raise ValueError(f"swaps must be between 1 and batch_size // 2 = {self.batch_size // 2}, not {self.swaps}")


def data_spec(visits: int, patients: int) -> str:
    """How a bundle's refinement record names synthetic training data."""
    return f"synthetic: {visits} training visits of {patients} patients"


def monitor_set(size: int, patients: int = 64, seed: int = 2000) -> Dataset:
    """Unseen synthetic patients (4 visits each) whose reconstruction is logged while
    refining: neither the training seed (0) nor the evaluation protocol's (1000)."""
    b = SyntheticPatients(patients, 4, size, seed).batch()
    return Dataset(torch.from_numpy(b.images), torch.from_numpy(b.patient_ids), torch.from_numpy(b.labels))


def identity_classifier(n_patients: int, width: int = 32) -> nn.Module:
    """Image -> patient logits, for :attr:`RefineConfig.identity_guide` (training only).

    Like :func:`engine.train.guide_classifier` without batch normalisation (it judges
    generated images with fixed weights), but keeps a 2x2 layout before its head: what
    tells patients apart is where outlines and ribs lie, not only whether they are there.
    """
    layers: list[nn.Module] = []
    c = 1
    for w in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = w
    return nn.Sequential(
        *layers, nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(4 * c, 128), nn.LeakyReLU(0.2), nn.Linear(128, n_patients),
    )


def reid_loss(id_guide: nn.Module, anonymized: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log(1 - p), p): p, per image, the probability ``id_guide`` (weights held fixed)
    gives the patient an anonymized image was made from. The loss is near 0 while the
    guide gives the source nothing and grows without bound as it becomes sure."""
    p_source = frozen(id_guide, anonymized).softmax(1).gather(1, source[:, None]).squeeze(1)
    return -torch.log1p(-p_source.clamp(max=1 - 1e-6)).mean(), p_source.detach()


@torch.no_grad()
def latents(model: DisentanglementModel, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder's (medical, identity, other) vectors of ``images``, in eval mode."""
    model.eval()
    parts = [model.encoder(images[s : s + batch]) for s in range(0, len(images), batch)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


@torch.no_grad()
def monitor_report(model: DisentanglementModel, data: Dataset, guide: torch.nn.Module | None = None) -> dict[str, float]:
    """Reconstruction SSIM on ``data`` and, with a guide, its accuracy on the real,
    reconstructed and anonymized images (the training's own classifier: a progress
    signal, not the evaluation protocol's independent judge)."""
    m, i, o = latents(model, data.images)
    rec = model.generator(m, i, o)
    out = {"ssim": float(ssim(rec.double(), data.images.double()))}
    if guide is not None:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(len(m), model.cfg.vae_latent, generator=g).to(m.device)
        anon = model.generator(m, model.vae.sample(z), o)
        for name, x in (("real", data.images), ("rec", rec), ("anon", anon)):
            out[f"guide_{name}"] = float((guide(x).argmax(1) == data.labels).float().mean())
    return out


def refine(
    model: DisentanglementModel,
    cfg: RefineConfig,
    data: Dataset,
    out: Path,
    monitor: Dataset | None = None,
    monitor_every: int = 250,
    on_report: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict]:
    """Refine ``model.generator`` in place on the training images ``data``; returns the
    history (loss means and ``monitor`` reports every ``monitor_every`` steps)."""
    with torch_threads(cfg.threads):
        return _refine(model, cfg, data, out, monitor, monitor_every, on_report)


def _refine(model, cfg, data, out, monitor, monitor_every, on_report) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = model.generator
    for p in gen.parameters():
        p.requires_grad_(True)
    x_all, y_all, pid_all = data.images.to(device), data.labels.to(device), data.patient_ids.to(device)
    m_all, i_all, o_all = latents(model, x_all)
    if monitor is not None:
        monitor = Dataset(monitor.images.to(device), monitor.patient_ids.to(device), monitor.labels.to(device))
    guide = guide_classifier(n_classes=model.cfg.n_classes).to(device) if cfg.disease_guide else None
    id_guide = identity_classifier(int(data.patient_ids.max()) + 1).to(device) if cfg.identity_guide else None
    guide_params = [p for g in (guide, id_guide) if g is not None for p in g.parameters()]
    opt = torch.optim.Adam(list(gen.parameters()) + guide_params, lr=cfg.lr, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
    opt_guide = torch.optim.Adam(guide_params, lr=cfg.lr) if guide is not None else None
    n, bs, k = len(x_all), cfg.batch_size, cfg.swaps
    history: list[dict] = []
    start = 0
    ckpt_path = out / "refine.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        # (a setting newer than the checkpoint counts as its default)
        recipe = lambda c: {k: v for k, v in {**dataclasses.asdict(RefineConfig()), **c}.items() if k not in _NOT_RECIPE}  # noqa: E731
        if recipe(ckpt["config"]) != recipe(dataclasses.asdict(cfg)):
            raise ResumeError(f"{ckpt_path} was written by another refinement recipe: refine into a new folder")
        gen.load_state_dict(ckpt["generator"])
        # (opt_guide is not restored: it serves the guides' first steps alone, which come
        # before any checkpoint and are run again when none was written)
        if guide is not None:
            guide.load_state_dict(ckpt["guide"])
        if id_guide is not None:
            id_guide.load_state_dict(ckpt["id_guide"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"])
        start, history = ckpt["step"], ckpt["history"]
        log.info("resuming refinement from %s at step %d", ckpt_path, start)

    def save(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "generator": gen.state_dict(), "guide": guide.state_dict() if guide is not None else None,
                "id_guide": id_guide.state_dict() if id_guide is not None else None,
                "opt": opt.state_dict(),
                "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                "step": step, "history": history, "config": dataclasses.asdict(cfg),
            },
            tmp,
        )
        tmp.replace(ckpt_path)

    per_epoch = n // bs
    orders: dict[int, torch.Tensor] = {}  # the current epoch's permutation, drawn once

    def batch(j: int) -> torch.Tensor:
        """Indices of the ``j``-th batch (guide steps first): a function of ``j`` alone, so
        a resumed run draws the batches an uninterrupted one would."""
        epoch, k = divmod(j, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).to(device)
        return orders[epoch][k * bs : (k + 1) * bs]

    if guide is not None and start == 0:
        # The guide first learns the real images alone, so that its first verdicts on
        # generated ones mean something.
        for j in range(cfg.guide_steps):
            idx = batch(j)
            loss = F.cross_entropy(guide(x_all[idx]), y_all[idx])
            if id_guide is not None:
                loss = loss + F.cross_entropy(id_guide(x_all[idx]), pid_all[idx])
            opt_guide.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            loss.backward()
            opt_guide.step()  # type: ignore[union-attr]
        if monitor is not None:
            log.info("guide after %d steps on real images: %s", cfg.guide_steps, monitor_report(model, monitor, guide))
    gen.train()
    t0, acc, since = time.time(), {}, 0
    n_classes = model.cfg.n_classes
    for step in range(start, cfg.steps):
        idx = batch(cfg.guide_steps + step)
        x, y = x_all[idx], y_all[idx]
        m, i, o = m_all[idx], i_all[idx], o_all[idx]
        rec = gen(m, i, o)
        l_rec = F.l1_loss(rec, x)
        l_ssim = 1.0 - ssim(rec, x)
        loss = cfg.rec_weight * l_rec + cfg.ssim_weight * l_ssim
        stats = {"rec": l_rec.detach(), "ssim": 1.0 - l_ssim.detach()}
        if guide is not None:
            l_real = F.cross_entropy(guide(x), y)
            with torch.no_grad():
                synth = model.vae.sample(torch.randn(k, model.cfg.vae_latent, device=device))
                target = (y[k : 2 * k] + torch.randint(1, n_classes, (k,), device=device)) % n_classes
            anon = gen(m[:k], synth, o[:k])
            cf = gen(model.prototypes[target], i[k : 2 * k], o[k : 2 * k])
            l_guide = (
                F.cross_entropy(frozen(guide, rec), y)
                + F.cross_entropy(frozen(guide, anon), y[:k])
                + F.cross_entropy(frozen(guide, cf), target)
            )
            loss = loss + l_real + cfg.disease_guide * l_guide
            stats["guide_real"], stats["guide"] = l_real.detach(), l_guide.detach()
            if cfg.swap_weight:
                m_a, i_a, o_a = model.encoder(anon)  # eval mode, weights fixed: gradients reach the images
                m_c, i_c, o_c = model.encoder(cf)
                l_swap = (
                    F.l1_loss(i_a, synth) + F.l1_loss(m_a, m[:k]) + F.l1_loss(o_a, o[:k])
                    + F.l1_loss(m_c, model.prototypes[target]) + F.l1_loss(i_c, i[k : 2 * k]) + F.l1_loss(o_c, o[k : 2 * k])
                )
                loss = loss + cfg.swap_weight * l_swap
                stats["swap"] = l_swap.detach()
            if id_guide is not None:
                pid = pid_all[idx]
                l_id_real = F.cross_entropy(id_guide(x), pid)
                l_reid, p_source = reid_loss(id_guide, anon, pid[:k])
                loss = loss + l_id_real + cfg.identity_guide * l_reid
                # the identity guide's loss on real images, and its mean probability of the
                # source patient on anonymized ones (chance: 1 / patients)
                stats["id_real"], stats["id_anon_p"] = l_id_real.detach(), p_source.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = {key: acc.get(key, 0.0) + v.double() for key, v in stats.items()}
        since += 1
        done = step + 1
        if done % monitor_every == 0 or done == cfg.steps:
            entry = {"step": done, "seconds": round(time.time() - t0, 1), **{key: float(v) / since for key, v in acc.items()}}
            if monitor is not None:
                gen.eval()
                entry["monitor"] = monitor_report(model, monitor, guide)
                gen.train()
            history.append(entry)
            log.info("refine step %d/%d: %s", done, cfg.steps, entry)
            if on_report:
                on_report(done, entry)
            acc, since = {}, 0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(done)
    gen.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history
