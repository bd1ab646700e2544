"""Cleaning free text (the C action): the object's own identifiers, and the shapes of
dates, long numbers and phone numbers, are taken out of text that is kept.

Text is matched decoded (pydicom decodes with the object's Specific Character Set,
ISO 2022 escapes and multi-byte sets included) and written back in that set.
"""

from __future__ import annotations

import datetime as dt
import re

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement

from node.wire import raw_strings

# Attributes whose values identify the patient or the people and places around the study.
IDENTIFYING = [
    tag_for_keyword(kw)
    for kw in ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
               "AccessionNumber", "PatientBirthDate", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
               "InstitutionName", "InstitutionAddress", "PatientAddress", "PatientTelephoneNumbers", "StudyID",
               "RequestingPhysician", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "IssuerOfPatientID",
               "StudyDate", "AdmissionID", "MedicalRecordLocator")
]
_DATE_LIKE = re.compile(r"\b(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})\b")
_PHONE_LIKE = re.compile(r"(?:\+|\b)\d[\d ()./-]{6,}\d\b")
_LONG_NUMBER = re.compile(r"\d{5,}")
_WORD = re.compile(r"[\^=\s,;()]+")


def identifiers(ds: Dataset) -> list[str]:
    """The identifying strings of one object (decoded), longest first: whole values, their
    name components and words of two or more characters, and dates in the spellings
    free text uses (19700401, 1970-04-01, 01/04/1970, 04/01/1970, 01.04.1970)."""
    out: set[str] = set()
    for tag in IDENTIFYING:
        for value in _texts(ds, tag):
            out.add(value)
            out.update(p for p in _WORD.split(value) if len(p) >= 2 or (p and not p.isascii()))  # one CJK character is a name
            if len(value) == 8 and value.isdigit():
                out.update(_date_spellings(value))
    out.discard("")
    return sorted(out, key=len, reverse=True)


def _date_spellings(value: str) -> set[str]:
    try:
        d = dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return set()
    return {d.strftime(f) for f in ("%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%Y/%m/%d", "%d-%m-%Y")}


def scrub(text: str, phi: list[str]) -> str:
    """``text`` without the strings of ``phi`` (whole words or within words, any case),
    date-shaped and phone-shaped runs, and runs of five or more digits (each becomes X)."""
    for p in phi:
        text = re.sub(re.escape(p), "X" * min(len(p), 3), text, flags=re.IGNORECASE)
    text = _DATE_LIKE.sub("X", text)
    text = _PHONE_LIKE.sub("X", text)
    return _LONG_NUMBER.sub("X", text)


def texts(ds: Dataset, tag: int) -> list[str]:
    """The values of a top-level element as strings (decoded with the object's character
    set). Read from the element's bytes when they are plain ASCII without escape
    sequences (so the element stays raw for the writer), else through pydicom."""
    return _texts(ds, tag)


def _texts(ds: Dataset, tag: int) -> list[str]:
    elem = ds._dict.get(tag)
    if elem is None:
        return []
    if type(elem) is RawDataElement and elem.VR != "UN" and (elem.value is None or b"\x1b" not in elem.value):
        vals = raw_strings(elem)
        if vals is not None:
            return vals if vals != [""] else []
    v = ds[tag].value
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [str(x) for x in v if str(x)]
    return [str(v)]


def first_text(ds: Dataset, tag: int) -> str:
    vals = _texts(ds, tag)
    return vals[0].strip() if vals else ""
