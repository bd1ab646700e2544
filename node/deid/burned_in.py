"""Pixel hygiene that belongs to the header step: may this object carry burned-in text,
and the overlay bits some objects store in the unused high bits of Pixel Data.

Which objects carry burned-in text: PS3.15 E.3.1 leaves it to the de-identifier; the
signs used here are those of the CTP/pydicom-deid blacklists (Secondary Capture and
screen saves, whatever Modality says; documents; video; ultrasound and other projection
modalities that annotate their images), and BurnedInAnnotation where the sender set it.
"""

from __future__ import annotations

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


def zero_unused_high_bits(ds: Dataset) -> bool:
    """Clear the bits of native Pixel Data outside BitsStored (where retired overlays
    were embedded, PS3.5 8.1.2 before 2008); signed data keeps its sign extension.
    Returns whether Pixel Data changed (it is left as read, undecoded, when not).
    Encapsulated (compressed) data has no such bits.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in ("", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2") or 0x7FE00010 not in ds._dict:
        return False
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        high = int(ds.get("HighBit", stored - 1))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
    except (TypeError, ValueError, AttributeError):
        return False
    if allocated not in (8, 16, 32) or stored >= allocated:
        return False
    import numpy as np

    elem = ds.get_item(0x7FE00010)  # the raw element where it is one: read, not converted
    value = elem.value
    if elem.length == 0xFFFFFFFF if isinstance(elem, RawDataElement) else elem.is_undefined_length:
        return False
    if not isinstance(value, (bytes, bytearray)):
        return False
    little = syntax != "1.2.840.10008.1.2.2" if syntax else getattr(ds, "original_encoding", (None, True))[1] is not False  # a bare data set: as read
    order = "<" if little else ">"
    dtype = np.dtype(f"{order}u{allocated // 8}")
    n = len(value) // dtype.itemsize
    words = np.frombuffer(value, dtype, n)
    low = high - stored + 1
    mask = dtype.type(((1 << stored) - 1) << low)
    cleared = (words & mask).astype(dtype)  # numpy computes in native order: back to the data's
    if signed:
        sign = dtype.type(1 << high)
        extension = dtype.type(((1 << allocated) - 1) ^ ((1 << (high + 1)) - 1))
        cleared = np.where(cleared & sign, cleared | extension, cleared).astype(dtype)
    if np.array_equal(cleared, words):
        return False
    data = cleared.tobytes() + bytes(value[n * dtype.itemsize :])
    if isinstance(elem, RawDataElement):
        ds._dict[elem.tag] = elem._replace(value=data)  # same length
    else:
        elem.value = data
    return True
