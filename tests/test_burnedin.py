"""Burned-in text: masking, verification, region rules, quarantine, CLI, end to end.

The step reads text with PP-OCRv4's detector (rapidocr-onnxruntime); whether a drawn
token can still be read after cleaning is judged by a second, different engine,
Tesseract (Debian's tesseract-ocr), on each token's area enlarged 3 times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless

from node.config import ConfigError, DeidSettings
from node.deid import Deidentifier, Pseudonymizer
from node.deid.profile import CLEAN_PIXEL_CODE
from tests import synth_burnedin as sb
from tests.conftest import ROOT, STORESCU, dcmtk_env, needs_dcmtk, needs_orthanc, node_config, wait_until

TESSERACT = shutil.which("tesseract")
needs_tesseract = pytest.mark.skipif(TESSERACT is None, reason="the second OCR engine is missing (apt-get install -y tesseract-ocr tesseract-ocr-eng)")
pytest.importorskip("rapidocr_onnxruntime", reason="the OCR package is not installed (pip install rapidocr-onnxruntime)")
CASES = ROOT.parent / "shared" / "cases"


@pytest.fixture(scope="module")
def step():
    from node.burnedin import BurnedInStep

    return BurnedInStep()


def deid(burned_in: str = "clean") -> Deidentifier:
    return Deidentifier(DeidSettings(burned_in=burned_in), Pseudonymizer(b"k" * 32))


def frames_of(ds) -> np.ndarray:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.SamplesPerPixel)
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    return np.frombuffer(ds.PixelData, dtype, n * ds.Rows * ds.Columns * spp).reshape(n, ds.Rows, ds.Columns, spp)


def _norm(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def tesseract_reads(rgb: np.ndarray, token: sb.Token) -> bool:
    """True when Tesseract reads 4 characters in a row of ``token`` in its area (the
    box and 6 pixels around it, enlarged 3 times, as one line)."""
    from PIL import Image

    t, l, b, r = token.box
    crop = rgb[max(0, t - 6) : b + 6, max(0, l - 6) : r + 6]
    img = Image.fromarray(crop).convert("L").resize((crop.shape[1] * 3, crop.shape[0] * 3), Image.LANCZOS)
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = subprocess.run([TESSERACT, "stdin", "stdout", "--psm", "7"], input=buf.getvalue(), capture_output=True, timeout=60,
                         env={"OMP_THREAD_LIMIT": "1", "PATH": "/usr/bin:/bin"}).stdout.decode(errors="replace")
    read, truth = _norm(out), _norm(token.text)
    return any(truth[k : k + 4] in read for k in range(len(truth) - 3))


def as_rgb(frames: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    if palette is not None:
        return palette[frames[..., 0]]
    return frames if frames.shape[-1] == 3 else np.repeat(frames, 3, -1)


# -- the wrapper around the OCR package ---------------------------------------------------
def test_detection_model_ships_in_the_ocr_wheel():
    """Fails loudly when rapidocr-onnxruntime stops shipping the model this step loads."""
    from node.burnedin.detect import TextDetector, model_path

    p = model_path()
    assert p.stat().st_size > 1_000_000
    det = TextDetector()
    assert det.backend.name in ("openvino", "onnxruntime")
    assert det.detect(np.zeros((1, 64, 96, 3), np.uint8)) == [[]]


def test_folded_graph_reads_as_the_shipped_one():
    """node.burnedin.graph folds the detector's element-wise chains into its
    convolutions: every chain the shipped model holds is found (a new model in the
    wheel fails here, and would run unfolded), and on text over speckle, grey and
    colour, at the scales the step reads, the probabilities agree to float rounding and
    the boxes are the same."""
    from node.burnedin.detect import DetectorSettings, TextDetector, model_path
    from node.burnedin.graph import EXPECTED, fold

    pytest.importorskip("onnx", reason="the folding needs the onnx package (a runtime dependency; missing from this environment)")
    _, done = fold(model_path())
    assert done == EXPECTED
    # On ONNX Runtime, for which the folding is made (OpenVINO fuses such chains itself).
    folded, shipped = (TextDetector(DetectorSettings(fold=f, backend="onnxruntime")) for f in (True, False))
    assert len(folded.backend.session.get_providers()) and folded.backend.session is not shipped.backend.session
    grey_or_rgb = [sb.us_frame(seed, colour=seed % 2 == 1)[0] for seed in (500, 501, 10045, 10066)]
    frames = np.stack([f if f.ndim == 3 else np.repeat(f[..., None], 3, 2) for f in grey_or_rgb])
    for scale in (1.0, 1.5, 2.0):
        a, b = folded.probability(frames, scale), shipped.probability(frames, scale)
        assert float(np.abs(a - b).max()) < 1e-3
        rows, cols = frames.shape[1:3]
        assert [folded.boxes(p, rows, cols, scale) for p in a] == [shipped.boxes(p, rows, cols, scale) for p in b]


class _Recorder:
    """A runtime that keeps the network's inputs and answers with a fixed map."""

    name = "recorder"

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def precision(self, asked: str) -> str:
        return "f32"

    def run(self, x, shape_varies=False, precision="f32"):
        self.inputs.append(x.copy())
        return np.zeros((len(x), 1, *x.shape[2:]), np.float32)


def test_the_network_input_is_the_frame_enlarged_and_normalised_grey_or_colour():
    """What the detector hands the network, grey frames (every channel equal, enlarged
    and normalised once, copied to the others) and colour ones: the frame enlarged
    channel by channel (cv2 INTER_LINEAR), (v / 255 - 0.5) / 0.5, the padding to
    multiples of 32 at -1 (black): the same tensor, to the bit, as the frame's three
    channels computed apart."""
    import cv2

    from node.burnedin.detect import DetectorSettings, TextDetector

    det = TextDetector(DetectorSettings(backend="onnxruntime"))
    det.backend = rec = _Recorder()
    grey = np.repeat(sb.us_frame(500)[0][..., None], 3, 2)
    colour = sb.us_frame(501, colour=True)[0]
    nearly = grey.copy()
    nearly[240, 320, 2] ^= 1  # one channel of one pixel differs: a colour frame
    frames = np.stack([grey, colour, nearly])
    for scale in (1.0, 1.5, 3.0):
        rec.inputs.clear()
        det.probability(frames, scale)
        x = np.concatenate(rec.inputs)
        sr, sc = round(480 * scale), round(640 * scale)
        assert x.shape == (3, 3, -(-sr // 32) * 32, -(-sc // 32) * 32)
        for k, f in enumerate(frames):
            want = np.full(x.shape[1:], -1, np.float32)
            for c in range(3):
                g = np.ascontiguousarray(f[..., c])
                g = g if scale == 1.0 else cv2.resize(g, (sc, sr), interpolation=cv2.INTER_LINEAR)
                plane = g.astype(np.float32)
                plane *= 2 / 255
                plane -= 1
                want[c, :sr, :sc] = plane
            assert np.array_equal(x[k], want), (scale, k)


def test_boxes_band_by_band_are_those_of_the_whole_map():
    """The probability map is labelled band by band (runs of rows with a set pixel):
    the boxes are those labelling the whole map gives, on maps with text-like blobs
    near each other, touching the edges, one row apart and on the last row."""
    import cv2

    from node.burnedin.detect import DetectorSettings, TextDetector

    det = TextDetector(DetectorSettings(backend="onnxruntime"))
    st = det.settings

    def whole_map(prob, rows, cols, scale):  # the labelling as it was, whole map at once
        bitmap = cv2.dilate((prob > st.thresh).astype(np.uint8), np.ones((2, 2), np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(bitmap, connectivity=8)
        out = []
        for i in range(1, n):
            x, y, w, h, _a = (int(v) for v in stats[i])
            if min(w, h) < st.min_side or float(prob[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i].mean()) < st.box_thresh:
                continue
            d = w * h * st.unclip / (2 * (w + h))
            box = (max(0, int(np.floor((y - d) / scale))), max(0, int(np.floor((x - d) / scale))),
                   min(rows, int(np.ceil((y + h + d) / scale))), min(cols, int(np.ceil((x + w + d) / scale))))
            if box[0] < box[2] and box[1] < box[3]:
                out.append(box)
        return out

    rng = np.random.default_rng(7)
    counted = 0
    for k in range(40):
        prob = (rng.random((736, 960)) * 0.25).astype(np.float32)
        for _ in range(int(rng.integers(0, 30))):
            y, x = int(rng.integers(-5, 736)), int(rng.integers(-20, 960))
            h, w = int(rng.integers(1, 40)), int(rng.integers(1, 200))
            prob[max(0, y) : y + h, max(0, x) : x + w] = rng.uniform(0.2, 1.0)
        if k % 4 == 0:
            prob[-1, 100:400] = 0.9  # the last row
            prob[300, :] = 0.9  # a whole row
            prob[302, 10:50] = 0.9  # one row apart
        got, want = det.boxes(prob, 480, 640, 1.5), whole_map(prob, 480, 640, 1.5)
        assert sorted(got) == sorted(want), k
        counted += len(want)
    assert counted > 200
    assert det.boxes(np.zeros((736, 960), np.float32), 480, 640, 1.5) == []


def _seeded_rgb(seeds) -> np.ndarray:
    frames = [sb.us_frame(seed, colour=seed % 2 == 1)[0] for seed in seeds]
    return np.stack([f if f.ndim == 3 else np.repeat(f[..., None], 3, 2) for f in frames])


def _touches_token(boxes, token) -> bool:
    t, l, b, r = token.box
    return any(bt < b and t < bb and bl < r and l < br for bt, bl, bb, br in boxes)


def test_openvino_and_onnx_runtime_read_the_same_boxes():
    """The detector runs on OpenVINO when it is installed (a model compiled per
    whole-frame shape) and on ONNX Runtime otherwise. Every reading that runs in fp32 on
    OpenVINO (all but those DetectorSettings.bf16 names, on a CPU with native bf16): on
    text over speckle, grey and colour, at the scale the step reads it, and on stacked
    crops (the dynamic-shape model), both give the same probabilities to float rounding
    and the same boxes. Fails when an fp32 reading runs in bf16 (the plugin's default
    on such a CPU: probabilities move by up to 0.9) or a static model is compiled for
    another shape than the input's.

    A reading that runs in bf16 moves probabilities, so its boxes are not the same pixel
    for pixel; what matters is checked instead: every drawn token that ONNX Runtime's
    fp32 boxes touch, the bf16 boxes touch too (for the small-text reading: the 7 px
    tokens of seeds 500, 503 and 504, which only it finds), and on text-free speckle the
    small-text reading finds no line of small text in either precision."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino; a runtime dependency)")
    import dataclasses

    from node.burnedin import small
    from node.burnedin.clean import _line_of_text
    from node.burnedin.detect import VERIFIER, DetectorSettings, TextDetector

    seeded = [sb.us_frame(seed, colour=seed % 2 == 1) for seed in (10045, 10066)]
    frames, tokens = _seeded_rgb((10045, 10066)), [t for _, t in seeded]
    tiny = [sb.us_frame(seed, over_content=1.0, sizes=(7,)) for seed in (500, 503, 504)]
    tiny_view = np.stack([small.tophat_view(np.repeat(f[..., None], 3, 2)) for f, _ in tiny])
    plain = [sb.us_background(np.random.default_rng(seed))[0] for seed in (720000, 720001, 720002)]
    plain_view = np.stack([small.tophat_view(np.repeat(f[..., None], 3, 2)) for f in plain])
    rows, cols = frames.shape[1:3]
    settings = DetectorSettings()
    readings = ((settings, "first", frames, settings.scale, tokens), (settings, "low-contrast", frames, settings.check_scale, tokens),
                (VERIFIER, "second", frames, VERIFIER.scale, tokens), (VERIFIER, "chroma", frames, VERIFIER.check_scale, tokens),
                (VERIFIER, "small-text", tiny_view, small.SCALE, [t for _, t in tiny]), (VERIFIER, "small-text", plain_view, small.SCALE, None))

    def lost(got, want, tokens):
        """Tokens fp32's boxes (want) touch that bf16's (got) do not; and how many fp32 touches."""
        touched = [(t, g) for ts, g, w in zip(tokens, got, want) for t in ts if _touches_token(w, t)]
        return [t.box for t, g in touched if not _touches_token(g, t)], len(touched)

    native = TextDetector(dataclasses.replace(VERIFIER, backend="openvino")).backend.native_bf16
    for st, reading, batch, scale, toks in readings:
        ov, ort = (TextDetector(dataclasses.replace(st, backend=b)) for b in ("openvino", "onnxruntime"))
        assert (ov.backend.name, ort.backend.name) == ("openvino", "onnxruntime")
        assert ort.precision(reading) == "f32"
        assert ov.precision(reading) == ("bf16" if native and reading in st.bf16 else "f32")
        a, b = ov.probability(batch, scale, reading=reading), ort.probability(batch, scale, reading=reading)
        got, want = [ov.boxes(p, rows, cols, scale) for p in a], [ort.boxes(p, rows, cols, scale) for p in b]
        if ov.precision(reading) == "f32":
            assert float(np.abs(a - b).max()) < 1e-3, (reading, scale)
            assert got == want, (reading, scale)
            assert toks is None or all(got), "a frame with text gave no box: the comparison shows nothing"
        elif toks is not None:
            assert float(np.abs(a - b).max()) > 1e-3, f"{reading} is said to run in bf16 but gives fp32's probabilities"
            missing, touched = lost(got, want, toks)
            assert not missing, f"{reading}: tokens at {missing}: fp32 boxes touch them, bf16 boxes do not"
            assert touched >= (12 if batch is tiny_view else 6), f"{reading}: fp32 touched too few tokens to compare"
        if toks is None:
            small_lines = [x for boxes in (*got, *want) for x in boxes if x[2] - x[0] <= small.MAX_HEIGHT and _line_of_text(x, small.LINE_RATIO)]
            assert not small_lines, "a line of small text on text-free speckle"
    regions = [(0, 0, 60, 400), (150, 100, 230, 520), (400, 20, 480, 300)]
    for st in (settings, VERIFIER):
        ov, ort = (TextDetector(dataclasses.replace(st, backend=b)) for b in ("openvino", "onnxruntime"))
        got = [ov.detect_regions(frames[k], regions, reading="re-read") for k in range(len(frames))]
        want = [ort.detect_regions(frames[k], regions, reading="re-read") for k in range(len(frames))]
        if ov.precision("re-read") == "f32":
            assert got == want
        else:
            assert not lost(got, want, tokens)[0]


def _runtime_precisions(request) -> set[str]:
    """The precisions OpenVINO's compiled model runs its layers in (its runtime model)."""
    ops = request.get_compiled_model().get_runtime_model().get_ops()
    return {str(op.get_rt_info()["runtimePrecision"].astype(str)) for op in ops if "runtimePrecision" in op.get_rt_info()}


def test_bf16_runs_only_for_the_readings_asked_and_on_a_cpu_with_native_bf16(monkeypatch, caplog):
    """DetectorSettings.bf16 names the readings that run in bf16: on OpenVINO, where the
    CPU has native bf16, their compiled models run layers in bf16 and the other
    readings' in fp32 only; on a CPU without native bf16 (checked by telling the
    detector so, and by OpenVINO's own OV_CPU_MAX_ISA in a subprocess when that
    OpenVINO honours it) and on ONNX Runtime every reading runs in fp32, which is
    logged. An unknown reading name is refused."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino; a runtime dependency)")
    import logging

    from node.burnedin.detect import DetectorSettings, TextDetector

    with pytest.raises(ValueError, match="unknown reading"):
        DetectorSettings(bf16=frozenset({"small"}))
    x = np.zeros((1, 64, 96, 3), np.uint8)
    det = TextDetector(DetectorSettings(backend="openvino", bf16=frozenset({"small-text"})))
    be = det.backend
    if be.native_bf16:
        assert (det.precision("small-text"), det.precision("first")) == ("bf16", "f32")
        for reading in ("small-text", "first"):
            for _ in range(2):  # the second reading of a shape compiles its own model
                det.probability(x, 1.0, reading=reading)
        shape = (1, 3, 64, 96)
        assert set(be._static) == {(shape, "bf16"), (shape, "f32")}
        assert "bf16" in _runtime_precisions(be._static[(shape, "bf16")])
        assert "bf16" not in _runtime_precisions(be._static[(shape, "f32")])
        assert "bf16" not in _runtime_precisions(be._dynamic["f32"])
    # A CPU without native bf16: the reading asked in bf16 runs the fp32 model, logged.
    det = TextDetector(DetectorSettings(backend="openvino", bf16=frozenset({"small-text"})))
    monkeypatch.setattr(det.backend, "native_bf16", False)
    frame = _seeded_rgb((500,))
    with caplog.at_level(logging.INFO, logger="node.burnedin.detect"):
        a = det.probability(frame, 1.0, reading="small-text")
    assert det.precision("small-text") == "f32" and set(det.backend._dynamic) == {"f32"}
    assert float(np.abs(a - det.probability(frame, 1.0, reading="first")).max()) < 1e-3  # fp32 rounding (bf16 moves it by 0.4 and more)
    assert any("no native bf16" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.INFO, logger="node.burnedin.detect"):
        ort = TextDetector(DetectorSettings(backend="onnxruntime", bf16=frozenset({"small-text"})))
    assert ort.precision("small-text") == "f32"
    assert any("run in fp32 on onnxruntime" in r.getMessage() for r in caplog.records)
    # OpenVINO told the CPU has AVX-512 but not its bf16 instructions (as a Skylake or
    # Ice Lake server): asked explicitly, OpenVINO would emulate bf16; the detector asks fp32.
    code = ("import numpy as np; from node.burnedin.detect import DetectorSettings, TextDetector;"
            "d = TextDetector(DetectorSettings(backend='openvino', bf16=frozenset({'small-text'})));"
            "x = np.zeros((1, 64, 96, 3), np.uint8); [d.probability(x, 1.0, reading='small-text') for _ in range(2)];"
            "from tests.test_burnedin import _runtime_precisions as rp;"
            "print(d.backend.native_bf16, d.precision('small-text'), sorted({p for r in d.backend._static.values() for p in rp(r)}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "OV_CPU_MAX_ISA": "AVX512_CORE", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("True"):
        pytest.skip("this OpenVINO does not honour OV_CPU_MAX_ISA (the CPU still shows native bf16); the fallback was checked in-process only")
    assert out.stdout.split(" ", 2)[:2] == ["False", "f32"] and "bf16" not in out.stdout, out.stdout


def test_openvino_keeps_one_model_per_whole_frame_shape():
    """Whole frames of one size get a model compiled for their shape (and precision)
    from their second reading on, and reuse it; a shape read once and stacked crops run
    on the dynamic-shape model; at most STATIC models are kept, the least recently used
    dropped first."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino; a runtime dependency)")
    from node.burnedin.detect import DetectorSettings, TextDetector

    det = TextDetector(DetectorSettings(backend="openvino"))
    be = det.backend
    frames = np.zeros((1, 64, 96, 3), np.uint8)
    det.detect(frames)
    assert not be._static, "a shape read once compiled a model of its own"
    det.detect(frames)
    key = ((1, 3, 96, 160), "f32")
    assert list(be._static) == [key]
    first = be._static[key]
    det.detect(frames)
    assert be._static[key] is first
    for _ in range(2):
        det.detect_regions(np.zeros((64, 96, 3), np.uint8), [(0, 0, 32, 64)])
    assert list(be._static) == [key], "stacked crops compiled a model of their own"
    for k in range(be.STATIC):
        for _ in range(2):
            det.detect(np.zeros((1, 64 + 32 * k, 64, 3), np.uint8), 1.0)
    assert len(be._static) == be.STATIC and key not in be._static


def test_detector_falls_back_to_onnx_runtime_without_openvino(monkeypatch, caplog):
    """Without the openvino package the detector runs on ONNX Runtime and says so; asked
    for OpenVINO explicitly, it is unavailable (the step then quarantines, never passes)."""
    import logging

    from node.burnedin.detect import DetectorSettings, DetectorUnavailable, TextDetector

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ModuleNotFoundError
    with caplog.at_level(logging.INFO, logger="node.burnedin.detect"):
        det = TextDetector(DetectorSettings())
    assert det.backend.name == "onnxruntime"
    assert any("OpenVINO is not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(DetectorUnavailable, match="OpenVINO is not installed"):
        TextDetector(DetectorSettings(backend="openvino"))


# -- cleaning ------------------------------------------------------------------------------
def _objects():
    """(label, dataset, tokens, palette) for each kind of synthetic object."""
    out = []
    for seed in (11, 12):
        f, toks = sb.us_frame(seed)
        out.append((f"us-grey-{seed}", sb.dataset(f), toks, None))
    for seed in (21, 22):
        f, toks = sb.us_frame(seed, colour=True)
        out.append((f"us-rgb-{seed}", sb.dataset(f, "RGB"), toks, None))
    idx, pal, toks = sb.palette_frame(31)
    out.append(("us-palette", sb.dataset(idx, "PALETTE COLOR", palette=pal), toks, pal))
    frames, toks = sb.cine(41, n_frames=12, colour=True)
    out.append(("us-cine-rgb", sb.dataset(frames, "RGB"), toks, None))
    f, toks = sb.us_frame(51, sizes=(12, 16, 22))
    out.append(("sc", sb.dataset(f, modality="OT"), toks, None))
    return out


@needs_tesseract
@pytest.mark.parametrize("label,ds,tokens,palette", _objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_after_cleaning_no_drawn_token_is_readable(step, label, ds, tokens, palette):
    before = frames_of(ds).copy()
    spacing, regions = list(ds.PixelSpacing), ds.get("SequenceOfUltrasoundRegions")
    report = step.clean(ds, deid())
    assert report is not None and ds.BurnedInAnnotation == "NO"
    after = frames_of(ds)
    assert after.shape == before.shape
    # The second engine reads the drawn tokens before cleaning (it can read them) and
    # none after, on every frame.
    readable_before = sum(tesseract_reads(as_rgb(before, palette)[0], t) for t in tokens)
    assert readable_before >= len(tokens) // 2, f"{label}: the checking engine reads only {readable_before} of {len(tokens)} tokens"
    for k in sorted({0, len(after) - 1}):
        left = [t.text for t in tokens if tesseract_reads(as_rgb(after, palette)[k], t)]
        assert not left, f"{label} frame {k}: still readable after cleaning: {len(left)} token(s)"
    # At least 99% of the pixels outside the drawn text lines are unchanged.
    drawn = np.zeros(before.shape[1:3], bool)
    for t in tokens:
        top, left, bottom, right = t.box
        pad = max(3, t.size // 4)  # the text line: ascenders, descenders and spacing around the ink
        drawn[max(0, top - pad) : bottom + pad, max(0, left - pad) : right + pad] = True
    for k in range(len(after)):
        changed = (after[k] != before[k]).any(-1)
        assert 1 - changed[~drawn].mean() >= 0.99, f"{label} frame {k}: {changed[~drawn].mean():.2%} changed outside the text"
    # The header's calibration is untouched.
    assert list(ds.PixelSpacing) == spacing
    assert ds.get("SequenceOfUltrasoundRegions") == regions


def test_pixels_outside_the_masks_are_bit_for_bit_high_bits_included(step):
    f, tokens = sb.us_frame(61)
    ds = sb.dataset(f)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    stored = (f.astype(np.uint16) << 4) | 0x8000  # bit 15 set: above BitsStored
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    report = step.clean(ds, deid())
    out = np.frombuffer(ds.PixelData, np.uint16).reshape(f.shape)
    inside = np.zeros(f.shape, bool)
    for t, l, b, r in report.masked[0]:
        inside[t:b, l:r] = True
    assert inside.any()
    assert np.array_equal(out[~inside], stored[~inside])


def test_compressed_input_is_decoded_and_written_lossless(step):
    frames, tokens = sb.cine(71, n_frames=3)
    ds = sb.dataset(frames)
    raw = frames_of(ds).copy()
    ds.compress(RLELossless, encoding_plugin="pydicom")
    report = step.clean(ds, deid())
    assert report.decoded_from == RLELossless
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # written uncompressed
    out = frames_of(ds)
    for k in range(3):
        masked = np.zeros(raw.shape[1:3], bool)
        for t, l, b, r in report.masked[k]:
            masked[t:b, l:r] = True
        assert np.array_equal(out[k][~masked], raw[k][~masked])


def test_jpeg_ybr_full_422_is_decoded_to_rgb_and_written_uncompressed(step):
    """A JPEG baseline US frame (YBR_FULL_422, as scanners send): decoded with the
    maintained plugins, cleaned as RGB, never re-encoded lossy."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    pytest.importorskip("libjpeg", reason="pylibjpeg-libjpeg decodes JPEG baseline")
    f, tokens = sb.us_frame(75, colour=True)
    buf = io.BytesIO()
    Image.fromarray(f).save(buf, "JPEG", quality=95, subsampling=1)  # 4:2:2
    ds = sb.dataset(f, "RGB")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    decoded = ds.pixel_array.copy()  # what pydicom shows: RGB
    report = step.clean(ds, deid())
    assert report.decoded_from == JPEGBaseline8Bit
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.PhotometricInterpretation == "RGB" and ds.LossyImageCompression == "01"
    out = frames_of(ds)[0]
    masked = np.zeros(f.shape[:2], bool)
    for t, l, b, r in report.masked[0]:
        masked[t:b, l:r] = True
    assert masked.any() and np.array_equal(out[~masked], decoded[~masked])


def test_cine_reads_a_sample_and_frames_whose_overlay_changed(step):
    frames, tokens = sb.cine(81, n_frames=30)
    changed = frames[17].copy()
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(changed)
    ImageDraw.Draw(img).text((20, 440), "ROE RICHARD", fill=255, font=ImageFont.truetype(str(sb.fonts()[0]), 20))
    frames[17] = np.asarray(img)
    ds = sb.dataset(frames)
    report = step.clean(ds, deid())
    assert 17 in report.read and len(report.read) < 30
    masked = report.masked[17]
    assert any(t <= 445 and b >= 455 and l <= 30 for t, l, b, r in masked), "the text of the changed frame was not masked"
    assert all(report.masked[k] == masked for k in range(30)), "a static overlay is masked on every frame"
    assert list(report.record()["boxes"]) == ["0-29"]


def test_region_rules_blank_before_ocr(step, tmp_path):
    f, tokens = sb.us_frame(91)
    ds = sb.dataset(f, model="SYNUS BANNER 2")
    report = step.clean(ds, deid())
    assert report.rules == ["casemask synthetic US banner 640x480"]
    out = frames_of(ds)[0, :36, :, 0]
    assert not out.any(), "the banner rectangle is blank"
    assert [0, 0, 36, 640] in [list(b) for b in report.record()["boxes"]["0"]]


def test_region_rules_file_is_validated_with_what_to_write(tmp_path):
    from node.burnedin.regions import RegionRules

    bad = tmp_path / "rules.toml"
    bad.write_text('[[rules]]\nname = "x"\nmanufacturer = "(" \nrows = "480"\ncolumns = 640\nregions = [{ x = 0, y = 0, width = 0, height = 4 }]\n')
    with pytest.raises(ConfigError) as err:
        RegionRules.load(bad)
    text = str(err.value)
    assert "not a regular expression" in text and "the image's Rows" in text and "width" in text


def test_low_contrast_text_the_detector_misses_is_quarantined(step):
    from node.burnedin import BurnedInError

    f, tokens = sb.us_frame(101, contrast=5, over_content=0.0, sizes=(18, 24))
    ds = sb.dataset(f)
    with pytest.raises(BurnedInError) as err:
        step.clean(ds, deid())
    assert "low-contrast check" in str(err.value)
    for t in tokens:
        assert _norm(t.text)[:4] not in _norm(str(err.value))


def test_a_frame_the_detector_cannot_process_is_quarantined(step, monkeypatch):
    from node.burnedin import BurnedInError

    f, _ = sb.us_frame(111)
    ds = sb.dataset(f)
    det = step.detector()

    def broken(*a, **k):
        raise RuntimeError("ONNX Runtime failed")

    monkeypatch.setattr(det, "probability", broken)
    with pytest.raises(BurnedInError, match="could not process"):
        step.clean(ds, deid())


def test_objects_the_policy_passes_are_left_alone(step):
    f, _ = sb.us_frame(121)
    ds = sb.dataset(f)
    ds.BurnedInAnnotation = "NO"
    data = ds.PixelData
    assert step.clean(ds, deid()) is None
    assert ds.PixelData == data


def test_the_policy_accepts_what_the_step_cleaned(step):
    f, _ = sb.us_frame(131)
    ds = sb.dataset(f)
    d = deid()
    report = step.clean(ds, d)
    res = d.apply(ds, extra_codes=[CLEAN_PIXEL_CODE])
    codes = [item.CodeValue for item in res.dataset.DeidentificationMethodCodeSequence]
    assert "113101" in codes and res.dataset.BurnedInAnnotation == "NO"
    assert report.record()["boxes"]


@pytest.mark.skipif(not (CASES / "04-sc-dose-screen-modality-ct").is_dir(), reason="shared/cases is not beside the repository")
def test_case_04_dose_screens_are_cleaned(step):
    from node.burnedin.clean import clean

    for name in ("dose_mono.dcm", "dose_rgb.dcm"):
        ds = dcmread(CASES / "04-sc-dose-screen-modality-ct" / name)
        report = clean(ds, step.detector(), step.rules)
        assert report.masked[0], f"{name}: the name in the pixels was not found"
        out = frames_of(ds)[0]
        assert not out[:20, :48].any(), f"{name}: the text area is not blank"


# -- CLI -----------------------------------------------------------------------------------
def test_cli_deid_burned_in_clean_with_diff(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    # Seed 150: cleaned. (Seed 141, used here before, is now held back by the small-text
    # reading with every token masked: a false alarm, docs/burned-in.md Limits.)
    f, _ = sb.us_frame(150)
    sb.dataset(f).save_as(src / "us.dcm", enforce_file_format=True)
    low, _ = sb.us_frame(142, contrast=5, over_content=0.0, sizes=(18, 24))
    sb.dataset(low).save_as(src / "faint.dcm", enforce_file_format=True)
    r = subprocess.run([sys.executable, "-m", "node.cli", "deid", str(src), "--out", str(tmp_path / "out"), "--secret", str(tmp_path / "k"),
                        "--burned-in", "clean", "--diff"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stderr  # one object quarantined
    assert re.search(r"burned-in: frame 0: masked \d+ box\(es\)", r.stdout), r.stdout
    assert "quarantined" in r.stderr and "low-contrast check" in r.stderr
    assert re.search(r"de-identified 1, .*quarantined 1", r.stderr), r.stderr
    out = list((tmp_path / "out").glob("*.dcm"))
    assert len(out) == 1
    ds = dcmread(out[0])
    assert ds.BurnedInAnnotation == "NO" and "113101" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
    # Without --burned-in clean the same object is held back by the policy.
    r2 = subprocess.run([sys.executable, "-m", "node.cli", "deid", str(src / "us.dcm"), "--out", str(tmp_path / "out2"), "--secret", str(tmp_path / "k")],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r2.returncode == 1 and "quarantined" in r2.stderr


# -- end to end ----------------------------------------------------------------------------
@pytest.mark.slow
@needs_dcmtk
@needs_orthanc
def test_us_study_through_the_node_to_orthanc_cleaned(tmp_path, orthanc, start_node):
    from sqlalchemy import select

    from node.db import Job

    dest = {"name": "orthanc", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    route = {"name": "us", "match": {"Modality": ["US"]}, "deid": {"profile": "basic", "burned_in": "clean"}, "destinations": ["orthanc"]}
    node = start_node(node_config(tmp_path, [dest], routes=[route], lease_s=120.0))
    study = tmp_path / "study"
    study.mkdir()
    uid = "1.2.826.0.1.3680043.8.498.77"
    f1, toks1 = sb.us_frame(151)
    f2, _ = sb.us_frame(152, colour=True)
    faint, _ = sb.us_frame(153, contrast=5, over_content=0.0, sizes=(18, 24))
    for name, ds in (("a", sb.dataset(f1, study_uid=uid)), ("b", sb.dataset(f2, "RGB", study_uid=uid)), ("c", sb.dataset(faint, study_uid=uid + ".1"))):
        ds.save_as(study / f"{name}.dcm", enforce_file_format=True)
    r = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(node.settings.node.port), *map(str, sorted(study.glob("*.dcm")))],
                       env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: len(orthanc.instances()) >= 2, timeout=240, what="2 cleaned instances at Orthanc")

    def settled():
        with node.sessions() as s:
            jobs = s.scalars(select(Job)).all()
            return jobs if len(jobs) == 3 and all(j.state.name in ("DONE", "QUARANTINED") for j in jobs) else None

    jobs = wait_until(settled, timeout=240, what="3 jobs settled")
    states = sorted(j.state.name for j in jobs)
    assert states == ["DONE", "DONE", "QUARANTINED"]
    for j in jobs:
        if j.state.name == "DONE":
            boxes = json.loads(j.record)["burned_in"]["boxes"]["0"]
            assert len(boxes) >= 3
        else:
            assert "low-contrast check" in j.reason
    assert len(orthanc.instances()) == 2
    for oid in orthanc.instances():
        tags = orthanc.instance_tags(oid)
        assert tags["BurnedInAnnotation"] == "NO"
        assert "Doe" not in repr(tags)
        with __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/instances/{oid}/file", timeout=10) as resp:
            data = resp.read()
        ds = dcmread(__import__("io").BytesIO(data))
        assert "113101" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
        if ds.PhotometricInterpretation == "MONOCHROME2" and TESSERACT:
            rgb = as_rgb(frames_of(ds))[0]
            assert not [t.text for t in toks1 if tesseract_reads(rgb, t)]


def test_config_check_reads_the_region_rules(tmp_path):
    from node.config import parse

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "o")}],
                      routes=[{"name": "us", "deid": {"profile": "basic", "burned_in": "clean"}, "destinations": ["f"]}],
                      burned_in_regions=str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="burned_in_regions: no such file"):
        parse(raw, "test", base_dir=tmp_path)
    raw["node"]["burned_in_regions"] = str(ROOT / "config" / "burned_in_regions.toml")
    assert parse(raw, "test", base_dir=tmp_path).routes[0].deid.burned_in == "clean"


class _HalfSighted:
    """The real detector, except that its first reading of a whole frame returns only
    the left half of each box (as if part of a line was missed)."""

    def __init__(self, real, stubborn: bool = False) -> None:
        self.real, self.stubborn, self.settings = real, stubborn, real.settings
        self.seconds = 0.0
        self.first = True

    def detect(self, frames, scale=None, reading=""):
        boxes = self.real.detect(frames, scale)
        if self.stubborn and scale is None and not self.first:
            return [[self.last]]
        if scale is None and self.first:
            self.first = False
            return [[(t, l, b, l + (r - l) // 2) for t, l, b, r in fb] for fb in boxes]
        return boxes

    def detect_regions(self, frame, regions, scale=None, reading=""):
        if self.stubborn:  # a line of text that stays whatever is masked
            t, l, _, _ = regions[0]
            self.last = (t, l, t + 20, l + 80)
            return [self.last]
        return self.real.detect_regions(frame, regions, scale)


@pytest.mark.parametrize("small_text_reads", [True, False], ids=["small-text reading", "re-read"])
def test_text_left_next_to_a_mask_is_masked_on_the_re_check(step, monkeypatch, small_text_reads):
    """The first reading's boxes stop halfway along each line: the rest is masked by the
    re-check, whichever reading of the masked frame finds it (the small-text reading on
    a frame with places dense in thin marks, else the re-read around the masks)."""
    from node.burnedin import small
    from node.burnedin.clean import clean

    if not small_text_reads:
        monkeypatch.setattr(small, "candidate_areas", lambda rgb, masks=(): [])
    f, tokens = sb.us_frame(161, over_content=0.0, sizes=(24, 30))
    assert small_text_reads == bool(small.candidate_areas(np.repeat(f[..., None], 3, 2)))
    ds = sb.dataset(f)
    report = clean(ds, _HalfSighted(step.detector()), None)
    m = np.zeros(f.shape, bool)
    for t, l, b, r in report.masked[0]:
        m[t:b, l:r] = True
    assert all(m[t.box[0] : t.box[2], t.box[1] : t.box[3]].all() for t in tokens), "the rest of a line was not masked"


@pytest.mark.parametrize("frame", ["8-bit, nothing for the small-text reading", "12-bit"])
def test_text_still_found_after_masking_is_quarantined(step, monkeypatch, frame):
    """The re-read around the masks finds text beside a mask round after round: the
    object is quarantined. It runs on frames the small-text reading does not read (no
    place dense in thin marks) and on those the ink reading cannot follow with exact
    values (12 bits stored, shown through a percentile stretch), where the small-text
    reading does read."""
    from node.burnedin import BurnedInError, clean as cleaning, small
    from node.burnedin.clean import clean

    monkeypatch.setattr(cleaning, "_continues", lambda box, masks: True)
    monkeypatch.setattr(cleaning, "_covered", lambda box, masks: False)
    f, _ = sb.us_frame(162, over_content=0.0, sizes=(24,))
    ds = sb.dataset(f)
    if frame == "12-bit":
        assert small.candidate_areas(np.repeat(f[..., None], 3, 2))
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = (f.astype(np.uint16) << 4).tobytes()
        ds["PixelData"].VR = "OW"
    else:
        monkeypatch.setattr(small, "candidate_areas", lambda rgb, masks=(): [])
    with pytest.raises(BurnedInError, match="still detected after masking"):
        clean(ds, _HalfSighted(step.detector(), stubborn=True), None)


class _CutShort:
    """A first reading whose boxes of whole frames stop halfway along each line, and
    which finds nothing around the masks afterwards: only the second reading's geometry
    can see that the lines go on."""

    def __init__(self, real) -> None:
        self.real, self.settings, self.seconds = real, real.settings, 0.0

    def detect(self, frames, scale=None, reading=""):
        boxes = self.real.detect(frames, scale)
        if scale is None:
            return [[(t, l, b, l + (r - l) // 2) for t, l, b, r in fb] for fb in boxes]
        return boxes

    def detect_regions(self, frame, regions, scale=None, reading=""):
        return []


def test_a_line_the_first_box_cut_short_is_masked_to_its_end(step):
    """The first reading's boxes stop halfway along each line (what the benchmark found
    over speckle: the box ends before the last letters): the second reading's box sticks
    out of the mask on the same line, so the rest of the line is masked too. No ink of a
    drawn token is left in an object that passes."""
    for seed, colour in ((191, False), (192, True)):
        _cut_short_lines_pass_with_no_ink_left(seed, colour, _CutShort(step.detector()), step.verifier())


def _cut_short_lines_pass_with_no_ink_left(seed: int, colour: bool, detector, verifier) -> None:
    """Clean a frame of 4 lines (half over the image) with ``detector`` and ``verifier``:
    it must pass, and no ink of a drawn token may be left outside the masks."""
    from node.burnedin import BurnedInError
    from node.burnedin.clean import clean

    f, tokens = sb.us_frame(seed, colour=colour, over_content=0.5, sizes=(14, 18, 24), n=4)
    ds = sb.dataset(f, "RGB" if colour else "MONOCHROME2")
    try:
        report = clean(ds, detector, None, verifier)
    except BurnedInError as exc:
        pytest.fail(f"seed {seed}: quarantined instead of masking the rest of the lines ({exc})")
    m = np.zeros(f.shape[:2], bool)
    for t, l, b, r in report.masked[0]:
        m[t:b, l:r] = True
    assert not [t.text for t in tokens if t.uncovered_ink(m)], f"seed {seed}: passed with ink of a token left uncovered"


# -- the second reading: what the first reading misses is quarantined ------------------------
class _Blind:
    """A first reading that misses everything (the detector forced to fail silently):
    no boxes from whole frames nor from the areas around masks."""

    def __init__(self, real) -> None:
        self.settings, self.seconds = real.settings, 0.0

    def detect(self, frames, scale=None, reading=""):
        return [[] for _ in frames]

    def detect_regions(self, frame, regions, scale=None, reading=""):
        return []


def test_text_the_first_reading_misses_is_quarantined_by_the_second(step):
    """Text over the image (where the low-contrast view does not look) that the first
    reading misses entirely: the second reading, another session tuned apart, finds it."""
    from node.burnedin import BurnedInError
    from node.burnedin.clean import clean

    for seed, colour in ((171, False), (172, True)):
        f, tokens = sb.us_frame(seed, colour=colour, over_content=1.0, sizes=(14, 18), n=3)
        assert tokens and all(t.over_content for t in tokens)
        ds = sb.dataset(f, "RGB" if colour else "MONOCHROME2")
        before = ds.PixelData
        with pytest.raises(BurnedInError, match="second reading found text") as err:
            clean(ds, _Blind(step.detector()), step.rules, step.verifier())
        assert ds.PixelData == before, "a quarantined object is not written"
        for t in tokens:
            assert _norm(t.text)[:4] not in _norm(str(err.value))


def test_the_second_reading_reads_the_frame_enlarged_one_and_three_quarter_times(step, monkeypatch):
    """The second reading (the frame as shown, second detector) reads a 640 x 480 frame
    as 1120 x 864 (x1.75), not 1280 x 960 (x2.0, until 2026-11-30): about a quarter less
    CPU for that reading, with the same first-reading recall, no token leaked and one
    object more held back on the 500 seeded frames (docs/burned-in.md, "The two cores,
    the second reading at x1.75 and the small-text gate")."""
    from node.burnedin.clean import clean

    verifier = step.verifier()
    real, shapes = verifier.backend.run, []

    def run(x, shape_varies=False, precision="f32"):
        shapes.append(tuple(x.shape))
        return real(x, shape_varies, precision)

    monkeypatch.setattr(verifier.backend, "run", run)
    f, _ = sb.us_frame(10002)
    clean(sb.dataset(f), step.detector(), step.rules, verifier)  # cleaned (raises if held back)
    assert (1, 3, 864, 1120) in shapes, shapes
    assert not [s for s in shapes if s[2:] == (960, 1280)], shapes


def test_lanes_clean_two_objects_at_once_as_one_after_another_does(monkeypatch):
    """``BurnedInStep(lanes=2).clean_all`` cleans two objects at the same time, each lane
    with detectors of its own (inferences on cores / 2 threads), and gives what one
    object after another gives: the same masks, the same object held back with the same
    reason, in the objects' order."""
    import copy

    import node.burnedin.step as step_module
    from node.burnedin import BurnedInError, BurnedInStep

    objects = []
    for seed, colour in ((910002, False), (910003, True), (10002, False), (910001, True)):
        f, _ = sb.us_frame(seed, colour=colour)
        objects.append(sb.dataset(f, "RGB" if colour else "MONOCHROME2"))
    d = deid()

    def outcomes(results):
        return [str(r) if isinstance(r, BurnedInError) else r.masked for r in results]

    one_by_one = outcomes(BurnedInStep(lanes=1).clean_all([(copy.deepcopy(ds), d) for ds in objects]))
    real, busy, most = step_module.clean, [0], [0]
    guard = threading.Lock()

    def counting(*args, **kwargs):
        with guard:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                busy[0] -= 1

    monkeypatch.setattr(step_module, "clean", counting)
    lanes = BurnedInStep(lanes=2)
    side_by_side = outcomes(lanes.clean_all([(copy.deepcopy(ds), d) for ds in objects]))
    assert most[0] == 2, "two objects were never cleaned at the same time"
    pairs = list(lanes._pairs.queue)
    assert len(pairs) == 2 and {det.settings.threads for pair in pairs for det in pair} == {max(1, (os.cpu_count() or 1) // 2)}
    assert side_by_side == one_by_one
    assert any(isinstance(o, str) for o in one_by_one) and any(isinstance(o, dict) for o in one_by_one)


# 7 px text over speckle that the first reading (scale 1.5) misses in part. Seeds 500,
# 503 and 504 hold 7 px tokens that every reading but the small-text one misses (network
# on the frame as shown, ink): the test after this one.
SMALL_TEXT_SEEDS = (502, 506, 507)


def test_small_text_the_first_reading_misses_is_quarantined(step):
    """7 px text over the speckle: the first reading (scale 1.5) misses some of it on
    these seeds; the object is quarantined by the second reading, never passed with a
    token left uncovered."""
    from node.burnedin import BurnedInError
    from node.burnedin.clean import clean

    missed_first = quarantined = 0
    for seed in SMALL_TEXT_SEEDS:
        f, tokens = sb.us_frame(seed, over_content=1.0, sizes=(7,))
        rgb = np.repeat(f[..., None], 3, 2)
        first = step.detector().detect(rgb[None])[0]
        missed_first += any(not any(b[0] < t.box[2] and t.box[0] < b[2] and b[1] < t.box[3] and t.box[1] < b[3] for b in first) for t in tokens)
        try:
            report = clean(sb.dataset(f), step.detector(), step.rules, step.verifier())
        except BurnedInError as exc:
            assert "second reading" in str(exc) or "low-contrast" in str(exc) or "ink reading" in str(exc)
            quarantined += 1
            continue
        m = np.zeros(f.shape, bool)
        for t, l, b, r in report.masked[0]:
            m[t:b, l:r] = True
        assert not [t.text for t in tokens if t.uncovered_ink(m)], f"seed {seed}: passed with a token left uncovered"
    assert missed_first and quarantined >= missed_first, "the first reading missed text on these seeds and each such object was held back"


def test_seven_pixel_text_every_other_reading_misses_is_held_back_or_masked(step):
    """The seeds SMALL_TEXT_SEEDS leaves out: 7 px tokens that the network on the frame
    as shown (scales 1.5 and 2.0) and the ink reading all miss (a strict xfail until
    2026-11-30). The small-text reading (the top-hat view at scale 3 where thin marks
    are dense) finds them: each object is quarantined by it or passes with no token
    uncovered, and at least one is held back by that reading."""
    from node.burnedin import BurnedInError
    from node.burnedin.clean import clean

    leaked, by_small = [], 0
    for seed in (500, 503, 504):
        f, tokens = sb.us_frame(seed, over_content=1.0, sizes=(7,))
        try:
            report = clean(sb.dataset(f), step.detector(), step.rules, step.verifier())
        except BurnedInError as exc:
            by_small += "small-text reading" in str(exc)
            continue
        m = np.zeros(f.shape, bool)
        for t, l, b, r in report.masked[0]:
            m[t:b, l:r] = True
        leaked += [seed for t in tokens if t.uncovered_ink(m)]
    assert not leaked, f"seeds {sorted(set(leaked))} passed with 7 px tokens left uncovered"
    assert by_small, "the small-text reading held none of these objects back"


def test_small_text_reading_passes_text_free_frames(step):
    """Text-free speckle (walls, cysts, grey and colour), where the small-text reading
    has candidate areas to read: no object is held back."""
    from node.burnedin import small
    from node.burnedin.clean import clean

    for seed in range(710001, 710007):  # the benchmark's text-free frames (odd: colour; 710000 the ink reading holds back, docs/burned-in.md)
        f, _ = sb.us_background(np.random.default_rng(seed))
        if seed % 2:
            f = np.repeat(f[..., None], 3, 2)
        ds = sb.dataset(f, "RGB" if f.ndim == 3 else "MONOCHROME2")
        assert small.candidate_areas(f if f.ndim == 3 else np.repeat(f[..., None], 3, 2)), f"seed {seed}: nothing for the small-text reading to read"
        clean(ds, step.detector(), step.rules, step.verifier())  # BurnedInError fails the test


# -- the ink reading: what both readings of the network miss -------------------------------
def test_text_both_readings_miss_is_quarantined_by_the_ink_reading(step):
    """Both readings of the network blind (what the benchmark saw on small, faint text
    across a bright wall: no probability at all on its letters): the classical ink
    reading finds the flat strokes of one value and holds the object back; a text-free
    frame read the same way passes untouched."""
    from node.burnedin import BurnedInError
    from node.burnedin.clean import clean

    blind = _Blind(step.detector())
    for seed, colour in ((173, False), (174, True)):
        f, tokens = sb.us_frame(seed, colour=colour, over_content=1.0, sizes=(11, 14), n=3)
        assert tokens and all(t.over_content for t in tokens)
        ds = sb.dataset(f, "RGB" if colour else "MONOCHROME2")
        before = ds.PixelData
        with pytest.raises(BurnedInError, match="ink reading found text"):
            clean(ds, blind, None, _Blind(step.verifier()))
        assert ds.PixelData == before, "a quarantined object is not written"
    for seed in (175, 176):
        f, _ = sb.us_background(np.random.default_rng(seed))
        ds = sb.dataset(f)
        before = ds.PixelData
        report = clean(ds, blind, None, _Blind(step.verifier()))
        assert report.masked[0] == [] and ds.PixelData == before


def test_a_line_cut_short_is_grown_along_its_ink_without_the_second_reading(step):
    """The first reading's boxes stop halfway along each line and the second reading is
    blind: the masks are grown along the line while the strip beside them holds the
    line's ink value (and the ink reading masks what is left beside a mask), so the
    object passes with no ink of a drawn token left."""
    for seed, colour in ((193, False), (194, True)):
        _cut_short_lines_pass_with_no_ink_left(seed, colour, _CutShort(step.detector()), _Blind(step.verifier()))


@pytest.mark.slow
@needs_dcmtk
@needs_orthanc
def test_text_the_detector_misses_is_quarantined_through_the_node(tmp_path, orthanc, start_node, monkeypatch):
    """storescu -> node -> Orthanc with the step's first reading blind: the object with
    text is QUARANTINED by the second reading and never reaches Orthanc; the same frame
    marked BurnedInAnnotation NO (which the policy passes untouched) does, so the route
    does forward."""
    from sqlalchemy import select

    from node.burnedin import BurnedInStep
    from node.db import Job

    real = BurnedInStep.detector
    monkeypatch.setattr(BurnedInStep, "detector", lambda self, threads=None: _Blind(real(self, threads)))  # every lane's first reading
    dest = {"name": "orthanc", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    route = {"name": "us", "match": {"Modality": ["US"]}, "deid": {"profile": "basic", "burned_in": "clean"}, "destinations": ["orthanc"]}
    node = start_node(node_config(tmp_path, [dest], routes=[route], lease_s=120.0))
    study = tmp_path / "study"
    study.mkdir()
    f, tokens = sb.us_frame(181, over_content=1.0, sizes=(14, 18), n=3)
    with_text = sb.dataset(f, study_uid="1.2.826.0.1.3680043.8.498.78")
    marked = sb.dataset(f, study_uid="1.2.826.0.1.3680043.8.498.79")
    marked.BurnedInAnnotation = "NO"
    with_text.save_as(study / "a.dcm", enforce_file_format=True)
    marked.save_as(study / "b.dcm", enforce_file_format=True)
    r = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(node.settings.node.port), *map(str, sorted(study.glob("*.dcm")))],
                       env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

    def settled():
        with node.sessions() as s:
            jobs = s.scalars(select(Job)).all()
            return jobs if len(jobs) == 2 and all(j.state.name in ("DONE", "QUARANTINED") for j in jobs) else None

    wait_until(settled, timeout=240, what="2 jobs settled")
    with node.sessions() as s:
        states = {j.instance.sop_instance_uid: (j.state.name, j.reason) for j in s.scalars(select(Job)).all()}
    assert states[str(marked.SOPInstanceUID)][0] == "DONE"
    state, reason = states[str(with_text.SOPInstanceUID)]
    assert state == "QUARANTINED" and "second reading found text" in reason
    wait_until(lambda: len(orthanc.instances()) >= 1, timeout=120, what="the marked instance at Orthanc")
    assert len(orthanc.instances()) == 1
