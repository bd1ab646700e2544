"""Pixel pipeline: end to end seconds for a 50-image study, and the pixel step's cost
next to the engine's own in the same run.

    python tests/bench/bench_pixels.py [--images 50] [--size 256] [--rounds 3]

1. End to end: dcmtk storescu sends a 50-image synthetic DX study to a node (reference
   model, auto backend) that forwards to a pynetdicom archive; seconds from the first
   C-STORE to the last object at the archive, and the same minus the configured
   stable_after_s wait.
2. Pixel step vs engine: images/s of the whole pixel step (decode, LUTs, resize, model,
   inverse mapping, derived objects) and of the engine alone (model.anonymize on the
   already-prepared arrays), on the same 50 images, in interleaved pairs with the node
   stopped; the overhead is pixel_step_time / engine_time - 1, printed for the best of
   each and as the median of the pairs. Target: <= 30%.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

from pydicom import dcmread  # noqa: E402

from tests.conftest import STORESCU, CountingArchive, dcmtk_env, node_config, wait_until  # noqa: E402


def make_study(folder: Path, n: int, size: int) -> list[Path]:
    from engine.data import SyntheticPatients
    from engine.data.dicom import write_dicom_studies

    files = write_dicom_studies(SyntheticPatients(1, n, size, seed=31), folder)
    study = dcmread(files[0]).StudyInstanceUID
    for f in files:  # one study of n images
        ds = dcmread(f)
        ds.StudyInstanceUID = study
        ds.save_as(f, enforce_file_format=True)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--size", type=int, default=256, help="stored image size (the model resizes to its own)")
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end runs")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved pixel step / engine measurements")
    args = ap.parse_args()
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # 'skipped: already running' is routine
    from node.app import Node
    from node.config import parse
    from node.deid import Pseudonymizer
    from node.pipeline import Item
    from node.pixels import EnginePixelStep, to_model

    work = Path(tempfile.mkdtemp(prefix="casemask-bench-pixels-"))
    files = make_study(work / "study", args.images, args.size)
    stable = 1.0
    e2e = []
    try:
        for rnd in range(args.rounds):
            archive = CountingArchive()
            dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}
            raw = node_config(work / f"r{rnd}", [dest], stable_after_s=stable, poll_interval_s=0.1)
            raw["routes"] = [{"name": "chest", "match": {"Modality": "DX"}, "pixels": "anonymize", "model": "reference", "destinations": ["pacs"]}]
            raw["models"] = [{"name": "reference", "path": "builtin:reference", "backend": args.backend}]
            settings = parse(raw, "bench", base_dir=work)
            node = Node(settings)
            node.start()
            try:
                t0 = time.perf_counter()
                r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(settings.node.port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True)
                assert r.returncode == 0, r.stderr
                wait_until(lambda: len(archive.received) >= args.images, timeout=300, interval=0.02, what="all images at the archive")
                dt = time.perf_counter() - t0
                e2e.append(dt)
                print(f"round {rnd + 1}: end to end {dt:.2f} s ({dt - stable:.2f} s without the {stable:.0f} s stability wait)")
            finally:
                node.stop()
                archive.stop()

        # Pixel step vs engine, with the node stopped (its scheduler would compete for
        # the CPU), in interleaved pairs on the same images.
        settings.node.data_dir.mkdir(parents=True, exist_ok=True)
        step = EnginePixelStep(settings)
        step.warm()
        route = settings.routes[0]
        model = step.models["reference"]
        pseudo = Pseudonymizer(bytes(32))
        t_steps, t_engines = [], []
        for _ in range(args.pairs):
            sources = [dcmread(f) for f in files]  # fresh, undecoded datasets as the pipeline has them
            items = [Item(job=None, source=ds) for ds in sources]  # type: ignore[arg-type]
            t0 = time.perf_counter()
            step.process(items, route, pseudo)
            t_steps.append(time.perf_counter() - t0)
            assert all(not it.error and it.outputs for it in items)
            # The engine alone on the same, already prepared inputs.
            x = np.stack([to_model(ds.pixel_array, ds, model.image_size)[0] for ds in sources])[:, None]
            noise = model.identity_noise(len(x), 0)
            t0 = time.perf_counter()
            model.anonymize(x, noise=noise)
            t_engines.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.images
    ratios = [s / e for s, e in zip(t_steps, t_engines)]
    print(f"runner: {model.describe()['runner']}")
    print(f"pixel step: best {n / min(t_steps):.1f} images/s, median {n / statistics.median(t_steps):.1f} images/s ({args.pairs} runs)")
    print(f"engine alone: best {n / min(t_engines):.1f} images/s, median {n / statistics.median(t_engines):.1f} images/s")
    print(f"median end to end: {statistics.median(e2e):.2f} s for {n} images of {args.size}x{args.size}")
    print(f"the pixel pipeline adds {min(t_steps) / min(t_engines) - 1:.0%} (best of each) / {statistics.median(ratios) - 1:.0%} (median of pairs) to the engine's time (target <= 30%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
