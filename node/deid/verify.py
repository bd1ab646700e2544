"""An independent check before anything leaves: does the output still hold any of the
input's identifying values?

A second pair of eyes for the header step. It shares no code path with the
de-identifier (``node.deid.deidentify`` and the modules it uses): it reads both files with
its own element scanner, from their bytes, and takes from pydicom only the data
dictionary and the character-set codecs. It collects the input's identifying values —
person names, patient and order IDs, accession numbers, dates, addresses, telephone
numbers, institution names, instance UIDs — from any attribute at any depth, private ones
included where their VR is written, decoded with the object's Specific Character Set;
then it searches the output twice: its encoded bytes (as the input encoded them, in
UTF-8, and in the output's character set), and its text decoded with the output's
character set. A public element that no dictionary knows is a finding wherever it is
in the output, whatever it holds. Pixel Data is not searched for text (the header step does not change
pixels; the burned-in-text policy and the pixel step answer for them), but native and RLE
Pixel Data is checked for set bits outside BitsStored and HighBit (``_pixel_bits``: where
retired overlays were embedded, and where anything else can hide; JPEG-family frames
are not decoded here).

What the route's options keep on purpose is not searched for: dates under
retain-longitudinal-full-dates (except the birth date, which PS3.15 always removes);
original dates where they are date attributes of a modified-dates output (moved dates
may meet another original date by chance; in text they are still searched); UIDs under
retain-uids; institution names under retain-institution-identity.

A finding names the input attribute and its kind, and where in the output it was found,
never the value.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator

from pydicom.charset import decode_bytes, encode_string
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.uid import UID_dictionary

_ASCII_VRS = frozenset({"UI", "DA", "DT", "TM", "DS", "IS", "AS", "CS", "AE"})
_PARTS_VRS = frozenset({"PN"})  # decoded through pydicom even when plain ASCII (component groups)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
_PIXELS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_ID_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "AdmissionID", "MedicalRecordLocator", "RequestedProcedureID", "ScheduledProcedureStepID",
    "PerformedProcedureStepID", "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberProcedure", "FillerOrderNumberProcedure", "StudyID", "PatientInsurancePlanCodeSequence", "VisitID",
    "ServiceEpisodeID", "IssuerOfPatientID",
})
_INSTITUTION_KEYWORDS = frozenset({"InstitutionName", "InstitutionalDepartmentName"})
_DEFINITION_UID = re.compile(r"ClassUID|TransferSyntax|CodingScheme|ContextUID|MappingResource|CreatorUID|OrganizationUID|ImplementationClass")
_DUMMIES = frozenset({"ANON", "ANONYMIZED", "ANONYMOUS", "19000101"})
_EQUIPMENT = frozenset({0x00080070, 0x00081090})  # Manufacturer, ManufacturerModelName
_SKIP_META = frozenset({0x00020001, 0x00020002, 0x00020010, 0x00020012, 0x00020013})


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the route keeps on purpose (derived from its option names)."""

    dates: str = "all"  # all | text (modified dates) | birth (full dates)
    uids: bool = True
    institution: bool = True

    @classmethod
    def from_options(cls, options: Iterable[str]) -> Policy:
        opts = set(options)
        dates = "birth" if "retain-longitudinal-full-dates" in opts else ("text" if "retain-longitudinal-modified-dates" in opts else "all")
        return cls(dates, "retain-uids" not in opts, "retain-institution-identity" not in opts)


@dataclasses.dataclass(frozen=True)
class Finding:
    kind: str  # name | id | accession | date | birth-date | address | phone | institution | uid | unknown | opaque | pixel-bits | pixel-header | pixel-unread
    source: str  # the input attribute, e.g. "(0010,0010) PatientName"
    where: str  # the output attribute, e.g. "(0020,4000) ImageComments"

    def __str__(self) -> str:
        if self.kind == "unknown":
            return f"a public element no dictionary knows in the output at {self.where}"
        if self.kind == "opaque":
            return f"a public element written as bytes (the dictionary gives it no binary VR) in the output at {self.where}"
        if self.kind == "pixel-bits":
            return f"the pixel bits check: bits set outside BitsStored (above HighBit, or below its lowest stored bit) in the output's {self.where}"
        if self.kind == "pixel-unread":
            return f"the pixel bits check: RLE frames of the output's {self.where} that cannot be read, so their bits cannot be checked"
        if self.kind == "pixel-header":
            return f"the pixel bits check: BitsStored or HighBit do not fit BitsAllocated in the output, so the bits of its {self.where} cannot be checked"
        return f"{self.kind} from {self.source} of the input found in the output at {self.where}"


class VerifyError(Exception):
    """A file the verifier cannot read (the object must not leave)."""


def verify(original: bytes, output: bytes, policy: Policy = Policy()) -> list[Finding]:
    """Findings (empty: nothing identifying of ``original`` is left in ``output``).

    Raises:
        VerifyError: either file cannot be parsed as a DICOM data set.
    """
    out = _Scan(output)
    findings = _unknown_public_elements(out) + _pixel_bits(out)
    needles = identifying_values(original, policy)
    return findings + (_search(needles, out, policy) if needles else [])


def _unknown_public_elements(out: _Scan) -> list[Finding]:
    """A public element that no DICOM dictionary knows, anywhere in the output: nothing
    says what it holds (a sender can plant any text there) and the de-identifier removes
    every one, so its presence is a finding whatever its value. So is a public element
    written with a binary VR (OB, OW, ...) that its dictionary entry does not allow (a
    sequence or text sent as bytes: neither the de-identifier nor this scan reads inside,
    and the input's names there were never collected)."""
    found = [Finding("unknown", _name(el), _name(el)) for el in out.elements if _unknown_public(el.tag)]
    return found + [Finding("opaque", _name(el), _name(el)) for el in out.elements if el.vr in _BINARY and _opaque(el.tag)]


# -- pixel bits ------------------------------------------------------------------------------
_BITS_ALLOCATED, _BITS_STORED, _HIGH_BIT, _PIXEL_REPRESENTATION = 0x00280100, 0x00280101, 0x00280102, 0x00280103
_PIXEL_DATA = 0x7FE00010
_ROWS, _COLUMNS, _SAMPLES, _NUMBER_OF_FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280008
_RLE_LOSSLESS = "1.2.840.10008.1.2.5"
_PIXEL_TAGS = frozenset({_PIXEL_DATA, _ROWS, _COLUMNS, _SAMPLES, _NUMBER_OF_FRAMES, _BITS_ALLOCATED, _BITS_STORED, _HIGH_BIT, _PIXEL_REPRESENTATION})
_CHUNK_BYTES = 4 << 20  # words checked per numpy call: the temporaries stay in cache (4 MiB: 0.3x the time of 64 MiB, measured)


def _pixel_bits(out: _Scan) -> list[Finding]:
    """The output's native or RLE Pixel Data (top level; deflated data is native once
    inflated) must hold no set bit outside its BitsStored bits (HighBit down to HighBit - BitsStored
    + 1): above them retired overlays were embedded (PS3.5 8.1.2 before 2008) and a
    sender can hide anything. Signed data may repeat its sign bit above HighBit (sign
    extension). Bits that an overlay group left in the output declares as its own
    (Overlay Bit Position, without Overlay Data: an embedded overlay kept on purpose) are
    allowed. Vectorised over the words, in chunks of :data:`_CHUNK_BYTES`; RLE Lossless
    frames are decoded (:func:`_rle_bits`).

    Not checked: JPEG, JPEG-LS and JPEG 2000 frames (not decoded here), Float and
    Double Float Pixel Data, BitsAllocated other than 8, 16, 32, and Pixel Data without
    BitsAllocated and BitsStored (nothing says which bits hold the image). BitsStored or
    HighBit that do not fit BitsAllocated are a finding: the bits cannot be checked."""
    top = {el.tag: el for el in out.elements if el.tag in _PIXEL_TAGS and not el.path}
    pixels = top.get(_PIXEL_DATA)
    if pixels is None or (pixels.encapsulated and out.syntax != _RLE_LOSSLESS) or not (pixels.raw or pixels.encapsulated):
        return []
    where = _name(pixels)
    allocated, stored = out.us(top.get(_BITS_ALLOCATED)), out.us(top.get(_BITS_STORED))
    if allocated is None or stored is None or allocated not in (8, 16, 32):
        return []
    high = out.us(top.get(_HIGH_BIT))
    high = stored - 1 if high is None else high
    if not 1 <= stored <= allocated or not stored - 1 <= high < allocated:
        return [Finding("pixel-header", where, where)]
    if stored == allocated:
        return []
    signed = out.us(top.get(_PIXEL_REPRESENTATION)) == 1
    full = (1 << allocated) - 1
    below = (1 << (high - stored + 1)) - 1  # under the lowest stored bit
    above = full ^ ((1 << (high + 1)) - 1)  # over HighBit
    overlay = out.overlay_bits(allocated)
    above &= ~overlay
    below &= ~overlay
    if pixels.encapsulated:
        return _rle_bits(out, top, pixels, allocated, below, above, signed, 1 << high)
    return [Finding("pixel-bits", where, where)] if _bits_set(pixels.raw, allocated, out.little, below, above, signed, 1 << high) else []


def _rle_bits(out: _Scan, top: dict[int, _Element], pixels: _Element, allocated: int, below: int, above: int, signed: bool, sign: int) -> list[Finding]:
    """The pixel bits check on RLE Lossless frames (PS3.5 Annex G), which code every byte
    of a word (the header step decodes and clears them: this reads them again, with its
    own PackBits reader). Unsigned data: only the byte planes that hold checked bits are
    decoded. A frame that is not SamplesPerPixel x BitsAllocated / 8 segments, or whose
    segment read here does not decode to Rows x Columns bytes, is a finding: its bits
    cannot be checked."""
    import numpy as np

    where = _name(pixels)
    unread = [Finding("pixel-unread", where, where)]
    rows, columns = out.us(top.get(_ROWS)), out.us(top.get(_COLUMNS))
    samples = out.us(top.get(_SAMPLES)) or 1
    frames = _rle_frames(out.fragments(pixels), out.integer(top.get(_NUMBER_OF_FRAMES)) or 1)
    if not rows or not columns or frames is None:
        return unread
    size, planes = rows * columns, allocated // 8
    dtype = np.dtype(f"=u{planes}")
    native = sys.byteorder == "little"
    for frame in frames:
        segments = _rle_segments(frame)
        if segments is None or len(segments) != samples * planes:
            return unread
        for s in range(samples):
            words = np.zeros(size, dtype)
            for k in range(planes):
                shift = 8 * (planes - 1 - k)  # segment k of a sample: its words' byte k, most significant first
                if not signed and not ((above | below) >> shift) & 0xFF:
                    continue  # no checked bit in this byte
                plane = _unpackbits(segments[s * planes + k])
                if len(plane) != size:
                    return unread
                words |= np.frombuffer(plane, np.uint8).astype(dtype) << dtype.type(shift)
            if _bits_set(words.tobytes(), allocated, native, below, above, signed, sign):
                return [Finding("pixel-bits", where, where)]
    return []


def _rle_frames(fragments: list[bytes] | None, n_frames: int) -> list[bytes] | None:
    """The RLE frames of encapsulated Pixel Data: one fragment per frame, or, with a Basic
    Offset Table, the fragments from each offset to the next; None when neither fits."""
    if not fragments:
        return None
    table, items = fragments[0], fragments[1:]
    if not table:
        return items if len(items) == n_frames else None
    offsets = list(struct.unpack(f"<{len(table) // 4}I", table[: len(table) // 4 * 4]))
    starts, pos = {}, 0
    for k, item in enumerate(items):
        starts[pos] = k
        pos += 8 + len(item)
    if len(offsets) != n_frames or any(o not in starts for o in offsets) or offsets != sorted(offsets) or offsets[0] != 0:
        return None
    bounds = [starts[o] for o in offsets] + [len(items)]
    return [b"".join(items[bounds[i] : bounds[i + 1]]) for i in range(n_frames)]


def _rle_segments(frame: bytes) -> list[bytes] | None:
    """The segments of an RLE frame, by its 64-byte header (count, 15 offsets)."""
    if len(frame) < 64:
        return None
    header = struct.unpack_from("<16I", frame)
    count = header[0]
    if not 1 <= count <= 15:
        return None
    offsets = [*header[1 : count + 1], len(frame)]
    if offsets[0] != 64 or any(a > b for a, b in zip(offsets, offsets[1:])):
        return None
    return [frame[offsets[i] : offsets[i + 1]] for i in range(count)]


def _unpackbits(segment: bytes) -> bytes:
    """A PackBits segment decoded whole (PS3.5 G.3.1): a loop over its runs (a run is up
    to 128 bytes), not over its bytes; a last header byte with nothing after it is the
    segment's padding."""
    out = bytearray()
    i, n = 0, len(segment)
    while i < n:
        h = segment[i]
        i += 1
        if h < 128:  # a literal run of h + 1 bytes
            out += segment[i : i + h + 1]
            i += h + 1
        elif h > 128:  # one byte, 257 - h times
            out += segment[i : i + 1] * (257 - h)
            i += 1
    return bytes(out)


def _bits_set(raw: bytes, allocated: int, little: bool, below: int, above: int, signed: bool, sign: int) -> bool:
    """Whether any word of ``raw`` has a bit of ``below`` set, or of ``above`` (signed:
    bits of ``above`` that differ from the ``sign`` bit). The words are read in the
    machine's order and the masks swapped to the data's (no copy of the data)."""
    import numpy as np

    size = allocated // 8
    dtype = np.dtype(f"=u{size}")
    swap = little != (sys.byteorder == "little")

    def order(mask: int) -> int:  # a mask with its bytes swapped tests the swapped words' bits
        return int.from_bytes(mask.to_bytes(size, "little"), "big") if swap else mask

    words = np.frombuffer(raw, dtype, len(raw) // size)
    step = max(1, _CHUNK_BYTES // size)
    if signed:
        group = dtype.type(order(above | sign))  # bits over HighBit and the sign: all clear or all set
        low = dtype.type(order(below))
        for start in range(0, words.size, step):
            chunk = words[start : start + step]
            t = chunk & group
            if ((t != 0) & (t != group)).any() or (below and (chunk & low).any()):
                return True
        return False
    mask = dtype.type(order(above | below))
    if not mask:
        return False
    for start in range(0, words.size, step):
        if (words[start : start + step] & mask).any():
            return True
    return False


def reason(findings: list[Finding]) -> str:
    """A quarantine reason naming attributes, never values."""
    shown = "; ".join(str(f) for f in findings[:3])
    more = f" (and {len(findings) - 3} more)" if len(findings) > 3 else ""
    return f"verifier: {shown}{more}"


# -- collecting ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Needle:
    kind: str
    source: str
    text: str  # normalised (upper case, separators as spaces)
    raw: tuple[bytes, ...]  # byte spellings to search
    boundary: str  # "word" | "uid" | "none"


def identifying_values(data: bytes, policy: Policy = Policy()) -> list[_Needle]:
    """The identifying values of a DICOM file (or bare data set), as search needles."""
    scan = _Scan(data)
    out: dict[tuple[str, str], _Needle] = {}
    equipment = {_norm(v) for el in scan.elements if el.tag in _EQUIPMENT for v in scan.values(el)}
    codecs = _codecs(tuple(scan.charsets))
    for el in scan.elements:
        if not _may_identify(el.tag, el.vr):
            continue
        keyword = _keyword(el.tag)
        for kind, value in _classify(el, keyword, scan, policy):
            source = f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) {keyword or 'private'}"
            for n in _needles(kind, value, source, el.raw.strip(b" \x00"), codecs):
                if not any(n.text in e for e in equipment):  # a vendor's name shared by an institution identifies the vendor
                    out.setdefault((n.kind, n.text), n)
    return list(out.values())


@functools.lru_cache(maxsize=8192)
def _may_identify(tag: int, vr: str) -> bool:
    """Whether ``_classify`` can find anything in an element of this tag and VR (it
    decides, value by value, for those that can; this only skips the others)."""
    if tag >> 16 == 0x0002 and tag in _SKIP_META:
        return False
    if vr in ("PN", "UI", "DA", "DT"):
        return True
    keyword = _keyword(tag)
    return (
        keyword == "AccessionNumber"
        or (keyword in _ID_KEYWORDS and vr in ("LO", "SH", "LT", "ST", "UC"))
        or ("Address" in keyword and vr in ("LO", "ST", "LT", "UT", "UC", "SH"))
        or ("Telephone" in keyword and vr in ("SH", "LO", "ST", "LT", "UC"))
        or keyword in _INSTITUTION_KEYWORDS
    )


def _classify(el: _Element, keyword: str, scan: _Scan, policy: Policy) -> Iterator[tuple[str, str]]:
    vr = el.vr
    if el.tag >> 16 == 0x0002 and el.tag in _SKIP_META:
        return
    if vr == "PN":
        for v in scan.values(el):
            yield "name", v
    elif vr == "UI":
        if policy.uids and not _DEFINITION_UID.search(keyword):
            for v in scan.values(el):
                if v and not v.startswith("1.2.840.10008.") and v not in UID_dictionary:
                    yield "uid", v
    elif vr in ("DA", "DT"):
        for v in scan.values(el):
            day = v[:8]
            if len(day) == 8 and day.isdigit():
                if keyword == "PatientBirthDate":
                    yield "birth-date", day
                elif policy.dates != "birth":
                    yield "date", day
    elif keyword == "AccessionNumber":
        for v in scan.values(el):
            yield "accession", v
    elif keyword in _ID_KEYWORDS and vr in ("LO", "SH", "LT", "ST", "UC"):
        for v in scan.values(el):
            yield "id", v
    elif "Address" in keyword and vr in ("LO", "ST", "LT", "UT", "UC", "SH"):
        for v in scan.values(el):
            yield "address", v
    elif "Telephone" in keyword and vr in ("SH", "LO", "ST", "LT", "UC"):
        for v in scan.values(el):
            yield "phone", v
    elif keyword in _INSTITUTION_KEYWORDS and policy.institution:
        for v in scan.values(el):
            yield "institution", v


_SEPARATORS = re.compile(r"[\s^=,]+")


def _norm(text: str) -> str:
    return " ".join(_SEPARATORS.split(text.upper())).strip()


@functools.lru_cache(maxsize=64)
def _codecs(charsets: tuple[str, ...]) -> tuple[str, ...]:
    """The Python codecs a data set's text may be written in besides UTF-8 and UTF-16:
    those of its Specific Character Set (pydicom's table), and Latin-1 always. A
    hostile sender writes a name with accents into a binary value in its own 8-bit
    encoding, which a UTF-8 spelling of the needle never matches."""
    from pydicom.charset import python_encoding

    out = {"latin_1"}
    for term in charsets:
        codec = python_encoding.get(term.strip())
        if codec and codec.lower() not in ("utf8", "iso8859", "iso2022_jp", "iso2022_jp_2"):  # UTF-8 and ASCII are spelled already; ISO 2022 needs escapes (``raw``)
            out.add(codec)
    return tuple(sorted(out))


def _needles(kind: str, value: str, source: str, raw: bytes, codecs: tuple[str, ...] = ("latin_1",)) -> Iterator[_Needle]:
    value = value.strip(" \x00")
    if not value or value.upper() in _DUMMIES:
        return
    if kind == "uid":
        if len(value) < 8 or "." not in value:
            return  # too short to tell from other bytes ("0" matched a length field): no instance's UID
        yield _Needle(kind, source, value, (value.encode("ascii", "ignore"),), "uid")
        return
    if kind in ("date", "birth-date"):
        y, m, d = value[:4], value[4:6], value[6:8]
        for spelling in (value, f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}", f"{y}/{m}/{d}"):
            yield _Needle(kind, source, spelling, (spelling.encode(),), "word")
        return
    texts = [value]
    if kind == "name":
        groups = value.split("=")
        for g in groups:
            parts = [p for p in g.split("^") if p.strip()]
            if parts and len(parts[0].strip()) >= (1 if not parts[0].isascii() else 3):
                texts.append(parts[0].strip())  # the family name alone
            if len(parts) >= 2:
                texts.append(" ".join(parts[:2]))
                texts.append(f"{parts[1]} {parts[0]}")
    elif kind == "address":
        texts += [p.strip() for p in re.split(r"[\^,;\n\r]+", value) if len(p.strip()) >= 6]
    elif kind == "phone":
        digits = re.sub(r"\D", "", value)
        for tail in {digits, digits[-10:], digits[-9:]}:  # with and without a country or trunk prefix
            if len(tail) >= 7:
                yield _Needle(kind, source, tail, (), "digits")
    for t in texts:
        n = _norm(t)
        if not n or n in _DUMMIES:
            continue
        ascii_only = n.isascii()
        if ascii_only and (len(n) < 4 if kind in ("id", "accession") else len(n) < 3):
            continue  # too short to tell from other text
        spellings = {t.encode("utf-8"), t.upper().encode("utf-8")}
        if kind in ("name", "id", "accession"):  # also as UTF-16, as text is often written into binary values
            spellings |= {t.upper().encode("utf-16-le"), t.upper().encode("utf-16-be")}
        if not ascii_only:  # also in the 8-bit encodings the data set may use (_codecs)
            for codec in codecs:
                for form in (t, t.upper(), t.lower()):
                    try:
                        spelled = form.encode(codec)
                    except UnicodeEncodeError:
                        continue
                    if len(spelled) >= 3 and not spelled.isascii():  # a byte or two would match binary values by chance
                        spellings.add(spelled)
        if t == value and raw:
            spellings.add(raw)  # as the input encoded it (ISO 2022 escapes and all)
        yield _Needle(kind, source, n, tuple(sorted(spellings)), "word" if ascii_only else "none")


# -- searching ------------------------------------------------------------------------------
def _search(needles: list[_Needle], out: _Scan, policy: Policy) -> list[Finding]:
    text, spans = out.text()
    starts = [s[0] for s in spans]
    lowered = out.searchable().lower()
    findings: dict[tuple[str, str], Finding] = {}

    def where_text(pos: int) -> tuple[str, str]:
        k = bisect.bisect_right(starts, pos) - 1
        return (_name(spans[k][2]), spans[k][3]) if k >= 0 else ("", "")

    def allowed(n: _Needle, vr: str) -> bool:
        return not (n.kind == "date" and policy.dates == "text" and vr in ("DA", "DT", "TM"))

    for n in needles:
        if (n.kind, n.source) in findings:
            continue
        if n.boundary == "digits":
            for el, digits in out.digit_texts():
                if n.text in digits:
                    findings[(n.kind, n.source)] = Finding(n.kind, n.source, el)
                    break
            continue
        if n.text in text:  # a cheap look first; the pattern then checks word boundaries
            matches = _pattern(n.text, n.boundary).finditer(text)
        else:
            matches = iter(())
        for m in matches:
            where, vr = where_text(m.start())
            if allowed(n, vr):
                findings[(n.kind, n.source)] = Finding(n.kind, n.source, where)
                break
        if (n.kind, n.source) in findings:
            continue
        for spelling in n.raw:
            spelling = spelling.lower()
            if not spelling or spelling not in lowered:
                continue
            for m in _bytes_pattern(spelling, n.boundary).finditer(lowered):
                where, vr = out.at(haystack_offset=m.start())
                if allowed(n, vr):
                    findings[(n.kind, n.source)] = Finding(n.kind, n.source, where)
                    break
            if (n.kind, n.source) in findings:
                break
    return list(findings.values())


def _pattern(text: str, boundary: str) -> re.Pattern:
    body = r"[\s^=,]+".join(re.escape(w) for w in text.split(" "))
    if boundary == "word":
        return re.compile(rf"(?<![0-9A-Z]){body}(?![0-9A-Z])")
    if boundary == "uid":
        return re.compile(rf"(?<![0-9.]){body}(?![0-9.])")
    return re.compile(body)


def _bytes_pattern(spelling: bytes, boundary: str) -> re.Pattern:
    body = re.escape(spelling)
    if boundary == "word":
        return re.compile(rb"(?<![0-9a-z])" + body + rb"(?![0-9a-z])")
    if boundary == "uid":
        return re.compile(rb"(?<![0-9.])" + body + rb"(?![0-9.])")
    return re.compile(body)


# -- reading: an element scanner of its own --------------------------------------------------
@dataclasses.dataclass
class _Element:
    tag: int
    vr: str
    raw: bytes
    start: int  # offset of the value in the scanned bytes
    path: str
    encapsulated: bool = False  # Pixel Data of undefined length: fragments, not read (raw is empty)


class _Scan:
    """Every element of a Part 10 file or bare data set, at any depth, with its VR and
    value bytes (little or big endian, explicit or implicit VR, deflated)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.elements: list[_Element] = []
        self.charsets: list[str] = ["ISO_IR 6"]
        self.little = True  # the data set's byte order
        self.syntax = ""  # the file meta's Transfer Syntax UID ("" for a bare data set)
        try:
            self._read()
        except (struct.error, IndexError, ValueError, zlib.error) as exc:
            raise VerifyError(f"the verifier cannot read the data set ({type(exc).__name__})") from None

    def _read(self) -> None:
        b = self.data
        pos, implicit, little, body = 0, True, True, b
        if len(b) >= 132 and b[128:132] == b"DICM":
            pos = 132
        elif b[:4] == b"\x02\x00\x00\x00" and b[4:6].isalpha():
            pos = 0  # file meta without a preamble
        else:
            implicit = not (b[4:6].isalpha() and b[4:6].isupper())
            little = implicit or not (b[0] == 0 and b[1] != 0)  # explicit VR big endian: a group's high byte first
            self.little = little
            self._walk(b, 0, len(b), implicit, little, "", self.elements)
            self._set_charset()
            return
        syntax = ""
        while pos + 8 <= len(b):  # the file meta: explicit VR little endian, group 0002
            group = struct.unpack_from("<H", b, pos)[0]
            if group != 0x0002:
                break
            tag, vr, length, vpos = _header(b, pos, False, True)
            self.elements.append(_Element(tag, vr, b[vpos : vpos + length], vpos, ""))
            if tag == 0x00020010:
                syntax = b[vpos : vpos + length].decode("ascii", "ignore").strip(" \x00")
            pos = vpos + length
        self.syntax = syntax
        if syntax == "1.2.840.10008.1.2":
            implicit = True
        elif syntax == "1.2.840.10008.1.2.2":
            implicit, little = False, False
            self.little = False
        else:
            implicit = False
        if syntax == "1.2.840.10008.1.2.1.99":
            body = zlib.decompress(b[pos:], -15)
            self.data, pos = body, 0
            b = body
        self._walk(b, pos, len(b), implicit, little, "", self.elements)
        self._set_charset()

    def _set_charset(self) -> None:
        for el in self.elements:
            if el.tag == 0x00080005 and not el.path:
                names = [v.strip() for v in el.raw.decode("ascii", "ignore").split("\\")]
                self.charsets = [n or "ISO_IR 6" for n in names] or ["ISO_IR 6"]

    def _walk(self, b: bytes, pos: int, end: int, implicit: bool, little: bool, path: str, out: list[_Element]) -> int:
        # _header inlined, with its lookups bound once: this loop runs for every element
        # of both files of every object.
        tag_u32, u32, u16 = _TAG_U32[little].unpack_from, _U32[little].unpack_from, _U16[little].unpack_from
        while pos + 8 <= end:
            group, elem, length = tag_u32(b, pos)
            tag = group << 16 | elem
            vpos = pos + 8
            if group == 0xFFFE:
                vr = ""
            elif implicit:
                vr = _dict_vr(tag)
            else:
                vr = _VR_TEXT.get(b[pos + 4 : pos + 6]) or b[pos + 4 : pos + 6].decode("ascii", "replace")
                if vr in _LONG:
                    length, vpos = u32(b, pos + 8)[0], pos + 12
                elif not vr.isalpha():
                    raise ValueError("not an explicit VR")
                else:
                    length = u16(b, pos + 6)[0]
            if tag in (_ITEM_END, _SEQ_END):
                return vpos
            if vr == "SQ" or (length == 0xFFFFFFFF and tag not in _PIXELS):
                seq_implicit = implicit or vr == "UN"
                pos = self._items(b, vpos, length, seq_implicit, little, f"{path}({tag >> 16:04X},{tag & 0xFFFF:04X})", out)
                continue
            if length == 0xFFFFFFFF:  # encapsulated pixel data: fragments up to the delimiter
                pos = self._skip_fragments(b, vpos, little)
                out.append(_Element(tag, vr, b"", vpos, path, True))
                continue
            if vpos + length > len(b):
                raise ValueError("value beyond the end of the data")
            if vr == "UN":
                vr = _dict_vr(tag)  # a known attribute written as UN: its dictionary VR
            out.append(_Element(tag, vr, b[vpos : vpos + length], vpos, path))
            pos = vpos + length
        return pos

    def _items(self, b: bytes, pos: int, length: int, implicit: bool, little: bool, path: str, out: list[_Element]) -> int:
        end = len(b) if length == 0xFFFFFFFF else pos + length
        k = 0
        while pos + 8 <= end:
            fmt = "<HHI" if little else ">HHI"
            group, elem, ilen = struct.unpack_from(fmt, b, pos)
            tag = group << 16 | elem
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise ValueError("not an item")
            item_path = f"{path}[{k}]."
            if ilen == 0xFFFFFFFF:
                pos = self._walk(b, pos, len(b), implicit, little, item_path, out)
            else:
                self._walk(b, pos, pos + ilen, implicit, little, item_path, out)
                pos += ilen
            k += 1
        return end if length != 0xFFFFFFFF else pos

    @staticmethod
    def _skip_fragments(b: bytes, pos: int, little: bool) -> int:
        fmt = "<HHI" if little else ">HHI"
        while pos + 8 <= len(b):
            group, elem, flen = struct.unpack_from(fmt, b, pos)
            pos += 8
            if (group << 16 | elem) == _SEQ_END:
                return pos
            pos += flen
        return pos

    # -- views --------------------------------------------------------------------------
    def us(self, el: _Element | None) -> int | None:
        """The first value of a US element (None when absent or empty)."""
        if el is None or len(el.raw) < 2:
            return None
        return struct.unpack_from("<H" if self.little else ">H", el.raw)[0]

    def integer(self, el: _Element | None) -> int | None:
        """The first value of an IS element (None when absent, empty or not a number)."""
        if el is None:
            return None
        try:
            return int(el.raw.split(b"\\")[0].strip(b" \x00"))
        except ValueError:
            return None

    def fragments(self, el: _Element) -> list[bytes] | None:
        """The items of encapsulated Pixel Data (the Basic Offset Table first), read again
        from where the scan skipped them; None when they are malformed."""
        b, pos, out = self.data, el.start, []
        fmt = "<HHI" if self.little else ">HHI"
        while pos + 8 <= len(b):
            group, elem, length = struct.unpack_from(fmt, b, pos)
            pos += 8
            if (group << 16 | elem) == _SEQ_END:
                return out
            if (group << 16 | elem) != _ITEM or pos + length > len(b):
                return None
            out.append(b[pos : pos + length])
            pos += length
        return None

    def overlay_bits(self, allocated: int) -> int:
        """The bits of the Pixel Data's words that overlay groups of this data set declare
        as theirs (Overlay Bit Position of a group without Overlay Data: an overlay embedded
        in Pixel Data, PS3.3 C.9.2 before 2008)."""
        groups: dict[int, dict[int, _Element]] = {}
        for el in self.elements:
            if not el.path and 0x6000 <= el.tag >> 16 <= 0x601E and not (el.tag >> 16) & 1:
                groups.setdefault(el.tag >> 16, {})[el.tag & 0xFFFF] = el
        bits = 0
        for group in groups.values():
            position = self.us(group.get(0x0102))
            if position is not None and 0x3000 not in group and position < allocated:
                bits |= 1 << position
        return bits

    def values(self, el: _Element) -> list[str]:
        return self._decode(el.vr, el.raw)

    def _decode(self, vr: str, raw: bytes) -> list[str]:
        """The values of an element's bytes as text (decoded with the character set)."""
        if vr not in _TEXT_VRS and vr != "UN":
            return []
        try:
            if vr in _ASCII_VRS or (raw.isascii() and b"\\" not in raw and vr not in _PARTS_VRS and b"\x1b" not in raw):
                text = raw.decode("ascii", "replace")  # one plain value: what every character set decodes it to
            else:
                text = decode_bytes(raw, self.charsets, {"^", "="} if vr == "PN" else set())
        except (LookupError, ValueError):
            text = raw.decode("latin-1")
        parts = [text] if vr in ("LT", "ST", "UT", "UR") else text.split("\\")
        return [q for q in (p.strip(" \x00") for p in parts) if q]

    def text(self) -> tuple[str, list[tuple[int, int, _Element, str]]]:
        """All text values, normalised, joined; with (start, end, element, VR) spans."""
        chunks, spans, pos = [], [], 0
        for el in self.elements:
            if el.tag >> 16 == 0x0002 or el.vr in ("UI",) or el.tag in _PIXELS:
                continue
            vr = el.vr
            if vr not in _TEXT_VRS and vr != "UN":
                continue
            value = " \\ ".join(self._decode(vr if vr in _TEXT_VRS else "LO", el.raw))
            if not value:
                continue
            n = _norm(value)
            spans.append((pos, pos + len(n), el, vr))
            chunks.append(n)
            pos += len(n) + 1
        uid_chunks = []
        for el in self.elements:  # UIDs after the text, unnormalised
            if el.vr == "UI" and el.tag not in _SKIP_META:
                v = el.raw.decode("ascii", "replace").strip(" \x00")
                spans.append((pos, pos + len(v), el, "UI"))
                uid_chunks.append(v)
                pos += len(v) + 1
        return "\n".join(chunks + uid_chunks), spans

    def digit_texts(self) -> Iterator[tuple[str, str]]:
        for el in self.elements:
            if el.vr in ("LO", "SH", "ST", "LT", "UT", "UC", "PN", "UN"):
                digits = re.sub(rb"\D", b"", el.raw).decode("ascii")
                if digits:
                    yield _name(el), digits

    def searchable(self) -> bytes:
        """The file's bytes without the values of top-level Pixel Data (see ``at``)."""
        self._cuts = sorted((el.start, len(el.raw)) for el in self.elements if el.tag in _PIXELS and not el.path and el.raw)
        pieces, pos = [], 0
        for start, length in self._cuts:
            pieces.append(self.data[pos:start])
            pos = start + length
        pieces.append(self.data[pos:])
        return b"".join(pieces)

    def at(self, haystack_offset: int) -> tuple[str, str]:
        """The element (name, VR) at an offset of ``searchable()``'s bytes."""
        offset = haystack_offset
        for start, length in getattr(self, "_cuts", ()):
            if start <= offset:
                offset += length
        for el in self.elements:
            if el.start <= offset < el.start + max(len(el.raw), 1):
                return _name(el), el.vr
        return "the file's bytes outside any value", ""


_VR_TEXT = {vr.encode(): vr for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH",
    "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
)}
_TAG_U32 = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}  # tag and a 4-byte length
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}


def _header(b: bytes, pos: int, implicit: bool, little: bool) -> tuple[int, str, int, int]:
    """(tag, VR, value length, value position) of the element at ``pos`` (structs
    compiled once: this runs for every element of both files)."""
    group, elem, length = _TAG_U32[little].unpack_from(b, pos)
    tag = group << 16 | elem
    if group == 0xFFFE:
        return tag, "", length, pos + 8
    if implicit:
        return tag, _dict_vr(tag), length, pos + 8
    vr = b[pos + 4 : pos + 6].decode("ascii", "replace")
    if vr in _LONG:
        return tag, vr, _U32[little].unpack_from(b, pos + 8)[0], pos + 12
    if not vr.isalpha():
        raise ValueError("not an explicit VR")
    return tag, vr, _U16[little].unpack_from(b, pos + 6)[0], pos + 8


@functools.lru_cache(maxsize=8192)
def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or ""


@functools.lru_cache(maxsize=8192)
def _unknown_public(tag: int) -> bool:
    """A public data element (even group, not a group length) that no DICOM dictionary knows."""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 or group in (0x0000, 0x0002, 0xFFFE) or element == 0x0000:
        return False
    try:
        dictionary_VR(tag)
    except KeyError:
        return True
    return False


_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})


@functools.lru_cache(maxsize=8192)
def _opaque(tag: int) -> bool:
    """A public data element whose dictionary VR has no binary alternative."""
    group = tag >> 16
    if group % 2 or group in (0x0000, 0x0002, 0xFFFE) or tag in _PIXELS:
        return False
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return False  # unknown: _unknown_public's finding
    return not any(v in _BINARY for v in vr.split(" or "))


@functools.lru_cache(maxsize=8192)
def _dict_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0] if " or " in vr else vr


def _name(el: _Element) -> str:
    return f"{el.path}({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) {_keyword(el.tag) or ('private' if el.tag >> 16 & 1 else 'unknown')}"
