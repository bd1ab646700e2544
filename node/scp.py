"""The node's network edge: a pynetdicom AE answering C-ECHO and C-STORE.

Access control happens at association time (EVT_REQUESTED): an unknown calling AE title,
a known one from the wrong host, or a called AE title other than the node's is refused
with A-ASSOCIATE-RJ (rejected-permanent, service-user, reason 3 or 7). The C-STORE
handler only spools and queues: it answers Success after the file is fsynced and its row
committed, 0xA700 when either fails, 0xC210/0xC211 when the dataset cannot be understood.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.engine import Engine

from node import queue
from node.config import Settings
from node.spool import spool_path, write_atomic
from node.wire import part10_header, row_attributes

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3 and Annex C of PS3.7)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
MISSING_UIDS = 0xC211


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn off Nagle's algorithm: without it each C-STORE waits on a delayed ACK."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune_association(assoc, reactor_delay_s: float) -> None:
    """TCP_NODELAY on the association's socket and a shorter idle sleep in its reactor."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    set_nodelay(sock)
    assoc.dul._run_loop_delay = reactor_delay_s  # pynetdicom sleeps 1 ms per idle loop by default


class AccessPolicy:
    """Who may associate: the [[sources]] list, or anyone when accept_unknown_sources."""

    def __init__(self, settings: Settings) -> None:
        self.ae_title = settings.node.ae_title
        self.accept_unknown = settings.node.accept_unknown_sources
        self.sources: dict[str, set[str | None]] = {}
        for s in settings.sources:
            self.sources.setdefault(s.ae_title.strip(), set()).add(_resolve(s.host) if s.host else None)

    def check(self, calling_ae: str, called_ae: str, host: str) -> tuple[int, str] | None:
        """None when allowed; else (A-ASSOCIATE-RJ reason, why)."""
        if called_ae.strip() != self.ae_title:
            return 0x07, f"called AE title {called_ae.strip()!r} is not this node's ({self.ae_title!r})"
        if self.accept_unknown:
            return None
        hosts = self.sources.get(calling_ae.strip())
        if hosts is None:
            return 0x03, f"calling AE title {calling_ae.strip()!r} is not in [[sources]]"
        if None not in hosts and host not in hosts:
            return 0x03, f"calling AE title {calling_ae.strip()!r} is not allowed from {host}"
        return None


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


class StoreHandler:
    """C-STORE: spool atomically, commit the row, then answer."""

    def __init__(self, settings: Settings, engine: Engine, on_stored: Callable[[], None] | None = None) -> None:
        self.spool_dir = settings.node.data_dir / "spool"
        self.engine = engine
        self.on_stored = on_stored

    def _record(self, received: queue.Received) -> bool:
        """Commit the row; False when the object was stored before (a re-send)."""
        for _ in range(2):
            try:
                with self.engine.begin() as conn:
                    change = queue.record_received(conn, received)
                if change:  # logged only once committed: a rolled-back re-send changes nothing
                    log.info(change)
                return True
            except IntegrityError:
                with self.engine.connect() as conn:
                    if queue.is_stored(conn, received.sop_instance_uid):
                        return False
                # Another association created the same study meanwhile: once more.
        raise RuntimeError("could not record the object")

    def __call__(self, event: evt.Event) -> int:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        ts = UID(str(event.context.transfer_syntax))
        sop_class = str(event.request.AffectedSOPClassUID)
        encoded = event.request.DataSet.getvalue()
        try:
            if ts == DeflatedExplicitVRLittleEndian:
                raise ValueError("deflated: decode in full")
            attrs = row_attributes(encoded, ts.is_implicit_VR, ts.is_little_endian)
        except Exception:
            try:  # the slow, complete decode says what is wrong, or succeeds
                ds = event.dataset
                attrs = {kw: str(ds.get(kw, "") or "") for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")}
            except Exception as exc:
                log.warning("C-STORE from %s: dataset cannot be decoded (%s) -> 0xC210", calling, type(exc).__name__)
                return CANNOT_UNDERSTAND
        sop_uid, study_uid = attrs["SOPInstanceUID"], attrs["StudyInstanceUID"]
        series_uid, modality = attrs["SeriesInstanceUID"], attrs["Modality"]
        if not sop_uid or not study_uid:
            log.warning("C-STORE from %s: missing SOP Instance or Study Instance UID -> 0xC211", calling)
            return MISSING_UIDS
        path = spool_path(self.spool_dir, study_uid, sop_uid)
        try:
            # Re-sending the same object rewrites the same file with the same bytes; the
            # row's unique SOP Instance UID then says it was stored before.
            header = part10_header(sop_class, sop_uid, ts, calling)
            size = write_atomic(path, [header, encoded])
            received = queue.Received(
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                study_uid=study_uid,
                series_uid=series_uid,
                modality=modality,
                transfer_syntax=ts,
                path=str(path),
                size=size,
                calling_ae=calling,
                called_ae=assoc.acceptor.ae_title.strip(),
                peer_host=str(assoc.requestor.address),
            )
            is_new = self._record(received)
        except OSError as exc:
            log.error("C-STORE %s from %s: cannot write spool file (%s) -> 0xA700", sop_uid, calling, exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        except Exception as exc:
            log.error("C-STORE %s from %s: cannot commit (%s) -> 0xA700", sop_uid, calling, type(exc).__name__)
            return OUT_OF_RESOURCES
        if not is_new:
            log.info("C-STORE %s from %s: already stored, answered Success", sop_uid, calling)
        log.debug("C-STORE %s from %s: stored", sop_uid, calling)
        if self.on_stored:
            self.on_stored()
        return SUCCESS


def make_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class in every transfer syntax pynetdicom knows."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = 0  # unlimited
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.network_timeout = settings.node.network_timeout_s
    ae.maximum_associations = 32
    return ae


def start_server(settings: Settings, engine: Engine, on_stored: Callable[[], None] | None = None) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server, whose ``shutdown()`` stops it."""
    policy = AccessPolicy(settings)
    reactor_delay = settings.node.reactor_delay_s

    def on_requested(event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = rq.calling_ae_title.strip()
        called = rq.called_ae_title.strip()
        host = str(assoc.requestor.address)
        refusal = policy.check(calling, called, host)
        if refusal is None:
            log.info("association from %s@%s to %s: accepted", calling, host, called)
            return
        reason, why = refusal
        log.warning("association from %s@%s to %s: rejected (%s)", calling, host, called, why)
        assoc.acse.send_reject(0x01, 0x01, reason)
        assoc.is_rejected = True
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def on_open(event: evt.Event) -> None:
        tune_association(event.assoc, reactor_delay)

    def on_echo(event: evt.Event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title.strip())
        return SUCCESS

    handlers = [
        (evt.EVT_CONN_OPEN, on_open),
        (evt.EVT_REQUESTED, on_requested),
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_STORE, StoreHandler(settings, engine, on_stored)),
    ]
    ae = make_ae(settings)
    server = ae.start_server((settings.node.host, settings.node.port), block=False, evt_handlers=handlers)
    log.info("listening as %s on %s:%d", settings.node.ae_title, settings.node.host, settings.node.port)
    return server

