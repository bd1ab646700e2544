"""The paper's evaluation protocol, judged by evaluator networks trained here, separately
from the model (never the model's own heads).

Population: synthetic patients the model never saw (a seed other than its training
seed). Each patient's visits are split: the identity evaluator learns on the first
visits (closed set) and everything is measured on the held-out visits. The disease
evaluator learns on a further, separate population.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.api import Model
from engine.data import CLASSES, SyntheticPatients
from engine.data.synthetic import finding_shown
from engine.model import ssim as ssim_torch
from engine.retrieval import ExactSearch, chance_leakage, leakage_at_k, precision_at_k
from engine.threads import torch_threads

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalConfig:
    seed: int = 1000
    patients: int = 100
    visits: int = 10
    held_out: int = 3
    disease_patients: int = 300
    disease_visits: int = 8
    epochs: int = 30
    threads: int = 0
    gate_draws: int = 0  # synthetic identities per image for the gates (0: the node's, engine.gates.DRAWS)
    gate_retry: tuple[str, ...] = ()  # gates whose failure earns another draw (empty: the node's, engine.gates.RETRIED)


class EvaluatorNet(nn.Module):
    """A plain CNN classifier; ``embed`` gives the penultimate features."""

    def __init__(self, size: int, n_out: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(c * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, n_out)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def augment_batch(x: torch.Tensor, g: torch.Generator, blur: float = 0.0) -> torch.Tensor:
    """Small random rotations (up to 4.6 degrees), scalings, shifts and exposure changes of
    a batch (N, 1, S, S), for classifiers that must not depend on the exact acquisition;
    with ``blur`` > 0, half the images are also blurred (:func:`blur_batch`, sigma drawn
    up to ``blur`` pixels), so that sharpness is no cue (a generator draws smoother images
    than the detector's)."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3)
    ang = (torch.rand(n, generator=g) - 0.5) * 0.16
    sc = 1 + (torch.rand(n, generator=g) - 0.5) * 0.1
    theta[:, 0, 0] = torch.cos(ang) * sc
    theta[:, 0, 1] = -torch.sin(ang) * sc
    theta[:, 1, 0] = torch.sin(ang) * sc
    theta[:, 1, 1] = torch.cos(ang) * sc
    theta[:, :, 2] = (torch.rand(n, 2, generator=g) - 0.5) * 0.1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3
    x = (x * gain + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.2).clamp(-1, 1)
    if blur > 0:
        sigma = torch.rand(n, generator=g) * blur
        sigma[torch.rand(n, generator=g) < 0.5] = 0.0
        x = blur_batch(x, sigma)
    return x


def blur_batch(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Each image of ``x`` (N, 1, S, S) blurred by a separable Gaussian of its own ``sigma``
    (N,) in pixels (0: unchanged), edges replicated."""
    n, _, h, w = x.shape
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    xp = F.pad(x, (radius,) * 4, mode="replicate").view(1, n, h + 2 * radius, w + 2 * radius)
    xp = F.conv2d(xp, k.view(n, 1, 1, -1), groups=n)
    return F.conv2d(xp, k.view(n, 1, -1, 1), groups=n).view(n, 1, h, w)


def fit_classifier(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, augment: bool = True, logits=None,
                   blur: float = 0.0, max_lr: float = 3e-3) -> nn.Module:
    """Train ``net`` (``logits``: its function giving logits, default the net itself) to
    classify images ``x`` as ``y``: AdamW, one-cycle learning rate up to ``max_lr``,
    batches of 64, with :func:`augment_batch` (and its ``blur``) when ``augment``; returns
    it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    logits = logits or net
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = max(1, len(xt) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs * steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=g)
        for k in range(steps):
            idx = order[k * 64 : (k + 1) * 64]
            xb = augment_batch(xt[idx], g, blur) if augment else xt[idx]
            loss = F.cross_entropy(logits(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def train_evaluator(x: np.ndarray, y: np.ndarray, n_out: int, epochs: int, seed: int, augment: bool = True) -> EvaluatorNet:
    torch.manual_seed(seed)
    return fit_classifier(EvaluatorNet(x.shape[-1], n_out), x, y, epochs, seed, augment)  # type: ignore[return-value]


@torch.no_grad()
def predict(net: EvaluatorNet, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class predictions, embeddings)"""
    preds, embs = [], []
    for s in range(0, len(x), 256):
        e = net.embed(torch.from_numpy(x[s : s + 256]))
        embs.append(e.numpy())
        preds.append(net.head(e).argmax(1).numpy())
    return np.concatenate(preds), np.concatenate(embs)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5) of images in [-1, 1], data range 2."""
    return float(ssim_torch(torch.from_numpy(a).double(), torch.from_numpy(b).double()))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a positive pair scores above a negative one (ties count half)."""
    scores = np.concatenate([pos, neg])
    ranks = scores.argsort().argsort().astype(np.float64) + 1
    # average ranks for ties
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-9)
    b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-9)
    return (a * b).sum(1)


def identity_geometry(ident: np.ndarray, patient_ids: np.ndarray, synth: np.ndarray) -> dict[str, float]:
    """Where synthetic identities lie among real patients (each patient: the mean of its
    visits' identity vectors). Nearest: median distance to the nearest real patient, for a
    synthetic identity and for a real patient (to another); spread: mean pairwise distance."""
    real = np.stack([ident[patient_ids == k].mean(0) for k in np.unique(patient_ids)])

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    real_real = dist(real, real)
    spread_real = float(real_real[~np.eye(len(real), dtype=bool)].mean())
    np.fill_diagonal(real_real, np.inf)
    synth_synth = dist(synth, synth)
    return {
        "synthetic_identity_nearest_real_median": float(np.median(dist(synth, real).min(1))),
        "real_identity_nearest_other_real_median": float(np.median(real_real.min(1))),
        "synthetic_identity_spread": float(synth_synth[~np.eye(len(synth), dtype=bool)].mean()),
        "real_identity_spread": spread_real,
    }


# Anatomy the latent should carry for the generator to redraw a patient: coarse shape
# (thorax, lungs, heart, diaphragm) and the ribs, whose phase in the image mixes the
# patient's rib phase with the visit's shift and rotation.
PROBED = ("thorax_w", "lung_h", "heart_w", "diaph_l", "rib_spacing", "rib_curv", "rib_phase_image")
ANGLES = ("rib_phase_image",)


def probe_targets(params: dict[str, np.ndarray], names: tuple[str, ...] = PROBED) -> dict[str, np.ndarray]:
    """(N, d) regression targets per parameter; an angle becomes its cosine and sine."""
    out = {}
    for k in names:
        v = np.asarray(params[k], np.float64)
        out[k] = np.stack([np.cos(v), np.sin(v)], 1) if k in ANGLES else v[:, None]
    return out


def linear_probe_r2(z_fit: np.ndarray, t_fit: np.ndarray, z_test: np.ndarray, t_test: np.ndarray, ridge: float = 1e-2) -> float:
    """R^2 on the test set of a ridge regression from vectors ``z`` to targets ``t``,
    averaged over the target's columns: 1 when ``z`` holds ``t`` linearly, 0 or below when
    it holds nothing of it (the regression fits noise of the fitting set)."""
    mu, sd = z_fit.mean(0), z_fit.std(0) + 1e-8

    def design(z: np.ndarray) -> np.ndarray:
        return np.concatenate([(z - mu) / sd, np.ones((len(z), 1))], 1)

    a = design(z_fit)
    reg = ridge * len(a) * np.eye(a.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(a.T @ a + reg, a.T @ t_fit)
    err = ((design(z_test) @ w - t_test) ** 2).mean(0)
    return float(np.mean(1.0 - err / np.maximum(t_test.var(0), 1e-12)))


def latent_probe(fit: tuple[np.ndarray, np.ndarray, dict], test: tuple[np.ndarray, np.ndarray, dict]) -> dict[str, dict[str, float]]:
    """How much of each anatomy parameter a linear read-out finds in the identity vector
    and in the whole latent (medical, identity, other). ``fit`` and ``test`` are
    (identity vectors, whole latents, synthetic params) of two separate populations."""
    t_fit, t_test = probe_targets(fit[2]), probe_targets(test[2])
    return {
        k: {"identity": linear_probe_r2(fit[0], t_fit[k], test[0], t_test[k]), "latent": linear_probe_r2(fit[1], t_fit[k], test[1], t_test[k])}
        for k in PROBED
    }


@dataclasses.dataclass
class Evaluators:
    """The two evaluator networks of a population: they depend on the evaluation's
    settings (and the number of threads they were trained with), never on the model, so
    one pair can judge several models alike."""

    identity: EvaluatorNet
    disease: EvaluatorNet

    def save(self, path: Path) -> None:
        torch.save({"identity": self.identity.state_dict(), "disease": self.disease.state_dict()}, path)

    @classmethod
    def load(cls, path: Path, cfg: EvalConfig, size: int) -> Evaluators:
        state = torch.load(path, map_location="cpu", weights_only=True)
        nets = EvaluatorNet(size, cfg.patients), EvaluatorNet(size, len(CLASSES))
        for net, key in zip(nets, ("identity", "disease")):
            net.load_state_dict(state[key])
            net.eval()
        return cls(*nets)


def _populations(cfg: EvalConfig, size: int):
    pop = SyntheticPatients(cfg.patients, cfg.visits, size, cfg.seed).batch()
    dis = SyntheticPatients(cfg.disease_patients, cfg.disease_visits, size, cfg.seed + 7919).batch()
    return pop, dis, pop.visits >= cfg.visits - cfg.held_out


def train_evaluators(cfg: EvalConfig, size: int) -> Evaluators:
    """Train the identity and disease evaluators of ``cfg``'s populations."""
    with torch_threads(cfg.threads):
        return _train_evaluators(cfg, *_populations(cfg, size))


def _train_evaluators(cfg: EvalConfig, pop, dis, held: np.ndarray) -> Evaluators:
    log.info("training the identity evaluator on %d images of %d patients", int((~held).sum()), cfg.patients)
    id_net = train_evaluator(pop.images[~held], pop.patient_ids[~held], cfg.patients, cfg.epochs, cfg.seed)
    log.info("training the disease evaluator on %d images of a separate population", len(dis.images))
    dis_net = train_evaluator(dis.images, dis.labels, len(CLASSES), max(4, cfg.epochs // 3), cfg.seed + 1)
    return Evaluators(id_net, dis_net)


def evaluate(model: Model, out: Path, cfg: EvalConfig | None = None, evaluators: Evaluators | None = None) -> dict:
    """Run the protocol; writes out/report.json, out/report.md and out/grid.png.

    ``evaluators``: from :func:`train_evaluators` with the same ``cfg``, to judge several
    models without training the evaluators again; trained here when not given.
    """
    cfg = cfg or EvalConfig()
    with torch_threads(cfg.threads):
        return _evaluate(model, out, cfg, evaluators)


def _evaluate(model: Model, out: Path, cfg: EvalConfig, evaluators: Evaluators | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    size = model.image_size
    train_seed = model.bundle.meta.get("training", {}).get("seed")
    if train_seed is not None and int(train_seed) == cfg.seed:
        raise ValueError(f"evaluation seed {cfg.seed} is the model's training seed; pick another")
    pop, dis, held = _populations(cfg, size)
    x, p, y = pop.images[held], pop.patient_ids[held], pop.labels[held]
    if evaluators is None:
        evaluators = _train_evaluators(cfg, pop, dis, held)
    id_net, dis_net = evaluators.identity, evaluators.disease

    rec = model.reconstruct(x)
    anon = model.anonymize(x, seed=cfg.seed)
    anon2 = model.anonymize(x, seed=cfg.seed + 1)
    target = (y + 1 + np.random.default_rng(cfg.seed).integers(0, len(CLASSES) - 1, len(y))) % len(CLASSES)
    cf = model.counterfactual(x, target)

    pid_o, emb_o = predict(id_net, x)
    pid_r, _ = predict(id_net, rec)
    pid_a, emb_a = predict(id_net, anon)
    pid_c, _ = predict(id_net, cf)
    dy_o, _ = predict(dis_net, x)
    dy_r, _ = predict(dis_net, rec)
    dy_a, _ = predict(dis_net, anon)
    dy_c, _ = predict(dis_net, cf)

    # Verification: an image against its own anonymized version (positive) vs against the
    # anonymized image of a different patient (negative); cosine of evaluator embeddings.
    rng = np.random.default_rng(cfg.seed)
    other = np.array([rng.choice(np.flatnonzero(p != p[i])) for i in range(len(p))])
    pos = _cos(emb_o, emb_a)
    neg = _cos(emb_o, emb_a[other])
    # Real-vs-real reference: two held-out visits of the same patient vs different patients.
    pairs = [(i, np.flatnonzero((p == p[i]) & (np.arange(len(p)) != i))) for i in range(len(p))]
    pairs = [(i, rng.choice(c)) for i, c in pairs if len(c)]
    if pairs:
        idx, same = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        ref_auc = auc(_cos(emb_o[idx], emb_o[same]), _cos(emb_o[idx], emb_o[other[idx]]))
    else:  # one held-out visit per patient: no same-patient pair to compare
        ref_auc = float("nan")

    med, real_id, oth = model.encode(pop.images)
    retrieval = retrieval_privacy(model, pop, held, med, id_net, cfg.seed)
    geometry = identity_geometry(real_id, pop.patient_ids, model.synthetic_identities(512, cfg.seed))
    d_med, d_id, d_oth = model.encode(dis.images)
    probe = latent_probe(
        (d_id, np.concatenate([d_med, d_id, d_oth], 1), dis.params),
        (real_id, np.concatenate([med, real_id, oth], 1), pop.params),
    )

    report = {
        "population": {"seed": cfg.seed, "patients": cfg.patients, "visits": cfg.visits, "held_out_visits": cfg.held_out, "image_size": size, "model_training_seed": train_seed,
                       "threads": torch.get_num_threads()},  # the evaluators' weights depend on it
        "reid_chance": 1.0 / cfg.patients,
        "reid_top1_original": float((pid_o == p).mean()),
        "reid_top1_reconstructed": float((pid_r == p).mean()),
        "reid_top1_anonymized": float((pid_a == p).mean()),
        "reid_top1_counterfactual": float((pid_c == p).mean()),
        "verification_auc_anonymized": auc(pos, neg),
        "verification_auc_original_reference": ref_auc,
        "disease_acc_original": float((dy_o == y).mean()),
        "disease_acc_reconstructed": float((dy_r == y).mean()),
        "disease_acc_anonymized": float((dy_a == y).mean()),
        "counterfactual_flip_rate": float((dy_c != dy_o).mean()),
        "counterfactual_target_rate": float((dy_c == target).mean()),
        "ssim_reconstruction": ssim(x, rec),
        "psnr_reconstruction": psnr(x, rec),
        "ssim_anonymized": ssim(x, anon),
        "anonymized_pair_differ_l1": float(np.abs(anon - anon2).mean()),
        **geometry,
        "latent_probe_r2": probe,
        **retrieval,
    }
    if model.bundle.has_gates:
        report["gates"] = evaluate_gates(model, cfg, x, y)
    report["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    grid(out / "grid.png", x[:6], rec[:6], [model.anonymize(x[:6], seed=s) for s in (1, 2, 3)], cf[:6])
    return report


def evaluate_gates(model: Model, cfg: EvalConfig | None = None, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> dict:
    """What the model's gates reject, through :meth:`engine.api.Model.anonymize_checked`
    (what the node runs, with its identity redraws): the rate per gate on in-domain images (the evaluation
    population's held-out visits, patients neither the model nor the gates saw: every
    rejection there is a false one), with a counterfactual of a random class and without
    (``in_domain``, ``in_domain_anonymized_only``); ``changed_finding``: each image drawn
    with the prototype of each class other than its true one (``labels``) in place of its
    medical vector, judged as the node judges an anonymized image (the classifier reading
    the original, identity redrawn): every one must be turned away, and the rate that
    passes the medical gate is the rate at which a fabricated finding would go out; and
    per out-of-domain case (``engine.data.ood``) the rate the domain gate rejects and the
    rate any gate does.

    Raises:
        engine.gates.GateError: the bundle has no current gates.
    """
    from engine.data.ood import near_cases, out_of_domain

    cfg = cfg or EvalConfig()
    size = model.image_size
    if images is None:
        pop = SyntheticPatients(cfg.patients, cfg.visits, size, cfg.seed).batch()
        held = pop.visits >= cfg.visits - cfg.held_out
        images, labels = pop.images[held], pop.labels[held]
        shown = finding_shown({k: v[held] for k, v in pop.params.items()}, labels)
    else:
        shown = None
    rng = np.random.default_rng(cfg.seed + 17)

    from engine.gates import DRAWS, RETRIED

    latent = int(model.bundle.dims["vae_latent"])
    draws, retry = cfg.gate_draws or DRAWS, tuple(cfg.gate_retry) or RETRIED

    def rates(x: np.ndarray, counterfactuals: bool = True, medical: np.ndarray | None = None) -> dict[str, float]:
        noise = rng.standard_normal((len(x), latent)).astype(np.float32)
        targets = rng.integers(0, model.n_classes, len(x)) if counterfactuals else None
        redraw = lambda attempt, rows: rng.standard_normal((len(rows), latent)).astype(np.float32)  # noqa: E731
        verdicts = model.anonymize_checked(x, noise, targets, redraw=redraw, draws=draws, medical=medical, retry=retry).verdicts
        out = {g: float(np.mean([g in v.failed for v in verdicts])) for g in ("domain", "medical", "identity")}
        out["any"] = float(np.mean([not v.passed for v in verdicts]))
        kept = np.bincount([v.draw for v in verdicts if v.passed], minlength=draws + 1)[1:]
        return {k: round(v, 4) for k, v in out.items()} | {"images": len(x), "passed_on_draw": [int(c) for c in kept]}

    stated = model.bundle.meta["gates"]["rates"].get("targets", {})
    if "all" not in stated:  # a bundle fitted before its targets were the rates it states
        stated = model.bundle.meta["gates"]["rates"]["calibration"]
    report = {"limits": model.bundle.meta["gates"]["limits"], "stated": stated,
              "draws": draws, "retry": list(retry), "in_domain": rates(images), "in_domain_anonymized_only": rates(images, counterfactuals=False)}
    if labels is not None:
        report["changed_finding"] = changed_finding(model, images, np.asarray(labels), lambda n: rng.standard_normal((n, latent)).astype(np.float32),
                                                    draws, retry, shown)
    report["meets_stated"] = {g: bool(report["in_domain"][g] <= stated.get("all" if g == "any" else g, 1.0)) for g in ("domain", "medical", "identity", "any")}
    sample = images[: min(len(images), 60)]
    report["out_of_domain"] = {name: rates(x) for name, x in out_of_domain(sample, size, cfg.seed).items()}
    report["near"] = {name: rates(x) for name, x in near_cases(sample).items()}
    return report


def changed_finding(model: Model, images: np.ndarray, labels: np.ndarray, noise: Callable[[int], np.ndarray], draws: int = 0,
                    retry: tuple[str, ...] = (), shown: np.ndarray | None = None) -> dict:
    """Images whose finding was changed, judged as anonymized images of their originals:
    each image drawn with the prototype of every class in place of its medical vector,
    identity redrawn as in the node (``noise(n)``: n rows of identity noise), the gates
    reading the original as it is. Two counts of what must be turned away:

    - ``passed_medical``: among images drawn with a class other than the true one
      (``labels``), the rate that passes the medical gate. It includes originals that the
      gates' classifier misreads as the drawn class (the gate then confirms the change).
    - ``passed_medical_read``: among images drawn with a class other than the one the gates'
      classifier reads in the original, the rate that passes: what the gate's own rule lets
      through (it must be 0).
    - with ``shown`` (N,) bool, whether each original's image shows its true finding
      (``engine.data.synthetic.finding_shown``): ``passed_medical_shown_count`` of
      ``images_shown``, the changes against the true class of originals that show it. The
      rest are findings no reader of the pixels can see (an effusion below the
      diaphragm), whose anonymized image shows what the original shows.

    ``passed``: the rate (true-class definition) that passes every gate and would go out.
    A changed finding gets as many draws as an honest image (``draws``, ``retry``: the
    node's ``engine.gates.DRAWS`` and ``RETRIED`` by default): every draw is another chance
    for it to pass.
    """
    from engine.gates import DRAWS, RETRIED

    n, k = len(images), model.n_classes
    drawn = np.repeat(np.arange(k), n)
    x = np.concatenate([images] * k)
    verdicts = model.anonymize_checked(x, noise(len(x)), redraw=lambda attempt, rows: noise(len(rows)), draws=draws or DRAWS,
                                       medical=model.prototypes[drawn], retry=tuple(retry) or RETRIED).verdicts
    through = np.array(["medical" not in v.failed for v in verdicts])
    passed = np.array([v.passed for v in verdicts])
    read = np.tile(model.classify(images).argmax(1), k)
    changed, changed_read = drawn != np.tile(labels, k), drawn != read
    extra = {}
    if shown is not None:
        on = changed & np.tile(np.asarray(shown, bool), k)
        extra = {"images_shown": int(on.sum()), "passed_medical_shown_count": int(through[on].sum())}
    return extra | {"images": int(changed.sum()), "passed_medical": round(float(through[changed].mean()), 4), "passed_medical_count": int(through[changed].sum()),
            "passed": round(float(passed[changed].mean()), 4),
            "images_read": int(changed_read.sum()), "passed_medical_read": round(float(through[changed_read].mean()), 4),
            "passed_medical_read_count": int(through[changed_read].sum())}


def gates_markdown(g: dict) -> str:
    """The gate part of a report as Markdown tables."""
    i = g["in_domain"]
    lines = [f"Gates: false rejections on {i['images']} in-domain images (patients neither the model nor the gates saw; "
             f"up to {g.get('draws', 1)} draws for a failure of {' or '.join(g.get('retry', ['identity']))}):", "",
             "| gate | rejected | stated by the bundle (the rate its calibration measured) | within it |", "|---|---|---|---|"]
    stated, meets = g.get("stated", {}), g.get("meets_stated", {})
    for k in ("domain", "medical", "identity", "any"):
        lines.append(f"| {k} | {i[k]:.3f} | {stated.get('all' if k == 'any' else k, '')} | {'yes' if meets.get(k) else 'NO' if k in meets else ''} |")
    if "in_domain_anonymized_only" in g:
        a = g["in_domain_anonymized_only"]
        lines += ["", f"Anonymized only (no counterfactual): medical {a['medical']:.3f}, any {a['any']:.3f}."]
    if "changed_finding" in g:
        c = g["changed_finding"]
        lines += ["", f"A changed finding (each image drawn with another class's prototype; each must be turned away): against the true class, "
                      f"{c['passed_medical_count']} of {c['images']} passed the medical gate ({c['passed_medical']:.4f}; every gate {c['passed']:.4f}); "
                      f"against the class the gates' classifier reads in the original, {c['passed_medical_read_count']} of {c['images_read']} ({c['passed_medical_read']:.4f})"
                      + (f"; against the true class of originals whose image shows it, {c['passed_medical_shown_count']} of {c['images_shown']}." if "images_shown" in c else ".")]
    lines += ["", "Out-of-domain and near cases: rejected by the domain gate / by any gate:", "", "| case | images | domain | any |", "|---|---|---|---|"]
    for group in ("out_of_domain", "near"):
        for name, r in g.get(group, {}).items():
            lines.append(f"| {name}{' (edge)' if group == 'near' else ''} | {r['images']} | {r['domain']:.3f} | {r['any']:.3f} |")
    return "\n".join(lines) + "\n"


RETRIEVAL_K = 5


def retrieval_privacy(model: Model, pop, held: np.ndarray, medical: np.ndarray, id_net: EvaluatorNet, seed: int, k: int = RETRIEVAL_K) -> dict:
    """What a case base of anonymized images gives away when searched by the medical
    vector (engine.retrieval, the node's ``casemask similar``), on the evaluation population.

    Gallery: every visit the identity evaluator learnt on, anonymized, as the node indexes
    it (the medical vector of the anonymized image). Queries: the held-out visits,
    original images, as a user's query would be. Cosine on the medical vector, exact.

    - label precision@k: share of the k neighbours whose (true) label is the query's;
    - identity leakage@k: share of the k neighbours that the identity evaluator (a
      re-identification network trained here on the original first visits, independent
      of the model) attributes to the query's patient; chance is the share a retrieval
      picking neighbours at random would get (:func:`engine.retrieval.chance_leakage`);
    - the same against a gallery of the *original* images, the comparison that says why
      the index holds anonymized images only;
    - ``same_patient``: the ground truth beside the evaluator's decision (the neighbour is
      an image of the query's patient, recognisable or not: linkage of visits).

    ``medical``: the model's medical vectors of every image of ``pop``; ``held``: the
    held-out visits' mask.
    """
    gallery = ~held
    anon = model.anonymize(pop.images[gallery], seed=seed + 2)
    galleries = {"anonymized": model.encode(anon)[0], "original": medical[gallery]}
    decided = {"anonymized": predict(id_net, anon)[0], "original": predict(id_net, pop.images[gallery])[0]}
    truth = pop.patient_ids[gallery]
    q_ids, q_labels = pop.patient_ids[held], pop.labels[held]
    out: dict = {}
    for name, vectors in galleries.items():
        _, rows = ExactSearch(vectors).search(medical[held], k)
        out[name] = {
            f"label_precision_at_{k}": precision_at_k(pop.labels[gallery][rows], q_labels),
            f"identity_leakage_at_{k}": leakage_at_k(decided[name][rows], q_ids),
            "identity_leakage_chance": chance_leakage(decided[name], q_ids),
            f"same_patient_at_{k}": leakage_at_k(truth[rows], q_ids),
            "same_patient_chance": chance_leakage(truth, q_ids),
        }
    a, o = out["anonymized"], out["original"]
    return {
        f"retrieval_label_precision_at_{k}": a[f"label_precision_at_{k}"],
        f"retrieval_identity_leakage_at_{k}": a[f"identity_leakage_at_{k}"],
        "retrieval_identity_leakage_chance": a["identity_leakage_chance"],
        f"retrieval_identity_leakage_at_{k}_original_gallery": o[f"identity_leakage_at_{k}"],
        "retrieval_identity_leakage_chance_original_gallery": o["identity_leakage_chance"],
        "retrieval": {
            "k": k, "gallery_images": int(gallery.sum()), "queries": int(held.sum()), "similarity": "cosine of medical vectors (exact)",
            "gallery": "anonymized visits the identity evaluator learnt on (originals of them for the comparison)",
            "query": "held-out original visits", "identity_decided_by": "identity evaluator (re-identification network trained on the original first visits)",
            "gallery_anonymized": a, "gallery_original": o,
        },
    }


TARGETS = {
    "reid_top1_original": (">=", 0.90),
    "reid_top1_anonymized": ("<=2x", "reid_chance"),
    "verification_auc_anonymized": ("<=", 0.60),
    "disease_acc_anonymized": ("within 0.03 of", "disease_acc_original"),
    "counterfactual_flip_rate": (">=", 0.85),
    "reid_top1_counterfactual": (">=", 0.80),
    "ssim_reconstruction": (">=", 0.85),
    f"retrieval_label_precision_at_{RETRIEVAL_K}": (">=", 0.90),
    f"retrieval_identity_leakage_at_{RETRIEVAL_K}": ("<=1.5x", "retrieval_identity_leakage_chance"),
}


def meets(report: dict, key: str) -> bool:
    op, ref = TARGETS[key]
    v = report[key]
    if op == ">=":
        return v >= ref
    if op == "<=":
        return v <= ref
    if op == "<=2x":
        return v <= 2 * report[ref]
    if op == "<=1.5x":
        return v <= 1.5 * report[ref]
    return abs(v - report[ref]) <= 0.03


def markdown(report: dict) -> str:
    lines = ["| metric | value | target | met |", "|---|---|---|---|"]
    for k, v in report.items():
        if not isinstance(v, float):
            continue
        t = TARGETS.get(k)
        target = f"{t[0]} {t[1]}" if t else ""
        met = ("yes" if meets(report, k) else "NO") if t else ""
        lines.append(f"| {k} | {v:.3f} | {target} | {met} |")
    probe = report.get("latent_probe_r2")
    if probe:
        lines += ["", "Linear read-out (R^2) of anatomy from the model's vectors, on patients the", "read-out never saw:", "",
                  "| parameter | identity vector | whole latent |", "|---|---|---|"]
        lines += [f"| {k} | {v['identity']:.3f} | {v['latent']:.3f} |" for k, v in probe.items()]
    if report.get("gates"):
        lines += ["", gates_markdown(report["gates"]).rstrip("\n")]
    r = report.get("retrieval")
    if r:
        lines += ["", f"Retrieval by the medical vector: {r['queries']} held-out original visits as queries against "
                      f"{r['gallery_images']} visits of the same patients, k = {r['k']}; identity decided by the identity evaluator "
                      "(leakage) or by the ground truth (same patient):", "",
                  "| gallery | label precision | identity leakage | chance | same patient | chance |", "|---|---|---|---|---|---|"]
        k = r["k"]
        for name in ("anonymized", "original"):
            g = r[f"gallery_{name}"]
            lines.append(f"| {name} | {g[f'label_precision_at_{k}']:.3f} | {g[f'identity_leakage_at_{k}']:.3f} | "
                         f"{g['identity_leakage_chance']:.3f} | {g[f'same_patient_at_{k}']:.3f} | {g['same_patient_chance']:.3f} |")
    return "\n".join(lines) + "\n"


def grid(path: Path, orig: np.ndarray, rec: np.ndarray, anons: list[np.ndarray], cf: np.ndarray) -> None:
    """PNG rows: one per image; columns: original, reconstruction, 3 anonymized, counterfactual."""
    from PIL import Image, ImageDraw

    cols = [orig, rec, *anons, cf]
    s = orig.shape[-1]
    pad = 2
    label_h = 14
    img = Image.new("L", (len(cols) * (s + pad) + pad, len(orig) * (s + pad) + pad + label_h), 0)
    for c, arr in enumerate(cols):
        for r in range(len(orig)):
            tile = ((np.clip(arr[r, 0], -1, 1) + 1) * 127.5).astype(np.uint8)
            img.paste(Image.fromarray(tile), (pad + c * (s + pad), label_h + pad + r * (s + pad)))
    draw = ImageDraw.Draw(img)
    for c, name in enumerate(["orig", "recon", "anon1", "anon2", "anon3", "counterf"]):
        draw.text((pad + c * (s + pad), 1), name, fill=255)
    scale = max(1, 384 // s)
    img = img.resize((img.width * scale // 2 * 2 if s < 128 else img.width, img.height * scale // 2 * 2 if s < 128 else img.height), Image.NEAREST)
    img.save(path)
