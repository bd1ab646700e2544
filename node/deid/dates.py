"""Dates and ages as PS3.15 E.3.6 and HIPAA Safe Harbor expect.

Dates move by whole days, one offset per patient, so every DA, DT and TM of a patient
stays consistent: a DA/TM pair and the DT of the same instant move together, a time of
day never changes, and a DT keeps its UTC offset (its local date moves, so does the
instant, by the same days). Ranges (``A-B``, ``-B``, ``A-``) move at both ends; partial
values (a year, a year and month) keep their precision.
"""

from __future__ import annotations

import datetime as dt
import re

_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?")
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})|(\d{4})\.(\d{2})\.(\d{2})")  # the second: the retired ACR-NEMA form


def shift(value: str, vr: str, offset: dt.timedelta) -> str | None:
    """``value`` (one DA or DT value, or a range of them) moved by ``offset``; None when
    it is not a date this function understands (the caller then writes a dummy)."""
    s = value.strip(" \x00")
    if not s:
        return s
    one = _shift_one(s, vr, offset)
    if one is not None:
        return one
    if "-" in s:
        a, _, b = s.partition("-")  # a range: both ends move, an open end stays open
        left = _shift_one(a, vr, offset) if a else ""
        right = _shift_one(b, vr, offset) if b else ""
        if left is not None and right is not None:
            return f"{left}-{right}"
    return None


def _shift_one(s: str, vr: str, offset: dt.timedelta) -> str | None:
    if vr == "DA":
        m = _DA.fullmatch(s)
        if not m:
            return None
        y, mo, d = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(4), m.group(5), m.group(6))
        try:
            day = dt.date(int(y), int(mo), int(d)) + offset
        except (ValueError, OverflowError):
            return None
        return day.strftime("%Y%m%d")
    m = _DT.fullmatch(s)
    if not m:
        return None
    year, month, day, time, zone = m.groups()
    if zone and not (-1200 <= int(zone) <= 1400):
        return None
    try:
        moved = dt.date(int(year), int(month or 1), int(day or 1)) + offset
    except (ValueError, OverflowError):
        return None
    out = f"{moved.year:04d}"
    if month:
        out += f"{moved.month:02d}"
    if day:
        out += f"{moved.day:02d}"
    return out + (time or "") + (zone or "")


_AGE = re.compile(r"(\d{3})([DWMY])")
_DAYS_PER_UNIT = {"D": 1, "W": 7, "M": 30.4375, "Y": 365.25}


def cap_age(value: str) -> str:
    """An Age String (AS) over 89 years becomes ``090Y`` (HIPAA Safe Harbor groups every
    age over 89); other values are returned unchanged (ill-formed ones too: the caller
    decides)."""
    m = _AGE.fullmatch(value.strip(" \x00"))
    if m and int(m.group(1)) * _DAYS_PER_UNIT[m.group(2)] >= 90 * 365.25:
        return "090Y"
    return value
