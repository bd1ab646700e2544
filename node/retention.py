"""Retention: delete the files that hold patient data (or were made from it) once they
are no longer needed, and keep the rows (UIDs and states, no PHI) for the audit trail.

``[retention]`` (days; -1 keeps for ever):

- ``originals_days`` (default 0): a received object is deleted from the spool that many
  days after every output of every route made from it was SENT to every destination;
  an object that matched no route with ``unrouted = "discard"`` (IGNORED), that many
  days after that.
- ``outputs_days`` (default 0): a de-identified file is deleted from the outbox that
  many days after it was delivered to every destination.
- ``quarantine_days`` (default 30): a quarantined original is kept that long for review
  (``casemask retry --quarantined``), then deleted.
- ``held_days`` (default 30): an object that matched no route with ``unrouted = "hold"``
  (HELD) waits that long for a route (a reload or restart with new routes, ``casemask
  retry --held``), then its original is deleted; the row stays HELD, marked purged, with
  a reason saying so, and each study's deletion is audited (``held-purged``, the count
  only). Before, held originals had no limit at all.
- ``mapping_days`` (default 30): a row of the pseudonym mapping (original Patient ID,
  Patient's Name, UIDs -> pseudonyms; :mod:`node.mapping`) is deleted that many days
  after it was last met; 0 stores none. Each run that deletes rows is audited
  (``mapping-purged``, the count only).
- ``unconfigured_days`` (default 30): a delivery owed to a destination that was removed
  from the configuration is marked UNCONFIGURED at each run (PENDING again if the
  destination comes back, :func:`node.queue.sort_unconfigured`); that many days later it
  counts as done for the two rules above, so its output, and its original once nothing
  else is owed to a configured destination, are deleted then.

- ``failed_days`` (default -1: kept): an original and its outputs with a dead-letter
  (FAILED) delivery are kept until the delivery is re-queued and sent, or, with a
  number, that many days after its last attempt; while any is kept, each run counts them
  (:func:`failed_kept`: ``casemask status``, ``casemask purge``) and a warning is logged
  once a day.
- ``audit_days`` (default 2190): audit entries older than that are deleted (never
  younger than 365 days: the database refuses; with syslog, only entries sent).

Every deletion is audited in the transaction that marks its rows: one entry per study
and kind (``originals-purged``, ``outputs-purged``, ``quarantined-purged``,
``held-purged``, ``failed-purged``: the count and the setting), ``orphans-purged``,
``mapping-purged`` and ``audit-purged`` (counts only).

Spooled files that no row names (left by a crash between
writing a file and committing its row: never acknowledged, and the sender did not send
it again), and outbox files no output row names (a worker stopped before committing
them), are deleted after :data:`ORPHAN_GRACE_S`.

A file is deleted only if it lies inside the data folder's ``spool`` or ``outbox`` and
is not a symbolic link; nothing is ever overwritten. The row is claimed first
(``purged_at`` set under its lock, only while it is still due), then the file goes, then
the transaction commits, so a re-send racing the run keeps its file, and a crash in
between leaves a mark to set again, never a forgotten file. Times come from the
database's clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import and_, case, delete, false, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError, InternalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from node import audit, mapping, queue
from node.config import AUDIT_MIN_DAYS, Settings
from node.db import AuditCursor, AuditEvent, Delivery, DeliveryState, Instance, InstanceState, Job, Output, data_path, db_now

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 24 * 3600.0  # a spooled file without a row for this long is an orphan
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DIGEST = re.compile(r"[0-9a-f]{32}")  # node.spool.digest


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A file retention would delete, and why (its ``kind``, see :data:`PURGED`)."""

    kind: str  # original | failed | quarantined | held | output | failed-output | orphan
    row_id: int | None
    path: Path


@dataclasses.dataclass(frozen=True)
class FailedKept:
    """Originals kept because a delivery of an output made from them is FAILED (dead
    letter) and ``failed_days`` has not deleted them: how many, and the age in days of
    the oldest such delivery's last attempt."""

    count: int
    oldest_days: float


@dataclasses.dataclass
class Report:
    """What one run deleted (or, dry, would delete): files and bytes per kind."""

    files: Counter = dataclasses.field(default_factory=Counter)
    bytes: Counter = dataclasses.field(default_factory=Counter)
    refused: int = 0  # paths outside the spool/outbox, or links: never touched
    mapping_rows: int = 0  # rows of the pseudonym mapping deleted (or due)
    audit_rows: int = 0  # audit trail entries deleted (or due)
    failed_kept: FailedKept = dataclasses.field(default_factory=lambda: FailedKept(0, 0.0))  # dead letters kept

    @property
    def deleted(self) -> int:
        return sum(self.files.values())


def _cutoff(now: dt.datetime, days: int) -> dt.datetime | None:
    return None if days < 0 else now - dt.timedelta(days=days)


def _delivered(settings: Settings, now: dt.datetime, cutoff: dt.datetime):
    """A HAVING clause over the deliveries of a group: none is still owed (each is SENT,
    UNCONFIGURED for ``unconfigured_days``, or FAILED for ``failed_days``), and the last SENT (if any) was at or
    before ``cutoff``."""
    done = Delivery.state == DeliveryState.SENT
    given_up = _cutoff(now, settings.retention.unconfigured_days)
    if given_up is not None:
        done = or_(done, and_(Delivery.state == DeliveryState.UNCONFIGURED, Delivery.next_attempt_at <= given_up))
    failed = _cutoff(now, settings.retention.failed_days)
    if failed is not None:  # a dead letter's next_attempt_at is its last attempt's time
        done = or_(done, and_(Delivery.state == DeliveryState.FAILED, Delivery.next_attempt_at <= failed))
    last = func.max(Delivery.sent_at)
    return and_(func.sum(case((done, 0), else_=1)) == 0, or_(last.is_(None), last <= cutoff))


def originals_due(session: Session, settings: Settings, now: dt.datetime, limit: int) -> list[Candidate]:
    """Spooled originals whose time is over (see the module's docstring)."""
    r = settings.retention
    out: list[Candidate] = []
    cutoff = _cutoff(now, r.originals_days)
    if cutoff is not None:
        rows = session.execute(
            select(Instance.id, Instance.path, _any_failed())
            .join(Job, Job.instance_id == Instance.id)
            .join(Output, Output.job_id == Job.id)
            .join(Delivery, Delivery.output_id == Output.id)
            .where(Instance.state == InstanceState.PROCESSED, Instance.purged_at.is_(None))
            .group_by(Instance.id, Instance.path)
            .having(_delivered(settings, now, cutoff))
            .order_by(Instance.id)
            .limit(limit)
        ).all()
        out += [Candidate("failed" if f else "original", i, data_path(settings.node.data_dir, p)) for i, p, f in rows]
        out += _in_state_since(session, settings, InstanceState.IGNORED, "original", cutoff, limit)
    cutoff = _cutoff(now, r.quarantine_days)
    if cutoff is not None:
        out += _in_state_since(session, settings, InstanceState.QUARANTINED, "quarantined", cutoff, limit)
    cutoff = _cutoff(now, r.held_days)
    if cutoff is not None:
        out += _in_state_since(session, settings, InstanceState.HELD, "held", cutoff, limit)
    return out


def _in_state_since(session: Session, settings: Settings, state: InstanceState, kind: str, cutoff: dt.datetime, limit: int) -> list[Candidate]:
    """Unpurged instances that entered ``state`` at or before ``cutoff``."""
    changed = func.coalesce(Instance.state_changed_at, Instance.received_at)
    rows = session.execute(
        select(Instance.id, Instance.path).where(Instance.state == state, Instance.purged_at.is_(None), changed <= cutoff).order_by(Instance.id).limit(limit)
    ).all()
    return [Candidate(kind, i, data_path(settings.node.data_dir, p)) for i, p in rows]


def outputs_due(session: Session, settings: Settings, now: dt.datetime, limit: int) -> list[Candidate]:
    """Outbox files delivered to every destination long enough ago."""
    cutoff = _cutoff(now, settings.retention.outputs_days)
    if cutoff is None:
        return []
    rows = session.execute(
        select(Output.id, Output.path, _any_failed())
        .join(Delivery, Delivery.output_id == Output.id)
        .where(Output.purged_at.is_(None))
        .group_by(Output.id, Output.path)
        .having(_delivered(settings, now, cutoff))
        .order_by(Output.id)
        .limit(limit)
    ).all()
    return [Candidate("failed-output" if f else "output", i, data_path(settings.node.data_dir, p)) for i, p, f in rows]


def _any_failed():
    """Over a group of deliveries: how many are FAILED (deleted after ``failed_days``)."""
    return func.sum(case((Delivery.state == DeliveryState.FAILED, 1), else_=0))


def failed_kept(session: Session, now: dt.datetime | None = None) -> FailedKept:
    """Spooled originals still kept because a delivery of an output made from them is
    FAILED (the dead letter queue, ``casemask retry`` re-queues them): how many, and how
    old the oldest such delivery's last attempt is (days, database time)."""
    now = now or db_now(session)
    q = (
        select(func.count(func.distinct(Instance.id)), func.min(Delivery.next_attempt_at))
        .join(Job, Job.instance_id == Instance.id)
        .join(Output, Output.job_id == Job.id)
        .join(Delivery, Delivery.output_id == Output.id)
        .where(Instance.purged_at.is_(None), Delivery.state == DeliveryState.FAILED)
    )
    n, oldest = session.execute(q).one()
    age = (now - oldest).total_seconds() / 86400 if oldest is not None else 0.0
    return FailedKept(int(n or 0), max(0.0, age))


def _files(root: Path) -> Iterator[os.DirEntry]:
    if not root.is_dir():
        return
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith("."):  # spool/.incoming: C-STOREs still arriving
                        stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False) and not e.name.endswith(".tmp"):
                    yield e


def orphans(session: Session, settings: Settings, limit: int) -> list[Candidate]:
    """Files that no row names, older than ORPHAN_GRACE_S by their modification time:
    spooled originals (a crash between placing the file and committing its row: never
    acknowledged) no instance row names, and outbox files (a worker stopped between
    writing an output and committing it) no output row names. Files are judged by the
    names :mod:`node.spool` gives (``<digest>.dcm``) against the rows' paths, and spooled
    files of the older layout (``<SOP Instance UID>.dcm``) against the instances' UIDs;
    other names, and hidden folders (``spool/.incoming``), are not retention's. The spool
    is not searched when originals are kept (-1), the outbox when outputs are."""
    r = settings.retention
    old = time.time() - ORPHAN_GRACE_S
    data = settings.node.data_dir
    out: list[Candidate] = []
    searched = [(data / "spool", Instance)] if max(r.originals_days, r.quarantine_days, r.held_days) >= 0 else []
    searched += [(data / "outbox", Output)] if r.outputs_days >= 0 else []
    for root, model in searched:
        by_path: dict[str, str] = {}  # how a row names the file (relative) -> the file
        by_uid: dict[str, str] = {}  # older layout: SOP Instance UID -> the file

        def flush() -> None:
            if by_path:
                names = [*by_path, *(_absolute(data, rel) for rel in by_path)]  # rows of before relative paths: absolute
                known = set(session.scalars(select(model.path).where(model.path.in_(names))))
                unknown = [rel for rel in by_path if rel not in known and _absolute(data, rel) not in known]
                if unknown:  # rare: an older row may name the folder as it was spelt then
                    tails = or_(*(model.path.endswith("/" + rel, autoescape=True) for rel in unknown))
                    paths = list(session.scalars(select(model.path).where(tails)))
                    named = {rel for rel in unknown if any(p.endswith("/" + rel) for p in paths)}
                    out.extend(Candidate("orphan", None, Path(by_path[rel])) for rel in unknown if rel not in named)
            if by_uid:
                uids = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(list(by_uid)))))
                out.extend(Candidate("orphan", None, Path(f)) for uid, f in by_uid.items() if uid not in uids)
            by_path.clear()
            by_uid.clear()

        for e in _files(root):
            if not e.name.endswith(".dcm") or e.stat(follow_symlinks=False).st_mtime >= old:
                continue
            stem = e.name.removesuffix(".dcm")
            if _DIGEST.fullmatch(stem):
                by_path[Path(e.path).relative_to(data).as_posix()] = e.path
            elif model is Instance and _UID.fullmatch(stem):
                by_uid[stem] = e.path
            else:
                continue
            if len(by_path) + len(by_uid) >= 500:
                flush()
                if len(out) >= limit:
                    return out[:limit]
        flush()
    return out[:limit]


def _absolute(data: Path, rel: str) -> str:
    """How a row written before paths were relative names the file ``rel``."""
    return str(data / rel)


def plan(session: Session, settings: Settings, now: dt.datetime | None = None, limit: int = 1000) -> list[Candidate]:
    """What a run would delete now (at most ``limit`` of each kind)."""
    now = now or db_now(session)
    return originals_due(session, settings, now, limit) + outputs_due(session, settings, now, limit) + orphans(session, settings, limit)


def _owned(path: Path, roots: list[Path]) -> bool:
    """Inside one of ``roots`` and not a link (so nothing outside the data folder can be
    reached through it)."""
    if path.is_symlink():
        return False
    parent = path.parent.resolve()
    return any(parent == r or r in parent.parents for r in roots)


def _remove(path: Path, roots: list[Path]) -> int:
    """Delete ``path`` (and the folders it leaves empty, up to its root); returns its size."""
    path = path.parent.resolve() / path.name
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    parent = path.parent
    while parent not in roots and any(r in parent.parents for r in roots):
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
        parent = parent.parent
    return size


def run(sessions: sessionmaker, settings: Settings, dry_run: bool = False, batch: int = 1000) -> Report:
    """One retention pass: mark the deliveries owed to destinations no longer
    configured, delete what is due, a batch at a time, each deletion audited, then the
    mapping rows and the audit entries that are due, and count the originals kept for a
    FAILED delivery (logged as a warning once a day while there are any). ``dry_run``:
    only count what would be deleted (nothing is marked).

    Raises:
        OSError: a file could not be deleted for another reason than being gone already
            (the rows of the files deleted before it are marked).
    """
    report = Report()
    if dry_run:
        with sessions() as session:
            now = db_now(session)
            for c in plan(session, settings, limit=10**9):
                report.files[c.kind] += 1
                report.bytes[c.kind] += c.path.stat().st_size if c.path.is_file() else 0
            cutoff = _cutoff(now, settings.retention.mapping_days)
            report.mapping_rows = mapping.due(session, cutoff) if cutoff is not None else 0
            report.audit_rows = session.scalar(select(func.count()).select_from(AuditEvent).where(_audit_due(session, settings, now))) or 0
            report.failed_kept = failed_kept(session, now)
        return report
    with sessions() as session:
        queue.sort_unconfigured(session, [d.name for d in settings.destinations])
        session.commit()
    _delete_files(sessions, settings, report, batch)
    report.mapping_rows = _expire_mapping(sessions, settings)
    report.audit_rows = _expire_audit(sessions, settings)
    with sessions() as session:
        report.failed_kept = failed_kept(session)
    _warn_failed_kept(report.failed_kept, settings)
    return report


FAILED_WARNING_EVERY_S = 24 * 3600.0
_failed_warned_at: float | None = None  # time.monotonic() of this process's last warning


def failed_setting(settings: Settings) -> str:
    days = settings.retention.failed_days
    return "failed_days = -1: kept until re-queued and sent" if days < 0 else f"failed_days = {days}"


def _warn_failed_kept(kept: FailedKept, settings: Settings) -> None:
    """While originals are kept for a FAILED delivery, a warning at most once a day per
    process (and at the first run after a start), naming the count, the oldest's age and
    what deletes them."""
    global _failed_warned_at
    if not kept.count:
        _failed_warned_at = None
        return
    if _failed_warned_at is not None and time.monotonic() - _failed_warned_at < FAILED_WARNING_EVERY_S:
        return
    _failed_warned_at = time.monotonic()
    log.warning("retention: %d originals are kept for a FAILED delivery (dead letter), the oldest %.0f days; %s "
                "(casemask retry re-queues them; casemask status counts them)", kept.count, kept.oldest_days, failed_setting(settings))


def _audit_due(session: Session, settings: Settings, now: dt.datetime):
    """Audit entries older than ``audit_days`` (never younger than AUDIT_MIN_DAYS, which
    the database enforces too), and, when the trail is forwarded to syslog, only entries
    the forwarder has sent."""
    days = settings.retention.audit_days
    if days < 0:
        return false()
    cond = AuditEvent.at <= now - dt.timedelta(days=max(days, AUDIT_MIN_DAYS))
    if settings.audit.syslog_host:
        sent = select(func.coalesce(func.min(AuditCursor.last_id), 0)).scalar_subquery()
        cond = and_(cond, AuditEvent.id <= sent)
    return cond


def _expire_audit(sessions: sessionmaker, settings: Settings, batch: int = 5000) -> int:
    """Delete the audit entries older than ``audit_days``, a batch per transaction, each
    batch recorded by an ``audit-purged`` entry (the count, the oldest and newest
    deleted entry's date, ``audit_days``). Returns how many."""
    total = 0
    for _ in range(100_000):
        with sessions() as session:
            now = db_now(session)
            ids = list(session.scalars(select(AuditEvent.id).where(_audit_due(session, settings, now)).order_by(AuditEvent.id).limit(batch)))
            if ids:
                first, last = session.execute(select(func.min(AuditEvent.at), func.max(AuditEvent.at)).where(AuditEvent.id.in_(ids))).one()
                try:
                    session.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids)).execution_options(synchronize_session=False))
                except (IntegrityError, InternalError, ProgrammingError):  # the trigger: younger than AUDIT_MIN_DAYS by the database's own clock
                    session.rollback()
                    log.error("retention: the database refused to delete %d audit entries (younger than %d days by its clock): kept", len(ids), AUDIT_MIN_DAYS)
                    break
                audit.record(session, "audit-purged", actor="retention", object_kind="audit",
                             detail={"entries": len(ids), "from": first.date().isoformat(), "to": last.date().isoformat(), "audit_days": settings.retention.audit_days})
            session.commit()
        total += len(ids)
        if len(ids) < batch:
            break
    if total:
        log.info("retention: deleted %d audit entries older than audit_days = %d", total, settings.retention.audit_days)
    return total


def _expire_mapping(sessions: sessionmaker, settings: Settings, batch: int = 5000) -> int:
    """Delete the mapping rows not met for ``mapping_days``, a batch per transaction,
    each with its audit entry (the count, never a value). Returns how many."""
    days = settings.retention.mapping_days
    total = 0
    for _ in range(100_000):
        with sessions() as session:
            cutoff = _cutoff(db_now(session), days)
            n = mapping.expire(session, cutoff, batch) if cutoff is not None else 0
            if n:
                audit.record(session, "mapping-purged", actor="retention", object_kind="mapping", detail={"rows": n, "mapping_days": days})
            session.commit()
        total += n
        if n < batch:
            break
    if total:
        log.info("retention: deleted %d rows of the pseudonym mapping (mapping_days = %d)", total, days)
        _truncate_wal(sessions)
    return total


def _truncate_wal(sessions: sessionmaker, tries: int = 5) -> None:
    """SQLite: copy the write-ahead log into the database and truncate it, so the deleted
    rows' old page images (original names and IDs in clear) do not stay in
    ``casemask.db-wal`` until other writes overwrite them (measured: 60 s after a purge on
    a quiet node, 9 copies of a deleted name were still there). The database file itself
    keeps none: connections set ``secure_delete`` (node.db). A checkpoint that readers
    hold up is tried again, ``tries`` times, then left to the next run."""
    for k in range(tries):
        with sessions() as session:
            if session.get_bind().dialect.name != "sqlite":
                return
            busy = session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)")).first()
        if busy is None or not busy[0]:
            return
        time.sleep(0.2 * (k + 1))
    log.info("retention: the database's write-ahead log is in use; it is truncated at the next run")


def _delete_files(sessions: sessionmaker, settings: Settings, report: Report, batch: int) -> None:
    """The files that are due, a batch per transaction: each row is claimed first (a
    guarded UPDATE that sets ``purged_at`` only while the row is still in the state and
    past the day that made it due), then its file is deleted, then every deletion is
    audited, then the transaction commits. The claim takes the row's lock (SQLite: the
    write lock) until the commit, so a re-send that brings a held or quarantined object
    back to routing meanwhile (:func:`node.queue.on_resend`) either comes first (the row
    is no longer due: its file stays) or waits, and then finds the row purged and the
    file gone (it writes its own file). A crash between a file's deletion and the commit
    leaves the row unmarked: the next run meets it again and marks it (the file being
    gone already), never a forgotten file."""
    data = settings.node.data_dir.resolve()
    roots = [data / "spool", data / "outbox"]
    for _ in range(100_000):
        with sessions() as session:
            now = db_now(session)
            due = plan(session, settings, now, batch)
            if not due:
                break
            claimed = _claim(session, settings, now, due)
            done: list[Candidate] = []
            try:
                for c in due:
                    if c.kind != "orphan" and c.row_id not in claimed.get(_TABLE[c.kind], ()):
                        continue  # no longer due (sent again, retried, ...): its file stays
                    if _owned(c.path, roots):
                        report.bytes[c.kind] += _remove(c.path, roots)
                        report.files[c.kind] += 1
                    else:  # marked all the same, so that it is not met again and again
                        report.refused += 1
                        log.error("retention: %s %s points outside the spool and outbox (or is a link): not deleted", c.kind, c.row_id)
                    done.append(c)
            except BaseException:
                _unclaim(session, claimed, done)
                raise
            finally:
                _audit_deleted(session, settings, done)
                session.commit()
    if report.deleted:
        log.info("retention: deleted %s", ", ".join(f"{n} {k}" for k, n in sorted(report.files.items())))


# Which table's row names a candidate of each kind (orphans: none).
_TABLE = {"original": "instances", "failed": "instances", "quarantined": "instances", "held": "instances", "output": "outputs", "failed-output": "outputs"}


def _claim(session: Session, settings: Settings, now: dt.datetime, due: list[Candidate]) -> dict[str, set[int]]:
    """Set ``purged_at`` on the rows of ``due`` that are still due now (the same rules as
    :func:`plan`, checked again under the row's lock), in the caller's transaction;
    returns the ids claimed per table."""
    r = settings.retention
    changed = func.coalesce(Instance.state_changed_at, Instance.received_at)

    def since(state: InstanceState, days: int):
        cutoff = _cutoff(now, days)
        return and_(Instance.state == state, changed <= cutoff) if cutoff is not None else None

    cutoff = _cutoff(now, r.originals_days)
    if cutoff is not None:  # every delivery of every output still done (none re-queued meanwhile)
        delivered = Instance.id.in_(
            select(Job.instance_id).join(Output, Output.job_id == Job.id).join(Delivery, Delivery.output_id == Output.id)
            .where(Job.instance_id.in_([c.row_id for c in due if c.kind in ("original", "failed")]))
            .group_by(Job.instance_id).having(_delivered(settings, now, cutoff))
        )
        processed = and_(Instance.state == InstanceState.PROCESSED, delivered)
    still = {
        "original": or_(processed, since(InstanceState.IGNORED, r.originals_days)) if cutoff is not None else None,
        "quarantined": since(InstanceState.QUARANTINED, r.quarantine_days),
        "held": since(InstanceState.HELD, r.held_days),
        "failed": processed if cutoff is not None else None,
    }
    out: dict[str, set[int]] = {"instances": set(), "outputs": set()}
    for kind, cond in still.items():
        ids = [c.row_id for c in due if c.kind == kind]
        if ids and cond is not None:
            t = Instance.__table__
            out["instances"] |= set(session.execute(
                update(t).where(t.c.id.in_(ids), t.c.purged_at.is_(None), cond).values(purged_at=now).returning(t.c.id)
            ).scalars())
    ids = [c.row_id for c in due if c.kind in ("output", "failed-output")]
    cutoff = _cutoff(now, r.outputs_days)
    if ids and cutoff is not None:
        t = Output.__table__
        delivered = select(Delivery.output_id).where(Delivery.output_id.in_(ids)).group_by(Delivery.output_id).having(_delivered(settings, now, cutoff))
        out["outputs"] = set(session.execute(
            update(t).where(t.c.id.in_(delivered), t.c.purged_at.is_(None)).values(purged_at=now).returning(t.c.id)
        ).scalars())
    return out


def _unclaim(session: Session, claimed: dict[str, set[int]], done: list[Candidate]) -> None:
    """A deletion failed: the rows claimed whose files were not deleted lose their mark."""
    gone = {(_TABLE.get(c.kind), c.row_id) for c in done}
    for name, model in (("instances", Instance), ("outputs", Output)):
        left = [i for i in claimed.get(name, ()) if (name, i) not in gone]
        if left:
            session.execute(update(model).where(model.id.in_(left)).values(purged_at=None).execution_options(synchronize_session=False))


# Each kind of file retention deletes: its audit event and the setting that made it due.
PURGED = {
    "original": ("originals-purged", "originals_days"),
    "quarantined": ("quarantined-purged", "quarantine_days"),
    "held": ("held-purged", "held_days"),
    "output": ("outputs-purged", "outputs_days"),
    "failed": ("failed-purged", "failed_days"),
    "failed-output": ("failed-purged", "failed_days"),
    "orphan": ("orphans-purged", None),
}


def setting_of(kind: str, settings: Settings) -> str:
    """Which setting made files of ``kind`` due, as ``casemask purge`` says it."""
    name = PURGED.get(kind, (None, None))[1]
    if name is None:
        return f"no row names them for {ORPHAN_GRACE_S / 3600:.0f} h"
    return f"{name} = {getattr(settings.retention, name)}"


def _audit_deleted(session: Session, settings: Settings, done: list[Candidate]) -> None:
    """One audit entry per study and kind for the files just deleted (orphans, which no
    row names: one entry for the batch): the event names the kind, the detail the count
    and the setting, never an identifier or a value (studies by row id)."""
    instances = [c.row_id for c in done if _TABLE.get(c.kind) == "instances"]
    outputs = [c.row_id for c in done if _TABLE.get(c.kind) == "outputs"]
    out_kind = {c.row_id: c.kind for c in done if _TABLE.get(c.kind) == "outputs"}
    kind_of = {c.row_id: c.kind for c in done if _TABLE.get(c.kind) == "instances"}
    per: Counter = Counter()
    if instances:
        for inst_id, study_id in session.execute(select(Instance.id, Instance.study_id).where(Instance.id.in_(instances))):
            per[(kind_of[inst_id], study_id)] += 1
        _note_held_purged(session, settings, [i for i in instances if kind_of[i] == "held"])
    if outputs:
        for out_id, study_id in session.execute(select(Output.id, Job.study_id).join(Job, Output.job_id == Job.id).where(Output.id.in_(outputs))):
            per[(out_kind[out_id], study_id)] += 1
    for (kind, study_id), n in sorted(per.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        event, key = PURGED[kind]
        what = "outputs" if _TABLE[kind] == "outputs" else "instances"
        audit.record(session, event, actor="retention", study_id=study_id, object_kind="study", detail={what: n, key: getattr(settings.retention, key)})
    orphans = sum(1 for c in done if c.kind == "orphan")
    if orphans:
        audit.record(session, "orphans-purged", actor="retention", object_kind="files", detail={"files": orphans, "grace_h": round(ORPHAN_GRACE_S / 3600)})


HELD_PURGED = "matched no route (unrouted = hold); its original was deleted after [retention] held_days"


def _note_held_purged(session: Session, settings: Settings, ids: list[int]) -> None:
    """Held instances whose originals were just deleted: the reason says so (they stay
    HELD, with ``purged_at``: nothing is left to route, and ``casemask retry --held``
    passes them over; a re-send brings the object back and routes it); the audit entry
    is :func:`_audit_deleted`'s."""
    if not ids:
        return
    session.execute(update(Instance).where(Instance.id.in_(ids)).values(reason=HELD_PURGED).execution_options(synchronize_session=False))
    log.info("retention: deleted the originals of %d held objects (held_days = %d)", len(ids), settings.retention.held_days)
