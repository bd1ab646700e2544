"""Peak memory (and speed) of the burned-in step as the node runs it.

    python tests/bench/burnedin_memory.py --lanes 1 [--max-batch 1 --verifier-batch 1]

One process per setting (the peak resident set is the process's): the node's own
``BurnedInStep(lanes=K).clean_all`` warmed on single 640 x 480 frames (half RGB) and two
100-frame RGB cines, as a node that cleans both meets them, then timed on 16 single
frames and one cine. Prints frames/s, CPU s a frame, the cine's seconds and the peak
resident memory (``getrusage`` ru_maxrss). ``--max-batch`` / ``--verifier-batch`` set
the two detectors' frames per inference (the shipped settings by default) to compare
with the batching before 2026-12-01 (4 and 2): docs/burned-in.md, "One frame an
inference". The speed figures depend on the machine's load; the memory does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import node.burnedin.step as step_module  # noqa: E402
from node.burnedin.detect import DetectorSettings  # noqa: E402
from node.config import DeidSettings  # noqa: E402
from node.deid import Deidentifier, Pseudonymizer  # noqa: E402
from tests import synth_burnedin as sb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lanes", type=int, default=1, help="objects cleaned at once ([node] burned_in_lanes)")
    ap.add_argument("--max-batch", type=int, default=DetectorSettings().max_batch, help="first detector's frames per inference")
    ap.add_argument("--verifier-batch", type=int, default=step_module.VERIFIER.max_batch, help="second detector's frames per inference")
    ap.add_argument("--seed", type=int, default=910000)
    a = ap.parse_args()
    step_module.VERIFIER = dataclasses.replace(step_module.VERIFIER, max_batch=a.verifier_batch)
    step = step_module.BurnedInStep(detector=DetectorSettings(max_batch=a.max_batch), lanes=a.lanes)
    deid = Deidentifier(DeidSettings(burned_in="clean"), Pseudonymizer(b"k" * 32))

    def single(seed: int, colour: bool):
        f, _ = sb.us_frame(seed, colour=colour)
        return sb.dataset(f, "RGB" if f.ndim == 3 else "MONOCHROME2"), deid

    def cine(seed: int):
        frames, _ = sb.cine(seed, n_frames=100, colour=True)
        return sb.dataset(frames, "RGB"), deid

    step.clean_all([single(a.seed - 1 - k, k % 2 == 1) for k in range(4 * a.lanes + 2)] + [cine(a.seed + 800_000), cine(a.seed + 800_001)])
    timed = [single(a.seed + k, k % 2 == 1) for k in range(16)]
    t0, c0 = time.perf_counter(), time.process_time()
    results = step.clean_all(timed)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    outcome = step.clean_all([cine(a.seed + 800_000)])[0]
    dcine = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024  # KiB on Linux
    print(f"lanes {a.lanes}, frames per inference {a.max_batch}/{a.verifier_batch}: singles {16 / dt:.2f} frames/s, "
          f"{dc / 16:.2f} CPU s a frame, {sum(isinstance(r, Exception) for r in results)} of 16 quarantined; cine {dcine:.2f} s "
          f"({'quarantined' if isinstance(outcome, Exception) else 'cleaned'}); peak RSS {peak:.2f} GB; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
