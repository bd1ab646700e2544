"""Clean burned-in text out of one dataset's pixels, or say why it cannot be done.

For each object, in order:

1. pixels as stored: native data is read from its buffer; compressed data is decoded
   with pydicom's maintained plugins (``pydicom.pixels.decompress``: YBR from JPEG comes
   back as RGB) and written back uncompressed (Explicit VR Little Endian), never lossy
   again;
2. the region rules' rectangles (:mod:`node.burnedin.regions`) are blanked on every frame;
3. text is detected (:mod:`node.burnedin.detect`) on an 8-bit RGB view of the frames:
   every frame of a short object; for a cine, a sample of frames plus every frame that
   differs from the sample outside the moving image area (a cine's overlay is static);
4. the second reading: the same frames are read by a second detector session tuned
   apart from the first (:data:`node.burnedin.detect.VERIFIER`: twice the resolution,
   lower thresholds), on the frame as shown and, for colour frames, on its chroma
   (coloured overlays on a grey image), and its boxes are compared with the first
   reading's by geometry: a box that touches a mask and sticks out of it is the rest
   of a line the first box cut short, and is masked too; a line of text away from
   every mask is text the first reading missed;
5. every box is grown along its line while the strip beside it holds the line's ink
   value (:func:`node.burnedin.ink.extend_along_ink`), then masked, with a margin, on every frame (the union: text found on one
   frame of a cine is blanked on all);
6. verification, on each frame read in 3.: the masked areas and their surroundings are
   read again (pieces of text next to a mask are masked too, twice at most), except on
   8-bit frames (native or from RLE) the small-text reading below reads (since
   2026-11-30: it reads the masked frame whole and masks what touches a mask, and the
   ink reading follows), the
   whole frame is read once
   more through a low-contrast view (dark values lifted) that finds faint text the
   first reading may miss.
   Then the small-text reading (:mod:`node.burnedin.small`): the second detector on the
   masked frame's white top-hat (thin bright marks on black) at scale 3, whole, where
   thin marks are dense enough somewhere to be a line of 7 px text, which no other
   reading sees; same rules (beside a mask: masked; a line of small text elsewhere:
   missed). On the frames it reads (most ultrasound frames have such a place) it is
   also the network's reading of the masked frame as a whole, where what the
   surroundings of a line hid can come up once the other lines are masked: the second
   detector's own reading of the masked frame at x2.0 was dropped for it on 2026-11-30
   (docs/burned-in.md, "Folding the detector's graph").
   Then the classical ink reading (:mod:`node.burnedin.ink`: flat strokes of one
   value, no network) looks at the masked frames: ink beside a mask (the rest of its
   line) is masked too, ink away from every mask is text both readings missed.
   Text left after 6., text missed (4. or 6.), or a frame either detector cannot
   process raises :class:`BurnedInError` and the object is quarantined.

Pixels outside the masked rectangles keep their stored values bit for bit (native data
is changed in place in a copy of its buffer, high bits included); the header keeps
PixelSpacing, SequenceOfUltrasoundRegions and everything else; BurnedInAnnotation
becomes NO. The caller adds the Clean Pixel Data code (113101) through the header step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from node.burnedin import ink, small
from node.burnedin.detect import VERIFIER, Box, DetectorUnavailable, TextDetector, shared_detector
from node.burnedin.regions import RegionRules
from node.wire import peek, peek_float, peek_str

log = logging.getLogger(__name__)

_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
CINE_FRAMES = 8  # objects with more frames are read by sample (see module docstring)
SAMPLE = 6  # frames sampled from a cine, first and last included
MAX_TEXT_HEIGHT = 80  # pixels: taller detections are image structures, not text lines
ROUNDS = 2  # extra masking rounds for pieces of text found next to a mask


class BurnedInError(Exception):
    """The object's pixels cannot be shown clean (quarantine with this reason; no PHI)."""


@dataclasses.dataclass
class CleanReport:
    """What the step did to one object (JSON-able through :meth:`record`)."""

    frames: int = 0
    rules: list[str] = dataclasses.field(default_factory=list)
    masked: dict[int, list[Box]] = dataclasses.field(default_factory=dict)  # frame -> boxes
    read: list[int] = dataclasses.field(default_factory=list)  # frames the detector read
    decoded_from: str = ""  # the compressed transfer syntax decoded, if any
    seconds: float = 0.0
    ocr_seconds: float = 0.0

    def by_frames(self) -> list[tuple[str, list[Box]]]:
        """The masked boxes with consecutive frames of the same boxes grouped:
        [("0-99", boxes), ...] (a cine's static overlay is one entry)."""
        out: list[tuple[str, list[Box]]] = []
        start = prev = None
        for k in sorted(self.masked):
            if start is not None and k == prev + 1 and self.masked[k] == self.masked[start]:
                prev = k
                continue
            if start is not None and self.masked[start]:
                out.append((str(start) if start == prev else f"{start}-{prev}", self.masked[start]))
            start = prev = k
        if start is not None and self.masked[start]:
            out.append((str(start) if start == prev else f"{start}-{prev}", self.masked[start]))
        return out

    def record(self) -> dict:
        """The job record's ``burned_in`` entry: rules, boxes (top, left, bottom, right)
        by frame or frame range ("0-99"), the frames the detector read."""
        boxes = {frames: [list(b) for b in v] for frames, v in self.by_frames()}
        return {"frames": self.frames, "rules": self.rules, "boxes": boxes, "frames_read": self.read, "decoded_from": self.decoded_from}


# -- pixels as stored -------------------------------------------------------------------
@dataclasses.dataclass
class _Pixels:
    stored: np.ndarray  # (frames, rows, cols, samples), a writable copy
    planar: bool  # colour by plane in the buffer (PlanarConfiguration 1)
    photometric: str
    bits_stored: int
    signed: bool


def _read_pixels(ds: Dataset, report: CleanReport) -> _Pixels:
    """The stored values of every frame; compressed data is decoded into ``ds`` first."""
    from pydicom.pixels import decompress

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        raise BurnedInError("burned-in text: the object has no transfer syntax")
    if tsyntax not in _NATIVE:
        if tsyntax == "1.2.840.10008.1.2.2":
            raise BurnedInError("burned-in text: big-endian pixel data is not supported")
        from node.deid.burned_in import decoded_size_problem

        too_large = decoded_size_problem(ds)
        if too_large:
            raise BurnedInError(f"burned-in text: pixel data not decoded: {too_large}")
        try:
            decompress(ds, as_rgb=True, generate_instance_uid=False)
        except Exception as exc:
            raise BurnedInError(f"burned-in text: cannot decode pixel data in {tsyntax.name} ({type(exc).__name__})") from None
        report.decoded_from = str(tsyntax)
    pi = peek_str(ds, "PhotometricInterpretation")
    if pi not in ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"):
        raise BurnedInError(f"burned-in text: photometric interpretation {pi or '(absent)'} is not supported as stored")
    allocated, stored = int(peek_float(ds, "BitsAllocated", 0)), int(peek_float(ds, "BitsStored", 0))
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise BurnedInError(f"burned-in text: BitsAllocated {allocated} / BitsStored {stored} are not supported")
    rows, cols = int(peek_float(ds, "Rows", 0)), int(peek_float(ds, "Columns", 0))
    n = int(peek_float(ds, "NumberOfFrames", 1) or 1)
    spp = int(peek_float(ds, "SamplesPerPixel", 1))
    if spp not in (1, 3) or (spp == 3) != (pi in ("RGB", "YBR_FULL")):
        raise BurnedInError("burned-in text: SamplesPerPixel does not fit the photometric interpretation")
    signed = peek_float(ds, "PixelRepresentation", 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    data = peek(ds, "PixelData")
    if not isinstance(data, bytes) or not rows or not cols or len(data) < n * rows * cols * spp * dtype.itemsize:
        raise BurnedInError("burned-in text: PixelData is shorter than Rows x Columns x frames")
    planar = spp == 3 and peek_float(ds, "PlanarConfiguration", 0) == 1
    arr = np.frombuffer(data, dtype, n * rows * cols * spp)
    arr = arr.reshape(n, spp, rows, cols).transpose(0, 2, 3, 1) if planar else arr.reshape(n, rows, cols, spp)
    return _Pixels(arr.copy(), planar, pi, stored, signed)


def _write_pixels(ds: Dataset, px: _Pixels) -> None:
    """Put the (masked) stored values back into ``ds`` as native little-endian data."""
    arr = px.stored.transpose(0, 3, 1, 2) if px.planar else px.stored
    data = np.ascontiguousarray(arr).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if px.stored.dtype.itemsize == 1 else "OW"
    if ds.file_meta.TransferSyntaxUID not in _NATIVE:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


# -- what the detector sees --------------------------------------------------------------
def _value_range(px: _Pixels) -> tuple[int, int]:
    if px.signed:
        return -(1 << (px.bits_stored - 1)), (1 << (px.bits_stored - 1)) - 1
    return 0, (1 << px.bits_stored) - 1


def _stored_bits(px: _Pixels) -> np.ndarray:
    """Stored values with the bits above BitsStored cleared (or sign-extended)."""
    arr = px.stored
    if px.bits_stored < arr.dtype.itemsize * 8:
        shift = arr.dtype.itemsize * 8 - px.bits_stored
        arr = (arr << shift) >> shift if px.signed else arr & arr.dtype.type((1 << px.bits_stored) - 1)
    return arr


def display(ds: Dataset, px: _Pixels, frames: Sequence[int]) -> np.ndarray:
    """(len(frames), rows, cols, 3) uint8 RGB as a viewer would show them: the header's
    window (else the frame's 0.5th to 99.5th percentile) for grayscale, the palette for
    PALETTE COLOR, YBR converted to RGB."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    arr = _stored_bits(px)[list(frames)]
    if px.photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr[..., 0], ds)
        top = float(rgb.max()) or 1.0
        return (rgb.astype(np.float32) * (255 / (255 if top <= 255 else 65535))).clip(0, 255).astype(np.uint8)
    if px.photometric in ("RGB", "YBR_FULL"):
        if px.photometric == "YBR_FULL":
            arr = convert_color_space(arr, "YBR_FULL", "RGB", per_frame=True)
        if px.bits_stored > 8:
            arr = arr >> (px.bits_stored - 8)
        return arr.astype(np.uint8, copy=False)
    out = np.empty((len(frames), *arr.shape[1:3], 3), np.uint8)
    center, width = peek_float(ds, "WindowCenter", np.nan), peek_float(ds, "WindowWidth", np.nan)
    slope, intercept = peek_float(ds, "RescaleSlope", 1.0), peek_float(ds, "RescaleIntercept", 0.0)
    for i, f in enumerate(arr[..., 0]):
        if px.bits_stored <= 8 and not np.isfinite(width):
            g = f.astype(np.float32)
            lo, hi = 0.0, 255.0
        else:
            g = f.astype(np.float32) * slope + intercept
            if np.isfinite(center) and np.isfinite(width) and width > 1:
                lo, hi = center - width / 2, center + width / 2
            else:
                lo, hi = (float(v) for v in np.percentile(g, [0.5, 99.5]))
                hi = max(hi, lo + 1)
        v = np.clip((g - lo) * (255 / (hi - lo)), 0, 255)
        if px.photometric == "MONOCHROME1":
            v = 255 - v
        out[i] = v.astype(np.uint8)[..., None]
    return out


def _shows_stored_values(ds: Dataset, px: _Pixels) -> bool:
    """True when :func:`display` shows each stored value as a value of its own (8-bit
    grayscale without a window, RGB, YBR, palette): what the ink reading needs. A window
    or a percentile stretch clips the brightest values together (a bright wall becomes
    flat strokes of 255, like ink) and merges neighbouring ones."""
    if px.photometric in ("RGB", "YBR_FULL", "PALETTE COLOR"):
        return px.bits_stored <= 8
    return px.bits_stored <= 8 and not np.isfinite(peek_float(ds, "WindowWidth", np.nan))


def low_contrast_view(rgb: np.ndarray) -> np.ndarray:
    """Dark values lifted (gamma 1/4 on 8-bit): faint marks on a dark background become
    plain, bright image content is compressed."""
    lut = (255 * (np.arange(256) / 255) ** 0.25).astype(np.uint8)
    return lut[rgb]


def _black(ds: Dataset, px: _Pixels, frame: np.ndarray) -> np.ndarray:
    """The stored value(s) that show black in ``frame`` (rows, cols, samples): the
    frame's darkest value for MONOCHROME2 (its brightest for MONOCHROME1), zero for
    RGB, (0, half, half) for YBR_FULL, the darkest entry for PALETTE COLOR.

    Black rather than the surroundings: most burned-in text sits on a black band,
    where a black box changes no pixel at all."""
    if px.photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        first = int(peek_float(ds, "RedPaletteColorLookupTableDescriptor", 0, 1))
        entries = int(peek_float(ds, "RedPaletteColorLookupTableDescriptor", 0, 0)) or 65536
        idx = np.arange(first, first + entries)
        lum = apply_color_lut(idx.astype(px.stored.dtype), ds).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.array([idx[int(np.argmin(lum))]], px.stored.dtype)
    if px.photometric == "YBR_FULL":
        mid = 1 << (px.bits_stored - 1)
        return np.array([0, mid, mid], px.stored.dtype)
    if px.photometric == "RGB":
        return np.zeros(3, px.stored.dtype)
    values = _stored_bits(_Pixels(frame[None], False, px.photometric, px.bits_stored, px.signed))
    return np.array([values.max() if px.photometric == "MONOCHROME1" else values.min()], px.stored.dtype)


def _mask(ds: Dataset, px: _Pixels, i: int, boxes: Sequence[Box]) -> None:
    """Fill ``boxes`` of frame ``i`` (stored values) with black."""
    if not boxes:
        return
    fill = _black(ds, px, px.stored[i])
    for t, l, b, r in boxes:
        px.stored[i, t:b, l:r] = fill


# -- boxes ------------------------------------------------------------------------------
def _grow(box: Box, by: int, rows: int, cols: int) -> Box:
    t, l, b, r = box
    return max(0, t - by), max(0, l - by), min(rows, b + by), min(cols, r + by)


def margin_of(box: Box) -> int:
    """The margin added around a detected box (DB's unclip already pads it by about a
    third of the line height above and below): an eighth of its height, 2 pixels at least."""
    return max(2, (box[2] - box[0]) // 8)


def _pad(box: Box, rows: int, cols: int) -> Box:
    """A detected box with its margin: :func:`margin_of` above and below, a fifth of its
    height to the sides, where the detector's box tends to stop short of a line's first
    or last letter (small text over speckle in the benchmark)."""
    dy = margin_of(box)
    dx = max(dy, (box[2] - box[0]) // 5)
    t, l, b, r = box
    return max(0, t - dy), max(0, l - dx), min(rows, b + dy), min(cols, r + dx)


def _flatten(view: np.ndarray, boxes: Sequence[Box]) -> None:
    """Show each masked box of a view (rows, cols, 3) as a flat patch of its
    surroundings (the median of the ring just outside it) for the re-reading.

    The output holds a constant there, so nothing in the box can be read whatever it
    is shown as; a black box in bright texture, though, has edges the detector takes
    for letters, and text left beside a mask is as visible either way."""
    rows, cols = view.shape[:2]
    for t, l, b, r in boxes:
        ring = [view[t - 1, l:r] if t > 0 else None, view[b, l:r] if b < rows else None,
                view[t:b, l - 1] if l > 0 else None, view[t:b, r] if r < cols else None]
        parts = [v for v in ring if v is not None and len(v)]
        if parts:
            view[t:b, l:r] = np.median(np.concatenate(parts), axis=0).astype(np.uint8)


def _around(box: Box, rows: int, cols: int) -> Box:
    """The area read again around a mask: half a line height above and below, four
    line heights to the sides (a line cut short continues sideways)."""
    h = box[2] - box[0]
    dy, dx = max(8, h // 2), max(32, 4 * h)
    return max(0, box[0] - dy), max(0, box[1] - dx), min(rows, box[2] + dy), min(cols, box[3] + dx)


def _distinct(boxes: Sequence[Box]) -> list[Box]:
    """The boxes without repeats, in a stable order (masks stay as found: two boxes
    that overlap are not replaced by their bounding rectangle)."""
    return sorted(set(boxes))


def _merge(boxes: Sequence[Box]) -> list[Box]:
    """Overlapping rectangles merged into their bounding rectangles (regions to read)."""
    out = [tuple(b) for b in boxes]
    changed = True
    while changed:
        changed = False
        merged: list[tuple] = []
        for b in out:
            for i, m in enumerate(merged):
                if b[0] < m[2] and m[0] < b[2] and b[1] < m[3] and m[1] < b[3]:
                    merged[i] = (min(b[0], m[0]), min(b[1], m[1]), max(b[2], m[2]), max(b[3], m[3]))
                    changed = True
                    break
            else:
                merged.append(b)
        out = merged
    return out  # type: ignore[return-value]


def _text_lines(boxes: Sequence[Box]) -> list[Box]:
    return [b for b in boxes if b[2] - b[0] <= MAX_TEXT_HEIGHT]


def _dark(view: np.ndarray, box: Box) -> bool:
    """True when most of ``box`` in the (unlifted) view is dark: below 48 of 255."""
    t, l, b, r = box
    return bool(np.median(ink.brightest(view[t:b, l:r])) < 48)


def _touches(box: Box, masks: Sequence[Box]) -> bool:
    return any(box[0] < m[2] and m[0] < box[2] and box[1] < m[3] and m[1] < box[3] for m in masks)


def _continues(box: Box, masks: Sequence[Box]) -> bool:
    """True when ``box`` could be the rest of a masked line: it shares at least half of
    its rows with a mask no less than two thirds its height. Other marks that the
    crops around the masks show were read with their full surroundings in the first
    pass; in a crop, shapes cut by its edges look like text."""
    h = box[2] - box[0]
    for m in masks:
        shared = min(box[2], m[2]) - max(box[0], m[0])
        if shared >= h / 2 and 3 * (m[2] - m[0]) >= 2 * h:
            return True
    return False


def _covered(box: Box, masks: Sequence[Box]) -> bool:
    m = np.zeros((box[2] - box[0], box[3] - box[1]), bool)
    for t, l, b, r in masks:
        m[max(0, t - box[0]) : max(0, b - box[0]), max(0, l - box[1]) : max(0, r - box[1])] = True
    return bool(m.mean() >= 0.9) if m.size else True


# -- the step ---------------------------------------------------------------------------
def _sample(n: int) -> list[int]:
    """The SAMPLE frames of an n-frame cine read whatever they show, evenly spaced,
    first and last included."""
    return sorted({round(i * (n - 1) / (SAMPLE - 1)) for i in range(SAMPLE)})


def frames_to_read(view: np.ndarray) -> list[int]:
    """Which frames of a (frames, rows, cols, 3) view the detector reads.

    All of a short object. For a cine: ``SAMPLE`` frames evenly spaced, and every other
    frame that differs from the first outside the area that moves between the sampled
    frames (dilated by 8 pixels): a new or changed overlay."""
    n = len(view)
    if n <= CINE_FRAMES:
        return list(range(n))
    import cv2

    sample = _sample(n)
    ref = view[sample[0]]
    moving = np.zeros(ref.shape[:2], np.uint8)
    for i in sample[1:]:
        moving |= (view[i] != ref).any(-1).astype(np.uint8)
    moving = cv2.dilate(moving, np.ones((17, 17), np.uint8)).astype(bool)
    # XOR against the first frame, AND with 0xFF where the image is still: no gather
    # of the still pixels per frame (that was a quarter of a cine's time outside OCR).
    still = np.where(moving, 0, 0xFF).astype(np.uint8)[..., None]
    extra = [i for i in range(n) if i not in sample and np.bitwise_and(np.bitwise_xor(view[i], ref), still).any()]
    return sorted(set(sample) | set(extra))


def clean(ds: Dataset, detector: TextDetector, rules: RegionRules | None = None, verifier: TextDetector | None = None) -> CleanReport:
    """Mask burned-in text in ``ds`` in place (see the module docstring); returns what was done.

    ``verifier`` is the second reading's detector (by default the process's shared one
    with :data:`~node.burnedin.detect.VERIFIER` settings); it must be another session
    than ``detector``'s.

    Raises:
        BurnedInError: text is left that could not be masked, the low-contrast check or
            the second reading found text the detector missed, or the pixels cannot be
            read or written.
        DetectorUnavailable: the second reading's detector cannot be loaded.
    """
    t0 = time.perf_counter()
    verifier = verifier or shared_detector(VERIFIER)
    ocr0, ver0 = detector.seconds, verifier.seconds
    report = CleanReport()
    if "PixelData" not in ds:
        return report
    px = _read_pixels(ds, report)
    n = report.frames = len(px.stored)
    view = display(ds, px, range(n))
    rule_boxes: list[Box] = []
    if rules is not None:
        report.rules, rule_boxes = rules.boxes_for(ds)
    for t, l, b, r in rule_boxes:
        view[:, t:b, l:r] = 0
    read = report.read = frames_to_read(view)
    shown = view[read]
    found = _first_reading(shown, read, n, detector)
    found = _second_reading(shown, read, n, found, verifier)
    exact = _shows_stored_values(ds, px)
    if exact:
        found = _extend_along_ink(shown, read, n, found)
    del shown
    masks = {i: _distinct(rule_boxes + found.get(i, [])) for i in range(n)}
    for i in range(n):
        _mask(ds, px, i, masks[i])
    view = display(ds, px, read)
    for k, i in enumerate(read):
        _flatten(view[k], masks[i])
    # The re-read around the masks is left to the small-text reading where that reads the
    # frame and the ink reading follows it with exact values (8-bit views, not decoded
    # from lossy JPEG): a line beside a mask that neither network reading shows (larger
    # than small text, beyond a gap) is then ink beside or away from the masks.
    by_small = _small_text_frames(view, read, masks, n) if exact and report.decoded_from in ("", str(RLELossless)) else None
    _verify(ds, px, view, read, masks, found, detector, skip=by_small or ())
    _small_text_reading(ds, px, view, read, masks, verifier, by_small)
    if exact:
        _ink_reading(ds, px, view, read, masks)
    if n > CINE_FRAMES:  # pieces masked on a read frame are masked on all
        union = _distinct([b for i in read for b in masks[i]])
        for i in range(n):
            _mask(ds, px, i, [b for b in union if b not in masks[i]])
        masks = {i: union for i in range(n)}
    _write_pixels(ds, px)
    ds.BurnedInAnnotation = "NO"
    report.masked = masks
    report.seconds = time.perf_counter() - t0
    report.ocr_seconds = detector.seconds - ocr0 + verifier.seconds - ver0
    return report


def _first_reading(frames: np.ndarray, read: list[int], n: int, detector: TextDetector) -> dict[int, list[Box]]:
    """Boxes to mask per frame (margins added) from the frames read; for a cine (static
    overlay) the union of them on every frame."""
    rows, cols = frames.shape[1:3]
    try:
        found = detector.detect(frames, reading="first")
    except DetectorUnavailable:
        raise
    except Exception as exc:
        raise BurnedInError(f"burned-in text: the detector could not process the frames ({type(exc).__name__})") from None
    per_frame = {i: [_pad(b, rows, cols) for b in _text_lines(boxes)] for i, boxes in zip(read, found)}
    if n > CINE_FRAMES:
        union = _distinct([b for boxes in per_frame.values() for b in boxes])
        per_frame = {i: list(union) for i in range(n)}
    return per_frame


def _verify(ds: Dataset, px: _Pixels, view: np.ndarray, read: list[int], masks: dict[int, list[Box]], new: dict[int, list[Box]], detector: TextDetector,
            skip: Sequence[int] = ()) -> None:
    """Read the masked frames again (``view``: their display, in the order of ``read``;
    see the module docstring). Residual pieces of text are masked too (``px``, ``masks``
    and ``view`` change); raises BurnedInError when text is left. The areas around the
    masks are not read again on the frames ``skip`` (positions in ``read``): those the
    small-text reading reads whole after this, masking what touches a mask and sticks
    out of it (docs/burned-in.md, "The re-read left to the small-text reading")."""
    rows, cols = px.stored.shape[1:3]
    try:
        for k, i in enumerate(read):
            recent = [] if k in skip else new.get(i, [])
            for _round in range(ROUNDS + 1):
                regions = _merge([_around(b, rows, cols) for b in recent])
                seen = [b for b in _text_lines(detector.detect_regions(view[k], regions, reading="re-read")) if not _covered(b, masks[i]) and _continues(b, recent)]
                if not seen:
                    break
                # Confirmed on the whole frame: in a crop, shapes cut by its edges and
                # texture beside a mask can pass for letters.
                whole = detector.detect(view[k : k + 1], reading="re-read")[0]
                left = [b for b in _text_lines(whole) if not _covered(b, masks[i]) and _touches(b, seen)]
                if not left:
                    break
                if _round == ROUNDS:
                    raise BurnedInError(f"burned-in text: text is still detected after masking (frame {i})")
                recent = _mask_more(ds, px, view, k, i, masks, left)
        faint = detector.detect(low_contrast_view(view), detector.settings.check_scale, reading="low-contrast")
    except BurnedInError:
        raise
    except Exception as exc:
        raise BurnedInError(f"burned-in text: the detector could not process the masked frames ({type(exc).__name__})") from None
    for k, (i, boxes) in enumerate(zip(read, faint)):
        # What counts: a line of text (wider than tall: names, IDs, dates; a dark round
        # structure lifted out of bright texture is not) on a dark background (where
        # lifting the dark values is what shows it), away from the masks (whose
        # surroundings were read again above).
        if any(not _touches(b, masks[i]) and b[3] - b[1] >= 1.5 * (b[2] - b[0]) and _dark(view[k], b) for b in _text_lines(boxes)):
            raise BurnedInError(f"burned-in text: the low-contrast check found text the detector did not mask (frame {i})")


def chroma_view(rgb: np.ndarray, masks: Sequence[Sequence[Box]] = ()) -> np.ndarray:
    """(N, rows, cols, 3) uint8 RGB -> the same shape, grey: each pixel's spread between
    its largest and smallest channel, less 12 (JPEG's chroma noise), stretched 4 times.
    A grey image is black in it; a coloured overlay (yellow or green text on grey
    ultrasound) is bright. ``masks[k]`` (frame k's masked boxes) show black."""
    spread = ink.brightest(rgb).astype(np.int16) - ink.darkest(rgb)
    v = np.clip((spread - 12) * 4, 0, 255).astype(np.uint8)
    for k, boxes in enumerate(masks):
        for t, l, b, r in boxes:
            v[k, t:b, l:r] = 0
    return np.repeat(v[..., None], 3, -1)


def _line_of_text(box: Box, ratio: float = 1.5) -> bool:
    """Shaped like a line of text: at most MAX_TEXT_HEIGHT tall and ``ratio`` times as
    wide as tall (1.5: three characters or more with DB's padding). A colour Doppler box
    (taller than wide), a round structure (a cyst) or a patch of speckle is not: at the
    second reading's low thresholds, squarer boxes came up on text-free speckle."""
    h, w = box[2] - box[0], box[3] - box[1]
    return h <= MAX_TEXT_HEIGHT and w >= ratio * h


def _inside(box: Box, masks: Sequence[Box]) -> bool:
    """True when every pixel of ``box`` lies in some mask (the union of ``masks``)."""
    return not _uncovered(box, masks)


def _uncovered(box: Box, masks: Sequence[Box]) -> int:
    """How many pixels of ``box`` no mask covers."""
    m = np.ones((box[2] - box[0], box[3] - box[1]), bool)
    for t, l, b, r in masks:
        m[max(0, t - box[0]) : max(0, b - box[0]), max(0, l - box[1]) : max(0, r - box[1])] = False
    return int(m.sum())


def _read_second(view: np.ndarray, masks: Sequence[Sequence[Box]], verifier: TextDetector) -> list[list[Box]]:
    """The second reading's boxes per frame of ``view`` (N, rows, cols, 3; masks
    flattened): the frame as shown and, for a colour frame, its chroma."""
    coloured = [k for k in range(len(view)) if int((ink.brightest(view[k]).astype(np.int16) - ink.darkest(view[k])).max()) > 16]
    found = verifier.detect(view, reading="second")
    if coloured:
        chroma = verifier.detect(chroma_view(view[coloured], [masks[k] for k in coloured]), verifier.settings.check_scale, reading="chroma")
        for k, boxes in zip(coloured, chroma):
            found[k] = found[k] + boxes
    return found


def _rest_of_lines(boxes: Sequence[Box], masks: Sequence[Box], rows: int, cols: int, frame: int, ratio: float = 1.5) -> list[Box]:
    """Sort the second reading's boxes of one frame against its masks: those inside the
    masks are dropped; those that touch a mask and stick out of it are returned (to be
    masked too): the rest of a line whose first box stopped short, or a taller box
    around the same line. Any other line of text is text the first reading missed.

    Raises:
        BurnedInError: a line of text (:func:`_line_of_text` with ``ratio``) away from
            the masks.
    """
    left = [b for b in boxes if b[2] - b[0] <= MAX_TEXT_HEIGHT and not _inside(b, masks)]
    rest = [b for b in left if _touches(_grow(b, 2, rows, cols), masks)]
    if any(_line_of_text(b, ratio) for b in left if b not in rest):
        raise BurnedInError(f"burned-in text: the second reading found text the detector did not mask (frame {frame})")
    return rest


def _mask_more(ds: Dataset, px: _Pixels, view: np.ndarray, k: int, i: int, masks: dict[int, list[Box]], boxes: Sequence[Box]) -> list[Box]:
    """Mask ``boxes`` (margins added) on frame ``i`` too: the stored values (``px``), its
    masks and its view (``view[k]``, masks flattened) change. Returns the boxes masked."""
    rows, cols = px.stored.shape[1:3]
    recent = [_pad(b, rows, cols) for b in boxes]
    masks[i] = _distinct(masks[i] + recent)
    _mask(ds, px, i, recent)
    view[k] = display(ds, px, [i])[0]
    _flatten(view[k], masks[i])
    return recent


def _second_reading(frames: np.ndarray, read: list[int], n: int, found: dict[int, list[Box]], verifier: TextDetector) -> dict[int, list[Box]]:
    """Read the frames (``frames``: their display before masking, in the order of
    ``read``) with the second detector and compare its boxes with the first reading's
    masks (``found``, margins added; see the module docstring). Returns the masks to
    apply.

    Each box of the second reading is checked by geometry, not by what a detector
    makes of a masked frame (a detector does not see the one or two letters a cut-short
    box leaves beside a flat patch):
    - inside the masks: nothing to do;
    - touching a mask and sticking out of it: the rest of a line whose first box
      stopped short (or the same line seen taller); the box, with its margin, is
      masked too (on every frame of a cine);
    - any other line of text (at most MAX_TEXT_HEIGHT tall, half again as wide as
      tall) that the masks do not cover entirely: text the first reading missed;
      BurnedInError (the object is quarantined).

    Raises:
        BurnedInError: see above, or a frame the second detector cannot process.
    """
    rows, cols = frames.shape[1:3]
    try:
        seen = _read_second(frames, [[] for _ in read], verifier)
    except Exception as exc:
        raise BurnedInError(f"burned-in text: the second reading could not process the frames ({type(exc).__name__})") from None
    out = {i: list(v) for i, v in found.items()}
    for k, i in enumerate(read):
        grown = [_pad(b, rows, cols) for b in _rest_of_lines(seen[k], found.get(i, []), rows, cols, i)]
        for j in (range(n) if n > CINE_FRAMES else [i]):
            out[j] = _distinct(out.get(j, []) + grown)
    return out


def _small_text_frames(view: np.ndarray, read: list[int], masks: dict[int, list[Box]], n: int) -> list[int]:
    """The frames (positions in ``read``) the small-text reading reads: those with a
    place dense in thin marks (:func:`node.burnedin.small.candidate_areas`) outside the
    masks; of a cine's sample, only the first and last (a static overlay; each x3
    reading costs about nine plain ones), and every frame read for a changed overlay."""
    ends = {_sample(n)[0], _sample(n)[-1]} if n > CINE_FRAMES else set(read)
    return [k for k, i in enumerate(read) if (i in ends or i not in _sample(n)) and small.candidate_areas(view[k], masks[i])]


def _small_text_reading(ds: Dataset, px: _Pixels, view: np.ndarray, read: list[int], masks: dict[int, list[Box]], verifier: TextDetector,
                        todo: Sequence[int] | None = None) -> None:
    """The second detector on the top-hat view of the masked frames (``view``: their
    display with the masks flattened, in the order of ``read``), whole, at scale
    :data:`node.burnedin.small.SCALE`: 7 px text over speckle that no other reading
    sees (docs/burned-in.md, "Small text"). Frames with no place dense enough in thin
    marks to hold a line of small text (:func:`node.burnedin.small.candidate_areas`) are
    not read, nor, in a cine, the sampled frames between the first and the last (a
    static overlay; each x3 reading costs about nine plain ones). Read whole, not by those places: the network pools over the whole
    image, and crops of speckle read alone gave lines of text on text-free frames.
    What touches a mask and sticks out of it is masked (``px``, ``masks`` and ``view``
    change) and the frame read again (ROUNDS times at most); a line of small text away
    from every mask (:data:`node.burnedin.small.MAX_HEIGHT` tall at most,
    :data:`node.burnedin.small.LINE_RATIO` times as wide as tall) is text missed.
    ``todo``: the frames to read (positions in ``read``), :func:`_small_text_frames`
    when not given.

    Raises:
        BurnedInError: a line of text away from the masks, text still beside a mask
            after ROUNDS rounds, or a frame the detector cannot process.
    """
    rows, cols = px.stored.shape[1:3]
    n = len(px.stored)
    # A cine's overlay is static (the other readings see it on every sampled frame):
    # of the sample, its first and last frames, and every frame read for a changed overlay.
    todo = _small_text_frames(view, read, masks, n) if todo is None else list(todo)
    for _round in range(ROUNDS + 1):
        if not todo:
            return
        try:
            found = verifier.detect(np.stack([small.tophat_view(view[k]) for k in todo]), small.SCALE, reading="small-text")
        except Exception as exc:
            raise BurnedInError(f"burned-in text: the small-text reading could not process the masked frames ({type(exc).__name__})") from None
        grown = []
        for k, boxes in zip(todo, found):
            i = read[k]
            left = [b for b in boxes if b[2] - b[0] <= MAX_TEXT_HEIGHT and not _inside(b, masks[i])]
            rest = [b for b in left if _touches(_grow(b, 2, rows, cols), masks[i])]
            if any(b[2] - b[0] <= small.MAX_HEIGHT and _line_of_text(b, small.LINE_RATIO) for b in left if b not in rest):
                raise BurnedInError(f"burned-in text: the small-text reading found text the detector did not mask (frame {i})")
            if not rest:
                continue
            if _round == ROUNDS:
                raise BurnedInError(f"burned-in text: the small-text reading still finds text beside a mask after masking (frame {i})")
            _mask_more(ds, px, view, k, i, masks, rest)
            grown.append(k)
        todo = grown


def _extend_along_ink(frames: np.ndarray, read: list[int], n: int, found: dict[int, list[Box]]) -> dict[int, list[Box]]:
    """The masks to apply (``found``) grown sideways along their line while the strip
    beside them still holds the line's ink (:func:`node.burnedin.ink.extend_along_ink`
    on ``frames``, the display before masking in the order of ``read``); for a cine,
    the union over the frames read, on every frame."""
    out = {i: list(v) for i, v in found.items()}
    grown: list[Box] = []
    for k, i in enumerate(read):
        boxes = ink.extend_along_ink(frames[k], found.get(i, []))
        if n > CINE_FRAMES:
            grown += boxes
        else:
            out[i] = _distinct(boxes)
    if n > CINE_FRAMES:
        union = _distinct(grown)
        out = {i: list(union) for i in range(n)}
    return out


def _ink_reading(ds: Dataset, px: _Pixels, view: np.ndarray, read: list[int], masks: dict[int, list[Box]]) -> None:
    """The classical ink reading (:func:`node.burnedin.ink.ink_lines`) of the masked
    frames (``view``: their display with the masks flattened, in the order of
    ``read``): a line of ink next to a mask (within its height, on rows it shares) is
    masked too (``px``, ``masks`` and ``view`` change) and the frame read again (ROUNDS
    times at most); a line of ink away from every mask is text both readings of the
    network missed.

    Raises:
        BurnedInError: ink away from the masks, or still found after ROUNDS rounds.
    """
    rows, cols = px.stored.shape[1:3]
    for k, i in enumerate(read):
        for _round in range(ROUNDS + 1):
            lines = ink.ink_lines(view[k], masks[i])
            if not lines:
                break
            near = _chained(lines, masks[i], rows, cols)
            if len(near) < len(lines):
                raise BurnedInError(f"burned-in text: the ink reading found text the detector did not mask (frame {i})")
            if _round == ROUNDS:
                raise BurnedInError(f"burned-in text: the ink reading still finds text beside a mask after masking (frame {i})")
            masks[i] = _distinct(masks[i] + near)
            _mask(ds, px, i, near)
            view[k] = display(ds, px, [i])[0]
            _flatten(view[k], masks[i])


def _chained(lines: Sequence[Box], masks: Sequence[Box], rows: int, cols: int) -> list[Box]:
    """The masks to add for the ink ``lines`` that continue a mask, directly or through
    other such lines (a line is found in pieces): one per line, :func:`_along` the mask
    or piece it continues. Lines that continue nothing are left out."""
    reach, out, todo = list(masks), [], list(lines)
    while todo:
        step = [(b, next(m for m in reach if _beside(b, m))) for b in todo if any(_beside(b, m) for m in reach)]
        if not step:
            break
        for b, m in step:
            todo.remove(b)
            out.append(_along(b, m, rows, cols))
            reach.append(out[-1])
    return out


def _along(box: Box, mask: Box, rows: int, cols: int) -> Box:
    """The mask to add for ink ``box`` beside ``mask``: the mask's rows (the line's
    height, whatever part of the letters the strokes were found in) over the ink's
    columns, with the sideways margin of :func:`_pad` (a fifth of the line height)."""
    dx = max(2, (mask[2] - mask[0]) // 5)
    return min(box[0], mask[0]), max(0, box[1] - dx), max(box[2], mask[2]), min(cols, box[3] + dx)


def _beside(box: Box, mask: Box) -> bool:
    """True when ``box`` shares rows with ``mask`` and lies within the mask's height of it
    sideways (or overlaps it): the rest of the masked line."""
    h = mask[2] - mask[0]
    return box[0] < mask[2] and mask[0] < box[2] and box[1] < mask[3] + h and mask[1] - h < box[3]
