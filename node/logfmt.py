"""Log records that cannot forge log lines.

Peers choose some of what the node logs: a calling AE title, a UID, a host name, and
pynetdicom logs them as received. A line feed, carriage return or terminal escape in
one of them would start a line of the sender's choosing, or rewrite the terminal.
:class:`EscapingFormatter` writes every C0 and C1 control character (and U+2028/U+2029)
of the formatted record as a visible escape, so one record is one line; traceback
lines are escaped one by one and indented, so none can pass for a record.

The node's own records name an original UID by its keyed hash (``Pseudonymizer.log_id``);
pynetdicom's (``-vv``) quote the UIDs of what it receives, e.g. "Affected SOP Instance
UID : 1.2...". The formatter names every UID in a pynetdicom record the same way (the
standard's own UIDs, such as SOP classes and transfer syntaxes, stay readable), so an
original UID, which may embed dates or device serials, never reaches the log.
pydicom's records quote the header values they complain about (an unknown Specific
Character Set, say, which a sender may fill with a name): the formatter withholds every
quoted span of them.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


# A UID as written in a log line: 4 or more numeric components (PS3.5 9.1); not part of
# a longer run of digits and dots. Four components of 0-255 are taken for an IPv4
# address and kept.
_UID = re.compile(r"(?<![\d.])\d+(?:\.\d+){3,}(?![\d.])")
_uid_namer: Callable[[str], str] | None = None


def name_uids_with(namer: Callable[[str], str] | None) -> None:
    """Name UIDs in pynetdicom's records by ``namer`` (the node's ``log_id``) from now
    on; before a node set one (or with None), such UIDs read ``h:?``."""
    global _uid_namer
    _uid_namer = namer


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(len(p) <= 3 and int(p) <= 255 for p in parts)


# Where pynetdicom quotes a UID field as the peer sent it, whatever it holds: after a
# label ("Affected SOP Instance UID     : ...", "Their Implementation Class UID: ...",
# "Abstract Syntax: =...", "SOP Class: =...") to the end of the line, or in quotes after
# "UID" / "Syntax Name" / "syntax:" ("No supported service class available for the SOP
# Class UID '...'", at ERROR). A sender can put any text there (a patient's name, a UID
# of one to three components): the field's whole value is named, not only what looks
# like a UID.
_LABELLED = re.compile(r"(UID\s*:\s*|Syntax:\s*=|SOP Class:\s*=)(\S(?:.*\S)?)")
_QUOTED = re.compile(r"((?:UID|Syntax Name|syntax:)\s*')([^']*)(')")


def _standard(value: str) -> bool:
    """A UID of the standard's (pydicom's UID dictionary), or the name pynetdicom
    prints for one ("CT Image Storage")."""
    from pydicom.uid import UID_dictionary

    return value in UID_dictionary or value in _standard_names()


@functools.cache
def _standard_names() -> frozenset[str]:
    from pydicom.uid import UID_dictionary

    return frozenset(entry[0] for entry in UID_dictionary.values())


def _named(value: str) -> str:
    return _uid_namer(value) if _uid_namer is not None else "h:?"


def name_uids(text: str) -> str:
    """``text`` with each UID that is not one of the standard's (pydicom's UID
    dictionary: SOP classes, transfer syntaxes, contexts) replaced by its keyed name,
    and so the whole value of each UID field pynetdicom quotes (see ``_LABELLED``),
    whatever a sender put there."""

    def field(m: re.Match) -> str:
        value = m.group(2)
        return m.group(1) + (value if _standard(value) else _named(value)) + (m.group(3) if m.lastindex == 3 else "")

    def sub(m: re.Match) -> str:
        uid = m.group()
        if _standard(uid) or _is_ipv4(uid):
            return uid
        return _named(uid)

    text = _QUOTED.sub(field, _LABELLED.sub(field, text))
    return _UID.sub(sub, text)


# pydicom quotes what it met in a data set in its records ("Unknown encoding '...' - using
# default encoding instead", "The (0028,0004) 'Photometric Interpretation' value is
# '...'", "The ... exception '...' occurred"): from the first quote to the last, whatever
# a sender put there (a quote inside the value included), is withheld.
_PYDICOM_QUOTED = re.compile(r"'.*'", re.S)
WITHHELD = "'(value withheld)'"


def withhold_quoted(text: str) -> str:
    """``text`` with everything from its first single quote to its last replaced by
    ``WITHHELD``; for pydicom's records, which quote header values."""
    return _PYDICOM_QUOTED.sub(WITHHELD, text)


def escape_controls(text: str) -> str:
    """``text`` with each control character written as ``\\n``, ``\\r``, ``\\t``,
    ``\\xNN`` or ``\\uNNNN``."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"), text)


class EscapingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose records are always one line (see the module)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if record.name.startswith("pynetdicom"):
            text = name_uids(text)
        elif record.name == "pydicom" or record.name.startswith("pydicom."):
            text = withhold_quoted(text)
        return escape_controls(text)

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())


def configure(level: int) -> None:
    """Log to stderr at ``level`` through :class:`EscapingFormatter`, as
    :func:`logging.basicConfig` would (nothing changes when the root logger already has
    handlers)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
