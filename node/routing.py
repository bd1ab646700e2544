"""Routes: ordered rules that say which objects go where and how.

A route's ``match`` is a table of conditions that must all hold. Keys are DICOM keywords
(``Modality``, ``StudyDescription``, ...) or ``calling_ae`` / ``called_ae``; a value is a
string (equality), a list of strings (any of them) or ``{ regex = "..." }`` (a Python
regular expression searched in the value). An empty match takes every object. An object
may match several routes; one that matches none follows ``[node] unrouted``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict

from node.config import ROUTE_SPECIAL_KEYS, Route, did_you_mean
from node.queue import UNKNOWN_PATIENT


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether one route matches one object, and one reason per condition."""

    route: str
    matched: bool
    reasons: tuple[str, ...]


def _keyword_meant(key: str) -> str:
    """': did you mean X?' for a DICOM keyword written in the wrong case ('modality') or
    misspelt ('StudyDescripton'), else ''."""
    lower = key.lower()
    same = [k for k in keyword_dict if k.lower() == lower]
    if same:
        return f": did you mean {same[0]!r}?"
    return did_you_mean(key, [k for k in keyword_dict if abs(len(k) - len(key)) <= 3])


def check_match(match: Mapping[str, Any]) -> list[str]:
    """Problems with a match table (unknown keywords, bad regexes, bad value types)."""
    problems = []
    for key, cond in match.items():
        if key not in ROUTE_SPECIAL_KEYS and key not in keyword_dict:
            problems.append(f"{key!r} is not a DICOM keyword (nor calling_ae / called_ae){_keyword_meant(key)}")
        if isinstance(cond, dict):
            if set(cond) != {"regex"}:
                problems.append(f"{key}: a table condition is {{ regex = \"...\" }}")
            else:
                try:
                    re.compile(cond["regex"])
                except re.error as exc:
                    problems.append(f"{key}: bad regular expression {cond['regex']!r}: {exc}")
        elif isinstance(cond, list):
            if not all(isinstance(v, (str, int, float)) for v in cond):
                problems.append(f"{key}: a list condition holds strings or numbers")
        elif not isinstance(cond, (str, int, float)):
            problems.append(f"{key}: use a string, a list of strings or {{ regex = \"...\" }}")
    return problems


def match_warnings(match: Mapping[str, Any]) -> list[str]:
    """Valid but suspicious conditions: a regular expression that matches the empty
    string (an empty alternative such as ``"brain|head|"``, or ``.*``) takes every object,
    present or absent."""
    out = []
    for key, cond in match.items():
        if isinstance(cond, dict) and isinstance(cond.get("regex"), str):
            try:
                rx = re.compile(cond["regex"])
            except re.error:
                continue
            if rx.search("") is not None:
                out.append(f"{key}: the regular expression {cond['regex']!r} matches an empty value, so it matches every object (an empty alternative such as 'a|b|'?)")
    return out


def _values(attrs: Mapping[str, Any], key: str) -> list[str]:
    value = attrs.get(key)
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def _condition(key: str, cond: Any, attrs: Mapping[str, Any]) -> tuple[bool, str]:
    values = _values(attrs, key)
    shown = "|".join(values) if values else "(absent)"
    if isinstance(cond, dict):
        rx = re.compile(cond["regex"])
        ok = any(rx.search(v) for v in values) if values else bool(rx.search(""))
        return ok, f"{key} {shown!s} {'matches' if ok else 'does not match'} /{cond['regex']}/"
    if isinstance(cond, list):
        wanted = [str(c) for c in cond]
        ok = any(v.strip() in wanted for v in values)
        return ok, f"{key} {shown} {'is' if ok else 'is not'} one of {wanted}"
    ok = any(v.strip() == str(cond) for v in values)
    return ok, f"{key} {shown} {'==' if ok else '!='} {cond}"


UNKNOWN_SOP_CLASS = "unknown SOP class, not de-identified (a route must name its SOPClassUID to take it)"


@functools.cache
def _standard_storage() -> frozenset[str]:
    from pynetdicom import AllStoragePresentationContexts

    return frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


def is_known_sop_class(uid: str) -> bool:
    """True for a standard storage SOP class (as pynetdicom lists them); False for a
    private or unknown one, whose content no de-identification profile here knows."""
    return str(uid).strip() in _standard_storage()


def evaluate(route: Route, attrs: Mapping[str, Any]) -> Verdict:
    """Evaluate one route on an object's attributes (keywords plus calling_ae/called_ae).

    An object of a private or unknown SOP class (``attrs["SOPClassUID"]``) matches only
    a route whose ``match`` names ``SOPClassUID``: it is never forwarded by default.

    Note: reasons name only attribute keywords and the configured values, so the
    explanation may echo values the admin wrote into the config, never others.
    """
    reasons = []
    matched = True
    sop_class = attrs.get("SOPClassUID")
    if sop_class and not is_known_sop_class(str(sop_class)) and "SOPClassUID" not in route.match:
        matched = False
        reasons.append(UNKNOWN_SOP_CLASS)
    for key, cond in route.match.items():
        ok, why = _condition(key, cond, attrs)
        matched = matched and ok
        reasons.append(why)
    if not route.match:
        reasons.append("empty match takes every object")
    return Verdict(route.name, matched, tuple(reasons))


def match_routes(routes: Iterable[Route], attrs: Mapping[str, Any]) -> list[Verdict]:
    """Every route's verdict, in configuration order."""
    return [evaluate(r, attrs) for r in routes]


def attributes_of(ds: Any, calling_ae: str = "", called_ae: str = "", keys: Iterable[str] = ()) -> dict[str, Any]:
    """The attributes a set of routes looks at, read from a pydicom Dataset."""
    out: dict[str, Any] = {"calling_ae": calling_ae, "called_ae": called_ae}
    for key in {*keys, "SOPClassUID"}:  # the SOP class decides whether any route may take it
        if key in ROUTE_SPECIAL_KEYS:
            continue
        try:
            value = ds.get(key)
        except Exception:  # an undecodable element is treated as absent
            value = None
        out[key] = value.value if hasattr(value, "value") else value
    return out


def patient_of(ds: Any, log_id: Callable[[str], str]) -> str:
    """Which patient an object belongs to, as a keyed hash (``log_id``, the node's
    ``Pseudonymizer.log_id``) of its patient key: Patient ID with its issuer, exactly as
    node.deid derives the patient's pseudonyms from them (``patient_key_of``), so two
    objects with the same hash get the same pseudonymous patient. Never the value itself:
    it is stored on the study (node.queue.join_study)."""
    from node.deid.deidentify import patient_key_of

    return log_id("study-patient\x1f" + patient_key_of(ds))


def keys_used(routes: Iterable[Route]) -> set[str]:
    return {k for r in routes for k in r.match}



def recall_patient(session: Any, study: Any, data_dir: Path, log_id: Callable[[str], str]) -> str | None:
    """For a study without ``patient_key`` that already holds objects routed before (a
    study received before revision 0004, which had no such column): its patient, taken
    from the first of those objects whose original is still kept, set on the study and
    returned; :data:`UNKNOWN_PATIENT` when none is (retention deleted them), so that the
    check fails closed instead of letting the next object routed decide the patient.
    None (nothing set) when the study has no object routed before: its first object
    routed now fixes its patient (node.queue.join_study)."""
    from pydicom import dcmread
    from sqlalchemy import select

    from node.db import Instance, InstanceState, data_path

    if study.patient_key is not None:
        return study.patient_key
    earlier = session.scalars(
        select(Instance).where(Instance.study_id == study.id, Instance.state != InstanceState.RECEIVED).order_by(Instance.id).limit(100)
    ).all()
    if not earlier:
        return None
    for inst in earlier:
        if inst.purged_at is not None:
            continue
        try:
            ds = dcmread(data_path(data_dir, inst.path), stop_before_pixels=True)
            study.patient_key = patient_of(ds, log_id)
        except Exception:  # a missing or unreadable original: the next one may tell
            continue
        return study.patient_key
    study.patient_key = UNKNOWN_PATIENT
    return study.patient_key
