"""Procedural chest-radiograph-like patients for training and testing without real data.

Every patient has a stable anatomy (thorax, lungs, heart, diaphragm, ribs, clavicles,
spine, soft tissue and a parenchyma texture of its own) drawn from a generator seeded by
``(seed, patient)``. Every visit draws, independently of the patient, a medical state
(normal, nodule, pleural effusion) and an acquisition (exposure, noise, rotation, shift,
scale). Rendering is vectorised over a batch of visits with NumPy, so tens of thousands
of 64x64 images take seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

CLASSES: tuple[str, ...] = ("normal", "nodule", "effusion")
N_TEXTURE = 6  # sinusoids making a patient's parenchyma texture


@dataclasses.dataclass(frozen=True)
class Batch:
    """Images (N x 1 x H x W float32 in [-1, 1]) with patient ids and disease labels.

    ``params`` (synthetic patients only): per image, what drew it: every scalar of the
    patient's anatomy, the visit's acquisition (``angle``, ``scale``, ``shift_x``,
    ``shift_y``, ``gain``, ``bias``, ``noise``), ``rib_phase_image`` (the ribs'
    phase at the image centre after the acquisition moved them) and the finding the
    visit would show, recorded whatever its label (``nodule_contrast``: the nodule's
    greatest brightening after the exposure's clipping; ``effusion_pixels``: the pixels
    the effusion brightens by at least 0.2, none where it lies under the diaphragm;
    ``effusion_h``, ``nodule_r``, ``nodule_x``, ``nodule_y`` in anatomy units), each an (N,) array.
    """

    images: np.ndarray
    patient_ids: np.ndarray
    labels: np.ndarray
    visits: np.ndarray
    params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _anatomy(rng: np.random.Generator) -> dict[str, np.ndarray | float]:
    """Draw one patient's anatomy. Ranges are wide so that patients are told apart."""
    a: dict[str, np.ndarray | float] = {
        "thorax_w": rng.uniform(0.70, 0.92),
        "thorax_h": rng.uniform(0.80, 0.98),
        "thorax_y": rng.uniform(-0.06, 0.06),
        "lung_w": rng.uniform(0.24, 0.36),
        "lung_h": rng.uniform(0.50, 0.72),
        "lung_gap": rng.uniform(0.12, 0.24),
        "lung_y": rng.uniform(-0.12, 0.04),
        "lung_asym": rng.uniform(-0.05, 0.05),
        "heart_x": rng.uniform(0.0, 0.16),
        "heart_y": rng.uniform(0.12, 0.32),
        "heart_w": rng.uniform(0.16, 0.30),
        "heart_h": rng.uniform(0.14, 0.26),
        "diaph_l": rng.uniform(0.30, 0.55),
        "diaph_r": rng.uniform(0.26, 0.50),
        "rib_spacing": rng.uniform(0.13, 0.22),
        "rib_curv": rng.uniform(0.3, 1.1),
        "rib_phase": rng.uniform(0, 2 * np.pi),
        "rib_strength": rng.uniform(0.08, 0.22),
        "clav_angle": rng.uniform(-0.45, 0.05),
        "clav_y": rng.uniform(-0.78, -0.58),
        "spine_w": rng.uniform(0.05, 0.11),
        "soft": rng.uniform(0.35, 0.65),
        "lung_density": rng.uniform(0.00, 0.22),
        "tex_freq": rng.uniform(2.0, 7.0, size=(N_TEXTURE, 2)) * rng.choice([-1, 1], size=(N_TEXTURE, 2)),
        "tex_phase": rng.uniform(0, 2 * np.pi, size=N_TEXTURE),
        "tex_amp": rng.uniform(0.04, 0.12),
    }
    return a


def _stack(anatomies: list[dict[str, np.ndarray | float]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key in anatomies[0]:
        arr = np.stack([np.asarray(a[key], dtype=np.float32) for a in anatomies])
        out[key] = arr.reshape(arr.shape[0], *([1, 1] if arr.ndim == 1 else arr.shape[1:]))
    return out


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, rx, ry, sharp: float) -> np.ndarray:
    """Soft inside-ellipse mask in [0, 1]."""
    r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return 1.0 / (1.0 + np.exp(np.clip(sharp * (r - 1.0), -40, 40)))


def render(
    anat: dict[str, np.ndarray],
    label: np.ndarray,
    visit_rng: np.random.Generator,
    size: int,
    record: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Render a batch of visits. ``anat`` values have shape (N, 1, 1) (texture (N, K, 2)).

    ``record``, when given, receives the visits' acquisition parameters (see ``Batch``).
    """
    n = label.shape[0]
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    v0, u0 = np.meshgrid(g, g, indexing="ij")  # v: rows (down), u: columns
    # Acquisition: rotation, shift, scale, exposure, noise; inverse-map the grid.
    ang = visit_rng.uniform(-0.08, 0.08, n).astype(np.float32)[:, None, None]
    scale = visit_rng.uniform(0.94, 1.06, n).astype(np.float32)[:, None, None]
    tx = visit_rng.uniform(-0.05, 0.05, n).astype(np.float32)[:, None, None]
    ty = visit_rng.uniform(-0.05, 0.05, n).astype(np.float32)[:, None, None]
    cu, cv = u0[None] - tx, v0[None] - ty
    x = (np.cos(ang) * cu + np.sin(ang) * cv) / scale
    y = (-np.sin(ang) * cu + np.cos(ang) * cv) / scale
    sharp = 6.0 * size / 8.0
    if record is not None:
        # The ribs' phase where the image centre (u = v = 0) lands in anatomy coordinates.
        xc = (np.cos(ang) * -tx + np.sin(ang) * -ty) / scale
        yc = (-np.sin(ang) * -tx + np.cos(ang) * -ty) / scale
        phase = 2 * np.pi * (yc + anat["rib_curv"] * xc**2) / anat["rib_spacing"] + anat["rib_phase"]
        record.update(angle=ang, scale=scale, shift_x=tx, shift_y=ty, rib_phase_image=np.mod(phase, 2 * np.pi))

    body = _ellipse(x, y, 0.0, anat["thorax_y"], anat["thorax_w"], anat["thorax_h"], sharp)
    dens = anat["soft"] * body
    # Spine: a vertical bright band with vertebral ripples.
    spine = np.exp(-((x / anat["spine_w"]) ** 4)) * body
    dens = dens + 0.25 * spine * (0.85 + 0.15 * np.cos(2 * np.pi * y / 0.12))
    # Lungs: two ellipses cut by the diaphragm domes.
    lx = anat["lung_gap"] / 2 + anat["lung_w"]
    lungs = []
    for side, diaph in ((-1.0, anat["diaph_r"]), (1.0, anat["diaph_l"])):
        cx = side * lx + anat["lung_asym"] * side
        m = _ellipse(x, y, cx, anat["lung_y"], anat["lung_w"], anat["lung_h"], sharp)
        dome = diaph - 0.25 * (1 - ((x - cx) / anat["lung_w"]) ** 2).clip(0, 1)
        m = m * 1.0 / (1.0 + np.exp(np.clip(sharp * 2 * (y - dome), -40, 40)))
        lungs.append(m)
    lung = np.clip(lungs[0] + lungs[1], 0, 1)
    # Parenchyma texture: a patient's own sum of sinusoids, under the acquisition transform.
    fu = anat["tex_freq"][:, :, 0][:, :, None, None]
    fv = anat["tex_freq"][:, :, 1][:, :, None, None]
    ph = anat["tex_phase"].reshape(n, N_TEXTURE)[:, :, None, None]
    tex = np.cos(np.pi * (fu * x[:, None] + fv * y[:, None]) + ph).mean(axis=1)
    dens = dens - lung * (0.42 - anat["lung_density"] - anat["tex_amp"] * tex)
    # Ribs: curved bands over the lungs.
    ribs = np.cos(2 * np.pi * (y + anat["rib_curv"] * x**2) / anat["rib_spacing"] + anat["rib_phase"])
    dens = dens + anat["rib_strength"] * np.clip(ribs, 0, 1) ** 2 * np.clip(lung + 0.3 * body, 0, 1)
    # Heart: overlaps the left lung, bright.
    heart = _ellipse(x, y, anat["heart_x"], anat["heart_y"], anat["heart_w"], anat["heart_h"], sharp)
    dens = dens + 0.35 * heart * lung + 0.1 * heart
    # Clavicles: two bright bars near the top.
    for side in (-1.0, 1.0):
        yc = anat["clav_y"] + side * anat["clav_angle"] * x
        bar = np.exp(-(((y - yc) / 0.035) ** 2)) * (np.abs(x) > 0.06) * (np.abs(x) < 0.7) * (x * side > 0)
        dens = dens + 0.28 * bar * body

    # Medical state, independent of the patient.
    side = np.where(visit_rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
    nod_x = side * (lx + visit_rng.uniform(-0.5, 0.5, n)[:, None, None] * anat["lung_w"] * 0.8)
    nod_y = anat["lung_y"] + visit_rng.uniform(-0.45, 0.2, n)[:, None, None] * anat["lung_h"]
    nod_r = visit_rng.uniform(0.09, 0.15, n).astype(np.float32)[:, None, None]
    nodule = np.exp(-(((x - nod_x) ** 2 + (y - nod_y) ** 2) / (nod_r**2)) * 1.5)
    eff_side = np.where(visit_rng.random(n) < 0.5, 0, 1)
    eff_h = visit_rng.uniform(0.25, 0.45, n).astype(np.float32)[:, None, None]
    eff_lung = np.where(eff_side[:, None, None] == 0, lungs[0], lungs[1])
    eff_top = anat["lung_y"] + anat["lung_h"] - eff_h * anat["lung_h"] * 2 - 0.15 * (x * np.where(eff_side == 0, -1, 1)[:, None, None])
    effusion = eff_lung * 1.0 / (1.0 + np.exp(np.clip(-sharp * (y - eff_top), -40, 40)))
    lab = label[:, None, None]
    base = dens
    dens = dens + 0.55 * nodule * (lab == 1) + 0.40 * effusion * (lab == 2)

    # Exposure and detector noise.
    gain = visit_rng.uniform(1.6, 2.1, n).astype(np.float32)[:, None, None]
    bias = visit_rng.uniform(-0.95, -0.8, n).astype(np.float32)[:, None, None]
    img = gain * dens + bias
    noise = visit_rng.uniform(0.005, 0.025, n).astype(np.float32)[:, None, None]
    if record is not None:
        record.update(gain=gain, bias=bias, noise=noise)
        # What the visit's finding can show, recorded for every visit whatever its label
        # (the finding drawn into the image, before noise, after the exposure's clipping):
        # the nodule's greatest brightening and the effusion's extent in pixels
        # brightened by at least 0.2, both in model units.
        shown = np.clip(gain * base + bias, -1.0, 1.0)
        nod = np.clip(gain * (base + 0.55 * nodule) + bias, -1.0, 1.0) - shown
        eff = np.clip(gain * (base + 0.40 * effusion) + bias, -1.0, 1.0) - shown
        record.update(nodule_contrast=nod.max(axis=(1, 2)), effusion_pixels=(eff >= 0.2).sum(axis=(1, 2)).astype(np.float32),
                      nodule_r=nod_r, nodule_x=nod_x, nodule_y=nod_y, effusion_h=eff_h)
        for k, v in record.items():
            record[k] = np.asarray(v, np.float32).reshape(n)
    img = img + noise * visit_rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, -1.0, 1.0).astype(np.float32)[:, None]


# An effusion that brightens fewer pixels than this (by at least 0.2, at 64 x 64) is one
# the image does not show: below the diaphragm, or a sliver at the costophrenic angle.
# No classifier of the project reads it (docs/gates.md: the gates' classifiers read
# none of the held-out effusions under 6 pixels as effusion, nearly all above 35).
EFFUSION_SHOWN_PIXELS = 6


def finding_shown(params: dict[str, np.ndarray], labels: np.ndarray, min_effusion_pixels: int = EFFUSION_SHOWN_PIXELS) -> np.ndarray:
    """(N,) bool: the visit's image shows its finding (``params`` of a :class:`Batch`):
    every normal visit and every nodule (a nodule's brightening always survives the
    exposure's clipping, ``nodule_contrast`` at least 0.8), and an effusion that brightens at
    least ``min_effusion_pixels`` pixels (``effusion_pixels``)."""
    labels = np.asarray(labels)
    return (labels != CLASSES.index("effusion")) | (np.asarray(params["effusion_pixels"]) >= min_effusion_pixels)


BLOCK = 256  # patients per block of batch(): a block's visits are seeded by its first patient


class SyntheticPatients:
    """A seeded population of synthetic patients and their visits.

    >>> ds = SyntheticPatients(n_patients=4, visits=3, size=64, seed=0)
    >>> b = ds.batch()
    >>> b.images.shape, b.patient_ids.tolist(), len(ds)
    ((12, 1, 64, 64), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], 12)

    The same ``seed`` gives the same images; patient ``k`` has the same anatomy in every
    population built with that seed, whatever ``n_patients`` or ``visits`` is.
    """

    def __init__(self, n_patients: int, visits: int, size: int = 64, seed: int = 0) -> None:
        if n_patients < 1 or visits < 1:
            raise ValueError("n_patients and visits must be at least 1")
        if not 16 <= size <= 512:
            raise ValueError(f"size must be between 16 and 512, got {size}")
        self.n_patients, self.visits, self.size, self.seed = n_patients, visits, size, seed

    def __len__(self) -> int:
        return self.n_patients * self.visits

    def anatomy(self, patient: int) -> dict[str, np.ndarray | float]:
        return _anatomy(np.random.default_rng([self.seed, 1, patient]))

    def _block(self, start: int) -> Batch:
        return self.patients(start, min(start + BLOCK, self.n_patients))

    def iter_batches(self, patients_per_batch: int = BLOCK) -> Iterator[Batch]:
        """Yield batches of whole patients (every visit of each), in patient order."""
        for start in range(0, self.n_patients, patients_per_batch):
            yield self.patients(start, min(start + patients_per_batch, self.n_patients))

    def patients(self, start: int, stop: int) -> Batch:
        """Every visit of patients ``start`` to ``stop - 1``.

        The visits' draws are seeded by ``start``: a block is the same image for image as
        in :meth:`iter_batches` when it starts where a batch of it starts (so blocks of
        256 patients, made in parallel, concatenate to :meth:`batch`).
        """
        pids = np.arange(start, stop)
        anats = [self.anatomy(int(p)) for p in pids]
        rep = np.repeat(np.arange(len(pids)), self.visits)
        stacked = {k: v[rep] for k, v in _stack(anats).items()}
        visit_rng = np.random.default_rng([self.seed, 2, start])
        labels = visit_rng.integers(0, len(CLASSES), size=rep.shape[0])
        params = {k: v.reshape(v.shape[0], -1)[:, 0] for k, v in stacked.items() if v.size == v.shape[0]}
        images = render(stacked, labels, visit_rng, self.size, record=params)
        return Batch(
            images=images,
            patient_ids=pids[rep].astype(np.int64),
            labels=labels.astype(np.int64),
            visits=np.tile(np.arange(self.visits), len(pids)).astype(np.int64),
            params=params,
        )

    def batch(self, workers: int = 0) -> Batch:
        """Every image of the population in one batch; ``workers`` > 1 makes its blocks of
        256 patients in that many processes (the same images)."""
        if workers > 1 and self.n_patients > BLOCK:
            from multiprocessing import Pool

            with Pool(workers) as pool:
                parts = pool.map(self._block, range(0, self.n_patients, BLOCK))
        else:
            parts = list(self.iter_batches())
        return Batch(
            images=np.concatenate([p.images for p in parts]),
            patient_ids=np.concatenate([p.patient_ids for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            visits=np.concatenate([p.visits for p in parts]),
            params={k: np.concatenate([p.params[k] for p in parts]) for k in parts[0].params},
        )

    def __iter__(self) -> Iterator[tuple[np.ndarray, int, int]]:
        for b in self.iter_batches():
            for img, pid, lab in zip(b.images, b.patient_ids, b.labels):
                yield img, int(pid), int(lab)
