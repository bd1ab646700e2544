"""The database's schema, managed by Alembic migrations (``node/migrations``).

:func:`prepare` runs whenever a process opens the database (``node.db.make_engine``),
and ``casemask db upgrade`` runs it on purpose. It upgrades only when that is safe:

- the database is at this version's revision (:data:`HEAD`): nothing to do (one
  ``SELECT``, no lock);
- its revision is one this version does not know: a newer casemask upgraded it. The
  process refuses (:class:`SchemaError`): running older code on a newer schema could
  write rows the newer nodes misread;
- it is empty, or behind (including a database of the release before migrations, made
  by ``create_all``, which has no revision yet): upgraded in one transaction, under a
  lock that makes processes starting together take turns (PostgreSQL: an advisory
  lock; SQLite: ``BEGIN IMMEDIATE``, the database's write lock), the revision read
  again under it. On PostgreSQL it refuses while a casemask process of another
  version is connected (each connection names its version in ``application_name``,
  ``casemask/<revision>/<node id>``): stop the other nodes, upgrade, start them again.

PostgreSQL changes the schema transactionally; SQLite does too here, because the
transaction is begun explicitly (pysqlite would otherwise commit DDL piecemeal).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine

from node.startup import StartupError

log = logging.getLogger(__name__)

HEAD = "0005"  # the newest revision under node/migrations/versions (a test checks it)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_LOCK = 0x6361_7365_6D61_736B  # "casemask": the advisory lock key of schema changes


class SchemaError(StartupError):
    """The database's schema is not this version's and cannot be upgraded now; the
    message says why and what to do."""


def _config(connection: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def known_revisions() -> set[str]:
    """Every revision this version's migrations define."""
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}


def script_head() -> str:
    """The newest revision of the migration scripts (what :data:`HEAD` must say)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head() or ""


def current_revision(conn: Connection) -> str | None:
    """The database's revision; None for an empty database or one made before
    migrations (``create_all``, no ``alembic_version`` table)."""
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _other_versions(conn: Connection) -> list[str]:
    """PostgreSQL: application names of connections of casemask processes of another
    schema revision (other than this connection)."""
    rows = conn.execute(
        text(
            "SELECT DISTINCT application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name LIKE 'casemask/%' AND application_name NOT LIKE :mine"
        ),
        {"mine": f"casemask/{HEAD}/%"},
    ).scalars()
    return sorted(rows)


def _begin_locked(conn: Connection) -> None:
    """Begin the upgrade's transaction holding the lock that serialises schema changes."""
    if conn.dialect.name == "sqlite":
        # Foreign keys off while tables are rebuilt (checked before commit); the pragma
        # has no effect inside a transaction, so it comes first.
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})


def _end(conn: Connection, commit: bool) -> None:
    try:
        if commit and conn.dialect.name == "sqlite":
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise SchemaError(f"the upgraded database breaks {len(broken)} foreign keys (table {broken[0][0]}): not committed; the database is as it was")
        (conn.commit if commit else conn.rollback)()
    except BaseException:
        conn.rollback()
        raise
    finally:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def prepare(engine: Engine, upgrade: bool = True) -> tuple[str | None, str] | None:
    """Make sure the database has this version's schema; returns (from, to) when it
    upgraded, None when it was current.

    ``upgrade=False``: only check (a database behind is then an error too).

    Raises:
        SchemaError: the database was upgraded by a newer casemask; or it is behind and
            ``upgrade`` is False; or (PostgreSQL) casemask processes of another version
            are connected to it.
    """
    with engine.connect() as conn:
        if current_revision(conn) == HEAD:
            conn.rollback()
            return None
        conn.rollback()
        _begin_locked(conn)
        done = False
        try:
            before = current_revision(conn)  # again, under the lock: another process may have upgraded
            if before == HEAD:
                return None
            if before is not None and before not in known_revisions():
                raise SchemaError(
                    f"the database is at schema revision {before}, which this casemask (revision {HEAD}) does not know: "
                    "a newer casemask upgraded it. Run that version (or restore the database's backup)."
                )
            if not upgrade:
                raise SchemaError(f"the database's schema is at revision {before or 'none'}, this casemask needs {HEAD}: run `casemask db upgrade`")
            if conn.dialect.name == "postgresql":
                others = _other_versions(conn)
                if others:
                    raise SchemaError(
                        f"the database's schema is at revision {before or 'none'} and this casemask needs {HEAD}, but casemask processes of another "
                        f"version are connected ({', '.join(others)}): stop them, then start this one (or run `casemask db upgrade`)"
                    )
            from alembic import command
            from sqlalchemy import inspect

            empty = before is None and not inspect(conn).get_table_names()
            command.upgrade(_config(conn), "head")
            done = True
        finally:
            _end(conn, done)
    if empty:
        log.info("new database: schema made at revision %s", HEAD)
    else:
        log.info("database schema upgraded from revision %s to %s", before or "none (made before migrations)", HEAD)
    return before, HEAD
