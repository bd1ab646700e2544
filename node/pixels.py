"""DICOM pixels through the engine and back (NumPy and ONNX Runtime; no PyTorch).

Forward: decode (any syntax pydicom decodes with pylibjpeg: JPEG baseline/extended/
lossless, JPEG-LS, JPEG 2000, RLE), Modality LUT, MONOCHROME1 inverted, VOI window (the
header's, else the 1st-99th percentile), aspect-preserving resize and pad to the model
size. Multi-frame objects go frame by frame. Inverse: crop the padding, (with
``output_size = "upsampled"``) enlarge bilinearly to the original grid, undo the window
and the Modality LUT, back to the stored bit depth and photometric interpretation.

Every image is judged by the model's gates (``engine.gates``: input in the model's
domain, medical content kept, identity moved) before anything of it may leave; a failed
gate quarantines the object with the gate's name and scores, and the scores of every
object go into its job record.

The output is a new, derived instance: ImageType DERIVED, a DerivationDescription saying
it was synthesised, at what size and by which model (name and weights digest),
BurnedInAnnotation NO, Rows/Columns/PixelSpacing consistent with the new pixels. Its
header is then de-identified by the route's profile (pipeline).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset, config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import IS, DSfloat, PersonName

from engine.gates import DRAWS, summarize
from engine.imaging import fit_box, resize
from node import metrics
from node.config import Route, Settings
from node.deid import Pseudonymizer
from node.wire import peek, peek_float, peek_str, peek_strs, tag_vr

log = logging.getLogger(__name__)

SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2"}
METHOD = "disentanglement identity swap (Montenegro & Cardoso, arXiv 2311.04833)"


class PixelError(Exception):
    """This object cannot go through the model (quarantine with this reason)."""


@dataclasses.dataclass
class Mapping:
    """How one frame went from stored values to model input, to undo it afterwards."""

    slope: float
    intercept: float
    low: float  # window bottom, in modality units
    width: float
    invert: bool
    shape: tuple[int, int]  # original rows, cols
    box: tuple[int, int, int, int]  # top, left, height, width of the content in the model grid
    bits_stored: int
    signed: bool
    dtype: np.dtype

    def coefficients(self) -> tuple[float, float]:
        """(a, b) with model input = clip(a * stored + b, -1, 1)."""
        a = 2 * self.slope / self.width
        b = 2 * (self.intercept - self.low) / self.width - 1
        return (-a, -b) if self.invert else (a, b)


_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def frames_of(ds: Dataset) -> np.ndarray:
    """Stored values as (frames, rows, cols); raises PixelError when it cannot."""
    pi = peek_str(ds, "PhotometricInterpretation")
    if pi not in SUPPORTED_PHOTOMETRIC:
        raise PixelError(f"photometric interpretation {pi or '(absent)'} is not supported by the model (grayscale only)")
    if int(peek_float(ds, "SamplesPerPixel", 1)) != 1:
        raise PixelError("more than one sample per pixel")
    arr = _native_frames(ds)
    if arr is None:
        from node.deid.burned_in import decoded_size_problem

        too_large = decoded_size_problem(ds)
        if too_large:
            raise PixelError(f"pixel data not decoded: {too_large}")
        try:
            arr = ds.pixel_array
        except Exception as exc:
            raise PixelError(f"cannot decode pixel data in {ds.file_meta.TransferSyntaxUID.name} ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise PixelError(f"unexpected pixel array shape {arr.shape}")
    return arr


def _native_frames(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian 8/16-bit grayscale read straight from the buffer, as
    pydicom's own decoder returns it (unused high bits cleared or sign-extended); None for
    anything else, which goes through ``ds.pixel_array``."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE:
        return None
    allocated, stored = int(peek_float(ds, "BitsAllocated", 0)), int(peek_float(ds, "BitsStored", 0))
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        return None
    signed = peek_float(ds, "PixelRepresentation", 0) == 1
    rows, cols = int(peek_float(ds, "Rows", 0)), int(peek_float(ds, "Columns", 0))
    n = int(peek_float(ds, "NumberOfFrames", 1) or 1)
    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}")
    data = peek(ds, "PixelData")
    if not isinstance(data, bytes):
        return None
    if not rows or not cols or len(data) < n * rows * cols * dtype.itemsize:
        return None
    arr = np.frombuffer(data, dtype, n * rows * cols).reshape(n, rows, cols)
    if stored < allocated:  # bits above BitsStored are not part of the value
        shift = allocated - stored
        arr = (arr << shift) >> shift if signed else arr & dtype.type((1 << stored) - 1)
    return arr


def _percentiles(frame: np.ndarray, low_q: float, high_q: float) -> tuple[float, float]:
    """np.percentile (linear) of an integer frame from its histogram: same values, a
    fraction of the time of a sort."""
    if frame.dtype.kind not in "ui" or frame.dtype.itemsize > 2:
        lo, hi = np.percentile(frame, [low_q, high_q])
        return float(lo), float(hi)
    flat = frame.ravel()
    base = int(flat.min())
    cum = np.cumsum(np.bincount(flat.astype(np.int32) - base))
    n = flat.size

    def at(q: float) -> float:
        r = (n - 1) * q / 100
        i = int(np.floor(r))
        v0 = int(np.searchsorted(cum, i, side="right"))
        v1 = int(np.searchsorted(cum, min(i + 1, n - 1), side="right"))
        return base + v0 + (r - i) * (v1 - v0)

    return at(low_q), at(high_q)


def mapping_for(frame: np.ndarray, ds: Dataset, size: int) -> Mapping:
    """The value and geometry mapping of one frame of ``ds`` into a size x size input."""
    slope = peek_float(ds, "RescaleSlope", 1.0)
    if slope == 0 or not np.isfinite(slope):
        raise PixelError(f"RescaleSlope {slope:g} cannot be inverted")
    intercept = peek_float(ds, "RescaleIntercept", 0.0)
    center, width = peek_float(ds, "WindowCenter", np.nan), peek_float(ds, "WindowWidth", np.nan)
    if not np.isfinite(center) or not np.isfinite(width) or width <= 1:
        # 1st to 99th percentile of the modality values; percentiles commute with the
        # (monotone, linear) Modality LUT, so take them on the stored values.
        p_lo, p_hi = _percentiles(frame, 1, 99)
        lo, hi = sorted((p_lo * slope + intercept, p_hi * slope + intercept))
        if hi <= lo:
            hi = lo + 1
        low, width = lo, hi - lo
    else:
        low = center - 0.5 - (width - 1) / 2  # PS3.3 C.11.2.1.2 linear window
        width = width - 1
    invert = peek_str(ds, "PhotometricInterpretation") == "MONOCHROME1"
    h, w = frame.shape
    top, left, nh, nw = fit_box(h, w, size)
    bits = int(peek_float(ds, "BitsStored", 16))
    signed = peek_float(ds, "PixelRepresentation", 0) == 1
    return Mapping(slope, intercept, low, width, invert, (h, w), (top, left, nh, nw), bits, signed, frame.dtype)


def to_model_batch(frames: Sequence[np.ndarray], maps: Sequence[Mapping], size: int) -> np.ndarray:
    """Frames of stored values -> (N, size, size) float32 in [-1, 1]: window, invert,
    aspect-preserving resize (area when shrinking, bilinear when growing:
    ``engine.imaging.resize``), pad with -1 (black in the model's MONOCHROME2 space).

    The window is linear up to its clipping, and so is the resize: a frame is clipped
    in stored values while it is converted to float, resized, and only then mapped, so
    the large arrays see two passes instead of five. Frames of one shape go together."""
    out = np.full((len(frames), size, size), -1.0, np.float32)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(maps):
        groups.setdefault((m.shape, m.box), []).append(i)
    for (_, (top, left, nh, nw)), idx in groups.items():
        ab = np.array([maps[i].coefficients() for i in idx], np.float64)
        a, b = ab[:, 0], ab[:, 1]
        bounds = np.sort(np.stack([(-1 - b) / a, (1 - b) / a], 1), 1)  # stored values at -1 and +1
        t = np.empty((len(idx), *frames[idx[0]].shape), dtype=np.float32)
        for j, i in enumerate(idx):  # convert and clip in one pass
            np.clip(frames[i], bounds[j, 0], bounds[j, 1], out=t[j], casting="unsafe")
        t = resize(t, nh, nw)
        t *= a.astype(np.float32)[:, None, None]
        t += b.astype(np.float32)[:, None, None]
        out[idx, top : top + nh, left : left + nw] = np.clip(t, -1.0, 1.0, out=t)
    return out


def to_model(frame: np.ndarray, ds: Dataset, size: int) -> tuple[np.ndarray, Mapping]:
    """One frame of stored values -> (size x size float32 in [-1, 1], how to undo it)."""
    m = mapping_for(frame, ds, size)
    return to_model_batch([frame], [m], size)[0], m


def from_model_batch(ys: np.ndarray, maps: Sequence[Mapping], grid: str = "model") -> list[np.ndarray]:
    """Model outputs (N x size x size in [-1, 1]) -> stored values, one array per frame,
    on the model grid (the padding cropped) or, with ``grid="upsampled"``, enlarged
    bilinearly to the original one (no detail the model grid lacks). Frames that share a
    geometry and a stored format are mapped together."""
    out: list[np.ndarray] = [None] * len(maps)  # type: ignore[list-item]
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(maps):
        groups.setdefault((m.box, m.shape, m.bits_stored, m.signed, m.dtype), []).append(i)
    for (box, shape, bits, signed, dtype), idx in groups.items():
        top, left, nh, nw = box
        y = ys[idx, top : top + nh, left : left + nw]
        if grid == "upsampled" and (nh, nw) != shape:
            y = resize(np.ascontiguousarray(y, dtype=np.float32), *shape)
        # stored = ((clip(±y) + 1) / 2 * width + low - intercept) / slope = a * clip(y) + b
        a = np.array([m.width / 2 / m.slope * (-1 if m.invert else 1) for m in (maps[i] for i in idx)])[:, None, None]
        b = np.array([(m.width / 2 + m.low - m.intercept) / m.slope for m in (maps[i] for i in idx)])[:, None, None]
        stored = np.clip(y, -1, 1).astype(np.float64) * a + b
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        stored = np.clip(np.rint(stored, out=stored), lo, hi, out=stored).astype(dtype)
        for j, i in enumerate(idx):
            out[i] = stored[j]
    return out


def from_model(y: np.ndarray, m: Mapping, grid: str = "model") -> np.ndarray:
    """Model output (size x size in [-1, 1]) -> stored values on the model grid or upsampled to the original's."""
    return from_model_batch(y[None], [m], grid)[0]


def route_models(settings: Settings) -> list[dict]:
    """For each route: its pixel step, and for ``pixels = "anonymize"`` the bundle it runs
    (name, path, weights digest) and what the bundle says it is fit for (``intended_use``,
    ``training_data``). For ``casemask status`` and the startup log."""
    from engine.bundle import BundleError
    from engine.bundle import load as load_bundle

    out = []
    for r in settings.routes:
        entry: dict = {"route": r.name, "pixels": r.pixels}
        if r.pixels == "anonymize":
            ms = settings.model(r.model)
            entry.update(model=r.model, path=ms.path, output_size=r.output_size, allow_demonstration_model=r.allow_demonstration_model)
            try:
                b = load_bundle(ms.path)
                entry.update(bundle=b.name, weights=b.weights_digest(), intended_use=b.intended_use, training_data=b.meta.get("training_data", {}))
            except (BundleError, OSError, ValueError) as exc:
                entry["error"] = str(exc)
        out.append(entry)
    return out


def describe_route(entry: dict) -> str:
    """One line about a :func:`route_models` entry."""
    if entry["pixels"] != "anonymize":
        return f"route {entry['route']}: headers only (pixels = {entry['pixels']})"
    if "error" in entry:
        return f"route {entry['route']}: pixels anonymized by model {entry['model']} ({entry['path']}): {entry['error']}"
    use = entry["intended_use"]
    flag = ", allowed by allow_demonstration_model" if entry["allow_demonstration_model"] else ""
    return (f"route {entry['route']}: pixels anonymized by model {entry['model']} = bundle {entry['bundle']} ({entry['path']}, weights {entry['weights']}); "
            f"intended use: {use['kind']}{flag}: {use['summary']}")


class EnginePixelStep:
    """The pipeline's pixel step, backed by engine models loaded once at start."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, object] = {}
        self.errors: dict[str, str] = {}
        self.meta: dict[str, dict] = {}
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Load every model a route uses and run one batch, so the first study is fast."""
        names = {r.model for r in self.settings.routes if r.pixels == "anonymize"}
        for name in sorted(names):
            self._load(name)
        info = {}
        for name, model in self.models.items():
            b = model.bundle  # type: ignore[attr-defined]
            info[name] = {**model.describe(), "image_size": model.image_size, "name": b.name,  # type: ignore[attr-defined]
                          "weights": b.weights_digest(), "intended_use": b.intended_use}
        for name, err in self.errors.items():
            info[name] = {"backend": "unavailable", "device": "", "why": err}
        path = self.settings.node.data_dir / "models.json"
        path.write_text(json.dumps(info, indent=1))

    def _load(self, name: str) -> None:
        from engine import load_model

        try:
            ms = self.settings.model(name)
            # Idle ONNX Runtime workers sleep: the node's other threads need the cores.
            model = load_model(ms.path, backend=ms.backend, max_batch=ms.batch_size, spin=False, **ms.engine_options())
            s = model.image_size
            model.anonymize_checked(np.zeros((1, 1, s, s), np.float32), model.identity_noise(1, 0), np.zeros(1, np.int64))
            self.models[name] = model
            self.meta[name] = model.bundle.meta
            use = model.bundle.intended_use
            log.info("model %s ready: bundle %s (weights %s), intended use: %s (%s); %s", name, model.bundle.name,
                     model.bundle.weights_digest(), use["kind"], use["summary"], model.describe()["runner"])
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("model %s could not be loaded: %s", name, self.errors[name])

    def available(self, route: Route) -> str | None:
        if route.model in self.models:
            return None
        return self.errors.get(route.model, f"model {route.model!r} is not loaded")

    def process(self, items: Sequence, route: Route, pseudo: Pseudonymizer) -> None:
        """Anonymize every frame of ``items`` (and make counterfactuals where the route asks),
        let the gates judge each, and give each item either its derived datasets or the
        first failed gate's reason; every item that reached the gates gets their scores
        in ``notes["gates"]``."""
        model = self.models[route.model]
        meta = self.meta[route.model]
        size = model.image_size  # type: ignore[attr-defined]
        modalities = set(meta.get("modalities", ["CR", "DX"]))
        inputs: list[np.ndarray] = []
        all_maps: list[Mapping] = []
        noises, where, keys = [], [], []
        prepared: dict[int, tuple[Dataset, np.ndarray, list[Mapping]]] = {}
        for k, it in enumerate(items):
            ds = it.source
            try:
                mod = peek_str(ds, "Modality")
                if mod not in modalities:
                    raise PixelError(f"modality {mod or '(absent)'} is not one the model was trained for ({', '.join(sorted(modalities))})")
                frames = frames_of(ds)
                maps = [mapping_for(frame, ds, size) for frame in frames]
            except PixelError as exc:
                it.error = str(exc)
                continue
            uid = peek_str(ds, "SOPInstanceUID")
            for f_idx, (frame, m) in enumerate(zip(frames, maps)):
                inputs.append(frame)
                all_maps.append(m)
                keys.append(f"{uid}/{f_idx}/{route.model}")
                noises.append(model.identity_noise(1, pseudo.seed(keys[-1]))[0])  # type: ignore[attr-defined]
                where.append((k, f_idx))
            prepared[k] = (ds, frames, maps)
        if not inputs:
            return
        x = to_model_batch(inputs, all_maps, size)[:, None]

        def redraw(attempt: int, rows: np.ndarray) -> np.ndarray:  # another identity, as stable as the first
            return np.stack([model.identity_noise(1, pseudo.seed(f"{keys[r]}/draw{attempt}"))[0] for r in rows])  # type: ignore[attr-defined]

        with self._lock:  # one inference at a time per model
            with metrics.timed("engine", metrics.ENGINE_BATCH_SECONDS):
                checked = model.anonymize_checked(x, np.stack(noises), counterfactuals=route.counterfactuals, redraw=redraw, draws=DRAWS)  # type: ignore[attr-defined]
        classes = meta.get("classes", [])
        bundle = model.bundle  # type: ignore[attr-defined]
        model_id = f"{bundle.name} {bundle.weights_digest()}"
        by_item: dict[int, list[int]] = {}
        for row, (k, _) in enumerate(where):
            by_item.setdefault(k, []).append(row)
        passed_rows = [r for rows in by_item.values() if all(checked.verdicts[r].passed for r in rows) for r in rows]
        back = dict(zip(passed_rows, from_model_batch(checked.anonymized[passed_rows, 0], [all_maps[r] for r in passed_rows], route.output_size)))
        back_cf = {}
        if checked.counterfactual is not None:
            back_cf = dict(zip(passed_rows, from_model_batch(checked.counterfactual[passed_rows, 0], [all_maps[r] for r in passed_rows], route.output_size)))
        for k, rows in by_item.items():
            ds, frames, maps = prepared[k]
            it = items[k]
            verdicts = [checked.verdicts[r] for r in rows]
            it.notes["gates"] = {"model": route.model, "bundle": bundle.name, "weights": bundle.weights_digest(), **summarize(verdicts)}
            failed = next((v for v in verdicts if not v.passed), None)
            if failed is not None:
                it.error = failed.reason()
                continue
            synth = f"synthesised at {size}x{size} by model {model_id}"
            it.outputs.append(("anonymized", derived(ds, [back[r] for r in rows], maps, route.output_size, pseudo, "anonymized", synth)))
            if checked.counterfactual is not None:
                target = int(checked.targets[rows[0]])
                name = classes[target] if classes else str(target)
                it.outputs.append(("counterfactual", derived(ds, [back_cf[r] for r in rows], maps, route.output_size, pseudo, "counterfactual", synth, name)))


_NOT_COPIED = frozenset((0x7FE00010, 0x00280008))
_IMMUTABLE = (str, int, float, bytes, type(None), PersonName)


def _clone(elem):
    """A copy of ``elem`` that the header step may change without touching the source.

    Raw (not yet decoded) elements are immutable tuples decoded per dataset, so they are
    shared; decoded elements are new objects, and only values that can be changed in
    place (sequences, multi-values) are copied deeply."""
    if isinstance(elem, RawDataElement):
        return elem
    value = elem.value
    if isinstance(value, _IMMUTABLE):
        new = DataElement.__new__(DataElement)
        new.__dict__.update(elem.__dict__)
        return new
    if isinstance(value, MultiValue) and all(isinstance(v, _IMMUTABLE) for v in value):
        new = DataElement.__new__(DataElement)
        new.__dict__.update(elem.__dict__)
        new._value = MultiValue(value._constructor, value)
        return new
    return copy.deepcopy(elem)


_NUMBER_TYPES = {"DS": DSfloat, "IS": IS}


def _element(keyword: str, value) -> DataElement:
    """An element the pixel step authors, its value built in pydicom's own types.

    The values are known valid, so pydicom's generic conversion and validation (5 to 15
    us an element) are skipped: this runs a dozen times per image."""
    tag, vr = tag_vr(keyword)
    number = _NUMBER_TYPES.get(vr)
    if isinstance(value, list):
        value = MultiValue(number or str, value)
    elif number is not None:
        value = number(value)
    elif vr == "UI":
        value = UID(value)
    return DataElement(tag, vr, value, already_converted=True, validation_mode=config.IGNORE)


_DROPPED = frozenset(tag_for_keyword(kw) for kw in ("SourceImageSequence", "ReferencedImageSequence", "IconImageSequence"))


def derived(src: Dataset, frames: list[np.ndarray], maps: list[Mapping], grid: str, pseudo: Pseudonymizer, kind: str, synth: str, target: str = "") -> Dataset:
    """A new instance holding ``frames``; UIDs are still the source's, derived per kind,
    and are replaced by pseudonyms when the route's header profile runs. ``synth`` says
    at what size and by which model the image was synthesised; on the ``upsampled`` grid
    the description says so too, and SpatialResolution gives the model grid's pixel size.

    Built element by element rather than through attribute assignment: this runs once
    per image and per kind, and pydicom's per-assignment checks would cost more than
    the model's inference of the image."""
    ds = Dataset()
    meta = FileMetaDataset()
    for tag, elem in getattr(src, "file_meta", {}).items():
        meta._dict[tag] = _clone(elem)
    ds.file_meta = meta
    out = ds._dict
    for tag, elem in src._dict.items():
        if tag in _NOT_COPIED or tag in _DROPPED or (tag >> 24) == 0x60:
            continue  # old pixels and frame count, overlays drawn on them, references to originals
        out[tag] = _clone(elem)
    ds.set_original_encoding(*src.original_encoding, src.original_character_set)

    def put(keyword: str, value) -> None:
        e = _element(keyword, value)
        out[e.tag] = e

    uid = pseudo.uid(f"{peek_str(src, 'SOPInstanceUID')}/{kind}")
    put("SOPInstanceUID", uid)
    if kind == "counterfactual":
        put("SeriesInstanceUID", pseudo.uid(f"{peek_str(src, 'SeriesInstanceUID')}/counterfactual"))
        put("SeriesDescription", f"COUNTERFACTUAL {target}".strip()[:64])
        put("SeriesNumber", int(peek_float(src, "SeriesNumber", 0)) + 1000)
    rows, cols = frames[0].shape
    put("Rows", rows)
    put("Columns", cols)
    if len(frames) > 1:
        put("NumberOfFrames", len(frames))
    h, w = maps[0].shape
    _, _, nh, nw = maps[0].box
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        sy, sx = peek_float(src, kw, np.nan, 0), peek_float(src, kw, np.nan, 1)
        if np.isfinite(sy) and np.isfinite(sx):
            put(kw, [f"{sy * h / rows:.6g}", f"{sx * w / cols:.6g}"])
            if kw == "PixelSpacing" and (rows, cols) != (nh, nw) and sy > 0:
                put("SpatialResolution", f"{max(sy * h / nh, sx * w / nw):.6g}")
    put("ImageType", ["DERIVED", "SECONDARY"] + peek_strs(src, "ImageType")[2:])
    desc = f"casemask {kind}: {synth}"
    if (rows, cols) != (nh, nw):
        desc += f", upsampled to {rows}x{cols} (no detail finer than the {nh}x{nw} model grid)"
    if kind == "counterfactual":
        desc += f"; medical features moved to {target}"
    desc += f"; {METHOD}; gates passed: domain, medical, identity"
    put("DerivationDescription", desc[:1024])
    put("BurnedInAnnotation", "NO")
    put("RecognizableVisualFeatures", "NO")
    put("LossyImageCompression", peek_str(src, "LossyImageCompression", "00"))
    data = np.stack(frames) if len(frames) > 1 else frames[0]
    pixels = _element("PixelData", np.ascontiguousarray(data).tobytes())
    pixels.VR = "OB" if data.dtype.itemsize == 1 else "OW"
    out[pixels.tag] = pixels
    for e in (_element("TransferSyntaxUID", ExplicitVRLittleEndian), _element("MediaStorageSOPInstanceUID", uid)):
        meta._dict[e.tag] = e
    return ds
