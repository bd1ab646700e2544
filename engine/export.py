"""Export the inference graphs of a bundle to ONNX, with a dynamic batch axis, checked.

Each export is checked with ``onnx.checker`` and by comparing ONNX Runtime against
PyTorch on fresh random inputs. :func:`ship` writes the graphs the node runs
(``engine.graphs.NODE_GRAPHS``) into the bundle itself, fp32, once each, so that a node
runs them with ONNX Runtime alone.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from engine import graphs
from engine.bundle import SHIPPED_DIR, Bundle, load, write_meta
from engine.model import GRAPHS
from engine.runtime.base import TensorSpec

log = logging.getLogger(__name__)
OPSET = 17


def graph_specs(bundle: Bundle, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of ``graph`` for ``bundle`` (see :func:`engine.graphs.graph_specs`)."""
    return graphs.graph_specs(bundle.dims, graph)


def graph_module(bundle: Bundle, graph: str, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The PyTorch module of ``graph``: from the model's weights, or the gates' (``gates.pt``)."""
    if graph in graphs.GATE_GRAPHS:
        from engine.gate_fit import GATE_GRAPHS, load_gate_nets

        return GATE_GRAPHS[graph](load_gate_nets(bundle)).eval()
    return GRAPHS[graph](model or bundle.load_torch()).eval()


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


def export_graph(bundle: Bundle, graph: str, model: torch.nn.Module | None = None, check: bool = True, atol: float = 1e-4, half: bool = False, to: Path | None = None) -> Path:
    """Export one graph to :meth:`Bundle.export_path` (or ``to``; ``half``: float16 weights,
    inputs and outputs, for TensorRT's strongly typed networks); returns the path.

    Raises:
        RuntimeError: the export fails the checker or disagrees with PyTorch beyond ``atol``
            (times the output's largest magnitude where that exceeds 1).
    """
    import copy

    import onnx

    if graph in graphs.GATE_GRAPHS:
        module = graph_module(bundle, graph)
        module = copy.deepcopy(module).half() if half else module
    else:
        model = model or bundle.load_torch()
        module = GRAPHS[graph](copy.deepcopy(model).half() if half else model).eval()
    inputs, outputs = graph_specs(bundle, graph)
    example = tuple(torch.from_numpy(v).half() if half else torch.from_numpy(v) for v in random_feed(inputs, 2).values())
    path = Path(to) if to is not None else bundle.export_path(graph, half)
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
                # Relative to the output's scale where it exceeds 1 (a Mahalanobis distance
                # of random inputs is in the hundreds; float32 carries ~7 digits of it).
                if err > atol * max(1.0, float(np.abs(r.numpy()).max())):
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(f"{graph}.onnx output {s.name} differs from PyTorch by {err:.2e} (> {atol})")
    tmp.replace(path)
    log.info("exported %s (%d bytes)", path, path.stat().st_size)
    return path


def export_all(bundle: Bundle, names: list[str] | None = None) -> list[Path]:
    """Export ``names`` (default: every model graph, and the gate graphs when the bundle has gates)."""
    model = bundle.load_torch()
    default = list(graphs.MODEL_GRAPHS) + (list(graphs.GATE_GRAPHS) if bundle.has_gates else [])
    return [export_graph(bundle, g, model) for g in (names or default)]


def ship(bundle: Bundle, names: tuple[str, ...] | list[str] = graphs.NODE_GRAPHS) -> dict[str, dict]:
    """Write ``names`` (default: the node's graphs) into ``bundle/graphs/<graph>.onnx``,
    fp32, checked, and record each in ``model.json`` (``shipped_graphs``: file, SHA-256,
    size and the digest of the weights it was made from). Earlier shipped files go.

    Raises:
        RuntimeError: an export fails its checks.
    """
    out = bundle.path / SHIPPED_DIR
    every = set(names) == set(graphs.NODE_GRAPHS)
    if out.exists() and every:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model = bundle.load_torch()
    record = {} if every else dict(bundle.meta.get("shipped_graphs", {}))  # a few again: the others' records kept
    for g in names:
        path = export_graph(bundle, g, model, to=out / f"{g}.onnx")
        data = path.read_bytes()
        record[g] = {"file": f"{SHIPPED_DIR}/{g}.onnx", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "from": bundle.digest(graphs.source_of(g))}
    meta = load(bundle.path).meta
    meta["shipped_graphs"] = record
    write_meta(bundle.path, meta)
    log.info("shipped %d graphs in %s (%d bytes)", len(record), out, sum(r["bytes"] for r in record.values()))
    return record
