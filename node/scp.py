"""The node's network edge: pynetdicom listeners (plain and DICOM TLS) answering C-ECHO
and C-STORE.

Who may connect and how many at once is :mod:`node.admission`; where a data set goes
while it arrives is :mod:`node.incoming`. The C-STORE handler checks what arrived, then
spools and queues it: it answers Success only after the file is fsynced under its final
name and its row committed, and a failure status otherwise, so the sender keeps its copy:

=======  ====================================================================
0x0000   stored (or stored before: the same object, see below)
0x0122   sent on a presentation context negotiated for another SOP class
         (PS3.7 9.3.1); nothing is stored
0xA700   out of resources: object above ``max_object_mb``, disk below
         ``min_free_disk_mb``, spool file or row could not be written
0xA900   the data set's SOP Class UID differs from the command's
0xC210   the data set cannot be decoded, or ends inside an element; or the
         command set's group length is missing or wrong (node.dimsefast)
0xC211   SOP Instance UID or Study Instance UID missing; or the C-STORE-RQ's
         Affected SOP Class / Instance UID or Priority missing or empty
         (node.dimsefast: pynetdicom would not answer it at all)
0xC212   a UID (SOP Class, SOP Instance, Study, Series, transfer syntax) does
         not follow the PS3.5 UI grammar, or the transfer syntax is unknown
0xC213   the data set's SOP Instance UID differs from the command's
0xC214   SOP Instance UID conflict: another object (other SOP class, patient,
         study or series) is stored under this SOP Instance UID
0xC215   the C-STORE-RQ carried no data set (Command Data Set Type 0x0101): a
         request that can never succeed, so not 0xA700 (which says retry)
=======  ====================================================================

Failures carry an Error Comment (0000,0902) saying which check failed, never a value.

An object sent again under a stored SOP Instance UID is *the same object* when its SOP
Class UID, Study and Series Instance UID, Patient ID and Issuer of Patient ID all agree
(compared as a keyed hash, ``Instance.identity``); its bytes are not compared, so a
re-send in another transfer syntax, or with attributes another system coerced, is the
same object: Success, stored once, the first copy kept (``queue.on_resend`` routes a
held one again). Anything else is a conflict, refused with 0xC214, logged and counted
(``conflicts`` table, ``casemask status``).

Logs name objects by ``Pseudonymizer.log_id`` (a keyed hash), never by original UIDs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socketserver import TCPServer

from pydicom import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from node import audit, dimsefast, metrics, pdatafast, queue, reactor
from node.admission import MAX_PDU, REJECT_NO_REASON, Admission, RejectionRecord, guard_dimse, guard_pdu_length, guard_state_machine, malformed_request, wake_if_waiting
from node.config import Settings
from node.db import data_path, row_path
from node.deid import Pseudonymizer
from node.groupcommit import GroupCommit
from node.incoming import IncomingFile, IncomingFiles, install as install_incoming
from node.reasons import withhold_library_values
from node.receivers import LOCK_FILE
from node.sharedport import SharedListening, start_listening, wait_listening
from node.slots import SharedSlots
from node.spool import fsync_dir, matches_digest, place, remove_if_same, replace, spool_path
from node.tls import peer_subject, server_context
from node.uid import invalid_uids, is_valid_uid
from node.wire import ROW_KEYWORDS, Incomplete, Refused, dataset_end, item_tags_problem, row_attributes, row_attributes_from_file, scan_whole

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3 and Annex C of PS3.7); see the module docstring.
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
MISSING_UIDS = 0xC211
INVALID_UID = 0xC212
INSTANCE_MISMATCH = 0xC213
SOP_UID_CONFLICT = 0xC214
NO_DATA_SET = 0xC215

_KNOWN_SYNTAXES = frozenset(str(ts) for ts in ALL_TRANSFER_SYNTAXES)
_LOCK_STRIPES = 256


def failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO: at most 64 characters),
    counted in ``casemask_stores_refused``."""
    metrics.STORES_REFUSED.labels(status=f"0x{status:04X}").inc()
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn off Nagle's algorithm: without it each C-STORE waits on a delayed ACK."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune_association(assoc, reactor_delay_s: float) -> None:
    """TCP_NODELAY on the association's socket and a shorter idle sleep in its reactor
    (what a requested association polls at; accepted ones wait, see node.reactor)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    set_nodelay(sock)
    assoc.dul._run_loop_delay = reactor_delay_s  # pynetdicom sleeps 1 ms per idle loop by default


class _Throttled:
    """Logs a condition at most once per ``every_s`` while it lasts, and once when it ends."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._active = False
        self._lock = threading.Lock()

    def hit(self, message: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._active or now - self._last >= self.every_s:
                log.error(message, *args)
                self._last = now
            self._active = True

    def clear(self, message: str) -> None:
        with self._lock:
            if self._active:
                log.warning(message)
                self._active = False


_WRITE_FAILURES = RejectionRecord(every_s=60.0)


def _write_failed(message: str, *args) -> None:
    """Log a C-STORE refused (0xA700) because its file or row could not be written: at
    most once a minute per kind of failure, the next line saying how many were left
    out. A full disk refuses every C-STORE, and each one wrote an ERROR line (a log
    flood while it lasted; docs/security.md, sixth attack). Each refusal is still
    answered 0xA700 and counted."""
    left_out = _WRITE_FAILURES.should_record(message)
    if left_out is not None:
        more = f" ({left_out} more like it since the last such line not logged)" if left_out else ""
        log.error(message + "%s", *args, more)


class _Refusal(Exception):
    """A C-STORE that is answered with a failure status; ``why`` names the check."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class StoreHandler:
    """C-STORE: check, spool and commit, then answer.

    The data set arrived in an :class:`IncomingFile`. The file (fsynced, linked under its
    final name unless one is there, directory fsynced) and the row (committed, WAL
    fsynced, with the rows of concurrent C-STOREs: :mod:`node.groupcommit`) are made
    durable at the same time, the file on a spool thread; the answer
    waits for both, then settles a re-send or a conflict (see the module docstring).
    C-STOREs of one SOP Instance UID are handled one at a time in this process, so two
    of them never race for one spool file. A row can be committed a moment before its
    file is in place: routing waits for the file (``Node.route_stable``), a failed write
    deletes the row again, and at start rows left without a file by a crash are dropped
    (those objects were never acknowledged). Rows name their files relative to
    ``data_dir`` (shared by the nodes of a cluster) and carry ``writer``, the process's
    owner token (``received_by``)."""

    def __init__(self, settings: Settings, engine: Engine, pseudo: Pseudonymizer, incoming: IncomingFiles, on_stored: Callable[[], None] | None = None, writer: str = "", shared: bool = False) -> None:
        """``writer``: the owner token stored with each row (``received_by``). ``shared``:
        other processes receive into the same spool (``[node] receivers``); C-STOREs of
        one SOP Instance UID are then also serialized across processes."""
        self.data_dir = settings.node.data_dir
        self.writer = writer
        self.spool_dir = settings.node.data_dir / "spool"
        self.engine = engine
        self.pseudo = pseudo
        self.incoming = incoming
        self.on_stored = on_stored
        self.strict_uids = settings.node.strict_uids
        self.max_object_mb = settings.node.max_object_mb
        self.min_free_disk_mb = settings.node.min_free_disk_mb
        self.parallel_durability = settings.node.parallel_durability
        self._spool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="spool")
        self._rows = GroupCommit(engine, self._log_change)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._lock_fd = os.open(settings.node.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600) if shared else None
        self._disk = _Throttled()

    @contextlib.contextmanager
    def _one_at_a_time(self, sop_uid: str):
        """Hold the SOP Instance UID's lock stripe: this process's thread lock and, where
        other receiver processes share the spool, a byte lock of the lock file (POSIX
        record locks belong to the process, hence the thread lock first)."""
        stripe = zlib.crc32(sop_uid.encode()) % _LOCK_STRIPES  # the same in every process (hash() of a str is salted per process)
        with self._locks[stripe]:
            if self._lock_fd is None:
                yield
                return
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, 1, stripe)
            try:
                yield
            finally:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, stripe)

    def _log_change(self, received: queue.Received, change: str) -> None:
        log.info(change.replace(received.study_uid, self.pseudo.log_id(received.study_uid)))

    def close(self) -> None:
        self._spool.shutdown(wait=True)
        self._rows.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the handler ------------------------------------------------------------------------
    def __call__(self, event: evt.Event) -> int | Dataset:
        reactor.mark_busy()
        calling = event.assoc.requestor.ae_title.strip()
        path = getattr(event.request, "_dataset_path", None)  # pynetdicom: None when no data set came
        refused = dimsefast.refusal(event.request)
        if refused is not None:
            status, why = refused
            log.warning("C-STORE from %s: %s -> 0x%04X", calling, why, status)
            if path is not None and (incoming := self.incoming.take(path)) is not None:
                incoming.discard()
            return failure(status, why)
        if path is None:
            log.warning("C-STORE from %s: the request carried no data set -> 0x%04X", calling, NO_DATA_SET)
            return failure(NO_DATA_SET, "C-STORE-RQ without a data set")
        incoming = self.incoming.take(path)
        if incoming is None:
            log.error("C-STORE from %s: its data set file is gone (association closing?) -> 0xA700", calling)
            return failure(OUT_OF_RESOURCES, "data set not received")
        try:
            return self._store(event, incoming, calling)
        except _Refusal as r:
            return failure(r.status, r.why)
        finally:
            incoming.discard()  # the temporary name; a placed file has its own

    def _store(self, event: evt.Event, incoming: IncomingFile, calling: str) -> int | Dataset:
        self._check_received(incoming, calling)
        ts = UID(str(event.context.transfer_syntax))
        cmd_class = str(event.request.AffectedSOPClassUID or "")
        cmd_sop = str(event.request.AffectedSOPInstanceUID or "")
        if str(event.context.abstract_syntax) != cmd_class:
            log.warning("C-STORE from %s: sent on a presentation context of another SOP class -> 0x0122", calling)
            raise _Refusal(SOP_CLASS_NOT_SUPPORTED, "the presentation context was negotiated for another SOP class")
        bad = invalid_uids({"transfer syntax": str(ts), "Affected SOP Class UID": cmd_class, "Affected SOP Instance UID": cmd_sop}, self.strict_uids, required=("transfer syntax", "Affected SOP Class UID", "Affected SOP Instance UID"))
        if bad or str(ts) not in _KNOWN_SYNTAXES:
            what = ", ".join(bad) or "transfer syntax (unknown)"
            log.warning("C-STORE from %s: %s not a valid UID -> 0xC212", calling, what)
            raise _Refusal(INVALID_UID, f"invalid UID: {what}")
        attrs = self._read(incoming, ts, calling)
        sop_uid, study_uid = attrs["SOPInstanceUID"], attrs["StudyInstanceUID"]
        if not sop_uid or not study_uid:
            log.warning("C-STORE from %s: missing SOP Instance or Study Instance UID -> 0xC211", calling)
            raise _Refusal(MISSING_UIDS, "SOP Instance UID or Study Instance UID missing")
        bad = invalid_uids({k: attrs[k] for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}, self.strict_uids)
        if bad:
            log.warning("C-STORE from %s: %s not a valid UID -> 0xC212", calling, ", ".join(bad))
            raise _Refusal(INVALID_UID, f"invalid UID: {', '.join(bad)}")
        if sop_uid != cmd_sop:
            log.warning("C-STORE from %s: the data set's SOP Instance UID is not the command's -> 0xC213", calling)
            raise _Refusal(INSTANCE_MISMATCH, "SOP Instance UID differs from the command's")
        if attrs["SOPClassUID"] and attrs["SOPClassUID"] != cmd_class:
            log.warning("C-STORE %s from %s: the data set's SOP Class UID is not the command's -> 0xA900", self.pseudo.log_id(sop_uid), calling)
            raise _Refusal(SOP_CLASS_MISMATCH, "SOP Class UID differs from the command's")
        with self._one_at_a_time(sop_uid):
            status = self._spool_and_record(event, incoming, attrs, ts, cmd_class, calling)
        if status == SUCCESS:
            metrics.observe_received(incoming.size)
            if self.on_stored:
                self.on_stored()
        return status

    def _check_received(self, incoming: IncomingFile, calling: str) -> None:
        """0xA700 for what :class:`IncomingFile` refused to keep."""
        if incoming.refused == "disk below its floor":
            self._disk.hit("C-STOREs answered 0xA700: free disk below min_free_disk_mb = %d (logged once a minute while it lasts)", self.min_free_disk_mb)
            raise _Refusal(OUT_OF_RESOURCES, "free disk below the node's floor")
        if incoming.refused == "too large":
            log.warning("C-STORE from %s: object larger than max_object_mb = %d -> 0xA700", calling, self.max_object_mb)
            raise _Refusal(OUT_OF_RESOURCES, "object larger than max_object_mb")
        if incoming.refused:
            _write_failed("C-STORE from %s: cannot write the incoming file (%s) -> 0xA700", calling, incoming.refused)
            raise _Refusal(OUT_OF_RESOURCES, "cannot write the spool file")
        self._disk.clear("free disk above min_free_disk_mb again: C-STOREs accepted")

    def _read(self, incoming: IncomingFile, ts: UID, calling: str) -> dict[str, str]:
        """The row's attributes, after checking that the data set is whole."""
        try:
            offset = _dataset_offset(incoming.head)
            whole = incoming.size <= len(incoming.head)
            if ts == DeflatedExplicitVRLittleEndian:
                with _inflated(incoming, offset, self.max_object_mb * 1024 * 1024) as data:
                    attrs, end = scan_whole(data, False, 0)
                    if end != len(data):
                        raise Incomplete("data set length mismatch")
                    return attrs if attrs is not None else row_attributes(data, False, True)
            if not ts.is_little_endian:  # big endian (retired): read by pydicom, no structure check
                with _budgeted(incoming.size):  # pydicom holds it whole: memory like an inflation's
                    incoming.hand_to_kernel()  # pydicom reads the file by its name: the buffered bytes first
                    with open(incoming.path, "rb") as fp:  # pydicom makes a Dataset of each item: counted first
                        fp.seek(offset)
                        if problem := item_tags_problem(fp, incoming.size - offset):
                            raise Refused(problem)
                    return _decode_file(incoming.path)
            with _Bytes(incoming, whole) as data:
                if whole:  # the structure check and the row's attributes in one walk
                    attrs, end = scan_whole(data, ts.is_implicit_VR, offset)
                    if end != len(data):
                        raise Incomplete("data set length mismatch")
                    if attrs is not None:
                        return attrs
                elif dataset_end(data, ts.is_implicit_VR, offset) != len(data):
                    raise Incomplete("data set length mismatch")
            head = bytes(incoming.head[offset:])
            try:
                return row_attributes(head, ts.is_implicit_VR, True, complete=whole)
            except Exception:
                with open(incoming.path, "rb") as fp:
                    fp.seek(offset)
                    return row_attributes_from_file(fp, ts.is_implicit_VR, True)
        except Refused as exc:
            log.warning("C-STORE from %s: %s -> 0xC210", calling, exc)
            raise _Refusal(CANNOT_UNDERSTAND, str(exc)) from None
        except Incomplete:
            log.warning("C-STORE from %s: the data set ends inside an element -> 0xC210", calling)
            raise _Refusal(CANNOT_UNDERSTAND, "data set ends inside an element") from None
        except _TooLarge:
            log.warning("C-STORE from %s: deflated object inflates beyond max_object_mb = %d or %d MiB, or a big endian one is larger than %d MiB (read into memory whole) -> 0xA700",
                        calling, self.max_object_mb, INFLATE_BUDGET >> 21, INFLATE_BUDGET >> 21)
            raise _Refusal(OUT_OF_RESOURCES, "object larger than max_object_mb") from None
        except _InflateBusy:
            log.warning("C-STORE from %s: deflated or big endian object: other such objects are being read into memory (%d MiB at once) -> 0xA700", calling, INFLATE_BUDGET >> 20)
            raise _Refusal(OUT_OF_RESOURCES, "busy inflating other objects: try again") from None
        except Exception as exc:
            log.warning("C-STORE from %s: data set cannot be decoded (%s) -> 0xC210", calling, type(exc).__name__)
            raise _Refusal(CANNOT_UNDERSTAND, "data set cannot be decoded") from None

    def _spool_and_record(self, event: evt.Event, incoming: IncomingFile, attrs: dict[str, str], ts: UID, sop_class: str, calling: str) -> int | Dataset:
        assoc = event.assoc
        sop_uid, study_uid = attrs["SOPInstanceUID"], attrs["StudyInstanceUID"]
        name = self.pseudo.log_id(sop_uid)
        path = spool_path(self.spool_dir, study_uid, sop_uid)
        placing = _Placing(self._spool, incoming, path, self.parallel_durability)
        received = queue.Received(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_uid=study_uid,
            series_uid=attrs["SeriesInstanceUID"],
            modality=attrs["Modality"],
            transfer_syntax=str(ts),
            path=row_path(self.data_dir, path),
            size=incoming.size,
            calling_ae=calling,
            called_ae=assoc.acceptor.ae_title.strip(),
            peer_host=str(assoc.requestor.address),
            identity=_identity(self.pseudo, sop_class, attrs),
            received_by=self.writer,
            digest=incoming.digest,
        )
        try:
            stored = self._rows.record(received)
        except Exception as exc:
            placing.outcome()
            if placing.linked:
                remove_if_same(path, incoming.path)  # nobody's file: no row names it
            _write_failed("C-STORE %s from %s: cannot commit (%s) -> 0xA700", name, calling, type(exc).__name__)
            raise _Refusal(OUT_OF_RESOURCES, "cannot record the object") from None
        created = placing.outcome()
        if isinstance(created, OSError):
            _write_failed("C-STORE %s from %s: cannot write spool file (%s) -> 0xA700", name, calling, created.strerror or type(created).__name__)
            forgotten = stored is None and self._forget(sop_uid, name, calling)
            # Our link goes with our row; a row another node vouched for keeps the file
            # it answered Success for (the same inode).
            if placing.linked and (stored is not None or forgotten):
                remove_if_same(path, incoming.path)
            raise _Refusal(OUT_OF_RESOURCES, "cannot write the spool file")
        if stored is None:  # a new object
            if not created:  # left by an earlier attempt that was never acknowledged
                try:
                    replace(incoming.path, path)
                except OSError as exc:
                    _write_failed("C-STORE %s from %s: cannot write spool file (%s) -> 0xA700", name, calling, exc.strerror or type(exc).__name__)
                    self._forget(sop_uid, name, calling)
                    raise _Refusal(OUT_OF_RESOURCES, "cannot write the spool file") from None
            log.debug("C-STORE %s from %s: stored", name, calling)
            return SUCCESS
        identity, stored_path, stored_digest = stored
        if identity and identity != received.identity:
            if created:
                remove_if_same(path, incoming.path)  # the conflicting object's file: nobody's
            self._conflict(received, name, calling)
            raise _Refusal(SOP_UID_CONFLICT, "SOP Instance UID conflict: another object")
        same_place = data_path(self.data_dir, stored_path) == path
        if created and not same_place:
            remove_if_same(path, incoming.path)  # a row of an older layout keeps its own file
        # The same object again. Where its file was gone (retention deleted it) or torn (a
        # crash before its data fsync returned: never acknowledged), this one takes its
        # place and the row its digest: queue.on_resend routes a held (or quarantined for
        # that) object again, or marks the file for the next retention run.
        try:
            adopt = created and same_place
            if same_place and not created:
                if matches_digest(path, stored_digest):
                    _sync_existing(path)  # what a writer still at work elsewhere placed: durable before Success
                else:
                    metrics.SPOOL_DIGEST_MISMATCHES.labels(where="resend").inc()
                    log.warning("C-STORE %s from %s: the stored file does not match its digest (torn by a crash before it was acknowledged): replaced by this one", name, calling)
                    replace(incoming.path, path)
                    adopt = True
            with self.engine.begin() as conn:
                queue.lock_instance(conn, sop_uid)
                if same_place and not path.exists():  # retention deleted it after we looked: ours takes its place
                    replace(incoming.path, path)
                    adopt = True
                change = queue.on_resend(conn, sop_uid)
                if adopt:
                    queue.adopt_resent_file(conn, sop_uid, stored_digest, received.digest, received.size)
                kept = queue.vouch_for_resend(conn, sop_uid, self.writer)
        except Exception as exc:
            log.error("C-STORE %s from %s: cannot record the re-send (%s) -> 0xA700", name, calling, type(exc).__name__)
            raise _Refusal(OUT_OF_RESOURCES, "cannot record the object") from None
        if not kept:  # its writer withdrew the row (its file failed) after we read it
            log.error("C-STORE %s from %s: the stored row was withdrawn by its writer meanwhile -> 0xA700", name, calling)
            raise _Refusal(OUT_OF_RESOURCES, "cannot record the object")
        if change:
            log.info(change)
        log.info("C-STORE %s from %s: already stored, answered Success", name, calling)
        return SUCCESS

    def _conflict(self, received: queue.Received, name: str, calling: str) -> None:
        log.warning("C-STORE %s from %s@%s: SOP Instance UID conflict (another SOP class, patient, study or series is stored under it) -> 0xC214", name, calling, received.peer_host)
        try:
            with self.engine.begin() as conn:
                queue.record_conflict(conn, received)
        except Exception as exc:  # counted in the log at least
            log.error("C-STORE %s: could not count the conflict (%s)", name, type(exc).__name__)

    def _forget(self, sop_uid: str, name: str, calling: str) -> bool:
        """Delete the row this process committed for an object whose file failed, unless
        another process answered Success for a re-send of it meanwhile (a node sharing
        the database: :func:`queue.vouch_for_resend` made the row its own); returns
        whether it was deleted."""
        try:
            with self.engine.begin() as conn:
                deleted = queue.forget_received(conn, sop_uid, self.writer)
        except Exception as exc:  # the next start drops it (no file, or a file not matching its digest)
            log.error("C-STORE %s: could not delete the row of the unwritten object (%s)", name, type(exc).__name__)
            return False
        if not deleted:
            log.warning("C-STORE %s from %s: its row was kept: another node stored and acknowledged the same object meanwhile", name, calling)
        return deleted


def _make_durable(incoming: IncomingFile, path: Path) -> bool:
    """On a spool thread: fsync the incoming file and link it under ``path`` unless a
    file is there; True when it was linked (``parallel_durability = false``)."""
    incoming.sync()
    return place(incoming.path, path)


class _Placing:
    """Making a C-STORE's file durable under its final name, beside the row's commit.

    ``parallel``: the file is flushed to the kernel and linked under ``path`` at once
    (unless a file is there), then its data and its folder are fsynced on two spool
    threads at the same time (the row carries the bytes' digest: a crash before the
    data fsync returned leaves a torn file that every reader recognizes, see
    docs/ingest.md). Otherwise one spool thread fsyncs the data, then links, then
    fsyncs the folder (:func:`_make_durable`)."""

    def __init__(self, pool, incoming: IncomingFile, path: Path, parallel: bool) -> None:
        self.linked = False  # our link is at ``path`` (known at once when parallel, else after outcome())
        self._early: bool | OSError | None = None
        self._futures: list = []
        try:
            if not parallel:
                self._futures = [pool.submit(_make_durable, incoming, path)]
                return
            try:
                incoming.hand_to_kernel()
                self.linked = place(incoming.path, path, fsync_folder=False)
            except OSError as exc:
                self._early = exc
                return
            self._early = self.linked
            self._futures = [pool.submit(incoming.sync)]
            if self.linked:
                self._futures.append(pool.submit(fsync_dir, path.parent))
        except RuntimeError:  # the pool is shut down: the node is stopping
            for f in self._futures:
                _outcome(f)
            if self.linked:
                remove_if_same(path, incoming.path)
            raise _Refusal(OUT_OF_RESOURCES, "node shutting down") from None

    def outcome(self) -> bool | OSError:
        """Wait for the fsyncs: whether the file was linked under its path (False: a
        file was there and was left alone), or the OSError that failed it."""
        outcomes = [_outcome(f) for f in self._futures]
        if self._early is None:  # the serial way: one future, its result says it all
            if outcomes[0] is True:
                self.linked = True
            return outcomes[0]
        failed = [o for o in [self._early, *outcomes] if isinstance(o, OSError)]
        return failed[0] if failed else self._early


def _sync_existing(path: Path) -> None:
    """fsync a file another handler placed (and its folder): a re-send answered Success
    on the strength of it must not depend on that handler's fsyncs.

    Raises:
        OSError: the file is gone or the disk fails.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _outcome(future) -> bool | OSError:
    try:
        return future.result()
    except OSError as exc:
        return exc


def _identity(pseudo: Pseudonymizer, sop_class: str, attrs: dict[str, str]) -> str:
    """What makes two objects under one SOP Instance UID the same object, as a keyed
    hash (it includes the Patient ID, which must not be stored in clear)."""
    key = "\x1f".join((sop_class, attrs["StudyInstanceUID"], attrs["SeriesInstanceUID"], attrs["PatientID"], attrs["IssuerOfPatientID"]))
    return pseudo.log_id(key)


def _dataset_offset(head: bytes | bytearray) -> int:
    """Where the data set starts in a Part 10 file written by pynetdicom: after the
    preamble, 'DICM' and the File Meta Information, whose group length is the first
    element (PS3.10 7.1).

    Raises:
        ValueError: the head is not such a file.
    """
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        raise ValueError("no file meta information")
    return 144 + int.from_bytes(head[140:144], "little")


class _Bytes:
    """The received bytes: the in-memory head when it holds them all, else an mmap of
    the file (pages are read as the structure check walks them, never copied whole)."""

    def __init__(self, incoming: IncomingFile, whole: bool) -> None:
        self.incoming, self.whole = incoming, whole
        self._fp = self._map = None

    def __enter__(self):
        if self.whole:
            return bytes(self.incoming.head)
        self.incoming.sync()
        self._fp = open(self.incoming.path, "rb")
        self._map = mmap.mmap(self._fp.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            self._map.close()
        if self._fp is not None:
            self._fp.close()


class _TooLarge(Exception):
    """A deflated data set inflates beyond max_object_mb."""


class _InflateBusy(Exception):
    """Inflating this data set would take the process beyond INFLATE_BUDGET."""


# Bytes of deflated data sets inflated in memory at once in this process. A deflate
# stream inflates some 1000 times: 296 KB sent inflated to 290 MB and took 546 MB of
# memory (measured); with max_object_mb = 4096, a 4 MB send cost 7.5 GB, and a few
# associations at once the node's memory. A data set that finds no room is refused
# 0xA700 (out of resources: the sender tries again later); one that could never fit is
# refused as too large.
INFLATE_BUDGET = 1024 * 1024 * 1024


class _Budget:
    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


_inflating = _Budget(INFLATE_BUDGET)


@contextlib.contextmanager
def _inflated(incoming: IncomingFile, offset: int, limit: int):
    """:func:`_inflate` whose memory stays counted in :data:`INFLATE_BUDGET` until the
    ``with`` block (the walk over it) ends."""
    held = [0]
    try:
        yield _inflate(incoming, offset, limit, held)
    finally:
        _inflating.give(held[0])


def _inflate(incoming: IncomingFile, offset: int, limit: int, held: list[int]) -> bytes:
    """A deflated data set (PS3.5 A.5: raw deflate after the File Meta), inflated in
    steps and never beyond ``limit`` bytes (a small stream can inflate to gigabytes),
    each step's memory taken from :data:`INFLATE_BUDGET` first (``held[0]``: how much;
    the caller gives it back, :func:`_inflated`).

    Raises:
        _TooLarge: it inflates beyond ``limit`` or beyond the whole budget.
        _InflateBusy: other data sets being inflated hold the budget.
        Incomplete: the deflate stream ends early.
        zlib.error: it is not a deflate stream.
    """
    import zlib

    limit = min(limit, INFLATE_BUDGET // 2)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    step = 1024 * 1024
    incoming.sync()
    with open(incoming.path, "rb") as fp:
        fp.seek(offset)
        while chunk := fp.read(step):
            while chunk:
                want = min(len(out) + step, limit + 1)
                if held[0] < want:
                    if not _inflating.take(want - held[0]):
                        raise _InflateBusy
                    held[0] = want
                out += inflater.decompress(chunk, want - len(out))
                if len(out) > limit:
                    raise _TooLarge
                chunk = inflater.unconsumed_tail
    if not inflater.eof:
        raise Incomplete("the deflate stream ends early")
    if not _inflating.take(len(out)):  # the copy the walk reads (it needs bytes), a moment beside ``out``
        raise _InflateBusy
    held[0] += len(out)
    data = bytes(out)
    out.clear()
    # ``out`` is freed: what stays held while the walk runs is ``data`` alone (the budget
    # counted twice the object until the walk ended, and one 512 MiB inflation kept the
    # whole budget, every other deflated sender refused, for the length of its walk).
    _inflating.give(held[0] - len(data))
    held[0] = len(data)
    return data


@contextlib.contextmanager
def _budgeted(size: int):
    """Hold ``size`` bytes of :data:`INFLATE_BUDGET` while a data set is read whole into
    memory by pydicom (big endian: no walk over bytes checks it first).

    Raises:
        _TooLarge: ``size`` is over half the budget (as an inflation may take).
        _InflateBusy: other data sets being read or inflated hold the budget.
    """
    if size > INFLATE_BUDGET // 2:
        raise _TooLarge
    if not _inflating.take(size):
        raise _InflateBusy
    try:
        yield
    finally:
        _inflating.give(size)


def _decode_file(path: Path) -> dict[str, str]:
    """The row's attributes from a complete decode by pydicom (one cut short raises)."""
    from pydicom import dcmread

    ds = dcmread(path)
    if any(tag >> 16 == 0x0002 for tag in ds.keys()):
        raise Refused("a File Meta element (group 0002) inside the data set")
    return {kw: str(ds.get(kw, "") or "").strip("\x00 ") for kw in ROW_KEYWORDS}


# -- private and unknown SOP classes -----------------------------------------------------------
# A vendor's private object (or a storage class newer than pynetdicom) must not fail a
# modality's job: such presentation contexts are accepted as storage and the objects
# stored; routing then holds them in quarantine ("unknown SOP class, not de-identified")
# unless a route names their SOPClassUID (node.routing). pynetdicom hands a C-STORE to its
# storage service only for SOP classes it knows, so each one is registered with its
# public ``register_uid`` (global to the process: at most MAX_UNKNOWN_CLASSES of them).
MAX_UNKNOWN_CLASSES = 512
_unknown_lock = threading.Lock()
_registered: set[str] = set()


def _offer_unknown_storage(assoc, strict_uids: bool) -> int:
    """Add a supported context (every transfer syntax) to this association for each
    proposed abstract syntax that is a valid UID of no service pynetdicom knows; returns
    how many were added. Call in EVT_REQUESTED, before negotiation."""
    from pynetdicom.service_class import ServiceClass, StorageServiceClass
    from pynetdicom.sop_class import register_uid, uid_to_service_class

    supported = {str(cx.abstract_syntax) for cx in assoc.acceptor.supported_contexts}
    added = []
    for cx in assoc.requestor.primitive.presentation_context_definition_list:
        uid = str(cx.abstract_syntax or "")
        if uid in supported or uid in added or not is_valid_uid(uid, strict_uids):
            continue
        with _unknown_lock:
            if uid not in _registered:
                if uid_to_service_class(uid) is not ServiceClass:
                    continue  # a known non-storage service: negotiated as usual (refused)
                if len(_registered) >= MAX_UNKNOWN_CLASSES:
                    log.warning("association from %s: more than %d unknown SOP classes seen; this one is not accepted", assoc.requestor.ae_title.strip(), MAX_UNKNOWN_CLASSES)
                    continue
                register_uid(uid, "CasemaskUnknownStorage_" + uid.replace(".", "_"), StorageServiceClass)
                _registered.add(uid)
        added.append(uid)
    if added:
        from pynetdicom.presentation import build_context

        assoc.acceptor.supported_contexts = assoc.acceptor.supported_contexts + [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in added]
    return len(added)


# -- listeners ------------------------------------------------------------------------------
class EdgeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the node's TCP gate and, for the
    TLS listener, the TLS handshake moved off the accept loop.

    pynetdicom's own TLS support wraps each accepted socket in ``get_request``, on the one
    thread that accepts connections, with no timeout: one client that connects and never
    starts its handshake stops the listener. Here the handshake runs on the connection's
    own thread, bounded by ``handshake_timeout_s``."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops SYNs (a 1 s retry) when connections come in bursts

    def __init__(self, ae: AE, address: tuple[str, int], admission: Admission, tls: ssl.SSLContext | None, handshake_timeout_s: float, evt_handlers: list,
                 shared: SharedListening | None = None) -> None:
        """``shared``: accept from the listening socket the node's receiving processes
        share (node.sharedport) instead of binding one; ``address`` names its port."""
        self.shared = shared
        self.shared_socket = shared.sockets[address[1]] if shared is not None else None
        self._gate = threading.Event()  # set by shutdown(): stop waiting for the node to listen
        self._accepting: set[int] = set()  # accepted here, no association thread yet
        self._accepting_lock = threading.Lock()
        self.admission = admission
        self.tls = tls
        self.handshake_timeout_s = handshake_timeout_s
        self.read_timeout_s = ae.network_timeout
        # pynetdicom deep-copies the server's contexts into every connection's association
        # (some 6000 objects for every storage class in every transfer syntax: about 20 ms
        # of CPU, 150 ms on a loaded machine, spent even on a connection that never
        # associates). The server gets Verification only; an admitted association gets the
        # full list, shared and read-only, in EVT_REQUESTED (see start_server).
        verification = [cx for cx in ae.supported_contexts if cx.abstract_syntax == Verification]
        super().__init__(ae, address, ae.ae_title, verification, None, evt_handlers)
        admission.add_listener(lambda: self.active_associations)

    # -- one listening socket shared by the node's processes (node.sharedport) -------------
    def server_bind(self) -> None:
        if self.shared_socket is None:
            super().server_bind()
            return
        self.socket.close()  # the one socketserver made: the shared one takes its place
        self.socket = self.shared_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.shared is None:
            super().server_activate()
        elif self.shared.owner:  # the node process listens once its receivers are ready
            start_listening(self.socket)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self.shared_socket is not None:
            wait_listening(self.shared_socket, self._gate)  # False: shut down first; serve_forever ends at once
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        if self.shared_socket is None:
            super().server_close()
        else:  # never shutdown(): that would stop the socket listening in every process
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; on the shared socket, first leave it to a less busy
        process for a moment (node.sharedport.AcceptBoard). Raises BlockingIOError when
        another process took it (socketserver then waits for the next one)."""
        if self.shared is not None:
            self.shared.board.yield_to_idler(self.socket)
        request, address = self.socket.accept()
        with self._accepting_lock:
            self._accepting.add(id(request))
        if self.shared is not None:
            self.shared.board.publish()
        return request, address

    def _accepted_done(self, key: int) -> None:
        """Accepted connection ``key`` became an association thread or was closed."""
        with self._accepting_lock:
            self._accepting.discard(key)

    def open_connections(self) -> int:
        """Connections this server holds open: accepted and not yet an association, or an
        association whose socket is open."""
        with self._accepting_lock:
            accepting = len(self._accepting)
        return accepting + sum(1 for a in self.active_associations if getattr(getattr(a.dul, "socket", None), "socket", None) is not None)

    def verify_request(self, request, client_address) -> bool:  # socketserver: False closes it
        host = str(client_address[0])
        ok = self.admission.connect(id(request), host, handshake=request if self.tls is not None else None)
        if not ok:
            self._accepted_done(id(request))
            if self.shared is not None:
                self.shared.board.publish()
            left_out = self.admission.closed_at_once.should_record(host)  # a connect loop is not a log flood
            if left_out is not None:
                more = f"; {left_out} more since not logged" if left_out else ""
                log.warning("connection from %s closed at once: too many connections open (max_associations / max_associations_per_host)%s", host, more)
        return ok

    def process_request(self, request, client_address) -> None:
        """Start the connection's thread; where it cannot start (no threads left: a
        flood, or the process's limits), the connection leaves the TCP gate's count
        before socketserver closes it, else each such failure held a place for good."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(id(request))
            raise

    def _release(self, key: int) -> None:
        """Connection ``key`` no longer counts at the TCP gate, here and on the board."""
        self.admission.handshake_done(key)
        self.admission.connected(key)
        self._accepted_done(key)
        if self.shared is not None:
            self.shared.board.publish()

    def process_request_thread(self, request, client_address) -> None:
        key = id(request)
        try:
            if self.tls is not None:
                try:
                    request = self._handshake(request, client_address)
                finally:
                    self.admission.handshake_done(key)
                if request is None:
                    return
            # pynetdicom reads a PDU with blocking recv() calls: without a timeout, a peer
            # that sends half a PDU and goes quiet holds two threads forever.
            request.settimeout(self.read_timeout_s)
            super().process_request_thread(request, client_address)
        finally:
            self._release(key)

    def _handshake(self, raw: socket.socket, client_address) -> ssl.SSLSocket | None:
        raw.settimeout(self.handshake_timeout_s)
        try:
            tls = self.tls.wrap_socket(raw, server_side=True)  # type: ignore[union-attr]
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("TLS connection from %s: handshake failed (%s): closed", client_address[0], reason)
            _close(raw)
            return None
        return tls

    def shutdown(self) -> None:
        """Stop accepting, close the listening socket, and abort open associations."""
        self._gate.set()
        TCPServer.shutdown(self)
        self.server_close()
        for assoc in self.active_associations:
            assoc.abort()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Listeners:
    """The node's listeners (plain and/or TLS) and what they share."""

    def __init__(self, servers: list[EdgeServer], store_handler: StoreHandler, admission: Admission) -> None:
        self.servers = servers
        self.store_handler = store_handler
        self.admission = admission
        self.access_policy = admission.policy  # updated by Node.reload
        self.incoming = store_handler.incoming

    def shutdown(self) -> None:
        for s in self.servers:
            s.shutdown()


def make_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class in every transfer syntax pynetdicom knows."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = MAX_PDU
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.network_timeout = settings.node.network_timeout_s  # an association idle this long is aborted
    # The node's own limits (node.admission) come first; pynetdicom's is a backstop.
    ae.maximum_associations = 2 * settings.node.max_associations + 1
    return ae


def start_server(settings: Settings, engine: Engine, on_stored: Callable[[], None] | None = None, pseudo: Pseudonymizer | None = None, writer: str = "", slots: SharedSlots | None = None,
                 shared: SharedListening | None = None) -> Listeners:
    """Start listening (non-blocking) on the plain port (unless 0) and the TLS port (when
    [node.tls] is set); returns the listeners, whose ``shutdown()`` stops them.
    ``writer``: the owner token stored with each received row (``received_by``).
    ``slots``: this is one of the node's receiver processes (node.receivers), counting
    associations in the node's shared table, and serializing C-STOREs of one SOP
    Instance UID across processes. The caller closes ``slots``.
    ``shared``: the listening sockets the node's processes share (node.sharedport),
    one per port, and the board that says who accepts next; None: bind the ports here.

    Raises:
        OSError: a port cannot be bound, or a TLS file cannot be read.
        ssl.SSLError: a TLS file is not a certificate or key.
    """
    node = settings.node
    if pseudo is None:  # started on its own (tests, tools): the node's secret, as Node reads it
        from node.startup import load_secret

        pseudo = Pseudonymizer(load_secret(node))
    admission = Admission(settings, slots)
    shared_port = slots is not None
    audit_sessions = sessionmaker(engine)
    reactor_delay = node.reactor_delay_s
    reactor.install(max(reactor_delay, 0.0001), node.reactor_max_wait_ms / 1000)
    dimsefast.install()
    pdatafast.install()
    withhold_library_values()
    install_incoming()
    incoming = IncomingFiles(node.data_dir / "spool" / ".incoming", node.max_object_mb * 1024 * 1024, node.min_free_disk_mb * 1024 * 1024)
    store = StoreHandler(settings, engine, pseudo, incoming, on_stored, writer, shared=shared_port)

    def on_requested(event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = rq.calling_ae_title.strip()
        called = rq.called_ae_title.strip()
        host = str(assoc.requestor.address)
        subject = peer_subject(assoc.dul.socket.socket)
        via = f" (TLS, certificate {subject})" if subject else (" (TLS)" if isinstance(assoc.dul.socket.socket, ssl.SSLSocket) else "")
        refusal = admission.request(assoc, calling, called, host)
        if refusal is None and (bad := malformed_request(assoc)):
            admission.closed(assoc)
            refusal = REJECT_NO_REASON, bad
        metrics.ASSOCIATIONS.labels(result="accepted" if refusal is None else "rejected").inc()
        left_out = 0 if refusal is None else admission.rejections.should_record(host)
        if left_out is not None:  # rejections: at most one a second per address (RejectionRecord)
            more = f"; {left_out} more from this address not recorded" if left_out else ""
            audit.association(audit_sessions, calling, host, called, refusal[1] + more if refusal else "", tls_subject=subject or "")
        if refusal is None:
            assoc.acceptor.supported_contexts = supported  # shared: negotiation only reads it
            unknown = _offer_unknown_storage(assoc, node.strict_uids)
            extra = f", {unknown} unknown SOP class(es) offered as storage" if unknown else ""
            log.info("association from %s@%s to %s%s: accepted%s", calling, host, called, via, extra)
            return
        (result, source, reason), why = refusal
        if left_out is not None:
            log.warning("association from %s@%s to %s%s: rejected (%s)%s", calling, host, called, via, why, more)
        assoc.acse.send_reject(result, source, reason)
        assoc.is_rejected = True
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def on_open(event: evt.Event) -> None:
        tune_association(event.assoc, reactor_delay)
        guard_pdu_length(event.assoc, read_timeout_s=node.network_timeout_s)
        guard_dimse(event.assoc, message_timeout_s=node.dimse_timeout_s)
        guard_state_machine(event.assoc)
        incoming.watch(event.assoc.dul)

    def on_close(event: evt.Event) -> None:
        wake_if_waiting(event.assoc)
        admission.closed(event.assoc)
        if shared is not None:
            shared.board.publish()  # one connection fewer here (node.sharedport)
        left = incoming.release(event.assoc.dul)
        if left:
            log.warning("association from %s closed mid-object: %d partial data set(s) deleted (never acknowledged)", event.assoc.requestor.ae_title.strip() or event.assoc.requestor.address, left)

    echoes = RejectionRecord()  # a C-ECHO loop is not a log flood: one line a second per peer

    def on_echo(event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        left_out = echoes.should_record(f"{calling}@{event.assoc.requestor.address}")
        if left_out is not None:
            log.info("C-ECHO from %s%s", calling, f" ({left_out} more since not logged)" if left_out else "")
        return SUCCESS

    handlers = [
        (evt.EVT_CONN_OPEN, on_open),
        (evt.EVT_CONN_CLOSE, on_close),
        (evt.EVT_REQUESTED, on_requested),
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_STORE, store),
    ]
    ae = make_ae(settings)
    supported = ae.supported_contexts
    servers: list[EdgeServer] = []
    if shared is not None:
        shared.board.claim(shared.place, lambda: sum(s.open_connections() for s in servers))
    announce = shared is None or shared.owner  # one listening socket for all receiving processes: said once, by the node process
    try:
        if node.port:
            servers.append(_serve(EdgeServer(ae, (node.host, node.port), admission, None, node.acse_timeout_s, handlers, shared)))
            if announce:
                log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)
        if node.tls is not None:
            t = node.tls
            ctx = server_context(t.certificate, t.private_key, t.ca_certificates, t.require_client_certificate)
            servers.append(_serve(EdgeServer(ae, (node.host, t.port), admission, ctx, node.acse_timeout_s, handlers, shared)))
            if announce:
                log.info("listening as %s on %s:%d (DICOM TLS%s)", node.ae_title, node.host, t.port, ", client certificate required" if t.require_client_certificate else "")
    except BaseException:
        for s in servers:
            s.shutdown()
        store.close()
        raise
    return Listeners(servers, store, admission)


def _serve(server: EdgeServer) -> EdgeServer:
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer:{server.server_address[1]}", daemon=True).start()
    return server
