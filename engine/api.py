"""Inference API: arrays in, arrays out, batched, on the chosen backend.

    >>> m = load_model("builtin:reference", backend="torch")
    >>> x = np.zeros((4, 1, m.image_size, m.image_size), np.float32)
    >>> m.anonymize(x, seed=0).shape
    (4, 1, 64, 64)

:meth:`Model.anonymize_checked` is what the node runs: anonymization (and anonymized
counterfactuals) composed from the ``encode``, ``identity`` and ``generate`` graphs, with
every image judged by the bundle's gates (``engine.gates``). With the ``onnxruntime``
backend and a bundle that ships its node graphs, nothing here imports PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine import bundle as bundles
from engine.gates import RETRIED, GateSet, Scores, Verdict
from engine.runtime import Choice, Runner, TritonTarget, make_runner

log = logging.getLogger(__name__)


class Model:
    """A loaded bundle with one runner per graph, activated on first use."""

    def __init__(self, bundle: bundles.Bundle, backend: str = "auto", max_batch: int = 128, spin: bool = True, triton: TritonTarget | None = None) -> None:
        self.bundle = bundle
        self.backend_requested = backend
        self.max_batch = max_batch
        self.spin = spin
        self.triton = triton
        self._runners: dict[str, Runner] = {}
        self._torch_model = None
        self._gates: GateSet | None = None
        self.choice: Choice | None = None

    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    @property
    def n_classes(self) -> int:
        return int(self.bundle.dims["n_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.meta.get("classes", [str(i) for i in range(self.n_classes)]))

    @property
    def prototypes(self) -> np.ndarray:
        """(classes, med_dim): the mean medical vector of each class (counterfactuals)."""
        return np.asarray(self.bundle.meta["prototypes"], np.float32)

    @property
    def gates(self) -> GateSet:
        """The bundle's gates.

        Raises:
            engine.gates.GateError: the bundle has none, or they were fitted to other weights.
        """
        if self._gates is None:
            from engine.gates import GateError

            if not self.bundle.has_gates:
                raise GateError(f"{self.bundle.path}: the bundle has no gates: run `casemask engine fit-gates --model {self.bundle.path}`")
            self._gates = GateSet.from_meta(self.bundle.meta, self.bundle.weights_digest(), self.bundle.digest("gates.pt"))
        return self._gates

    def _torch(self):
        if self._torch_model is None:
            self._torch_model = self.bundle.load_torch()
        return self._torch_model

    def runner(self, graph: str) -> Runner:
        r = self._runners.get(graph)
        if r is None:
            # PyTorch only where the backend is torch or a graph must be exported first.
            model = self._torch() if self.backend_requested.startswith("torch") else None
            r, self.choice = make_runner(self.bundle, graph, self.backend_requested, self.max_batch, model=model, spin=self.spin, triton=self.triton)
            r.activate()
            self._runners[graph] = r
        return r

    def describe(self) -> dict[str, str]:
        r = next(iter(self._runners.values()), None)
        return {
            "bundle": str(self.bundle.path),
            "name": self.bundle.name,
            "backend": r.backend if r else self.backend_requested,
            "device": r.device if r else "",
            "runner": r.describe() if r else "",
            "why": self.choice.why if self.choice else "",
        }

    def close(self) -> None:
        for r in self._runners.values():
            r.deactivate()
        self._runners.clear()

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        s = self.image_size
        c = int(self.bundle.dims.get("channels", 1))
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"images must be N x {c} x {s} x {s}, got {x.shape}")
        return x

    # -- the four operations ----------------------------------------------------------
    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.runner("encode").infer({"image": self._check(x)})
        return out["medical"], out["identity"], out["other"]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.runner("reconstruct").infer({"image": self._check(x)})["output"]

    def identity_noise(self, n: int, seed: int | None = None) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, int(self.bundle.dims["vae_latent"]))).astype(np.float32)

    def synthetic_identities(self, n: int, seed: int | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """Identity vectors that anonymization draws (the VAE's decoder) from ``noise``, or
        from ``n`` draws of ``seed``."""
        z = noise if noise is not None else self.identity_noise(n, seed)
        return self.runner("identity").infer({"noise": np.asarray(z, np.float32)})["identity"]

    def generate(self, medical: np.ndarray, identity: np.ndarray, other: np.ndarray) -> np.ndarray:
        """Images drawn from the three vectors (N, dim each)."""
        feed = {"medical": medical, "identity": identity, "other": other}
        return self.runner("generate").infer({k: np.ascontiguousarray(v, np.float32) for k, v in feed.items()})["output"]

    def classify(self, x: np.ndarray) -> np.ndarray:
        """(N, classes) probabilities of the gates' independent classifier."""
        return self.runner("classify").infer({"image": self._check(x)})["probabilities"]

    def domain_scores(self, x: np.ndarray, medical: np.ndarray, identity: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The domain gate's (reconstruction error, latent distance) of images ``x`` and their encoding."""
        out = self.runner("domain").infer({"image": self._check(x), "medical": medical, "identity": identity, "other": other})
        return out["reconstruction_error"][:, 0], out["latent_distance"][:, 0]

    def anonymize_checked(self, x: np.ndarray, noise: np.ndarray, targets: np.ndarray | None = None, counterfactuals: bool = False,
                          redraw: Callable[[int, np.ndarray], np.ndarray] | None = None, draws: int = 1, medical: np.ndarray | None = None,
                          retry: tuple[str, ...] = RETRIED) -> Checked:
        """Anonymize images ``x`` with identity ``noise`` (N, vae_latent); with ``targets``
        (N,), or ``counterfactuals`` (each image's target: the class after the one whose
        prototype its medical vector is nearest), also give each a counterfactual of that
        class carrying the same synthetic identity (unlike :meth:`counterfactual`, which
        keeps the patient's); judge every image by the bundle's gates.

        An image whose failed gates are all in ``retry`` (by default identity and medical:
        gates that judge the draw, not the input; the domain gate, and the medical gate's
        reading of the original, judge the input, so an image they fail is never drawn
        again) gets up to ``draws - 1`` more synthetic
        identities, ``redraw(attempt, rows)`` giving the noise for those rows (attempt 1,
        2, ...). Each draw is judged by every gate afresh; the image, counterfactual and
        verdict kept are those of the first draw that passes every gate, or of the last
        draw (``Verdict.draw`` says which). A changed finding gets the same draws as an
        honest image: the evaluation's ``changed_finding`` calls this with the node's
        ``draws`` and ``retry``.

        ``medical`` (N, med_dim): drawn in place of the encoder's medical vectors while the
        gates read the original as it is: an image whose finding was changed, which the
        medical gate must turn away (the evaluation's ``changed_finding`` cases).

        Raises:
            engine.gates.GateError: the bundle has no current gates.
            ValueError: ``retry`` names a gate that does not judge the draw.
        """
        if not set(retry) <= set(RETRIED):
            raise ValueError(f"retry: only {', '.join(RETRIED)} judge the draw and may earn another (got {', '.join(sorted(retry))})")
        gates = self.gates
        x = self._check(x)
        med, ident, other = self.encode(x)
        if targets is None and counterfactuals:
            nearest = ((med[:, None] - self.prototypes[None]) ** 2).sum(-1).argmin(1)
            targets = (nearest + 1) % len(self.prototypes)
        targets = None if targets is None else np.asarray(targets, np.int64)
        err, dist = self.domain_scores(x, med, ident, other)  # of the input as it is, always
        if medical is not None:
            med = np.asarray(medical, np.float32)
        p_x = self.classify(x)
        rows = np.arange(len(x))
        out = self._draw(gates, (med, ident, other), err, dist, p_x, noise, targets)
        retried = set(retry)
        for attempt in range(1, draws if redraw is not None else 1):
            again = np.array([r for r in rows if out.verdicts[r].failed and set(out.verdicts[r].failed) <= retried and not out.verdicts[r].input_failed],
                             np.int64)
            if not len(again):
                break
            sub = self._draw(gates, (med[again], ident[again], other[again]), err[again], dist[again], p_x[again], redraw(attempt, again),  # type: ignore[misc]
                             None if targets is None else targets[again])
            for j, r in enumerate(again):
                out.anonymized[r] = sub.anonymized[j]
                if out.counterfactual is not None:
                    out.counterfactual[r] = sub.counterfactual[j]  # type: ignore[index]
                out.verdicts[r] = sub.verdicts[j]
                out.verdicts[r].draw = attempt + 1
        return out

    def _draw(self, gates: GateSet, encoded, err, dist, p_x, noise, targets) -> Checked:
        """One synthetic identity per image, its anonymized image (and counterfactual), judged."""
        med, ident, other = encoded
        n = len(med)
        syn = self.synthetic_identities(n, noise=noise)
        outputs = {"anonymized": (med, syn, other)}
        if targets is not None:
            outputs["counterfactual"] = (self.prototypes[targets], syn, other)
        kinds = list(outputs)
        drawn = self.generate(*(np.concatenate([outputs[k][j] for k in kinds]) for j in range(3)))
        probs = self.classify(drawn)
        _, again, _ = self.encode(drawn)
        part = {k: slice(j * n, (j + 1) * n) for j, k in enumerate(kinds)}
        scores = Scores(
            reconstruction_error=err,
            latent_distance=dist,
            p_original=p_x,
            p_outputs={k: probs[part[k]] for k in kinds},
            identity_distance={k: gates.identity_distance(again[part[k]], ident) for k in kinds},
            targets=targets,
        )
        return Checked(drawn[part["anonymized"]], drawn[part["counterfactual"]] if targets is not None else None, targets, gates.judge(scores))

    def anonymize(self, x: np.ndarray, seed: int | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """Each image gets a new synthetic identity; the same seed gives the same output."""
        x = self._check(x)
        z = noise if noise is not None else self.identity_noise(x.shape[0], seed)
        return self.runner("anonymize").infer({"image": x, "noise": z.astype(np.float32)})["output"]

    def counterfactual(self, x: np.ndarray, target_class: int | np.ndarray) -> np.ndarray:
        """The same patient and acquisition with the medical features of ``target_class``."""
        x = self._check(x)
        t = np.broadcast_to(np.asarray(target_class), (x.shape[0],))
        onehot = np.eye(self.n_classes, dtype=np.float32)[t]
        return self.runner("counterfactual").infer({"image": x, "target": onehot})["output"]


@dataclasses.dataclass
class Checked:
    """What :meth:`Model.anonymize_checked` made and the gates' verdict on each image."""

    anonymized: np.ndarray  # (N, C, S, S)
    counterfactual: np.ndarray | None  # (N, C, S, S) or None
    targets: np.ndarray | None  # (N,) classes of the counterfactuals
    verdicts: list[Verdict]


def load_model(name_or_path: str | Path = "builtin:reference", backend: str = "auto", max_batch: int = 128, spin: bool = True, triton: TritonTarget | None = None) -> Model:
    """Load a bundle (``builtin:reference`` or a directory) for inference on ``backend``.

    ``spin=False``: ONNX Runtime's idle worker threads sleep instead of spinning (see
    ``engine.runtime.make_runner``). ``triton``: the server for ``backend="triton"``.

    Raises:
        engine.bundle.BundleError: not a bundle.
        engine.runtime.RunnerError: the backend is not available (when asked for by name).
        engine.runtime.TransientRunnerError: (from the operations, on ``triton``) the
            server is out of reach for now; the same call may succeed later.
    """
    return Model(bundles.load(name_or_path), backend, max_batch, spin, triton)
