"""Apply the Annex E profile to one dataset, in place, at any sequence depth.

One pass over the tags: each gets a final action (K keep, X remove, Z empty, D dummy,
U pseudonymous UID, S shift date, C clean text, P pseudonymous patient ID/name, A age
capped at 90, R replace with a configured value). The action is the table's for the
route's options (``node.deid.profile``); combined codes, and removals of attributes the
object's IOD requires, are resolved by the IOD's Type at that place. Elements that stay
untouched are never decoded, so pixel data and large binary elements cost nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary

from node.config import DeidSettings
from node.deid import profile
from node.deid.burned_in import burned_in_reason, zero_unused_high_bits
from node.deid.dates import cap_age, shift
from node.deid.encoding import encoded_element, set_meta, to_bytes
from node.deid.pseudonyms import Pseudonymizer, patient_key
from node.deid.text import first_text, identifiers, scrub, texts
from node.wire import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, raw_strings, sequence_elements

__all__ = ["Deidentifier", "Patient", "QuarantineError", "Result", "to_bytes"]

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "PN", "AE", "CS", "AS", "UR"}
# The PN dummy is a family name followed by the component delimiter: a name without any
# "^" reads as the retired ACR-NEMA form (dciodvfy warns "Retired Person Name form"),
# while PS3.5 6.2 lets trailing empty components keep their delimiters. Still a dummy
# consistent with the VR, as PS3.15 E.1.1 asks of D.
DUMMY: dict[str, object] = {
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "SH": "ANONYMIZED",
    "ST": "ANONYMIZED", "UC": "ANONYMIZED", "UT": "ANONYMIZED", "PN": "ANONYMIZED^", "UR": "http://anonymized.invalid",
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "OF": b"\x00\x00\x00\x00", "OD": bytes(8), "OL": bytes(4), "OV": bytes(8), "UN": b"\x00\x00",
}
# A blank one-page PDF: the dummy of an encapsulated PDF document (D keeps it valid).
DUMMY_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)
# Inside a sequence that is dummied or cleaned, these stay: codes name concepts, not people.
STRUCTURAL = frozenset(
    t for t in (
        0x00080100, 0x00080102, 0x00080103, 0x00080105, 0x00080106, 0x0008010B, 0x0008010C, 0x0008010F,
        0x00080117, 0x00080118, 0x00080119, 0x00080120, 0x00080122, 0x00080123, 0x00080124, 0x0040DB00,
        0x0040A040, 0x0040A010, 0x0040A050, 0x00700023, 0x00700002, 0x00700003, 0x00700004, 0x00700005,
    )
)  # CodeValue, CodingSchemeDesignator/Version, ContextIdentifier, ContextGroupExtensionFlag, MappingResource,
# ContextUID, LongCodeValue, URNCodeValue, EquivalentCodeSequence, CodingSchemeName, TemplateIdentifier,
# ValueType, RelationshipType, ContinuityOfContent, GraphicType, GraphicLayer, annotation units
_CODE_MEANING = 0x00080104
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_PATIENT_AGE = 0x00101010
_ISSUER = 0x00100021
_ISSUER_QUALIFIERS = 0x00100024
_ENCAPSULATED_DOCUMENT = 0x00420011
_ENCAPSULATED_LENGTH = 0x00420015
_MIME_TYPE = 0x00420012
_SOP_CLASS = 0x00080016
_LEVEL_UIDS = {"SOPInstanceUID": 0x00080018, "SeriesInstanceUID": 0x0020000E, "StudyInstanceUID": 0x0020000D, "FrameOfReferenceUID": 0x00200052}
# Actions remembered per IOD before the memo starts again (a bound for hostile inputs).
_MEMO_LIMIT = 65536
# Unlisted attributes that hold the patient's birth or death date as text (LO), in an
# alternative calendar: removed under every option, as Patient's Birth Date is never kept
# (Table E.1-1 lists neither; their VR hides them from the by-VR date rule).
_DATES_AS_TEXT = frozenset({0x00100033, 0x00100034})  # Patient's Birth/Death Date in Alternative Calendar
# Unlisted UIDs that name definitions, not instances: kept (every other unlisted UID is replaced).
_DEFINITION_UID_WORDS = ("ClassUID", "TransferSyntax", "CodingSchemeUID", "ContextUID", "MappingResourceUID", "CreatorUID", "OrganizationUID")


class QuarantineError(Exception):
    """The object must not leave the node (e.g. burned-in text and no pixel cleaning)."""


@dataclasses.dataclass
class Patient:
    """One patient as the header step saw and replaced them (for the honest broker)."""

    issuer: str
    patient_id: str
    name: str
    new_id: str
    new_name: str
    offset_days: int | None


@dataclasses.dataclass
class Result:
    dataset: Dataset
    uid_map: dict[str, str]  # every UID replaced: input value -> output value
    patient_map: dict[str, str]  # patient key (ID, issuer) -> pseudonymous Patient ID
    changes: list[tuple[str, str, str]]  # (tag path, action, keyword) for --diff
    patients: dict[str, Patient] = dataclasses.field(default_factory=dict)  # patient key -> who
    levels: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # keyword -> (input, output) of the object's own UIDs


class Deidentifier:
    """A compiled profile: Basic Profile + options + overrides of one route."""

    def __init__(self, settings: DeidSettings, pseudo: Pseudonymizer, *, pixels_cleaned: bool = False, record_changes: bool = False) -> None:
        self.settings = settings
        self.pseudo = pseudo
        self.pixels_cleaned = pixels_cleaned
        self.record_changes = record_changes
        self.table = profile.load_table()
        opts = frozenset(settings.options)
        self.options = opts
        self.full_dates = "retain-longitudinal-full-dates" in opts
        self.modified_dates = "retain-longitudinal-modified-dates" in opts and not self.full_dates
        actions: dict[int, str] = {t: e.action(opts) for t, e in self.table.entries.items()}
        self.masked = tuple((v, m, e.action(opts)) for v, m, e in self.table.masked)
        # Where the modified-dates column says C, dates move (S); other C are cleaning.
        self.shifted = frozenset(
            t for t, e in self.table.entries.items() if self.modified_dates and actions[t] == "C" and e.options.get("retain-longitudinal-modified-dates") == "C"
        )
        if actions.get(_PATIENT_AGE) == "K":
            actions[_PATIENT_AGE] = "A"
        actions[_PATIENT_ID] = "P"  # Z/D: a consistent pseudonym is a D value
        actions[_PATIENT_NAME] = "P"  # Z: a non-empty dummy is allowed, and the pseudonym is one
        for name in settings.keep:
            tag = profile.tag_of(name)
            actions[tag] = "A" if tag == _PATIENT_AGE else "K"
        for name in settings.remove:
            actions[profile.tag_of(name)] = "X"
        self.replace: dict[int, str] = {profile.tag_of(k): v for k, v in settings.replace.items()}
        for t in self.replace:
            actions[t] = "R"
        self.user_tags = {profile.tag_of(n) for n in (*settings.keep, *settings.remove, *settings.replace)}
        self.actions = actions
        self.cleans = "C" in actions.values() or any(a == "C" for _, _, a in self.masked)
        self.safe_private = self.table.private.action(opts) == "C"
        # Apply the common actions to raw elements' bytes (see _raw_action); False runs
        # every action through pydicom's decoded values (the reference the tests compare).
        self.raw_fast = True
        self._marks: dict[tuple, list[RawDataElement]] = {}
        self._memo: dict[int, tuple[dict | None, dict[tuple, str]]] = {}  # id(IOD) -> (IOD, {(tag, VR, parent): action})

    # -- public -------------------------------------------------------------------
    def check_burned_in(self, ds: Dataset) -> None:
        """The burned-in-text policy, the one place it is decided: raise QuarantineError
        when the pixels (or the encapsulated document) may carry text and this route
        neither cleans pixels nor allows such objects (see burned_in.burned_in_reason)."""
        if self.pixels_cleaned or self.settings.burned_in == "allow":
            return
        why = burned_in_reason(ds)
        if why:
            raise QuarantineError(f"{why}, and this route does not clean pixels")

    def action_for(self, tag: int, vr: str | None = None, *, sop_class: str = "", parent: int = 0) -> str:
        """The action this profile applies to ``tag`` at a place (``parent`` sequence tag,
        0 at the top level) of an object of ``sop_class``, before value-dependent choices
        (registry UIDs kept, unparsable dates dummied). For tests and --diff."""
        iod = self.table.iods.for_sop_class(sop_class) if sop_class else None
        return self._action(BaseTag(tag), vr, iod, parent)

    def apply(self, ds: Dataset, extra_codes: Iterable[tuple[str, str]] = ()) -> Result:
        """De-identify ``ds`` in place and mark it; returns it with the mappings used.

        Raises:
            QuarantineError: burned-in text that this route does not clean.
        """
        self.check_burned_in(ds)
        ctx = self._context(ds)
        before = {kw: first_text(ds, tag) for kw, tag in _LEVEL_UIDS.items()}
        self._remove_overlays(ds, ctx)
        # Bits outside BitsStored are no part of the image: an overlay embedded there stays
        # readable after its 60xx group went (here, or upstream: a sender's de-identifier
        # that removed the group and left the bits). Cleared unless an overlay group is
        # kept on purpose (a keep override): its bitmap may live in those bits.
        try:
            if not _has_overlay_group(ds) and zero_unused_high_bits(ds):
                self._note(ctx, "", BaseTag(0x7FE00010), "C")  # bits above BitsStored cleared
        except ValueError as exc:  # RLE frames that cannot be read: their bits cannot be checked
            raise QuarantineError(f"PixelData: {exc}") from None
        self._walk(ds, ctx, "", "", 0)
        for tag, value in self.replace.items():  # replacements also add absent attributes
            if tag not in ds:
                ds.add_new(tag, dictionary_VR(tag), value)
        self._mark(ds, extra_codes)
        self._file_meta(ds, ctx)
        levels = {kw: (old, first_text(ds, _LEVEL_UIDS[kw])) for kw, old in before.items() if old}
        return Result(ds, ctx.uid_map, {k: p.new_id for k, p in ctx.patients.items()}, ctx.changes, ctx.patients, levels)

    def _remove_overlays(self, ds: Dataset, ctx: _Context) -> bool:
        """Remove every overlay group whose Overlay Data (60xx,3000) the profile removes
        (X) or would clean (C: a bitmap cannot be cleaned here), all of its elements, so
        that no overlay is left without its data; also groups without Overlay Data,
        whose overlay lives in Pixel Data's unused bits. Returns whether any went."""
        groups = {t >> 16 for t in ds._dict if 0x6000 <= (t >> 16) <= 0x601E and not (t >> 16) & 1}
        removed = False
        for g in sorted(groups):
            data_tag = BaseTag((g << 16) | 0x3000)
            if data_tag in self.user_tags and self.actions[data_tag] == "K":
                continue
            if self._base(data_tag) in ("X", "C"):
                for t in [t for t in ds._dict if t >> 16 == g]:
                    del ds[t]
                self._note(ctx, "", data_tag, "X")
                removed = True
        return removed

    # -- per object ---------------------------------------------------------------
    def _context(self, ds: Dataset) -> _Context:
        key = patient_key_of(ds) or first_text(ds, 0x0020000D)  # no Patient ID: the study stands for the patient
        lo, hi = self.settings.date_shift_days
        offset = self.pseudo.date_offset_days(key, lo, hi) if self.modified_dates else None
        sop_class = first_text(ds, _SOP_CLASS)
        ctx = _Context(
            uid_map={},
            patients={},
            changes=[],
            offset=dt.timedelta(days=offset) if offset is not None else None,
            phi=identifiers(ds) if self.cleans else [],  # only text that is kept and cleaned needs them
            key=key,
            iod=self.table.iods.for_sop_class(sop_class) if sop_class else None,
            root=ds,
        )
        if key:
            issuer, pid = _split(key)
            ctx.patients[key] = Patient(issuer, pid, first_text(ds, _PATIENT_NAME), self.pseudo.patient_id(key), self.pseudo.patient_name(key), offset)
        return ctx

    def _file_meta(self, ds: Dataset, ctx: _Context) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            from pydicom.dataset import FileMetaDataset

            meta = ds.file_meta = FileMetaDataset()
        # Set through elements, not attributes: FileMetaDataset checks every assignment,
        # and the UIDs are read without decoding the dataset's (raw) elements.
        if 0x00080018 in ds._dict:
            set_meta(meta, 0x00020003, "UI", first_text(ds, 0x00080018))  # MediaStorageSOPInstanceUID
        elif meta.get("MediaStorageSOPInstanceUID"):  # no SOPInstanceUID: still never the original
            set_meta(meta, 0x00020003, "UI", self._uid(str(meta.MediaStorageSOPInstanceUID), ctx))
        if 0x00080016 in ds._dict:
            set_meta(meta, 0x00020002, "UI", first_text(ds, 0x00080016))  # MediaStorageSOPClassUID
        if "TransferSyntaxUID" not in meta:  # a bare data set: the syntax it was read in
            from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

            implicit, little = getattr(ds, "original_encoding", (True, True))
            if little is False:  # big endian is explicit VR only
                meta.TransferSyntaxUID = ExplicitVRBigEndian
            else:
                meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
        set_meta(meta, 0x00020012, "UI", IMPLEMENTATION_CLASS_UID)
        set_meta(meta, 0x00020013, "SH", IMPLEMENTATION_VERSION)
        for t in (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102):  # AE titles, signatures
            if t in meta:
                del meta[t]

    # -- actions ------------------------------------------------------------------
    def _base(self, tag: BaseTag) -> str | None:
        act = self.actions.get(tag)
        if act is None and self.masked and (tag >> 16) & 0xFF01 in (0x5000, 0x6000):
            for value, mask, a in self.masked:
                if tag & mask == value:
                    return a
        return act

    def _action(self, tag: BaseTag, vr: str | None, iod: dict | None, parent: int) -> str:
        """The action at this place; 'recurse' walks a sequence's items, 'U?' replaces a
        UID unless it is a registry UID, 'private' is decided with its Private Creator.

        Decided once per (tag, VR, IOD, parent) and remembered: it depends on nothing
        else (tags only, never a value), and a run meets the same few hundred places in
        every object."""
        if tag & 0x10000:  # odd group: private
            return "private"
        memo = self._memo.get(id(iod))
        if memo is None or memo[0] is not iod:
            memo = self._memo[id(iod)] = (iod, {})
        key = (int(tag), vr, parent)
        act = memo[1].get(key)
        if act is None:
            if len(memo[1]) >= _MEMO_LIMIT:
                memo[1].clear()
            act = memo[1][key] = self._decide(BaseTag(tag), vr, iod, parent)
        return act

    def _decide(self, tag: BaseTag, vr: str | None, iod: dict | None, parent: int) -> str:
        """``_action`` without the memo."""
        if tag.is_private:
            return "private"
        if tag >> 16 in (0x0000, 0x0002):  # command and File Meta elements have no place in a data set
            return "X"
        if vr in BINARY_VRS and _opaque_in_dictionary(tag):
            return "X"  # a sequence or text sent as bytes: not walked, not cleaned, so not kept
        act = self._base(tag)
        if vr is None or vr == "UN":
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if tag in self.user_tags:
            return "recurse" if act == "K" and vr == "SQ" else act  # type: ignore[return-value]
        if act is None:
            return self._unlisted(tag, vr)
        if act in profile.COMBINED or act == "X":
            act = profile.resolve(act, iod.get((parent, int(tag))) if iod else None)
        if act == "C" and tag in self.shifted:
            return "S" if vr in ("DA", "DT") else "K"  # whole days: times and UTC offsets stay
        if act == "U*":
            return "recurse" if vr == "SQ" else ("U" if vr == "UI" else "Z")
        if act == "K" and vr == "SQ":
            return "recurse"  # K on a sequence: its items are de-identified too (E.1.1)
        return act

    def _unlisted(self, tag: int, vr: str) -> str:
        """Attributes Table E.1-1 does not list: removed when no DICOM dictionary knows the
        tag (nothing says what it holds: a sender can plant text there); else dates and
        times by VR (E.1.1 note 4), the patient's birth and death dates written as text in
        another calendar removed, person names emptied, instance UIDs replaced, the rest
        kept."""
        if not _in_dictionary(tag):
            return "X"
        if tag in _DATES_AS_TEXT:
            return "X"
        if vr in ("DA", "DT"):
            return "K" if self.full_dates else ("S" if self.modified_dates else "D")
        if vr == "PN":
            return "Z"
        if vr == "SQ":
            return "recurse"
        if vr == "UI":
            keyword = keyword_for_tag(tag) or ""
            return "K" if any(w in keyword for w in _DEFINITION_UID_WORDS) else "U?"
        return "K"

    def _inner(self, act: str, mode: str, tag: BaseTag, vr: str | None) -> str:
        """Inside a dummied (D) or cleaned (C) sequence: what an element that the table
        would keep becomes (codes and structure stay; text, names and dates do not)."""
        if act not in ("K", "recurse", "A", "U?") or tag in STRUCTURAL:
            return act
        if vr is None or vr == "UN":
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                return act
        if vr == "SQ":
            return "recurse"
        if vr == "UI":
            return "U?"
        if tag == _CODE_MEANING:
            return "C"
        if vr in ("DA", "DT"):
            return "K" if self.full_dates else ("S" if self.modified_dates else "D")
        if vr == "TM":
            return "K" if (self.full_dates or self.modified_dates) else "D"
        if vr in TEXT_VRS and vr not in ("CS", "AS"):
            return "D" if mode == "D" else "C"
        return act

    # -- the walk -----------------------------------------------------------------
    def _walk(self, ds: Dataset, ctx: _Context, path: str, mode: str, parent: int) -> None:
        """``mode``: '' normal, 'D' inside a dummied sequence, 'C' inside a cleaned one."""
        elements = ds._dict
        for tag in list(elements):
            raw = elements[tag]
            if raw.value is None and isinstance(raw, RawDataElement):
                raw = ds.get_item(tag)  # what get_item does for every element: reads a deferred value
            vr = raw.VR
            act = self._action(tag, vr, ctx.iod, parent)
            if mode:
                act = self._inner(act, mode, tag, vr)
            if act == "private":
                if 0x0010 <= tag & 0xFFFF < 0x0100:  # a private creator: decided after its block
                    continue
                if self.safe_private and self._is_safe_private(ds, tag):
                    continue
                del elements[tag]  # not a creator nor pixel data: nothing of pydicom's to reset (Dataset.__delitem__)
                self._note(ctx, path, tag, "X")
                continue
            if act == "K":
                continue
            if act == "recurse" and self.raw_fast and not mode and type(raw) is RawDataElement and self._keeps_whole(raw):
                continue  # nothing inside to change: the sequence stays as read, undecoded
            if act == "recurse" or (act in ("C", "D") and (vr == "SQ" or (vr in (None, "UN") and _vr_of(tag) == "SQ"))):
                elem = ds[tag]
                if elem.VR == "SQ":
                    inner = mode if act == "recurse" else act
                    for k, item in enumerate(elem.value or []):
                        self._walk(item, ctx, f"{path}{_tagstr(tag)}[{k}].", inner, int(tag))
                    if act != "recurse":
                        self._note(ctx, path, tag, act)
                    continue
                if act == "recurse":
                    continue
            if act == "X":
                del ds[tag]
                self._note(ctx, path, tag, "X")
                continue
            if self.raw_fast and type(raw) is RawDataElement:
                new = self._raw_action(raw, act, tag, ctx, ds)
                if new is not None:
                    if new is not raw:
                        ds._dict[tag] = new
                        self._note(ctx, path, tag, act)
                    continue
            self._decoded_action(ds, tag, act, ctx, path)
        # Private creators: keep only those whose block still holds an element.
        creators = [t for t in ds.keys() if t.is_private and 0x0010 <= t.element < 0x0100]
        if creators:
            used = {(t.group, t.element >> 8) for t in ds.keys() if t.is_private and t.element >= 0x1000}
            for tag in creators:
                if (tag.group, tag.element) not in used:
                    del ds[tag]

    def _decoded_action(self, ds: Dataset, tag: BaseTag, act: str, ctx: _Context, path: str) -> None:
        elem = ds[tag]
        vr = elem.VR
        before = elem.value
        if act == "Z":
            elem.value = Sequence() if vr == "SQ" else ("" if vr in TEXT_VRS or vr in ("DA", "DT", "TM", "DS", "IS", "UI") else None)
        elif act == "D":
            if vr == "UI":
                elem.value = self._uids(elem.value, ctx)
            elif tag == _ENCAPSULATED_DOCUMENT:
                self._dummy_document(ds, elem)
            else:
                elem.value = DUMMY.get(vr, "ANONYMIZED")
        elif act == "U" or act == "U?":
            if vr == "UI":
                elem.value = self._uids(elem.value, ctx, keep_registry=act == "U?")
        elif act == "S":
            elem.value = self._shift_values(elem.value, vr, ctx)
        elif act == "C":
            self._clean(ds, elem, ctx)
        elif act == "A":
            elem.value = cap_age(str(elem.value)) if elem.value else elem.value
        elif act == "P":
            elem.value = self._patient_value(ds, tag, ctx)
        elif act == "R":
            elem.value = self.replace[tag]
        if elem.value is not before:
            self._note(ctx, path, tag, act)

    def _clean(self, ds: Dataset, elem, ctx: _Context) -> None:
        """C on one element: text loses the object's identifiers (never left empty: an
        emptied value becomes the VR's dummy); a name is the patient's pseudonym or a
        dummy; binary data cannot be cleaned and is removed; numbers stay."""
        vr = elem.VR
        if vr == "PN":
            value = str(elem.value or "")
            elem.value = self.pseudo.patient_name(ctx.key) if ctx.key and _same_person(value, ds, ctx) else (DUMMY["PN"] if value else value)
        elif vr in ("DA", "DT"):
            elem.value = elem.value if self.full_dates else (self._shift_values(elem.value, vr, ctx) if self.modified_dates else DUMMY[vr])
        elif vr in TEXT_VRS:
            values = elem.value if isinstance(elem.value, (list, tuple)) or type(elem.value).__name__ == "MultiValue" else [elem.value]
            cleaned = [scrub(str(v), ctx.phi) if v else v for v in values]
            cleaned = [c if (c and c.strip("X ")) or not v else DUMMY.get(vr, "ANONYMIZED") for c, v in zip(cleaned, values, strict=True)]
            elem.value = cleaned if len(cleaned) != 1 else cleaned[0]
        elif vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            del ds[elem.tag]  # nothing in a bitmap or blob can be cleaned here: removed
        elif vr == "UI":
            elem.value = self._uids(elem.value, ctx, keep_registry=True)

    def _dummy_document(self, ds: Dataset, elem) -> None:
        mime = first_text(ds, _MIME_TYPE).lower()
        elem.value = DUMMY_PDF if mime in ("", "application/pdf") else b"ANONYMIZED"
        if len(elem.value) % 2:
            elem.value += b"\x00"
        if _ENCAPSULATED_LENGTH in ds._dict:
            ds[_ENCAPSULATED_LENGTH].value = len(elem.value)

    def _patient_value(self, ds: Dataset, tag: int, ctx: _Context) -> str:
        if tag == _PATIENT_ID:
            key = patient_key_of(ds) if ds is not ctx.root else ctx.key  # an item (OtherPatientIDsSequence) has its own issuer
            if not key:
                return ""
            if key not in ctx.patients:
                issuer, pid = _split(key)
                ctx.patients[key] = Patient(issuer, pid, "", self.pseudo.patient_id(key), self.pseudo.patient_name(key), None)
            return self.pseudo.patient_id(key)
        return self.pseudo.patient_name(ctx.key) if ctx.key else ""

    def _shift_values(self, value, vr: str, ctx: _Context):
        if ctx.offset is None or value in (None, ""):
            return value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return [self._shift_values(v, vr, ctx) for v in value]
        moved = shift(str(value), vr, ctx.offset)
        return moved if moved is not None else DUMMY[vr]

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
            if self._action(tag, vr, None, -1) not in ("K", "recurse"):
                return False
        return True

    def _raw_action(self, raw: RawDataElement, act: str, tag: BaseTag, ctx: _Context, ds: Dataset) -> RawDataElement | None:
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
        if act in ("U", "U?") or (act == "D" and vr == "UI"):
            if vr != "UI":
                return None
            keep = act == "U?"
            return _raw_replace(raw, vr, [self._uid(v, ctx) if v and not (keep and _is_registry_uid(v)) else v for v in values])
        if act == "S" and vr in ("DA", "DT"):
            if ctx.offset is None or values == [""]:
                return raw
            return _raw_replace(raw, vr, [_or_dummy(shift(v, vr, ctx.offset), vr) for v in values])
        if act == "D" and isinstance(DUMMY.get(vr), str) and vr != "SQ":
            return _raw_replace(raw, vr, [DUMMY[vr]])  # type: ignore[list-item]
        if act == "P" and b"\x1b" not in (raw.value or b""):
            return _raw_replace(raw, vr, [self._patient_value(ds, tag, ctx)])
        if act == "A" and vr == "AS":
            capped = [cap_age(v) for v in values]
            return raw if capped == values else _raw_replace(raw, vr, capped)
        return None

    def _is_safe_private(self, ds: Dataset, tag: BaseTag) -> bool:
        if tag.element < 0x1000:
            return False
        creator_tag = (tag.group << 16) | (tag.element >> 8)
        creator = ds.get(creator_tag)
        name = str(creator.value).strip().upper() if creator is not None else ""
        return (name, tag.group, tag.element & 0xFF) in self.table.safe_private

    def _uids(self, value, ctx: _Context, keep_registry: bool = False):
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return [self._uids(v, ctx, keep_registry) for v in value]
        if not value or (keep_registry and _is_registry_uid(str(value))):
            return value
        return self._uid(str(value), ctx)

    def _uid(self, old: str, ctx: _Context) -> str:
        new = self.pseudo.uid(old)
        ctx.uid_map[old] = new
        return new

    def _note(self, ctx: _Context, path: str, tag: BaseTag, act: str) -> None:
        if self.record_changes:
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
            self._marks[key] = [encoded_element(tmp, tag, implicit=encoding[0]) for tag in sorted(tmp.keys())]
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
    patients: dict[str, Patient]
    changes: list[tuple[str, str, str]]
    offset: dt.timedelta | None
    phi: list[str]
    key: str  # the patient key of the object (see pseudonyms.patient_key)
    iod: dict | None  # the IOD Types of the object's SOP class (profile.IodTypes)
    root: Dataset | None = None


def patient_key_of(ds: Dataset) -> str:
    """The patient key of a dataset or item: Patient ID with its issuer (the IssuerOfPatientID,
    or the qualifiers' Universal Entity ID); "" without a Patient ID. What the pseudonyms
    of the patient are derived from (:func:`node.deid.pseudonyms.patient_key`)."""
    pid = first_text(ds, _PATIENT_ID)
    if not pid:
        return ""
    issuer = first_text(ds, _ISSUER)
    if not issuer and _ISSUER_QUALIFIERS in ds._dict:
        items = ds[_ISSUER_QUALIFIERS].value or []
        if items:
            uid, kind = first_text(items[0], 0x00400032), first_text(items[0], 0x00400033)  # UniversalEntityID(Type)
            issuer = f"{kind}:{uid}" if uid else ""
    return patient_key(pid, issuer)


def _has_overlay_group(ds: Dataset) -> bool:
    """Whether any overlay group (60xx, even groups up to 601E) is left in ``ds``."""
    return any(0x6000 <= (t >> 16) <= 0x601E and not (t >> 16) & 1 for t in ds._dict)


def _split(key: str) -> tuple[str, str]:
    from node.deid.pseudonyms import split_patient_key

    return split_patient_key(key)


def _same_person(value: str, ds: Dataset, ctx: _Context) -> bool:
    """Whether a name in the content is the patient's own (compared without case and
    separators)."""
    name = first_text(ctx.root, _PATIENT_NAME) if ctx.root is not None else ""
    norm = lambda s: " ".join(s.replace("^", " ").replace("=", " ").upper().split())  # noqa: E731
    return bool(name) and norm(value) == norm(name)


def _is_registry_uid(uid: str) -> bool:
    uid = uid.strip("\x00 ")
    return uid.startswith("1.2.840.10008.") or uid in UID_dictionary


def _or_dummy(value: str | None, vr: str) -> str:
    return value if value is not None else DUMMY[vr]  # type: ignore[return-value]


def _tagstr(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _in_dictionary(tag: int) -> bool:
    """Whether pydicom's data dictionary (repeating groups included) knows a public tag."""
    try:
        dictionary_VR(tag)
    except KeyError:
        return False
    return True


def _opaque_in_dictionary(tag: int) -> bool:
    """Whether pydicom's dictionary knows ``tag`` with no binary VR among its VRs (a
    sequence, text or numbers): such an element written as OB/OW/... hides its content
    from the walk (a ProcedureCodeSequence sent as OB kept its items' names whole)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return False
    return not any(v in BINARY_VRS for v in vr.split(" or "))


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


# kept for callers of the former module-level helpers
_first_text = first_text
_texts = texts
