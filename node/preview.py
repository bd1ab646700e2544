"""PNG thumbnails of de-identified outputs (never of originals), for the dashboard.

The first frame, through the object's own Modality LUT and VOI LUT / window (PS3.3
C.11.1, C.11.2, as pydicom's ``apply_modality_lut`` / ``apply_voi_lut`` implement them),
scaled to 8 bits, MONOCHROME1 inverted, at most ``size`` pixels on its longer side.
Nothing is written to disk.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread


class PreviewError(Exception):
    """The output cannot be shown (no pixels, undecodable, gone)."""


def thumbnail_png(path: Path, size: int = 256) -> bytes:
    """A PNG of the object at ``path``.

    Raises:
        PreviewError: the file is gone, has no pixel data, or its pixels cannot be decoded.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = dcmread(path)
    except FileNotFoundError:
        raise PreviewError("the file is no longer in the outbox (delivered and removed)") from None
    except Exception as exc:
        raise PreviewError(f"unreadable ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise PreviewError("this object has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise PreviewError(f"pixels cannot be decoded ({type(exc).__name__})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples == 1:
        arr = apply_modality_lut(arr, ds).astype(np.float64)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            arr = apply_voi_lut(arr, ds, index=0).astype(np.float64)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        img8 = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            img8 = 255 - img8
        image = Image.fromarray(img8, "L")
    else:  # pydicom gives colour pixels as RGB (it converts YBR itself)
        image = Image.fromarray(np.asarray(arr, np.uint8), "RGB")
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
