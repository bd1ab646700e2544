"""The PS3.15 Annex E profile: the Basic Profile table and how each option changes it.

The Basic Profile column comes from ``config/annex_e.json`` (Table E.1-1, edition and
origin recorded in the file). The option columns are written here as keyword sets,
following the option semantics of PS3.15 E.3: each option turns some actions into K
(keep) or C (clean).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from pydicom.datadict import tag_for_keyword

ANNEX_E_FILE = Path(__file__).resolve().parents[2] / "config" / "annex_e.json"

# Option name -> (CID 7050 code value, code meaning)
OPTIONS: dict[str, tuple[str, str]] = {
    "retain-longitudinal-full-dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain-longitudinal-modified-dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain-patient-characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain-device-identity": ("113109", "Retain Device Identity Option"),
    "retain-uids": ("113110", "Retain UIDs Option"),
    "retain-safe-private": ("113111", "Retain Safe Private Option"),
    "retain-institution-identity": ("113112", "Retain Institution Identity Option"),
    "clean-graphics": ("113103", "Clean Graphics Option"),
    "clean-structured-content": ("113104", "Clean Structured Content Option"),
    "clean-descriptors": ("113105", "Clean Descriptors Option"),
}
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_CODE = ("113101", "Clean Pixel Data Option")
CLEAN_VISUAL_CODE = ("113102", "Clean Recognizable Visual Features Option")

PATIENT_CHARACTERISTICS = {
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
    "PregnancyStatus", "PatientSexNeutered", "PatientSpeciesDescription", "PatientBreedDescription",
}
PATIENT_CHARACTERISTICS_CLEAN = {"AdditionalPatientHistory", "Allergies", "MedicalAlerts", "PatientState", "SpecialNeeds", "Occupation"}
DEVICE_IDENTITY = {
    "StationName", "DeviceSerialNumber", "DeviceUID", "DetectorID", "GantryID", "GeneratorID", "PlateID",
    "CassetteID", "SourceSerialNumber", "DeviceLabel", "DeviceDescription", "PerformedStationName",
    "PerformedStationAETitle", "ScheduledStationName", "ScheduledStationAETitle", "PerformedLocation",
    "ScheduledProcedureStepLocation", "DeviceAlternateIdentifier", "DeviceAlternateIdentifierType",
    "DeviceAlternateIdentifierFormat", "LongDeviceDescription", "DeviceSettingsDescription",
    "PerformedStationClassCodeSequence", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationNameCodeSequence", "ScheduledStationNameCodeSequence",
}
INSTITUTION_IDENTITY = {
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "InstitutionalDepartmentTypeCodeSequence",
}
DESCRIPTORS = {
    "StudyDescription", "SeriesDescription", "ImageComments", "ProtocolName", "AcquisitionComments",
    "PerformedProcedureStepDescription", "RequestedProcedureDescription", "ScheduledProcedureStepDescription",
    "AdmittingDiagnosesDescription", "DerivationDescription", "AcquisitionDeviceProcessingDescription",
    "ContrastBolusAgent", "FrameComments", "InterpretationText", "VisitComments", "ServiceEpisodeDescription",
    "StudyComments", "SeriesDescriptionCodeSequence", "LabelText", "RequestAttributesSequence",
    "DischargeDiagnosisDescription", "ReasonForTheRequestedProcedure", "ReasonForStudy", "ImagePresentationComments",
    "TopicSubject", "TopicTitle", "TopicKeywords", "TopicAuthor", "DetectorComments", "ProcedureStepLabel",
    "IdentifyingComments", "BranchOfService", "MilitaryRank", "CommentsOnThePerformedProcedureStep",
}
STRUCTURED_CONTENT = {"ContentSequence", "AcquisitionContextSequence"}
GRAPHICS = {"GraphicAnnotationSequence"}
# Safe private attributes (Retain Safe Private): (private creator, group, element byte).
# A deliberately short list of acquisition parameters; extend it per vendor.
SAFE_PRIVATE: set[tuple[str, int, int]] = {
    ("GEMS_ACQU_01", 0x0019, 0x23),  # table speed
    ("GEMS_ACQU_01", 0x0019, 0x24),  # mid scan time
    ("GEMS_ACQU_01", 0x0019, 0x27),  # rotation speed
    ("GEMS_PARM_01", 0x0043, 0x27),  # scan pitch ratio
    ("SIEMENS MR HEADER", 0x0019, 0x0B),  # slice measurement duration
    ("SIEMENS MR HEADER", 0x0019, 0x0F),  # gradient mode
    ("PHILIPS IMAGING DD 001", 0x2001, 0x03),  # diffusion b-factor
}


@dataclasses.dataclass(frozen=True)
class Table:
    edition: str
    source: str
    by_tag: dict[int, str]
    masked: tuple[tuple[int, int, str], ...]  # (value, mask, action) for repeating groups

    def action(self, tag: int) -> str | None:
        a = self.by_tag.get(tag)
        if a is not None:
            return a
        for value, mask, act in self.masked:
            if tag & mask == value:
                return act
        return None


@functools.cache
def load_table(path: Path = ANNEX_E_FILE) -> Table:
    raw = json.loads(path.read_text())
    by_tag: dict[int, str] = {}
    masked = []
    for key, entry in raw["basic"].items():
        if "/" in key:
            value, mask = key.split("/")
            masked.append((int(value, 16), int(mask, 16), entry["action"]))
        else:
            by_tag[int(key, 16)] = entry["action"]
    return Table(raw["edition"], raw["source"], by_tag, tuple(masked))


def tag_of(name: str) -> int:
    """A keyword ('PatientName') or a hex tag ('00100010', '(0010,0010)') as an int."""
    t = tag_for_keyword(name)
    if t is not None:
        return t
    cleaned = name.strip("()").replace(",", "").replace(" ", "")
    try:
        if len(cleaned) == 8:
            return int(cleaned, 16)
    except ValueError:
        pass
    raise ValueError(f"{name!r} is neither a DICOM keyword nor a tag like 00100010")


def tags_of(names: set[str]) -> set[int]:
    out = set()
    for n in names:
        t = tag_for_keyword(n)
        if t is not None:
            out.add(t)
    return out
