"""Fast paths for the C-STORE handler: read the few attributes a row needs from the
encoded dataset, and prepend a Part 10 header to it, without a full pydicom round trip.
"""

from __future__ import annotations

import functools
import io
import struct

from pydicom import Dataset
from pydicom.datadict import DicomDictionary, RepeatersDictionary, dictionary_VR, private_dictionaries, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset


# What casemask writes as its implementation in every file meta it creates.
IMPLEMENTATION_CLASS_UID = "2.25.190912847460651377245473512196128309533"
IMPLEMENTATION_VERSION = "CASEMASK_010"

# The attributes the C-STORE handler reads: SOP Class and Instance UID, Modality,
# Patient ID and its issuer (only to tell two objects under one SOP Instance UID apart,
# kept as a keyed hash), Study and Series Instance UID. All precede (0020,000E).
ROW_TAGS = [0x00080016, 0x00080018, 0x00080060, 0x00100020, 0x00100021, 0x0020000D, 0x0020000E]
ROW_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID")
_LAST_ROW_TAG = 0x0020000E


_ROW_KEYWORDS = dict(zip(ROW_TAGS, ROW_KEYWORDS))
_UI_TAGS = frozenset((0x00080016, 0x00080018, 0x0020000D, 0x0020000E))
_UI_KEYWORDS = frozenset(_ROW_KEYWORDS[t] for t in _UI_TAGS)


def _ui_value(text: str) -> str:
    """A UI value as pydicom reads it: trailing NULs and spaces dropped, then each
    backslash-separated value stripped of whitespace."""
    return "\\".join(part.strip() for part in text.rstrip("\x00 ").split("\\"))
# VRs whose explicit-VR header has a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"))
_LONG_VRS = frozenset(v.encode() for v in LONG_VRS)
_VR_NAMES = frozenset(v.encode() for v in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL",
                                            "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"))
_SEQUENCE_DELIMITER, _ITEM, _ITEM_DELIMITER = 0xFFFEE0DD, 0xFFFEE000, 0xFFFEE00D
_ITEM_BYTES = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
# Every two upper-case letters -> whether that VR has a 4-byte length (what _header decides).
_VR_IS_LONG = {bytes((a, c)): bytes((a, c)) in _LONG_VRS for a in range(65, 91) for c in range(65, 91)}


class _Unusual(Exception):
    """Something the scanner does not handle: let pydicom read it."""


class Incomplete(ValueError):
    """The data set ends inside an element, or an element's length runs past its end."""


class Refused(ValueError):
    """A data set the node will not take: sequences nested deeper than
    :data:`MAX_SEQUENCE_DEPTH`, or File Meta elements (group 0002) among its elements."""


# Sequences inside sequences, at most. pydicom reads and writes about 190 levels before
# a RecursionError (pydicom 3, default recursion limit, measured); de-identification
# recurses too. Real objects (SR content trees included) stay far below 64.
MAX_SEQUENCE_DEPTH = 64

# Sequence items in one data set. pydicom makes a Dataset of each item: 1M empty items
# (7.8 MB sent) cost it 23.5 s of CPU and 659 MB of memory (measured), so max_object_mb
# (4096 by default) of them would take the worker's memory hundreds of times over, and
# the object, claimed again after each crash, again. Real objects stay far below: an RT
# Structure Set of 10^5 contours holds some 2 x 10^5 items, an enhanced multi-frame
# object some ten per frame. Beyond DENSE_ITEMS_FREE items, a data set must also carry
# MIN_ITEM_BYTES per item on average (empty items are 8 bytes; real ones carry elements).
MAX_SEQUENCE_ITEMS = 1_000_000
DENSE_ITEMS_FREE = 10_000
MIN_ITEM_BYTES = 32


def row_attributes(encoded: bytes, implicit_vr: bool, little_endian: bool, complete: bool = True) -> dict[str, str]:
    """The :data:`ROW_KEYWORDS` attributes of an encoded dataset (empty strings for
    absent ones). Reading stops after (0020,000E).

    Little-endian data is scanned element by element here (skipping sequences without
    decoding them); anything the scanner finds unusual, and big endian, is read by
    pydicom, which also raises for data that cannot be decoded. ``complete=False`` says
    ``encoded`` is only the beginning of the data set: the scanner must then reach an
    element after (0020,000E) within it, and nothing is left to pydicom.

    Raises:
        Exception: the bytes are not a decodable dataset (``_Unusual`` when
            ``complete=False`` and the beginning does not hold every row attribute).
    """
    if little_endian:
        try:
            return _scan(encoded, implicit_vr, complete)
        except (_Unusual, struct.error, UnicodeDecodeError):
            if not complete:
                raise _Unusual from None
    elif not complete:
        raise _Unusual
    ds = read_dataset(io.BytesIO(encoded), implicit_vr, little_endian, stop_when=lambda tag, vr, length: tag > _LAST_ROW_TAG, specific_tags=ROW_TAGS)
    return _from_pydicom(ds)


def row_attributes_from_file(fp, implicit_vr: bool, little_endian: bool) -> dict[str, str]:
    """As :func:`row_attributes`, read by pydicom from a file positioned at the data set
    (values longer than 4 KiB are skipped, not read into memory).

    Raises:
        Exception: the data cannot be decoded.
    """
    ds = read_dataset(fp, implicit_vr, little_endian, stop_when=lambda tag, vr, length: tag > _LAST_ROW_TAG, defer_size=4096, specific_tags=ROW_TAGS)
    return _from_pydicom(ds)


def _from_pydicom(ds: Dataset) -> dict[str, str]:
    """Values as the scanner gives them: a multi-valued one joined with backslashes."""
    return {kw: "\\".join(str(v) for v in _values(ds.get(kw, ""))).strip("\x00 ") for kw in ROW_KEYWORDS}


def _scan(b: bytes, implicit: bool, complete: bool = True) -> dict[str, str]:
    out = dict.fromkeys(ROW_KEYWORDS, "")
    pos, end = 0, len(b)
    while pos < end:
        tag, length, pos, nested_implicit = _header(b, pos, implicit)
        if tag > _LAST_ROW_TAG:
            return out
        if length == 0xFFFFFFFF:
            pos = _skip_sequence(b, pos, nested_implicit)
            continue
        if pos + length > end:
            raise _Unusual
        keyword = _ROW_KEYWORDS.get(tag)
        if keyword:
            text = b[pos : pos + length].decode("ascii")
            out[keyword] = (_ui_value(text) if tag in _UI_TAGS else text).strip("\x00 ")
        pos += length
    if not complete:
        raise _Unusual  # the beginning ended before (0020,000E) was passed
    return out


def dataset_end(b, implicit: bool, start: int = 0) -> int:
    """Walk the top-level elements of a little-endian data set that starts at ``start``
    in ``b`` (bytes or an mmap), skipping values and sequences, and return where the
    last one ends (``len(b)`` for a whole data set).

    Raises:
        Incomplete: an element's header or value runs past the end of ``b``, or an
            undefined-length value has no delimiter before it.
        Refused: a File Meta element (group 0002, PS3.10 7.1) at the top level,
            undefined-length sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH`,
            more than :data:`MAX_SEQUENCE_ITEMS` sequence items, or more than
            :data:`DENSE_ITEMS_FREE` of fewer than :data:`MIN_ITEM_BYTES` on average.
        ValueError: the structure cannot be followed (a sequence item without an item
            tag, for instance).
    """
    return _walk(b, implicit, start, None)


def item_tags_problem(fp, size: int) -> str:
    """For a data set that is not walked by :func:`dataset_end` (big endian): why its
    sequence items break the limits of :func:`dataset_end`; "" when they do not. Its
    elements are followed (explicit VR big endian, into sequences), so that a value's
    bytes (Pixel Data above all) are not taken for items; when the structure cannot be
    followed, the item tags (FFFE,E000) are counted as bytes in the whole data set
    instead, a value's bytes that happen to spell the tag too (an over-count refuses only
    a data set made of them). ``fp``: at the data set's start, ``size`` bytes of it (read
    whole: pydicom reads it whole right after, within the same budget)."""
    data = fp.read(size)
    items = [0]
    try:
        _walk_big_endian(data, 0, len(data), items, 0, False)
    except Refused as exc:
        return str(exc)
    except (_Unusual, struct.error, IndexError):
        items[0] = data.count(b"\xff\xfe\xe0\x00")
        if items[0] > MAX_SEQUENCE_ITEMS:
            return f"more than {MAX_SEQUENCE_ITEMS} sequence items"
    if items[0] > DENSE_ITEMS_FREE and size < MIN_ITEM_BYTES * items[0]:
        return f"more than {DENSE_ITEMS_FREE} sequence items of fewer than {MIN_ITEM_BYTES} bytes on average"
    return ""


_BE_TAG_LENGTH = struct.Struct(">HHI")


def _walk_big_endian(b: bytes, pos: int, end: int, items: list[int], depth: int, in_item: bool) -> int:
    """Walk the explicit VR big endian elements of ``b[pos:end]`` (``in_item``: an
    undefined-length item's, up to its delimiter), counting the items of their sequences;
    the position after them. A UN value of defined length is skipped (pydicom keeps it as
    bytes in big endian) with its item tags, both byte orders, counted as bytes.

    Raises:
        Refused: more than :data:`MAX_SEQUENCE_ITEMS` items.
        _Unusual, struct.error, IndexError: a structure this does not follow (the
            caller counts the tags as bytes).
    """
    while pos < end:
        group, element = struct.unpack_from(">HH", b, pos)
        if group == 0xFFFE:
            if in_item and element == 0xE00D:
                return pos + 8
            raise _Unusual
        vr = b[pos + 4 : pos + 6]
        if vr not in _VR_NAMES:
            raise _Unusual  # pydicom would read it as implicit VR: a sequence by the dictionary
        if vr in _LONG_VRS:
            length, value = struct.unpack_from(">I", b, pos + 8)[0], pos + 12
        else:
            length, value = struct.unpack_from(">H", b, pos + 6)[0], pos + 8
        if vr == b"SQ":
            if depth >= MAX_SEQUENCE_DEPTH:
                raise Refused(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
            if length == 0xFFFFFFFF:
                pos = _big_endian_items(b, value, None, items, depth + 1)
                continue
            if value + length > end:
                raise _Unusual
            _big_endian_items(b, value, value + length, items, depth + 1)
        elif length == 0xFFFFFFFF or value + length > end:
            raise _Unusual
        elif vr == b"UN":
            _count_item_tags(b, value, value + length, items, b"\xff\xfe\xe0\x00")
            _count_item_tags(b, value, value + length, items)
        pos = value + length
    if in_item:
        raise _Unusual  # no item delimiter
    return pos


def _big_endian_items(b: bytes, pos: int, end: int | None, items: list[int], depth: int) -> int:
    """Walk the items of a big endian sequence value from ``pos`` (to ``end``, or past
    its sequence delimiter when None); the position after it."""
    stop = len(b) if end is None else end
    while pos < stop:
        group, element, length = _BE_TAG_LENGTH.unpack_from(b, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER and end is None:
            return pos + 8
        if tag != _ITEM:
            raise _Unusual
        _count_item(items)
        if length == 0xFFFFFFFF:
            pos = _walk_big_endian(b, pos + 8, len(b), items, depth, True)
            continue
        if pos + 8 + length > stop:
            raise _Unusual
        _walk_big_endian(b, pos + 8, pos + 8 + length, items, depth, False)
        pos += 8 + length
    if end is None:
        raise _Unusual  # no sequence delimiter
    return pos


def scan_whole(b, implicit: bool, start: int = 0) -> tuple[dict[str, str] | None, int]:
    """:func:`dataset_end` and the row attributes in one walk: (attributes, end). The
    attributes are None when a value needs pydicom (not ASCII): use :func:`row_attributes`.

    Raises:
        Incomplete, Refused, ValueError: as :func:`dataset_end`.
    """
    out = dict.fromkeys(ROW_KEYWORDS, "")
    end = _walk(b, implicit, start, out)
    return (None if out.pop("", None) else out), end


def _walk(b, implicit: bool, start: int, rows: dict[str, str] | None) -> int:
    pos, end = start, len(b)
    items = [0]  # sequence items walked so far (_count_item)
    creators: dict[int, tuple[str, ...]] = {}  # private creators seen: (group << 8 | block) -> its names that have sequences (_private_sequence)
    u16, u32, vr_is_long, wanted, sequences = _U16.unpack_from, _U32.unpack_from, _VR_IS_LONG.get, _ROW_KEYWORDS, _SEQUENCE_TAGS_AS_READ
    previous = -1
    try:
        while pos < end:
            if end - pos < 8:
                raise Incomplete("the data set ends inside an element header")
            if b[pos] == 0x02 and b[pos + 1] == 0x00:  # group 0002 belongs to the File Meta only
                raise Refused("a File Meta element (group 0002) inside the data set")
            # PS3.5 7.1: ascending tags, each once. The row's attributes are the first
            # copy's, pydicom keeps the last: a repeated SOP Instance UID would let the
            # checked UID differ from the one de-identified and sent on.
            v = u32(b, pos)[0]
            tag = (v & 0xFFFF) << 16 | v >> 16
            if tag <= previous:
                raise Refused("elements out of ascending tag order, or repeated")
            previous = tag
            # the hot loop of every C-STORE: _header() inlined
            if implicit or (b[pos] == 0xFE and b[pos + 1] == 0xFF):  # item and delimiter tags have no VR
                length, value, nested, vr = u32(b, pos + 4)[0], pos + 8, implicit, None
            else:
                vr = b[pos + 4 : pos + 6]
                is_long = vr_is_long(vr)
                if is_long:
                    length, value, nested = u32(b, pos + 8)[0], pos + 12, vr == b"UN"
                elif is_long is None:
                    raise _Unusual
                else:
                    length, value, nested = u16(b, pos + 6)[0], pos + 8, False
            if length == 0xFFFFFFFF:
                pos = _skip_sequence(b, value, nested, 1, items)
                continue
            if length and (vr == b"SQ" or ((implicit or vr == b"UN") and u32(b, pos)[0] in sequences)):
                _check_nesting(b, value, value + length, nested, 1, items)  # defined-length items: nesting counted too
            elif b[pos] & 1 and length and _private_sequence(b, tag, value, length, creators, implicit or vr == b"UN"):
                _check_nesting(b, value, value + length, nested, 1, items)
            if rows is not None:
                keyword = wanted.get(tag)
                if tag > _LAST_ROW_TAG:
                    rows = None  # read as pydicom reads them: up to (0020,000E)
                elif keyword and value + length <= end:
                    try:
                        text = b[value : value + length].decode("ascii")
                        rows[keyword] = (_ui_value(text) if keyword in _UI_KEYWORDS else text).strip("\x00 ")
                    except UnicodeDecodeError:
                        rows[""] = "pydicom"
            pos = value + length
            if pos > end:
                raise Incomplete("an element's value runs past the end of the data set")
    except (struct.error, IndexError):
        raise Incomplete("the data set ends inside an element") from None
    except _Unusual:
        raise ValueError("the data set's structure cannot be followed") from None
    if items[0] > DENSE_ITEMS_FREE and pos - start < MIN_ITEM_BYTES * items[0]:
        raise Refused(f"more than {DENSE_ITEMS_FREE} sequence items of fewer than {MIN_ITEM_BYTES} bytes on average")
    return pos


def _count_item(items: list[int] | None) -> None:
    """One more sequence item in the data set being walked.

    Raises:
        Refused: more than :data:`MAX_SEQUENCE_ITEMS`.
    """
    if items is not None:
        items[0] += 1
        if items[0] > MAX_SEQUENCE_ITEMS:
            raise Refused(f"more than {MAX_SEQUENCE_ITEMS} sequence items")


def _header(b: bytes, pos: int, implicit: bool) -> tuple[int, int, int, bool]:
    """(tag, value length, value position, whether a sequence value is implicit VR)."""
    group, element = struct.unpack_from("<HH", b, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:  # item and delimiter tags have no VR
        return tag, struct.unpack_from("<I", b, pos + 4)[0], pos + 8, implicit
    vr = b[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        # UN of undefined length is a sequence encoded in implicit VR (PS3.5 6.2.2)
        return tag, struct.unpack_from("<I", b, pos + 8)[0], pos + 12, vr == b"UN"
    if not vr.isalpha() or not vr.isupper():
        raise _Unusual
    return tag, struct.unpack_from("<H", b, pos + 6)[0], pos + 8, False


def _skip_sequence(b: bytes, pos: int, implicit: bool, depth: int = 1, items: list[int] | None = None) -> int:
    """Position after an undefined-length sequence whose items start at ``pos``, at
    nesting level ``depth`` (1: a top-level sequence).

    Raises:
        Refused: sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH`.
    """
    if depth > MAX_SEQUENCE_DEPTH:
        raise Refused(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    while True:
        tag, length, pos, _ = _header(b, pos, implicit)
        if tag == _SEQUENCE_DELIMITER:
            return pos
        if tag != _ITEM:
            raise _Unusual
        _count_item(items)
        if length != 0xFFFFFFFF:
            _check_nesting_in_item(b, pos, pos + length, implicit, depth, items)
            pos += length
            continue
        pos = _item_elements(b, pos, None, implicit, depth, items)  # an undefined-length item: up to its delimiter


def _is_sequence(b, pos: int, implicit: bool, creators: dict[int, tuple[str, ...]] | None = None) -> bool:
    """Whether the element whose header starts at ``pos`` holds sequence items: VR SQ,
    or (implicit VR, or explicit UN) a tag the dictionary knows as a sequence, or a
    private tag its creator's private dictionary knows as one (:func:`_private_sequence`;
    ``creators`` are the item's, recorded there too)."""
    vr = None if implicit else bytes(b[pos + 4 : pos + 6])
    if vr == b"SQ":
        return True
    tag = _tag(b, pos)
    if tag >> 16 & 1 and creators is not None:
        if vr is None:
            value, length = pos + 8, _U32.unpack_from(b, pos + 4)[0]
        elif vr in _LONG_VRS:
            value, length = pos + 12, _U32.unpack_from(b, pos + 8)[0]
        else:
            value, length = pos + 8, _U16.unpack_from(b, pos + 6)[0]
        return _private_sequence(b, tag, value, length, creators, vr in (None, b"UN"))
    return vr in (None, b"UN") and tag in _SEQUENCE_TAGS


def _private_sequence(b, tag: int, value: int, length: int, creators: dict[int, tuple[str, ...]], untyped: bool) -> bool:
    """For a private element: record it when it is a private creator (gggg,0010-00FF);
    else, when it has no VR of its own (``untyped``: implicit VR, or UN), whether pydicom
    reads it as a sequence, its creator's private dictionary knowing the element as SQ
    (pydicom then reads its items whatever their first bytes: a first tag that is not an
    item tag is read as an item)."""
    group, element = tag >> 16, tag & 0xFFFF
    if 0x0010 <= element <= 0x00FF:
        text = bytes(b[value : value + min(length, 64)]).decode("latin-1").split("\\")[0]
        creators[group << 8 | element] = tuple({text.rstrip(" \x00"), text.strip(" \x00")} & _PRIVATE_SEQUENCE_CREATORS)
        return False
    names = creators.get(group << 8 | element >> 8) if untyped else None
    if not names:  # no creator, or one whose dictionary has no sequence
        return False
    low = element & 0xFF
    return any((creator, key) in _PRIVATE_SEQUENCES for creator in names for key in (f"{group:04X}xx{low:02X}", f"{group >> 8:02X}xxxx{low:02X}"))


def _tag(b, pos: int) -> int:
    group, element = _HH.unpack_from(b, pos)
    return group << 16 | element


# Tags the data dictionary knows as sequences (VR SQ): pydicom reads their items in
# implicit VR (or written as UN), so their nesting is counted even at a defined length.
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ") | frozenset(
    # repeating groups pydicom's dictionary knows as sequences: (50xx,2600) Curve Referenced
    # Overlay Sequence, xx even from 00 to 1E (PS3.5 7.6)
    int(mask.replace("xx", f"{g:02X}"), 16) for mask, entry in RepeatersDictionary.items() if entry[0] == "SQ" and mask[2:4] == "xx" for g in range(0, 0x20, 2))
# (creator, tag pattern) of the private elements pydicom's private dictionaries know as SQ
# (pydicom.datadict.get_private_entry's two patterns: "ggggxxee" and "ggxxxxee").
_PRIVATE_SEQUENCES = frozenset((creator, key.upper().replace("XX", "xx")) for creator, entries in private_dictionaries.items() for key, entry in entries.items() if entry[0] == "SQ")
_PRIVATE_SEQUENCE_CREATORS = frozenset(creator for creator, _ in _PRIVATE_SEQUENCES)
_SEQUENCE_TAGS_AS_READ = frozenset((t & 0xFFFF) << 16 | t >> 16 for t in _SEQUENCE_TAGS)  # a tag's 4 bytes read as one little-endian u32
_HH = struct.Struct("<HH")


def _check_nesting(b, pos: int, end: int, implicit: bool, depth: int, items: list[int] | None = None) -> None:
    """Refused when the defined-length sequence value ``b[pos:end]`` (at nesting level
    ``depth``) holds sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH`, or items
    beyond the limits. Content the walk cannot follow is left as it was (skipped by its
    length) for pydicom, its item tags counted as bytes (:func:`_count_item_tags`)."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise Refused(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    at, counted = pos, items[0] if items is not None else 0
    try:
        while pos < end:
            at, counted = pos, items[0] if items is not None else 0
            tag, length, pos, _ = _header(b, pos, implicit)
            if tag != _ITEM:
                _count_item_tags(b, at, end, items)
                return
            _count_item(items)
            if length == 0xFFFFFFFF:  # an undefined-length item inside: walked to its delimiter
                pos = _item_elements(b, pos, None, implicit, depth, items)
            else:
                _item_elements(b, pos, pos + length, implicit, depth, items)
                pos += length
    except (_Unusual, Incomplete, struct.error, IndexError):
        if items is not None:
            items[0] = counted  # the item the walk could not follow, and the rest: counted as bytes
        _count_item_tags(b, at, end, items)


def _count_item_tags(b, pos: int, end: int, items: list[int] | None, tag: bytes = _ITEM_BYTES) -> None:
    """Count the item tags spelled in ``b[pos:end]`` as sequence items: the part of a
    defined-length sequence value the walk cannot follow. pydicom reads on past what
    the walk stops at (an element whose VR bytes are not a VR is read as implicit VR, a
    first tag that is not an item tag as an item), so its items are counted as
    :func:`item_tags_problem` counts a big endian data set's: a value's bytes that spell
    the tag count too.

    Raises:
        Refused: more than :data:`MAX_SEQUENCE_ITEMS`.
    """
    if items is None:
        return
    end = min(end, len(b))
    if isinstance(b, bytes):  # one pass in C (an mmap has no count)
        items[0] += b.count(tag, pos, end)
        if items[0] > MAX_SEQUENCE_ITEMS:
            raise Refused(f"more than {MAX_SEQUENCE_ITEMS} sequence items")
        return
    while (pos := b.find(tag, pos, end)) >= 0:
        _count_item(items)
        pos += 4


def _check_nesting_in_item(b, pos: int, end: int, implicit: bool, depth: int, items: list[int] | None = None) -> None:
    """:func:`_check_nesting` for the elements of one defined-length item."""
    counted = items[0] if items is not None else 0
    try:
        _item_elements(b, pos, end, implicit, depth, items)
    except (_Unusual, Incomplete, struct.error, IndexError):
        if items is not None:
            items[0] = counted
        _count_item_tags(b, pos, end, items)


def _item_elements(b, pos: int, end: int | None, implicit: bool, depth: int, items: list[int] | None = None) -> int:
    """Walk one item's elements (up to ``end``, or past its item delimiter when None) of
    a sequence at level ``depth``, descending into the sequences they hold; the position
    after them.

    Raises:
        Refused: sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH`.
        _Unusual, struct.error, IndexError: a structure the walk cannot follow.
    """
    creators: dict[int, tuple[str, ...]] = {}
    while end is None or pos < end:
        at = pos
        tag, length, pos, nested_implicit = _header(b, pos, implicit)
        if tag == _ITEM_DELIMITER:
            return pos
        if length == 0xFFFFFFFF:
            pos = _skip_sequence(b, pos, nested_implicit, depth + 1, items)
            continue
        if length and _is_sequence(b, at, implicit, creators):
            _check_nesting(b, pos, pos + length, nested_implicit, depth + 1, items)
        pos += length
        if pos > len(b):
            raise _Unusual
    return pos


def sequence_elements(value: bytes, implicit: bool) -> list[tuple[int, str | None]]:
    """(tag, VR) of every element inside the items of an encoded little-endian sequence
    value, at any depth (VR None in implicit VR). Raises ``ValueError`` for anything the
    scanner does not follow (a UN element, a private nested sequence in implicit VR,
    malformed items): the caller then decodes the sequence with pydicom."""
    out: list[tuple[int, str | None]] = []
    try:
        _items(value, 0, len(value), implicit, out)
    except (_Unusual, struct.error, IndexError) as exc:
        raise ValueError("sequence not scanned") from exc
    return out


def _items(b: bytes, pos: int, end: int, implicit: bool, out: list) -> int:
    while pos < end:
        tag, length, pos, _ = _header(b, pos, implicit)
        if tag == _SEQUENCE_DELIMITER:
            return pos
        if tag != _ITEM:
            raise _Unusual
        if length == 0xFFFFFFFF:
            pos = _elements(b, pos, None, implicit, out)
        else:
            _elements(b, pos, pos + length, implicit, out)
            pos += length
    if pos != end:
        raise _Unusual
    return pos


def _elements(b: bytes, pos: int, end: int | None, implicit: bool, out: list) -> int:
    """Elements of one item, up to ``end`` or (undefined length) its item delimiter."""
    while end is None or pos < end:
        vr = None if implicit else b[pos + 4 : pos + 6].decode("ascii")
        tag, length, value_pos, nested_implicit = _header(b, pos, implicit)
        if tag == _ITEM_DELIMITER and end is None:
            return value_pos
        if vr == "UN":
            raise _Unusual
        out.append((tag, vr))
        if length == 0xFFFFFFFF:
            pos = _items(b, value_pos, len(b), nested_implicit, out)
            continue
        is_sequence = vr == "SQ"
        if implicit:
            if tag >> 16 & 1:
                raise _Unusual  # a private element's VR is not in the dictionary
            dict_vr = _dictionary_vr(tag)
            if dict_vr is None:
                raise _Unusual
            is_sequence = dict_vr == "SQ"
        if is_sequence:
            _items(b, value_pos, value_pos + length, implicit, out)
        pos = value_pos + length
    if pos != end:
        raise _Unusual
    return pos


@functools.lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str | None:
    """pydicom's dictionary VR of a tag (None when unknown), remembered: the sequence
    scanner asks it for every implicit-VR element, and pydicom's lookup is slow."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _elem(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    b = uid.encode("ascii", "replace")  # a sender's non-ASCII UID is refused later, not here
    return b + b"\x00" if len(b) % 2 else b


def _text(s: str) -> bytes:
    b = s.encode("ascii", "replace")
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


# Reading a few attributes of a dataset that dcmread left undecoded. pydicom converts an
# element on first access (about 10 us each through its hooks); the pixel step reads some
# twenty per image, which costs more than the model's inference of it. These VRs are plain
# enough to read from the raw bytes directly; anything else goes through pydicom.
_TEXT_VRS = frozenset(("CS", "DS", "IS", "UI", "LO", "SH"))


@functools.cache
def tag_vr(keyword: str) -> tuple[int, str]:
    """The tag and dictionary VR of a keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"no DICOM keyword {keyword!r}")
    return tag, dictionary_VR(tag)


def peek(ds: Dataset, keyword: str):
    """The value of a top-level attribute, or None when absent.

    For a still-raw element of a little-endian dataset: an int (US), the list of its
    backslash-separated strings, stripped (CS, DS, IS, UI, LO, SH), or its bytes (OB, OW
    of defined length), read without converting the element. Otherwise pydicom's value.
    """
    tag, dict_vr = tag_vr(keyword)
    elem = ds._dict.get(tag)
    if elem is None:
        return None
    if type(elem) is RawDataElement and elem.value is not None and elem.is_little_endian:
        vr = elem.VR or dict_vr
        raw = elem.value
        if vr == "US" and len(raw) == 2:
            return raw[0] | raw[1] << 8
        if vr in _TEXT_VRS:
            values = raw_strings(elem)
            if values is not None:
                return values
        if vr in ("OB", "OW") and elem.length != 0xFFFFFFFF:  # native pixel data: the bytes themselves
            return raw
    return ds[tag].value


def raw_strings(raw: RawDataElement) -> list[str] | None:
    """The backslash-separated values of a raw little-endian element of defined length
    whose bytes are ASCII, stripped as pydicom strips them; None when they need pydicom."""
    if not raw.is_little_endian or raw.value is None or raw.length == 0xFFFFFFFF or not raw.value.isascii():
        return None
    return [v.strip(" \x00") for v in raw.value.decode("ascii").split("\\")]


def _values(v) -> list:
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return list(v)
    return [v]


def peek_str(ds: Dataset, keyword: str, default: str = "") -> str:
    """The first value of an attribute as a stripped string (``default`` when absent or empty)."""
    vals = _values(peek(ds, keyword))
    s = str(vals[0]).strip(" \x00") if vals and vals[0] is not None else ""
    return s or default


def peek_float(ds: Dataset, keyword: str, default: float, index: int = 0) -> float:
    """Value ``index`` of a numeric attribute as a float (``default`` when absent or not a number)."""
    vals = _values(peek(ds, keyword))
    try:
        return float(vals[index]) if len(vals) > index and vals[index] != "" else default
    except (TypeError, ValueError):
        return default


def peek_strs(ds: Dataset, keyword: str) -> list[str]:
    """All values of an attribute as stripped strings ([] when absent)."""
    return [str(x).strip(" \x00") for x in _values(peek(ds, keyword))]
