"""Pixel pipeline: end to end seconds for a 50-image study, and the pixel step's cost
next to the engine's own in the same run.

    python tests/bench/bench_pixels.py [--images 50] [--size 256] [--rounds 3]

1. End to end: dcmtk storescu sends a 50-image synthetic DX study to a node (reference
   model, auto backend) that forwards to a pynetdicom archive; seconds from the first
   C-STORE to the last object at the archive, and the same minus the configured
   stable_after_s wait.
2. Pixel step vs engine: images/s of the whole pixel step (decode, LUTs, resize, model,
   inverse mapping, derived objects) and of the engine alone (model.anonymize on the
   already-prepared arrays), on the same 50 images; the overhead is
   pixel_step_time / engine_time - 1. Target: <= 30%.
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto")
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
    step_rates, engine_rates = [], []
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
                step: EnginePixelStep = node.pixel_step  # type: ignore[assignment]
                route = settings.routes[0]
                model = step.models["reference"]
                pseudo = Pseudonymizer(bytes(32))
                sources = [dcmread(f) for f in files]
                # The whole pixel step on fresh items.
                items = [Item(job=None, source=ds) for ds in sources]  # type: ignore[arg-type]
                t0 = time.perf_counter()
                step.process(items, route, pseudo)
                t_step = time.perf_counter() - t0
                assert all(not it.error and it.outputs for it in items)
                # The engine alone on the same, already prepared inputs.
                x = np.stack([to_model(ds.pixel_array, ds, model.image_size)[0] for ds in sources])[:, None]
                noise = model.identity_noise(len(x), 0)
                t0 = time.perf_counter()
                model.anonymize(x, noise=noise)
                t_engine = time.perf_counter() - t0
                step_rates.append(args.images / t_step)
                engine_rates.append(args.images / t_engine)
                print(f"round {rnd + 1}: pixel step {args.images / t_step:.1f} images/s, engine alone {args.images / t_engine:.1f} images/s ({model.describe()['runner']})")
            finally:
                node.stop()
                archive.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s, e = statistics.median(step_rates), statistics.median(engine_rates)
    print(f"median end to end: {statistics.median(e2e):.2f} s for {args.images} images of {args.size}x{args.size}")
    print(f"median pixel step {s:.1f}/s vs engine {e:.1f}/s: the pixel pipeline adds {e / s - 1:.0%} to the engine's time (target <= 30%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
