"""SQLAlchemy 2 typed models and the one engine/session factory of a process.

Two databases: SQLite (the embedded default, a file under ``data_dir``) and PostgreSQL
(``postgresql+psycopg://...``, psycopg 3) for nodes that share one database. The SQL is
portable; what differs lives here: SQLite's settings (WAL, synchronous=FULL, busy
timeout) in :func:`_sqlite_adapter`, the database clock in :func:`db_now`, ON CONFLICT
in :func:`insert_if_absent`. The schema is made and changed by Alembic migrations
(:mod:`node.schema`), never by ``create_all``. State columns hold the enums of
:mod:`node.queue`, the only module that changes them.

Rows name files by their path *relative to* ``data_dir`` (:func:`row_path`,
:func:`data_path`), so that nodes sharing the data folder on a network file system
may mount it anywhere.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Connection,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def utcnow() -> dt.datetime:
    """This process's clock, naive UTC (the columns hold naive UTC times)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# Added to the database's clock by db_now: always zero, except in tests, which move the
# clock with it (on PostgreSQL the server's clock cannot be moved otherwise).
clock_offset = dt.timedelta(0)


def db_now(conn: Connection | Session) -> dt.datetime:
    """The database's clock, naive UTC: what leases, retry times and retention compare
    against, so that nodes whose clocks disagree still agree on who holds what.

    PostgreSQL: ``statement_timestamp()`` of the server. SQLite is embedded, so the
    database's clock *is* this process's clock (:func:`utcnow`). Every comparison with
    it is made with the value returned here (a parameter), never with the SQL's own
    ``now()``, so :data:`clock_offset` moves it everywhere.
    """
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    if bind.dialect.name == "postgresql":
        return conn.execute(select(func.timezone("UTC", func.statement_timestamp()))).scalar_one() + clock_offset
    return utcnow() + clock_offset


class StudyState(enum.StrEnum):
    """A study's state; once no job of it is open it ends in one of the last five, which
    say what became of its objects (node.queue.end_state)."""

    RECEIVING = "RECEIVING"  # objects still arriving (or arrived after the last processing)
    ROUTED = "ROUTED"  # stable: its instances have been routed to jobs
    DONE = "DONE"  # every job of it has finished, and every object was processed (or matched no route, discard)
    PARTIAL = "PARTIAL"  # some objects processed, others quarantined or held: the study went out incomplete
    QUARANTINED = "QUARANTINED"  # no object processed, some quarantined: nothing of it goes out
    HELD = "HELD"  # no object processed, some held (matched no route, unrouted = hold)
    IGNORED = "IGNORED"  # every object matched no route (discard) or was discarded by an operator: nothing goes out


STUDY_ENDED = frozenset({StudyState.DONE, StudyState.PARTIAL, StudyState.QUARANTINED, StudyState.HELD, StudyState.IGNORED})


class InstanceState(enum.StrEnum):
    RECEIVED = "RECEIVED"
    ROUTED = "ROUTED"
    PROCESSED = "PROCESSED"
    QUARANTINED = "QUARANTINED"
    HELD = "HELD"  # matched no route, unrouted = "hold"
    IGNORED = "IGNORED"  # matched no route, unrouted = "discard"


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    QUARANTINED = "QUARANTINED"
    DISCARDED = "DISCARDED"  # an operator gave up on a quarantined job: nothing of it is sent


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"
    SENDING = "SENDING"
    RETRY_WAIT = "RETRY_WAIT"
    SENT = "SENT"
    FAILED = "FAILED"
    # Owed to a destination no longer in the configuration: PENDING again if it comes
    # back; given up after [retention] unconfigured_days. ``next_attempt_at`` holds when
    # it became so (node.queue.sort_unconfigured).
    UNCONFIGURED = "UNCONFIGURED"


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(Enum(StudyState, native_enum=False, length=16), default=StudyState.RECEIVING)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # Keyed hash of the patient (Patient ID with its issuer) of the study's first object
    # routed: an object of another patient under this Study Instance UID is not merged
    # into it (node.queue.join_study). NULL until its first object is routed.
    patient_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Instance(Base):
    __tablename__ = "instances"
    # One index serves both "instances in state S" and retention's "not yet purged" (a
    # second index would cost every C-STORE an extra B-tree insert).
    __table_args__ = (Index("ix_instances_state_purged", "state", "purged_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes; multi-frame objects pass 2 GiB
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_host: Mapped[str] = mapped_column(String(64), default="")
    # Keyed hash of SOP class, study, series and patient: a re-send with the same one is
    # the same object, another one under this SOP Instance UID a conflict (node.scp).
    identity: Mapped[str] = mapped_column(String(32), default="")
    # SHA-256 (hex) of the spool file's bytes as received: the handler links the file
    # under its final name before its data fsync returns, so a crash can leave a torn
    # file under a committed row; readers check this first (docs/ingest.md). NULL: a
    # row written before it existed (its file was fsynced before it was linked).
    digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # The owner token (node.leases) of the process whose C-STORE handler wrote the row:
    # at start, a node drops only rows of its own earlier runs whose file never came.
    received_by: Mapped[str | None] = mapped_column(String(80), nullable=True)
    state: Mapped[InstanceState] = mapped_column(Enum(InstanceState, native_enum=False, length=16), default=InstanceState.RECEIVED)
    reason: Mapped[str] = mapped_column(Text, default="")
    # When the state last changed (NULL: still as received); retention counts from it.
    state_changed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # When retention deleted the spooled file (the row stays for the audit trail).
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    study: Mapped[Study] = relationship(back_populates="instances")


class Conflict(Base):
    """A C-STORE refused (0xC214) because another object is stored under its SOP
    Instance UID."""

    __tablename__ = "conflicts"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_host: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """One instance through one route."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("instance_id", "route"), Index("ix_jobs_state_lease", "state", "lease_until"))

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    route: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16), default=JobState.PENDING)
    # The claim: who holds it (an owner token, see node.leases) and until when (database time).
    owner: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # Tries that ended without a result (failed or interrupted); max_job_attempts quarantines.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Tries put off because a backend was out of reach (never counted as attempts).
    deferrals: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # What the steps found, for review: JSON object, one key per step (e.g. "gates": scores,
    # "burned_in": masked boxes). Pseudonymous values only, never PHI. See queue.note_job.
    record: Mapped[str] = mapped_column(Text, default="{}")
    instance: Mapped[Instance] = relationship()


class Output(Base):
    """A de-identified object made by a job, waiting in the outbox."""

    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # deidentified | anonymized | counterfactual
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    # When retention deleted the outbox file (the row stays for the audit trail).
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)


class Delivery(Base):
    """One output to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("output_id", "destination"),
        Index("ix_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"))
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[DeliveryState] = mapped_column(Enum(DeliveryState, native_enum=False, length=16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    owner: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    output: Mapped[Output] = relationship()


class Pseudonym(Base):
    """Old -> new identifiers, kept so that mappings can be exported (kinds: see
    node.pipeline._collect_mappings: <level>/<output kind>, uid, patient, patient-name,
    date-offset). ``old`` holds PHI in clear: rows are deleted ``[retention]
    mapping_days`` after ``seen_at`` (node.mapping, node.retention)."""

    __tablename__ = "pseudonyms"
    __table_args__ = (UniqueConstraint("kind", "old"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    old: Mapped[str] = mapped_column(String(512))
    new: Mapped[str] = mapped_column(String(128))
    # When the mapping was written, or last met again (refreshed at most once a day).
    seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)


class Meta(Base):
    """Facts about the database itself, e.g. the pseudonym secret's fingerprint (never
    the secret) and the fingerprint of the routes that held objects were judged by."""

    __tablename__ = "node_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def insert_if_absent(conn: Connection | Session, model: type[Base], rows: list[dict]) -> None:
    """INSERT ``rows`` into ``model``'s table, skipping those that would break a unique
    constraint (``ON CONFLICT DO NOTHING``, which SQLite and PostgreSQL both have), so
    that nodes inserting the same row at the same moment do not fail."""
    if not rows:
        return
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    if bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    conn.execute(dialect_insert(model.__table__).on_conflict_do_nothing(), rows)


# -- operators: accounts, tokens, dashboard sessions, audit trail (node.accounts, node.audit)
class Role(enum.StrEnum):
    """What an account or token may do: viewers read, operators act on the queue,
    admins also change the configuration and export mappings."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class User(Base):
    """A person who logs in to the dashboard (password hashed with argon2id)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiToken(Base):
    """A bearer token for the API and /metrics; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class UiSession(Base):
    """A dashboard login: the cookie's SHA-256 and the CSRF token of its forms."""

    __tablename__ = "ui_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    user: Mapped[User] = relationship()


class AuditEvent(Base):
    """One entry of the append-only audit trail (triggers refuse UPDATE and DELETE).

    Pseudonymous references only: a study is named by its row id (exports show its
    pseudonymous Study Instance UID), jobs and deliveries by id, senders by AE title.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    outcome: Mapped[int] = mapped_column(Integer, default=0)  # RFC 3881 EventOutcomeIndicator: 0, 4, 8, 12
    actor: Mapped[str] = mapped_column(String(128), default="")
    actor_kind: Mapped[str] = mapped_column(String(16), default="")  # user | token | ae | node | cli
    host: Mapped[str] = mapped_column(String(64), default="")
    study_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    object_kind: Mapped[str] = mapped_column(String(32), default="")
    object_ref: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON, no PHI


class AuditCursor(Base):
    """How far an audit sink (the syslog forwarder) has sent the trail."""

    __tablename__ = "audit_cursors"

    sink: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)


# The triggers that make audit_events append-only are made by the migration
# (node/migrations/versions/0001_schema.py).


def lock_rows(session: Session, model: type[Base], ids: Iterable[object]) -> list:
    """The rows ``ids`` of ``model``, read afresh and locked until the session's
    transaction ends, in key order so that transactions locking overlapping sets take
    turns instead of deadlocking (PostgreSQL: ``SELECT ... ORDER BY id FOR NO KEY
    UPDATE``, the lock an UPDATE takes, which leaves inserts of rows referring to these
    free; SQLite renders none: a writing transaction holds the database's write lock
    already)."""
    key = model.__mapper__.primary_key[0]
    wanted = sorted(ids)  # type: ignore[type-var]
    if not wanted:
        return []
    query = select(model).where(key.in_(wanted)).order_by(key).with_for_update(key_share=True)
    return list(session.scalars(query.execution_options(populate_existing=True)))


class IndexEntry(Base):
    """One frame of an anonymized output in the index of similar cases (node.index): the
    model's medical vector of the *anonymized* image and the disease probabilities it
    gives, under the output's pseudonymous UIDs. Never an identity vector, never original
    pixels, never a query."""

    __tablename__ = "index_entries"
    __table_args__ = (UniqueConstraint("output_id", "frame"), Index("ix_index_entries_model", "model", "weights"))

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int | None] = mapped_column(ForeignKey("outputs.id"), nullable=True)
    route: Mapped[str] = mapped_column(String(64))
    frame: Mapped[int] = mapped_column(Integer, default=0)
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[int] = mapped_column(Integer)  # index into the model's classes (arg-max of probabilities)
    probabilities: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (classes,)
    medical: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (med_dim,)
    model: Mapped[str] = mapped_column(String(64))  # the [[models]] name
    weights: Mapped[str] = mapped_column(String(16))  # digest of the weights that made the vector
    destinations: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of destination names
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def _sqlite_adapter(engine: Engine) -> None:
    """SQLite only: WAL for concurrent readers, FULL sync so a commit survives power loss,
    deleted content overwritten (node.retention)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA secure_delete=ON")  # deleted rows (the mapping's names) zeroed, whatever SQLite's build default
        cur.close()


def pool_size_for(role: str, associations: int, destinations: int) -> int:
    """Connections one process needs at most at once (docs/cluster.md, "Connection
    budget"); the pool is sized to it unless ``[node] db_pool_size`` says otherwise.

    - ingest: ``associations + 4``: at most one per association *while it stores*
      (rows are committed by one group-commit connection, node.groupcommit; a re-send
      or a conflict takes one for its own transaction; an idle association holds
      none), plus the sweep of unspooled rows, the
      deletion of a row whose file could not be written, and two for the HTTP API and
      the audit records of associations;
    - worker: ``destinations + 5``: routing, processing and its lease keeper,
      retention, the audit forwarder, and one dispatcher per destination;
    - all: both.

    A PostgreSQL server must allow the sum over every process of ``pool size +
    db_max_overflow`` (plus a few for the operators' tools) in ``max_connections``.
    """
    ingest = associations + 4
    worker = destinations + 5
    return {"ingest": ingest, "worker": worker}.get(role, ingest + worker)


def _owner_only_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 when absent, else tighten it to 0600. SQLite
    gives its -wal and -shm files the database file's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)


def make_engine(url: str, pool_size: int = 8, max_overflow: int = 4, pool_timeout_s: float = 30.0, name: str = "", prepare: bool = True) -> Engine:
    """The process's one engine, with at most ``pool_size + max_overflow`` connections
    (a thread waits up to ``pool_timeout_s`` for one). A SQLite database file is
    readable by its owner only (0600). On PostgreSQL every connection carries the
    application name ``casemask/<schema revision>/<name>``, which the schema check
    reads (node.schema) and ``pg_stat_activity`` shows.

    ``prepare``: bring the schema up to date where that is safe, else refuse
    (:func:`node.schema.prepare`).

    Raises:
        node.schema.SchemaError: the schema is not this version's and cannot be
            upgraded now (the message says what to do).
    """
    from node.schema import HEAD

    pool = {"pool_size": max(1, pool_size), "max_overflow": max(0, max_overflow), "pool_timeout": pool_timeout_s}
    if url.startswith("sqlite:///"):
        db_file = Path(url.removeprefix("sqlite:///"))
        db_file.parent.mkdir(parents=True, exist_ok=True)
        _owner_only_file(db_file)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        _sqlite_adapter(engine)
    else:
        connect_args = {"application_name": f"casemask/{HEAD}/{name or 'cli'}"[:63]} if url.startswith("postgresql") else {}
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args, **pool)
    if prepare:
        from node.schema import prepare as prepare_schema

        try:
            prepare_schema(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


def row_path(data_dir: Path, path: Path) -> str:
    """How a row names ``path``: relative to ``data_dir`` (POSIX separators), so that
    every node sharing the data folder finds it wherever the folder is mounted.

    Raises:
        ValueError: ``path`` is not inside ``data_dir``.
    """
    return Path(path).relative_to(data_dir).as_posix()


def data_path(data_dir: Path, stored: str) -> Path:
    """The file a row names. Rows written before paths were relative hold absolute
    paths, which are returned as they are."""
    return data_dir / stored


def make_sessionmaker(engine: Engine, info: dict | None = None) -> sessionmaker:
    """Sessions of the engine. ``info`` is copied into every session's ``info``; the node
    puts its log namer there (``"log_id"``, see node.queue)."""
    return sessionmaker(engine, expire_on_commit=False, info=info or {})
