"""Export the inference graphs of a bundle to ONNX, with a dynamic batch axis, checked.

Each export is checked with ``onnx.checker`` and by comparing ONNX Runtime against
PyTorch on fresh random inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from engine.bundle import Bundle
from engine.model import GRAPHS
from engine.runtime.base import TensorSpec

log = logging.getLogger(__name__)
OPSET = 17


def graph_specs(bundle: Bundle, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    cfg = bundle.config
    img = TensorSpec("image", (-1, cfg.channels, cfg.image_size, cfg.image_size))
    if graph == "anonymize":
        return [img, TensorSpec("noise", (-1, cfg.vae_latent))], [TensorSpec("output", img.shape)]
    if graph == "counterfactual":
        return [img, TensorSpec("target", (-1, cfg.n_classes))], [TensorSpec("output", img.shape)]
    if graph == "reconstruct":
        return [img], [TensorSpec("output", img.shape)]
    if graph == "encode":
        return [img], [TensorSpec("medical", (-1, cfg.med_dim)), TensorSpec("identity", (-1, cfg.id_dim)), TensorSpec("other", (-1, cfg.other_dim))]
    raise ValueError(f"unknown graph {graph!r}; known: {', '.join(GRAPHS)}")


def random_feed(specs: list[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for s in specs:
        shape = (batch, *s.shape[1:])
        if s.name == "target":
            feed[s.name] = np.eye(shape[1], dtype=np.float32)[rng.integers(0, shape[1], batch)]
        elif s.name == "image":
            feed[s.name] = rng.uniform(-1, 1, shape).astype(np.float32)
        else:
            feed[s.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def export_graph(bundle: Bundle, graph: str, model: torch.nn.Module | None = None, check: bool = True, atol: float = 1e-4, half: bool = False) -> Path:
    """Export one graph to :meth:`Bundle.export_path` (``half``: float16 weights, inputs and
    outputs, for TensorRT's strongly typed networks); returns the path.

    Raises:
        RuntimeError: the export fails the checker or disagrees with PyTorch beyond ``atol``.
    """
    import copy

    import onnx

    model = model or bundle.load_torch()
    module = GRAPHS[graph](copy.deepcopy(model).half() if half else model).eval()
    inputs, outputs = graph_specs(bundle, graph)
    example = tuple(torch.from_numpy(v).half() if half else torch.from_numpy(v) for v in random_feed(inputs, 2).values())
    path = bundle.export_path(graph, half)
    check = check and not half  # ONNX Runtime's CPU provider lacks float16 kernels for some ops
    tmp = path.with_suffix(".tmp.onnx")
    dynamic = {s.name: {0: "batch"} for s in inputs + outputs}
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(tmp),
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto, full_check=True)
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        for batch, seed in ((1, 11), (5, 12)):
            feed = random_feed(inputs, batch, seed)
            with torch.no_grad():
                ref = module(*(torch.from_numpy(v) for v in feed.values()))
            refs = ref if isinstance(ref, tuple) else (ref,)
            got = sess.run([s.name for s in outputs], feed)
            for s, r, g in zip(outputs, refs, got):
                err = float(np.abs(r.numpy() - g).max())
                if err > atol:
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(f"{graph}.onnx output {s.name} differs from PyTorch by {err:.2e} (> {atol})")
    tmp.replace(path)
    log.info("exported %s (%d bytes)", path, path.stat().st_size)
    return path


def export_all(bundle: Bundle, graphs: list[str] | None = None) -> list[Path]:
    model = bundle.load_torch()
    return [export_graph(bundle, g, model) for g in (graphs or sorted(GRAPHS))]
