"""Text detection in frames: where text is, not what it says.

The model is PP-OCRv4's text detector (DB, "Real-time Scene Text Detection with
Differentiable Binarization", Liao et al., AAAI 2020), as shipped inside the
``rapidocr-onnxruntime`` wheel: nothing is downloaded at run time. It is run here
through ONNX Runtime directly rather than through RapidOCR's per-image pipeline, so
that frames of one size go through in batches and the probability map is at hand;
the post-processing (threshold, connected components, score, unclip) follows DB's,
with axis-aligned boxes, since what is masked is a rectangle anyway.

The network runs on OpenVINO's CPU plugin when the ``openvino`` package is installed
(a runtime dependency since 2026-11-30: about a fifth less CPU a reading than ONNX
Runtime on this model, the same probabilities to float rounding, fp32 kept), else on
ONNX Runtime's CPU provider, which is logged (docs/burned-in.md, "The inference
runtime").

Why this model and scale: docs/burned-in.md (recall and speed measured against
Tesseract and RapidOCR's own pipeline on synthetic ultrasound).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MODEL_PACKAGE = "rapidocr_onnxruntime"
MODEL_FILE = "models/ch_PP-OCRv4_det_infer.onnx"

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive), frame pixels


class DetectorUnavailable(Exception):
    """The text detector cannot run here (package missing, model file unreadable)."""


def model_path() -> Path:
    """The detection model inside the installed rapidocr-onnxruntime wheel.

    Raises:
        DetectorUnavailable: the package is not installed or no longer ships the file.
    """
    try:
        p = Path(str(importlib.resources.files(MODEL_PACKAGE) / MODEL_FILE))
    except ModuleNotFoundError:
        raise DetectorUnavailable("the OCR package is not installed (pip install rapidocr-onnxruntime)") from None
    if not p.is_file():
        raise DetectorUnavailable(f"{MODEL_PACKAGE} does not ship {MODEL_FILE} (version changed?)")
    return p


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
    """How frames are read: ``scale`` enlarges them first (small text is found from about
    11 px at 1.5, not at 1.0); ``thresh``/``box_thresh``/``unclip`` are DB's own."""

    scale: float = 1.5  # 1.25 until 2026-11-30: recall 0.9893 on the 500 seeded frames, 1.5 found the rest (docs/burned-in.md)
    check_scale: float = 1.0  # the low-contrast check looks for larger, fainter text
    thresh: float = 0.3
    box_thresh: float = 0.5
    unclip: float = 1.6
    min_side: int = 3  # components thinner than this (scaled pixels) are noise
    threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)  # ONNX Runtime's intra-op threads: the cores
    max_batch: int = 4
    # The graph's element-wise chains folded into its convolutions (node.burnedin.graph):
    # the same probabilities to float rounding, about a quarter less CPU a reading.
    fold: bool = True
    # "auto": OpenVINO when installed and the model compiles, else ONNX Runtime (logged);
    # "openvino" or "onnxruntime" to insist (the tests compare the two).
    backend: str = "auto"


# The second reading (clean.py) runs the same network tuned apart: scale 2.0 (text of
# 7-11 px over speckle, which the first reading at 1.25 missed; 1.5 since 2026-11-30), lower
# thresholds, and its own session. It sees the masked frame only; what it finds that is
# not masked quarantines the object. Measured: docs/burned-in.md, "Second reading".
VERIFIER = DetectorSettings(scale=2.0, check_scale=1.0, thresh=0.2, box_thresh=0.4, max_batch=2)


@functools.lru_cache(maxsize=2)
def _folded(path: Path) -> bytes | None:
    from node.burnedin.graph import folded_model

    return folded_model(path)


class _OnnxRuntime:
    """The detector's graph on ONNX Runtime's CPU provider (one session, any input shape)."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: on cores shared with the rest of the
        # node (and on a loaded machine) spinning burned half the CPU time of a run and
        # made it slower (docs/burned-in.md, "Speed").
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray, shape_varies: bool = False) -> np.ndarray:
        """(N, 3, R, C) float32 -> (N, 1, R, C) float32 probabilities."""
        return self.session.run(None, {self.input: x})[0]


class _OpenVino:
    """The detector's graph on OpenVINO's CPU plugin, in fp32 (INFERENCE_PRECISION_HINT
    f32: bf16, which this CPU would run about twice as fast, moves probabilities by up
    to 0.9 and changes thresholded pixels; docs/burned-in.md).

    A model compiled for one input shape runs about a fifth faster than the
    dynamic-shape one, and compiling takes about 0.2 CPU s: a shape the step reads
    again (whole frames of one size at each scale) gets a static model of its own from
    its second reading on, the last STATIC of them kept; a shape seen once (a cine's
    batch of an odd size) and shapes that vary from call to call (the stacked crops of
    :meth:`TextDetector.detect_regions`) run on the dynamic-shape model."""

    name = "openvino"
    STATIC = 6  # static models kept per detector (each holds its own buffers: 30-300 MB at 640 x 480 x1.0-x3.0)

    def __init__(self, model: bytes | str, threads: int) -> None:
        import openvino as ov

        self._core = ov.Core()
        self._model = self._core.read_model(model) if isinstance(model, str) else self._core.read_model(model, b"")
        # One stream, the given threads, no pinning (the cores are shared with the rest
        # of the node), fp32 as the model was trained and measured.
        self._config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                        "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        self._dynamic = self._core.compile_model(self._model, "CPU", self._config).create_infer_request()
        self._static: dict[tuple[int, ...], object] = {}  # shape -> infer request, oldest first
        self._seen: set[tuple[int, ...]] = set()  # whole-frame shapes read once so far

    def _request(self, shape: tuple[int, ...], shape_varies: bool):
        if shape_varies:
            return self._dynamic
        if shape not in self._static and shape not in self._seen:
            if len(self._seen) >= 64:
                self._seen.clear()
            self._seen.add(shape)
            return self._dynamic
        req = self._static.pop(shape, None)
        if req is None:
            model = self._model.clone()
            model.reshape(list(shape))
            req = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            while len(self._static) >= self.STATIC:
                self._static.pop(next(iter(self._static)))
        self._static[shape] = req  # most recent last
        return req

    def run(self, x: np.ndarray, shape_varies: bool = False) -> np.ndarray:
        """(N, 3, R, C) float32 -> (N, 1, R, C) float32 probabilities."""
        req = self._request(tuple(x.shape), shape_varies)
        req.infer({0: x})
        return req.get_output_tensor(0).data.copy()


def _backend(settings: DetectorSettings):
    """The runtime for ``settings.backend`` with the model (folded when ``settings.fold``).

    Raises:
        DetectorUnavailable: the model or the runtime asked for cannot be loaded.
    """
    path = model_path()
    model = (_folded(path) if settings.fold else None) or str(path)
    if settings.backend not in ("auto", "openvino", "onnxruntime"):
        raise DetectorUnavailable(f"unknown detector backend {settings.backend!r} (write auto, openvino or onnxruntime)")
    if settings.backend in ("auto", "openvino"):
        try:
            return _OpenVino(model, settings.threads)
        except ModuleNotFoundError:
            if settings.backend == "openvino":
                raise DetectorUnavailable("OpenVINO is not installed (pip install openvino)") from None
            log.info("OpenVINO is not installed: the text detector runs on ONNX Runtime (slower)")
        except Exception as exc:
            if settings.backend == "openvino":
                raise DetectorUnavailable(f"OpenVINO cannot load the text detection model ({type(exc).__name__})") from None
            log.warning("OpenVINO cannot load the text detection model (%s): the text detector runs on ONNX Runtime", type(exc).__name__)
    try:
        return _OnnxRuntime(model, settings.threads)
    except Exception as exc:
        raise DetectorUnavailable(f"the text detection model cannot be loaded ({type(exc).__name__})") from None


class TextDetector:
    """Batched text detection on 8-bit RGB frames (N, rows, cols, 3).

    One runtime (OpenVINO or ONNX Runtime, :func:`_backend`) per detector; calls are
    serialised (an inference request is not used by two threads at once)."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        self.settings = settings or DetectorSettings()
        self.backend = _backend(self.settings)
        self._lock = threading.Lock()
        self.seconds = 0.0  # time spent in the model, for the benchmark's share of time

    def probability(self, frames: np.ndarray, scale: float | None = None, shape_varies: bool = False) -> np.ndarray:
        """(N, rows, cols, 3) uint8 -> (N, R, C) float32 text probability on the scaled
        grid (R, C multiples of 32, at least rows*scale, cols*scale). ``shape_varies``:
        a size not expected again (stacked crops), not worth a model of its own."""
        import time

        import cv2

        n, rows, cols = frames.shape[:3]
        s = scale or self.settings.scale
        sr, sc = max(1, round(rows * s)), max(1, round(cols * s))
        R, C = -(-sr // 32) * 32, -(-sc // 32) * 32
        out = np.empty((n, R, C), np.float32)
        step = self.settings.max_batch
        for i in range(0, n, step):
            chunk = frames[i : i + step]
            x = np.zeros((len(chunk), 3, R, C), np.float32)
            for j, f in enumerate(chunk):
                g = f if (sr, sc) == (rows, cols) else cv2.resize(f, (sc, sr), interpolation=cv2.INTER_LINEAR)
                x[j, :, :sr, :sc] = g.transpose(2, 0, 1)
            # (v / 255 - 0.5) / 0.5, as PP-OCR normalises; the padding stays at -1 (black)
            x[:, :, :sr, :sc] *= 2 / 255
            x[:, :, :sr, :sc] -= 1
            x[:, :, sr:, :] = -1
            x[:, :, :, sc:] = -1
            t0 = time.perf_counter()
            with self._lock:
                pred = self.backend.run(x, shape_varies)
            self.seconds += time.perf_counter() - t0
            out[i : i + len(chunk)] = pred[:, 0]
        return out

    def boxes(self, prob: np.ndarray, rows: int, cols: int, scale: float | None = None) -> list[Box]:
        """Text boxes of one probability map (from :meth:`probability` at ``scale``) in
        frame pixels."""
        import cv2

        st = self.settings
        sy = sx = 1 / (scale or st.scale)
        bitmap = (prob > st.thresh).astype(np.uint8)
        bitmap = cv2.dilate(bitmap, np.ones((2, 2), np.uint8))  # DB's use_dilation
        n, labels, stats, _ = cv2.connectedComponentsWithStats(bitmap, connectivity=8)
        out: list[Box] = []
        for i in range(1, n):
            x, y, w, h, _area = (int(v) for v in stats[i])
            if min(w, h) < st.min_side:
                continue
            window = labels[y : y + h, x : x + w] == i
            if float(prob[y : y + h, x : x + w][window].mean()) < st.box_thresh:
                continue
            d = w * h * st.unclip / (2 * (w + h))  # DB's unclip offset: area * ratio / perimeter
            top, left = int(np.floor((y - d) * sy)), int(np.floor((x - d) * sx))
            bottom, right = int(np.ceil((y + h + d) * sy)), int(np.ceil((x + w + d) * sx))
            box = (max(0, top), max(0, left), min(rows, bottom), min(cols, right))
            if box[0] < box[2] and box[1] < box[3]:
                out.append(box)
        return out

    def detect(self, frames: np.ndarray, scale: float | None = None, shape_varies: bool = False) -> list[list[Box]]:
        """Text boxes per frame of (N, rows, cols, 3) uint8 RGB frames (``shape_varies``:
        see :meth:`probability`)."""
        rows, cols = frames.shape[1:3]
        return [self.boxes(p, rows, cols, scale) for p in self.probability(frames, scale, shape_varies)]

    def detect_regions(self, frame: np.ndarray, regions: Sequence[Box], scale: float | None = None) -> list[Box]:
        """Text boxes found inside ``regions`` of one frame (rows, cols, 3), in frame
        pixels, the crops read at ``scale`` (the settings' by default).

        Used to verify a masked frame where it changed (the rest of the frame was
        already read in full and found clean) and to read the small-text view where it
        may hold text (:mod:`node.burnedin.small`)."""
        if not regions:
            return []
        gap = 16  # black rows between crops: no text line spans them
        width = max(r - l for _, l, _, r in regions)
        tops = np.cumsum([0] + [b - t + gap for t, _, b, _ in regions])
        canvas = np.zeros((1, int(tops[-1]), width, 3), np.uint8)  # crops stacked: one run, little padding
        for (top, left, bottom, right), y in zip(regions, tops):
            canvas[0, y : y + bottom - top, : right - left] = frame[top:bottom, left:right]
        found: list[Box] = []
        for t, l, b, r in self.detect(canvas, scale, shape_varies=True)[0]:
            k = int(np.searchsorted(tops, t, side="right")) - 1
            top, left, bottom, right = regions[k]
            y = int(tops[k])
            if t - y < bottom - top and l < right - left:
                found.append((max(top, t - y + top), l + left, min(b - y + top, bottom), min(r + left, right)))
        return found


_SHARED: dict[DetectorSettings, TextDetector] = {}
_SHARED_LOCK = threading.Lock()


def shared_detector(settings: DetectorSettings | None = None) -> TextDetector:
    """One detector per settings per process (the model takes about 0.1 s to load).

    Raises:
        DetectorUnavailable: see :func:`model_path`.
    """
    key = settings or DetectorSettings()
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = TextDetector(key)
            log.info("text detector ready (%s, scale %.2f, %s)", MODEL_FILE, key.scale, _SHARED[key].backend.name)
        return _SHARED[key]
