"""Apply the Annex E profile to one dataset, in place, at any sequence depth.

One pass over the tags: each gets a final action (K keep, X remove, Z empty, D dummy,
U pseudonymous UID, S shift date, C clean text, P pseudonymous patient ID/name, R
replace with a configured value). Elements that stay untouched are never decoded, so
pixel data and large binary elements cost nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import re
import struct
from collections.abc import Iterable

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from node.config import DeidSettings
from node.deid import profile
from node.deid.pseudonyms import Pseudonymizer
from node.wire import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, LONG_VRS, raw_strings, sequence_elements

BURNED_IN_MODALITIES = {"US", "SC", "XA", "XC", "ES", "GM", "SM", "OT", "RF", "DOC", "IVUS"}

TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "PN", "AE", "CS", "AS", "UR"}
DUMMY: dict[str, object] = {
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "SH": "ANONYMIZED",
    "ST": "ANONYMIZED", "UC": "ANONYMIZED", "UT": "ANONYMIZED", "PN": "ANONYMIZED", "UR": "",
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
    "OB": b"", "OW": b"", "OF": b"", "OD": b"", "OL": b"", "OV": b"", "UN": b"",
}
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_PATIENT_IDENTITY_REMOVED = 0x00120062
_DEID_METHOD = 0x00120063
_DEID_CODES = 0x00120064
_LONGITUDINAL = 0x00280303


class QuarantineError(Exception):
    """The object must not leave the node (e.g. burned-in text and no pixel cleaning)."""


@dataclasses.dataclass
class Result:
    dataset: Dataset
    uid_map: dict[str, str]
    patient_map: dict[str, str]
    changes: list[tuple[str, str, str]]  # (tag path, action, keyword) for --diff


def _combined(code: str) -> str:
    """Pick one action from a combined code, keeping the object valid (Z or D over X)."""
    return {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "Z", "X/Z/U*": "U*"}.get(code, code)


class Deidentifier:
    """A compiled profile: Basic Profile + options + overrides of one route."""

    def __init__(self, settings: DeidSettings, pseudo: Pseudonymizer, *, pixels_cleaned: bool = False, record_changes: bool = False) -> None:
        self.settings = settings
        self.pseudo = pseudo
        self.pixels_cleaned = pixels_cleaned
        self.record_changes = record_changes
        self.table = profile.load_table()
        opts = set(settings.options)
        self.options = opts
        self.full_dates = "retain-longitudinal-full-dates" in opts
        self.modified_dates = "retain-longitudinal-modified-dates" in opts and not self.full_dates
        actions: dict[int, str] = {t: _combined(a) for t, a in self.table.by_tag.items()}
        keep: set[int] = set()
        clean: set[int] = set()
        if "retain-patient-characteristics" in opts:
            keep |= profile.tags_of(profile.PATIENT_CHARACTERISTICS)
            clean |= profile.tags_of(profile.PATIENT_CHARACTERISTICS_CLEAN)
        if "retain-device-identity" in opts:
            keep |= profile.tags_of(profile.DEVICE_IDENTITY)
        if "retain-institution-identity" in opts:
            keep |= profile.tags_of(profile.INSTITUTION_IDENTITY)
        if "retain-uids" in opts:
            keep |= {t for t, a in actions.items() if a == "U"}
        if "clean-descriptors" in opts:
            clean |= profile.tags_of(profile.DESCRIPTORS)
        if "clean-structured-content" in opts:
            clean |= profile.tags_of(profile.STRUCTURED_CONTENT)
        if "clean-graphics" in opts:
            keep |= profile.tags_of(profile.GRAPHICS)
        for t in keep:
            actions[t] = "K"
        for t in clean:
            actions[t] = "C"
        actions[_PATIENT_ID] = "P"
        actions[_PATIENT_NAME] = "P"
        for name in settings.keep:
            actions[profile.tag_of(name)] = "K"
        for name in settings.remove:
            actions[profile.tag_of(name)] = "X"
        self.replace: dict[int, str] = {profile.tag_of(k): v for k, v in settings.replace.items()}
        for t in self.replace:
            actions[t] = "R"
        self.user_tags = {profile.tag_of(n) for n in (*settings.keep, *settings.remove, *settings.replace)}
        self.actions = actions
        self.cleans = "C" in actions.values()
        self.clean_graphics = "clean-graphics" in opts
        self.safe_private = "retain-safe-private" in opts
        # Apply the common actions to raw elements' bytes (see _raw_action); False runs
        # every action through pydicom's decoded values (the reference the tests compare).
        self.raw_fast = True
        self._marks: dict[tuple, list[RawDataElement]] = {}

    # -- public -------------------------------------------------------------------
    def check_burned_in(self, ds: Dataset) -> None:
        """Raise QuarantineError when the pixels may carry text and nobody cleans them."""
        if self.pixels_cleaned or self.settings.burned_in == "allow" or 0x7FE00010 not in ds._dict:
            return
        flag = _first_text(ds, 0x00280301).upper()  # BurnedInAnnotation
        modality = _first_text(ds, 0x00080060).upper()
        if flag == "YES":
            raise QuarantineError("BurnedInAnnotation is YES and this route does not clean pixels")
        if not flag and modality in BURNED_IN_MODALITIES:
            raise QuarantineError(f"modality {modality} often has burned-in text, BurnedInAnnotation is absent, and this route does not clean pixels")

    def apply(self, ds: Dataset, extra_codes: Iterable[tuple[str, str]] = ()) -> Result:
        """De-identify ``ds`` in place and mark it; returns it with the mappings used.

        Raises:
            QuarantineError: burned-in text that this route does not clean.
        """
        self.check_burned_in(ds)
        old_pid = _first_text(ds, _PATIENT_ID)
        patient_key = old_pid or _first_text(ds, 0x0020000D)  # StudyInstanceUID
        lo, hi = self.settings.date_shift_days
        ctx = _Context(
            uid_map={},
            patient_map={},
            changes=[],
            offset=dt.timedelta(days=self.pseudo.date_offset_days(patient_key, lo, hi)) if self.modified_dates else None,
            phi=_phi_strings(ds) if self.cleans else [],  # only text that is kept and cleaned needs them
            old_pid=patient_key,
        )
        self._walk(ds, ctx, "", dummy=False)
        for tag, value in self.replace.items():  # replacements also add absent attributes
            if tag not in ds:
                ds.add_new(tag, dictionary_VR(tag), value)
        self._mark(ds, extra_codes)
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            from pydicom.dataset import FileMetaDataset

            meta = ds.file_meta = FileMetaDataset()
        # Set through elements, not attributes: FileMetaDataset checks every assignment,
        # and the UIDs are read without decoding the dataset's (raw) elements.
        if 0x00080018 in ds._dict:
            _set_meta(meta, 0x00020003, "UI", _first_text(ds, 0x00080018))  # MediaStorageSOPInstanceUID
        elif meta.get("MediaStorageSOPInstanceUID"):  # no SOPInstanceUID: still never the original
            _set_meta(meta, 0x00020003, "UI", self._uid(str(meta.MediaStorageSOPInstanceUID), ctx))
        if 0x00080016 in ds._dict:
            _set_meta(meta, 0x00020002, "UI", _first_text(ds, 0x00080016))  # MediaStorageSOPClassUID
        if "TransferSyntaxUID" not in meta:
            from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

            implicit, _ = getattr(ds, "original_encoding", (True, True))
            meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
        _set_meta(meta, 0x00020012, "UI", IMPLEMENTATION_CLASS_UID)
        _set_meta(meta, 0x00020013, "SH", IMPLEMENTATION_VERSION)
        for t in (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102):  # AE titles, signatures
            if t in meta:
                del meta[t]
        return Result(ds, ctx.uid_map, ctx.patient_map, ctx.changes)

    # -- internals ----------------------------------------------------------------
    def _action(self, tag: BaseTag, vr: str | None) -> str:
        if tag.is_private:
            return "private"
        if tag in self.user_tags:
            return self.actions[tag]
        group = tag.group
        if group == 0x0000:  # command elements have no place in a stored dataset
            return "X"
        if 0x5000 <= group <= 0x501E and not group & 1:
            return "K" if self.clean_graphics else "X"
        if 0x6000 <= group <= 0x601E and not group & 1:
            return "K" if self.clean_graphics else "X"
        act = self.actions.get(tag)
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if vr in ("DA", "DT"):
            if self.full_dates:
                return "K"
            if self.modified_dates:
                return "S"
            return act or "D"
        if act is None:
            if vr == "PN":
                return "Z"
            if vr == "SQ":
                return "recurse"
            return "K"
        if act == "U*":
            return "U" if vr == "UI" else "Z"
        if act == "K" and vr == "SQ":
            return "K"
        return act

    def _walk(self, ds: Dataset, ctx: _Context, path: str, dummy: bool) -> None:
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            vr = getattr(raw, "VR", None)
            act = self._action(tag, vr)
            if act == "private":
                if 0x0010 <= tag.element < 0x0100:  # a private creator: decided after its block
                    continue
                if self.safe_private and self._is_safe_private(ds, tag):
                    continue
                del ds[tag]
                self._note(ctx, path, tag, "X")
                continue
            if dummy and act in ("K", "recurse") and vr != "SQ":
                elem = ds[tag]
                if (elem.VR in TEXT_VRS and elem.VR != "CS") or elem.VR in ("DA", "DT", "TM"):
                    act = "D"
            if act == "K":
                continue
            if act == "recurse" and self.raw_fast and not dummy and type(raw) is RawDataElement and self._keeps_whole(raw):
                continue  # nothing inside to change: the sequence stays as read, undecoded
            if act == "recurse" or (act == "C" and (vr == "SQ" or ds[tag].VR == "SQ")):
                elem = ds[tag]
                for k, item in enumerate(elem.value or []):
                    self._walk(item, ctx, f"{path}{_tagstr(tag)}[{k}].", dummy)
                continue
            if act == "X":
                del ds[tag]
                self._note(ctx, path, tag, "X")
                continue
            if self.raw_fast and type(raw) is RawDataElement:
                new = self._raw_action(raw, act, tag, ctx)
                if new is not None:
                    ds._dict[tag] = new
                    self._note(ctx, path, tag, act)
                    continue
            elem = ds[tag]
            self._note(ctx, path, tag, act)
            if act == "Z":
                elem.value = Sequence() if elem.VR == "SQ" else ("" if elem.VR in TEXT_VRS or elem.VR in ("DA", "DT", "TM", "DS", "IS", "UI") else None)
            elif act == "D":
                if elem.VR == "SQ":
                    for k, item in enumerate(elem.value or []):
                        self._walk(item, ctx, f"{path}{_tagstr(tag)}[{k}].", True)
                elif elem.VR == "UI":
                    elem.value = self._uids(elem.value, ctx)
                else:
                    elem.value = DUMMY.get(elem.VR, "")
            elif act == "U":
                elem.value = self._uids(elem.value, ctx)
            elif act == "S":
                elem.value = _shift(elem.value, elem.VR, ctx.offset)
            elif act == "C":
                elem.value = _scrub(elem.value, ctx.phi) if isinstance(elem.value, str) else elem.value
            elif act == "P":
                if tag == _PATIENT_ID:
                    new = self.pseudo.patient_id(ctx.old_pid) if ctx.old_pid else ""
                    if ctx.old_pid:
                        ctx.patient_map[ctx.old_pid] = new
                    elem.value = new
                else:
                    elem.value = self.pseudo.patient_name(ctx.old_pid) if ctx.old_pid else ""
            elif act == "R":
                elem.value = self.replace[tag]
        # Private creators: keep only those whose block still holds an element.
        creators = [t for t in ds.keys() if t.is_private and 0x0010 <= t.element < 0x0100]
        if creators:
            used = {(t.group, t.element >> 8) for t in ds.keys() if t.is_private and t.element >= 0x1000}
            for tag in creators:
                if (tag.group, tag.element) not in used:
                    del ds[tag]

    def _keeps_whole(self, raw: RawDataElement) -> bool:
        """True when every element inside a raw sequence, at any depth, is kept as it is
        (what walking its decoded items would conclude, without decoding them)."""
        if not raw.is_little_endian or raw.value is None:
            return False
        try:
            inside = sequence_elements(raw.value, bool(raw.is_implicit_VR))
        except ValueError:
            return False
        for tag, vr in inside:
            if tag & 0xFFFF == 0:
                return False  # a group length: pydicom's writer drops it, so decode
            if self._action(BaseTag(tag), vr) not in ("K", "recurse"):
                return False
        return True

    def _raw_action(self, raw: RawDataElement, act: str, tag: BaseTag, ctx: _Context) -> RawDataElement | None:
        """The action applied to the element's bytes, for the ASCII values the profile
        writes most (emptied values, UIDs, shifted dates, dummies, patient pseudonyms):
        no decoding into pydicom values and back. None where the element needs pydicom
        (anything else); the result is byte for byte what the decoded path writes."""
        if raw.VR == "UN":
            return None  # pydicom writes such an element with its dictionary VR
        vr = raw.VR or _vr_of(tag)
        if act == "Z":
            return None if vr == "SQ" or raw.length == 0xFFFFFFFF else _raw_replace(raw, vr, [])
        values = raw_strings(raw)
        if values is None:
            return None
        if act == "U" or (act == "D" and vr == "UI"):
            if vr != "UI":
                return None
            return _raw_replace(raw, vr, [self._uid(v, ctx) if v else v for v in values])
        if act == "S" and vr in ("DA", "DT"):
            if ctx.offset is None or values == [""]:
                return raw
            return _raw_replace(raw, vr, [_shift(v, vr, ctx.offset) for v in values])
        if act == "D" and isinstance(DUMMY.get(vr), str) and vr != "SQ":
            return _raw_replace(raw, vr, [DUMMY[vr]])
        if act == "P" and tag == _PATIENT_ID:
            new = self.pseudo.patient_id(ctx.old_pid) if ctx.old_pid else ""
            if ctx.old_pid:
                ctx.patient_map[ctx.old_pid] = new
            return _raw_replace(raw, vr, [new])
        if act == "P":
            return _raw_replace(raw, vr, [self.pseudo.patient_name(ctx.old_pid) if ctx.old_pid else ""])
        return None

    def _is_safe_private(self, ds: Dataset, tag: BaseTag) -> bool:
        if tag.element < 0x1000:
            return False
        creator_tag = (tag.group << 16) | (tag.element >> 8)
        creator = ds.get(creator_tag)
        name = str(creator.value).strip() if creator is not None else ""
        return (name, tag.group, tag.element & 0xFF) in profile.SAFE_PRIVATE

    def _uids(self, value, ctx: _Context):
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return [self._uid(str(v), ctx) for v in value]
        return self._uid(str(value), ctx) if value else value

    def _uid(self, old: str, ctx: _Context) -> str:
        new = self.pseudo.uid(old)
        ctx.uid_map[old] = new
        return new

    def _note(self, ctx: _Context, path: str, tag: BaseTag, act: str) -> None:
        if self.record_changes:
            from pydicom.datadict import keyword_for_tag

            ctx.changes.append((f"{path}{_tagstr(tag)}", act, keyword_for_tag(tag) or "private"))

    def _mark(self, ds: Dataset, extra_codes: Iterable[tuple[str, str]]) -> None:
        encoding = ds.original_encoding
        if not self.raw_fast or encoding[1] is False or encoding[0] is None:
            self._mark_decoded(ds, extra_codes)
            return
        key = (tuple(extra_codes), encoding[0])
        if key not in self._marks:  # the same four elements for every object of a route: encode once
            tmp = Dataset()
            self._mark_decoded(tmp, key[0])
            self._marks[key] = [_encoded(tmp, tag, implicit=encoding[0]) for tag in sorted(tmp.keys())]
        for elem in self._marks[key]:
            ds._dict[elem.tag] = elem  # raw elements are immutable: safe to share

    def _mark_decoded(self, ds: Dataset, extra_codes: Iterable[tuple[str, str]]) -> None:
        codes = [profile.BASIC_CODE] + [profile.OPTIONS[o] for o in profile.OPTIONS if o in self.options] + list(extra_codes)
        ds.PatientIdentityRemoved = "YES"
        names = ", ".join(m for _, m in codes)
        ds.DeidentificationMethod = f"casemask: PS3.15 {self.table.edition} {names}"[:64]
        seq = Sequence()
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            seq.append(item)
        ds.DeidentificationMethodCodeSequence = seq
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED" if self.full_dates else ("MODIFIED" if self.modified_dates else "REMOVED")


@dataclasses.dataclass
class _Context:
    uid_map: dict[str, str]
    patient_map: dict[str, str]
    changes: list[tuple[str, str, str]]
    offset: dt.timedelta | None
    phi: list[str]
    old_pid: str


def _tagstr(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _shift(value, vr: str, offset: dt.timedelta | None):
    if offset is None or value in (None, ""):
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_shift(v, vr, offset) for v in value]
    s = str(value).strip()
    try:
        if vr == "DA":
            d = dt.datetime.strptime(s[:8], "%Y%m%d") + offset
            return d.strftime("%Y%m%d")
        d = dt.datetime.strptime(s[:8], "%Y%m%d") + offset
        return d.strftime("%Y%m%d") + s[8:]
    except ValueError:
        return DUMMY[vr]


def _encoded(ds: Dataset, tag: BaseTag, implicit: bool) -> RawDataElement:
    """Element ``tag`` of ``ds`` as the raw element a little-endian reader would produce."""
    from pydicom.filebase import DicomBytesIO

    elem = ds[tag]
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    if elem.VR == "SQ":
        for item in elem.value:
            _write_item(body, item, implicit, "iso8859")
    else:
        from pydicom.filewriter import write_data_element

        write_data_element(body, elem)
        whole = body.getvalue()
        header = 8 if implicit or elem.VR not in LONG_VRS else 12
        body = DicomBytesIO()
        body.write(whole[header:])
    value = body.getvalue()
    return RawDataElement(tag, None if implicit else elem.VR, len(value), value, 0, implicit, True, True, False)


def _set_meta(meta, tag: int, vr: str, value: str) -> None:
    meta._dict[BaseTag(tag)] = DataElement(tag, vr, UID(value) if vr == "UI" else value, already_converted=True)


def _vr_of(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _raw_replace(raw: RawDataElement, vr: str, values: list[str]) -> RawDataElement | None:
    """``raw`` holding ``values`` (encoded, padded to even length as pydicom pads)."""
    data = "\\".join(values).encode("ascii", errors="strict") if values else b""
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return raw._replace(length=len(data), value=data)


_DIGITS = re.compile(r"\d{5,}")


def _phi_strings(ds: Dataset) -> list[str]:
    """Identifying strings of this object, used to scrub free text that is kept (C)."""
    out: set[str] = set()
    for tag in _PHI_TAGS:
        for s in _texts(ds, tag):
            for part in re.split(r"[\^=\s,]+", s):
                if len(part) >= 2:
                    out.add(part)
    return sorted(out, key=len, reverse=True)


_PHI_TAGS = [
    tag_for_keyword(kw)
    for kw in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName",
               "PatientAddress", "StudyID", "RequestingPhysician", "NameOfPhysiciansReadingStudy")
]


def _texts(ds: Dataset, tag: int) -> list[str]:
    """The values of a top-level element as strings, read from its bytes when they are
    ASCII (no decoding, so the element stays raw for the writer), else from pydicom."""
    elem = ds._dict.get(tag)
    if elem is None:
        return []
    if type(elem) is RawDataElement and elem.VR != "UN":
        vals = raw_strings(elem)
        if vals is not None:
            return vals if vals != [""] else []
    v = ds[tag].value
    if v is None or v == "":
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [str(v)]


def _first_text(ds: Dataset, tag: int) -> str:
    vals = _texts(ds, tag)
    return vals[0].strip() if vals else ""


def _scrub(text: str, phi: list[str]) -> str:
    for p in phi:
        text = re.sub(re.escape(p), "X" * min(len(p), 3), text, flags=re.IGNORECASE)
    return _DIGITS.sub("X", text)


def to_bytes(ds: Dataset, enforce_file_format: bool = True) -> bytes:
    """Encode ``ds`` as a file; repairs datasets whose elements lack a VR.

    Little-endian datasets go through ``_encode_fast`` (raw elements copied as read, the
    rest through pydicom's element writer, byte for byte what ``save_as`` writes, about
    four times faster); others through ``save_as``. The preamble is always 128 zero
    bytes: an input's preamble may carry anything (a TIFF header, text), and nothing of
    it belongs in a de-identified file.

    Some inputs declare explicit VR in their file meta yet encode the body implicitly;
    pydicom then keeps their elements without a VR and cannot write them back. Resolving
    every element from the dictionary and writing explicit VR fixes that.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or not meta.get("MediaStorageSOPClassUID") or not meta.get("MediaStorageSOPInstanceUID"):
        enforce_file_format = False  # no SOP UIDs: a bare dataset, not a Part 10 file
    if getattr(ds, "preamble", None) is not None:
        ds.preamble = b"\x00" * 128
    fast = _encode_fast(ds, meta) if enforce_file_format else None
    if fast is not None:
        return fast
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=enforce_file_format)
    except (TypeError, ValueError):
        for _ in ds.iterall():
            pass
        ds.set_original_encoding(False, True)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=enforce_file_format)
    return buf.getvalue()


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # UID -> implicit VR
_SEQ_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


class _NotFast(Exception):
    pass


def _encode_fast(ds: Dataset, meta) -> bytes | None:
    """The Part 10 file of ``ds`` when it is written little endian in the encoding it was
    read in (or built in) and no character set changed; None otherwise."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts in _NATIVE_SYNTAXES:
        implicit = _NATIVE_SYNTAXES[ts]
    elif ts and ts not in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"):
        implicit = False  # encapsulated syntaxes: explicit VR little endian
    else:
        return None  # big endian, deflated, or unknown: pydicom's writer
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    try:
        _write_elements(fp, ds, implicit, "iso8859")
    except _NotFast:
        return None
    return fp.getvalue()


def _write_elements(fp, ds: Dataset, implicit: bool, parent_encoding) -> None:
    """pydicom's write_dataset, except that raw elements and sequences are written here."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    # Like pydicom: a dataset read in another encoding or character set (or built in
    # memory) has every element decoded and encoded again, after ambiguous VRs are fixed.
    reencode = ds.original_encoding != (implicit, True) or ds.original_character_set != ds._character_set
    if reencode:
        from pydicom.filewriter import correct_ambiguous_vr

        ds = correct_ambiguous_vr(ds, True)
    encodings = ds.get("SpecificCharacterSet", parent_encoding)
    pack = struct.pack
    for tag in sorted(ds._dict):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        elem = ds._dict[tag]
        if type(elem) is RawDataElement:
            if reencode or not elem.is_little_endian or elem.is_implicit_VR != implicit or elem.value is None or not (implicit or elem.VR):
                write_data_element(fp, ds[tag], encodings)
                continue
            vr, value, undefined = elem.VR, elem.value, elem.length == 0xFFFFFFFF
        elif elem.VR == "SQ":
            body = DicomBytesIO()
            body.is_little_endian, body.is_implicit_VR = True, implicit
            for item in elem.value:
                _write_item(body, item, implicit, encodings)
            vr, value, undefined = "SQ", body.getvalue(), elem.is_undefined_length
        else:
            write_data_element(fp, elem, encodings)
            continue
        length = 0xFFFFFFFF if undefined else len(value)
        if implicit:
            fp.write(pack("<HHI", tag >> 16, tag & 0xFFFF, length))
        elif vr in LONG_VRS:
            fp.write(pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length))
        elif length <= 0xFFFF:
            fp.write(pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length))
        else:
            raise _NotFast  # pydicom rewrites such an element as UN, with a warning
        fp.write(value)
        if undefined:
            fp.write(_SEQ_DELIMITER)


def _write_item(fp, item: Dataset, implicit: bool, encodings) -> None:
    from pydicom.filebase import DicomBytesIO

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    _write_elements(body, item, implicit, encodings)
    value = body.getvalue()
    if getattr(item, "is_undefined_length_sequence_item", False):
        fp.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + value + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
    else:
        fp.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(value)) + value)
