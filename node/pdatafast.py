"""A P-DATA-TF PDU of an established, accepted association handed to the DIMSE layer
straight from the bytes read, on the association's DUL thread.

pynetdicom 3.0 takes every PDU the same way (PS3.8 9.2, the state machine; 9.3.5, the
P-DATA-TF PDU): ``_read_pdu_data`` reads it, ``_decode_pdu`` copies it twice and builds
a ``P_DATA_TF`` of ``PresentationDataValueItem`` objects, the event (Evt10) goes into
the event queue and the PDU into another queue; the reactor's next step takes the event
out, the state machine looks up its action (DT-2) and runs it, which takes the PDU out,
converts it into a ``P_DATA`` primitive and hands that to
``dimse.receive_primitive``. Measured on the node (docs/ingest.md, "A P-DATA fast path"):
tens of microseconds of CPU per PDU, two PDUs per received object.

Here, in state Sta6 (association established) with nothing waiting in the event queue,
a well-formed P-DATA-TF goes from the bytes read to a ``P_DATA`` primitive with the same
presentation data value list (context ID, fragment as ``bytes``), handed to the same
``dimse.receive_primitive`` DT-2 calls: the node's wrapper of it
(``node.admission.guard_dimse``: fragment checks, message limits, slow messages) and
behind it ``node.dimsefast``'s C-STORE-RQ reading see every PDV as before. Its effects
are DT-2's: the next state is Sta6, the idle timer restarts when a PDU was read (the
reactor, as pynetdicom's loop), the ARTIM timer is not touched (DT-2 does not), an
exception from ``receive_primitive`` is logged as the state machine logs it, stops the
DUL thread and is raised again.

Everything else is pynetdicom's own path, from the same bytes: another PDU type, a
P-DATA-TF with no PDV, a PDV item length under 2 (no message control header) or
running past the PDU's end, a PDU longer than the Maximum Length the node announced,
another state, an event already waiting, a handler bound to ``EVT_DATA_RECV``,
``EVT_PDU_RECV`` or ``EVT_FSM_TRANSITION`` (``casemask -vv`` binds pynetdicom's logging
handlers: then every PDU goes through pynetdicom). The read itself (:func:`read_event`)
is ``_read_pdu_data``'s, line for line, through the association socket's ``recv`` (the
node's length and time limits of ``node.admission.guard_pdu_length`` included), with the
same log lines and the same events for a short read, a closed connection or an unknown
type; only where ``_read_pdu_data`` would decode a P-DATA-TF that qualifies does this
module take over.

Before reading, pynetdicom asks ``AssociationSocket.ready`` (a zero-timeout ``select``)
whether the socket is readable; when node.reactor's ``poll()`` has just said so for the
same socket, that second system call is skipped (``readable``).

This reaches below pynetdicom's public API: :func:`check_pynetdicom` compares the source
of the functions it stands in for (PDU reading and decoding, DT-2, the state machine's
dispatch) with the digests they had in pynetdicom 3.0.4; when one differs,
:func:`install` leaves pynetdicom as it is and logs so. Only node.reactor's loop, that
of accepted associations, calls it.
"""

from __future__ import annotations

import logging
import struct

from pynetdicom import dul as _dul
from pynetdicom import evt, fsm, pdu
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from node.admission import MAX_PDVS
from node.pinning import source_digest

log = logging.getLogger(__name__)

# SHA-256 (first 16 hex digits) of the source of what this module stands in for, as in
# pynetdicom 3.0.4.
EXPECTED_SOURCES = {
    "DULServiceProvider._is_transport_event": "8725ed03bb8fbdef",
    "DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",
    "DULServiceProvider._decode_pdu": "fc71dd1bf853e1ce",
    "fsm.DT_2": "9ec543394e0b49eb",
    "StateMachine.do_action": "9a883f44c7f31641",
    "StateMachine.transition": "ea885ad668e50403",
    "PDU.decode": "07098f2d8a4d45e4",
    "P_DATA_TF._wrap_generate_items": "b2ab7ad6fe47ff4a",
    "P_DATA_TF._generate_items": "55a5deea47745b72",
    "P_DATA_TF.to_primitive": "3cba1cd31f03fdf0",
    "AssociationSocket.ready": "3eb58e3d39dc076d",
}

_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)  # PS3.8 Table 9-1..9-26, as _read_pdu_data knows them
_P_DATA_TF = 0x04
_HEADER = struct.Struct(">BBL")  # PDU type, reserved, PDU length (PS3.8 9.3.1)
_ITEM = struct.Struct(">LB")  # PDV item length, presentation context ID (PS3.8 9.3.5.1)
_UNWATCHED = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)

# True once install() found pynetdicom as this was written against.
ENABLED = False



# pynetdicom's own functions, as imported (before anyone wraps them: tests, benches).
_ORIGINALS = {
    "DULServiceProvider._is_transport_event": _dul.DULServiceProvider._is_transport_event,
    "DULServiceProvider._read_pdu_data": _dul.DULServiceProvider._read_pdu_data,
    "DULServiceProvider._decode_pdu": _dul.DULServiceProvider._decode_pdu,
    "fsm.DT_2": fsm.DT_2,
    "StateMachine.do_action": fsm.StateMachine.do_action,
    "StateMachine.transition": fsm.StateMachine.transition,
    "PDU.decode": pdu.PDU.decode,
    "P_DATA_TF._wrap_generate_items": pdu.P_DATA_TF._wrap_generate_items,
    "P_DATA_TF._generate_items": pdu.P_DATA_TF._generate_items,
    "P_DATA_TF.to_primitive": pdu.P_DATA_TF.to_primitive,
    "AssociationSocket.ready": AssociationSocket.ready.fget,
}


def source_digests() -> dict[str, str]:
    """The installed pynetdicom's digests of what :data:`EXPECTED_SOURCES` names."""
    return {name: source_digest(fn) for name, fn in _ORIGINALS.items()}


def check_pynetdicom() -> list[str]:
    """Names whose source differs from what this module was written against ([]: the
    fast path may be used)."""
    found = source_digests()
    return [name for name, expected in EXPECTED_SOURCES.items() if found.get(name) != expected]


def install() -> bool:
    """Let node.reactor's loop use the fast path from now on (idempotent). False, and a
    warning logged, when pynetdicom's code differs from what this was written against:
    every PDU then goes through pynetdicom as it is."""
    global ENABLED
    changed = check_pynetdicom()
    if changed:
        ENABLED = False
        log.warning("pynetdicom's %s differ from the version the P-DATA fast path was written for: every PDU goes through pynetdicom's state machine", ", ".join(changed))
        return False
    ENABLED = True
    return True


def uninstall() -> None:
    """Every PDU through pynetdicom's own path again (tests)."""
    global ENABLED
    ENABLED = False


def pdv_list(data, start: int = 6, limit: int | None = None) -> list[tuple[int, bytes]] | None:
    """The presentation data value list of the P-DATA-TF PDU ``data`` (its variable field
    from ``start``: 6 for a whole PDU), as ``P_DATA_TF.to_primitive`` gives it: one
    (presentation context ID, fragment with its message control header) per PDV item
    (PS3.8 9.3.5.1, Table 9-23). None when the items do not fill the field exactly, an
    item is shorter than its context ID and control header, or there is no item: those
    are pynetdicom's to decode (and refuse). With ``limit``, the first ``limit + 1``
    items alone when there are more (node.admission refuses such a P-DATA whole: the
    rest is not made into objects first)."""
    view = memoryview(data)
    end, pos, items = len(view), start, []
    while pos < end:
        if limit is not None and len(items) > limit:
            return items
        if pos + 5 > end:
            return None
        length, context_id = _ITEM.unpack_from(view, pos)
        stop = pos + 4 + length
        if length < 2 or stop > end:
            return None
        items.append((context_id, bytes(view[pos + 5 : stop])))
        pos = stop
    return items or None


def _fast(dul) -> bool:
    """Whether a P-DATA-TF read now may skip pynetdicom's decoding and state machine."""
    if dul.state_machine.current_state != "Sta6":
        return False
    assoc = dul.assoc
    return not any(assoc.get_handlers(e) for e in _UNWATCHED)


def read_event(dul, readable: bool = False) -> bool | P_DATA:
    """``DULServiceProvider._is_transport_event`` for an accepted association: a P_DATA
    primitive when a P-DATA-TF was read that goes the fast way (hand it to
    :func:`deliver`), else whether a PDU (or the connection's end) was read and its event
    queued as pynetdicom does. ``readable``: the reactor's poll() found the socket
    readable just now, so the zero-timeout select of ``AssociationSocket.ready`` would
    say so too and is skipped (for a connected socket)."""
    if not ENABLED or not _fast(dul):
        return dul._is_transport_event()
    sock = dul.socket
    if sock and (readable and sock.socket is not None and sock._is_connected is not False or sock.ready):
        primitive = _read_pdu(dul)
        return True if primitive is None else primitive
    return False


def _read_pdu(dul) -> P_DATA | None:
    """``DULServiceProvider._read_pdu_data`` (same reads, log lines and events), but a
    qualifying P-DATA-TF (module docstring) comes back as its primitive instead of Evt10
    and a PDU queued; None when pynetdicom's events were queued."""
    logger = _dul.LOGGER
    sock = dul.socket
    bytestream = bytearray()
    try:
        bytestream.extend(sock.recv(6))
    except (OSError, TimeoutError) as exc:
        logger.error("Connection closed before the entire PDU was received")
        logger.exception(exc)
        dul.event_queue.put("Evt17")
        return None
    try:
        pdu_type, _, pdu_length = _HEADER.unpack(bytestream)
    except struct.error:
        dul.event_queue.put("Evt17")
        return None
    if pdu_type not in _PDU_TYPES:
        logger.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        dul.event_queue.put("Evt19")
        return None
    try:
        bytestream += sock.recv(pdu_length)
    except (OSError, TimeoutError) as exc:
        logger.error("Connection closed before the entire PDU was received")
        logger.exception(exc)
        dul.event_queue.put("Evt17")
        return None
    if len(bytestream) != 6 + pdu_length:
        logger.error(f"The received PDU is shorter than expected ({len(bytestream)} of {6 + pdu_length} bytes received)")
        dul.event_queue.put("Evt17")
        return None
    if pdu_type == _P_DATA_TF and not dul.event_queue.qsize():
        limit = dul.assoc.acceptor.maximum_length
        if not limit or pdu_length <= limit:
            items = pdv_list(bytestream, limit=MAX_PDVS)
            if items is not None:
                primitive = P_DATA()
                primitive.presentation_data_value_list.extend(items)  # tuples, as to_primitive appends them
                return primitive
    try:
        received, event = dul._decode_pdu(bytestream)
        dul.event_queue.put(event)
    except Exception as exc:
        logger.error("Unable to decode the received PDU data")
        logger.exception(exc)
        dul.event_queue.put("Evt19")
        return None
    dul._recv_pdu.put(received)
    return None


def deliver(dul, primitive: P_DATA) -> None:
    """Run DT-2 (Sta6 + Evt10, PS3.8 9.2 Table 9-10) for ``primitive`` as the state
    machine's ``do_action`` would: the P-DATA indication to the DIMSE layer, then Sta6.

    Raises:
        Exception: whatever ``dimse.receive_primitive`` raised (the node's guard catches
            everything; without it, as in pynetdicom, the DUL thread is stopped and the
            exception ends it), after the state machine's log lines.
    """
    machine = dul.state_machine
    try:
        dul.assoc.dimse.receive_primitive(primitive)
        machine.transition("Sta6")
    except Exception as exc:
        fsm.LOGGER.error("State Machine received an exception attempting to perform the action '%s' while in state '%s'", "DT-2", machine.current_state)
        fsm.LOGGER.exception(exc)
        dul.kill_dul()
        raise
