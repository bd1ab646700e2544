"""Group commit of received rows: one thread and one database connection per listening
process commit the rows of all concurrent C-STOREs, several per transaction.

A C-STORE handler hands its row over (:meth:`GroupCommit.record`) and waits; the
committer takes every row waiting at that moment (at most ``max_batch``), inserts them
in one transaction (an UPDATE per study and one INSERT for the whole batch, on the DBAPI
cursor: :func:`queue.record_received_many`, :class:`queue.HotStatements`) and commits once (one WAL fsync for SQLite, one round trip for
PostgreSQL), then wakes each handler with its own outcome. Nothing waits for a batch
to fill: one sender gets its commit at once, concurrent senders share the commits that
are in flight anyway. Associations hold no database connection while they wait for
their next object.

SQLite: the committer's connection does not checkpoint the WAL itself (``PRAGMA
wal_autocheckpoint = 0`` on it); a checkpointer thread copies the WAL back into the
database file (``PRAGMA wal_checkpoint(PASSIVE)``) every :data:`CHECKPOINT_EVERY` rows,
beside the commits. The WAL then restarts from its first frame every few dozen rows and
stays a few hundred kilobytes: its commits overwrite blocks the file already has, and an
fdatasync that changes no metadata waits for no journal commit of the file system (ext4:
0.2 ms instead of 2-9 ms while the WAL grew to its first 4 MB, docs/ingest.md "Where one
C-STORE waits"), and no C-STORE waits for a checkpoint (SQLite's own ran in the COMMIT
of whichever row crossed 1000 pages). A failed checkpoint costs nothing but a larger WAL
(the node's other connections still checkpoint on their own past 1000 pages).

A batch in which any row fails (a re-send of a stored SOP Instance UID, a study that
another process created meanwhile, a database error) is rolled back whole and each of
its rows committed on its own, as :meth:`GroupCommit._record_one` says, so one row's
failure is that row's only. A handler's row is durable when :meth:`record` returns.
"""

from __future__ import annotations

import contextlib
import logging
import queue as queue_module
import threading
from collections.abc import Callable
from concurrent.futures import Future

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from node import queue

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 16  # rows committed between two checkpoints of the WAL (SQLite)

Stored = tuple[str, str, str | None] | None  # (identity, path, digest) of an object stored before, or None


class GroupCommit:
    """The committer of one process (a thread, started at once; :meth:`close` stops it)."""

    def __init__(self, engine: Engine, on_change: Callable[[queue.Received, str], None], max_batch: int = 64) -> None:
        """``on_change(received, change)``: called once a row that changed its study's
        state (``queue.record_received``'s return) is committed."""
        self.engine = engine
        self.on_change = on_change
        self.max_batch = max_batch
        self._waiting: queue_module.SimpleQueue[tuple[queue.Received, Future] | None] = queue_module.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._closed = False
        self._checkpointer = _Checkpointer(engine) if engine.dialect.name == "sqlite" else None
        self._hot = queue.HotStatements(engine.dialect)
        self._thread.start()

    def record(self, received: queue.Received) -> Stored:
        """Commit ``received``'s row; returns None for a new object, else the stored
        object's (identity, path, digest) (a re-send or a conflict; nothing was written).

        Raises:
            RuntimeError: the committer is closed (the node is stopping).
            Exception: what the database raised for this row (not committed).
        """
        if self._closed:
            raise RuntimeError("group commit closed")
        done: Future = Future()
        self._waiting.put((received, done))
        return done.result()

    def close(self) -> None:
        """Commit what is waiting, then stop the thread."""
        self._closed = True
        self._waiting.put(None)
        self._thread.join()
        if self._checkpointer is not None:
            self._checkpointer.close()

    # -- the committer thread -----------------------------------------------------------
    def _run(self) -> None:
        conn: Connection | None = None
        stopping = False
        while not stopping:
            batch = []
            item = self._waiting.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._waiting.get_nowait()
                except queue_module.Empty:
                    break
            stopping = item is None
            if not batch:
                continue
            try:
                if conn is None or conn.closed or conn.invalidated:
                    conn = self._connect()
                self._commit(conn, batch)
                if self._checkpointer is not None:
                    self._checkpointer.committed(len(batch))
            except Exception as exc:  # no connection at all: every row of the batch fails
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
        if conn is not None:
            if self._checkpointer is not None and not (conn.closed or conn.invalidated):
                with contextlib.suppress(Exception):  # back to SQLite's default for the pool's next user
                    conn.exec_driver_sql("PRAGMA wal_autocheckpoint = 1000")
                    conn.commit()
            conn.close()

    def _connect(self) -> Connection:
        conn = self.engine.connect()
        if self._checkpointer is not None:
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job (module docstring)
            conn.commit()
        return conn

    def _commit(self, conn: Connection, batch: list[tuple[queue.Received, Future]]) -> None:
        if len(batch) > 1:
            try:
                with conn.begin():
                    changes = queue.record_received_many(conn, [r for r, _ in batch], self._hot)
            except Exception as exc:  # one row failed (rolled back whole): each on its own below
                log.debug("batch of %d rows rolled back (%s): committing them one by one", len(batch), type(exc).__name__)
            else:
                for (r, done), change in zip(batch, changes):
                    if change:
                        self.on_change(r, change)
                    done.set_result(None)
                return
        for r, done in batch:
            try:
                done.set_result(self._record_one(conn, r))
            except Exception as exc:
                done.set_exception(exc)

    def _record_one(self, conn: Connection, r: queue.Received) -> Stored:
        """Commit one row; on IntegrityError, the stored object under its SOP Instance
        UID, or once more when there is none (another process created the same new
        study at the same moment)."""
        for _ in range(2):
            try:
                with conn.begin():
                    change = queue.record_received(conn, r, self._hot)
                if change:  # only once committed: a rolled-back re-send changes nothing
                    self.on_change(r, change)
                return None
            except IntegrityError:
                with conn.begin():
                    stored = queue.stored_instance(conn, r.sop_instance_uid)
                if stored is not None:
                    return stored
        raise RuntimeError("could not record the object")


class _Checkpointer:
    """SQLite: a thread that checkpoints the WAL (PASSIVE: never waits for readers or
    writers) once :data:`CHECKPOINT_EVERY` rows were committed since the last one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._rows = 0
        self.done = 0  # checkpoints run (tests)
        self._due = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, rows: int) -> None:
        """The committer committed ``rows`` more rows (its own thread only)."""
        self._rows += rows
        if self._rows >= CHECKPOINT_EVERY:
            self._rows = 0
            self._due.set()

    def close(self) -> None:
        self._stopping = True
        self._due.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._stopping:
                return
            try:
                with self.engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                self.done += 1
            except Exception as exc:  # the WAL grows meanwhile; SQLite's own checkpoints still run past 1000 pages
                log.warning("checkpoint of the database's WAL failed (%s): retried after the next rows", type(exc).__name__)
