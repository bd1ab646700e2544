"""What a node checks and prepares before it starts: an owner-only data folder, the
pseudonym secret (a file or an environment variable, shared by every node of a
cluster), the secret's fingerprint in the database, and the fingerprint of the routes
that held objects were judged by.

A node refuses to start (:class:`StartupError`, ``casemask serve`` exits 2) rather than
run with a secret other than the one its database was made with: pseudonyms would
silently change, and the same patient would become two.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path

from typing import TYPE_CHECKING

from node.config import NodeSettings, Route

if TYPE_CHECKING:  # the database is imported where it is used: `casemask` starts light
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

SECRET_FINGERPRINT_KEY = "secret_fingerprint"
ROUTES_FINGERPRINT_KEY = "routes_fingerprint"
_FINGERPRINT_LABEL = b"casemask pseudonym secret fingerprint v1"


class StartupError(RuntimeError):
    """The node must not start; the message says why and what to do."""


def owner_only_folder(path: Path) -> None:
    """Make ``path`` (and parents), and make it 0700: it holds patient data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = path.stat().st_mode & 0o777
    if mode != 0o700:
        os.chmod(path, 0o700)
        log.info("data folder %s: mode %o -> 700 (it holds patient data)", path, mode)


def load_secret(node: NodeSettings) -> bytes:
    """The pseudonym secret: from the environment variable ``[node] secret_env`` when
    set (never created: all nodes must share it), else from ``secret_path`` (default
    ``data_dir/secret.key``, created 0600 on first start).

    Raises:
        StartupError: the variable is unset or not hex of at least 16 bytes, or the
            file is readable by others or not hex.
    """
    if node.secret_env:
        text = os.environ.get(node.secret_env, "").strip()
        if not text:
            raise StartupError(f"[node] secret_env = {node.secret_env!r}, but that environment variable is not set: set it to the cluster's secret (hex)")
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise StartupError(f"environment variable {node.secret_env} must hold the secret as hex digits") from None
        if len(secret) < 16:
            raise StartupError(f"environment variable {node.secret_env} holds {len(secret)} bytes: the secret must be at least 16 bytes (32 hex digits)")
        return secret
    return read_secret_file(node.resolved_secret_path)


def read_secret_file(path: Path) -> bytes:
    """The pseudonym secret in ``path`` (made, mode 0600, when absent), for every command
    that reads it (serve, deid, status, export).

    Raises:
        StartupError: the file is readable by group or others, does not hold hex
            digits, or holds fewer than 16 bytes; the message says what to do and
            quotes nothing from the file.
    """
    from node.deid import load_or_create_secret

    what = f"write 64 hex digits into it (openssl rand -hex 32 > {path}; chmod 600 {path}), or name a file that does not exist yet and casemask makes one"
    try:
        secret = load_or_create_secret(path)
    except PermissionError as exc:
        raise StartupError(str(exc)) from None
    except ValueError:
        raise StartupError(f"{path} must hold the pseudonym secret as hex digits: {what}") from None
    if len(secret) < 16:
        raise StartupError(f"{path} holds {len(secret)} bytes: the pseudonym secret must be at least 16 bytes (32 hex digits); {what}")
    return secret


def fingerprint(secret: bytes) -> str:
    """A fingerprint of the secret that reveals nothing about it: HMAC-SHA256 of a
    fixed label under the secret, 16 hex digits."""
    return hmac.new(secret, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def _meta_get(session: Session, key: str) -> str | None:
    from sqlalchemy import select

    from node.db import Meta

    return session.scalar(select(Meta.value).where(Meta.key == key))


def _meta_put_once(session: Session, key: str, value: str) -> str:
    """Insert ``key`` unless it exists; returns the stored value (another node starting
    at the same moment may have inserted it first)."""
    from node.db import Meta, insert_if_absent

    insert_if_absent(session, Meta, [{"key": key, "value": value}])
    stored = _meta_get(session, key)
    assert stored is not None
    return stored


def recorded_fingerprint(engine) -> str | None:
    """The secret fingerprint a database records, or None for a database (or a schema)
    that holds none yet."""
    from sqlalchemy import inspect
    from sqlalchemy.orm import Session as _Session

    from node.db import Meta

    if not inspect(engine).has_table(Meta.__tablename__):
        return None
    with _Session(engine) as session:
        return _meta_get(session, SECRET_FINGERPRINT_KEY)


def refuse_lost_secret(engine, node: NodeSettings) -> None:
    """Refuse to make a new secret file for a database made with a secret.

    ``load_secret`` creates ``secret_path`` when it is absent, which is right on a first
    start; on a database that already records a secret's fingerprint the file was lost
    or moved, and a new one would only be refused a moment later by ``check_secret``,
    after writing a stray secret where the admin restores the right one.

    Raises:
        StartupError: the secret file is absent and the database records a secret's
            fingerprint; the message says to restore it.
    """
    if node.secret_env or node.resolved_secret_path.exists():
        return
    stored = recorded_fingerprint(engine)
    if stored is not None:
        raise StartupError(
            f"the pseudonym secret file {node.resolved_secret_path} is missing, but the database was made with a secret (fingerprint {stored}). "
            "A new secret would change every pseudonym: restore the file from your backup (mode 0600), "
            "or point [node] secret_path / secret_env at it. casemask writes no new secret for an existing database."
        )


def secret_for_tool(node: NodeSettings) -> bytes:
    """The node's pseudonym secret for a command run beside the node on its config
    (``casemask deid --config``): from ``secret_env`` when the node reads it there,
    else from ``secret_path``, made only when the node's database does not exist yet or
    records no secret. Opens the database only to read the fingerprint; creates none.

    Raises:
        StartupError: as ``load_secret``; or the secret file is missing while the
            node's database records a secret (or cannot be read to tell).
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    if not node.secret_env and not node.resolved_secret_path.exists():
        url = make_url(node.resolved_database_url)
        if not url.drivername.startswith("sqlite") or (url.database and Path(url.database).exists()):
            engine = create_engine(url)
            try:
                refuse_lost_secret(engine, node)
            except SQLAlchemyError:
                raise StartupError(
                    f"the pseudonym secret file {node.resolved_secret_path} is missing and the node's database could not be read "
                    "to tell whether it was made with one: restore the secret file, or name another with --secret"
                ) from None
            finally:
                engine.dispose()
    return load_secret(node)


def check_secret(session: Session, secret: bytes, where: str) -> None:
    """Store the secret's fingerprint in a new database; compare it in an old one.

    Raises:
        StartupError: the database was made with another secret.
    """
    mine = fingerprint(secret)
    stored = _meta_get(session, SECRET_FINGERPRINT_KEY) or _meta_put_once(session, SECRET_FINGERPRINT_KEY, mine)
    if stored != mine:
        raise StartupError(
            f"the database {where} was made with another pseudonym secret (fingerprint {stored}; the configured secret's is {mine}). "
            "Pseudonyms would change. Configure the secret it was made with ([node] secret_path or secret_env), or use another data_dir / database_url."
        )


def routes_changed(session: Session, routes: list[Route]) -> bool:
    """Whether the routes differ from those of the last start (recorded now); True when
    no start recorded them (held objects made then are judged again)."""
    from node.db import Meta

    digest = hashlib.sha256(json.dumps([r.model_dump(mode="json") for r in routes], sort_keys=True).encode()).hexdigest()
    row = session.get(Meta, ROUTES_FINGERPRINT_KEY)
    if row is None:
        return _meta_put_once(session, ROUTES_FINGERPRINT_KEY, digest) == digest
    if row.value == digest:
        return False
    row.value = digest
    return True
