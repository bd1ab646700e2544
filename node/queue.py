"""Every state transition of studies, instances, jobs and deliveries, in one place.

Work is *claimed* with a lease: a claim sets a state, an ``owner`` (the claiming worker's
token, see :mod:`node.leases`) and ``lease_until`` (database time). Whoever holds an
expired lease is presumed dead and the work may be claimed again; a node that restarts
expires its previous run's claims at once (:func:`take_over`). Every transition of
claimed work is *guarded*: it happens only if the row is still the caller's, so a worker
that lost its lease gives up instead of finishing or sending twice. Claims read with
``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it (PostgreSQL); SQLite
serialises writers, and the guarded UPDATE decides there. See docs/queue.md.

Each function runs in the caller's session and commits nothing; callers keep
transactions short. Log lines name rows by id, with the keyed hash of the original UID
when the session carries a namer (``session.info["log_id"]``), never the UID itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from sqlalchemy import Connection, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, object_session, selectinload

from node.db import (
    Conflict,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Job,
    JobState,
    Output,
    STUDY_ENDED,
    Study,
    StudyState,
    data_path,
    db_now,
    lock_rows,
    utcnow,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Received:
    """What the C-STORE handler knows about an object it has just spooled."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str
    path: str
    size: int
    calling_ae: str
    called_ae: str
    peer_host: str
    identity: str = ""  # keyed hash of what makes it this object (node.scp: SOP UID conflicts)
    received_by: str = ""  # the writing process's owner token (node.leases)
    digest: str | None = None  # SHA-256 (hex) of the spool file's bytes (node.incoming)


# The statements of every batch of C-STOREs, built once: constructing a statement per
# call (and deriving its cache key) cost about 0.4 ms of the 0.6 ms of a commit. One
# study (one sender) takes the plain "=": an expanding IN renders its SQL per call.
_TOUCH_RECEIVING_STUDY = (
    update(Study.__table__)
    .where(Study.__table__.c.study_uid == bindparam("b_study_uid"), Study.__table__.c.state == StudyState.RECEIVING)
    .values(last_received_at=bindparam("b_now"))
    .returning(Study.__table__.c.id, Study.__table__.c.study_uid)
)
_TOUCH_RECEIVING_STUDIES = (
    update(Study.__table__)
    .where(Study.__table__.c.study_uid.in_(bindparam("b_study_uids", expanding=True)), Study.__table__.c.state == StudyState.RECEIVING)
    .values(last_received_at=bindparam("b_now"))
    .returning(Study.__table__.c.id, Study.__table__.c.study_uid)
)
_INSERT_INSTANCE = insert(Instance.__table__)
_INSTANCE_KEYS = (
    "sop_instance_uid", "sop_class_uid", "study_id", "series_uid", "modality", "transfer_syntax", "path", "size",
    "calling_ae", "called_ae", "peer_host", "identity", "digest", "received_at", "received_by", "state", "reason",
)  # _instance_row's keys, in its order


class HotStatements:
    """The two statements of :func:`record_received_many`'s usual batch (the UPDATE of a
    study still RECEIVING, the INSERT of its instances), compiled once for one dialect
    and run on the DBAPI cursor of the caller's connection, in its transaction.

    Measured (docs/ingest.md, "The group commit's statements on the DBAPI cursor"):
    SQLAlchemy Core took 300-545 us of CPU for a batch's statements on SQLite, cached
    compiled statements included (its per-call parameter processing, result set-up and
    events), the same SQL and values on the DBAPI cursor 107-156 us; with 4 senders the
    committer runs 0.6 batches per object, on the same two cores as the receiving
    threads. ``Connection.exec_driver_sql`` was not enough (218-603 us).

    The SQL and the order of the values are SQLAlchemy's own (the statement compiled
    for ``dialect``), and each value goes through its column type's bind processor for
    that dialect, as SQLAlchemy does; ``tests/test_ingest.py`` compares the rows both
    ways write, on SQLite and PostgreSQL. Errors are raised as SQLAlchemy raises them
    (:class:`sqlalchemy.exc.IntegrityError` for a stored SOP Instance UID, else
    :class:`sqlalchemy.exc.DBAPIError`); after any error other than an IntegrityError
    the connection is invalidated (the committer opens a new one: a lost server must
    not leave it on a dead connection SQLAlchemy was never told about).
    """

    def __init__(self, dialect) -> None:
        self.dialect = dialect
        self._touch = self._prepare(_TOUCH_RECEIVING_STUDY, None)
        self._insert = self._prepare(_INSERT_INSTANCE, list(_INSTANCE_KEYS))

    def _prepare(self, statement, column_keys: list[str] | None):
        compiled = statement.compile(dialect=self.dialect, column_keys=column_keys)
        names = list(compiled.positiontup) if compiled.positional else list(compiled.binds)
        processors = {}
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(self.dialect).bind_processor(self.dialect)
            if processor is not None:
                processors[name] = processor
        # a literal of the statement (the state compared with): its value is fixed
        fixed = {name: compiled.binds[name].effective_value for name in names if name not in (column_keys or ()) and not name.startswith("b_")}
        return str(compiled), compiled.positional, names, processors, fixed

    def _values(self, prepared, params: dict):
        _, positional, names, processors, fixed = prepared
        values = {**fixed, **params}
        for name, processor in processors.items():
            if values[name] is not None:
                values[name] = processor(values[name])
        return tuple(values[name] for name in names) if positional else {name: values[name] for name in names}

    def _run(self, conn: Connection, prepared, params, many: bool = False) -> list:
        from sqlalchemy import exc

        dbapi = self.dialect.loaded_dbapi
        cursor = conn.connection.driver_connection.cursor()
        try:
            if many:
                cursor.executemany(prepared[0], [self._values(prepared, p) for p in params])
                return []
            cursor.execute(prepared[0], self._values(prepared, params))
            return cursor.fetchall()
        except dbapi.Error as e:
            if not isinstance(e, dbapi.IntegrityError):
                conn.invalidate()
            raise exc.DBAPIError.instance(prepared[0], None, e, dbapi.Error) from e
        finally:
            cursor.close()

    def touch(self, conn: Connection, study_uids: list[str], now: dt.datetime) -> dict[str, int]:
        """``last_received_at = now`` for each of these studies that is RECEIVING; returns
        {study_uid: study id} of those (the others are not RECEIVING or do not exist)."""
        ids = {}
        for uid in study_uids:
            for study_id, study_uid in self._run(conn, self._touch, {"b_study_uid": uid, "b_now": now}):
                ids[study_uid] = study_id
        return ids

    def insert(self, conn: Connection, rows: list[dict]) -> None:
        """Insert instance rows (:func:`_instance_row`'s dicts)."""
        self._run(conn, self._insert, rows, many=True)


def record_received(conn: Connection, r: Received, hot: HotStatements | None = None) -> str:
    """Insert a received instance (and its study) in the caller's transaction; returns
    the study's state change ("" when none, the study named by row id), for the caller
    to log once committed. :func:`record_received_many` with one row.

    Raises:
        IntegrityError: this SOP Instance UID is already stored, or another association
            inserted the same new study at the same moment; see :func:`is_stored`.
    """
    return record_received_many(conn, [r], hot)[0]


def record_received_many(conn: Connection, rows: Sequence[Received], hot: HotStatements | None = None) -> list[str]:
    """Insert received instances (and their studies) in the caller's transaction;
    returns per row its study's state change ("" when none; a study's change is
    reported on its first row of ``rows``), for the caller to log once committed.

    Raises:
        IntegrityError: one of these SOP Instance UIDs is already stored (or twice in
            ``rows``), or another association inserted the same new study at the same
            moment; the caller rolls back and may commit the rows one by one.

    The hot path of every C-STORE (node.groupcommit commits the rows of concurrent
    C-STOREs together), so it is written in SQLAlchemy Core with a fixed number of
    statements per batch, whatever its size: one UPDATE of the studies still RECEIVING
    and one INSERT of all the instances (an executemany). Only a study that is not
    RECEIVING takes statements of its own: a new study is inserted; an object arriving
    for a study that was already routed reopens it (an amendment): only the new objects
    are processed next time, into the same pseudonymous study.

    ``hot``: run the UPDATE and the INSERT on the DBAPI cursor (:class:`HotStatements`,
    compiled for this connection's dialect); the rare statements stay in Core.
    """
    now = utcnow()
    studies = Study.__table__
    uids = list(dict.fromkeys(r.study_uid for r in rows))
    if hot is not None:
        study_ids = hot.touch(conn, uids, now)
    elif len(uids) == 1:
        study_ids = {uid: sid for sid, uid in conn.execute(_TOUCH_RECEIVING_STUDY, {"b_study_uid": uids[0], "b_now": now})}
    else:
        study_ids = {uid: sid for sid, uid in conn.execute(_TOUCH_RECEIVING_STUDIES, {"b_study_uids": uids, "b_now": now})}
    changes = [""] * len(rows)
    for i, r in enumerate(rows):
        if r.study_uid in study_ids:
            continue
        row = conn.execute(select(studies.c.id, studies.c.state).where(studies.c.study_uid == r.study_uid)).first()
        if row is None:
            study_id = conn.execute(
                insert(studies).values(study_uid=r.study_uid, state=StudyState.RECEIVING, first_received_at=now, last_received_at=now).returning(studies.c.id)
            ).scalar_one()
            changes[i] = f"study {study_id}: RECEIVING"
        else:
            study_id = row.id
            conn.execute(update(studies).where(studies.c.id == study_id).values(state=StudyState.RECEIVING, last_received_at=now))
            changes[i] = f"study {study_id}: {StudyState(row.state).value} -> RECEIVING (amendment)"
        study_ids[r.study_uid] = study_id
    instance_rows = [_instance_row(r, study_ids[r.study_uid], now) for r in rows]
    if hot is not None:
        hot.insert(conn, instance_rows)
    else:
        conn.execute(_INSERT_INSTANCE, instance_rows)
    return changes


def _instance_row(r: Received, study_id: int, now: dt.datetime) -> dict:
    return {
        "sop_instance_uid": r.sop_instance_uid,
        "sop_class_uid": r.sop_class_uid,
        "study_id": study_id,
        "series_uid": r.series_uid,
        "modality": r.modality[:16],
        "transfer_syntax": r.transfer_syntax,
        "path": r.path,
        "size": r.size,
        "calling_ae": r.calling_ae,
        "called_ae": r.called_ae,
        "peer_host": r.peer_host,
        "identity": r.identity,
        "digest": r.digest,
        "received_at": now,
        "received_by": r.received_by or None,
        "state": InstanceState.RECEIVED,
        "reason": "",
    }


def forget_received(conn: Connection, sop_instance_uid: str, writer: str | None = None) -> bool:
    """Delete a received instance whose file could not be written: it was never
    acknowledged, so the sender still has it (and will send it again). ``writer``: only
    the row that process wrote (``received_by``), still RECEIVED: once another node
    answered Success for a re-send of it (:func:`vouch_for_resend`) it is theirs and
    stays. Returns whether a row was deleted."""
    instances = Instance.__table__
    where = [instances.c.sop_instance_uid == sop_instance_uid, instances.c.state == InstanceState.RECEIVED]
    if writer is not None:
        where.append(instances.c.received_by == writer)
    return bool(conn.execute(instances.delete().where(*where)).rowcount)


def vouch_for_resend(conn: Connection, sop_instance_uid: str, writer: str) -> bool:
    """Before a re-send of a stored object is answered Success, in the caller's
    transaction: the row must still exist (False: its writer withdrew it, its file never
    came, and the re-send must not be acknowledged on its strength), and a row still
    RECEIVED that another process wrote becomes ``writer``'s, so that its first writer,
    if its own file then fails, cannot delete it (:func:`forget_received`): the object
    was acknowledged."""
    instances = Instance.__table__
    conn.execute(
        update(instances)
        .where(instances.c.sop_instance_uid == sop_instance_uid, instances.c.state == InstanceState.RECEIVED, or_(instances.c.received_by.is_(None), instances.c.received_by != writer))
        .values(received_by=writer)
    )
    return conn.execute(select(instances.c.id).where(instances.c.sop_instance_uid == sop_instance_uid)).first() is not None


def adopt_resent_file(conn: Connection, sop_instance_uid: str, seen: str | None, digest: str | None, size: int) -> None:
    """A re-send's own file took the place of the stored object's (which was missing or
    torn), in the caller's transaction: the row now describes those bytes, so that a
    reader checks them against the right digest. Only while the row still names
    ``seen``, the digest the handler read (another node's re-send may have adopted its
    own file meanwhile; on one host C-STOREs of one SOP Instance UID are serialized,
    across nodes see docs/ingest.md)."""
    instances = Instance.__table__
    conn.execute(
        update(instances)
        .where(instances.c.sop_instance_uid == sop_instance_uid, instances.c.digest.is_not_distinct_from(seen))
        .values(digest=digest, size=size)
    )


def drop_torn(session: Session, data_dir: Path, node_id: str, owner: str, in_flight: int | None = None) -> list[tuple[str, int]]:
    """At start: delete the received instances whose spool file does not match its
    row's digest, where that proves the object was never acknowledged (docs/ingest.md,
    "Parallel durability"): rows written by an *earlier run of this node*, still
    RECEIVED, with a digest, whose file is there but torn. The handler links a file
    before its data fsync returns and answers Success only after it returned, so such a
    file's C-STORE was never answered Success: its sender still holds the object. The
    files are deleted too. Returns (SOP Instance UID, study row id) of each dropped.

    ``in_flight``: as for :func:`drop_unspooled`: more mismatches than C-STOREs that
    could have been in flight is not a crash's doing (a damaged or replaced data
    folder); logged as an error, nothing dropped (routing quarantines them)."""
    from node.spool import matches_digest, remove

    mine_before = and_(Instance.received_by.startswith(f"{node_id}/", autoescape=True), Instance.received_by != owner)
    rows = session.scalars(select(Instance).where(Instance.state == InstanceState.RECEIVED, mine_before, Instance.digest.is_not(None)))
    torn = []
    for inst in rows:
        path = data_path(data_dir, inst.path)
        try:
            if not matches_digest(path, inst.digest):
                torn.append(inst)
        except FileNotFoundError:  # drop_unspooled's case
            continue
    if in_flight is not None and len(torn) > in_flight:
        log.error("%d received objects of this node's earlier runs do not match their digest, more than could have been in flight (%d): "
                  "is the data folder damaged? None is dropped (routing quarantines them)", len(torn), in_flight)
        return []
    out = [(i.sop_instance_uid, i.study_id) for i in torn]
    for inst in torn:
        remove(data_path(data_dir, inst.path))
        session.delete(inst)
    session.flush()
    return out


def drop_unspooled(session: Session, data_dir: Path, node_id: str, owner: str, grace_s: float, in_flight: int | None = None) -> list[tuple[str, int]]:
    """Delete the received instances whose spool file never came, where that proves the
    object was never acknowledged: rows written by an *earlier run of this node*
    (``received_by`` starts with ``node_id/`` and is not ``owner``, the running
    process), more than ``grace_s`` seconds ago (that process's clock, which is this
    host's), still RECEIVED, with no file at their path. The handler answers a C-STORE
    only once its row and file are both durable, so such a row was committed while its
    file was still being written when that run stopped. Rows of other nodes (still
    writing, perhaps, on a slow shared file system) and rows of unknown writers are
    left alone. Returns the (SOP Instance UID, study id) of each row dropped.

    ``in_flight``: how many C-STOREs that run can have had under way at once (one per
    association: ``[node] max_associations``). When more rows than that lack their file,
    a stop mid-write cannot explain it: the files are elsewhere (a data folder not
    mounted, or moved), the rows are of acknowledged objects, and none is dropped (logged
    as an error; routing then quarantines them, and a re-send routes them again)."""
    cutoff = db_now(session) - dt.timedelta(seconds=grace_s)
    mine_before = and_(Instance.received_by.startswith(f"{node_id}/", autoescape=True), Instance.received_by != owner)
    rows = session.scalars(select(Instance).where(Instance.state == InstanceState.RECEIVED, mine_before, Instance.received_at < cutoff))
    gone = [i for i in rows if not data_path(data_dir, i.path).exists()]
    if in_flight is not None and len(gone) > in_flight:
        log.error("%d received objects of this node's earlier runs have no spool file under %s, more than could have been in flight (%d): "
                  "is the data folder mounted? None is dropped", len(gone), data_dir, in_flight)
        return []
    dropped = [(i.sop_instance_uid, i.study_id) for i in gone]
    for inst in gone:
        session.delete(inst)
    session.flush()
    return dropped


def is_stored(conn: Connection, sop_instance_uid: str) -> bool:
    instances = Instance.__table__
    return conn.execute(select(instances.c.id).where(instances.c.sop_instance_uid == sop_instance_uid)).first() is not None


def lock_instance(conn: Connection, sop_instance_uid: str) -> None:
    """Take the instance row's lock in the caller's transaction, until it ends (an UPDATE
    that changes nothing: PostgreSQL locks the row, SQLite takes its write lock).
    Retention claims a row under this lock before it deletes the row's file
    (node.retention), so once it is held the file is either in place for the rest of
    the transaction or gone for good: the C-STORE handler looks at a re-sent object's
    file only after taking it."""
    instances = Instance.__table__
    conn.execute(
        update(instances).where(instances.c.sop_instance_uid == sop_instance_uid).values(purged_at=instances.c.purged_at)
    )


def on_resend(conn: Connection, sop_instance_uid: str) -> str:
    """An object already stored was sent again (same SOP Instance UID, same content), in
    the caller's transaction; returns the state change to log ("" when none).

    A HELD or IGNORED object that matched no route goes back to RECEIVED and its study
    to RECEIVING, so that it is routed again with the routes configured now (an IGNORED
    one that has jobs was discarded by an operator: it stays as it is, since routing it
    again would add a second job per route, which the database refuses, and that
    refusal stopped the routing of every study after it); so does an
    object quarantined because its spool file never came (:data:`SPOOL_FILE_MISSING`:
    the node that wrote its row stopped mid-write, and the sender, never answered
    Success, sent it again, through this or another node, which rewrote the file). An object
    whose spooled file retention already deleted has it back (the C-STORE handler
    rewrote it): it is marked unpurged, so that the next retention run deletes it again.
    Anything else is left as it is (a re-send is idempotent).
    """
    instances, studies = Instance.__table__, Study.__table__
    row = conn.execute(
        select(instances.c.id, instances.c.state, instances.c.reason, instances.c.study_id, instances.c.purged_at).where(instances.c.sop_instance_uid == sop_instance_uid)
    ).first()
    if row is None:
        return ""
    now = utcnow()
    jobs = Job.__table__
    discarded = row.state == InstanceState.IGNORED and conn.execute(select(jobs.c.id).where(jobs.c.instance_id == row.id).limit(1)).first() is not None
    if discarded:
        said = f"instance {row.id}: discarded by an operator, sent again: not processed again"
    elif row.state in (InstanceState.HELD, InstanceState.IGNORED) or (row.state == InstanceState.QUARANTINED and row.reason in (SPOOL_FILE_MISSING, SPOOL_FILE_TORN)):
        conn.execute(
            update(instances)
            .where(instances.c.id == row.id, instances.c.state == row.state)
            .values(state=InstanceState.RECEIVED, reason="", state_changed_at=now, purged_at=None)
        )
        conn.execute(update(studies).where(studies.c.id == row.study_id).values(state=StudyState.RECEIVING, last_received_at=now))
        return f"instance {row.id}: {InstanceState(row.state).value} -> RECEIVED (sent again: routed again)"
    else:
        said = ""
    if row.purged_at is not None:
        conn.execute(update(instances).where(instances.c.id == row.id).values(purged_at=None))
    return said


def release_held(session: Session) -> int:
    """HELD -> RECEIVED for every held instance (and RECEIVING for their studies, which
    are stable already, so they are routed at the next tick); returns how many. Used at
    start when the routes changed, and by ``casemask retry --held``."""
    held = list(session.scalars(select(Instance).where(Instance.state == InstanceState.HELD, Instance.purged_at.is_(None))))
    studies: set[int] = set()
    for inst in held:
        _set_instance(inst, InstanceState.RECEIVED, "")
        studies.add(inst.study_id)
    for study in session.scalars(select(Study).where(Study.id.in_(studies))) if studies else ():
        _set_study(study, StudyState.RECEIVING)
    session.flush()
    if held:
        log.info("%d held instances go back to routing", len(held))
    return len(held)


def next_stable_study(session: Session, stable_after_s: float, exclude: Iterable[int] = (), max_wait_s: float = 0.0) -> Study | None:
    """The first study that received nothing for ``stable_after_s`` seconds (database
    time) and awaits routing, locked for the caller's transaction where the database
    can (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so that each study is routed by one
    node); None when there is none. ``exclude``: study ids to pass over this time.

    ``max_wait_s`` (``[node] max_study_wait_s``; 0: no limit): a study one of whose
    objects has waited that long is taken too, though objects still arrive: a sender
    that sends one into it now and then (every ``stable_after_s`` or sooner) would
    otherwise keep it, and every object in it, unrouted for ever. What arrives after
    it is routed is an amendment (:func:`record_received`)."""
    now = db_now(session)
    cutoff = now - dt.timedelta(seconds=stable_after_s)
    ready = Study.last_received_at <= cutoff
    if max_wait_s > 0:
        waited = select(Instance.study_id).where(Instance.state == InstanceState.RECEIVED, Instance.received_at <= now - dt.timedelta(seconds=max_wait_s))
        ready = or_(ready, Study.id.in_(waited))
    q = select(Study).where(Study.state == StudyState.RECEIVING, ready)
    skip = list(exclude)
    if skip:
        q = q.where(Study.id.not_in(skip))
    return session.scalars(q.order_by(Study.id).limit(1).with_for_update(skip_locked=True)).first()


def stored_instance(conn: Connection, sop_instance_uid: str) -> tuple[str, str, str | None] | None:
    """(identity, path, digest) of the stored instance with this SOP Instance UID, or None."""
    instances = Instance.__table__
    row = conn.execute(select(instances.c.identity, instances.c.path, instances.c.digest).where(instances.c.sop_instance_uid == sop_instance_uid)).first()
    return None if row is None else (row.identity or "", row.path, row.digest)


def record_conflict(conn: Connection, r: Received) -> None:
    """Count a C-STORE refused because another object is stored under its SOP Instance
    UID (``casemask status`` shows the count)."""
    conn.execute(insert(Conflict.__table__).values(sop_instance_uid=r.sop_instance_uid, calling_ae=r.calling_ae, peer_host=r.peer_host, received_at=utcnow()))


def hold_study(session: Session, study: Study) -> bool:
    """Hold ``study`` (from :func:`next_stable_study`) for routing in the caller's
    transaction; False when another node routed it meanwhile (the caller rolls back and
    goes on). A guarded ``UPDATE ... WHERE state = RECEIVING``: on SQLite, which has no
    row locks and reads outside a transaction, it takes the database's write lock, so a
    second worker waits here and then finds the study ROUTED instead of making its jobs
    twice; on PostgreSQL the row is locked already (``FOR UPDATE SKIP LOCKED``)."""
    t = Study.__table__
    held = session.execute(update(t).where(t.c.id == study.id, t.c.state == StudyState.RECEIVING).values(state=StudyState.RECEIVING)).rowcount
    if held:
        session.refresh(study)
    return bool(held)


def stable_studies(session: Session, stable_after_s: float, now: dt.datetime | None = None) -> list[Study]:
    """Studies that received nothing for ``stable_after_s`` seconds and await routing
    (read only; routing takes them one by one with :func:`next_stable_study`)."""
    cutoff = (now or db_now(session)) - dt.timedelta(seconds=stable_after_s)
    return list(
        session.scalars(
            select(Study).where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff).order_by(Study.id)
        )
    )


def received_instances(session: Session, study: Study) -> list[Instance]:
    return list(
        session.scalars(
            select(Instance).where(Instance.study_id == study.id, Instance.state == InstanceState.RECEIVED).order_by(Instance.id)
        )
    )


def instances_with_jobs(session: Session, study: Study) -> set[int]:
    """Ids of ``study``'s instances that have jobs already: among those awaiting routing,
    only an operator-discarded object that an older version put back to routing when it
    was sent again (routing it again would add a second job per route, which the
    database refuses: every tick failed from then on)."""
    return set(session.scalars(select(Job.instance_id).where(Job.study_id == study.id).distinct()))


def keep_discarded(session: Session, inst: Instance) -> None:
    """An instance awaiting routing whose jobs an operator discarded goes back to IGNORED."""
    _set_instance(inst, InstanceState.IGNORED, "discarded by an operator; sent again, not processed again")


def route_instance(session: Session, inst: Instance, routes: Sequence[str], unrouted: str) -> None:
    """RECEIVED -> ROUTED (one PENDING job per route) | HELD | IGNORED."""
    if routes:
        for name in routes:
            session.add(Job(instance_id=inst.id, study_id=inst.study_id, route=name, state=JobState.PENDING))
        _set_instance(inst, InstanceState.ROUTED, "routes: " + ",".join(routes))
    elif unrouted == "discard":
        _set_instance(inst, InstanceState.IGNORED, "matched no route (unrouted = discard)")
    else:
        _set_instance(inst, InstanceState.HELD, "matched no route (unrouted = hold)")


# The reason routing gives an instance whose spool file is still missing after the grace
# time; a re-send of the object (which brings the file) routes it again (on_resend).
SPOOL_FILE_MISSING = "route: the spooled file is missing (the writing node stopped mid-write?)"
SPOOL_FILE_TORN = "route: the spooled file does not match its digest (torn by a crash mid-write?)"


# The reason of an object whose patient differs from its study's (join_study): names the
# check and the attributes, never a value.
OTHER_PATIENT = ("route: PatientID (0010,0020) / IssuerOfPatientID (0010,0021) differ from the study's first object "
                 "(another patient under this StudyInstanceUID): not merged into the study")


# ``Study.patient_key`` of a study whose objects were routed before revision 0004 (no key
# then) and whose originals are all gone: its patient cannot be known, so no object joins
# it any more (node.routing.recall_patient sets it).
UNKNOWN_PATIENT = "unknown"
STUDY_PATIENT_UNKNOWN = ("route: the study's first patient is unknown (routed before revision 0004, its originals deleted): "
                         "not merged into the study (PatientID (0010,0020) / IssuerOfPatientID (0010,0021) cannot be compared)")


def join_study(session: Session, study: Study, inst: Instance, patient: str) -> bool:
    """Whether ``inst``, of the patient ``patient`` (a keyed hash, node.routing.patient_of),
    may join ``study``, in the caller's transaction: the study's first object routed
    sets the study's patient (``Study.patient_key``); an object of another patient is
    QUARANTINED with :data:`OTHER_PATIENT` and False is returned. Two patients' objects
    under one Study Instance UID (a sender's mistake, or a study UID taken from another
    patient's study) would otherwise leave as one pseudonymous study: one patient's
    images linked to the other's, or shown under the other's pseudonym. The first
    patient keeps the study, including for amendments sent later. A study routed before
    revision 0004 gets its patient from its stored objects first
    (node.routing.recall_patient); when none is left, nothing joins it
    (:data:`STUDY_PATIENT_UNKNOWN`)."""
    if study.patient_key is None:
        study.patient_key = patient
        return True
    if study.patient_key == patient:
        return True
    _set_instance(inst, InstanceState.QUARANTINED, STUDY_PATIENT_UNKNOWN if study.patient_key == UNKNOWN_PATIENT else OTHER_PATIENT)
    return False


def quarantine_instance(session: Session, inst: Instance, reason: str) -> None:
    """An instance that could not even be routed (unreadable or missing file)."""
    _set_instance(inst, InstanceState.QUARANTINED, reason)


def mark_study_routed(session: Session, study: Study) -> None:
    """RECEIVING -> ROUTED, or straight to its end state (:func:`end_state`) when none of
    its jobs is open."""
    _set_study(study, StudyState.ROUTED)
    session.flush()
    if not _open_jobs(session, study.id):
        _end_studies(session, [study])


def end_state(instances: Iterable[InstanceState]) -> StudyState:
    """What a study whose jobs all ended has become, from its instances' states: DONE
    when every object was processed (objects that matched no route with ``unrouted =
    "discard"`` aside); PARTIAL when some were processed and others quarantined or held;
    QUARANTINED, or HELD, when none was processed; IGNORED when every object matched no
    route (discard) or an operator discarded it. So that no one reads "delivered" into a
    study nothing of which went out."""
    states = set(instances)
    processed = InstanceState.PROCESSED in states
    if InstanceState.QUARANTINED in states:
        return StudyState.PARTIAL if processed else StudyState.QUARANTINED
    if InstanceState.HELD in states:
        return StudyState.PARTIAL if processed else StudyState.HELD
    return StudyState.IGNORED if states and not processed and states <= {InstanceState.IGNORED} else StudyState.DONE


def _end_studies(session: Session, studies: Sequence[Study]) -> None:
    """Each of ``studies`` (no job of them open) to its :func:`end_state`, in one query."""
    if not studies:
        return
    session.flush()
    states: dict[int, set[InstanceState]] = {}
    rows = session.execute(select(Instance.study_id, Instance.state).where(Instance.study_id.in_([st.id for st in studies])).distinct())
    for study_id, state in rows:
        states.setdefault(study_id, set()).add(state)
    for study in studies:
        _set_study(study, end_state(states.get(study.id, ())))


def _open_jobs(session: Session, study_id: int) -> int:
    return int(
        session.scalar(select(func.count()).select_from(Job).where(Job.study_id == study_id, Job.state.in_([JobState.PENDING, JobState.PROCESSING])))
        or 0
    )


def _label(kind: str, row_id: int | None, uid: str, session: Session | None) -> str:
    """How log lines name a row: its id, and the keyed hash of its original UID when the
    session carries the node's namer."""
    namer = session.info.get("log_id") if session is not None else None
    return f"{kind} {row_id} ({namer(uid)})" if namer and uid else f"{kind} {row_id}"


def _set_study(study: Study, state: StudyState) -> None:
    if study.state != state:
        log.info("%s: %s -> %s", _label("study", study.id, study.study_uid, object_session(study)), study.state.value, state.value)
        study.state = state


def _set_instance(inst: Instance, state: InstanceState, reason: str = "") -> None:
    if inst.state != state:
        shown = f" ({reason})" if reason and state in (InstanceState.QUARANTINED, InstanceState.HELD) else ""
        level = logging.WARNING if state == InstanceState.QUARANTINED else logging.INFO
        log.log(level, "%s: %s -> %s%s", _label("instance", inst.id, inst.sop_instance_uid, object_session(inst)), inst.state.value, state.value, shown)
        inst.state_changed_at = utcnow()
    inst.state = state
    inst.reason = reason


# -- jobs: claims with leases ---------------------------------------------------------------
def _claimable_job(now: dt.datetime):
    return or_(
        and_(Job.state == JobState.PENDING, or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)),
        and_(Job.state == JobState.PROCESSING, Job.lease_until < now),
    )


def claim_jobs(session: Session, owner: str, lease_s: float, max_attempts: int = 3, limit: int = 512) -> list[Job]:
    """Claim due PENDING jobs, and PROCESSING ones whose lease expired, of one route, for
    ``owner`` until ``lease_s`` seconds from now (database time).

    Whole studies are taken in study order, several ready studies together up to
    ``limit`` jobs, so that a route's steps see each study whole and the pixel step can
    batch images across studies. A study larger than ``limit`` comes in parts.

    Poison jobs: ``attempts`` counts the tries of a job that ended without a result (a
    step raised for the whole batch, the worker died or lost its lease). A job on its
    last try (``attempts >= max_attempts - 1``, and at least one try behind it) is
    claimed alone, so that an object that crashes its batch takes no other object down
    with it; a job with ``attempts >= max_attempts`` is quarantined here instead of
    being claimed again, so a crash loop ends.
    """
    now = db_now(session)
    claimable = _claimable_job(now)
    last_try = max(1, max_attempts - 1)
    ids: list[int] = []
    for _ in range(10_000):  # each round quarantines one exhausted job, or claims
        first = session.execute(
            select(Job.id, Job.route, Job.attempts).where(claimable).order_by(Job.study_id, Job.id).limit(1).with_for_update(skip_locked=True)
        ).first()
        if first is None:
            return []
        if first.attempts >= max_attempts:
            _exhausted(session, first.id, claimable, max_attempts)
            continue
        if first.attempts >= last_try:
            ids = [first.id]
            break
        rows = session.execute(
            select(Job.id, Job.study_id)
            .where(claimable, Job.route == first.route, Job.attempts < last_try)
            .order_by(Job.study_id, Job.id)
            .limit(limit + 1)
            .with_for_update(skip_locked=True)
        ).all()
        if len(rows) > limit:  # do not split the last study unless it alone exceeds the limit
            last_study = rows[-1][1]
            whole = [r for r in rows[:limit] if r[1] != last_study]
            rows = whole or rows[:limit]
        ids = [r[0] for r in rows]
        break
    if not ids:
        return []
    lease = now + dt.timedelta(seconds=lease_s)
    # Guarded update: only rows still claimable are taken (another worker may race).
    session.execute(
        update(Job)
        .where(Job.id.in_(ids), claimable)
        .values(state=JobState.PROCESSING, owner=owner, lease_until=lease, attempts=Job.attempts + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    # Their instances in the same round trip (the pipeline reads every one's path).
    return list(
        session.scalars(
            select(Job).where(Job.id.in_(ids), Job.owner == owner, Job.state == JobState.PROCESSING).order_by(Job.study_id, Job.id)
            .options(selectinload(Job.instance))
            .execution_options(populate_existing=True)
        )
    )


def _exhausted(session: Session, job_id: int, claimable, max_attempts: int) -> None:
    """A job whose tries are used up (it never finished): QUARANTINED, if still claimable."""
    taken = session.execute(update(Job).where(Job.id == job_id, claimable).values(owner=None).execution_options(synchronize_session=False)).rowcount
    if taken != 1:
        return
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    last = job.reason or "the worker stopped or lost its lease while processing it"
    _quarantine(session, job, f"gave up after {job.attempts} tries (max_job_attempts = {max_attempts}); last: {last}")


def renew_jobs(session: Session, owner: str, ids: Sequence[int], lease_s: float) -> int:
    """Extend ``owner``'s lease on the jobs ``ids`` that are still its own and still
    PROCESSING to ``lease_s`` seconds from now (database time); returns how many."""
    if not ids:
        return 0
    lease = db_now(session) + dt.timedelta(seconds=lease_s)
    return int(
        session.execute(
            update(Job).where(Job.id.in_(list(ids)), Job.owner == owner, Job.state == JobState.PROCESSING).values(lease_until=lease)
            .execution_options(synchronize_session=False)
        ).rowcount
        or 0
    )


def _hold(session: Session, model, row_id: int, owner: str, state) -> bool:
    """True when the row is still ``owner``'s claim in ``state``; it is then locked for
    the rest of the caller's transaction (a row lock on PostgreSQL, the write lock on
    SQLite), so no other worker can take it before the caller commits."""
    table = model.__table__
    with session.no_autoflush:  # the caller's pending changes to the row wait for the verdict
        res = session.execute(update(table).where(table.c.id == row_id, table.c.owner == owner, table.c.state == state).values(owner=owner))
    return res.rowcount == 1


def _held_job(session: Session, job: Job, owner: str) -> bool:
    """Whether ``job`` is still ``owner``'s claim (then locked till commit); when not,
    the caller's unflushed changes to it are discarded."""
    return bool(hold_jobs(session, [job], owner))


def hold_jobs(session: Session, jobs: Sequence[Job], owner: str) -> list[Job]:
    """Those of ``jobs`` that are still ``owner``'s claims (PROCESSING), in one
    statement; they stay locked for the rest of the caller's transaction (row locks on
    PostgreSQL, the write lock on SQLite), so no other worker can take them before the
    caller commits. The others passed to another worker: the caller's unflushed
    changes to them are discarded, and each is logged."""
    if not jobs:
        return []
    t = Job.__table__
    with session.no_autoflush:  # the caller's pending changes to the rows wait for the verdict
        held = set(
            session.execute(
                update(t).where(t.c.id.in_([j.id for j in jobs]), t.c.owner == owner, t.c.state == JobState.PROCESSING).values(owner=owner).returning(t.c.id)
            ).scalars()
        )
    for job in jobs:
        if job.id not in held:
            session.expire(job)
            log.warning("job %d: its lease passed to another worker; this worker's result is dropped", job.id)
    return [j for j in jobs if j.id in held]


def note_job(job: Job, step: str, value: object) -> None:
    """Put what ``step`` found about this job into its record (a JSON object, one key per
    step), e.g. gate scores or masked boxes. ``value`` must be JSON-serialisable and
    carry no PHI: scores, boxes, names of attributes, never header values."""
    record = json.loads(job.record or "{}")
    record[step] = value
    job.record = json.dumps(record, sort_keys=True)


def finish_job(session: Session, job: Job, outputs: Iterable[Output], destinations: Sequence[str], owner: str | None = None, settle: bool = True) -> bool:
    """PROCESSING -> DONE, with its outputs and one PENDING delivery per destination.

    With ``owner``, only if the job is still that worker's claim; False (nothing
    written) when another worker took it over: the caller gives up. Without it, the
    caller holds the job already (:func:`hold_jobs`). ``settle=False``: the caller
    settles the instance's and study's states itself, once for a whole batch
    (:func:`settle_jobs`)."""
    if owner is not None and not _held_job(session, job, owner):
        return False
    now = utcnow()
    for out in outputs:
        out.job_id = job.id
        session.add(out)
        for dest in destinations:  # output_id is filled in when the session flushes them together
            session.add(Delivery(output=out, destination=dest, state=DeliveryState.PENDING, next_attempt_at=now))
    job.state = JobState.DONE
    job.owner = None
    job.lease_until = None
    job.reason = ""
    job.updated_at = now
    if settle:
        settle_jobs(session, [job])
    return True


def quarantine_job(session: Session, job: Job, reason: str, owner: str | None = None, settle: bool = True) -> bool:
    """PROCESSING -> QUARANTINED: nothing of this object leaves the node (fail closed).

    With ``owner``, only if the job is still that worker's claim; returns whether it
    was quarantined. ``reason`` names the step and the attribute, never a value.
    ``settle``: as for :func:`finish_job`."""
    if owner is not None and not _held_job(session, job, owner):
        return False
    _quarantine(session, job, reason, settle)
    return True


def _quarantine(session: Session, job: Job, reason: str, settle: bool = True) -> None:
    job.state = JobState.QUARANTINED
    job.owner = None
    job.lease_until = None
    job.reason = reason
    job.updated_at = utcnow()
    log.warning("job %d (route %s, %s): QUARANTINED: %s", job.id, job.route, _label("instance", job.instance_id, job.instance.sop_instance_uid, session), reason)
    if settle:
        settle_jobs(session, [job])


def backoff_s(tries: int, base_s: float, max_s: float) -> float:
    """Exponential backoff: ``base_s * 2**(tries - 1)``, at most ``max_s``."""
    return min(max_s, base_s * 2 ** max(0, tries - 1))


def fail_attempt(session: Session, job: Job, owner: str, reason: str, max_attempts: int, base_s: float, max_s: float) -> bool:
    """A try of a claimed job ended without a result (a step raised for the whole
    batch): QUARANTINED when its tries are used up, else PENDING again after a backoff.
    Only if the job is still ``owner``'s; returns whether anything changed."""
    if not _held_job(session, job, owner):
        return False
    if job.attempts >= max_attempts:
        _quarantine(session, job, f"gave up after {job.attempts} tries (max_job_attempts = {max_attempts}); last: {reason}")
        return True
    delay = _back_to_pending(session, job, reason, backoff_s(job.attempts, base_s, max_s))
    log.warning("job %d (route %s): try %d of %d failed (%s); again in %.1f s", job.id, job.route, job.attempts, max_attempts, reason, delay)
    return True


def defer_job(session: Session, job: Job, owner: str | None, reason: str, base_s: float, max_s: float) -> float | None:
    """A try of a claimed job could not run because something it needs is out of reach
    for now (an inference server, the outbox's disk): PENDING again after a backoff,
    and the try is not counted. Only if the job is still ``owner``'s (None: the caller
    holds it already, :func:`hold_jobs`); returns the delay (seconds), None when the job
    was no longer this worker's. Logs nothing: the caller logs once per batch."""
    if owner is not None and not _held_job(session, job, owner):
        return None
    job.deferrals += 1
    job.attempts = max(0, job.attempts - 1)
    return _back_to_pending(session, job, reason, backoff_s(job.deferrals, base_s, max_s))


def _back_to_pending(session: Session, job: Job, reason: str, delay: float) -> float:
    """PROCESSING -> PENDING, claimable again ``delay`` seconds from now (database time)."""
    job.state = JobState.PENDING
    job.owner = None
    job.lease_until = None
    job.reason = reason
    job.next_attempt_at = db_now(session) + dt.timedelta(seconds=delay)
    job.updated_at = utcnow()
    return delay


def settle_jobs(session: Session, jobs: Sequence[Job]) -> None:
    """The states of the instances and studies of ``jobs``, which just ended (DONE or
    QUARANTINED): an instance is QUARANTINED when any of its jobs is, PROCESSED when all
    are DONE; a ROUTED study with no open job left takes its :func:`end_state`. A few
    statements for the whole batch.

    The study rows, then the instance rows, are locked first, each in id order
    (PostgreSQL; SQLite's write lock is held already), so that workers ending the last
    jobs of one instance or study at the same moment take turns and the last one sees
    the others' jobs ended (else each would see the other's still open, the instance
    would never be PROCESSED, nor its original deleted by retention). Studies before
    instances: the order in which a C-STORE takes them (its study's row, then the
    instance's unique key), so that the two never wait for each other in a circle."""
    if not jobs:
        return
    session.flush()
    why = {j.instance_id: j.reason for j in jobs if j.state == JobState.QUARANTINED}
    studies = lock_rows(session, Study, {j.study_id for j in jobs})
    instances = lock_rows(session, Instance, {j.instance_id for j in jobs})
    states: dict[int, set[JobState]] = {}
    for instance_id, state in session.execute(select(Job.instance_id, Job.state).where(Job.instance_id.in_([i.id for i in instances]))):
        states.setdefault(instance_id, set()).add(state)
    for inst in instances:
        mine = states.get(inst.id, set())
        if JobState.QUARANTINED in mine and inst.state != InstanceState.QUARANTINED:
            reason = why.get(inst.id) or session.scalar(select(Job.reason).where(Job.instance_id == inst.id, Job.state == JobState.QUARANTINED).limit(1)) or ""
            _set_instance(inst, InstanceState.QUARANTINED, reason)
        elif mine == {JobState.DONE}:
            _set_instance(inst, InstanceState.PROCESSED)
    routed = [st for st in studies if st.state == StudyState.ROUTED]
    if routed:
        session.flush()
        still_open = set(
            session.scalars(
                select(Job.study_id).where(Job.study_id.in_([st.id for st in routed]), Job.state.in_([JobState.PENDING, JobState.PROCESSING])).distinct()
            )
        )
        _end_studies(session, [st for st in routed if st.id not in still_open])


def take_over(session: Session, node_id: str, owner: str) -> tuple[int, int]:
    """At start: expire the claims that this node's previous run left (owner tokens
    ``<node_id>/...`` other than ``owner``), so that they are claimed again now rather
    than when their leases run out. Returns (jobs, deliveries) released."""
    now = db_now(session)
    prefix = f"{node_id}/"
    mine_before = and_(Job.owner.startswith(prefix, autoescape=True), Job.owner != owner)
    jobs = session.execute(
        update(Job).where(Job.state == JobState.PROCESSING, mine_before).values(lease_until=now - dt.timedelta(seconds=1))
        .execution_options(synchronize_session=False)
    ).rowcount
    deliveries = session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.SENDING, Delivery.owner.startswith(prefix, autoescape=True), Delivery.owner != owner)
        .values(lease_until=now - dt.timedelta(seconds=1))
        .execution_options(synchronize_session=False)
    ).rowcount
    if jobs or deliveries:
        log.info("took up the previous run's claims: %d jobs, %d deliveries", jobs, deliveries)
    return int(jobs or 0), int(deliveries or 0)


# -- deliveries -----------------------------------------------------------------------------
def claim_deliveries(session: Session, destination: str, owner: str, lease_s: float, limit: int = 256) -> list[Delivery]:
    """Claim due deliveries of one destination (and SENDING ones whose lease expired)
    for ``owner`` until ``lease_s`` seconds from now (database time)."""
    now = db_now(session)
    due = and_(
        Delivery.destination == destination,
        or_(
            and_(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.RETRY_WAIT]), Delivery.next_attempt_at <= now),
            and_(Delivery.state == DeliveryState.SENDING, Delivery.lease_until < now),
        ),
    )
    ids = list(session.scalars(select(Delivery.id).where(due).order_by(Delivery.id).limit(limit).with_for_update(skip_locked=True)))
    if not ids:
        return []
    lease = now + dt.timedelta(seconds=lease_s)
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(ids), due)
        .values(state=DeliveryState.SENDING, owner=owner, lease_until=lease)
        .execution_options(synchronize_session=False)
    )
    return list(
        session.scalars(
            select(Delivery).where(Delivery.id.in_(ids), Delivery.owner == owner, Delivery.state == DeliveryState.SENDING).order_by(Delivery.id)
            .options(selectinload(Delivery.output))  # the dispatcher reads every one's file
            .execution_options(populate_existing=True)
        )
    )


def renew_deliveries(session: Session, owner: str, ids: Sequence[int], lease_s: float) -> tuple[set[int], dt.datetime]:
    """Extend ``owner``'s unexpired lease on the deliveries ``ids`` (still SENDING) to
    ``lease_s`` seconds from now (database time). Returns the ids still held and the
    new ``lease_until``. An expired lease is not renewed: its holder gives up, since
    another worker may have claimed the delivery already."""
    now = db_now(session)
    lease = now + dt.timedelta(seconds=lease_s)
    if not ids:
        return set(), lease
    d = Delivery.__table__
    held = session.execute(
        update(d)
        .where(d.c.id.in_(list(ids)), d.c.owner == owner, d.c.state == DeliveryState.SENDING, d.c.lease_until > now)
        .values(lease_until=lease)
        .returning(d.c.id)
    ).scalars().all()
    return set(held), lease


def _set_delivery(session: Session, delivery: Delivery, owner: str, **values) -> bool:
    """One guarded UPDATE of a claimed delivery; True when it was still ``owner``'s."""
    d = Delivery.__table__
    res = session.execute(
        update(d).where(d.c.id == delivery.id, d.c.owner == owner, d.c.state == DeliveryState.SENDING).values(owner=None, lease_until=None, **values)
    )
    return res.rowcount == 1


def mark_sent(session: Session, delivery: Delivery, owner: str) -> bool:
    """SENDING -> SENT, if still ``owner``'s (else another worker took it over: False)."""
    ok = _set_delivery(session, delivery, owner, state=DeliveryState.SENT, attempts=delivery.attempts + 1, sent_at=utcnow(), reason="")
    log.debug("delivery %d (-> %s): SENT", delivery.id, delivery.destination)
    return ok


def mark_retry(session: Session, delivery: Delivery, owner: str, reason: str, base_s: float, max_s: float, max_attempts: int) -> str | None:
    """SENDING -> RETRY_WAIT with exponential backoff, or FAILED after max_attempts.
    Returns the new state's name, None when the delivery was no longer ``owner``'s.
    Logs at debug level only: the dispatcher logs the destination's state changes."""
    attempts = delivery.attempts + 1
    if attempts >= max_attempts:
        ok = _set_delivery(session, delivery, owner, state=DeliveryState.FAILED, attempts=attempts, reason=reason)
        log.debug("delivery %d (-> %s): FAILED after %d attempts: %s", delivery.id, delivery.destination, attempts, reason)
        return DeliveryState.FAILED.value if ok else None
    delay = backoff_s(attempts, base_s, max_s)
    due = db_now(session) + dt.timedelta(seconds=delay)
    ok = _set_delivery(session, delivery, owner, state=DeliveryState.RETRY_WAIT, attempts=attempts, reason=reason, next_attempt_at=due)
    log.debug("delivery %d (-> %s): RETRY_WAIT %.0fs (attempt %d): %s", delivery.id, delivery.destination, delay, attempts, reason)
    return DeliveryState.RETRY_WAIT.value if ok else None


def release(session: Session, delivery: Delivery, owner: str) -> bool:
    """SENDING -> PENDING without counting an attempt (not tried: the node is stopping
    or the batch was cut short), if still ``owner``'s."""
    return _set_delivery(session, delivery, owner, state=DeliveryState.PENDING)


def mark_failed(session: Session, delivery: Delivery, owner: str, reason: str) -> bool:
    """SENDING -> FAILED at once (a permanent error): the dead-letter queue."""
    ok = _set_delivery(session, delivery, owner, state=DeliveryState.FAILED, attempts=delivery.attempts + 1, reason=reason)
    log.debug("delivery %d (-> %s): FAILED: %s", delivery.id, delivery.destination, reason)
    return ok


UNCONFIGURED_REASON = "its destination is no longer configured ([[destinations]]); owed until [retention] unconfigured_days"
GIVEN_UP_REASON = "its output was deleted by retention ([retention] unconfigured_days) while the destination was not configured"


def sort_unconfigured(session: Session, configured: Iterable[str]) -> tuple[int, int]:
    """Deliveries still owed (PENDING, RETRY_WAIT, FAILED, or SENDING with an expired
    lease) to a destination not in ``configured`` -> UNCONFIGURED, ``next_attempt_at``
    set to now (database time: retention counts ``unconfigured_days`` from it); and
    UNCONFIGURED ones whose destination is configured again -> PENDING (to be sent, with
    their tries reset), or FAILED when retention deleted their output meanwhile.
    Returns (made UNCONFIGURED, back to PENDING or FAILED)."""
    names = sorted(set(configured))
    now = db_now(session)
    owed = or_(
        Delivery.state.in_([DeliveryState.PENDING, DeliveryState.RETRY_WAIT, DeliveryState.FAILED]),
        and_(Delivery.state == DeliveryState.SENDING, Delivery.lease_until < now),
    )
    gone = session.execute(
        update(Delivery).where(owed, Delivery.destination.not_in(names))
        .values(state=DeliveryState.UNCONFIGURED, owner=None, lease_until=None, next_attempt_at=now, reason=UNCONFIGURED_REASON)
        .execution_options(synchronize_session=False)
    ).rowcount or 0
    back = and_(Delivery.state == DeliveryState.UNCONFIGURED, Delivery.destination.in_(names))
    kept = Delivery.output_id.in_(select(Output.id).where(Output.purged_at.is_(None)))
    again = session.execute(
        update(Delivery).where(back, kept).values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, reason="")
        .execution_options(synchronize_session=False)
    ).rowcount or 0
    again += session.execute(
        update(Delivery).where(back, ~kept).values(state=DeliveryState.FAILED, reason=GIVEN_UP_REASON).execution_options(synchronize_session=False)
    ).rowcount or 0
    if gone:
        log.warning("%d deliveries are owed to destinations no longer configured: UNCONFIGURED (casemask status)", gone)
    if again:
        log.info("%d UNCONFIGURED deliveries have their destination again", again)
    return int(gone), int(again)


def requeue_failed(session: Session, destination: str | None = None) -> int:
    """FAILED -> PENDING (``casemask retry``); returns how many. Deliveries whose
    outbox file retention deleted cannot be sent again and stay FAILED."""
    cond = and_(Delivery.state == DeliveryState.FAILED, Delivery.output_id.in_(select(Output.id).where(Output.purged_at.is_(None))))
    if destination:
        cond = and_(cond, Delivery.destination == destination)
    n = session.execute(
        update(Delivery).where(cond).values(state=DeliveryState.PENDING, attempts=0, owner=None, next_attempt_at=db_now(session), reason="")
    ).rowcount
    if n:
        log.info("re-queued %d FAILED deliveries%s", n, f" to {destination}" if destination else "")
    return int(n or 0)


def hasten_waiting(session: Session, destination: str | None = None) -> int:
    """RETRY_WAIT deliveries due now, their attempts counted from 0 again (``casemask
    retry`` after the admin fixed a destination: otherwise each waits up to
    ``retry_max_s`` for its next attempt); returns how many. A delivery a dispatcher
    claims meanwhile is SENDING and not touched."""
    cond = Delivery.state == DeliveryState.RETRY_WAIT
    if destination:
        cond = and_(cond, Delivery.destination == destination)
    n = session.execute(update(Delivery).where(cond).values(attempts=0, next_attempt_at=db_now(session))).rowcount
    if n:
        log.info("%d waiting deliveries%s due now", n, f" to {destination}" if destination else "")
    return int(n or 0)


def requeue_quarantined(session: Session) -> int:
    """QUARANTINED jobs -> PENDING (after the admin fixed the cause), with their tries
    reset; returns how many. Objects whose spooled file retention deleted stay."""
    jobs = list(
        session.scalars(
            select(Job).join(Instance, Instance.id == Job.instance_id).where(Job.state == JobState.QUARANTINED, Instance.purged_at.is_(None))
        )
    )
    for job in jobs:
        requeue_job(session, job)
    return len(jobs)


def requeue_missing_files(session: Session, data_dir: Path) -> int:
    """QUARANTINED -> RECEIVED for the objects routing quarantined because their spool
    file was missing (:data:`SPOOL_FILE_MISSING`) whose file is there now (the data
    folder is back), and RECEIVING for their studies, so that they are routed at the
    next tick (``casemask retry --quarantined``); returns how many."""
    rows = session.scalars(select(Instance).where(Instance.state == InstanceState.QUARANTINED, Instance.reason == SPOOL_FILE_MISSING, Instance.purged_at.is_(None)))
    back = [i for i in rows if data_path(data_dir, i.path).exists()]
    for inst in back:
        _set_instance(inst, InstanceState.RECEIVED, "")
    studies = {i.study_id for i in back}
    for study in session.scalars(select(Study).where(Study.id.in_(studies))) if studies else ():
        _set_study(study, StudyState.RECEIVING)
    session.flush()
    return len(back)


def requeue_job(session: Session, job: Job) -> None:
    """QUARANTINED -> PENDING with its tries reset: process this job again (its study
    reopens if it had ended).

    Raises:
        ValueError: the job is not quarantined, or retention already deleted its original.
    """
    if job.state != JobState.QUARANTINED:
        raise ValueError(f"job {job.id} is {job.state.value}, not QUARANTINED")
    if job.instance.purged_at is not None:
        raise ValueError(f"job {job.id}: its original was deleted by retention ([retention] quarantine_days); it cannot be processed again")
    job.state = JobState.PENDING
    job.reason = ""
    job.owner = None
    job.attempts = 0
    job.deferrals = 0
    job.next_attempt_at = None
    job.updated_at = utcnow()
    _set_instance(job.instance, InstanceState.ROUTED)
    study = session.get(Study, job.study_id)
    if study is not None and study.state in STUDY_ENDED:
        _set_study(study, StudyState.ROUTED)


def discard_job(session: Session, job: Job, reason: str) -> None:
    """QUARANTINED -> DISCARDED: an operator gave up on it; nothing of it is ever sent.
    Its instance becomes IGNORED once none of its jobs is quarantined or open."""
    if job.state != JobState.QUARANTINED:
        raise ValueError(f"job {job.id} is {job.state.value}, not QUARANTINED")
    job.state = JobState.DISCARDED
    job.reason = reason
    job.updated_at = utcnow()
    log.info("job %d (route %s): QUARANTINED -> DISCARDED", job.id, job.route)
    session.flush()
    inst = job.instance
    states = set(session.scalars(select(Job.state).where(Job.instance_id == inst.id)))
    if states <= {JobState.DONE, JobState.DISCARDED}:
        _set_instance(inst, InstanceState.PROCESSED if JobState.DONE in states else InstanceState.IGNORED, reason)
    study = session.get(Study, job.study_id)
    if study is not None and study.state in STUDY_ENDED:  # e.g. QUARANTINED -> IGNORED once the last one is discarded
        _end_studies(session, [study])


def counts(session: Session) -> dict[str, dict[str, int]]:
    """Counts per state, for instances, studies and jobs, and per destination."""
    out: dict[str, dict[str, int]] = {}
    for name, model in (("studies", Study), ("instances", Instance), ("jobs", Job)):
        rows = session.execute(select(model.state, func.count()).group_by(model.state)).all()
        out[name] = {str(s.value): int(n) for s, n in rows}
    rows = session.execute(select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)).all()
    for dest, state, n in rows:
        out.setdefault(f"destination:{dest}", {})[str(state.value)] = int(n)
    conflicts = session.scalar(select(func.count()).select_from(Conflict))
    if conflicts:
        out["conflicts"] = {"refused": int(conflicts)}
    return out
