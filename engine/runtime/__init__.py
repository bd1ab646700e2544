"""Pick and build a runner for one graph of a bundle.

``auto`` tries, in order: tensorrt, onnxruntime CUDA, torch CUDA, onnxruntime CPU,
torch CPU; it logs which it chose and why each faster one was not available. ``triton``
(a Triton Inference Server, :mod:`engine.runtime.triton`) is chosen by name only, with a
:class:`TritonTarget` saying where the server is.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

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


def graph_path(bundle: Bundle, graph: str, model=None) -> Path:
    """The ONNX file of ``graph``: shipped in the bundle when it is current, else an export
    made earlier or now (an export needs PyTorch).

    Raises:
        RunnerError: no current ONNX of the graph and no PyTorch to export one.
    """
    shipped = bundle.shipped_graph(graph)
    if shipped is not None:
        return shipped
    path = bundle.export_path(graph)
    if path.exists():
        return path
    why = TorchRunner.is_available()
    if why:
        raise RunnerError(f"{bundle.path}: no current ONNX of graph {graph!r} in the bundle, and it cannot be exported here ({why}); "
                          "run `casemask engine export --ship` where PyTorch is installed")
    from engine.export import export_graph

    return export_graph(bundle, graph, model)


def make_runner(bundle: Bundle, graph: str, backend: str = "auto", max_batch: int = 128, model=None, trt_profile: tuple[int, int, int] = (1, 32, 128), spin: bool = True, triton: TritonTarget | None = None) -> tuple[Runner, Choice]:
    """A runner (not yet active) for ``graph`` of ``bundle`` on the chosen backend.

    ``spin=False`` lets ONNX Runtime's idle worker threads sleep: for a process whose other
    threads need the cores between batches (the node), at some cost to throughput.
    ``triton``: where the server is, for ``backend="triton"`` (the bundle's own graph is
    still found or made here: activation checks the server against it).
    ONNX backends run the bundle's shipped graph when it is current (no PyTorch needed),
    else an export (:func:`graph_path`).

    Raises:
        RunnerError: the backend is not available, or ``triton`` is missing for it.
    """
    if backend == "triton" and triton is None:
        raise RunnerError("backend triton needs the server: a TritonTarget (url = \"host:8001\" and the served model's name)")
    from engine.graphs import graph_specs, source_of

    choice = choose(backend)
    inputs, outputs = graph_specs(bundle.dims, graph)
    b = choice.backend
    if b.startswith("torch"):
        from engine.export import graph_module

        module = graph_module(bundle, graph, model)
        device = "cuda" if b == "torch-cuda" else "cpu"
        return TorchRunner(module, inputs, outputs, device=device, compile=b == "torch-compile", max_batch=max_batch), choice
    onnx = graph_path(bundle, graph, model)
    if b == "triton":
        assert triton is not None
        return TritonRunner(triton, graph, inputs, outputs, max_batch=max_batch, reference=onnx, weights_digest=bundle.digest(source_of(graph))), choice
    if b == "tensorrt":
        from engine.export import export_graph

        def fp16_onnx():
            path = bundle.export_path(graph, half=True)
            return path if path.exists() else export_graph(bundle, graph, model, half=True)

        return TensorRTRunner(onnx, inputs, outputs, cache_dir=bundle.writable_dir("plans"), profile=trt_profile, fp16_onnx=fp16_onnx), choice
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if b == "onnxruntime-cuda" else ["CPUExecutionProvider"]
    return OnnxRuntimeRunner(onnx, inputs, outputs, providers=providers, max_batch=max_batch, spin=spin), choice


__all__ = ["BACKENDS", "Choice", "Runner", "RunnerError", "TensorSpec", "TransientRunnerError", "TritonTarget", "choose", "graph_path", "make_runner", "unavailable"]
