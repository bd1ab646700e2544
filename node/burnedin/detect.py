"""Text detection in frames: where text is, not what it says.

The model is PP-OCRv4's text detector (DB, "Real-time Scene Text Detection with
Differentiable Binarization", Liao et al., AAAI 2020), as shipped inside the
``rapidocr-onnxruntime`` wheel: nothing is downloaded at run time. It is run here
through ONNX Runtime directly rather than through RapidOCR's per-image pipeline, so
that the scale is chosen per reading and the probability map is at hand;
the post-processing (threshold, connected components, score, unclip) follows DB's,
with axis-aligned boxes, since what is masked is a rectangle anyway.

The network runs on OpenVINO's CPU plugin when the ``openvino`` package is installed
(a runtime dependency since 2026-11-30: about a fifth less CPU a reading than ONNX
Runtime on this model, the same probabilities to float rounding), else on ONNX
Runtime's CPU provider, which is logged (docs/burned-in.md, "The inference runtime").
Each reading runs in fp32 unless its detector's settings name it in ``bf16`` and the
CPU has native bf16 (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` says ``BF16``): then in
bf16, about half the CPU (docs/burned-in.md, "bf16 on OpenVINO").

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

# The readings of a frame, as node.burnedin.clean names them when it asks a detector
# (what each is: the module docstring there). DetectorSettings.bf16 takes these names.
READINGS = ("first", "re-read", "low-contrast", "second", "chroma", "small-text")


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
    # Frames given to one inference. 1 since 2026-12-01 (4, and 2 for VERIFIER, before):
    # every batch size is a shape of its own, with its own compiled model and buffers
    # (a cine's x3.0 pair of frames alone held about 0.6 GB), and on this model batching
    # saved no CPU measurable against the noise; the node's peak memory with one lane fell
    # from 4.1 to 1.8 GB, the masks of the 100-frame cine the same (docs/burned-in.md,
    # "One frame an inference").
    max_batch: int = 1
    # The graph's element-wise chains folded into its convolutions (node.burnedin.graph):
    # the same probabilities to float rounding, about a quarter less CPU a reading.
    fold: bool = True
    # "auto": OpenVINO when installed and the model compiles, else ONNX Runtime (logged);
    # "openvino" or "onnxruntime" to insist (the tests compare the two).
    backend: str = "auto"
    # Readings (of READINGS) this detector runs in bf16 where it can: on OpenVINO, on a
    # CPU with native bf16 (its OPTIMIZATION_CAPABILITIES hold "BF16"). Elsewhere they
    # run in fp32 (logged once): on ONNX Runtime, and on a CPU without native bf16, where
    # OpenVINO would run bf16 emulated on AVX-512 (no faster, and as far from fp32).
    # A reading is named here only after the 500 seeded frames and the 7 px tests came
    # out as in fp32 (docs/burned-in.md, "bf16 on OpenVINO").
    bf16: frozenset[str] = frozenset({"first", "re-read", "low-contrast"})

    def __post_init__(self) -> None:
        unknown = set(self.bf16) - set(READINGS)
        if unknown:
            raise ValueError(f"unknown reading(s) {sorted(unknown)} in bf16 (write some of {', '.join(READINGS)})")


# The second reading (clean.py) runs the same network tuned apart: scale 1.75 (2.0 until
# 2026-11-30: a quarter less CPU for that reading, the same recall and no leak on the 500
# seeded frames, one object more held back; docs/burned-in.md, "The two cores, the second
# reading at x1.75 and the small-text gate"; text of 7-11 px over speckle, which the first
# reading at 1.25 missed; 1.5 since 2026-11-30), lower thresholds, and its own session. It sees the masked frame only; what it finds that is
# not masked quarantines the object. Measured: docs/burned-in.md, "Second reading".
# Its readings run in bf16 where the CPU has it, as the first detector's: on the 500
# seeded frames the same recall, no token leaked, the same quarantines and two more (text
# really there, and a false alarm where fp32 masked speckle), and the 7 px tests pass
# (docs/burned-in.md, "bf16 on OpenVINO").
VERIFIER = DetectorSettings(scale=1.75, check_scale=1.0, thresh=0.2, box_thresh=0.4, max_batch=1,
                            bf16=frozenset({"second", "chroma", "small-text"}))


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

    def precision(self, asked: str) -> str:
        """What a reading asked in ``asked`` ("f32" or "bf16") runs in: always fp32 here
        (ONNX Runtime's CPU provider has no bf16 path for this model)."""
        return "f32"

    def run(self, x: np.ndarray, shape_varies: bool = False, precision: str = "f32") -> np.ndarray:
        """(N, 3, R, C) float32 -> (N, 1, R, C) float32 probabilities (fp32 whatever
        ``precision`` asks)."""
        return self.session.run(None, {self.input: x})[0]


class _OpenVino:
    """The detector's graph on OpenVINO's CPU plugin, in fp32 (INFERENCE_PRECISION_HINT
    f32, not the plugin's default bf16 on a CPU with native bf16) except for the
    readings asked in bf16 on such a CPU (:meth:`precision`).

    A model compiled for one input shape runs about a fifth faster than the
    dynamic-shape one, and compiling takes about 0.2 CPU s: a shape the step reads
    again (whole frames of one size at each scale) gets a static model of its own from
    its second reading on, the last STATIC of them kept; a shape seen once (a cine's
    batch of an odd size) and shapes that vary from call to call (the stacked crops of
    :meth:`TextDetector.detect_regions`) run on the dynamic-shape model. Models are
    kept per (shape, precision)."""

    name = "openvino"
    STATIC = 6  # static models kept per detector (each holds its own buffers: 30-300 MB at 640 x 480 x1.0-x3.0)

    def __init__(self, model: bytes | str, threads: int) -> None:
        import openvino as ov

        self._core = ov.Core()
        self._model = self._core.read_model(model) if isinstance(model, str) else self._core.read_model(model, b"")
        # Native bf16 (AVX512_BF16 or AMX): what the plugin itself takes as "BF16" in its
        # capabilities and makes its default precision on. Asked explicitly, OpenVINO
        # also runs bf16 on AVX-512 CPUs without it (emulated), which is not wanted here.
        self.native_bf16 = "BF16" in self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        # One stream, the given threads, no pinning (the cores are shared with the rest
        # of the node).
        self._config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        self._dynamic: dict[str, object] = {"f32": self._compile(self._model, "f32")}  # precision -> infer request
        self._static: dict[tuple[tuple[int, ...], str], object] = {}  # (shape, precision) -> infer request, oldest first
        self._seen: set[tuple[tuple[int, ...], str]] = set()  # whole-frame shapes read once so far
        self._warned = False

    def precision(self, asked: str) -> str:
        """What a reading asked in ``asked`` ("f32" or "bf16") runs in: bf16 only on a
        CPU with native bf16, fp32 otherwise."""
        return "bf16" if asked == "bf16" and self.native_bf16 else "f32"

    def _compile(self, model, precision: str):
        compiled = self._core.compile_model(model, "CPU", {**self._config, "INFERENCE_PRECISION_HINT": precision})
        return compiled.create_infer_request()

    def _request(self, shape: tuple[int, ...], shape_varies: bool, precision: str):
        key = (shape, precision)
        if shape_varies or (key not in self._static and key not in self._seen):
            if not shape_varies:
                if len(self._seen) >= 64:
                    self._seen.clear()
                self._seen.add(key)
            if precision not in self._dynamic:
                self._dynamic[precision] = self._compile(self._model, precision)
            return self._dynamic[precision]
        req = self._static.pop(key, None)
        if req is None:
            model = self._model.clone()
            model.reshape(list(shape))
            req = self._compile(model, precision)
            while len(self._static) >= self.STATIC:
                self._static.pop(next(iter(self._static)))
        self._static[key] = req  # most recent last
        return req

    def run(self, x: np.ndarray, shape_varies: bool = False, precision: str = "f32") -> np.ndarray:
        """(N, 3, R, C) float32 -> (N, 1, R, C) float32 probabilities, in ``precision``
        where :meth:`precision` allows it (fp32 otherwise, logged once)."""
        runs = self.precision(precision)
        if runs != precision and not self._warned:
            self._warned = True
            log.info("this CPU has no native bf16: the detector's readings asked in bf16 run in fp32")
        req = self._request(tuple(x.shape), shape_varies, runs)
        req.infer({0: x}, share_inputs=True)  # x is not changed while the request runs: no copy of it
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
        if self.settings.bf16 and self.backend.name != "openvino":
            log.info("the readings asked in bf16 (%s) run in fp32 on %s", ", ".join(sorted(self.settings.bf16)), self.backend.name)
        self._lock = threading.Lock()
        self.seconds = 0.0  # time spent in the model, for the benchmark's share of time

    def precision(self, reading: str) -> str:
        """What ``reading`` (one of READINGS) runs in on this detector: "bf16" when the
        settings name it in ``bf16`` and the runtime and CPU allow it, else "f32"."""
        return self.backend.precision("bf16" if reading in self.settings.bf16 else "f32")

    def probability(self, frames: np.ndarray, scale: float | None = None, shape_varies: bool = False, reading: str = "") -> np.ndarray:
        """(N, rows, cols, 3) uint8 -> (N, R, C) float32 text probability on the scaled
        grid (R, C multiples of 32, at least rows*scale, cols*scale). ``shape_varies``:
        a size not expected again (stacked crops), not worth a model of its own.
        ``reading``: which reading asks (READINGS; its precision, :meth:`precision`)."""
        import time

        import cv2

        n, rows, cols = frames.shape[:3]
        s = scale or self.settings.scale
        sr, sc = max(1, round(rows * s)), max(1, round(cols * s))
        R, C = -(-sr // 32) * 32, -(-sc // 32) * 32
        out = np.empty((n, R, C), np.float32)
        step = self.settings.max_batch
        precision = "bf16" if reading in self.settings.bf16 else "f32"
        for i in range(0, n, step):
            chunk = frames[i : i + step]
            x = np.empty((len(chunk), 3, R, C), np.float32)
            for j, f in enumerate(chunk):
                # A grey frame (the grey image's RGB view, the top-hat, chroma and
                # low-contrast views of a grey frame): one channel enlarged and
                # normalised, copied to the other two (the same values, a third of the work).
                grey = bool((f[..., 0] == f[..., 1]).all() and (f[..., 1] == f[..., 2]).all())
                g = np.ascontiguousarray(f[..., 0]) if grey else f
                if (sr, sc) != (rows, cols):
                    g = cv2.resize(g, (sc, sr), interpolation=cv2.INTER_LINEAR)
                planes = x[j, :1] if grey else x[j]
                planes[:, :sr, :sc] = g[None] if grey else g.transpose(2, 0, 1)
                # (v / 255 - 0.5) / 0.5, as PP-OCR normalises; the padding is -1 (black)
                planes[:, :sr, :sc] *= 2 / 255
                planes[:, :sr, :sc] -= 1
                if grey:
                    x[j, 1:, :sr, :sc] = planes[:, :sr, :sc]
            x[:, :, sr:, :] = -1
            x[:, :, :sr, sc:] = -1
            t0 = time.perf_counter()
            with self._lock:
                pred = self.backend.run(x, shape_varies, precision)
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
        out: list[Box] = []
        for y0, x0, labels, stats in _components(bitmap):
            for i in range(1, len(stats)):
                x, y, w, h, _area = (int(v) for v in stats[i])
                if min(w, h) < st.min_side:
                    continue
                window = labels[y : y + h, x : x + w] == i
                if float(prob[y0 + y : y0 + y + h, x0 + x : x0 + x + w][window].mean()) < st.box_thresh:
                    continue
                x, y = x + x0, y + y0
                d = w * h * st.unclip / (2 * (w + h))  # DB's unclip offset: area * ratio / perimeter
                top, left = int(np.floor((y - d) * sy)), int(np.floor((x - d) * sx))
                bottom, right = int(np.ceil((y + h + d) * sy)), int(np.ceil((x + w + d) * sx))
                box = (max(0, top), max(0, left), min(rows, bottom), min(cols, right))
                if box[0] < box[2] and box[1] < box[3]:
                    out.append(box)
        return out

    def detect(self, frames: np.ndarray, scale: float | None = None, shape_varies: bool = False, reading: str = "") -> list[list[Box]]:
        """Text boxes per frame of (N, rows, cols, 3) uint8 RGB frames (``shape_varies``,
        ``reading``: see :meth:`probability`)."""
        rows, cols = frames.shape[1:3]
        return [self.boxes(p, rows, cols, scale) for p in self.probability(frames, scale, shape_varies, reading)]

    def detect_regions(self, frame: np.ndarray, regions: Sequence[Box], scale: float | None = None, reading: str = "") -> list[Box]:
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
        for t, l, b, r in self.detect(canvas, scale, shape_varies=True, reading=reading)[0]:
            k = int(np.searchsorted(tops, t, side="right")) - 1
            top, left, bottom, right = regions[k]
            y = int(tops[k])
            if t - y < bottom - top and l < right - left:
                found.append((max(top, t - y + top), l + left, min(b - y + top, bottom), min(r + left, right)))
        return found


def _components(bitmap: np.ndarray):
    """The 8-connected components of a (rows, cols) uint8 bitmap, band by band: yields
    (top, left, labels, stats) for each run of rows that hold a set pixel (no component
    spans an empty row), labelled inside the bounding rectangle of that band's set
    pixels (``cv2.connectedComponentsWithStats``; label 0 the background, ``stats``
    relative to (top, left)). The same components as labelling the whole map, in a
    fraction of the time: a probability map at x3.0 is 2.8 million pixels of which
    about 1% are set, and labelling it whole took 25 ms."""
    import cv2

    rows_set = np.flatnonzero(bitmap.max(1))  # (cv2.reduce took a hundred times as long)
    if not len(rows_set):
        return
    breaks = np.flatnonzero(np.diff(rows_set) > 1)
    starts = np.concatenate(([rows_set[0]], rows_set[breaks + 1]))
    ends = np.concatenate((rows_set[breaks], [rows_set[-1]])) + 1
    for y0, y1 in zip(starts.tolist(), ends.tolist()):
        band = bitmap[y0:y1]
        x, _, w, _ = cv2.boundingRect(band)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(band[:, x : x + w]), connectivity=8)
        yield y0, x, labels, stats


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
            det = _SHARED[key]
            bf16 = sorted(r for r in key.bf16 if det.precision(r) == "bf16")
            log.info("text detector ready (%s, scale %.2f, %s, %s)", MODEL_FILE, key.scale, det.backend.name,
                     f"bf16 for {', '.join(bf16)}, fp32 for the rest" if bf16 else "fp32")
        return _SHARED[key]
