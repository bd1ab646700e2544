"""Reasons without PHI: what is stored in ``reason`` columns and written to logs when a
step fails.

A reason names the step, the error's class and, where it can be found, the attribute
(keyword and tag) the step was working on: ``"headers: ValueError at PatientName
(0010,0010)"``. It never includes ``str(exception)``: pydicom's and other libraries'
messages quote the values they choke on, and header values are patient data.

:func:`scrub` is the second line of defence for reasons that other modules build as
text (a step's own verdict): any text value of the object found in them is cut out.
"""

from __future__ import annotations

import logging
import re
import traceback
import warnings
from collections.abc import Iterator
from types import TracebackType

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import keyword_for_tag
from pydicom.tag import BaseTag, Tag

# Value representations whose values may identify someone (names, IDs, free text,
# dates, times, UIDs); scrub() removes such values from reasons.
_PHI_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "DA", "DT", "TM", "UI", "AS", "AE", "UR"}
_MIN_LEN = 3  # shorter values ("M", "CT") are not worth cutting and would maim the text


def _tag_text(tag: BaseTag) -> str:
    kw = "private" if tag.is_private else keyword_for_tag(tag)
    return f"{kw or 'attribute'} ({tag.group:04X},{tag.element:04X})"


def attribute_of(exc: BaseException) -> str:
    """The attribute a failing step was working on, read from its traceback: the
    innermost frame holding a data element or a tag named ``tag`` ("" when none).
    Only the element's tag is read, never its value."""
    found = ""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        for name, value in tb.tb_frame.f_locals.items():
            if isinstance(value, (DataElement, RawDataElement)):
                found = _tag_text(Tag(value.tag))
            elif name == "tag" and isinstance(value, BaseTag):
                found = _tag_text(value)
        tb = tb.tb_next
    return found


def describe(step: str, exc: BaseException) -> str:
    """``"<step>: <ErrorClass>[ at <Keyword> (gggg,eeee)]"`` for a failure of ``step``."""
    where = attribute_of(exc)
    return f"{step}: {type(exc).__name__}" + (f" at {where}" if where else "")


def location(exc: BaseException) -> str:
    """Where an exception was raised (``file:line in function``), for logs: code, not data."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"


def _text_values(ds: Dataset) -> Iterator[str]:
    for elem in ds.iterall():
        if elem.VR not in _PHI_VRS:
            continue
        try:
            values = elem.value if isinstance(elem.value, (list, tuple)) or type(elem.value).__name__ == "MultiValue" else [elem.value]
        except Exception:  # an undecodable value: nothing to look for
            continue
        for v in values:
            text = str(v).strip()
            if len(text) >= _MIN_LEN:
                yield text
            if elem.VR == "PN":  # name components may be quoted apart
                yield from (c for c in text.replace("=", "^").split("^") if len(c.strip()) >= _MIN_LEN)


def scrub(text: str, ds: Dataset | None) -> str:
    """``text`` with every identifying text value of ``ds`` replaced by ``[value]``."""
    if not text or ds is None:
        return text
    try:
        values = sorted(set(_text_values(ds)), key=len, reverse=True)
    except Exception:  # a dataset that cannot even be walked: keep only the text's head
        return text.split(":", 1)[0] + ": (details withheld)"
    for v in values:
        if v in text:
            text = text.replace(v, "[value]")
    return text


class WithheldWarnings(logging.Filter):
    """For the ``py.warnings`` logger: keeps where a warning came from and its category,
    and drops its text. pydicom warns about invalid values by quoting them
    (``Invalid value for VR PN: '...'``), and a service's warnings end up in its log."""

    _HEAD = re.compile(r"^(?P<where>.*?:\d+): (?P<category>\w+):", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        m = self._HEAD.match(record.getMessage())
        where, category = (m["where"].rsplit("/", 1)[-1], m["category"]) if m else ("?", "Warning")
        record.msg, record.args = "%s at %s (text withheld: it may quote a header value)", (category, where)
        return True


def withhold_warning_texts() -> None:
    """Send Python warnings to logging (``py.warnings``) with their text withheld; for
    a process serving patient data (``casemask serve``)."""
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, WithheldWarnings) for f in logger.filters):
        logger.addFilter(WithheldWarnings())


class WithheldLibraryValues(logging.Filter):
    """For pydicom's and pynetdicom's loggers: they quote a non-conformant value they
    meet ("Invalid value for VR UI: '...'", "Non-conformant 'Affected SOP Instance UID'
    value '...'"), and whatever a sender or a file put there (a path, a name) would reach
    the log. Keeps the message, drops the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Invalid value for VR"):
            record.msg, record.args = msg.split(":", 1)[0] + " (value not logged)", ()
        elif msg.startswith(("Non-conformant '", "Invalid '")) and " value '" in msg:
            record.msg, record.args = msg.split(" value '", 1)[0] + " value (not logged)", ()
        else:
            return True
        # pynetdicom.dimse logs such an exception with LOGGER.exception(exc): its traceback
        # would print the value again.
        record.exc_info, record.exc_text = None, None
        return True


def withhold_library_values() -> None:
    """Install :class:`WithheldLibraryValues` on pydicom's and pynetdicom's loggers and
    silence pydicom's matching warning (it repeats the same text with the value); for
    the listener and ``casemask deid``."""
    f = WithheldLibraryValues()
    for name in ("pydicom", "pynetdicom.utils", "pynetdicom.dimse"):  # dimse: a message it cannot read (receive_primitive)
        logger = logging.getLogger(name)
        if not any(isinstance(x, WithheldLibraryValues) for x in logger.filters):
            logger.addFilter(f)
    warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
