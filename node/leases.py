"""Who holds claimed work: a node identity, an owner token per worker process, and a
keeper that renews a batch's lease while the batch runs.

An owner token is ``<node_id>/<random>``: the node id stays the same across restarts
(configured as ``[node] node_id`` or made once and kept in ``data_dir/node-id``), the
random part is new for every process. A restarted node therefore recognises the claims
of its previous run by their prefix and takes them up at once (``queue.take_over``),
while claims of other nodes sharing the database wait for their leases to run out.
Nodes that share a data folder must each be given their own ``node_id``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,40}")


def node_identity(data_dir: Path, configured: str = "") -> str:
    """The node's id: ``configured`` when given, else the one kept in
    ``data_dir/node-id`` (made on first start, mode 0600).

    Raises:
        ValueError: the file holds something that is not a node id.
    """
    if configured:
        return configured
    path = data_dir / NODE_ID_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if not _NODE_ID_RE.fullmatch(value):
            raise ValueError(f"{path} does not hold a node id (letters, digits, '.', '_', '-'); delete it to make a new one") from None
        return value
    value = "n" + secrets.token_hex(6)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    return value


def owner_token(node_id: str) -> str:
    """A new owner token for this process: ``<node_id>/<pid>-<random>`` (at most 64 chars)."""
    return f"{node_id}/{os.getpid()}-{secrets.token_hex(4)}"


class LeaseKeeper:
    """Renews a batch's lease in the background while the batch runs::

        with LeaseKeeper(sessions, lambda s: queue.renew_jobs(s, owner, ids, lease_s), len(ids), lease_s / 3):
            ...  # steps that may take longer than the lease

    ``renew(session)`` extends the lease and returns how many rows are still held; the
    keeper commits it every ``every_s`` seconds. When fewer rows than ``expected`` are
    held, :attr:`lost` is set and the keeper stops renewing (the caller's guarded
    finish then gives those rows up). A renewal that raises is logged (its class) and
    tried again at the next beat.
    """

    def __init__(self, sessions: sessionmaker, renew: Callable[[Session], int], expected: int, every_s: float) -> None:
        self.sessions = sessions
        self.renew = renew
        self.expected = expected
        self.every_s = max(0.05, every_s)
        self.lost = False
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing, once a renewal under way has ended. The pipeline calls it
        before it writes the batch's outcome: a renewal then would wait for the rows the
        outcome locks (on PostgreSQL, while holding rows the outcome waits for: a
        deadlock), or count the rows just finished as lost."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with self.sessions() as session:
                    held = self.renew(session)
                    session.commit()
            except Exception as exc:  # the database is busy or away: try again at the next beat
                log.warning("lease renewal failed (%s); trying again in %.1f s", type(exc).__name__, self.every_s)
                continue
            self.renewals += 1
            if held < self.expected:
                self.lost = True
                log.warning("lease lost on %d of %d claimed rows: another worker took them over", self.expected - held, self.expected)
                return


# -- one running process per node id and role --------------------------------------------
# Each process that claims work or sweeps rows by its node id keeps a presence entry in
# node_meta (key "alive/<node_id>/<role>", JSON: owner token, host, PID, time by the
# database's clock) and renews it every PRESENCE_BEAT_S. A second process starting with
# the same node id and an overlapping role refuses to start while that entry is fresh:
# its start-up take-over and sweep would treat the running process's claims and rows as
# a crashed run's (docs/cluster.md). On one host a dead PID (or this process's own: a
# node object made again in the same process, a container's PID 1) is gone at once.
PRESENCE_BEAT_S = 10.0
PRESENCE_STALE_S = 3 * PRESENCE_BEAT_S
_ROLES_MEETING = {"all": ("all", "ingest", "worker"), "ingest": ("ingest", "all"), "worker": ("worker", "all")}


class NodeIdInUse(RuntimeError):
    """Another running process holds this node id in an overlapping role (the message
    says which host and PID, and what to do)."""


def _presence_key(node_id: str, role: str) -> str:
    return f"alive/{node_id}/{role}"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc: kill(0) said it exists
        return True


def _holder(session: Session, node_id: str, role: str, owner: str, now: dt.datetime) -> str | None:
    """A description of a live process (not ``owner``) holding ``node_id`` in a role
    that meets ``role``, or None."""
    from node.db import Meta

    host = socket.gethostname()
    for other_role in _ROLES_MEETING[role]:
        value = session.scalar(select(Meta.value).where(Meta.key == _presence_key(node_id, other_role)))
        if value is None:
            continue
        try:
            entry = json.loads(value)
            age = (now - dt.datetime.fromisoformat(entry["at"])).total_seconds()
            their_owner, their_host, their_pid = str(entry["owner"]), str(entry["host"]), int(entry["pid"])
        except (ValueError, KeyError, TypeError):
            continue  # not an entry this code wrote: ignored, overwritten by ours
        if their_owner == owner or age > PRESENCE_STALE_S:
            continue
        if their_host == host and (their_pid == os.getpid() or not _pid_alive(their_pid)):
            continue
        return f"role {other_role}, host {their_host}, PID {their_pid}, seen {max(0.0, age):.0f} s ago"
    return None


def claim_presence(sessions: sessionmaker, node_id: str, role: str, owner: str) -> None:
    """Record that ``owner`` (this process) runs ``node_id`` in ``role``, unless a live
    process holds that node id in a role that meets it (``all`` meets every role).

    Checked, written, committed, then checked again: of two processes starting at the
    same moment, at least one sees the other and refuses.

    Raises:
        NodeIdInUse: another live process holds the node id (its presence entry is
            younger than PRESENCE_STALE_S seconds and, on this host, its PID runs).
    """
    from sqlalchemy.exc import IntegrityError

    from node.db import db_now

    with sessions() as session:
        holder = _holder(session, node_id, role, owner, db_now(session))
        if holder is None:
            _put_presence(session, node_id, role, owner, db_now(session))
            try:
                session.commit()
            except IntegrityError:  # another process inserted the entry at this moment: the check below sees it
                session.rollback()
    if holder is None:
        with sessions() as session:
            holder = _holder(session, node_id, role, owner, db_now(session))
        if holder is not None:
            release_presence(sessions, node_id, role, owner)
    if holder is not None:
        raise NodeIdInUse(
            f"node id {node_id!r} is in use by a running node ({holder}): give each node its own [node] node_id "
            f"(docs/cluster.md), or stop that node first. A node that stopped without saying so counts as gone after {PRESENCE_STALE_S:.0f} s."
        )


def _put_presence(session: Session, node_id: str, role: str, owner: str, now: dt.datetime) -> None:
    from node.db import Meta

    value = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "at": now.isoformat()})
    row = session.get(Meta, _presence_key(node_id, role))
    if row is None:
        session.add(Meta(key=_presence_key(node_id, role), value=value))
    else:
        row.value = value


def renew_presence(sessions: sessionmaker, node_id: str, role: str, owner: str) -> int:
    """The presence beat (a scheduler job): renew this process's entry. Returns 0 (no
    work to drain). An entry that another process took over (this one was silent for
    longer than PRESENCE_STALE_S, e.g. suspended) is logged as an error, not taken back."""
    from node.db import Meta, db_now

    with sessions() as session:
        value = session.scalar(select(Meta.value).where(Meta.key == _presence_key(node_id, role)))
        if value is not None and json.loads(value).get("owner") not in (None, owner):
            log.error("node id %r (role %s) was taken by another process while this one was silent; give each node its own [node] node_id", node_id, role)
            return 0
        _put_presence(session, node_id, role, owner, db_now(session))
        session.commit()
    return 0


def release_presence(sessions: sessionmaker, node_id: str, role: str, owner: str) -> None:
    """Remove this process's presence entry (a clean stop): a successor may start at once."""
    from node.db import Meta

    with sessions() as session:
        session.execute(delete(Meta).where(Meta.key == _presence_key(node_id, role), Meta.value.contains(json.dumps(owner), autoescape=True)))
        session.commit()
