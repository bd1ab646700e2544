"""The UI value grammar of DICOM PS3.5 (section 9.1 and Table 6.2-1), checked on every
UID that arrives from the network before anything is written.

A UID is at most 64 characters of digits and dots: one or more components separated by
single dots, each component a number whose first digit is not 0 unless it is the only
digit. Trailing NUL or space padding (PS3.5 6.2) is stripped by the callers' readers
before the check.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64

_STRICT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
# Some older equipment writes components with leading zeros ("1.2.840.113619.0969");
# [node] strict_uids = false lets them in. Digits and dots only, no empty component.
_LENIENT = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_valid_uid(value: str, strict: bool = True) -> bool:
    """True when ``value`` follows the PS3.5 UI grammar (``strict=False``: leading zeros
    in components allowed, nothing else relaxed)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LENGTH:
        return False
    return (_STRICT if strict else _LENIENT).fullmatch(value) is not None


def invalid_uids(values: dict[str, str], strict: bool = True, required: tuple[str, ...] = ()) -> list[str]:
    """The names (keywords) among ``values`` whose value is not a valid UID; an empty
    value is a problem only for the names in ``required``. Names only, never values,
    so the result may be logged."""
    return [name for name, v in values.items() if (v or name in required) and not is_valid_uid(v, strict)]
