"""One Runner interface for every backend (after Polygraphy's base runner).

``activate`` / ``infer`` / ``deactivate`` are public and checked here; backends implement
the ``*_impl`` hooks. ``infer`` takes any batch size and splits it into the largest
batches the backend was built for. Heavy imports happen inside the backends, lazily.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An input or output: name, shape with -1 for the batch axis, numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


class RunnerError(RuntimeError):
    pass


class TransientRunnerError(RunnerError):
    """The backend is out of reach for now (an inference server down, a timeout): the
    caller should retry the same work later. It says nothing about the input, so it must
    never quarantine an object or count as one of its failed attempts."""


class Runner(abc.ABC):
    """Base class of every backend. Use as a context manager::

        with OnnxRuntimeRunner(path, inputs, outputs) as r:
            out = r.infer({"image": x, "noise": z})
    """

    backend: str = "base"

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int = 128) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch = max_batch
        self.is_active = False
        self.device = "cpu"

    # -- availability -------------------------------------------------------------
    @classmethod
    def is_available(cls) -> str | None:
        """None when this backend can run here; else what is missing."""
        return None

    # -- lifecycle ------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            why = self.is_available()
            if why:
                raise RunnerError(f"{self.backend} is not available: {why}")
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- inference ------------------------------------------------------------------
    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on any number of items; inputs are checked against the specs.

        Raises:
            RunnerError: not active, a missing or unexpected input, or a wrong shape or dtype.
        """
        if not self.is_active:
            raise RunnerError(f"{self.backend} runner is not active: call activate() or use 'with'")
        names = {s.name for s in self.inputs}
        if set(feed) != names:
            raise RunnerError(f"inputs {sorted(feed)} do not match the expected {sorted(names)}")
        n = None
        for spec in self.inputs:
            arr = feed[spec.name]
            if arr.dtype != np.dtype(spec.dtype):
                raise RunnerError(f"input {spec.name}: dtype {arr.dtype}, expected {spec.dtype}")
            if arr.ndim != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, arr.shape)):
                raise RunnerError(f"input {spec.name}: shape {arr.shape}, expected {spec.shape} (-1 = any batch)")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise RunnerError("inputs disagree on the batch size")
        assert n is not None
        if n == 0:
            return {s.name: np.zeros((0, *s.shape[1:]), dtype=s.dtype) for s in self.outputs}
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, self.max_batch):
            chunk = {k: np.ascontiguousarray(v[start : start + self.max_batch]) for k, v in feed.items()}
            parts.append(self._infer_impl(chunk))
        return {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _deactivate_impl(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.backend} on {self.device}"
