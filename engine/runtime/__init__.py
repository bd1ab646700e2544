"""Pick and build a runner for one graph of a bundle.

``auto`` tries, in order: tensorrt, onnxruntime CUDA, torch CUDA, onnxruntime CPU,
torch CPU; it logs which it chose and why each faster one was not available. ``triton``
(a Triton Inference Server, :mod:`engine.runtime.triton`) is chosen by name only, with a
:class:`TritonTarget` saying where the server is.
"""

from __future__ import annotations

import dataclasses
import logging

from engine.bundle import Bundle
from engine.runtime.backends import OnnxRuntimeRunner, TensorRTRunner, TorchRunner
from engine.runtime.base import Runner, RunnerError, TensorSpec, TransientRunnerError
from engine.runtime.triton import TritonRunner, TritonTarget

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "torch", "torch-cuda", "torch-compile", "triton")
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime", "torch")


@dataclasses.dataclass
class Choice:
    backend: str
    why: str  # why the faster ones were skipped


def unavailable(backend: str) -> str | None:
    """None when ``backend`` can run here; else what is missing."""
    if backend == "tensorrt":
        return TensorRTRunner.is_available()
    if backend == "triton":
        return TritonRunner.is_available()
    if backend.startswith("onnxruntime"):
        why = OnnxRuntimeRunner.is_available()
        if why or backend == "onnxruntime":
            return why
        return OnnxRuntimeRunner.provider_available("CUDAExecutionProvider")
    if backend.startswith("torch"):
        why = TorchRunner.is_available()
        if why or backend in ("torch", "torch-compile"):
            return why
        return TorchRunner.cuda_available()
    return f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})"


def choose(backend: str = "auto") -> Choice:
    if backend != "auto":
        why = unavailable(backend)
        if why:
            raise RunnerError(f"backend {backend} is not available: {why}")
        return Choice(backend, "asked for")
    skipped = []
    for b in AUTO_ORDER:
        why = unavailable(b)
        if why is None:
            reason = "; ".join(skipped) if skipped else "fastest available"
            log.info("backend auto -> %s (%s)", b, reason)
            return Choice(b, reason)
        skipped.append(f"{b}: {why}")
    raise RunnerError("no backend is available: " + "; ".join(skipped))


def make_runner(bundle: Bundle, graph: str, backend: str = "auto", max_batch: int = 128, model=None, trt_profile: tuple[int, int, int] = (1, 32, 128), spin: bool = True, triton: TritonTarget | None = None) -> tuple[Runner, Choice]:
    """A runner (not yet active) for ``graph`` of ``bundle`` on the chosen backend.

    ``spin=False`` lets ONNX Runtime's idle worker threads sleep: for a process whose other
    threads need the cores between batches (the node), at some cost to throughput.
    ``triton``: where the server is, for ``backend="triton"`` (the bundle's own export is
    still made here: activation checks the server against it).

    Raises:
        RunnerError: the backend is not available, or ``triton`` is missing for it.
    """
    if backend == "triton" and triton is None:
        raise RunnerError("backend triton needs the server: a TritonTarget (url = \"host:8001\" and the served model's name)")
    from engine.export import export_graph, graph_specs
    from engine.model import GRAPHS

    choice = choose(backend)
    inputs, outputs = graph_specs(bundle, graph)
    b = choice.backend
    if b.startswith("torch"):
        module = GRAPHS[graph](model or bundle.load_torch())
        device = "cuda" if b == "torch-cuda" else "cpu"
        return TorchRunner(module, inputs, outputs, device=device, compile=b == "torch-compile", max_batch=max_batch), choice
    onnx = bundle.export_path(graph)
    if not onnx.exists():
        onnx = export_graph(bundle, graph, model)
    if b == "triton":
        assert triton is not None
        return TritonRunner(triton, graph, inputs, outputs, max_batch=max_batch, reference=onnx, weights_digest=bundle.weights_digest()), choice
    if b == "tensorrt":

        def fp16_onnx():
            path = bundle.export_path(graph, half=True)
            return path if path.exists() else export_graph(bundle, graph, model, half=True)

        return TensorRTRunner(onnx, inputs, outputs, cache_dir=bundle.writable_dir("plans"), profile=trt_profile, fp16_onnx=fp16_onnx), choice
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if b == "onnxruntime-cuda" else ["CPUExecutionProvider"]
    return OnnxRuntimeRunner(onnx, inputs, outputs, providers=providers, max_batch=max_batch, spin=spin), choice


__all__ = ["BACKENDS", "Choice", "Runner", "RunnerError", "TensorSpec", "TransientRunnerError", "TritonTarget", "choose", "make_runner", "unavailable"]
