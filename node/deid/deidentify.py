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
from collections.abc import Iterable

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from node.config import DeidSettings
from node.deid import profile
from node.deid.pseudonyms import Pseudonymizer

IMPLEMENTATION_CLASS_UID = "2.25.190912847460651377245473512196128309533"
IMPLEMENTATION_VERSION = "CASEMASK_010"
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
        self.clean_graphics = "clean-graphics" in opts
        self.safe_private = "retain-safe-private" in opts

    # -- public -------------------------------------------------------------------
    def check_burned_in(self, ds: Dataset) -> None:
        """Raise QuarantineError when the pixels may carry text and nobody cleans them."""
        if self.pixels_cleaned or self.settings.burned_in == "allow" or "PixelData" not in ds:
            return
        flag = str(ds.get("BurnedInAnnotation", "")).upper()
        modality = str(ds.get("Modality", "")).upper()
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
        old_pid = str(ds.get("PatientID", "") or "")
        patient_key = old_pid or str(ds.get("StudyInstanceUID", ""))
        lo, hi = self.settings.date_shift_days
        ctx = _Context(
            uid_map={},
            patient_map={},
            changes=[],
            offset=dt.timedelta(days=self.pseudo.date_offset_days(patient_key, lo, hi)) if self.modified_dates else None,
            phi=_phi_strings(ds),
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
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if "TransferSyntaxUID" not in meta:
            from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

            implicit, _ = getattr(ds, "original_encoding", (True, True))
            meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
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
            if act == "recurse" or (act == "C" and (vr == "SQ" or ds[tag].VR == "SQ")):
                elem = ds[tag]
                for k, item in enumerate(elem.value or []):
                    self._walk(item, ctx, f"{path}{_tagstr(tag)}[{k}].", dummy)
                continue
            if act == "X":
                del ds[tag]
                self._note(ctx, path, tag, "X")
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


_DIGITS = re.compile(r"\d{5,}")


def _phi_strings(ds: Dataset) -> list[str]:
    """Identifying strings of this object, used to scrub free text that is kept (C)."""
    out: set[str] = set()
    for kw in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName",
               "PatientAddress", "StudyID", "RequestingPhysician", "NameOfPhysiciansReadingStudy"):
        v = ds.get(kw)
        if v is None:
            continue
        vals = v.value if isinstance(v, DataElement) else v
        for item in (vals if isinstance(vals, (list, tuple)) or type(vals).__name__ == "MultiValue" else [vals]):
            s = str(item)
            for part in re.split(r"[\^=\s,]+", s):
                if len(part) >= 2:
                    out.add(part)
    return sorted(out, key=len, reverse=True)


def _scrub(text: str, phi: list[str]) -> str:
    for p in phi:
        text = re.sub(re.escape(p), "X" * min(len(p), 3), text, flags=re.IGNORECASE)
    return _DIGITS.sub("X", text)


def to_bytes(ds: Dataset, enforce_file_format: bool = True) -> bytes:
    """Encode ``ds`` as a file; repairs datasets whose elements lack a VR.

    Some inputs declare explicit VR in their file meta yet encode the body implicitly;
    pydicom then keeps their elements without a VR and cannot write them back. Resolving
    every element from the dictionary and writing explicit VR fixes that.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or not meta.get("MediaStorageSOPClassUID") or not meta.get("MediaStorageSOPInstanceUID"):
        enforce_file_format = False  # no SOP UIDs: a bare dataset, not a Part 10 file
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
