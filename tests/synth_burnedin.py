"""Synthetic images with burned-in text, for the burned-in tests and benchmark.

Ultrasound-like frames (a speckled sector on black) and secondary captures, grayscale
or colour, with synthetic names, IDs, dates and times drawn with Debian's DejaVu and
Liberation fonts at several sizes and positions, some over the image content. Each
drawn token comes back with its box, so a test can tell what was masked and check
that none of it can still be read. Everything is a function of a seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf",
    "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf",
)
SURNAMES = ("DOE", "ROE", "SYNTHETIC", "TESTPATIENT", "MOCKINGBIRD", "PLACEHOLDER", "EXAMPLE", "SAMPLEMAN")
GIVEN = ("JANE", "JOHN", "ALEX", "MARIA", "PAT", "ROBIN", "KIM", "LEE")


def fonts() -> list[Path]:
    """The font files that are installed (fonts-dejavu-core, fonts-liberation)."""
    out = []
    for name in FONT_FILES:
        for d in FONT_DIRS:
            if (d / name).exists():
                out.append(d / name)
                break
    return out


@dataclasses.dataclass
class Token:
    text: str
    box: tuple[int, int, int, int]  # top, left, bottom, right (exclusive), in pixels
    size: int
    font: str
    over_content: bool
    ink: np.ndarray | None = None  # bool (bottom - top, right - left): the glyphs' pixels in ``box`` (not the gaps between words)

    def uncovered_ink(self, masked: np.ndarray) -> int:
        """How many of the token's ink pixels ``masked`` (rows x cols bool) leaves uncovered."""
        t, l, b, r = self.box
        ink = self.ink if self.ink is not None else np.ones((b - t, r - l), bool)
        return int((ink & ~masked[t:b, l:r]).sum())


def random_token(rng: np.random.Generator) -> str:
    """A synthetic identifier as a scanner would print it: a name, an ID, a date or a time."""
    kind = rng.integers(0, 6)
    if kind == 0:
        return f"{rng.choice(SURNAMES)} {rng.choice(GIVEN)}"
    if kind == 1:
        return f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
    if kind == 2:
        return f"ID {rng.integers(10**6, 10**9)}"
    if kind == 3:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1930, 2025)}"
    if kind == 4:
        return f"{rng.integers(1930, 2025)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    return f"MRN{rng.integers(10**5, 10**8)}"


def us_background(rng: np.random.Generator, rows: int = 480, cols: int = 640) -> tuple[np.ndarray, np.ndarray]:
    """(frame uint8 rows x cols, content mask): a speckled ultrasound sector on black."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    apex_y, apex_x = 40, cols // 2
    r = np.hypot(yy - apex_y, xx - apex_x)
    theta = np.arctan2(xx - apex_x, yy - apex_y)
    sector = (r > 30) & (r < rows - 30) & (np.abs(theta) < 0.62)
    speckle = rng.rayleigh(1.0, (rows, cols))
    # a little smoothing so the speckle has grain, then structures (a dark cyst, a bright wall)
    speckle = (speckle + np.roll(speckle, 1, 0) + np.roll(speckle, 1, 1) + np.roll(speckle, (1, 1), (0, 1))) / 4
    img = 60 + 45 * speckle
    cy, cx = rng.integers(180, 360), apex_x + rng.integers(-80, 80)
    img[np.hypot(yy - cy, xx - cx) < rng.integers(25, 60)] *= 0.25
    img[np.abs(r - rng.integers(150, 300)) < 4] += 90
    img *= np.clip(1.2 - r / (rows * 1.4), 0.2, 1)
    frame = np.where(sector, np.clip(img, 0, 255), 0).astype(np.uint8)
    return frame, sector


def draw_tokens(frame: np.ndarray, content: np.ndarray, rng: np.random.Generator, n: int = 6, sizes=(11, 14, 18, 24, 30),
                over_content: float = 0.3, colour: tuple[int, ...] | None = None, contrast: int | None = None) -> list[Token]:
    """Draw ``n`` tokens into ``frame`` (rows x cols or rows x cols x 3 uint8) in place.

    Tokens go to the dark band along the top, the sides, and (a share ``over_content``
    of them) onto the image content. ``contrast`` draws every token that many grey
    levels above the local mean (very low contrast text), instead of in bright ink."""
    rows, cols = frame.shape[:2]
    font_files = fonts()
    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    occupied = np.zeros((rows, cols), bool)
    tokens: list[Token] = []
    for _ in range(n * 20):
        if len(tokens) == n:
            break
        text = random_token(rng)
        size = int(rng.choice(sizes))
        path = font_files[int(rng.integers(len(font_files)))]
        font = ImageFont.truetype(str(path), size)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        w, h = x1 - x0, y1 - y0
        if w + 8 >= cols or h + 8 >= rows:
            continue
        on = rng.random() < over_content
        for _try in range(30):
            x = int(rng.integers(4, cols - w - 4))
            y = int(rng.integers(4, rows - h - 4))
            inside = content[y : y + h, x : x + w].mean()
            if (on and inside > 0.9) or (not on and inside == 0):
                break
        else:
            continue
        top, left, bottom, right = y, x, y + h, x + w
        if occupied[max(0, top - 6) : bottom + 6, max(0, left - 6) : right + 6].any():
            continue
        if contrast is not None:
            local = np.asarray(img.convert("L"))[top:bottom, left:right].astype(float).mean()
            v = int(min(255, local + contrast))
            ink: tuple[int, ...] | int = (v, v, v) if frame.ndim == 3 else v
        elif colour is not None:
            ink = colour if frame.ndim == 3 else int(np.mean(colour))
        else:
            grey = int(rng.choice([255, 230, 200, 170]))
            ink = (grey, grey, rng.choice([grey, 0])) if frame.ndim == 3 else grey
        draw.text((x - x0, y - y0), text, font=font, fill=ink)
        glyphs = Image.new("L", (w, h))
        ImageDraw.Draw(glyphs).text((-x0, -y0), text, font=font, fill=255)
        occupied[top:bottom, left:right] = True
        tokens.append(Token(text, (top, left, bottom, right), size, path.name, on, np.asarray(glyphs) >= 64))
    frame[...] = np.asarray(img)
    return tokens


def us_frame(seed: int, colour: bool = False, n: int = 6, **kw) -> tuple[np.ndarray, list[Token]]:
    """One 480 x 640 ultrasound-like frame (uint8, RGB when ``colour``) and its tokens."""
    rng = np.random.default_rng(seed)
    frame, content = us_background(rng)
    if colour:
        frame = np.repeat(frame[..., None], 3, 2)
        # a colour Doppler box inside the sector
        cy, cx = int(rng.integers(200, 300)), 320 + int(rng.integers(-60, 60))
        blob = np.zeros(frame.shape[:2], bool)
        blob[cy - 30 : cy + 30, cx - 20 : cx + 20] = True
        blob &= content
        frame[blob] = (np.array([200, 30, 30]) if rng.random() < 0.5 else np.array([30, 60, 220])).astype(np.uint8)
    tokens = draw_tokens(frame, content, rng, n=n, **kw)
    return frame, tokens


def ink_mask(clean: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Pixels that drawing changed (rows x cols bool)."""
    diff = clean != drawn
    return diff.any(-1) if diff.ndim == 3 else diff


US_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
US_MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
MANUFACTURER = "CASEMASK SYNTHETIC"
US_MODEL = "SYNUS 640"


def dataset(frames: np.ndarray, photometric: str = "MONOCHROME2", modality: str = "US", sop_class: str | None = None,
            palette: np.ndarray | None = None, model: str = US_MODEL, study_uid: str | None = None):
    """A DICOM dataset (Explicit VR Little Endian) holding ``frames`` (rows x cols[, 3]
    or frames x ...), with a synthetic patient's header and ultrasound calibration."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    multi = frames.ndim == (4 if frames.shape[-1] == 3 and photometric in ("RGB", "YBR_FULL") else 3)
    n = frames.shape[0] if multi else 1
    colour = photometric in ("RGB", "YBR_FULL")
    rows, cols = (frames.shape[1:3] if multi else frames.shape[:2])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class or (US_MULTIFRAME_SOP_CLASS if multi else (SC_SOP_CLASS if modality in ("SC", "OT") else US_SOP_CLASS))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^Janet^Q"
    ds.PatientID = "MRN-99812734"
    ds.PatientBirthDate = "19610704"
    ds.StudyDate = "20240311"
    ds.AccessionNumber = "ACC77129035"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ["0.2", "0.2"]
    if multi:
        ds.NumberOfFrames = n
        ds.FrameTime = "33.3"
        ds.FrameIncrementPointer = 0x00181063
    if modality == "US":
        region = Dataset()
        region.RegionSpatialFormat = 1
        region.RegionDataType = 1
        region.RegionFlags = 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 60, 40
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 580, 470
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = region.PhysicalDeltaY = 0.02
        ds.SequenceOfUltrasoundRegions = [region]
    if palette is not None:  # (entries, 3) uint8 -> 8-bit palette descriptors and LUTs
        for name, k in (("Red", 0), ("Green", 1), ("Blue", 2)):
            setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [len(palette), 0, 8])
            setattr(ds, f"{name}PaletteColorLookupTableData", palette[:, k].astype(np.uint8).tobytes())
    ds.PixelData = np.ascontiguousarray(frames, np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def palette_frame(seed: int, n: int = 6, **kw) -> tuple[np.ndarray, np.ndarray, list[Token]]:
    """(indices rows x cols uint8, palette 256 x 3, tokens): a PALETTE COLOR ultrasound
    frame whose indices 0-199 are a grey ramp and 200-255 a colour scale; text is drawn
    in index 255 (white)."""
    rng = np.random.default_rng(seed)
    frame, content = us_background(rng)
    idx = (frame.astype(np.uint16) * 199 // 255).astype(np.uint8)
    pal = np.zeros((256, 3), np.uint8)
    pal[:200] = np.linspace(0, 255, 200)[:, None].astype(np.uint8)
    pal[200:255] = np.stack([np.linspace(255, 80, 55), np.linspace(60, 0, 55), np.linspace(0, 200, 55)], 1).astype(np.uint8)
    pal[255] = 255
    shown = pal[idx][..., 0].copy()
    tokens = draw_tokens(shown, content, rng, n=n, colour=(255, 255, 255), **kw)
    idx[shown != pal[idx][..., 0]] = 255
    return idx, pal, tokens


def cine(seed: int, n_frames: int = 100, colour: bool = False, n: int = 5) -> tuple[np.ndarray, list[Token]]:
    """A cine of ``n_frames``: the speckle moves every frame, the text overlay is static."""
    rng = np.random.default_rng(seed)
    first, content = us_background(rng)
    base = np.repeat(first[..., None], 3, 2) if colour else first.copy()
    overlay = base.copy()
    tokens = draw_tokens(overlay, content, rng, n=n)
    ink = ink_mask(base, overlay)
    frames = []
    for k in range(n_frames):
        f, _ = us_background(np.random.default_rng(seed * 1000 + k))
        f = np.repeat(f[..., None], 3, 2) if colour else f
        f[ink] = overlay[ink]
        frames.append(f)
    return np.stack(frames), tokens
