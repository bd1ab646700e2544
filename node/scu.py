"""Destinations: DICOM C-STORE (optionally over DICOM TLS), a folder, or DICOMweb
STOW-RS (dicomweb-client, HTTPS).

Each sender takes a batch of (delivery id, file) and reports an :class:`Outcome` per
object as soon as it is known, so that the dispatcher can commit it at once: the window
in which a crash can cause a re-send is one object per destination, and a re-send
carries the same SOP Instance UID, which archives store once. Before each object the
sender asks ``proceed(work)`` (the dispatcher's lease check) and stops at the first
False: a worker that lost its claim sends nothing more. Outcome reasons carry error
classes and statuses, never an exception's message (which may quote a header value),
and the OS's words for a connection that failed (``Connection refused``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from node.config import Destination, DicomWebAuth, hide_credentials
from node.health import stow_meaning
from node.scp import tune_association
from node.tls import client_context
from node.spool import SHARED_FILE_MODE, folder_path, write_atomic

log = logging.getLogger(__name__)


class _ConnectFailures(logging.Filter):
    """pynetdicom logs two ERROR lines for each connection it cannot open ("Association
    request failed: unable to connect to remote", "TCP Initialisation Error: ...") on
    top of the node's own line naming the destination. This filter on
    ``pynetdicom.transport`` drops both and keeps the cause, the OS's words ("Connection
    refused", "timed out"), for the sender to put in its reason (:meth:`cause`), keyed by
    the name of the thread that connected, the association's DUL thread ("Thread-N
    (run_reactor)": numbered once per process, where a thread's ident is reused)."""

    _ERRNO = re.compile(r"\[Errno \d+\] ([A-Za-z ,'-]+)$")

    def __init__(self) -> None:
        super().__init__()
        self._causes: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        debug = logging.getLogger("pynetdicom.transport").isEnabledFor(logging.DEBUG)  # -vv: pynetdicom's own words too
        if text == "Association request failed: unable to connect to remote":
            return debug
        if text.startswith("TCP Initialisation Error: "):
            m = self._ERRNO.search(text)
            self._causes[record.threadName] = m.group(1) if m else ("timed out" if "timed out" in text else "TLS handshake failed" if "SSL" in text else "connection failed")
            return debug
        return True

    def cause(self, assoc) -> str | None:
        """Why ``assoc`` (not established) could not connect, once; None when it did connect."""
        name = getattr(getattr(assoc, "dul", None), "name", None)
        return None if name is None else self._causes.pop(name, None)


CONNECT_FAILURES = _ConnectFailures()
logging.getLogger("pynetdicom.transport").addFilter(CONNECT_FAILURES)


class _RejectionLines(logging.Filter):
    """pynetdicom logs three ERROR lines when a peer rejects an association it requested
    ("Association Rejected", "Result: ..., Source: ...", "Reason: ..."): for a destination
    whose AE title is wrong, at every delivery attempt and every 30 s health check, on
    top of the node's own line that names the destination and the same result and reason
    (the delivery's reason, the health detail). This filter on ``pynetdicom.acse`` drops
    those three unless its DEBUG is on (-vv)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("pynetdicom.acse").isEnabledFor(logging.DEBUG):
            return True
        text = record.getMessage()
        return not (text == "Association Rejected" or (text.startswith("Result: ") and ", Source: " in text) or text.startswith("Reason: "))


logging.getLogger("pynetdicom.acse").addFilter(_RejectionLines())

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # sent | retry | failed
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Work:
    key: int
    path: Path
    sop_class_uid: str
    transfer_syntax: str


Report = Callable[[Work, Outcome], None]
Proceed = Callable[[Work], bool]


def _always(_w: Work) -> bool:
    return True


def classify_status(status: int) -> Outcome:
    """C-STORE response status -> what to do (PS3.4 Table B.2-1, PS3.7 Annex C)."""
    if status == 0x0000 or 0xB000 <= status <= 0xB0FF:
        return Outcome("sent", "" if status == 0 else f"warning 0x{status:04X}")
    if 0xA700 <= status <= 0xA7FF:
        return Outcome("retry", f"out of resources (0x{status:04X})")
    if 0xA900 <= status <= 0xA9FF:
        return Outcome("failed", f"data set does not match SOP class (0x{status:04X})")
    if 0xC000 <= status <= 0xCFFF:
        return Outcome("failed", f"cannot understand (0x{status:04X})")
    if status == 0x0122:
        return Outcome("failed", "SOP class not supported (0x0122)")
    if status in (0x0210, 0x0211, 0x0212):
        return Outcome("retry", f"duplicate invocation or unrecognised operation (0x{status:04X})")
    return Outcome("failed", f"failure status 0x{status:04X}")


class DicomSender:
    """C-STORE SCU with TCP_NODELAY, proposing each object's own transfer syntax and
    an uncompressed fallback (decompressing when the peer takes only that)."""

    def __init__(self, dest: Destination, calling_ae: str, reactor_delay_s: float = 0.0002) -> None:
        self.dest = dest
        self.calling_ae = dest.calling_ae or calling_ae
        self.reactor_delay_s = reactor_delay_s
        self._tls: ssl.SSLContext | None = None

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """DICOM TLS towards the destination (its certificate and host name verified),
        when its ``tls`` table is set.

        Raises:
            OSError, ssl.SSLError: a certificate or key cannot be read.
        """
        t = self.dest.tls
        if t is None:
            return None
        if self._tls is None:
            self._tls = client_context(t.ca_certificates, t.certificate, t.private_key)
        return self._tls, self.dest.host

    def _contexts(self, batch: Sequence[Work]):
        wanted: dict[str, set[str]] = {}
        for w in batch:
            wanted.setdefault(w.sop_class_uid, set()).add(w.transfer_syntax)
        contexts = []
        for sop_class, syntaxes in wanted.items():
            # One context per syntax, so that the peer's answer says exactly which of the
            # object's own syntax and the uncompressed fallbacks it takes.
            for ts in sorted(syntaxes | set(UNCOMPRESSED)):
                contexts.append(build_context(sop_class, [ts]))
        return contexts

    def send(self, batch: Sequence[Work], report: Report, proceed: Proceed = _always) -> None:
        # At most 128 presentation contexts per association (PS3.8 9.3.2.2).
        groups: list[list[Work]] = []
        current: list[Work] = []
        classes: set[str] = set()
        for w in batch:
            if w.sop_class_uid not in classes and len(classes) >= 40:
                groups.append(current)
                current, classes = [], set()
            classes.add(w.sop_class_uid)
            current.append(w)
        if current:
            groups.append(current)
        for group in groups:
            if not self._send_group(group, report, proceed):
                return

    def _send_group(self, batch: Sequence[Work], report: Report, proceed: Proceed = _always) -> bool:
        """Send one association's worth; False when ``proceed`` said to stop."""
        ae = AE(ae_title=self.calling_ae)
        ae.requested_contexts = self._contexts(batch)
        ae.acse_timeout = self.dest.timeout_s
        ae.dimse_timeout = self.dest.timeout_s
        ae.network_timeout = self.dest.timeout_s
        handlers = [(evt.EVT_CONN_OPEN, lambda e: tune_association(e.assoc, self.reactor_delay_s))]
        target = f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port}" + (" (TLS)" if self.dest.tls else "")
        try:
            tls_args = self._tls_args()
        except (OSError, ssl.SSLError) as exc:
            for w in batch:
                report(w, Outcome("retry", f"cannot load the TLS certificates for {target} ({type(exc).__name__})"))
            return True
        try:
            assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, evt_handlers=handlers, tls_args=tls_args)
        except ssl.SSLError as exc:  # the destination's certificate did not verify
            for w in batch:
                report(w, Outcome("retry", f"TLS with {target} failed ({getattr(exc, 'reason', None) or type(exc).__name__})"))
            return True
        except Exception as exc:  # DNS failures and the like
            for w in batch:
                report(w, Outcome("retry", f"cannot connect to {target} ({type(exc).__name__})"))
            return True
        if not assoc.is_established:
            cause = CONNECT_FAILURES.cause(assoc)
            outcome = Outcome("retry", f"cannot connect to {target} ({cause})" if cause else f"cannot associate with {target} (timed out or aborted)")
            if assoc.is_rejected:
                rsp = assoc.acceptor.primitive
                result = getattr(rsp, "result", 0x02)
                why = f"association rejected by {target}: {getattr(rsp, 'result_str', '')} / {getattr(rsp, 'reason_str', '')}"
                outcome = Outcome("failed" if result == 0x01 else "retry", why)
            log.debug("destination %s: %s", self.dest.name, outcome.reason)  # the dispatcher logs the state change
            for w in batch:
                report(w, outcome)
            return True
        log.info("association with %s: established (%d objects)", target, len(batch))
        try:
            for k, w in enumerate(batch):
                if not assoc.is_established:
                    for rest in batch[k:]:
                        report(rest, Outcome("retry", f"association with {target} was lost"))
                    return True
                if not proceed(w):
                    return False
                report(w, self._store(assoc, w))
            return True
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc, w: Work) -> Outcome:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        try:
            ds = dcmread(w.path)
        except Exception as exc:
            return Outcome("failed", f"outbox file unreadable ({type(exc).__name__})")
        if (w.sop_class_uid, w.transfer_syntax) not in accepted:
            fallback = next((ts for ts in UNCOMPRESSED if (w.sop_class_uid, ts) in accepted), None)
            if fallback is None:
                return Outcome("failed", f"peer accepts SOP class {w.sop_class_uid} in no transfer syntax we can send")
            try:
                ds = _reencode(ds, UID(w.transfer_syntax), fallback)
            except Exception as exc:
                return Outcome("failed", f"cannot convert to {fallback.name} for the peer ({type(exc).__name__})")
        try:
            status = assoc.send_c_store(ds)
        except Exception as exc:
            return Outcome("retry", f"C-STORE failed ({type(exc).__name__})")
        if not status or "Status" not in status:
            return Outcome("retry", "no C-STORE response (timeout or abort)")
        return classify_status(int(status.Status))


def _reencode(ds, source: UID, target: UID):
    """The dataset in an uncompressed ``target`` syntax (decompressing if needed)."""
    import io

    if source.is_compressed:
        ds.decompress()
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = target
    ds.save_as(buf, implicit_vr=target == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


class FolderSender:
    """Writes each object atomically to ``path/<study>/<series>/<instance>.dcm``, each
    name the digest of that UID (:func:`node.spool.folder_path`), files 0640."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest

    def send(self, batch: Sequence[Work], report: Report, proceed: Proceed = _always) -> None:
        root = Path(self.dest.path)  # type: ignore[arg-type]
        for w in batch:
            if not proceed(w):
                return
            try:
                ds = dcmread(w.path, stop_before_pixels=True)
                write_atomic(folder_path(root, ds), w.path.read_bytes(), mode=SHARED_FILE_MODE, dir_mode=0o750)
                report(w, Outcome("sent"))
            except OSError as exc:
                report(w, Outcome("retry", f"cannot write to {root}: {exc.strerror or type(exc).__name__}"))
            except Exception as exc:
                report(w, Outcome("failed", f"cannot store ({type(exc).__name__})"))


# What a destination's HTTP answer may take (STOW-RS, the health probe), whatever the
# per-read timeout: a Store Instances Response for one object is a few kilobytes.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
ANSWER_TIMEOUTS = 4  # the whole exchange within this many per-read timeouts ...
MIN_UPLOAD_RATE = 64 * 1024  # ... plus the request's body at this many bytes per second


class AnswerTooLarge(requests.exceptions.RequestException):
    """The destination's answer is over :data:`MAX_ANSWER_BYTES`."""


class AnswerTooSlow(requests.exceptions.RequestException):
    """The destination did not answer whole within the exchange's deadline."""


_watched = threading.local()  # the _Watch of the exchange running on this thread, if any


class _Watch:
    """The connections of one HTTP exchange, shut down by a timer at its deadline: the
    per-read timeout alone let a server trickle its answer a byte at a time for ever."""

    def __init__(self, deadline_s: float) -> None:
        self.fired = False
        self._socks: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(deadline_s, self._fire)
        self._timer.daemon = True

    def add(self, sock) -> None:
        with self._lock:
            if sock is not None and sock not in self._socks:
                self._socks.append(sock)
            if self.fired:
                self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._socks:
                self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked on another thread
        except OSError:
            pass

    def __enter__(self) -> _Watch:
        _watched.current = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _watched.current = None


def _watched_connection(base):
    """``base`` (urllib3's HTTP(S)Connection) whose socket joins the running exchange's
    :class:`_Watch` when a request is sent on it and when its answer is read (a pooled
    connection is reused without a new socket)."""

    class Watched(base):
        def request(self, *args, **kwargs):
            out = super().request(*args, **kwargs)
            self._join()
            return out

        def getresponse(self, *args, **kwargs):
            self._join()
            return super().getresponse(*args, **kwargs)

        def _join(self) -> None:
            watch = getattr(_watched, "current", None)
            if watch is not None:
                watch.add(self.sock)

    Watched.__name__ = f"Watched{base.__name__}"
    return Watched


def _watched_pool(base):
    return type(f"Watched{base.__name__}", (base,), {"ConnectionCls": _watched_connection(base.ConnectionCls)})


class _BoundedAnswers(requests.adapters.HTTPAdapter):
    """HTTP(S) whose answers are bounded whole: read within ``ANSWER_TIMEOUTS`` per-read
    timeouts (plus ``upload_bytes`` at :data:`MIN_UPLOAD_RATE`) of the request, at most
    :data:`MAX_ANSWER_BYTES` of body read (requests read a body whole, however long).
    A streamed request (the health probe) is bounded up to its headers; its body is the
    caller's. HTTPS with a context of :mod:`node.tls` (TLS 1.2+, BCP 195 suites,
    trusting only the destination's ``ca_certificates`` when it names them) when given.

    Raises (from ``send``): :class:`AnswerTooSlow`, :class:`AnswerTooLarge` (both
    ``requests.exceptions.RequestException``)."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self._context = context
        self.upload_bytes = 0  # the next request's body size, when it is sent in chunks (unknown here)
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        if self._context is not None:
            kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _watched_pool(HTTPConnectionPool), "https": _watched_pool(HTTPSConnectionPool)}

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        per_read = timeout[1] if isinstance(timeout, tuple) else timeout
        body = request.body if isinstance(request.body, (bytes, str)) else b""
        deadline = ANSWER_TIMEOUTS * float(per_read or 60.0) + (len(body) + self.upload_bytes) / MIN_UPLOAD_RATE
        with _Watch(deadline) as watch:
            try:
                response = super().send(request, stream=True, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
                if not stream:
                    _read_bounded(response)
            except requests.exceptions.RequestException:
                if watch.fired:
                    raise AnswerTooSlow(f"no whole answer within {deadline:.0f} s") from None
                raise
            if watch.fired:  # the shutdown reads as the answer's end: what came is not the answer
                response.close()
                raise AnswerTooSlow(f"no whole answer within {deadline:.0f} s")
        return response


def _read_bounded(response) -> None:
    """Read ``response``'s body as requests would (``content``), refusing one over
    :data:`MAX_ANSWER_BYTES`."""
    body = bytearray()
    for chunk in response.iter_content(65536):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            response.close()
            raise AnswerTooLarge(f"an answer over {MAX_ANSWER_BYTES >> 20} MiB")
    response._content = bytes(body)
    response._content_consumed = True


class _Bearer(requests.auth.AuthBase):
    """``Authorization: Bearer <token>``; the token never appears in a repr or a log."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "Bearer(<hidden>)"


def _secret(auth: DicomWebAuth) -> str:
    """The token or password of a dicomweb destination, from its file or environment
    variable.

    Raises:
        LookupError: the file or the variable is missing or empty (the message names it,
            never its content).
    """
    if auth.secret_file is not None:
        try:
            value = Path(auth.secret_file).read_text().strip()
        except OSError as exc:
            raise LookupError(f"cannot read auth.secret_file {auth.secret_file} ({type(exc).__name__})") from None
    else:
        value = os.environ.get(auth.secret_env, "").strip()
    if not value:
        raise LookupError(f"auth secret is empty ({'file ' + str(auth.secret_file) if auth.secret_file else 'environment variable ' + auth.secret_env})")
    return value


def dicomweb_session(dest: Destination) -> requests.Session:
    """The HTTP session a dicomweb destination is reached with (STOW-RS and the health
    probe alike): certificate verification with ``tls.ca_certificates`` (or the system's
    CAs), the optional client certificate, bearer or basic ``auth``, no redirect followed.

    Raises:
        LookupError: the auth secret's file or variable is missing or empty.
        OSError, ssl.SSLError: the TLS certificates cannot be loaded.
    """
    session = requests.Session()
    # Only the destination's own settings decide what is trusted: no CA bundle,
    # proxy or .netrc credentials from the environment (REQUESTS_CA_BUNDLE would
    # silently replace ca_certificates).
    session.trust_env = False
    # A redirect is never followed: requests turns a POST answered 301/302 into a GET,
    # whose 200 would read as stored. TooManyRedirects: retried, and visible.
    session.max_redirects = 0
    t = dest.tls
    session.verify = str(t.ca_certificates) if t is not None and t.ca_certificates else True
    if t is not None and t.certificate is not None:
        session.cert = (str(t.certificate), str(t.private_key))
    session.mount("https://", _BoundedAnswers(client_context(t.ca_certificates if t else None)))
    session.mount("http://", _BoundedAnswers())
    a = dest.auth
    if a is not None:
        secret = _secret(a)
        session.auth = _Bearer(secret) if a.kind == "bearer" else requests.auth.HTTPBasicAuth(a.username, secret)
    return session


class DicomWebSender:
    """STOW-RS (PS3.18 10.5) with dicomweb-client: one request per object, over HTTPS
    with certificate verification (``tls.ca_certificates``, or the system's CAs) and an
    optional client certificate, bearer or basic authentication from ``auth``.
    dicomweb-client's own retries are off: the dispatcher retries with its backoff."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest
        self._client = None
        self._adapters: list[_BoundedAnswers] = []

    def _make_client(self):
        from dicomweb_client.api import DICOMwebClient

        session = dicomweb_session(self.dest)
        self._adapters = [a for a in session.adapters.values() if isinstance(a, _BoundedAnswers)]
        client = DICOMwebClient(url=self.dest.url.rstrip("/"), session=session, timeout=self.dest.timeout_s)
        client.set_http_retry_params(retry=False)
        return client

    def send(self, batch: Sequence[Work], report: Report, proceed: Proceed = _always) -> None:
        url = hide_credentials(self.dest.url.rstrip("/") + "/studies")  # for reasons only: a user:password@ in it is never said
        if self._client is None:
            try:
                self._client = self._make_client()
            except (LookupError, OSError, ssl.SSLError) as exc:
                why = str(exc) if isinstance(exc, LookupError) else f"cannot load the TLS certificates ({type(exc).__name__})"
                for w in batch:
                    report(w, Outcome("retry", why))
                return
        client, adapters = self._client, self._adapters  # this batch's, even once a refusal drops it for the next
        for w in batch:
            if not proceed(w):
                return
            try:
                ds = dcmread(w.path)
            except Exception as exc:
                report(w, Outcome("failed", f"outbox file unreadable ({type(exc).__name__})"))
                continue
            try:
                for adapter in adapters:  # the answer's deadline counts the upload (dicomweb-client sends it in chunks)
                    adapter.upload_bytes = w.path.stat().st_size
                result = client.store_instances([ds])
            except requests.exceptions.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                kind = "retry" if code >= 500 or code in (408, 429) else "failed"
                if code in (401, 403):
                    # Credentials refused: the next batch reads auth's file or variable again, so
                    # that fixing it and `casemask retry` is enough (it was read once per start).
                    self._client = None
                report(w, Outcome(kind, f"STOW-RS answered HTTP {code}: {stow_meaning(code)}"))
                continue
            except requests.exceptions.SSLError:
                report(w, Outcome("retry", f"TLS with {url} failed (certificate not verified?)"))
                continue
            except (requests.exceptions.RequestException, OSError) as exc:
                report(w, Outcome("retry", f"cannot reach {url} ({type(exc).__name__})"))
                continue
            except Exception as exc:  # the answer could not be read as a Store Instances Response
                report(w, Outcome("retry", f"STOW-RS answer unreadable ({type(exc).__name__})"))
                continue
            report(w, stow_outcome(result, str(ds.get("SOPInstanceUID", "") or "")))


def stow_outcome(result, sop_instance_uid: str) -> Outcome:
    """What a STOW-RS answer with a success status (2xx) says about one object (PS3.18
    10.5.3): sent only when its Store Instances Response lists the object among the
    stored (ReferencedSOPSequence); failed when it lists it as refused
    (FailedSOPSequence). An answer that says neither (an empty body, a proxy's page)
    stored nothing that can be trusted: retried, never taken for SENT, since retention
    then deletes the original and the output."""
    failed = result.get("FailedSOPSequence") if result is not None else None
    if failed:
        reason = failed[0].get("FailureReason", "")
        return Outcome("failed", f"STOW-RS refused the object (failure reason {reason})")
    stored = result.get("ReferencedSOPSequence") if result is not None else None
    if stored and any(str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid for item in stored):
        return Outcome("sent")
    return Outcome("retry", "STOW-RS answered without listing the object as stored (ReferencedSOPSequence)")


def make_sender(dest: Destination, calling_ae: str, reactor_delay_s: float = 0.0002):
    if dest.kind == "dicom":
        return DicomSender(dest, calling_ae, reactor_delay_s)
    if dest.kind == "folder":
        return FolderSender(dest)
    return DicomWebSender(dest)


def _rejection(assoc) -> str:
    """What a peer said in its A-ASSOCIATE-RJ (PS3.8 9.3.4: result, source, reason),
    e.g. ``association rejected (Rejected Permanent: Called AE title not recognised)``."""
    rsp = getattr(assoc.acceptor, "primitive", None)
    try:
        return f"association rejected ({rsp.result_str}: {rsp.reason_str})"
    except (AttributeError, KeyError, TypeError, ValueError):  # a reply without a known result or reason
        return "association rejected"


def echo(ae_title: str, host: str, port: int, calling_ae: str = "CASEMASK", timeout: float = 10.0, why: list[str] | None = None) -> int | None:
    """C-ECHO a peer; returns its status, or None when no association could be made (then
    ``why``, when given, gets what is known: the connection's failure, or a rejection)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: tune_association(e.assoc, 0.0002))])
    if not assoc.is_established:
        cause = CONNECT_FAILURES.cause(assoc)  # the caller says it, in its own line
        if why is not None:
            why.append(f"cannot connect: {cause}" if cause else _rejection(assoc) if assoc.is_rejected else "timed out or aborted")
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()
