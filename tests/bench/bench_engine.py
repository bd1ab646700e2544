"""Engine throughput: images/s and per-batch latency per backend, against PyTorch eager.

    python tests/bench/bench_engine.py [--model builtin:reference] [--graph anonymize] [--seconds 2] [--rounds 3] [--backends torch,onnxruntime,...]

Every backend available here runs the same graph on the same inputs at batch 1, 8, 32
and 128; PyTorch eager (fp32, same device class) is measured in the same run and each
line prints its ratio. The backends take turns: each round measures every backend at a
batch size before moving on, and a line reports the median over rounds, so a machine
that drifts in speed during the run moves both sides of a ratio alike. Backends that are
not available are listed with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine import bundle as bundles  # noqa: E402
from engine.export import graph_specs, random_feed  # noqa: E402
from engine.model import GRAPHS  # noqa: E402
from engine.runtime import make_runner, unavailable  # noqa: E402
from engine.runtime.backends import TorchRunner  # noqa: E402

BATCHES = (1, 8, 32, 128)
CANDIDATES = ("torch", "onnxruntime", "torch-compile", "torch-cuda", "onnxruntime-cuda", "tensorrt")


def timeit(runner, feed, seconds: float) -> tuple[float, float]:
    """(images/s, median ms per batch) over about ``seconds`` after a warm-up."""
    n = next(iter(feed.values())).shape[0]
    for _ in range(3):
        runner.infer(feed)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        runner.infer(feed)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return n / med, med * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--graph", default="anonymize", choices=sorted(GRAPHS))
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per backend and batch, split over the rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--backends", default=",".join(CANDIDATES), help="the backends to measure (those not available here are listed with the reason)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="casemask-bench-engine-"))
    src = bundles.resolve(args.model)
    shutil.copytree(src, tmp / src.name, ignore=shutil.ignore_patterns("plans"))
    b = bundles.load(tmp / src.name)
    import torch

    print(f"model {args.model}, graph {args.graph}, image {b.image_size}x{b.image_size}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    candidates = [c for c in args.backends.split(",") if c]
    inputs, outputs = graph_specs(b, args.graph)
    model = b.load_torch()
    runners = {}
    with contextlib.ExitStack() as stack:
        for backend in candidates:
            why = unavailable(backend)
            if why:
                print(f"{backend:<18} not available: {why}")
                continue
            try:
                # A CUDA runner moves its module to the GPU in place: it gets its own copy,
                # or the CPU runners sharing the model would find their weights there.
                own = b.load_torch() if "cuda" in backend else model
                runner, _ = make_runner(b, args.graph, backend, max_batch=max(batches), model=own)
                runners[backend] = stack.enter_context(runner)
                if backend == "torch-cuda":
                    half = TorchRunner(type(runner.module)(b.load_torch()), inputs, outputs, device="cuda", half=True, max_batch=max(batches))
                    runners["torch-cuda-fp16"] = stack.enter_context(half)
            except Exception as exc:  # report, keep measuring the others
                print(f"{backend:<18} failed: {type(exc).__name__}: {exc}")
        samples: dict[str, dict[int, list[tuple[float, float]]]] = {k: {n: [] for n in batches} for k in runners}
        for _ in range(args.rounds):
            for n in batches:
                feed = random_feed(inputs, n, seed=n)
                for backend, runner in list(runners.items()):
                    try:
                        samples[backend][n].append(timeit(runner, feed, args.seconds / args.rounds))
                    except Exception as exc:  # report, keep measuring the others
                        print(f"{backend:<18} failed: {type(exc).__name__}: {exc}")
                        del runners[backend], samples[backend]
    results = {k: {n: (float(np.median([s[0] for s in v])), float(np.median([s[1] for s in v]))) for n, v in rows.items()} for k, rows in samples.items()}
    print(f"\n{'backend':<18} {'batch':>5} {'images/s':>10} {'ms/batch':>9} {'vs torch eager':>15}")
    for backend, rows in results.items():
        ref = results["torch-cuda"] if "cuda" in backend and "torch-cuda" in results else results.get("torch")
        for n, (ips, ms) in rows.items():
            ratio = ips / ref[n][0] if ref else float("nan")
            print(f"{backend:<18} {n:>5} {ips:>10.1f} {ms:>9.2f} {ratio:>14.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
