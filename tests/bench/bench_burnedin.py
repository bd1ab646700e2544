"""Burned-in text step: speed and detection quality on synthetic ultrasound.

    python tests/bench/bench_burnedin.py [--frames 500] [--singles 20] [--cine 100] [--seed 10000]
    python tests/bench/bench_burnedin.py --engines 30     # the OCR candidates compared
    python tests/bench/bench_burnedin.py --quality-only --frames 166 --seed 10000   # a slice of the quality set
    python tests/bench/bench_burnedin.py --singles 10 --frames 0 --in-flight 1    # the node's batch with 1 lane instead of its default

``--engines N`` compares, on N frames, how well and how fast candidate detectors find
the drawn tokens (a token counts as found when boxes, grown by 3 pixels, cover it
entirely): RapidOCR's own pipeline (detection only), Tesseract's CLI (sparse text,
words with a confidence), and the PP-OCRv4 detector as this step runs it at scales
1.0, 1.25 and 1.5. This is how the step's detector and scale were chosen
(docs/burned-in.md).

1. Speed (with the CPU seconds a frame, ``time.process_time``, which depend far less
   on the machine's load than frames/s, and the model's CPU per reading and scale):
   frames/s of the whole step (decode, region rules, detection, masking,
   verification, low-contrast check, second reading, small-text reading, ink reading, write-back) on single 640 x 480 frames (half
   grayscale, half RGB), one after another, and seconds for one 100-frame RGB cine with
   a static overlay; with the share of the time spent in the OCR model. Then the same
   single frames as the node's pipeline cleans a batch of them
   (``BurnedInStep.clean_all`` with ``--in-flight`` lanes, by default the node's
   ``[node] burned_in_lanes``): the figure to hold against the target. Targets: >= 3
   single frames/s on 2 cores; the cine in under 10 s.
2. Quality on a seeded set of ``--frames`` frames (6 tokens each: names, IDs, dates,
   11 to 30 px, eight fonts, about 30% over the image): recall = drawn tokens whose
   box the first reading's masks cover entirely (of all tokens, quarantined objects
   included), precision = masked boxes that touch a drawn token (passed objects), how
   many objects the re-check quarantined and why, and how many tokens leaked (some of
   their ink left uncovered in an object the step passed; must be 0). Target: recall
   >= 0.99.

The figures depend on the machine's load: run it on a quiet machine for README figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.burnedin import detect as detect_module  # noqa: E402
from node.burnedin.clean import BurnedInError, clean  # noqa: E402
from node.burnedin.detect import VERIFIER, DetectorSettings, TextDetector, shared_detector  # noqa: E402
from tests import synth_burnedin as sb  # noqa: E402


def unit(det: TextDetector) -> float:
    """Seconds of one plain detection of a 640 x 480 frame at scale 1.0 (median of 5):
    the step's times divided by it hardly depend on the machine's load."""
    x = np.zeros((1, 480, 640, 3), np.uint8)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        det.probability(x, 1.0)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def ocr_seconds(det: TextDetector) -> float:
    """Seconds spent so far in both detector sessions: the step's and the second reading's."""
    return det.seconds + shared_detector(VERIFIER).seconds


class _Profile:
    """CPU seconds (``time.process_time``) of the OCR model per reading: the step's
    function that asked for it, the session (first reading or second) and the scale.
    Installed around ``TextDetector.probability`` while the single frames are timed."""

    def __init__(self, det: TextDetector) -> None:
        self.det, self.cpu, self.calls = det, {}, {}

    def __enter__(self) -> "_Profile":
        import inspect

        real = self.real = TextDetector.probability
        prof = self

        def probability(det_self, frames, scale=None, shape_varies=False, reading=""):
            caller = next((f.function for f in inspect.stack()[1:6] if f.filename.endswith("clean.py") and f.function.startswith("_")), "?")
            key = f"{'first' if det_self is prof.det else 'second'} x{scale or det_self.settings.scale:g} {caller} ({det_self.precision(reading)})"
            c0 = time.process_time()
            try:
                return real(det_self, frames, scale, shape_varies, reading)
            finally:
                prof.cpu[key] = prof.cpu.get(key, 0.0) + time.process_time() - c0
                prof.calls[key] = prof.calls.get(key, 0) + len(frames)

        TextDetector.probability = probability
        return self

    def __exit__(self, *exc) -> None:
        TextDetector.probability = self.real


def speed_singles(det: TextDetector, n: int, seed: int) -> dict:
    dss = []
    for k in range(n):
        f, _ = sb.us_frame(seed + k, colour=k % 2 == 1)
        dss.append(sb.dataset(f, "RGB" if f.ndim == 3 else "MONOCHROME2"))
    # Warm: a grey frame and two colour ones, so that every shape the timed frames read
    # has been read twice (OpenVINO compiles a model for a shape on its second reading).
    for k, colour in ((1, False), (2, True), (3, True)):
        f, _ = sb.us_frame(seed - k, colour=colour)
        try:
            clean(sb.dataset(f, "RGB" if colour else "MONOCHROME2"), det)
        except BurnedInError:
            pass
    total = ocr = cpu = 0.0
    quarantined = 0
    with _Profile(det) as prof:
        for ds in dss:
            t0, o0, c0 = time.perf_counter(), ocr_seconds(det), time.process_time()
            try:
                clean(ds, det)
            except BurnedInError:
                quarantined += 1
            total += time.perf_counter() - t0
            cpu += time.process_time() - c0
            ocr += ocr_seconds(det) - o0
    per_reading = {k: round(v / n, 4) for k, v in sorted(prof.cpu.items(), key=lambda kv: -kv[1])}
    return {"frames": n, "frames_per_s": n / total, "ocr_share": ocr / total, "quarantined": quarantined, "cpu_s_per_frame": cpu / n,
            "cpu_s_per_frame_by_reading": per_reading}


def speed_in_flight(n: int, seed: int, lanes: int) -> dict:
    """The single frames of :func:`speed_singles` through the node's own
    ``BurnedInStep(lanes=K).clean_all``, as the pipeline runs the step on a batch: K
    objects at a time, each lane with its own detectors whose inferences use cores / K
    threads (K = 1: one after another on the process's shared detectors, every inference
    on all the cores, which :func:`speed_singles` times too). No per-reading profile: CPU
    time is the process's."""
    from node.burnedin import BurnedInStep
    from node.config import DeidSettings
    from node.deid import Deidentifier, Pseudonymizer

    step = BurnedInStep(lanes=lanes)
    deid = Deidentifier(DeidSettings(burned_in="clean"), Pseudonymizer(b"k" * 32))

    def objects(seeds_colours):
        out = []
        for s_, colour in seeds_colours:
            f, _ = sb.us_frame(s_, colour=colour)
            out.append((sb.dataset(f, "RGB" if f.ndim == 3 else "MONOCHROME2"), deid))
        return out

    # Warm: every lane reads each shape at least twice (OpenVINO compiles a model for a
    # shape on its second reading); lanes take objects as they come free.
    step.clean_all(objects([(seed - 1 - k, k % 2 == 1) for k in range(4 * lanes + 2)]))
    timed = objects([(seed + k, k % 2 == 1) for k in range(n)])
    t0, c0 = time.perf_counter(), time.process_time()
    results = step.clean_all(timed)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"frames": n, "lanes": lanes, "threads_per_inference": max(1, (os.cpu_count() or 1) // lanes) if lanes > 1 else (os.cpu_count() or 1),
            "frames_per_s": n / total, "cpu_s_per_frame": cpu / n, "quarantined": sum(isinstance(r, Exception) for r in results)}


def speed_cine(det: TextDetector, n: int, seed: int) -> dict:
    frames, _ = sb.cine(seed, n_frames=n, colour=True)
    ds = sb.dataset(frames, "RGB")
    t0, o0, c0 = time.perf_counter(), ocr_seconds(det), time.process_time()
    try:
        report = clean(ds, det)
        read, outcome = len(report.read), "cleaned"
    except BurnedInError as exc:
        read, outcome = -1, str(exc)
    dt = time.perf_counter() - t0
    return {"frames": n, "seconds": dt, "cpu_seconds": time.process_time() - c0, "frames_per_s": n / dt,
            "ocr_share": (ocr_seconds(det) - o0) / dt, "frames_read": read, "outcome": outcome}


def quality(det: TextDetector, n: int, seed: int) -> dict:
    """The step on ``n`` seeded frames. Per drawn token: found (its box entirely inside
    the first reading's masks, whatever happened to the object after), leaked (some of
    its ink left uncovered in an object the step passed: what the re-check failed to
    hold back), held back (in a quarantined object)."""
    tokens = covered = held = leaked = 0
    boxes = touching = 0
    quarantined = 0
    reasons: dict[str, int] = {}
    missed: list[tuple] = []
    leaks: list[dict] = []
    held_frames: list[int] = []
    import node.burnedin.clean as cleaning

    first: dict[int, list] = {}
    real_first = cleaning._first_reading

    def spy(frames, read, n_frames, detector):  # what the first reading masked, before any re-check
        out = real_first(frames, read, n_frames, detector)
        first.clear()
        first.update(out)
        return out

    cleaning._first_reading = spy
    c0 = time.process_time()
    try:
        for k in range(n):
            f, toks = sb.us_frame(seed + k, colour=k % 2 == 1)
            ds = sb.dataset(f, "RGB" if f.ndim == 3 else "MONOCHROME2")
            tokens += len(toks)
            first.clear()
            try:
                report = clean(ds, det)
                masks = report.masked.get(0, [])
            except BurnedInError as exc:
                quarantined += 1
                held_frames.append(k)
                held += len(toks)
                why = str(exc).split(": ", 1)[-1].split(" (frame")[0]
                reasons[why] = reasons.get(why, 0) + 1
                masks = None
            fm = np.zeros(f.shape[:2], bool)
            for t, l, b, r in first.get(0, []):
                fm[t:b, l:r] = True
            for tok in toks:
                t, l, b, r = tok.box
                if fm[t:b, l:r].all():
                    covered += 1
                else:
                    missed.append((k, tok.size, tok.font, tok.over_content, round(float(fm[t:b, l:r].mean()), 2), masks is None))
            if masks is None:
                continue
            m = np.zeros(f.shape[:2], bool)
            drawn = np.zeros(f.shape[:2], bool)
            for t, l, b, r in masks:
                m[t:b, l:r] = True
            for tok in toks:
                t, l, b, r = tok.box
                drawn[t:b, l:r] = True
                if tok.uncovered_ink(m):
                    leaked += 1
                    leaks.append({"frame": k, "size": tok.size, "font": tok.font, "ink_left": tok.uncovered_ink(m)})
            boxes += len(masks)
            touching += sum(bool(drawn[t:b, l:r].any()) for t, l, b, r in masks)
    finally:
        cleaning._first_reading = real_first
    return {
        "frames": n, "tokens": tokens, "recall": covered / tokens if tokens else 0.0, "tokens_missed": tokens - covered,
        "tokens_leaked": leaked, "precision": touching / boxes if boxes else 0.0, "objects_quarantined": quarantined,
        "tokens_held_back": held, "reasons": reasons, "cpu_s_per_frame": (time.process_time() - c0) / max(n, 1),
        "missed": [{"frame": k, "size": s, "font": f, "over_content": o, "covered": c, "quarantined": q} for k, s, f, o, c, q in missed[:40]],
        "leaks": leaks, "quarantined_frames": held_frames,
    }


def _found(frames, boxes_per_frame) -> tuple[float, float]:
    """(recall, precision) of boxes grown by 3 px against the drawn tokens."""
    hit = tot = touching = nb = 0
    for (f, toks), boxes in zip(frames, boxes_per_frame):
        m = np.zeros(f.shape[:2], bool)
        for t, l, b, r in boxes:
            m[max(0, t - 3) : b + 3, max(0, l - 3) : r + 3] = True
        drawn = np.zeros(f.shape[:2], bool)
        for tok in toks:
            t, l, b, r = tok.box
            tot += 1
            hit += bool(m[t:b, l:r].all())
            drawn[t:b, l:r] = True
        nb += len(boxes)
        touching += sum(bool(drawn[max(0, t) : b, max(0, l) : r].any()) for t, l, b, r in boxes)
    return hit / max(tot, 1), touching / max(nb, 1)


def engines(n: int, seed: int) -> None:
    import csv
    import io
    import subprocess

    from PIL import Image

    frames = [sb.us_frame(seed + k, colour=k % 2 == 1) for k in range(n)]
    rgbs = [f if f.ndim == 3 else np.repeat(f[..., None], 3, 2) for f, _ in frames]

    def timed(name: str, fn) -> None:
        fn(rgbs[0])
        t0 = time.perf_counter()
        boxes = [fn(x) for x in rgbs]
        dt = (time.perf_counter() - t0) / n
        recall, precision = _found(frames, boxes)
        print(f"  {name:<38} recall {recall:.3f}  precision {precision:.3f}  {dt:.3f} s/frame")

    try:
        from rapidocr_onnxruntime import RapidOCR

        ocr = RapidOCR(intra_op_num_threads=2)

        def rapid(x):
            res, _ = ocr(x, use_det=True, use_cls=False, use_rec=False)
            out = []
            for poly in res if res is not None else []:
                p = np.asarray(poly)
                out.append((int(p[:, 1].min()), int(p[:, 0].min()), int(np.ceil(p[:, 1].max())) + 1, int(np.ceil(p[:, 0].max())) + 1))
            return out

        timed("RapidOCR pipeline, detection only", rapid)
    except ImportError:
        print("  RapidOCR: not installed")

    def tesseract(x):
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "PNG")
        r = subprocess.run(["tesseract", "stdin", "stdout", "--psm", "11", "tsv"], input=buf.getvalue(), capture_output=True,
                           env={**os.environ, "OMP_THREAD_LIMIT": "2"})
        out = []
        for row in csv.DictReader(io.StringIO(r.stdout.decode(errors="replace")), delimiter="\t"):
            if row.get("level") == "5" and (row.get("text") or "").strip() and float(row.get("conf") or -1) > 0:
                t, l, h, w = (int(row[k]) for k in ("top", "left", "height", "width"))
                out.append((t, l, t + h, l + w))
        return out

    timed("Tesseract 5 CLI, --psm 11", tesseract)
    for scale in (1.0, 1.25, 1.5):
        det = TextDetector(DetectorSettings(scale=scale))
        timed(f"PP-OCRv4 det via {det.backend.name}, x{scale}", lambda x, det=det: det.detect(x[None])[0])


def text_free(det: TextDetector, n: int, seed: int) -> dict:
    """The step on frames with no text at all: how often it masks something, how much,
    and how often it quarantines (false alarms)."""
    masked_frames = quarantined = 0
    fractions = []
    for k in range(n):
        f, _ = sb.us_background(np.random.default_rng(seed + k))
        if k % 2:
            f = np.repeat(f[..., None], 3, 2)
        ds = sb.dataset(f, "RGB" if f.ndim == 3 else "MONOCHROME2")
        try:
            report = clean(ds, det)
        except BurnedInError:
            quarantined += 1
            continue
        m = np.zeros(f.shape[:2], bool)
        for t, l, b, r in report.masked.get(0, []):
            m[t:b, l:r] = True
        masked_frames += bool(m.any())
        fractions.append(float(m.mean()))
    return {"frames": n, "with_a_mask": masked_frames, "masked_fraction_mean": float(np.mean(fractions)) if fractions else 0.0, "quarantined": quarantined}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=500, help="frames in the quality set")
    ap.add_argument("--singles", type=int, default=20, help="single frames timed")
    ap.add_argument("--cine", type=int, default=100, help="frames in the timed cine")
    ap.add_argument("--seed", type=int, default=10000)
    ap.add_argument("--quality-only", action="store_true", help="only the quality set (no timing, no text-free frames)")
    ap.add_argument("--engines", type=int, default=0, metavar="N", help="compare the OCR candidates on N frames instead")
    from node.config import NodeSettings

    lanes = NodeSettings.model_fields["burned_in_lanes"].default
    ap.add_argument("--in-flight", type=int, default=lanes, metavar="K",
                    help=f"also time the single frames through the step's clean_all with K lanes (K objects at once, inferences on cores / K "
                    f"threads each), as the node runs it with [node] burned_in_lanes = K (default: the node's default, {lanes})")
    ap.add_argument("--backend", choices=("auto", "openvino", "onnxruntime"), default="auto", help="the detector's runtime (both sessions)")
    ap.add_argument("--bf16", default=None, metavar="READINGS",
                    help="comma-separated readings to run in bf16 where the CPU has it (of: " + ", ".join(detect_module.READINGS)
                    + "), or 'none' for fp32 throughout; default: as shipped (DetectorSettings and VERIFIER)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (figures scale with the load)")
    if args.engines:
        engines(args.engines, args.seed)
        return
    first, second = DetectorSettings(backend=args.backend), dataclasses.replace(VERIFIER, backend=args.backend)
    if args.bf16 is not None:
        asked = frozenset(r for r in args.bf16.split(",") if r and r != "none")
        first = dataclasses.replace(first, bf16=asked & {"first", "re-read", "low-contrast"})
        second = dataclasses.replace(second, bf16=asked & {"second", "chroma", "small-text"})
    det = TextDetector(first)
    # The second reading's session, which clean() takes from shared_detector(VERIFIER), on the same runtime.
    ver = detect_module._SHARED[VERIFIER] = TextDetector(second)
    bf16 = [r for r in detect_module.READINGS if (det if r in ("first", "re-read", "low-contrast") else ver).precision(r) == "bf16"]
    print(f"detector runtime: {det.backend.name}; bf16 for: {', '.join(bf16) or 'none'} (fp32 for the rest)")
    if args.quality_only:
        q = quality(det, args.frames, args.seed)
        _print_quality(q)
        print(json.dumps({"load": os.getloadavg()[0], "quality": {k: v for k, v in q.items() if k not in ("missed", "leaks", "quarantined_frames")}}))
        return
    u0 = unit(det)
    s = speed_singles(det, args.singles, args.seed + 900_000)
    u1 = unit(det)
    s["units_per_frame"] = 1 / s["frames_per_s"] / ((u0 + u1) / 2)
    print(f"one plain 640x480 detection (scale 1.0): {u0:.3f} s before, {u1:.3f} s after (the unit below)")
    print(f"single 640x480 frames: {s['frames_per_s']:.2f} frames/s = {s['units_per_frame']:.2f} units a frame, {s['cpu_s_per_frame']:.2f} CPU s a frame, OCR {s['ocr_share']:.0%} of the time ({s['quarantined']} of {s['frames']} quarantined)")
    for k, v in s["cpu_s_per_frame_by_reading"].items():
        print(f"  {v:.3f} CPU s a frame in the model: {k}")
    if args.in_flight >= 1 and args.backend == "auto" and args.bf16 is None:
        p = speed_in_flight(args.singles, args.seed + 900_000, args.in_flight)
        s["in_flight"] = p
        print(f"the same frames as the node cleans a batch, {p['lanes']} lane(s) ({p['threads_per_inference']} thread(s) an inference): "
              f"{p['frames_per_s']:.2f} frames/s, {p['cpu_s_per_frame']:.2f} CPU s a frame ({p['quarantined']} of {p['frames']} quarantined)")
    c = speed_cine(det, args.cine, args.seed + 800_000)
    u2 = unit(det)
    c["units"] = c["seconds"] / ((u1 + u2) / 2)
    print(f"{c['frames']}-frame cine: {c['seconds']:.2f} s = {c['units']:.1f} units, {c['cpu_seconds']:.1f} CPU s ({c['frames_per_s']:.1f} frames/s), OCR {c['ocr_share']:.0%}, {c['frames_read']} frames read, {c['outcome']}")
    q = quality(det, args.frames, args.seed)
    _print_quality(q)
    z = text_free(det, max(10, args.frames // 10), args.seed + 700_000)
    print(f"text-free frames: {z['with_a_mask']} of {z['frames']} got a mask (mean {z['masked_fraction_mean']:.2%} of the frame), {z['quarantined']} quarantined")
    print(json.dumps({"load": os.getloadavg()[0], "singles": s, "cine": c, "quality": {k: v for k, v in q.items() if k not in ("missed", "leaks", "quarantined_frames")}, "text_free": z}))


def _print_quality(q: dict) -> None:
    print(f"quality on {q['frames']} frames, {q['tokens']} tokens: first-reading recall {q['recall']:.4f} ({q['tokens_missed']} not fully masked), "
          f"precision {q['precision']:.4f}, {q['objects_quarantined']} objects quarantined holding {q['tokens_held_back']} tokens {q['reasons']}, "
          f"{q['tokens_leaked']} tokens leaked (ink left uncovered in a passed object); {q['cpu_s_per_frame']:.2f} CPU s a frame")
    for m in q["missed"]:
        print(f"  missed: {m}")
    for m in q["leaks"]:
        print(f"  leaked: {m}")
    print(f"  quarantined frames: {q['quarantined_frames']}")


if __name__ == "__main__":
    main()
