"""Inference API: arrays in, arrays out, batched, on the chosen backend.

    >>> m = load_model("builtin:reference", backend="torch")
    >>> x = np.zeros((4, 1, m.image_size, m.image_size), np.float32)
    >>> m.anonymize(x, seed=0).shape
    (4, 1, 64, 64)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine import bundle as bundles
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
        self.choice: Choice | None = None

    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    @property
    def n_classes(self) -> int:
        return self.bundle.config.n_classes

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.meta.get("classes", [str(i) for i in range(self.n_classes)]))

    def runner(self, graph: str) -> Runner:
        r = self._runners.get(graph)
        if r is None:
            if self._torch_model is None:
                self._torch_model = self.bundle.load_torch()
            r, self.choice = make_runner(self.bundle, graph, self.backend_requested, self.max_batch, model=self._torch_model, spin=self.spin, triton=self.triton)
            r.activate()
            self._runners[graph] = r
        return r

    def describe(self) -> dict[str, str]:
        r = next(iter(self._runners.values()), None)
        return {
            "bundle": str(self.bundle.path),
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
        if x.ndim != 4 or x.shape[1:] != (self.bundle.config.channels, s, s):
            raise ValueError(f"images must be N x {self.bundle.config.channels} x {s} x {s}, got {x.shape}")
        return x

    # -- the four operations ----------------------------------------------------------
    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.runner("encode").infer({"image": self._check(x)})
        return out["medical"], out["identity"], out["other"]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.runner("reconstruct").infer({"image": self._check(x)})["output"]

    def identity_noise(self, n: int, seed: int | None = None) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, self.bundle.config.vae_latent)).astype(np.float32)

    def synthetic_identities(self, n: int, seed: int | None = None) -> np.ndarray:
        """Identity vectors that anonymization draws (the VAE, in PyTorch), for inspection."""
        import torch

        if self._torch_model is None:
            self._torch_model = self.bundle.load_torch()
        with torch.no_grad():
            return self._torch_model.vae.sample(torch.from_numpy(self.identity_noise(n, seed))).numpy()

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
