"""Regenerate config/annex_e.json from the dicom-anonymizer package (PyPI).

    pip install dicom-anonymizer==2.1.0
    python config/tools/make_annex_e.py > config/annex_e.json

The package carries the Basic Profile column of DICOM PS3.15 Table E.1-1 as lists of
tags per action code; this script records which edition and package it came from.
"""

import json
import sys
from importlib import metadata

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom.datadict import keyword_for_tag

CODES = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}

actions = {}
for name, code in CODES.items():
    for entry in getattr(table, name):
        group, elem = entry[:2]
        if len(entry) == 4:  # a repeating group: (group, element, group mask, element mask)
            tag = f"{group:04X}{elem:04X}/{entry[2]:04X}{entry[3]:04X}"
            actions[tag] = {"action": code, "keyword": ""}
        else:
            tag = f"{group:04X}{elem:04X}"
            actions[tag] = {"action": code, "keyword": keyword_for_tag((group << 16) | elem) or ""}

json.dump(
    {
        "standard": "DICOM PS3.15 Annex E, Table E.1-1, Basic Application Level Confidentiality Profile",
        "edition": "2026c",
        "source": f"dicom-anonymizer {metadata.version('dicom-anonymizer')} (PyPI), module dicomfields_2026c",
        "basic": dict(sorted(actions.items())),
    },
    sys.stdout,
    indent=1,
)
