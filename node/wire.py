"""Fast paths for the C-STORE handler: read the few attributes a row needs from the
encoded dataset, and prepend a Part 10 header to it, without a full pydicom round trip.
"""

from __future__ import annotations

import io
import struct

from pydicom.filereader import read_dataset

from node.deid.deidentify import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

# The row's attributes: SOP Instance UID, Modality, Study and Series Instance UID.
ROW_TAGS = [0x00080018, 0x00080060, 0x0020000D, 0x0020000E]


def row_attributes(encoded: bytes, implicit_vr: bool, little_endian: bool) -> dict[str, str]:
    """SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID and Modality of an encoded
    dataset (empty strings for absent ones). Reading stops after (0020,000E).

    Raises:
        Exception: the bytes are not a decodable dataset.
    """
    ds = read_dataset(io.BytesIO(encoded), implicit_vr, little_endian, stop_when=lambda tag, vr, length: tag > 0x0020000E, specific_tags=ROW_TAGS)
    return {kw: str(ds.get(kw, "") or "").strip("\x00 ") for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")}


def _elem(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def _text(s: str) -> bytes:
    b = s.encode("ascii")
    return b + b" " if len(b) % 2 else b


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str = "") -> bytes:
    """Preamble, 'DICM' and the File Meta Information (PS3.10 7.1) for a dataset."""
    body = b"".join(
        [
            _elem(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _elem(0x0002, 0x0002, b"UI", _ui(sop_class)),
            _elem(0x0002, 0x0003, b"UI", _ui(sop_instance)),
            _elem(0x0002, 0x0010, b"UI", _ui(transfer_syntax)),
            _elem(0x0002, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _elem(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION)),
        ]
        + ([_elem(0x0002, 0x0016, b"AE", _text(source_ae))] if source_ae else [])
    )
    return b"\x00" * 128 + b"DICM" + _elem(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body
