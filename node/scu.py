"""Destinations: DICOM C-STORE, a folder, or DICOMweb STOW-RS.

Each sender takes a batch of (delivery id, file) and reports an :class:`Outcome` per
object as soon as it is known, so that the dispatcher can commit it at once: the window
in which a crash can cause a re-send is one object per destination, and a re-send
carries the same SOP Instance UID, which archives store once. Before each object the
sender asks ``proceed(work)`` (the dispatcher's lease check) and stops at the first
False: a worker that lost its claim sends nothing more. Outcome reasons carry error
classes and statuses, never an exception's message (which may quote a header value).
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from node.config import Destination
from node.scp import tune_association
from node.spool import SHARED_FILE_MODE, folder_path, write_atomic

log = logging.getLogger(__name__)

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
        target = f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port}"
        try:
            assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, evt_handlers=handlers)
        except Exception as exc:  # DNS failures and the like
            for w in batch:
                report(w, Outcome("retry", f"cannot connect to {target} ({type(exc).__name__})"))
            return True
        if not assoc.is_established:
            outcome = Outcome("retry", f"cannot associate with {target} (connection refused, timed out or aborted)")
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


class DicomWebSender:
    """STOW-RS (PS3.18 10.5): one multipart/related POST per object."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest

    def send(self, batch: Sequence[Work], report: Report, proceed: Proceed = _always) -> None:
        url = self.dest.url.rstrip("/") + "/studies"
        for w in batch:
            if not proceed(w):
                return
            boundary = uuid.uuid4().hex
            body = (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + w.path.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode()
            )
            req = urllib.request.Request(
                url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                    "Accept": "application/dicom+json",
                },
            )
            try:
                with urllib.request.urlopen(req, timeout=self.dest.timeout_s) as rsp:
                    report(w, Outcome("sent", "" if rsp.status == 200 else f"HTTP {rsp.status}"))
            except urllib.error.HTTPError as exc:
                kind = "retry" if exc.code >= 500 or exc.code in (408, 429) else "failed"
                report(w, Outcome(kind, f"STOW-RS answered HTTP {exc.code}"))
            except (urllib.error.URLError, OSError) as exc:
                why = exc.reason if isinstance(getattr(exc, "reason", None), BaseException) else exc
                report(w, Outcome("retry", f"cannot reach {url} ({type(why).__name__})"))


def make_sender(dest: Destination, calling_ae: str, reactor_delay_s: float = 0.0002):
    if dest.kind == "dicom":
        return DicomSender(dest, calling_ae, reactor_delay_s)
    if dest.kind == "folder":
        return FolderSender(dest)
    return DicomWebSender(dest)


def echo(ae_title: str, host: str, port: int, calling_ae: str = "CASEMASK", timeout: float = 10.0) -> int | None:
    """C-ECHO a peer; returns its status, or None when no association could be made."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: tune_association(e.assoc, 0.0002))])
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()
