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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import pynetdicom.association
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import sessionmaker

from node import audit, metrics, queue
from node.config import Settings
from node.db import row_path
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


class _ReactorClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``.

    An association's reactor thread polls for the next DIMSE message with a fixed
    ``time.sleep(0.001)``, so every C-STORE waits up to 1 ms (0.5 ms on average, a sixth
    of the whole exchange here) before its handler runs. While an association is busy
    (a C-STORE in the last half second on that thread) its poll sleeps ``delay``
    instead; an idle one goes back to 1 ms. Every other sleep is left alone."""

    BUSY_S = 0.5

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.local = threading.local()

    def mark_busy(self) -> None:
        self.local.busy_until = time.monotonic() + self.BUSY_S

    def sleep(self, seconds: float) -> None:
        if seconds == 0.001 and getattr(self.local, "busy_until", 0.0) > time.monotonic():
            seconds = self.delay
        time.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


_clock: _ReactorClock | None = None


def _install_reactor_clock(delay: float) -> _ReactorClock:
    global _clock
    if _clock is None:
        _clock = _ReactorClock(delay)
        pynetdicom.association.time = _clock  # type: ignore[attr-defined]
    _clock.delay = delay
    return _clock


class AccessPolicy:
    """Who may associate: the [[sources]] list, or anyone when accept_unknown_sources."""

    def __init__(self, settings: Settings) -> None:
        self.ae_title = settings.node.ae_title
        self.update(settings)

    def update(self, settings: Settings) -> None:
        """Take new [[sources]] and accept_unknown_sources (a configuration reload)."""
        sources: dict[str, set[str | None]] = {}
        for s in settings.sources:
            sources.setdefault(s.ae_title.strip(), set()).add(_resolve(s.host) if s.host else None)
        self.accept_unknown, self.sources = settings.node.accept_unknown_sources, sources

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


# Associations open at once (more are refused by pynetdicom); the ingest pool is sized
# for as many storing at the same time (node.db.pool_size_for).
MAX_ASSOCIATIONS = 32

# An association keeps its database connection between the C-STOREs of a burst (checking
# one out of the pool and back, with its reset, for every object cost a third of a
# commit) and gives it back once it stored nothing for this long: a sender that keeps
# an association open without sending holds no connection (docs/cluster.md, "Connection
# budget").
IDLE_RELEASE_S = 1.0


class _Lent:
    """The connection one association holds between C-STOREs, and when it last used it.
    ``lock``: held by the association's thread while it stores, so that the reaper
    never takes a connection in use."""

    __slots__ = ("conn", "lock", "used")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.lock = threading.Lock()
        self.used = time.monotonic()

    def give_back(self) -> int:
        """Close the connection (back to the pool); 1 if there was one. Hold ``lock``."""
        conn, self.conn = self.conn, None
        if conn is None:
            return 0
        conn.close()
        return 1


class StoreHandler:
    """C-STORE: spool the file atomically and commit its row, then answer.

    The file (written, fsynced, renamed, directory fsynced) and the row (committed, WAL
    fsynced) are made durable at the same time, the file on a spool thread: each waits on
    its own disk flush, and the answer waits for both. A row can therefore be committed
    a moment before its file is in place: routing waits for the file (``Node.route_stable``),
    a failed write deletes the row again, and at start rows left without a file by a crash
    are dropped (those objects were never acknowledged)."""

    def __init__(self, settings: Settings, engine: Engine, on_stored: Callable[[], None] | None = None, writer: str = "") -> None:
        self.data_dir = settings.node.data_dir
        self.writer = writer  # the owner token rows are marked with (received_by)
        self.spool_dir = settings.node.data_dir / "spool"
        self.engine = engine
        self.on_stored = on_stored
        self._spool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool")
        self._lent: dict[int, _Lent] = {}
        self._lent_lock = threading.Lock()
        self._closing = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="scp-idle-connections", daemon=True)
        self._reaper.start()

    def _lent_to(self, assoc) -> _Lent:
        with self._lent_lock:
            return self._lent.setdefault(id(assoc), _Lent())

    def _reap(self) -> None:
        while not self._closing.wait(IDLE_RELEASE_S / 2):
            self.release_idle(IDLE_RELEASE_S)

    def release_idle(self, idle_s: float) -> int:
        """Give back the connections of associations that stored nothing for ``idle_s``
        seconds (one busy storing keeps its own); returns how many. The reaper thread
        calls it every ``IDLE_RELEASE_S / 2`` seconds."""
        now = time.monotonic()
        with self._lent_lock:
            lent = list(self._lent.values())
        released = 0
        for held in lent:
            if held.conn is not None and now - held.used >= idle_s and held.lock.acquire(blocking=False):
                try:
                    released += held.give_back()
                finally:
                    held.lock.release()
        return released

    def held(self) -> int:
        """How many database connections associations hold now."""
        with self._lent_lock:
            return sum(1 for held in self._lent.values() if held.conn is not None)

    def release(self, assoc) -> None:
        """The association closed: give its connection back."""
        with self._lent_lock:
            held = self._lent.pop(id(assoc), None)
        if held is not None:
            with held.lock:
                held.give_back()

    def _record_lent(self, assoc, received: queue.Received) -> bool:
        """:meth:`_record` on the association's connection, checked out of the pool if
        it holds none now (the pool waits ``db_pool_timeout_s`` for one, then raises)."""
        held = self._lent_to(assoc)
        with held.lock:
            try:
                if held.conn is None or held.conn.closed or held.conn.invalidated:
                    held.conn = self.engine.connect()
                return self._record(held.conn, received)
            finally:
                held.used = time.monotonic()

    def _record(self, conn: Connection, received: queue.Received) -> bool:
        """Commit the row; False when the object was stored before (a re-send)."""
        for _ in range(2):
            try:
                with conn.begin():
                    change = queue.record_received(conn, received)
                if change:  # logged only once committed: a rolled-back re-send changes nothing
                    log.info(change)
                return True
            except IntegrityError:
                with conn.begin():
                    if queue.is_stored(conn, received.sop_instance_uid):
                        change = queue.on_resend(conn, received.sop_instance_uid)  # a held object is routed again
                        if change:
                            log.info(change)
                        return False
                # Another association created the same study meanwhile: once more.
        raise RuntimeError("could not record the object")

    def _forget(self, sop_uid: str) -> None:
        try:
            with self.engine.begin() as conn:
                queue.forget_received(conn, sop_uid)
        except Exception as exc:  # the next start drops it (no file)
            log.error("C-STORE %s: could not delete the row of the unwritten object (%s)", sop_uid, type(exc).__name__)

    def close(self) -> None:
        self._closing.set()
        self._reaper.join()
        self._spool.shutdown(wait=True)
        with self._lent_lock:
            lent, self._lent = list(self._lent.values()), {}
        for held in lent:
            with held.lock:
                held.give_back()

    def __call__(self, event: evt.Event) -> int:
        if _clock is not None:
            _clock.mark_busy()
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
        # Re-sending the same object rewrites the same file with the same bytes; the
        # row's unique SOP Instance UID then says it was stored before.
        header = part10_header(sop_class, sop_uid, ts, calling)
        try:
            writing = self._spool.submit(write_atomic, path, [header, encoded])
        except RuntimeError:  # shutting down
            return OUT_OF_RESOURCES
        received = queue.Received(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_uid=study_uid,
            series_uid=series_uid,
            modality=modality,
            transfer_syntax=ts,
            path=row_path(self.data_dir, path),
            size=len(header) + len(encoded),
            calling_ae=calling,
            called_ae=assoc.acceptor.ae_title.strip(),
            peer_host=str(assoc.requestor.address),
            received_by=self.writer,
        )
        try:
            is_new = self._record_lent(assoc, received)
        except Exception as exc:
            wait([writing])
            log.error("C-STORE %s from %s: cannot commit (%s) -> 0xA700", sop_uid, calling, type(exc).__name__)
            return OUT_OF_RESOURCES
        try:
            writing.result()
        except OSError as exc:
            log.error("C-STORE %s from %s: cannot write spool file (%s) -> 0xA700", sop_uid, calling, exc.strerror or type(exc).__name__)
            if is_new:
                self._forget(sop_uid)
            return OUT_OF_RESOURCES
        if not is_new:
            log.info("C-STORE %s from %s: already stored, answered Success", sop_uid, calling)
        log.debug("C-STORE %s from %s: stored", sop_uid, calling)
        metrics.observe_received(received.size)
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
    ae.maximum_associations = MAX_ASSOCIATIONS
    return ae


def start_server(settings: Settings, engine: Engine, on_stored: Callable[[], None] | None = None, writer: str = "") -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server, whose ``shutdown()`` stops it.
    ``writer``: the owner token stored with each received row (``received_by``)."""
    policy = AccessPolicy(settings)
    audit_sessions = sessionmaker(engine)
    reactor_delay = settings.node.reactor_delay_s
    _install_reactor_clock(max(reactor_delay, 0.0001))

    def on_requested(event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = rq.calling_ae_title.strip()
        called = rq.called_ae_title.strip()
        host = str(assoc.requestor.address)
        refusal = policy.check(calling, called, host)
        metrics.ASSOCIATIONS.labels(result="accepted" if refusal is None else "rejected").inc()
        audit.association(audit_sessions, calling, host, called, refusal[1] if refusal else "")
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

    def on_close(event: evt.Event) -> None:
        store.release(event.assoc)

    def on_echo(event: evt.Event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title.strip())
        return SUCCESS

    store = StoreHandler(settings, engine, on_stored, writer)
    handlers = [
        (evt.EVT_CONN_OPEN, on_open),
        (evt.EVT_CONN_CLOSE, on_close),
        (evt.EVT_REQUESTED, on_requested),
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_STORE, store),
    ]
    ae = make_ae(settings)
    server = ae.start_server((settings.node.host, settings.node.port), block=False, evt_handlers=handlers)
    server.store_handler = store  # type: ignore[attr-defined]  # closed by Node.stop after shutdown()
    server.access_policy = policy  # type: ignore[attr-defined]  # updated by Node.reload
    log.info("listening as %s on %s:%d", settings.node.ae_title, settings.node.host, settings.node.port)
    return server

