"""Pixel pipeline: end to end seconds for a 50-image study, and the pixel step's cost
next to the engine's own in the same run.

    python tests/bench/bench_pixels.py [--images 50] [--size 256] [--rounds 3]

1. End to end: dcmtk storescu sends a 50-image synthetic DX study to a node (reference
   model, auto backend) that forwards to a pynetdicom archive; seconds from the first
   C-STORE to the last object at the archive, and the same minus the configured
   stable_after_s wait.
2. Pixel step vs engine: images/s of the whole pixel step (decode, LUTs, resize, model,
   gates, inverse mapping, derived objects), of the engine alone (model.anonymize, the
   one-graph anonymization, on the already-prepared arrays) and of the gated engine
   (model.anonymize_checked: encode, identity, generate, and the gates' domain scores,
   classifier and second encoding), on the same 50 images, interleaved, with the node
   stopped. Printed: what the pipeline adds to the engine alone (as before the gates:
   target <= 30% then), and what the gates add to the pixel step: gated engine minus
   engine alone, over the pixel step without them (pixel step - gated engine + engine
   alone). Target: <= 50%. Best of each, and the median of the rounds.
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


def node_counts(node) -> dict:
    from node import queue

    with node.sessions() as s:
        return queue.counts(s)


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
            # skip-object: the gates turn away a few percent of in-domain images, and with
            # quarantine-study one of 50 would hold back the whole study.
            raw["routes"] = [{"name": "chest", "match": {"Modality": "DX"}, "pixels": "anonymize", "model": "reference", "allow_demonstration_model": True,
                              "partial": "skip-object", "destinations": ["pacs"]}]
            raw["models"] = [{"name": "reference", "path": "builtin:reference", "backend": args.backend}]
            settings = parse(raw, "bench", base_dir=work)
            node = Node(settings)
            node.start()
            try:
                t0 = time.perf_counter()
                r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(settings.node.port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True)
                assert r.returncode == 0, r.stderr
                def settled() -> bool:
                    c = node_counts(node)
                    return sum(c.get("instances", {}).get(k, 0) for k in ("PROCESSED", "QUARANTINED")) == args.images and len(archive.received) >= c["instances"].get("PROCESSED", 0)

                wait_until(settled, timeout=300, interval=0.02, what="every image at the archive or quarantined")
                dt = time.perf_counter() - t0
                e2e.append(dt)
                q = node_counts(node)["instances"].get("QUARANTINED", 0)
                print(f"round {rnd + 1}: end to end {dt:.2f} s ({dt - stable:.2f} s without the {stable:.0f} s stability wait); {q} of {args.images} quarantined by the gates")
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
        t_steps, t_engines, t_gated = [], [], []
        model.anonymize(np.zeros((1, 1, model.image_size, model.image_size), np.float32), seed=0)  # its graph loaded
        for _ in range(args.pairs):
            sources = [dcmread(f) for f in files]  # fresh, undecoded datasets as the pipeline has them
            items = [Item(job=None, source=ds) for ds in sources]  # type: ignore[arg-type]
            t0 = time.perf_counter()
            step.process(items, route, pseudo)
            t_steps.append(time.perf_counter() - t0)
            failed = [it.error for it in items if it.error or not it.outputs]
            assert len(failed) <= 0.1 * len(items), failed[:3]  # in-domain: the gates pass nearly all
            # The engine alone, and the gated engine, on the same, already prepared inputs.
            x = np.stack([to_model(ds.pixel_array, ds, model.image_size)[0] for ds in sources])[:, None]
            noise = model.identity_noise(len(x), 0)
            t0 = time.perf_counter()
            model.anonymize(x, noise=noise)
            t_engines.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.anonymize_checked(x, noise)
            t_gated.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.images
    ratios = [s / e for s, e in zip(t_steps, t_engines)]
    gate_share = [(g - e) / (s - g + e) for s, e, g in zip(t_steps, t_engines, t_gated)]
    best_s, best_e, best_g = min(t_steps), min(t_engines), min(t_gated)
    print(f"runner: {model.describe()['runner']}")
    print(f"pixel step with gates: best {n / best_s:.1f} images/s, median {n / statistics.median(t_steps):.1f} images/s ({args.pairs} runs)")
    print(f"engine alone: best {n / best_e:.1f} images/s, median {n / statistics.median(t_engines):.1f} images/s")
    print(f"gated engine: best {n / best_g:.1f} images/s, median {n / statistics.median(t_gated):.1f} images/s")
    print(f"median end to end: {statistics.median(e2e):.2f} s for {n} images of {args.size}x{args.size}")
    print(f"the pixel pipeline with gates adds {best_s / best_e - 1:.0%} (best of each) / {statistics.median(ratios) - 1:.0%} (median of rounds) to the engine alone")
    print(f"the gates add {(best_g - best_e) / (best_s - best_g + best_e):.0%} (best of each) / {statistics.median(gate_share):.0%} (median of rounds) to the pixel step (target <= 50%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
