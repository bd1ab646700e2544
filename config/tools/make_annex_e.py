"""Regenerate config/annex_e.json: PS3.15 Table E.1-1 with every option column, the safe
private attributes of Table E.3.10-1, and the attribute Types the IODs give the listed
attributes (to resolve combined codes such as X/Z/D).

    pip install dicom-standard==0.1.0 dicom-anonymizer==2.1.0
    python config/tools/make_annex_e.py --part15-rst chapter_E.rst > config/annex_e.json

Sources (each recorded in the output with its edition):

* Basic Profile column: the newest edition at hand, 2026c, from the PyPI package
  ``dicom-anonymizer`` (module ``dicomfields_2026c``: lists of tags per action code).
* Option columns (rtnSafePrivOpt, rtnUIDsOpt, rtnDevIdOpt, rtnInstIdOpt, rtnPatCharsOpt,
  rtnLongFullDatesOpt, rtnLongModifDatesOpt, cleanDescOpt, cleanStructContOpt,
  cleanGraphOpt): the PyPI package ``dicom-standard`` 0.1.0 (MIT, Innolitics), file
  ``confidentiality_profile_attributes.json``, parsed from the 2020 edition.
* Safe private attributes (Table E.3.10-1): the text of PS3.15 as published in 2020,
  converted to reStructuredText in the public repository chsasank/dicom_standard
  (commit 2384a79, ``source/part15/chapter_E.rst``); pass that file with --part15-rst.
* Attribute Types per IOD: the same ``dicom-standard`` package (``sops.json``,
  ``ciods.json``, ``ciod_to_modules.json``, ``module_to_attributes.json``), 2020.

How the editions are merged (also written into the output as ``resolution``):

1. An attribute's Basic Profile action is the 2026c one; attributes only in 2020 keep
   their 2020 action. Where the two editions differ, the conflict is listed.
2. Option columns are the 2020 ones. For attributes that 2020 does not list, two option
   columns follow from PS3.15 itself: E.1.1 note 4 lets a de-identifier handle every
   date and time by its VR (DA, DT, TM), so such attributes get the two longitudinal
   columns (full dates K, modified dates C); E.3.9 retains UIDs, so a U attribute gets
   rtnUIDsOpt K. These are marked ``"options_from": "rule"``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from importlib import metadata
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_for_tag

# dicom-standard's column keys -> casemask option names
COLUMNS = {
    "rtnSafePrivOpt": "retain-safe-private",
    "rtnUIDsOpt": "retain-uids",
    "rtnDevIdOpt": "retain-device-identity",
    "rtnInstIdOpt": "retain-institution-identity",
    "rtnPatCharsOpt": "retain-patient-characteristics",
    "rtnLongFullDatesOpt": "retain-longitudinal-full-dates",
    "rtnLongModifDatesOpt": "retain-longitudinal-modified-dates",
    "cleanDescOpt": "clean-descriptors",
    "cleanStructContOpt": "clean-structured-content",
    "cleanGraphOpt": "clean-graphics",
}
CODES_2026 = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}
TYPE_RANK = {"1": 0, "1C": 1, "2": 2, "2C": 3}


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _key_2020(entry_id: str) -> str:
    """'60xx3000' -> '60003000/FF00FFFF', '50xxxxxx' -> '50000000/FF000000', else upper."""
    if "x" not in entry_id.lower():
        return entry_id.upper()
    value = entry_id.lower().replace("x", "0").upper()
    mask = "".join("0" if c == "x" else "F" for c in entry_id.lower())
    return f"{value}/{mask}"


def basic_2026() -> tuple[dict[str, str], str]:
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    out: dict[str, str] = {}
    for name, code in CODES_2026.items():
        for entry in getattr(table, name):
            group, elem = entry[:2]
            if len(entry) == 4:  # a repeating group: (group, element, group mask, element mask)
                out[f"{group:04X}{elem:04X}/{entry[2]:04X}{entry[3]:04X}"] = code
            else:
                out[f"{group:04X}{elem:04X}"] = code
    return out, f"dicom-anonymizer {metadata.version('dicom-anonymizer')} (PyPI), module dicomfields_2026c"


def table_2020(standard: Path) -> tuple[dict[str, dict], dict]:
    rows = json.loads((standard / "confidentiality_profile_attributes.json").read_text())
    out, private = {}, {}
    for row in rows:
        if row["id"].startswith("gggg"):
            private = row
            continue
        out[_key_2020(row["id"])] = row
    return out, private


def safe_private(rst: Path) -> list[dict]:
    """Table E.3.10-1 rows from the reStructuredText grid table of PS3.15 E.3.10."""
    text = rst.read_text(encoding="utf-8")
    start = text.index(".. _sect_E.3.10:")
    end = text.index(".. _sect_E.3.11:", start)
    rows, cells = [], None
    for line in text[start:end].splitlines():
        s = line.strip()
        if s.startswith("+"):
            if cells and any(c.strip() for c in cells):
                rows.append([re.sub(r"\s+", " ", c).strip() for c in cells])
            cells = None
            continue
        if s.startswith("|") and s.endswith("|"):
            parts = [p for p in s[1:-1].split("|")]
            cells = parts if cells is None else [a + " " + b for a, b in zip(cells, parts, strict=True)]
    out = []
    for tag, creator, vr, vm, meaning in rows:
        m = re.fullmatch(r"\(([0-9A-Fa-f]{4}),xx([0-9A-Fa-f]{2})\)", tag)
        if not m:
            continue  # the header row
        meaning = re.sub(r"\\\s*:s\s*up:`(\w+)`\\\s*", r"\1 ", meaning)  # 1\ :sup:`st`\ value
        out.append({"group": m.group(1).upper(), "element": m.group(2).upper(), "creator": creator, "vr": vr, "vm": vm, "meaning": meaning})
    if len(out) < 50:
        raise SystemExit(f"only {len(out)} safe private rows parsed from {rst}: not the expected table")
    return out


def iod_types(standard: Path, tags: set[str]) -> dict:
    """For the listed attributes: which IODs require them as Type 1/1C/2/2C, by the
    attribute's parent sequence ('' at the top level). The strongest Type wins where
    modules of one IOD disagree; Type 3 (and absence) is the default and not stored."""
    sops = json.loads((standard / "sops.json").read_text())
    ciods = {c["name"]: c["id"] for c in json.loads((standard / "ciods.json").read_text())}
    modules = collections.defaultdict(list)
    for r in json.loads((standard / "ciod_to_modules.json").read_text()):
        modules[r["ciodId"]].append(r["moduleId"])
    attrs = collections.defaultdict(list)
    for r in json.loads((standard / "module_to_attributes.json").read_text()):
        parts = [p.upper() for p in r["path"].split(":")[1:]]
        if parts[-1] in tags and r["type"] in TYPE_RANK:
            attrs[r["moduleId"]].append((f"{parts[-2] if len(parts) > 1 else ''}/{parts[-1]}", r["type"]))
    names = sorted(modules)
    index = {n: k for k, n in enumerate(names)}
    types: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for ciod in names:
        best: dict[str, str] = {}
        for module in modules[ciod]:
            for key, t in attrs.get(module, ()):
                if key not in best or TYPE_RANK[t] < TYPE_RANK[best[key]]:
                    best[key] = t
        for key, t in best.items():
            types[key][t].append(index[ciod])
    return {
        "ciods": names,
        "sop_classes": {s["id"]: index[ciods[s["ciod"]]] for s in sops if ciods.get(s["ciod"]) in index},
        "types": {k: dict(sorted(v.items())) for k, v in sorted(types.items())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part15-rst", required=True, type=Path, help="chapter_E.rst of chsasank/dicom_standard (commit 2384a79)")
    args = ap.parse_args()
    standard = Path(sys.prefix) / "standard"
    new, new_source = basic_2026()
    old, private_row = table_2020(standard)
    attributes, conflicts = {}, []
    for key in sorted(set(new) | set(old)):
        row = old.get(key)
        basic = new.get(key) or row["basicProfile"]
        options = {COLUMNS[c]: a for c, a in (row or {}).items() if c in COLUMNS}
        origin = "2020" if row else "none"
        tag = None if "/" in key else int(key, 16)
        vr = _vr(tag) if tag is not None else ""
        if row is None and vr in ("DA", "DT", "TM"):
            options = {"retain-longitudinal-full-dates": "K", "retain-longitudinal-modified-dates": "C"}
            origin = "rule"
        elif row is None and basic == "U":
            options = {"retain-uids": "K"}
            origin = "rule"
        if row is not None and key in new and row["basicProfile"] != new[key]:
            conflicts.append({"tag": key, "name": row["name"], "2020": row["basicProfile"], "2026c": new[key], "chosen": new[key]})
        attributes[key] = {
            "keyword": (keyword_for_tag(tag) or "") if tag is not None else "",
            "name": row["name"] if row else "",
            "vr": vr,
            "basic": basic,
            "basic_from": "2026c" if key in new else "2020",
            "options": dict(sorted(options.items())),
            "options_from": origin,
        }
    result = {
        "standard": "DICOM PS3.15 Annex E: Table E.1-1 (Application Level Confidentiality Profile Attributes) and Table E.3.10-1 (Safe Private Attributes)",
        "edition": "2026c",
        "sources": {
            "basic": {"edition": "2026c", "source": new_source},
            "options": {"edition": "2020", "source": f"dicom-standard {metadata.version('dicom-standard')} (PyPI, MIT, Innolitics), confidentiality_profile_attributes.json", "columns": COLUMNS},
            "safe_private": {"edition": "2020 (the edition current on 2020-08-06; the conversion names none)", "source": "PS3.15 E.3.10 Table E.3.10-1, reStructuredText conversion of the published standard, github.com/chsasank/dicom_standard commit 2384a79 source/part15/chapter_E.rst"},
            "iod_types": {"edition": "2020", "source": f"dicom-standard {metadata.version('dicom-standard')} (PyPI), sops.json, ciods.json, ciod_to_modules.json, module_to_attributes.json"},
        },
        "resolution": [
            "Basic Profile action: the 2026c edition's; attributes that only the 2020 edition lists keep their 2020 action; every attribute where the editions differ is listed in 'conflicts' with the action chosen.",
            "Option columns: the 2020 edition's (options_from '2020').",
            "Attributes new since 2020 (options_from 'rule'): DA/DT/TM ones get the two longitudinal-date columns (full dates K, modified dates C), as PS3.15 E.1.1 note 4 allows handling dates and times by VR; U ones get retain-uids K (E.3.9). Others have no option column.",
            "Private attributes: the 2020 row (basic X, retain-safe-private C: keep those of Table E.3.10-1 with their Private Creator).",
            "IOD Types (2020): a combined code resolves to its first letter unless the attribute is Type 1/1C (D, or U* for sequences) or Type 2/2C (Z) in the object's IOD at that place; SOP classes the 2020 edition does not know resolve to the first letter.",
        ],
        "conflicts": conflicts,
        "attributes": attributes,
        "private": {"basic": private_row.get("basicProfile", "X"), "options": {COLUMNS[c]: a for c, a in private_row.items() if c in COLUMNS}},
        "safe_private": safe_private(args.part15_rst),
        "iods": iod_types(standard, {k for k in attributes if "/" not in k}),
    }
    sys.stdout.write(_dump(result))
    return 0


def _dump(obj: dict, depth: int = 0) -> str:
    """JSON with one entry per line down to the third level (diffs stay readable)."""
    if depth == 3 or not isinstance(obj, dict) or not obj:
        return json.dumps(obj, ensure_ascii=False)
    pad = " " * (depth + 1)
    items = [f"{pad}{json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}" + ("\n" if depth == 0 else "")


if __name__ == "__main__":
    sys.exit(main())
