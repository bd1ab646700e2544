"""The C-STORE-RQ and C-STORE-RSP of an accepted association, decoded and encoded
without pydicom, and two C-STORE-RQs pynetdicom lets through refused.

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

The C-STORE-RQ's command set (PS3.7 9.3.1.1, Table 9.3-1) is decoded the same way: for
every request pynetdicom reads the command with pydicom, then converts each element
while it builds the ``C_STORE`` primitive (``decode_msg``, ``message_to_primitive``):
about 0.2-0.4 ms of CPU on the DUL thread, inside every C-STORE's wait. A command
that arrives as one complete fragment (control header 0x03, the only PDV of its
P-DATA) and holds exactly the six elements of a plain C-STORE-RQ after a Command Group
Length that counts them, in order, with the lengths their VRs fix, digits-and-dots
UIDs of at most 64 characters padded with one NUL to an even length, Priority 0, 1 or
2 and a data set to follow (:func:`parse_store_rq`) is read here; the message is left
in the state ``decode_msg`` leaves it in (the command also decoded by pydicom, lazily,
for whoever reads it; the data set's file opened through the same names), so its data
fragments go through pynetdicom, and only the primitive is built from the values read
here (with the primitive's own setters, which check them as before). Anything else
(Move Originator elements, a command in several fragments, any other message) is
pynetdicom's own decoding. ``tests/test_wire_dimse.py`` compares the primitives.

Two C-STORE-RQs that pynetdicom does not refuse are refused here (a *refusal* the
node's C-STORE handler answers before anything else, :func:`refusal`; nothing is
stored):

- a command set whose Command Group Length (0000,0000) is missing or does not count the
  bytes that follow it (PS3.7 6.3.1, 9.3.1.1: Type 1): pydicom's reader ignores it, and
  reads whatever elements follow; a sender that gets it wrong is not trusted with the
  rest: 0xC210 with the Error Comment "Command Group Length ...";
- a C-STORE-RQ whose Affected SOP Class UID, Affected SOP Instance UID or Priority is
  missing or empty: pynetdicom's association logs "Received unexpected C-STORE service
  message" and answers *nothing* (the sender waits for its timeout). With a Message ID
  it now gets 0xC211 with an Error Comment naming the attributes, answered by the
  storage service through the node's handler (which discards the data set); without a
  usable Message ID nothing can be answered, and the association is aborted. A
  command element whose value the primitive refuses (a Priority of 5, a UID over 64
  characters) made pynetdicom abort the association unanswered: it is answered 0xC210
  naming the element (:func:`_refused_store_primitive`). Where one
  of the two UID elements is absent from the command set (not merely empty),
  pynetdicom's chunked reception raised AttributeError while it wrote the incoming
  file's File Meta, and the association was aborted unanswered: the command set is
  decoded with the absent ones read as empty (:func:`_decode_command`), so it is
  answered 0xC211 like an empty one.

This reaches below pynetdicom's public API: :func:`check_pynetdicom` compares the
source of the functions it stands in for with the digests they had when this was
written (pynetdicom 3.0.4); when they differ, :func:`install` leaves pynetdicom as it
is and logs so.
"""

from __future__ import annotations

import logging
import struct
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

from pydicom.uid import UID
from pynetdicom import _config, _handlers, dimse, dimse_messages
from pynetdicom import events as evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.pdu_primitives import P_DATA

from node.pinning import source_digest

log = logging.getLogger(__name__)

EXPECTED_SOURCES = {
    "DIMSEServiceProvider.send_msg": "a839cf2fb46976d9",
    "DIMSEMessage.primitive_to_message": "71fd61d5997f0f0c",
    "DIMSEMessage.encode_msg": "73000c902c52832d",
    "DIMSEMessage._set_command_group_length": "c3057c97344d5db3",
    "_handlers._send_c_store_rsp": "87318c9364c686d4",
    "Association._serve_request": "2f24c1759cdf6c8c",
    "DIMSEMessage.message_to_primitive": "f8f43d34e43450ef",
    "DIMSEServiceProvider.receive_primitive": "5f99c86b14a15cef",
    "DIMSEMessage.decode_msg": "f51c777e841a76be",
    "dsutils.decode": "33aaa74edebf3188",
}

# Statuses of the refusals (node.scp's table): the command set cannot be understood;
# a required element of the C-STORE-RQ is missing.
CANNOT_UNDERSTAND = 0xC210
MISSING_ELEMENT = 0xC211
_REFUSAL = "_casemask_refusal"
_GROUP_LENGTH_HEAD = b"\x00\x00\x00\x00\x04\x00\x00\x00"  # (0000,0000), 4 bytes, Implicit VR Little Endian
_REQUIRED = (("AffectedSOPClassUID", "Affected SOP Class UID"), ("AffectedSOPInstanceUID", "Affected SOP Instance UID"), ("Priority", "Priority"))

_ORIGINAL_SEND_MSG = dimse.DIMSEServiceProvider.send_msg
_ORIGINAL_LOG_HANDLER_LEVEL = _config.LOG_HANDLER_LEVEL
_ORIGINAL_SERVE_REQUEST = Association._serve_request
_ORIGINAL_MESSAGE_TO_PRIMITIVE = dimse_messages.DIMSEMessage.message_to_primitive
_ORIGINAL_RECEIVE_PRIMITIVE = dimse.DIMSEServiceProvider.receive_primitive
_ORIGINAL_DECODE = dimse_messages.decode
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_TAG_LENGTH = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UID_MAX = 64  # PS3.5 9.1: a UID is at most 64 characters
_installed = False



def source_digests() -> dict[str, str]:
    """The installed pynetdicom's digests of what :data:`EXPECTED_SOURCES` names."""
    return {
        "DIMSEServiceProvider.send_msg": source_digest(_ORIGINAL_SEND_MSG),
        "DIMSEMessage.primitive_to_message": source_digest(dimse_messages.DIMSEMessage.primitive_to_message),
        "DIMSEMessage.encode_msg": source_digest(dimse_messages.DIMSEMessage.encode_msg),
        "DIMSEMessage._set_command_group_length": source_digest(dimse_messages.DIMSEMessage._set_command_group_length),
        "_handlers._send_c_store_rsp": source_digest(_handlers._send_c_store_rsp),
        "Association._serve_request": source_digest(_ORIGINAL_SERVE_REQUEST),
        "DIMSEMessage.message_to_primitive": source_digest(_ORIGINAL_MESSAGE_TO_PRIMITIVE),
        "DIMSEServiceProvider.receive_primitive": source_digest(_ORIGINAL_RECEIVE_PRIMITIVE),
        "DIMSEMessage.decode_msg": source_digest(dimse_messages.DIMSEMessage.decode_msg),
        "dsutils.decode": source_digest(_ORIGINAL_DECODE),
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


# -- the C-STORE-RQ's command set ------------------------------------------------------------------
class StoreRequest(NamedTuple):
    """The values of a plain C-STORE-RQ command set (:func:`parse_store_rq`)."""

    sop_class: str
    message_id: int
    priority: int
    data_set_type: int
    sop_instance: str


_C_STORE_RQ = 0x0001
# The elements of a plain C-STORE-RQ after its group length, in order (PS3.7 Table
# 9.3-1): UI, US Command Field, US Message ID, US Priority, US Command Data Set Type, UI.
_RQ_ELEMENTS = (0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000)
_UID_CHARS = frozenset(b"0123456789.")


def _plain_uid(raw: bytes) -> str | None:
    """A UI value as pydicom reads it, when it is digits and dots padded with one NUL to an
    even length (or even without padding); None for anything else."""
    if len(raw) % 2 or not 2 <= len(raw) <= _UID_MAX:
        return None
    if raw[-1] == 0:
        raw = raw[:-1]
    if not raw or not _UID_CHARS.issuperset(raw):
        return None
    return raw.decode("ascii")


def parse_store_rq(command: bytes) -> StoreRequest | None:
    """The values of ``command`` (an encoded command set, Implicit VR Little Endian) when
    it is a plain C-STORE-RQ with a data set to follow (module docstring); None for
    anything else, which pynetdicom then decodes."""
    if group_length_problem(command) is not None:
        return None
    pos, end, raw = 12, len(command), []
    for element in _RQ_ELEMENTS:
        if pos + 8 > end:
            return None
        group, found, length = _TAG_LENGTH.unpack_from(command, pos)
        pos += 8
        if group != 0 or found != element or pos + length > end:
            return None
        raw.append(command[pos : pos + length])
        pos += length
    if pos != end or any(len(v) != 2 for v in raw[1:5]):
        return None
    sop_class, sop_instance = _plain_uid(raw[0]), _plain_uid(raw[5])
    field, message_id, priority, data_set_type = (_US.unpack(v)[0] for v in raw[1:5])
    if sop_class is None or sop_instance is None or field != _C_STORE_RQ or priority not in (0, 1, 2) or data_set_type == _NO_DATA_SET:
        return None
    return StoreRequest(sop_class, message_id, priority, data_set_type, sop_instance)


def _start_store_rq(self, primitive) -> bool:
    """Begin a C-STORE-RQ from its command's P-DATA as ``decode_msg`` would, when it is
    plain (module docstring); False (nothing done) otherwise."""
    pdvs = primitive.presentation_data_value_list
    if len(pdvs) != 1 or not _config.STORE_RECV_CHUNKED_DATASET or not self.assoc.is_acceptor:
        return False
    context_id, data = pdvs[0]
    context = self.assoc._accepted_cx.get(context_id)
    if context is None or not data or data[0] != 0x03:
        return False
    command = bytes(data[1:])
    request = parse_store_rq(command)
    if request is None:
        return False
    message = dimse_messages.DIMSEMessage()
    message.encoded_command_set.write(command)
    message.context_id = context_id
    message.command_set = dimse_messages.decode(BytesIO(command), True, True)  # elements converted only if read
    message.__class__ = dimse_messages.C_STORE_RQ
    message._data_set_file = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")  # node.incoming's, on the node's threads
    message._data_set_path = Path(message._data_set_file.name)
    message._data_set_file.write(b"\x00" * 128)
    message._data_set_file.write(b"DICM")
    dimse_messages.write_file_meta_info(message._data_set_file, dimse_messages.create_file_meta(sop_class_uid=UID(request.sop_class), sop_instance_uid=UID(request.sop_instance), transfer_syntax=context.transfer_syntax[0]))
    message._casemask_request = request
    self.message = message
    return True


def _receive_primitive(self, primitive) -> None:
    """``DIMSEServiceProvider.receive_primitive`` with the C-STORE-RQ fast path."""
    if self.message is None and _start_store_rq(self, primitive):
        return
    _ORIGINAL_RECEIVE_PRIMITIVE(self, primitive)


def _store_primitive(message, request: StoreRequest) -> C_STORE:
    """The primitive ``message_to_primitive`` builds for a plain C-STORE-RQ, from the
    values :func:`parse_store_rq` read (set through the primitive's checking setters)."""
    primitive = C_STORE()
    primitive.MessageID = request.message_id
    primitive.AffectedSOPClassUID = request.sop_class
    primitive.AffectedSOPInstanceUID = request.sop_instance
    primitive.Priority = request.priority
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


# -- refusals ------------------------------------------------------------------------------------
def group_length_problem(command: bytes) -> str | None:
    """What is wrong with the Command Group Length of an encoded command set (Implicit
    VR Little Endian), None when it is there, first, and counts the bytes after it."""
    if len(command) < 12 or command[:8] != _GROUP_LENGTH_HEAD:
        return "Command Group Length missing"
    if struct.unpack_from("<I", command, 8)[0] != len(command) - 12:
        return "Command Group Length does not match the command set"
    return None


def refusal(request) -> tuple[int, str] | None:
    """(status, Error Comment) the node answers a C-STORE-RQ primitive with before
    anything else, None when nothing here refuses it (module docstring)."""
    return getattr(request, _REFUSAL, None)


def _message_to_primitive(self):
    """``DIMSEMessage.message_to_primitive``, marking a C-STORE-RQ whose Command Group
    Length is wrong (its encoded command set is still at hand here)."""
    request = self.__dict__.pop("_casemask_request", None)
    if request is not None and type(self) is dimse_messages.C_STORE_RQ:
        return _store_primitive(self, request)
    try:
        primitive = _ORIGINAL_MESSAGE_TO_PRIMITIVE(self)
    except (ValueError, TypeError):
        if type(self) is not dimse_messages.C_STORE_RQ:
            raise
        return _refused_store_primitive(self)
    if isinstance(self, dimse_messages.C_STORE_RQ):
        problem = group_length_problem(self.encoded_command_set.getvalue())
        if problem:
            setattr(primitive, _REFUSAL, (CANNOT_UNDERSTAND, problem))
    return primitive


def _refused_store_primitive(message) -> C_STORE:
    """The primitive of a C-STORE-RQ one of whose command elements the primitive's
    setters refuse (a Priority of 5, a UID over 64 characters): ``message_to_primitive``
    raised, and pynetdicom aborted the association with no answer to the request. Here
    each element that can be set is, and the request is marked refused (0xC210, the
    elements named); without a usable Message ID :func:`_serve_request` still aborts."""
    primitive = C_STORE()
    refused = []
    for elem in message.command_set:
        if hasattr(primitive, elem.keyword):
            try:
                setattr(primitive, elem.keyword, elem.value)
            except (ValueError, TypeError):
                refused.append(elem.keyword)
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    setattr(primitive, _REFUSAL, (CANNOT_UNDERSTAND, f"invalid command element: {', '.join(refused) or 'unknown'}"))
    return primitive


def _serve_request(self, msg, context_id: int) -> None:
    """``Association._serve_request``, answering an incomplete C-STORE-RQ of an accepted
    association instead of ignoring it (module docstring)."""
    if type(msg) is not C_STORE or not self.is_acceptor or msg.is_valid_request or self._sent_release or context_id not in self._accepted_cx:
        return _ORIGINAL_SERVE_REQUEST(self, msg, context_id)
    if msg.MessageID is None:
        log.warning("C-STORE-RQ from %s without a usable Message ID: it cannot be answered, association aborted", self.requestor.ae_title.strip())
        self.abort()
        return
    missing = [name for keyword, name in _REQUIRED if getattr(msg, keyword) is None]
    if not missing:  # no data set primitive at all: pynetdicom's own handling
        return _ORIGINAL_SERVE_REQUEST(self, msg, context_id)
    if refusal(msg) is None:
        setattr(msg, _REFUSAL, (MISSING_ELEMENT, f"{', '.join(missing)} missing or empty"))
    try:
        self.dimse.cancel_req = {}
        self._is_paused = True
        StorageServiceClass(self).SCP(msg, self._accepted_cx[context_id])
        self._is_paused = False
        self.dimse.cancel_req = {}
    except Exception as exc:  # as pynetdicom's _serve_request
        log.error("C-STORE-RQ with %s missing could not be answered (%s): association aborted", ", ".join(missing), type(exc).__name__)
        self.abort()


_STORE_UIDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")


def _decode_command(bytestring, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False):
    """``dsutils.decode`` as ``decode_msg`` calls it (for command sets only), reading an
    absent Affected SOP Class or Instance UID of a C-STORE-RQ with a data set as empty.

    ``decode_msg`` reads both attributes of the command set to write the incoming file's
    File Meta: an absent one raised AttributeError on the DUL thread, and the association
    was aborted with no answer to the request (an empty one is answered 0xC211 by
    :func:`_serve_request`). Read as empty, the request takes the empty one's way: its
    data set goes to an incoming file (bounded as every other) and is discarded, and the
    answer is 0xC211 naming the attribute. The encoded command set is left as it came
    (its group length is checked on those bytes)."""
    ds = _ORIGINAL_DECODE(bytestring, is_implicit_vr, is_little_endian, deflated)
    if 0x00000002 in ds and 0x00001000 in ds:  # the usual case: no element converted here
        return ds
    if ds.get("CommandField") == 0x0001 and ds.get("CommandDataSetType", _NO_DATA_SET) != _NO_DATA_SET:
        for keyword in _STORE_UIDS:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return ds


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
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's standard handlers only log, at INFO and DEBUG, and do the work of
        # it for every message (the C-STORE-RQ's: every command element converted, 50 us)
        # even when its logger drops the records; `casemask -vv` keeps them.
        _config.LOG_HANDLER_LEVEL = "none"
    dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    dimse_messages.DIMSEMessage.message_to_primitive = _message_to_primitive  # type: ignore[method-assign]
    dimse.DIMSEServiceProvider.receive_primitive = _receive_primitive  # type: ignore[method-assign]
    Association._serve_request = _serve_request  # type: ignore[method-assign]
    dimse_messages.decode = _decode_command  # type: ignore[assignment]
    _installed = True
    return True


def uninstall() -> None:
    """pynetdicom's own code again (tests)."""
    global _installed
    _config.LOG_HANDLER_LEVEL = _ORIGINAL_LOG_HANDLER_LEVEL
    dimse.DIMSEServiceProvider.send_msg = _ORIGINAL_SEND_MSG  # type: ignore[method-assign]
    dimse_messages.DIMSEMessage.message_to_primitive = _ORIGINAL_MESSAGE_TO_PRIMITIVE  # type: ignore[method-assign]
    dimse.DIMSEServiceProvider.receive_primitive = _ORIGINAL_RECEIVE_PRIMITIVE  # type: ignore[method-assign]
    Association._serve_request = _ORIGINAL_SERVE_REQUEST  # type: ignore[method-assign]
    dimse_messages.decode = _ORIGINAL_DECODE  # type: ignore[assignment]
    _installed = False
