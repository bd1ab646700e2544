"""DICOM pixels through the engine and back.

Forward: decode (any syntax pydicom decodes with pylibjpeg: JPEG baseline/extended/
lossless, JPEG-LS, JPEG 2000, RLE), Modality LUT, MONOCHROME1 inverted, VOI window (the
header's, else the 1st-99th percentile), aspect-preserving resize and pad to the model
size. Multi-frame objects go frame by frame. Inverse: crop the padding, resize to the
route's output grid, undo the window and the Modality LUT, back to the stored bit depth
and photometric interpretation.

The output is a new, derived instance: ImageType DERIVED, a DerivationDescription naming
the method and model, BurnedInAnnotation NO, Rows/Columns/PixelSpacing consistent with
the new pixels. Its header is then de-identified by the route's profile (pipeline).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from node.config import Route, Settings
from node.deid import Pseudonymizer

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


def _first(v, default: float) -> float:
    if v is None or v == "":
        return default
    try:
        return float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)
    except (TypeError, ValueError, IndexError):
        return default


def frames_of(ds: Dataset) -> np.ndarray:
    """Stored values as (frames, rows, cols); raises PixelError when it cannot."""
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in SUPPORTED_PHOTOMETRIC:
        raise PixelError(f"photometric interpretation {pi or '(absent)'} is not supported by the model (grayscale only)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PixelError("more than one sample per pixel")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise PixelError(f"cannot decode pixel data in {ds.file_meta.TransferSyntaxUID.name} ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise PixelError(f"unexpected pixel array shape {arr.shape}")
    return arr


def to_model(frame: np.ndarray, ds: Dataset, size: int) -> tuple[np.ndarray, Mapping]:
    """One frame of stored values -> (size x size float32 in [-1, 1], how to undo it)."""
    import torch
    from torch.nn import functional as F

    slope = _first(ds.get("RescaleSlope"), 1.0)
    intercept = _first(ds.get("RescaleIntercept"), 0.0)
    x = frame.astype(np.float64) * slope + intercept
    center, width = _first(ds.get("WindowCenter"), np.nan), _first(ds.get("WindowWidth"), np.nan)
    if not np.isfinite(center) or not np.isfinite(width) or width <= 1:
        lo, hi = np.percentile(x, [1, 99])
        if hi <= lo:
            hi = lo + 1
        low, width = float(lo), float(hi - lo)
    else:
        low = center - 0.5 - (width - 1) / 2  # PS3.3 C.11.2.1.2 linear window
        width = width - 1
    y = np.clip((x - low) / width, 0.0, 1.0) * 2 - 1
    invert = str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
    if invert:
        y = -y
    h, w = y.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(y.astype(np.float32))[None, None]
    r = F.interpolate(t, size=(nh, nw), mode="area") if scale < 1 else F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
    out = np.full((size, size), -1.0 if not invert else 1.0, np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = r[0, 0].numpy()
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return out, Mapping(slope, intercept, low, width, invert, (h, w), (top, left, nh, nw), bits, signed, frame.dtype)


def from_model(y: np.ndarray, m: Mapping, grid: str = "model") -> np.ndarray:
    """Model output (size x size in [-1, 1]) -> stored values on the model or original grid."""
    import torch
    from torch.nn import functional as F

    top, left, nh, nw = m.box
    y = y[top : top + nh, left : left + nw]
    if grid == "original" and (nh, nw) != m.shape:
        t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None, None]
        y = F.interpolate(t, size=m.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    y = y.astype(np.float64)
    if m.invert:
        y = -y
    x = (np.clip(y, -1, 1) + 1) / 2 * m.width + m.low
    stored = (x - m.intercept) / m.slope
    lo, hi = (-(1 << (m.bits_stored - 1)), (1 << (m.bits_stored - 1)) - 1) if m.signed else (0, (1 << m.bits_stored) - 1)
    return np.clip(np.rint(stored), lo, hi).astype(m.dtype)


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
            info[name] = {**model.describe(), "image_size": model.image_size}  # type: ignore[attr-defined]
        for name, err in self.errors.items():
            info[name] = {"backend": "unavailable", "device": "", "why": err}
        path = self.settings.node.data_dir / "models.json"
        path.write_text(json.dumps(info, indent=1))

    def _load(self, name: str) -> None:
        from engine import load_model

        try:
            ms = self.settings.model(name)
            model = load_model(ms.path, backend=ms.backend, max_batch=ms.batch_size)
            s = model.image_size
            model.anonymize(np.zeros((1, 1, s, s), np.float32), seed=0)
            self.models[name] = model
            self.meta[name] = model.bundle.meta
            log.info("model %s ready: %s", name, model.describe()["runner"])
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("model %s could not be loaded: %s", name, self.errors[name])

    def available(self, route: Route) -> str | None:
        if route.model in self.models:
            return None
        return self.errors.get(route.model, f"model {route.model!r} is not loaded")

    def process(self, items: Sequence, route: Route, pseudo: Pseudonymizer) -> None:
        model = self.models[route.model]
        meta = self.meta[route.model]
        size = model.image_size  # type: ignore[attr-defined]
        modalities = set(meta.get("modalities", ["CR", "DX"]))
        inputs, noises, where = [], [], []
        prepared: dict[int, tuple[Dataset, np.ndarray, list[Mapping]]] = {}
        for k, it in enumerate(items):
            ds = it.source
            try:
                mod = str(ds.get("Modality", ""))
                if mod not in modalities:
                    raise PixelError(f"modality {mod or '(absent)'} is not one the model was trained for ({', '.join(sorted(modalities))})")
                frames = frames_of(ds)
                maps = []
                for f_idx, frame in enumerate(frames):
                    x, m = to_model(frame, ds, size)
                    inputs.append(x)
                    maps.append(m)
                    seed = pseudo.seed(f"{ds.SOPInstanceUID}/{f_idx}/{route.model}")
                    noises.append(model.identity_noise(1, seed)[0])  # type: ignore[attr-defined]
                    where.append((k, f_idx))
                prepared[k] = (ds, frames, maps)
            except PixelError as exc:
                it.error = str(exc)
        if not inputs:
            return
        x = np.stack(inputs)[:, None]
        with self._lock:  # one inference at a time per model
            anon = model.anonymize(x, noise=np.stack(noises))  # type: ignore[attr-defined]
            cf = None
            if route.counterfactuals:
                med, _, _ = model.encode(x)  # type: ignore[attr-defined]
                protos = np.asarray(meta["prototypes"], np.float32)
                pred = ((med[:, None] - protos[None]) ** 2).sum(-1).argmin(1)
                target = (pred + 1) % len(protos)
                cf = (model.counterfactual(x, target), target)  # type: ignore[attr-defined]
        classes = meta.get("classes", [])
        model_id = f"{route.model} ({meta.get('name', '')} {hashlib.sha256(json.dumps(meta.get('model_config', {}), sort_keys=True).encode()).hexdigest()[:8]})"
        by_item: dict[int, list[int]] = {}
        for row, (k, _) in enumerate(where):
            by_item.setdefault(k, []).append(row)
        for k, rows in by_item.items():
            ds, frames, maps = prepared[k]
            it = items[k]
            new = [from_model(anon[r, 0], maps[i], route.output_size) for i, r in enumerate(rows)]
            it.outputs.append(("anonymized", derived(ds, new, maps, route.output_size, pseudo, "anonymized", model_id)))
            if cf is not None:
                imgs, targets = cf
                new_cf = [from_model(imgs[r, 0], maps[i], route.output_size) for i, r in enumerate(rows)]
                name = classes[int(targets[rows[0]])] if classes else str(int(targets[rows[0]]))
                it.outputs.append(("counterfactual", derived(ds, new_cf, maps, route.output_size, pseudo, "counterfactual", model_id, name)))


def derived(src: Dataset, frames: list[np.ndarray], maps: list[Mapping], grid: str, pseudo: Pseudonymizer, kind: str, model_id: str, target: str = "") -> Dataset:
    """A new instance holding ``frames``; UIDs are still the source's, derived per kind,
    and are replaced by pseudonyms when the route's header profile runs."""
    ds = Dataset()
    ds.file_meta = copy.deepcopy(src.file_meta) if hasattr(src, "file_meta") else FileMetaDataset()
    for tag, elem in src._dict.items():
        if tag == 0x7FE00010 or (tag >> 24) == 0x60 or tag == 0x00280008:
            continue  # old pixels, overlays drawn on them, and the old frame count
        # Raw (not yet decoded) elements are immutable and decoded per dataset, so they
        # can be shared; decoded ones are copied, so that outputs of one source never
        # share a mutable element.
        ds._dict[tag] = elem if isinstance(elem, RawDataElement) else copy.deepcopy(elem)
    ds.set_original_encoding(*src.original_encoding, src.original_character_set)
    ds.SOPInstanceUID = pseudo.uid(f"{src.SOPInstanceUID}/{kind}")
    if kind == "counterfactual":
        ds.SeriesInstanceUID = pseudo.uid(f"{src.get('SeriesInstanceUID', '')}/counterfactual")
        ds.SeriesDescription = f"COUNTERFACTUAL {target}".strip()[:64]
        ds.SeriesNumber = int(src.get("SeriesNumber", 0) or 0) + 1000
    rows, cols = frames[0].shape
    ds.Rows, ds.Columns = rows, cols
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    h, w = maps[0].shape
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        sp = src.get(kw)
        if sp is not None and getattr(sp, "__len__", None) and len(sp) == 2:
            ds[kw].value = [f"{float(sp[0]) * h / rows:.6g}", f"{float(sp[1]) * w / cols:.6g}"]
    ds.ImageType = ["DERIVED", "SECONDARY"] + list(src.get("ImageType", ["", ""])[2:])
    desc = f"casemask {kind}: {METHOD}; model {model_id}"
    if kind == "counterfactual":
        desc += f"; medical features moved to {target}"
    ds.DerivationDescription = desc[:1024]
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = src.get("LossyImageCompression", "00")
    for kw in ("SourceImageSequence", "ReferencedImageSequence", "IconImageSequence"):
        if kw in ds:
            del ds[kw]
    data = np.stack(frames) if len(frames) > 1 else frames[0]
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    if ds.BitsAllocated == 8:
        ds["PixelData"].VR = "OB"
    else:
        ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
