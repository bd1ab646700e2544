"""Fitting a bundle's gates (``casemask engine fit-gates``; PyTorch). See ``engine.gates``.

On training-domain images (by default, patients of the synthetic population the bundle
was trained on):

1. the model's encoder reads every image; the domain scorer's mean, spread and
   Mahalanobis whitening come from those vectors, and its decoder (a small MLP, vectors ->
   the image averaged to 16 x 16) learns to draw the images back from them;
2. the gates' classifier (a small CNN with batch normalisation and average pooling,
   another architecture than training's disease guide and than the evaluation's
   classifier) learns the disease from the images, with small random rotations, scalings,
   shifts and exposure changes;
3. the identity metric whitens identity vectors by the spread of each patient's own
   visits, and the identity limit is a low quantile (``identity_quantile``) of the
   distances between different patients.

Then on held-out in-domain images (patients of another seed, which neither the model nor
the gates saw) each image is anonymized and given a counterfactual as the node does, and
the domain and medical limits are set at the stated false-rejection rates: each domain
score at ``domain_frr / 2``, the medical limits at ``medical_frr`` (never below 0.5, so
that a passing class is also the most probable one). The rates measured there, for every
gate and all together, are recorded with the limits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine import bundle as bundles
from engine.model import DisentanglementModel
from engine.threads import torch_threads

log = logging.getLogger(__name__)

DECODER_RES = 16


@dataclasses.dataclass
class GateFitConfig:
    """What the gates are fitted on and to what rates."""

    patients: int = 1000  # training-domain patients (of the bundle's training seed)
    visits: int = 8
    calibration_seed: int = 5000  # held-out in-domain patients: neither training's, the evaluation's (1000) nor the monitors' (2000, 3000)
    calibration_patients: int = 300
    calibration_visits: int = 4
    domain_frr: float = 0.01
    medical_frr: float = 0.01
    identity_quantile: float = 0.01
    medical_original: float = 0.0  # the least probability of the classifier's reading of an original (0: any; engine.gates)
    classifier_epochs: int = 8
    classifier_blur: float = 0.0  # blur augmentation, the largest sigma in pixels (engine.evaluate.augment_batch)
    classifier_lr: float = 3e-3  # one-cycle peak learning rate
    classifier_width: int = 8  # channels of the classifier's first convolution (GateClassifier)
    decoder_epochs: int = 20
    seed: int = 0
    threads: int = 0

    @classmethod
    def for_population(cls, patients: int, visits: int, threads: int = 0) -> GateFitConfig:
        """The defaults, on no more patients and visits than a training had (a small
        training, a test's, is fitted in proportion)."""
        p = min(cls.patients, patients)
        return cls(patients=p, visits=max(2, min(cls.visits, visits)), calibration_patients=min(cls.calibration_patients, max(8, p // 3)), threads=threads)


class GateClassifier(nn.Module):
    """Image (N, 1, S, S) in [-1, 1] -> class probabilities (N, classes).

    Four convolutions of ``width`` to 8 ``width`` channels, each halving the image, then an
    average: at width 8, about 4 million multiply-adds an image at 64 x 64, 2% of the
    model's generator (the cost grows with the square of the width), so that reading the
    original, the anonymized image and the counterfactual costs little."""

    def __init__(self, n_classes: int, width: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(image), dim=1)


class DomainScorer(nn.Module):
    """(image, medical, identity, other) -> (reconstruction error, latent distance), (N,) each.

    ``reconstruction_error``: mean absolute difference between the image averaged to
    ``res`` x ``res`` and the decoder's drawing from the standardised vectors.
    ``latent_distance``: Mahalanobis distance of the vectors from the training mean
    (``whiten`` is the Cholesky factor of the inverse covariance).
    """

    def __init__(self, latent_dim: int, image_size: int, res: int = DECODER_RES) -> None:
        super().__init__()
        self.res, self.pool = res, image_size // res
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.register_buffer("whiten", torch.eye(latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 512), nn.LeakyReLU(0.2), nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Linear(512, res * res))

    def draw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder((z - self.mean) / self.scale).view(z.shape[0], 1, self.res, self.res)

    def forward(self, image: torch.Tensor, medical: torch.Tensor, identity: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1) each: a column rather than a bare batch axis, which serving (Triton) needs."""
        z = torch.cat([medical, identity, other], dim=1)
        err = (self.draw(z) - F.avg_pool2d(image, self.pool)).abs().mean(dim=(1, 2, 3))
        dist = torch.linalg.vector_norm((z - self.mean) @ self.whiten, dim=1)
        return err[:, None], dist[:, None]


class GateNets(nn.Module):
    """The gates' networks, as stored in ``gates.pt`` (``classifier_width``: its
    classifier's, read back from the stored weights by :func:`load_gate_nets`)."""

    def __init__(self, n_classes: int, latent_dim: int, image_size: int, classifier_width: int = 8) -> None:
        super().__init__()
        self.classifier = GateClassifier(n_classes, classifier_width)
        self.domain = DomainScorer(latent_dim, image_size)


def load_gate_nets(b: bundles.Bundle) -> GateNets:
    """The gate networks of a bundle (eval mode).

    Raises:
        bundles.BundleError: no gates.pt, or it does not fit.
    """
    d = b.dims
    path = b.path / "gates.pt"
    if not path.exists():
        raise bundles.BundleError(f"{b.path}: no gates.pt (run `casemask engine fit-gates --model {b.path}`)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    width = int(state["classifier.features.0.weight"].shape[0])
    nets = GateNets(int(d["n_classes"]), int(d["med_dim"]) + int(d["id_dim"]) + int(d["other_dim"]), b.image_size, width)
    nets.load_state_dict(state)
    return nets.eval()


class ClassifyGraph(nn.Module):
    def __init__(self, nets: GateNets) -> None:
        super().__init__()
        self.nets = nets

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.nets.classifier(image)


class DomainGraph(nn.Module):
    def __init__(self, nets: GateNets) -> None:
        super().__init__()
        self.nets = nets

    def forward(self, image, medical, identity, other):
        return self.nets.domain(image, medical, identity, other)


GATE_GRAPHS: dict[str, type[nn.Module]] = {"classify": ClassifyGraph, "domain": DomainGraph}


# -- fitting --------------------------------------------------------------------------------
@torch.no_grad()
def _encode(model: DisentanglementModel, x: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = [model.encoder(torch.from_numpy(x[s : s + batch])) for s in range(0, len(x), batch)]
    return tuple(torch.cat([p[k] for p in parts]).numpy() for k in range(3))  # type: ignore[return-value]


@torch.no_grad()
def synthesise(model: DisentanglementModel, x: np.ndarray, noise: np.ndarray, targets: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Anonymized images and counterfactuals as the node makes them: one synthetic identity
    per image (from ``noise``), kept by the counterfactual (the target class's prototype in
    place of the medical vector)."""
    anon, cf = [], []
    for s in range(0, len(x), batch):
        med, _, other = model.encoder(torch.from_numpy(x[s : s + batch]))
        syn = model.vae.sample(torch.from_numpy(noise[s : s + batch]))
        anon.append(model.generator(med, syn, other))
        cf.append(model.generator(model.prototypes[torch.from_numpy(targets[s : s + batch])], syn, other))
    return torch.cat(anon).numpy(), torch.cat(cf).numpy()


def _fit_classifier(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: GateFitConfig, seed: int, start: GateClassifier | None = None) -> GateClassifier:
    """The gates' classifier trained on images ``x`` and labels ``y`` (from ``start``'s
    weights when given and of ``cfg``'s width: a refit), with ``cfg``'s width, epochs,
    blur and learning rate."""
    from engine.evaluate import fit_classifier

    torch.manual_seed(seed)
    net = GateClassifier(n_classes, cfg.classifier_width)
    if start is not None and start.head.in_features == net.head.in_features:
        net.load_state_dict(start.state_dict())
    return fit_classifier(net, x, y, cfg.classifier_epochs, seed, augment=True, logits=net.logits,  # type: ignore[return-value]
                          blur=cfg.classifier_blur, max_lr=cfg.classifier_lr)


def _fit_domain(scorer: DomainScorer, z: np.ndarray, x: np.ndarray, epochs: int, seed: int) -> None:
    zt = torch.from_numpy(z)
    mean, scale = zt.mean(0), zt.std(0).clamp_min(1e-6)
    cov = torch.from_numpy(np.cov(z.astype(np.float64), rowvar=False))
    cov += 1e-3 * torch.trace(cov) / len(cov) * torch.eye(len(cov), dtype=cov.dtype)  # shrinkage: a few directions carry little spread
    whiten = torch.linalg.cholesky(torch.linalg.inv(cov)).float()
    with torch.no_grad():
        scorer.mean.copy_(mean)
        scorer.scale.copy_(scale)
        scorer.whiten.copy_(whiten)
    target = F.avg_pool2d(torch.from_numpy(x), scorer.pool)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(scorer.decoder.parameters(), lr=1e-3)
    steps = max(1, len(zt) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    for epoch in range(epochs):
        order = torch.randperm(len(zt), generator=g)
        total = 0.0
        for k in range(steps):
            idx = order[k * 128 : (k + 1) * 128]
            loss = (scorer.draw(zt[idx]) - target[idx]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            log.info("domain decoder epoch %d/%d: L1 %.4f", epoch + 1, epochs, total / steps)
    scorer.eval()


def identity_whitening(ident: np.ndarray, patient_ids: np.ndarray) -> np.ndarray:
    """W with |(a - b) @ W| the distance between identity vectors after whitening by the
    covariance of each patient's visits around the patient's mean (the within-patient
    scatter of linear discriminant analysis, shrunk a little towards its mean variance).

    Raises:
        ValueError: fewer than two visits for every patient (no within-patient spread).
    """
    pids = np.unique(patient_ids)
    means = np.zeros((pids.max() + 1, ident.shape[1]))
    counts = np.bincount(patient_ids, minlength=len(means))
    np.add.at(means, patient_ids, ident)
    means /= np.maximum(counts, 1)[:, None]
    if (counts[pids] > 1).sum() < 2:
        raise ValueError("the identity gate needs at least two images of each of several patients")
    resid = (ident - means[patient_ids])[counts[patient_ids] > 1]
    cov = resid.T @ resid / max(1, len(resid) - len(pids))
    cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))
    return np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)


def different_patient_distances(ident: np.ndarray, patient_ids: np.ndarray, whiten: np.ndarray, pairs: int, seed: int) -> np.ndarray:
    """Whitened distances of ``pairs`` random pairs of images of different patients."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(ident), 3 * pairs), rng.integers(0, len(ident), 3 * pairs)
    keep = np.flatnonzero(patient_ids[i] != patient_ids[j])[:pairs]
    return np.linalg.norm((ident[i[keep]] - ident[j[keep]]) @ whiten, axis=1)


@torch.no_grad()
def gate_scores(model: DisentanglementModel, nets: GateNets, whiten: np.ndarray, x: np.ndarray, noise: np.ndarray, targets: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Every gate score of images ``x`` (anonymized with ``noise``, counterfactuals to
    ``targets``), in PyTorch: what the node computes with the ONNX graphs."""
    out: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(x[s : s + batch])
        med, ident, other = model.encoder(xb)
        syn = model.vae.sample(torch.from_numpy(noise[s : s + batch]))
        t = torch.from_numpy(targets[s : s + batch])
        anon = model.generator(med, syn, other)
        cf = model.generator(model.prototypes[t], syn, other)
        err, dist = (v[:, 0] for v in nets.domain(xb, med, ident, other))
        p_x, p_a, p_c = (nets.classifier(v) for v in (xb, anon, cf))
        expected = p_x.argmax(1)
        i_a, i_c = model.encoder(anon)[1], model.encoder(cf)[1]
        parts = {
            "reconstruction_error": err,
            "latent_distance": dist,
            "p_original": p_x.gather(1, expected[:, None])[:, 0],
            "expected": expected,
            "medical_anonymized": p_a.gather(1, expected[:, None])[:, 0],
            "medical_counterfactual": p_c.gather(1, t[:, None])[:, 0],
            "identity_anonymized": torch.linalg.vector_norm((i_a - ident) @ torch.from_numpy(whiten), dim=1),
            "identity_counterfactual": torch.linalg.vector_norm((i_c - ident) @ torch.from_numpy(whiten), dim=1),
        }
        for k, v in parts.items():
            out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def rejections(scores: dict[str, np.ndarray], limits: dict[str, float]) -> dict[str, np.ndarray]:
    """Per gate, a boolean per image: rejected by it (``all``: by any)."""
    domain = (scores["reconstruction_error"] > limits["reconstruction_error"]) | (scores["latent_distance"] > limits["latent_distance"])
    out = {"domain": domain}
    if "medical_anonymized" in scores:
        out["medical_original"] = scores["p_original"] < limits.get("medical_original", 0.0)
        out["medical"] = (scores["medical_anonymized"] < limits["medical"]) | (scores["medical_counterfactual"] < limits["counterfactual"]) | out["medical_original"]
        out["identity"] = (scores["identity_anonymized"] <= limits["identity_distance"]) | (scores["identity_counterfactual"] <= limits["identity_distance"])
    out["all"] = np.logical_or.reduce(list(out.values()))
    return out


def stated_rates(calibration: dict[str, float], cfg: GateFitConfig) -> dict[str, float]:
    """The false-rejection rate a bundle states for each gate (``gates.rates.targets``): the
    rate its limits aim at where calibration reached it (the domain gate's quantiles), and
    otherwise the rate calibration measured, never a wish (the medical limit cannot go
    below probability 0.5, so its aim may be out of reach; docs/gates.md says why)."""
    aims = {"domain": cfg.domain_frr, "medical": cfg.medical_frr, "identity": cfg.identity_quantile}
    out = {g: round(max(aim, float(calibration[g])), 4) for g, aim in aims.items()}
    out["all"] = round(max(float(calibration["all"]), max(out.values())), 4)
    return out


def counterfactual_targets(n: int, n_classes: int, seed: int) -> np.ndarray:
    """A class for each image's counterfactual, drawn uniformly."""
    return np.random.default_rng(seed).integers(0, n_classes, n).astype(np.int64)


def training_domain(b: bundles.Bundle, cfg: GateFitConfig):
    """(fit, calibration) populations of the synthetic patients ``b`` was trained on.

    Raises:
        ValueError: the bundle was not trained on synthetic patients.
    """
    from engine.data import SyntheticPatients

    training = b.meta.get("training", {})
    if str(training.get("data", "synthetic")).split(" ")[0] != "synthetic":
        raise ValueError(f"{b.path} was not trained on synthetic patients: give its training images (--data)")
    seed = int(training.get("seed", 0))
    if cfg.calibration_seed == seed:
        raise ValueError(f"calibration seed {cfg.calibration_seed} is the training seed: pick another")
    fit = SyntheticPatients(cfg.patients, cfg.visits, b.image_size, seed).batch()
    cal = SyntheticPatients(cfg.calibration_patients, cfg.calibration_visits, b.image_size, cfg.calibration_seed).batch()
    return fit, cal


def fit_gates(b: bundles.Bundle, cfg: GateFitConfig | None = None, fit=None, calibration=None, ship: bool = True, calibrate_only: bool = False,
              refit_classifier: bool = False) -> bundles.Bundle:
    """Fit the gates of bundle ``b`` and write them into it (``gates.pt`` and ``model.json``),
    then (``ship``) its node graphs as ONNX (``engine.export.ship``).

    ``fit`` and ``calibration`` (``engine.data.Batch``: images, patient_ids, labels):
    training-domain images, and held-out in-domain images (other patients); by default the
    synthetic population the bundle was trained on (:func:`training_domain`).
    ``calibrate_only``: keep the bundle's fitted networks, identity metric and identity
    limit, and set the domain and medical limits and every rate again (new rates, or a
    change in how they are measured, without fitting again). ``refit_classifier``: keep
    the domain scorer, identity metric and identity limit, train the classifier on ``fit``
    (``cfg``'s classifier settings: further from its fitted weights when ``cfg``'s width is
    theirs, from scratch when it is another), then calibrate.
    """
    cfg = cfg or GateFitConfig()
    if calibrate_only and refit_classifier:
        raise ValueError("calibrate-only keeps the classifier: give one of --calibrate-only and --refit-classifier")
    with torch_threads(cfg.threads):
        return _fit_gates(b, cfg, fit, calibration, ship, calibrate_only, refit_classifier)


def _fit_nets(model: DisentanglementModel, dims: dict, size: int, cfg: GateFitConfig, fit) -> tuple[GateNets, np.ndarray, float]:
    """The gates' networks, the identity whitening and the identity limit, from training-domain images."""
    n_classes = int(dims["n_classes"])
    nets = GateNets(n_classes, int(dims["med_dim"]) + int(dims["id_dim"]) + int(dims["other_dim"]), size, cfg.classifier_width)
    x, pids, labels = fit.images.astype(np.float32), np.asarray(fit.patient_ids), np.asarray(fit.labels)
    log.info("gates: encoding %d training-domain images", len(x))
    med, ident, other = _encode(model, x)
    _fit_domain(nets.domain, np.concatenate([med, ident, other], 1), x, cfg.decoder_epochs, cfg.seed)
    log.info("gates: fitting the classifier on %d images", len(x))
    nets.classifier = _fit_classifier(x, labels, n_classes, cfg, cfg.seed + 1)
    nets.eval()
    whiten = identity_whitening(ident, pids)
    between = different_patient_distances(ident, pids, whiten, 20000, cfg.seed + 2)
    return nets, whiten, float(np.quantile(between, cfg.identity_quantile))


def _refit_classifier(start: GateClassifier, fit, cfg: GateFitConfig, n_classes: int) -> GateClassifier:
    x, labels = fit.images.astype(np.float32), np.asarray(fit.labels).astype(np.int64)
    log.info("gates: refitting the classifier on %d images (width %d, %d epochs, blur %.2f)", len(x), cfg.classifier_width, cfg.classifier_epochs, cfg.classifier_blur)
    return _fit_classifier(x, labels, n_classes, cfg, cfg.seed + 5, start=start).eval()


def calibrate(model: DisentanglementModel, nets: GateNets, whiten: np.ndarray, identity_limit: float, cal, cfg: GateFitConfig) -> tuple[dict, dict]:
    """(limits, rates) on held-out in-domain images ``cal``: each image anonymized and given
    a counterfactual as the node does (identity redrawn where only the gates that judge the
    draw fail, up to ``engine.gates.DRAWS``); ``rates`` also holds the identity and medical
    gates' rates on the first draw (``identity_first_draw``, ``medical_first_draw``). The
    limits are set on the first draw."""
    from engine.gates import DRAWS

    xc = cal.images.astype(np.float32)
    latent = model.cfg.vae_latent
    rng = np.random.default_rng(cfg.seed + 3)
    noise = rng.standard_normal((len(xc), latent)).astype(np.float32)
    targets = counterfactual_targets(len(xc), model.cfg.n_classes, cfg.seed + 4)
    log.info("gates: calibrating on %d held-out in-domain images", len(xc))
    s = gate_scores(model, nets, whiten, xc, noise, targets)
    q = 1 - cfg.domain_frr / 2
    limits = {
        "reconstruction_error": float(np.quantile(s["reconstruction_error"], q)),
        "latent_distance": float(np.quantile(s["latent_distance"], q)),
        "medical": float(np.clip(np.quantile(s["medical_anonymized"], cfg.medical_frr), 0.5, 0.99)),
        "counterfactual": float(np.clip(np.quantile(s["medical_counterfactual"], cfg.medical_frr), 0.5, 0.99)),
        "identity_distance": identity_limit,
        "medical_original": float(cfg.medical_original),
    }
    rej = rejections(s, limits)
    first = {f"{g}_first_draw": round(float(rej[g].mean()), 4) for g in ("identity", "medical", "all")}
    for _ in range(1, DRAWS):
        rej = rejections(s, limits)
        again = np.flatnonzero((rej["identity"] | rej["medical"]) & ~rej["domain"] & ~rej["medical_original"])
        if not len(again):
            break
        redo = gate_scores(model, nets, whiten, xc[again], rng.standard_normal((len(again), latent)).astype(np.float32), targets[again])
        for k in s:
            s[k][again] = redo[k]
    rates = {k: round(float(v.mean()), 4) for k, v in rejections(s, limits).items()}
    return limits, {**rates, **first}


def _fit_gates(b: bundles.Bundle, cfg: GateFitConfig, fit, cal, ship: bool, calibrate_only: bool, refit_classifier: bool = False) -> bundles.Bundle:
    t0 = time.time()
    if fit is None or cal is None:
        fit, cal = training_domain(b, cfg)
    model = b.load_torch()
    path = b.path / "gates.pt"
    if calibrate_only or refit_classifier:
        old = b.meta.get("gates") or {}
        if not b.has_gates:
            raise ValueError(f"{b.path} has no gates to calibrate or refit: fit them first")
        nets, whiten, identity_limit = load_gate_nets(b), np.asarray(old["identity_whiten"], np.float32), float(old["limits"]["identity_distance"])
        fitted = old["fit"]
        if refit_classifier:
            nets.classifier = _refit_classifier(nets.classifier, fit, cfg, int(b.dims["n_classes"]))
            torch.save(nets.state_dict(), path)
            fitted = {**fitted, "classifier_refit": {"from_digest": old.get("digest"), "width": cfg.classifier_width, "epochs": cfg.classifier_epochs, "blur": cfg.classifier_blur,
                                                     "lr": cfg.classifier_lr, "patients": int(len(np.unique(fit.patient_ids))), "images": len(fit.images),
                                                     "seed": cfg.seed + 5, "threads": cfg.threads, "seconds": round(time.time() - t0, 1)}}
    else:
        nets, whiten, identity_limit = _fit_nets(model, b.dims, b.image_size, cfg, fit)
        torch.save(nets.state_dict(), path)
        fitted = {**dataclasses.asdict(cfg), "images": len(fit.images), "patients_fit": int(len(np.unique(fit.patient_ids))), "seconds": round(time.time() - t0, 1)}
    limits, rates = calibrate(model, nets, whiten, identity_limit, cal, cfg)
    meta = json.loads((b.path / "model.json").read_text())
    meta["gates"] = {
        "weights": b.weights_digest(),
        "digest": bundles.file_digest(path),
        "limits": {k: round(v, 6) for k, v in limits.items()},
        "rates": {
            "targets": stated_rates(rates, cfg),
            "aims": {"domain": cfg.domain_frr, "medical": cfg.medical_frr, "identity_quantile_of_different_patients": cfg.identity_quantile},
            "calibration": rates,
            "calibration_images": len(cal.images),
            "calibration_seconds": round(time.time() - t0, 1) if calibrate_only else None,
        },
        "identity_whiten": [[float(f"{v:.6g}") for v in row] for row in whiten],
        "fit": fitted,
    }
    bundles.write_meta(b.path, meta)
    out = bundles.load(b.path)
    log.info("gates %s: limits %s; calibration rejections %s", "calibrated" if calibrate_only else "fitted", meta["gates"]["limits"], rates)
    if ship and not (calibrate_only and out.meta.get("shipped_graphs")):
        from engine.export import ship as ship_graphs
        from engine.graphs import GATE_GRAPHS, NODE_GRAPHS

        # A refit changes gates.pt only: the model's graphs stay as shipped.
        ship_graphs(out, GATE_GRAPHS if refit_classifier and out.meta.get("shipped_graphs") else NODE_GRAPHS)
        out = bundles.load(b.path)
    return out
