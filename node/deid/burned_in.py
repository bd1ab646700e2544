"""Pixel hygiene that belongs to the header step: may this object carry burned-in text,
and the overlay bits some objects store in the unused high bits of Pixel Data.

Which objects carry burned-in text: PS3.15 E.3.1 leaves it to the de-identifier; the
signs used here are those of the CTP/pydicom-deid blacklists (Secondary Capture and
screen saves, whatever Modality says; documents; video; ultrasound and other projection
modalities that annotate their images), and BurnedInAnnotation where the sender set it.
"""

from __future__ import annotations

import struct

from pydicom import Dataset
from pydicom.dataelem import RawDataElement

from node.deid.text import first_text, texts

BURNED_IN_MODALITIES = frozenset({"US", "SC", "XA", "XC", "ES", "GM", "SM", "OT", "RF", "DOC", "IVUS", "VL"})
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and .7.1 to .7.4 (multi-frame)
_ENCAPSULATED = "1.2.840.10008.5.1.4.1.1.104."  # PDF, CDA, STL, OBJ, MTL
_VIDEO = frozenset({
    "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic
    "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic
    "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic
})
_ULTRASOUND = frozenset({"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1"})
_BURNED_IN = 0x00280301
_MODALITY = 0x00080060
_SOP_CLASS = 0x00080016
_IMAGE_TYPE = 0x00080008
_SERIES_DESCRIPTION = 0x0008103E


def burned_in_reason(ds: Dataset) -> str | None:
    """Why ``ds`` may carry text in its pixels or document (None when nothing says so).

    BurnedInAnnotation YES always counts; NO is believed. Without it: a Secondary Capture,
    encapsulated document, video or ultrasound SOP class, an ImageType or a
    SeriesDescription naming a screen save (CTP's and pydicom/deid's blacklist), or a
    modality that often annotates its images. Objects without Pixel Data or a document
    carry no such text."""
    flag = first_text(ds, _BURNED_IN).upper()
    sop_class = first_text(ds, _SOP_CLASS)
    has_content = 0x7FE00010 in ds._dict or 0x00420011 in ds._dict  # Pixel Data, Encapsulated Document
    if not has_content:
        return None
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag == "NO":
        return None
    if sop_class == _SECONDARY_CAPTURE or sop_class.startswith(_SECONDARY_CAPTURE + "."):
        return "a Secondary Capture without BurnedInAnnotation NO"
    if sop_class.startswith(_ENCAPSULATED):
        return "an encapsulated document without BurnedInAnnotation NO"
    if sop_class in _VIDEO:
        return "a video without BurnedInAnnotation NO"
    if sop_class in _ULTRASOUND:
        return "an ultrasound image without BurnedInAnnotation NO"
    image_type = " ".join(texts(ds, _IMAGE_TYPE)).upper()
    if "SAVE" in image_type:
        return "ImageType names a screen save, BurnedInAnnotation is absent"
    if "SAVE" in first_text(ds, _SERIES_DESCRIPTION).upper():  # the same sign where ImageType lost it
        return "SeriesDescription names a screen save, BurnedInAnnotation is absent"
    modality = first_text(ds, _MODALITY).upper()
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} often has burned-in text, BurnedInAnnotation is absent"
    return None


_NATIVE = ("", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_RLE = "1.2.840.10008.1.2.5"
# The largest frame decoded to clear or check its bits (rows x columns x samples x bytes
# per sample, as the frame declares it): PackBits codes 128 equal bytes in 2, and a
# JPEG 2000 codestream of a constant image is a few hundred bytes whatever its size, so a
# sender's few kilobytes may declare a frame of gigabytes. Clearing an RLE frame holds
# about 12 bytes per pixel of a 16-bit frame at once (measured: 4096 x 4096 from 0.5 MB
# sent took 195 MB); decoding JPEG 2000 about 3 times the frame (8192 x 8192, 1.5 KB
# sent: 392 MB). An 8192 x 8192 frame of 16-bit RGB (384 MiB) is beyond what a
# modality writes in one frame (slide scanners write tiles); a larger one is
# quarantined, never decoded.
MAX_FRAME_BYTES = 384 << 20


# The most the frames of one object may take decoded at once: pydicom's ``pixel_array``
# and ``decompress`` decode every frame into one array (the pixel step and the burned-in
# step read a radiograph, or a cine of 100 640 x 480 RGB frames: 92 MB).
MAX_DECODED_BYTES = 2 << 30


def decoded_size_problem(ds: Dataset) -> str | None:
    """Why the compressed Pixel Data of ``ds`` must not be decoded whole, or None when it
    may (or is not compressed). The sizes are those the data declares, as the decoders
    allocate them: Rows x Columns x SamplesPerPixel x BitsAllocated / 8 per frame for
    RLE and for pydicom's array of all frames, the codestream header's for each JPEG,
    JPEG-LS or JPEG 2000 frame (:func:`_codestream_header`; a few kilobytes of JPEG 2000
    may declare gigabytes). A frame over :data:`MAX_FRAME_BYTES`, all frames over
    :data:`MAX_DECODED_BYTES`, or a JPEG-family frame whose header declares no size is a
    problem. Native (and deflated, inflated when read) Pixel Data is in memory already:
    None."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax in _NATIVE or syntax == "1.2.840.10008.1.2.1.99" or 0x7FE00010 not in ds._dict:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        allocated = int(ds.get("BitsAllocated", 8) or 8)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, AttributeError):
        return "Pixel Data without a readable Rows, Columns, SamplesPerPixel, BitsAllocated or NumberOfFrames"
    frame = rows * columns * samples * max(1, (allocated + 7) // 8)
    if frame > MAX_FRAME_BYTES:
        return f"a frame larger than {MAX_FRAME_BYTES >> 20} MiB decoded"
    if frame * n_frames > MAX_DECODED_BYTES:
        return f"frames larger than {MAX_DECODED_BYTES >> 20} MiB decoded"
    if syntax == _RLE:
        return None
    from pydicom.encaps import generate_frames

    value = ds.get_item(0x7FE00010).value
    if not isinstance(value, (bytes, bytearray)):
        return None
    try:
        frames = generate_frames(bytes(value), number_of_frames=n_frames)
        total = 0
        for f in frames:
            header = _codestream_header(f)
            if header is None:
                return "a compressed frame whose codestream header declares no size"
            size = _decoded_bytes(header)
            if size > MAX_FRAME_BYTES:
                return f"a compressed frame larger than {MAX_FRAME_BYTES >> 20} MiB decoded"
            total += size
            if total > MAX_DECODED_BYTES:
                return f"compressed frames larger than {MAX_DECODED_BYTES >> 20} MiB decoded"
    except Exception as exc:  # pydicom's parser: any malformed item
        return f"compressed Pixel Data unreadable ({type(exc).__name__})"
    return None


def zero_unused_high_bits(ds: Dataset) -> bool:
    """Clear the bits of Pixel Data outside BitsStored (where retired overlays were
    embedded, PS3.5 8.1.2 before 2008); signed data keeps its sign extension. Native
    and RLE Lossless Pixel Data (RLE keeps every byte of a word); the other compressed
    syntaxes code BitsStored bits per sample. Returns whether Pixel Data changed (it is
    left as read, undecoded, when not).

    Raises:
        ValueError: RLE Pixel Data whose frames cannot be read (no value in the message).
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if 0x7FE00010 not in ds._dict:
        return False
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        high = int(ds.get("HighBit", stored - 1))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
    except (TypeError, ValueError, AttributeError):
        return False
    if allocated not in (8, 16, 32) or stored >= allocated:
        return False
    if not stored - 1 <= high < allocated:
        raise ValueError("HighBit outside BitsAllocated, or below BitsStored - 1")
    elem = ds.get_item(0x7FE00010)  # the raw element where it is one: read, not converted
    value = elem.value
    if not isinstance(value, (bytes, bytearray)):
        return False
    undefined = elem.length == 0xFFFFFFFF if isinstance(elem, RawDataElement) else elem.is_undefined_length
    if syntax == _RLE:
        if not undefined:
            raise ValueError("RLE Pixel Data not encapsulated")
        data = _cleared_rle(ds, bytes(value), allocated, stored, high, signed)
    elif syntax in _NATIVE or not undefined:  # deflated: inflated when read, native here
        if undefined:
            return False
        data = _cleared_native(ds, value, syntax, allocated, stored, high, signed)
    else:
        _check_compressed(ds, bytes(value), stored, high, signed)
        _drop_extended_offsets(ds)  # the frames checked are those found without it
        return False
    if data is None:
        return False
    if isinstance(elem, RawDataElement):
        ds._dict[elem.tag] = elem._replace(value=data, length=0xFFFFFFFF if undefined else len(data))
    else:
        elem.value = data
    return True


def _check_compressed(ds: Dataset, value: bytes, stored: int, high: int, signed: bool) -> None:
    """Raise ValueError when the frames of another compressed syntax (JPEG, JPEG-LS,
    JPEG 2000) may hold bits outside BitsStored and do: a codestream whose precision is
    above BitsStored (dcmtk's JPEG Lossless codes 16 bits of a 12-bit image) is decoded
    (pylibjpeg's own API: pydicom's pixel machinery may have been kept out of this
    process, see node.cli) and looked at. This step cannot re-encode such frames; the
    object is quarantined. A frame is decoded only when its codestream header says how
    large it is, at most :data:`MAX_FRAME_BYTES` (the decoder allocates what the header
    declares, whatever Rows and Columns say)."""
    from pydicom.encaps import generate_frames

    try:
        frames = list(generate_frames(value, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except Exception as exc:  # pydicom's parser: any malformed item
        raise ValueError(f"compressed Pixel Data unreadable ({type(exc).__name__})") from None
    for frame in frames:
        after = frame[_codestream_end(frame) :]
        if len(after) > 1 and after.strip(b"\0\xff"):  # padding (0x00, or 0xFF as some encoders write) is no data
            raise ValueError("compressed frame with bytes after its codestream's end, which this step cannot check")
    headers = [_codestream_header(f) for f in frames]
    if high == stored - 1 and all(h is not None and h[0] <= stored for h in headers):
        return
    import numpy as np

    for frame, header in zip(frames, headers):
        if header is None:  # its size unknown: decoding it could take any memory
            raise ValueError("compressed frame whose codestream header cannot be read, so its bits above BitsStored cannot be checked")
        if _decoded_bytes(header) > MAX_FRAME_BYTES:
            raise ValueError(f"compressed frame larger than {MAX_FRAME_BYTES >> 20} MiB decoded")
        try:
            import pylibjpeg

            arr = np.asarray(pylibjpeg.decode(frame))
        except Exception as exc:  # no decoder for it, or a frame it cannot read: the bits cannot be checked
            raise ValueError(f"compressed frames could not be decoded to check the bits above BitsStored ({type(exc).__name__})") from None
        words = arr.view(f"u{arr.dtype.itemsize}") if arr.dtype.kind == "i" else arr
        if words.dtype.kind != "u" or not np.array_equal(_cleared(words, stored, high, signed), words):
            raise ValueError("bits above BitsStored set in compressed frames, which this step cannot re-encode")


def _codestream_end(frame: bytes) -> int:
    """Where a JPEG, JPEG-LS (after EOI) or JPEG 2000 (after EOC) codestream ends in
    ``frame``; 0 when it cannot be walked (then the whole frame counts as after it).
    JPEG 2000: main header segments, then tile-parts by their length (Psot); JPEG and
    JPEG-LS: marker segments, and in scan data the next marker (0xFF then 0xC0 or more,
    not a restart marker: stuffed bytes and JPEG-LS's bit stuffing are below 0xC0)."""
    n = len(frame)
    if frame[:4] == b"\xff\x4f\xff\x51":  # J2K
        i = 2
        while i + 4 <= n and frame[i] == 0xFF and frame[i + 1] != 0x90:  # main header, up to SOT
            i += 2 + int.from_bytes(frame[i + 2 : i + 4], "big")
        while i + 12 <= n and frame[i : i + 2] == b"\xff\x90":  # tile-parts
            psot = int.from_bytes(frame[i + 6 : i + 10], "big")
            if psot == 0:  # the last tile-part: up to EOC
                return n if frame[n - 2 : n] == b"\xff\xd9" else 0
            i += psot
        return i + 2 if frame[i : i + 2] == b"\xff\xd9" else 0
    if frame[:2] != b"\xff\xd8":
        return 0
    i = 2
    while i + 2 <= n:
        if frame[i] != 0xFF:
            return 0
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            return i + 2
        if 0xD0 <= marker <= 0xD7:  # a restart marker between scan data
            i += 2
        else:
            i += 2 + int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in (0xDA, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7):  # scan data follows: to the next marker
            while i + 1 < n and not (frame[i] == 0xFF and frame[i + 1] >= 0xC0 and not 0xD0 <= frame[i + 1] <= 0xD7 and frame[i + 1] != 0xFF):
                i += 1 + (frame[i] == 0xFF and 0xD0 <= frame[i + 1] <= 0xD7)
    return 0


def _codestream_header(frame: bytes) -> tuple[int, int, int, int] | None:
    """(precision, rows, columns, components) a JPEG (SOFn), JPEG-LS (SOF55) or JPEG 2000
    (SIZ) codestream declares (the largest precision of its components), or None when it
    is none of these or declares no size (a JPEG whose line count comes later, in DNL)."""
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 42:  # J2K: SOC, SIZ; Csiz at 40
        xsiz, ysiz, x0, y0 = struct.unpack(">4L", frame[8:24])
        n = int.from_bytes(frame[40:42], "big")
        sizes = frame[42 : 42 + 3 * n : 3]
        if len(sizes) != n or not n or xsiz <= x0 or ysiz <= y0:
            return None
        return max((s & 0x7F) + 1 for s in sizes), ysiz - y0, xsiz - x0, n
    if frame[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 < len(frame):
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if i + 10 > len(frame):
                return None
            precision, rows, columns, components = struct.unpack(">BHHB", frame[i + 4 : i + 10])
            return (precision, rows, columns, components) if rows and columns and components else None
        i += 2 + int.from_bytes(frame[i + 2 : i + 4], "big")
    return None


def _decoded_bytes(header: tuple[int, int, int, int]) -> int:
    """The bytes a decoder allocates for a frame whose codestream declares ``header``
    (:func:`_codestream_header`): rows x columns x components x bytes per sample."""
    precision, rows, columns, components = header
    return rows * columns * components * (1 if precision <= 8 else 2 if precision <= 16 else 4)


def _cleared(words, stored: int, high: int, signed: bool):
    """``words`` with the bits outside [high - stored + 1, high] cleared (signed: set
    to the sign's extension above high)."""
    import numpy as np

    dtype = words.dtype
    allocated = dtype.itemsize * 8
    low = high - stored + 1
    cleared = (words & dtype.type(((1 << stored) - 1) << low)).astype(dtype)
    if signed:
        sign = dtype.type(1 << high)
        extension = dtype.type(((1 << allocated) - 1) ^ ((1 << (high + 1)) - 1))
        cleared = np.where(cleared & sign, cleared | extension, cleared).astype(dtype)
    return cleared


def _cleared_native(ds: Dataset, value: bytes, syntax: str, allocated: int, stored: int, high: int, signed: bool) -> bytes | None:
    import numpy as np

    little = syntax != "1.2.840.10008.1.2.2" if syntax else getattr(ds, "original_encoding", (None, True))[1] is not False  # a bare data set: as read
    dtype = np.dtype(f"{'<' if little else '>'}u{allocated // 8}")
    n = len(value) // dtype.itemsize
    words = np.frombuffer(value, dtype, n)
    cleared = _cleared(words, stored, high, signed)  # numpy computes in native order: back to the data's
    if np.array_equal(cleared, words):
        return None
    return cleared.astype(dtype).tobytes() + bytes(value[n * dtype.itemsize :])


def _cleared_rle(ds: Dataset, value: bytes, allocated: int, stored: int, high: int, signed: bool) -> bytes | None:
    """Encapsulated RLE Pixel Data with the bits outside BitsStored cleared in every
    frame, or None when none was set and the Pixel Data holds nothing but the frames
    read. Only the byte planes that change are re-encoded, and those whose segment holds
    bytes beyond the frame's (:func:`rle.decode_segment_exact`); frames split over
    several fragments are written one fragment each; an Extended Offset Table is dropped
    (a decoder that follows it reads fragments this step did not: the frames are found
    by the Basic Offset Table or one fragment per frame, as they were read here)."""
    import numpy as np
    from pydicom.encaps import encapsulate, generate_frames, parse_fragments

    from node.deid import rle

    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        size = int(ds.Rows) * int(ds.Columns)
    except Exception as exc:
        raise ValueError(f"RLE Pixel Data unreadable ({type(exc).__name__})") from None
    if size * samples * (allocated // 8) > MAX_FRAME_BYTES:
        raise ValueError(f"RLE frame larger than {MAX_FRAME_BYTES >> 20} MiB decoded")
    try:
        frames = list(generate_frames(value, number_of_frames=n_frames))
        fragments = parse_fragments(value[8 + int.from_bytes(value[4:8], "little") :])[0]  # after the Basic Offset Table
    except Exception as exc:  # pydicom's parser: any malformed item
        raise ValueError(f"RLE Pixel Data unreadable ({type(exc).__name__})") from None
    planes = allocated // 8
    dtype = np.dtype(f"u{planes}")
    changed = _drop_extended_offsets(ds) | (fragments != len(frames))  # both: the table goes in any case
    out: list[bytes] = []
    for frame in frames:
        segments = rle.split_frame(frame)
        if len(segments) != samples * planes:
            raise ValueError("RLE frame whose segment count is not SamplesPerPixel x BitsAllocated / 8")
        for s in range(samples):
            idx = range(s * planes, (s + 1) * planes)
            decoded = [rle.decode_segment_exact(segments[i], size) for i in idx]
            raw = [np.frombuffer(plane, np.uint8) for plane, _ in decoded]
            words = np.zeros(size, dtype)
            for k, plane in enumerate(raw):
                words |= plane.astype(dtype) << (8 * (planes - 1 - k))
            cleared = _cleared(words, stored, high, signed)
            for k, i in enumerate(idx):
                plane = ((cleared >> (8 * (planes - 1 - k))) & 0xFF).astype(np.uint8)
                if not decoded[k][1] or not np.array_equal(plane, raw[k]):
                    segments[i] = rle.encode_segment(plane.tobytes(), int(ds.Columns))
                    changed = True
        out.append(rle.join_frame(segments))
    if not changed:
        return None
    return encapsulate(out, has_bot=value[4:8] != b"\0\0\0\0")


def _drop_extended_offsets(ds: Dataset) -> bool:
    """Remove the Extended Offset Table (and its lengths); returns whether there was one.
    It may point at other fragments than the Basic Offset Table (or one fragment per
    frame) that this step reads, so it cannot stay beside frames checked without it."""
    found = False
    for tag in (0x7FE00001, 0x7FE00002):
        if tag in ds._dict:
            del ds[tag]
            found = True
    return found
