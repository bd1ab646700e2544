"""The verifier's pixel bits check on a large multi-frame object: what it adds to the
verifier's time for one output.

    python tests/bench/bench_verify_pixels.py [--frames 400] [--size 512] [--rounds 5]

A synthetic MR (pydicom's MR_small's header) of FRAMES x SIZE x SIZE 16-bit words, 12
bits stored, is de-identified by the node's header step; then, on the output's bytes:
the pixel bits check alone (``_pixel_bits`` on an already scanned output: clean, so every
word is read; unsigned and signed), the verifier's scan of the output, and the whole
``verify(original, output)``. Best and median of the rounds, in ms, and the check's rate
in GB/s of Pixel Data. Then the same output in RLE Lossless (dcmtk's dcmcrle, when
installed): the check decodes the segments of the high bytes with its own PackBits
reader (random 12-bit values: about as many runs as a segment can hold; images of
patients compress better and read faster).
"""

from __future__ import annotations

import argparse
import io
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

from pydicom import dcmread, dcmwrite  # noqa: E402

from node.config import DeidSettings  # noqa: E402
from node.deid import Deidentifier, Pseudonymizer, to_bytes  # noqa: E402
from node.deid.verify import _pixel_bits, _Scan, verify  # noqa: E402
from tests.conftest import PYDICOM_FILES  # noqa: E402


def make(frames: int, size: int, signed: bool) -> tuple[bytes, bytes]:
    """(original, output) Part 10 bytes of the synthetic object."""
    ds = dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    rng = np.random.default_rng(0)
    values = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, frames * size * size, dtype=np.int32)
    ds.PixelData = values.astype("<i2" if signed else "<u2").tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    original = buf.getvalue()
    out = Deidentifier(DeidSettings(), Pseudonymizer(bytes(32))).apply(dcmread(io.BytesIO(original))).dataset
    return original, to_bytes(out)


def timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    mib = args.frames * args.size * args.size * 2 / 2**20
    print(f"{args.frames} frames of {args.size} x {args.size} x 16 bits (12 stored): Pixel Data {mib:.1f} MiB")
    for signed in (False, True):
        original, output = make(args.frames, args.size, signed)
        scan = _Scan(output)
        assert _pixel_bits(scan) == [] and verify(original, output) == []
        rows = {
            "pixel bits check": timed(lambda: _pixel_bits(scan), args.rounds),
            "scan of the output": timed(lambda: _Scan(output), args.rounds),
            "verify(original, output)": timed(lambda: verify(original, output), args.rounds),
        }
        label = "signed" if signed else "unsigned"
        for name, times in rows.items():
            print(f"  {label:8s} {name:26s} best {min(times):9.2f} ms  median {statistics.median(times):9.2f} ms")
        best = min(rows["pixel bits check"]) / 1000
        print(f"  {label:8s} check rate {mib * 2**20 / best / 1e9:.2f} GB/s; share of verify (medians): "
              f"{statistics.median(rows['pixel bits check']) / statistics.median(rows['verify(original, output)']):.0%}")
        if shutil.which("dcmcrle"):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "n.dcm").write_bytes(output)
                subprocess.run(["dcmcrle", str(Path(tmp, "n.dcm")), str(Path(tmp, "r.dcm"))], check=True, capture_output=True)
                encoded = Path(tmp, "r.dcm").read_bytes()
            scan = _Scan(encoded)
            assert _pixel_bits(scan) == []
            times = timed(lambda: _pixel_bits(scan), args.rounds)
            print(f"  {label:8s} {'pixel bits check, RLE':26s} best {min(times):9.2f} ms  median {statistics.median(times):9.2f} ms"
                  f"  ({len(encoded) / 2**20:.0f} MiB of RLE)")


if __name__ == "__main__":
    main()
