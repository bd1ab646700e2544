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

Outputs with a dead-letter (FAILED) delivery, and their originals, are kept until the
delivery is re-queued and sent. Spooled files that no row names (left by a crash between
writing a file and committing its row: never acknowledged, and the sender did not send
it again), and outbox files no output row names (a worker stopped before committing
them), are deleted after :data:`ORPHAN_GRACE_S`.

A file is deleted only if it lies inside the data folder's ``spool`` or ``outbox`` and
is not a symbolic link; nothing is ever overwritten. The file goes first, then the row
is marked (``purged_at``), so a crash in between leaves a mark to set again, never a
forgotten file. Times come from the database's clock.
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

from sqlalchemy import and_, case, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from node import audit, mapping, queue
from node.config import Settings
from node.db import Delivery, DeliveryState, Instance, InstanceState, Job, Output, data_path, db_now

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 24 * 3600.0  # a spooled file without a row for this long is an orphan
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DIGEST = re.compile(r"[0-9a-f]{32}")  # node.spool.digest


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A file retention would delete: ``kind`` is original | quarantined | output | orphan."""

    kind: str  # original | quarantined | held | output | orphan
    row_id: int | None
    path: Path


@dataclasses.dataclass
class Report:
    """What one run deleted (or, dry, would delete): files and bytes per kind."""

    files: Counter = dataclasses.field(default_factory=Counter)
    bytes: Counter = dataclasses.field(default_factory=Counter)
    refused: int = 0  # paths outside the spool/outbox, or links: never touched
    mapping_rows: int = 0  # rows of the pseudonym mapping deleted (or due)

    @property
    def deleted(self) -> int:
        return sum(self.files.values())


def _cutoff(now: dt.datetime, days: int) -> dt.datetime | None:
    return None if days < 0 else now - dt.timedelta(days=days)


def _delivered(settings: Settings, now: dt.datetime, cutoff: dt.datetime):
    """A HAVING clause over the deliveries of a group: none is still owed (each is SENT,
    or UNCONFIGURED for ``unconfigured_days``), and the last SENT (if any) was at or
    before ``cutoff``."""
    done = Delivery.state == DeliveryState.SENT
    given_up = _cutoff(now, settings.retention.unconfigured_days)
    if given_up is not None:
        done = or_(done, and_(Delivery.state == DeliveryState.UNCONFIGURED, Delivery.next_attempt_at <= given_up))
    last = func.max(Delivery.sent_at)
    return and_(func.sum(case((done, 0), else_=1)) == 0, or_(last.is_(None), last <= cutoff))


def originals_due(session: Session, settings: Settings, now: dt.datetime, limit: int) -> list[Candidate]:
    """Spooled originals whose time is over (see the module's docstring)."""
    r = settings.retention
    out: list[Candidate] = []
    cutoff = _cutoff(now, r.originals_days)
    if cutoff is not None:
        rows = session.execute(
            select(Instance.id, Instance.path)
            .join(Job, Job.instance_id == Instance.id)
            .join(Output, Output.job_id == Job.id)
            .join(Delivery, Delivery.output_id == Output.id)
            .where(Instance.state == InstanceState.PROCESSED, Instance.purged_at.is_(None))
            .group_by(Instance.id, Instance.path)
            .having(_delivered(settings, now, cutoff))
            .order_by(Instance.id)
            .limit(limit)
        ).all()
        out += [Candidate("original", i, data_path(settings.node.data_dir, p)) for i, p in rows]
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
        select(Output.id, Output.path)
        .join(Delivery, Delivery.output_id == Output.id)
        .where(Output.purged_at.is_(None))
        .group_by(Output.id, Output.path)
        .having(_delivered(settings, now, cutoff))
        .order_by(Output.id)
        .limit(limit)
    ).all()
    return [Candidate("output", i, data_path(settings.node.data_dir, p)) for i, p in rows]


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
    configured, delete what is due, a batch at a time, marking each row purged once its
    file is gone, then the mapping rows that are due. ``dry_run``: only count what
    would be deleted (nothing is marked).

    Raises:
        OSError: a file could not be deleted for another reason than being gone already
            (the rows of the files deleted before it are marked).
    """
    report = Report()
    if dry_run:
        with sessions() as session:
            for c in plan(session, settings, limit=10**9):
                report.files[c.kind] += 1
                report.bytes[c.kind] += c.path.stat().st_size if c.path.is_file() else 0
            cutoff = _cutoff(db_now(session), settings.retention.mapping_days)
            report.mapping_rows = mapping.due(session, cutoff) if cutoff is not None else 0
        return report
    with sessions() as session:
        queue.sort_unconfigured(session, [d.name for d in settings.destinations])
        session.commit()
    _delete_files(sessions, settings, report, batch)
    report.mapping_rows = _expire_mapping(sessions, settings)
    return report


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
    """The files that are due, a batch per transaction, marking each row purged once
    its file is gone."""
    data = settings.node.data_dir.resolve()
    roots = [data / "spool", data / "outbox"]
    for _ in range(100_000):
        with sessions() as session:
            now = db_now(session)
            due = plan(session, settings, now, batch)
            if not due:
                break
            instances, outputs, held = [], [], []
            try:
                for c in due:
                    if _owned(c.path, roots):
                        report.bytes[c.kind] += _remove(c.path, roots)
                        report.files[c.kind] += 1
                    else:  # marked all the same, so that it is not met again and again
                        report.refused += 1
                        log.error("retention: %s %s points outside the spool and outbox (or is a link): not deleted", c.kind, c.row_id)
                    if c.kind in ("original", "quarantined", "held"):
                        instances.append(c.row_id)
                        if c.kind == "held":
                            held.append(c.row_id)
                    elif c.kind == "output":
                        outputs.append(c.row_id)
            finally:
                if instances:
                    session.execute(update(Instance).where(Instance.id.in_(instances)).values(purged_at=now).execution_options(synchronize_session=False))
                    _note_held_purged(session, settings, held)
                if outputs:
                    session.execute(update(Output).where(Output.id.in_(outputs)).values(purged_at=now).execution_options(synchronize_session=False))
                session.commit()
    if report.deleted:
        log.info("retention: deleted %s", ", ".join(f"{n} {k}" for k, n in sorted(report.files.items())))


HELD_PURGED = "matched no route (unrouted = hold); its original was deleted after [retention] held_days"


def _note_held_purged(session: Session, settings: Settings, ids: list[int]) -> None:
    """Held instances whose originals were just deleted: the reason says so (they stay
    HELD, with ``purged_at``: nothing is left to route, and ``casemask retry --held``
    passes them over; a re-send brings the object back and routes it), and each study
    gets a ``held-purged`` audit entry (the count and ``held_days``, no identifier)."""
    if not ids:
        return
    session.execute(update(Instance).where(Instance.id.in_(ids)).values(reason=HELD_PURGED).execution_options(synchronize_session=False))
    per_study = session.execute(select(Instance.study_id, func.count()).where(Instance.id.in_(ids)).group_by(Instance.study_id).order_by(Instance.study_id))
    for study_id, n in per_study:
        audit.record(session, "held-purged", actor="retention", study_id=study_id, object_kind="study", detail={"instances": n, "held_days": settings.retention.held_days})
    log.info("retention: deleted the originals of %d held objects (held_days = %d)", len(ids), settings.retention.held_days)
