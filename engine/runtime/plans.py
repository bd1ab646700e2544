"""A folder of serialized TensorRT engines (plans) and timing caches, shared by processes.

A plan is valid only for the ONNX it was built from, the TensorRT version, the GPU model
it was built on, the precision and the optimization profile: :func:`plan_key` hashes all
of these (and the build recipe's version, so plans of an older recipe are never reused).
The GPU is described by the device the engine will actually run on, not device 0.

Several processes (node workers, ``casemask engine build``) may ask for the same plan at
once: :meth:`PlanCache.get` takes an exclusive ``flock`` on ``<plan>.lock`` while it
builds, so one process builds and the others wait and then reuse its plan; every file is
written under a unique temporary name (``mkstemp``), fsynced and renamed into place, so
no reader ever sees half a plan and no two writers share a temporary file. The timing
cache is kept per GPU model and TensorRT version (a cache from another GPU is useless to
the builder) and rewritten the same way after each build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Bumped whenever the way a plan is built changes its numbers (2: TF32 off for fp32).
RECIPE = 2


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """What makes a plan valid on a GPU: its model and compute capability."""

    name: str
    capability: str  # "9.0"
    multiprocessors: int

    @classmethod
    def of(cls, props) -> GpuInfo:
        """From ``torch.cuda.get_device_properties(index)``."""
        return cls(str(props.name), f"{props.major}.{props.minor}", int(props.multi_processor_count))


def plan_key(onnx_sha256: str, trt_version: str, gpu: GpuInfo, fp16: bool, profile: tuple[int, int, int]) -> str:
    """20 hex digits naming one plan: the same inputs always give the same key."""
    parts = {
        "recipe": RECIPE,
        "onnx": onnx_sha256,
        "trt": trt_version,
        "gpu": gpu.name,
        "cc": gpu.capability,
        "sms": gpu.multiprocessors,
        "precision": "fp16" if fp16 else "fp32",
        "tf32": fp16,  # TF32 is turned off for fp32 plans (parity); fp16 plans may use it
        "profile": list(profile),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def timing_key(trt_version: str, gpu: GpuInfo) -> str:
    """12 hex digits naming the timing cache of one GPU model and TensorRT version."""
    return hashlib.sha256(json.dumps([trt_version, gpu.name, gpu.capability, gpu.multiprocessors]).encode()).hexdigest()[:12]


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a unique temporary file in the same folder
    (fsynced, then renamed over ``path``), readable per ``mode``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PlanCache:
    """Plans and timing caches in ``folder``; ``builds`` counts the plans this object built."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.builds = 0

    @contextlib.contextmanager
    def _locked(self, plan: Path) -> Iterator[None]:
        with open(plan.with_name(plan.name + ".lock"), "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get(self, name: str, build: Callable[[], bytes]) -> Path:
        """The plan ``name``, built by ``build()`` (serialized engine bytes) only when no
        process has built it yet.

        Raises:
            whatever ``build`` raises; nothing is written then.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        plan = self.folder / name
        if plan.exists():
            return plan
        with self._locked(plan):
            if plan.exists():  # another process built it while this one waited
                return plan
            data = build()
            write_atomic(plan, data)
            self.builds += 1
            log.info("TensorRT plan built: %s", plan.name)
        return plan

    def timing_path(self, key: str) -> Path:
        return self.folder / f"timing-{key}.cache"

    def read_timing(self, key: str) -> bytes:
        path = self.timing_path(key)
        return path.read_bytes() if path.exists() else b""

    def write_timing(self, key: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.timing_path(key), data)
