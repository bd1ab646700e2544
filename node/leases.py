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

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

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
