"""The C-STORE-RSP of an accepted association, encoded without pydicom.

For every response pynetdicom 3.0 builds a ``C_STORE_RSP`` message (a pydicom Dataset
of nine command elements set one by one), copies the primitive's fields into it,
encodes the command set once to measure the group length and once more to send it
(``DIMSEServiceProvider.send_msg`` -> ``primitive_to_message`` -> ``encode_msg``): about
0.3 ms of CPU per object on the association's thread, a tenth of the node's CPU per
received object (docs/ingest.md, "pynetdicom's per-message cost").

A C-STORE response is seven fixed elements of the command group (PS3.7 9.3.1.2, Table
9.3-2), Implicit VR Little Endian (PS3.7 6.3.1):

    (0000,0000) UL CommandGroupLength      (0000,0800) US CommandDataSetType = 0x0101
    (0000,0002) UI AffectedSOPClassUID     (0000,0900) US Status
    (0000,0100) US CommandField = 0x8001   (0000,1000) UI AffectedSOPInstanceUID
    (0000,0120) US MessageIDBeingRespondedTo

:func:`encode_store_response` writes those bytes directly (UIDs padded with a NUL to
an even length, as pydicom does), and the replaced ``send_msg`` sends them as the one
P-DATA fragment pynetdicom would have sent. Only the plain case takes this path: a
response of an *accepted* association with no Offending Element or Error Comment (a
failure status with a comment goes through pynetdicom as before), no handler other
than pynetdicom's standard logging one bound to ``EVT_DIMSE_SENT`` (which logs nothing
for a C-STORE-RSP), the command fitting in one PDV, and values pydicom would encode
the same way. Anything else, and every other message, is pynetdicom's own ``send_msg``.
``tests/test_wire_dimse.py`` compares the bytes with pynetdicom's for many responses.

This reaches below pynetdicom's public API: :func:`check_pynetdicom` compares the
source of the functions it stands in for with the digests they had when this was
written (pynetdicom 3.0.4); when they differ, :func:`install` leaves pynetdicom as it
is and logs so.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import struct

from pynetdicom import _handlers, dimse, dimse_messages
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

EXPECTED_SOURCES = {
    "DIMSEServiceProvider.send_msg": "a839cf2fb46976d9",
    "DIMSEMessage.primitive_to_message": "71fd61d5997f0f0c",
    "DIMSEMessage.encode_msg": "73000c902c52832d",
    "DIMSEMessage._set_command_group_length": "c3057c97344d5db3",
    "_handlers._send_c_store_rsp": "87318c9364c686d4",
}

_ORIGINAL_SEND_MSG = dimse.DIMSEServiceProvider.send_msg
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_TAG_LENGTH = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UID_MAX = 64  # PS3.5 9.1: a UID is at most 64 characters
_installed = False


def _digest(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def source_digests() -> dict[str, str]:
    """The installed pynetdicom's digests of what :data:`EXPECTED_SOURCES` names."""
    return {
        "DIMSEServiceProvider.send_msg": _digest(_ORIGINAL_SEND_MSG),
        "DIMSEMessage.primitive_to_message": _digest(dimse_messages.DIMSEMessage.primitive_to_message),
        "DIMSEMessage.encode_msg": _digest(dimse_messages.DIMSEMessage.encode_msg),
        "DIMSEMessage._set_command_group_length": _digest(dimse_messages.DIMSEMessage._set_command_group_length),
        "_handlers._send_c_store_rsp": _digest(_handlers._send_c_store_rsp),
    }


def check_pynetdicom() -> list[str]:
    """Names whose source differs from what this module was written against (empty:
    the fast path may be installed)."""
    found = source_digests()
    return [name for name, expected in EXPECTED_SOURCES.items() if found.get(name) != expected]


def _element(group_element: int, value: bytes) -> bytes:
    return _TAG_LENGTH.pack(0, group_element, len(value)) + value


def _uid(value) -> bytes | None:
    """A UID as pydicom writes it (ASCII, NUL-padded to even length); None when it is not
    a plain UID string (then pynetdicom encodes the response)."""
    if not isinstance(value, str) or not value or len(value) > _UID_MAX:
        return None
    if not value.isascii() or not all(c.isdigit() or c == "." for c in value):
        return None
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_response(primitive: C_STORE) -> bytes | None:
    """The command set of the C-STORE-RSP ``primitive``, Implicit VR Little Endian, as
    pynetdicom would encode it; None when it is not the plain case (module docstring)."""
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    status, responded = primitive.Status, primitive.MessageIDBeingRespondedTo
    if not isinstance(status, int) or not isinstance(responded, int) or not 0 <= status <= 0xFFFF or not 0 <= responded <= 0xFFFF:
        return None
    body = []
    if primitive.AffectedSOPClassUID is not None:
        if (cls := _uid(primitive.AffectedSOPClassUID)) is None:
            return None
        body.append(_element(0x0002, cls))
    body += [_element(0x0100, _US.pack(_C_STORE_RSP)), _element(0x0120, _US.pack(responded)), _element(0x0800, _US.pack(_NO_DATA_SET)), _element(0x0900, _US.pack(status))]
    if primitive.AffectedSOPInstanceUID is not None:
        if (inst := _uid(primitive.AffectedSOPInstanceUID)) is None:
            return None
        body.append(_element(0x1000, inst))
    rest = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(rest))) + rest


def _only_standard_logging(assoc) -> bool:
    handlers = assoc.get_handlers(evt.EVT_DIMSE_SENT)
    return all(h[0] is _handlers.standard_dimse_sent_handler for h in handlers)


def _send_msg(self, primitive, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` with the C-STORE-RSP fast path (module docstring)."""
    assoc = self.assoc
    if type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None and assoc.is_acceptor and _only_standard_logging(assoc):
        encoded = encode_store_response(primitive)
        if encoded is not None and (self.maximum_pdu_size == 0 or len(encoded) <= self.maximum_pdu_size - 6):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append([context_id, b"\x03" + encoded])
            self.dul.send_pdu(pdata)
            return
    _ORIGINAL_SEND_MSG(self, primitive, context_id)


def install() -> bool:
    """Use the fast path from now on (idempotent). False, logged, when pynetdicom's code
    differs from what this was written against: pynetdicom then runs as it is."""
    global _installed
    if _installed:
        return True
    changed = check_pynetdicom()
    if changed:
        log.warning("pynetdicom's %s differ from the version the C-STORE-RSP fast path was written for: responses are encoded by pynetdicom", ", ".join(changed))
        return False
    dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    _installed = True
    return True


def uninstall() -> None:
    """pynetdicom's own ``send_msg`` again (tests)."""
    global _installed
    dimse.DIMSEServiceProvider.send_msg = _ORIGINAL_SEND_MSG  # type: ignore[method-assign]
    _installed = False
