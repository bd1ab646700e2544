"""Log records that cannot forge log lines.

Peers choose some of what the node logs: a calling AE title, a UID, a host name, and
pynetdicom logs them as received. A line feed, carriage return or terminal escape in
one of them would start a line of the sender's choosing, or rewrite the terminal.
:class:`EscapingFormatter` writes every C0 and C1 control character (and U+2028/U+2029)
of the formatted record as a visible escape, so one record is one line; traceback
lines are escaped one by one and indented, so none can pass for a record.
"""

from __future__ import annotations

import logging
import re

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


def escape_controls(text: str) -> str:
    """``text`` with each control character written as ``\\n``, ``\\r``, ``\\t``,
    ``\\xNN`` or ``\\uNNNN``."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"), text)


class EscapingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose records are always one line (see the module)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

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
