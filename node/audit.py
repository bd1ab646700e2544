"""The audit trail: append-only rows in the database, DICOM Audit Messages, syslog.

Every entry is written in the transaction of what it records (a quarantine and its
entry commit together), or in its own when nothing else is written (an association, a
login). The table refuses UPDATE and DELETE (triggers, see :mod:`node.db`).

Entries carry pseudonymous references only: studies by row id, rendered on export as
their pseudonymous Study Instance UID (the one the archive receives); senders by AE
title; people by account name; reasons name a step and an attribute, never a value.

Export: :func:`to_xml` renders an entry as a DICOM Audit Message (PS3.15 Annex A.5, the
schema of RFC 3881 with DICOM's coded values: ``csd-code``, ``codeSystemName``,
``originalText``); event codes from PS3.16 CID 400-405. :class:`SyslogSender` sends them
to a collector as RFC 5424 messages over UDP (RFC 5426), TCP or TLS (octet counting,
RFC 6587 / RFC 5425), as IHE ATNA does; :func:`forward` keeps a cursor in the database
so that every entry reaches the collector at least once, across restarts.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.db import AuditCursor, AuditEvent, Delivery, DeliveryState, Job, JobState, Output, Study, insert_if_absent, utcnow

log = logging.getLogger(__name__)

# EventOutcomeIndicator (RFC 3881 5.1.4)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

Code = tuple[str, str, str]  # (code, coding scheme, meaning)


@dataclasses.dataclass(frozen=True)
class Kind:
    """What an entry records, and how it reads as a DICOM Audit Message."""

    event_id: Code
    action: str  # EventActionCode: C R U D E
    type_code: Code | None = None


_DCM = "DCM"
# PS3.16 CID 400 (Audit Event ID) and CID 401 (Audit Event Type Code).
KINDS: dict[str, Kind] = {
    "association": Kind(("110113", _DCM, "Security Alert"), "E", ("110126", _DCM, "Node Authentication")),
    "study-received": Kind(("110104", _DCM, "DICOM Instances Transferred"), "C"),
    "deidentified": Kind(("110103", _DCM, "DICOM Instances Accessed"), "C"),
    "quarantined": Kind(("110103", _DCM, "DICOM Instances Accessed"), "E"),
    "sent": Kind(("110104", _DCM, "DICOM Instances Transferred"), "R"),
    "spool-dropped": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),  # never-acknowledged objects whose file a crash tore
    "job-retried": Kind(("110103", _DCM, "DICOM Instances Accessed"), "U"),
    "job-discarded": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),
    "deliveries-retried": Kind(("110103", _DCM, "DICOM Instances Accessed"), "U"),
    "held-released": Kind(("110103", _DCM, "DICOM Instances Accessed"), "U"),
    "held-purged": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),  # retention deleted held originals (held_days)
    "quarantined-purged": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),  # retention deleted quarantined originals (quarantine_days)
    "originals-purged": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),  # delivered or ignored originals (originals_days)
    "outputs-purged": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),  # delivered de-identified outputs (outputs_days)
    "failed-purged": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),  # originals and outputs of FAILED deliveries (failed_days)
    "orphans-purged": Kind(("110103", _DCM, "DICOM Instances Accessed"), "D"),  # files no row names (never acknowledged)
    "audit-purged": Kind(("110101", _DCM, "Audit Log Used"), "D"),  # retention deleted entries older than audit_days
    "config-changed": Kind(("110113", _DCM, "Security Alert"), "U", ("110131", _DCM, "Software Configuration")),
    "config-reloaded": Kind(("110113", _DCM, "Security Alert"), "E", ("110131", _DCM, "Software Configuration")),
    "mapping-exported": Kind(("110106", _DCM, "Export"), "R"),
    "mapping-purged": Kind(("110110", _DCM, "Patient Record"), "D"),
    "login": Kind(("110114", _DCM, "User Authentication"), "E", ("110122", _DCM, "Login")),
    "logout": Kind(("110114", _DCM, "User Authentication"), "E", ("110123", _DCM, "Logout")),
    "account-changed": Kind(("110113", _DCM, "Security Alert"), "U", ("110137", _DCM, "User Security Attributes Changed")),
    "node-started": Kind(("110100", _DCM, "Application Activity"), "E", ("110120", _DCM, "Application Start")),
    "node-stopped": Kind(("110100", _DCM, "Application Activity"), "E", ("110121", _DCM, "Application Stop")),
    "audit-exported": Kind(("110101", _DCM, "Audit Log Used"), "R"),
}

# PS3.16 CID 402 (Audit Active Participant Role ID Code)
ROLE_APPLICATION: Code = ("110150", _DCM, "Application")
ROLE_DESTINATION: Code = ("110152", _DCM, "Destination Role ID")
ROLE_SOURCE: Code = ("110153", _DCM, "Source Role ID")
STUDY_UID_TYPE: Code = ("110180", _DCM, "Study Instance UID")
URI_TYPE: Code = ("12", "RFC-3881", "URI")
USER_ID_TYPE: Code = ("11", "RFC-3881", "User Identifier")


# -- writing ---------------------------------------------------------------------------------
def record(
    session: Session,
    event: str,
    *,
    actor: str = "",
    actor_kind: str = "node",
    host: str = "",
    outcome: int = SUCCESS,
    study_id: int | None = None,
    object_kind: str = "",
    object_ref: str = "",
    detail: dict | None = None,
) -> AuditEvent:
    """Add one entry in the caller's transaction (committed with what it records).

    ``detail`` is JSON without PHI: counts, route and destination names, reasons.
    Raises:
        KeyError: ``event`` is not one of :data:`KINDS`.
    """
    if event not in KINDS:
        raise KeyError(f"unknown audit event {event!r}")
    entry = AuditEvent(
        at=utcnow(), event=event, outcome=outcome, actor=actor[:128], actor_kind=actor_kind, host=host[:64],
        study_id=study_id, object_kind=object_kind, object_ref=object_ref[:128], detail=json.dumps(detail or {}, sort_keys=True),
    )
    session.add(entry)
    return entry


def record_now(sessions: sessionmaker, event: str, **kw) -> bool:
    """Write one entry in its own transaction; False (logged and counted) when the
    database refused it: the action it records has happened and is not undone."""
    try:
        with sessions() as session:
            record(session, event, **kw)
            session.commit()
        return True
    except SQLAlchemyError as exc:
        from node import metrics

        metrics.AUDIT_WRITE_ERRORS.inc()
        log.error("audit entry %s could not be written (%s)", event, type(exc).__name__)
        return False


# -- entries the queue's stages write (one call at the end of a batch) ------------------------
def association(sessions: sessionmaker, calling_ae: str, host: str, called_ae: str, refusal: str = "", tls_subject: str = "") -> None:
    """An association accepted (``refusal`` empty) or rejected, with why and, over TLS,
    the certificate subject of the sender."""
    detail = {"called_ae": called_ae}
    if refusal:
        detail["reason"] = refusal
    if tls_subject:
        detail["tls_subject"] = tls_subject
    record_now(sessions, "association", actor=calling_ae, actor_kind="ae", host=host, outcome=MINOR_FAILURE if refusal else SUCCESS, object_kind="association", detail=detail)


def study_received(session: Session, study: Study, instances: int, calling_ae: str, host: str) -> None:
    """A study became stable and was routed: how many objects, from whom."""
    record(session, "study-received", actor=calling_ae, actor_kind="ae", host=host, study_id=study.id, object_kind="study", detail={"instances": instances})


def processed(session: Session, jobs: Sequence[Job]) -> None:
    """After a pipeline batch: per study and route, how many objects were de-identified
    and how many quarantined (with the first reason)."""
    groups: dict[tuple[int, str], dict] = {}
    for job in jobs:
        g = groups.setdefault((job.study_id, job.route), {"done": 0, "quarantined": 0, "reason": ""})
        if job.state == JobState.DONE:
            g["done"] += 1
        elif job.state == JobState.QUARANTINED:
            g["quarantined"] += 1
            g["reason"] = g["reason"] or job.reason
    for (study_id, route), g in groups.items():
        if g["done"]:
            record(session, "deidentified", study_id=study_id, object_kind="study", detail={"route": route, "instances": g["done"]})
        if g["quarantined"]:
            record(session, "quarantined", outcome=MINOR_FAILURE, study_id=study_id, object_kind="study", detail={"route": route, "instances": g["quarantined"], "reason": g["reason"]})


def dispatched(session: Session, destination: str, deliveries: Sequence[Delivery]) -> None:
    """After a dispatch batch: per study, how many objects reached ``destination``,
    and how many were given up (FAILED)."""
    ids = {d.output_id: d.state for d in deliveries if d.state in (DeliveryState.SENT, DeliveryState.FAILED)}
    if not ids:
        return
    rows = session.execute(select(Output.id, Job.study_id).join(Job, Job.id == Output.job_id).where(Output.id.in_(list(ids)))).all()
    counts: dict[tuple[int, DeliveryState], int] = {}
    for out_id, study_id in rows:
        key = (study_id, ids[out_id])
        counts[key] = counts.get(key, 0) + 1
    for (study_id, state), n in counts.items():
        failed = state == DeliveryState.FAILED
        record(session, "sent", outcome=SERIOUS_FAILURE if failed else SUCCESS, study_id=study_id, object_kind="study",
               detail={"destination": destination, "instances": n, **({"state": "FAILED"} if failed else {})})


# -- reading ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Filter:
    """Which entries to list: all given conditions hold."""

    event: str = ""
    actor: str = ""
    study_id: int | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    failures_only: bool = False
    after_id: int | None = None  # set (0 included): oldest first, after this id


def query(session: Session, f: Filter, limit: int = 200) -> list[AuditEvent]:
    """Entries matching ``f``, newest first (or, with ``after_id``, oldest first after it)."""
    q = select(AuditEvent)
    if f.event:
        q = q.where(AuditEvent.event == f.event)
    if f.actor:
        q = q.where(AuditEvent.actor == f.actor)
    if f.study_id is not None:
        q = q.where(AuditEvent.study_id == f.study_id)
    if f.since:
        q = q.where(AuditEvent.at >= f.since)
    if f.until:
        q = q.where(AuditEvent.at <= f.until)
    if f.failures_only:
        q = q.where(AuditEvent.outcome != SUCCESS)
    if f.after_id is not None:
        q = q.where(AuditEvent.id > f.after_id).order_by(AuditEvent.id)
    else:
        q = q.order_by(AuditEvent.id.desc())
    return list(session.scalars(q.limit(limit)))


def study_uids(session: Session, events: Iterable[AuditEvent], uid_of: Callable[[str], str] | None) -> dict[int, str]:
    """Pseudonymous Study Instance UID per study row id named by ``events``."""
    ids = {e.study_id for e in events if e.study_id is not None}
    if not ids or uid_of is None:
        return {}
    return {sid: uid_of(uid) for sid, uid in session.execute(select(Study.id, Study.study_uid).where(Study.id.in_(ids)))}


def as_dict(e: AuditEvent, study_uid: str | None = None) -> dict:
    return {
        "id": e.id, "at": e.at.isoformat() + "Z", "event": e.event, "outcome": e.outcome, "actor": e.actor,
        "actor_kind": e.actor_kind, "host": e.host, "study_id": e.study_id, "study_uid": study_uid,
        "object_kind": e.object_kind, "object_ref": e.object_ref, "detail": json.loads(e.detail or "{}"),
    }


# -- DICOM Audit Message (PS3.15 A.5, RFC 3881) -------------------------------------------------
def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def _participant(parent: ET.Element, user_id: str, requestor: bool, role: Code | None, host: str = "", alt: str = "") -> None:
    attrs = {"UserID": user_id or "-", "UserIsRequestor": "true" if requestor else "false"}
    if alt:
        attrs["AlternativeUserID"] = alt
    if host:
        attrs["NetworkAccessPointID"] = host
        attrs["NetworkAccessPointTypeCode"] = "2" if _is_address(host) else "1"
    ap = ET.SubElement(parent, "ActiveParticipant", attrs)
    if role:
        _code(ap, "RoleIDCode", role)


def _is_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _object(parent: ET.Element, object_id: str, type_code: str, role: str, id_type: Code, details: dict) -> None:
    po = ET.SubElement(parent, "ParticipantObjectIdentification", {
        "ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code, "ParticipantObjectTypeCodeRole": role,
    })
    _code(po, "ParticipantObjectIDTypeCode", id_type)
    for key, value in details.items():
        if key == "reason":
            continue
        ET.SubElement(po, "ParticipantObjectDetail", {"type": key, "value": base64.b64encode(str(value).encode()).decode()})


@dataclasses.dataclass(frozen=True)
class Source:
    """Who writes the messages: AuditSourceID (the node's AE title) and the site."""

    node_ae: str
    site: str = ""


def to_xml(e: AuditEvent, source: Source, study_uid: str | None = None) -> bytes:
    """One entry as a DICOM Audit Message (UTF-8 XML, no declaration)."""
    kind = KINDS[e.event]
    detail = json.loads(e.detail or "{}")
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": kind.action, "EventDateTime": e.at.isoformat(timespec="milliseconds") + "Z", "EventOutcomeIndicator": str(e.outcome),
    })
    _code(ev, "EventID", kind.event_id)
    if kind.type_code:
        _code(ev, "EventTypeCode", kind.type_code)
    if e.outcome != SUCCESS and detail.get("reason"):
        ET.SubElement(ev, "EventOutcomeDescription").text = str(detail["reason"])
    node_role = ROLE_APPLICATION
    if e.actor_kind == "ae":  # a sender: it is the source, the node the destination
        _participant(root, e.actor, True, ROLE_SOURCE, e.host)
        node_role = ROLE_DESTINATION
    elif e.actor_kind in ("user", "token", "cli"):
        _participant(root, e.actor, True, None, e.host)
    if e.event == "sent":
        _participant(root, source.node_ae, e.actor_kind == "node", ROLE_SOURCE, alt=str(os.getpid()))
        _participant(root, str(detail.get("destination", "")), False, ROLE_DESTINATION)
    else:
        _participant(root, source.node_ae, e.actor_kind == "node", node_role, alt=str(os.getpid()))
    src = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source.node_ae, **({"AuditEnterpriseSiteID": source.site} if source.site else {})})
    _code(src, "AuditSourceTypeCode", ("4", "RFC-3881", "Application Server Process"))  # RFC 3881 5.4.3: 4, application server process tier
    if e.study_id is not None:
        _object(root, study_uid or f"study-row:{e.study_id}", "2", "3", STUDY_UID_TYPE, detail)
    elif e.object_kind in ("user", "token"):
        _object(root, e.object_ref, "1" if e.object_kind == "user" else "2", "11", USER_ID_TYPE, detail)
    elif e.object_kind:
        _object(root, e.object_ref or e.object_kind, "2", "13" if e.object_kind in ("config", "audit") else "3", URI_TYPE, detail)
    return ET.tostring(root, encoding="utf-8")


def export_xml(events: Sequence[AuditEvent], source: Source, uids: dict[int, str]) -> bytes:
    """Several messages in one document: ``<AuditMessages>`` around each message."""
    parts = [b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<AuditMessages>\n"]
    for e in events:
        parts.append(to_xml(e, source, uids.get(e.study_id or -1)) + b"\n")
    parts.append(b"</AuditMessages>\n")
    return b"".join(parts)


# -- syslog (RFC 5424) ----------------------------------------------------------------------
FACILITY_AUTHPRIV = 10
MSGID = "IHE+RFC-3881"


def syslog_message(e: AuditEvent, xml: bytes, hostname: str, app: str = "casemask") -> bytes:
    """An RFC 5424 message carrying ``xml``: PRI, version 1, timestamp, host, app,
    process id, MSGID ``IHE+RFC-3881``, no structured data, BOM then UTF-8 XML."""
    severity = 5 if e.outcome == SUCCESS else 4  # notice | warning
    pri = FACILITY_AUTHPRIV * 8 + severity
    ts = e.at.isoformat(timespec="milliseconds") + "Z"
    head = f"<{pri}>1 {ts} {_printable(hostname, 255)} {app} {os.getpid()} {MSGID} - "
    return head.encode("ascii") + b"\xef\xbb\xbf" + xml


def _printable(text: str, limit: int) -> str:
    out = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return out or "-"


class SyslogSender:
    """Sends messages to one collector; a TCP or TLS connection is kept open and
    reopened after an error. ``send`` raises OSError when a message may not have gone."""

    def __init__(self, host: str, port: int, transport: str = "udp", ca_file: Path | None = None, timeout_s: float = 5.0) -> None:
        self.host, self.port, self.transport = host, port, transport
        self.ca_file, self.timeout_s = ca_file, timeout_s
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.transport == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        if self.transport == "tls":
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            sock = ctx.wrap_socket(sock, server_hostname=self.host)
        return sock

    def send(self, message: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        try:
            if self.transport == "udp":
                self._sock.send(message)
            else:  # octet counting (RFC 6587 3.4.1, RFC 5425 4.3)
                self._sock.sendall(f"{len(message)} ".encode() + message)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Forwarder:
    """Sends the trail to a collector from the node's scheduler: :func:`forward` while
    the collector answers; after a failure, one try every ``retry_s`` seconds, and one
    log line when it goes away and one when it is back (not one per try)."""

    def __init__(self, sessions: sessionmaker, sender: SyslogSender, source: Source, uid_of: Callable[[str], str] | None, retry_s: float = 5.0) -> None:
        self.sessions, self.sender, self.source, self.uid_of, self.retry_s = sessions, sender, source, uid_of, retry_s
        self.down_since: float | None = None
        self._next_try = 0.0

    def run_once(self) -> int:
        import time

        now = time.monotonic()
        if now < self._next_try:
            return 0
        try:
            n = forward(self.sessions, self.sender, self.source, self.uid_of)
        except OSError as exc:
            if self.down_since is None:
                self.down_since = now
                log.warning("audit: syslog collector %s:%d out of reach (%s); entries wait in the database", self.sender.host, self.sender.port, type(exc).__name__)
            self._next_try = now + self.retry_s
            return 0
        if self.down_since is not None:
            log.info("audit: syslog collector %s:%d reachable again after %.0f s", self.sender.host, self.sender.port, now - self.down_since)
            self.down_since = None
        return n

    def flush(self) -> int:
        """Try now, whatever the retry delay (at stop)."""
        self._next_try = 0.0
        return self.run_once()

    def close(self) -> None:
        self.sender.close()


def forward(sessions: sessionmaker, sender: SyslogSender, source: Source, uid_of: Callable[[str], str] | None, sink: str = "syslog", batch: int = 200) -> int:
    """Send the entries after the sink's cursor, oldest first, and move the cursor after
    each one; returns how many were sent. At least once: a crash between send and commit
    re-sends one.

    Raises:
        OSError: the collector is out of reach (what was sent before is committed).
    """
    hostname = socket.gethostname()
    sent = 0
    with sessions() as session:
        insert_if_absent(session, AuditCursor, [{"sink": sink, "last_id": 0}])
        session.commit()
        # One forwarder at a time per sink when several workers share the database
        # (PostgreSQL: the others skip the locked cursor and send nothing this time).
        cursor = session.scalars(select(AuditCursor).where(AuditCursor.sink == sink).with_for_update(skip_locked=True)).first()
        if cursor is None:
            return 0
        events = _committed_in_order(query(session, Filter(after_id=cursor.last_id), limit=batch), cursor.last_id)
        uids = study_uids(session, events, uid_of)
        try:
            for e in events:
                sender.send(syslog_message(e, to_xml(e, source, uids.get(e.study_id or -1)), hostname))
                cursor.last_id = e.id
                sent += 1
        finally:
            session.commit()
    return sent


# How long the forwarder waits for a missing entry id before it passes over it.
GAP_WAIT_S = 60.0


def _committed_in_order(events: Sequence[AuditEvent], last_id: int) -> list[AuditEvent]:
    """The leading ``events`` (ids after ``last_id``, in order) that may be sent now.

    Ids are handed out when an entry is inserted, not when its transaction commits: on
    PostgreSQL an entry with a smaller id may still be on its way while a later one is
    visible, and a cursor moved past the later one would never send it. So the events
    are taken while their ids follow on without a gap; an entry after a gap is taken
    only once it is GAP_WAIT_S old (the missing id then belongs to a transaction that
    rolled back, which leaves a gap for good)."""
    ready: list[AuditEvent] = []
    expected = last_id + 1
    now = utcnow()
    for e in events:
        if e.id != expected and (now - e.at).total_seconds() < GAP_WAIT_S:
            break
        ready.append(e)
        expected = e.id + 1
    return ready


def pending(session: Session, sink: str = "syslog") -> int:
    """Entries not yet sent to ``sink``."""
    cursor = session.get(AuditCursor, sink)
    return int(session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.id > (cursor.last_id if cursor else 0))) or 0)
