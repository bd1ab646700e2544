"""Pixel step through a Triton Inference Server against the local ONNX Runtime backend.

    python tests/bench/bench_triton.py [--images 50] [--size 256] [--rounds 15] [--server-threads 0]

One synthetic 50-image DX study goes through the node's whole pixel step (decode, LUTs,
resize, model, inverse mapping, derived objects) twice per round: once with the reference
model on the local ``onnxruntime`` backend (as the node runs it: workers sleep between
runs), once with ``backend = "triton"`` against a real tritonserver started here
(``tests/triton_server.py``: NVIDIA's PyTriton, ONNX Runtime on the CPU behind Triton's
gRPC protocol and dynamic batcher, the same ONNX graph). The two take turns, in
alternating order, so a machine whose speed drifts moves both alike. Prints each side's
median images/s and spread (min to max), and the median over rounds of Triton's time
over local time. Target on the 2-core development machine: Triton within 30% of local
(images/s ratio >= 0.70).

Needs ``make triton-venv``. Here both sides share the same two cores: the server's
ONNX Runtime computes while the node process waits on the answer.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

from pydicom import dcmread  # noqa: E402

from tests.bench.bench_pixels import make_study  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.triton_server import TritonServer, unavailable  # noqa: E402


def pixel_step(work: Path, backend: str, url: str = ""):
    """A warmed-up pixel step (and its route) for the reference model on ``backend``."""
    from node.config import parse
    from node.pixels import EnginePixelStep

    model = {"name": "reference", "path": "builtin:reference", "backend": backend}
    if url:
        model.update(url=url, triton_model="reference")
    raw = {
        "node": {"data_dir": str(work / backend)},
        "destinations": [{"name": "out", "kind": "folder", "path": str(work / "out")}],
        "routes": [{"name": "chest", "match": {"Modality": "DX"}, "pixels": "anonymize", "model": "reference", "allow_demonstration_model": True, "destinations": ["out"]}],
        "models": [model],
    }
    settings = parse(raw, "bench", base_dir=work)
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    step = EnginePixelStep(settings)
    step.warm()
    if step.errors:
        raise SystemExit(f"{backend}: {step.errors}")
    return step, settings.routes[0]


def run_once(step, route, files: list[Path]) -> float:
    from node.deid import Pseudonymizer
    from node.pipeline import Item

    items = [Item(job=None, source=dcmread(f)) for f in files]  # type: ignore[arg-type]
    t0 = time.perf_counter()
    step.process(items, route, Pseudonymizer(bytes(32)))
    dt = time.perf_counter() - t0
    bad = [it.error for it in items if it.error or not it.outputs]
    if bad:
        raise SystemExit(f"pixel step failed: {bad[:3]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--size", type=int, default=256, help="stored image size (the model resizes to its own)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--server-threads", type=int, default=0, help="the server's ONNX Runtime threads (0: its default)")
    args = ap.parse_args()
    why = unavailable()
    if why:
        print(f"no Triton server here: {why}")
        return 2
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    from engine import bundle as bundles
    from engine.export import export_graph

    work = Path(tempfile.mkdtemp(prefix="casemask-bench-triton-"))
    try:
        files = make_study(work / "study", args.images, args.size)
        reference = bundles.load("builtin:reference")
        onnx = reference.export_path("anonymize")
        if not onnx.exists():
            export_graph(reference, "anonymize")
        server = TritonServer({"reference_anonymize": onnx}, work / "triton", free_port(), free_port(), threads=args.server_threads)
        with server:
            local, route = pixel_step(work, "onnxruntime")
            remote, _ = pixel_step(work, "triton", server.url)
            print(f"local:  {local.models['reference'].describe()['runner']}")
            print(f"triton: {remote.models['reference'].describe()['runner']} (tritonserver from nvidia-pytriton, ONNX Runtime CPU inside)")
            times: dict[str, list[float]] = {"local": [], "triton": []}
            for rnd in range(args.rounds):
                order = [("local", local), ("triton", remote)]
                for name, step in order if rnd % 2 == 0 else order[::-1]:
                    times[name].append(run_once(step, route, files))
            for step in (local, remote):
                for m in step.models.values():
                    m.close()  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.images
    for name, ts in times.items():
        rates = [n / t for t in ts]
        print(f"{name:<7} pixel step: median {statistics.median(rates):6.1f} images/s (min {min(rates):.1f}, max {max(rates):.1f}; {len(ts)} rounds)")
    ratios = [loc / tri for loc, tri in zip(times["local"], times["triton"])]
    med = statistics.median(ratios)
    print(f"triton / local images/s: median of rounds {med:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); target >= 0.70 -> {'met' if med >= 0.70 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
