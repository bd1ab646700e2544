"""Deliveries to destinations: claim due ones, send, commit each outcome at once.

Before each object the dispatcher checks that its claim still holds (renewing it when
half of the lease is spent, from the database's clock), and every outcome is recorded
only if the delivery is still this worker's: a worker that lost its lease stops and
sends nothing another worker may be sending. Problems are logged per destination as
state changes (down, still down, back up), never one line per object per attempt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections import Counter

from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from node import audit, metrics, queue
from node.config import Settings
from node.db import Delivery, DeliveryState, data_path, db_now
from node.scu import Outcome, Work, make_sender

log = logging.getLogger(__name__)

# While a destination stays down, at most one "still down" line per this many seconds.
STILL_DOWN_EVERY_S = 300.0


class _Lease:
    """The dispatcher's claim on one batch: which deliveries it still holds and until
    when (database time)."""

    def __init__(self, owner: str, lease_s: float, claimed: list[Delivery]) -> None:
        self.owner = owner
        self.lease_s = lease_s
        self.held = {d.id for d in claimed}
        self.until = min(d.lease_until for d in claimed if d.lease_until is not None)

    def holds(self, session: Session, key: int) -> bool:
        """Whether ``key`` may be sent now: still held, with at least half a lease to
        run (renewed, and committed, when less is left; an expired lease is given up)."""
        if key not in self.held:
            return False
        if db_now(session) >= self.until - dt.timedelta(seconds=self.lease_s / 2):
            before = len(self.held)
            self.held, self.until = queue.renew_deliveries(session, self.owner, sorted(self.held), self.lease_s)
            session.commit()
            if len(self.held) < before:
                log.warning("delivery lease ran out before it was renewed: %d objects left to other workers", before - len(self.held))
        return key in self.held


@dataclasses.dataclass
class _Health:
    """A destination's state as the dispatcher saw it, for logging changes only."""

    name: str
    down_since: float | None = None
    last_note: float = 0.0

    def after_batch(self, tally: Counter, reasons: dict[str, str]) -> None:
        now = time.monotonic()
        if tally["FAILED"]:
            log.warning("destination %s: %d objects FAILED (dead letter; casemask retry re-queues them): %s", self.name, tally["FAILED"], reasons.get("failed", ""))
        retry, sent = tally["RETRY_WAIT"], tally["SENT"]
        if retry and not sent:
            if self.down_since is None:
                self.down_since = self.last_note = now
                log.warning("destination %s: down (%s); retrying %d objects with backoff", self.name, reasons.get("retry", ""), retry)
            elif now - self.last_note >= STILL_DOWN_EVERY_S:
                self.last_note = now
                log.warning("destination %s: still down after %.0f s (%s); retrying %d objects", self.name, now - self.down_since, reasons.get("retry", ""), retry)
        elif sent and self.down_since is not None:
            log.info("destination %s: back up after %.0f s; %d objects sent", self.name, now - self.down_since, sent)
            self.down_since = None
        elif retry:
            log.warning("destination %s: %d objects to retry (%s)", self.name, retry, reasons.get("retry", ""))


class Dispatcher:
    """One per destination, so that a dead destination never holds up another."""

    def __init__(self, settings: Settings, sessions: sessionmaker, destination: str, batch: int = 256, owner: str = "local/0") -> None:
        self.settings = settings
        self.sessions = sessions
        self.dest = settings.destination(destination)
        self.sender = make_sender(self.dest, settings.node.ae_title, settings.node.reactor_delay_s)
        self.batch = batch
        self.owner = owner
        self.health = _Health(self.dest.name)

    def run_once(self) -> int:
        """Send one batch of due deliveries; returns how many were claimed."""
        node = self.settings.node
        with self.sessions() as session:
            claimed = queue.claim_deliveries(session, self.dest.name, self.owner, node.lease_s, self.batch)
            session.commit()
            if not claimed:
                return 0
            lease = _Lease(self.owner, node.lease_s, claimed)
            by_id: dict[int, Delivery] = {d.id: d for d in claimed}
            data = self.settings.node.data_dir
            work = [Work(d.id, data_path(data, d.output.path), d.output.sop_class_uid, d.output.transfer_syntax) for d in claimed]
            tally: Counter = Counter()
            reasons: dict[str, str] = {}

            def report(w: Work, outcome: Outcome) -> None:
                d = by_id.pop(w.key)
                lease.held.discard(w.key)
                if outcome.kind == "sent":
                    state = "SENT" if queue.mark_sent(session, d, self.owner) else None
                elif outcome.kind == "retry":
                    state = queue.mark_retry(session, d, self.owner, outcome.reason, node.retry_base_s, node.retry_max_s, node.max_attempts)
                else:
                    state = "FAILED" if queue.mark_failed(session, d, self.owner, outcome.reason) else None
                session.commit()
                if state is not None:  # what the guarded UPDATE wrote, for audit and metrics (not flushed again)
                    set_committed_value(d, "state", DeliveryState(state))
                tally[state or "LOST"] += 1
                if outcome.reason:
                    reasons.setdefault(outcome.kind, outcome.reason)
                if state is None:
                    log.warning("delivery %d (-> %s): its lease had passed to another worker while it was sent", d.id, self.dest.name)

            sending = metrics.timed("send").start()
            try:
                self.sender.send(work, report, lambda w: lease.holds(session, w.key))
            except Exception as exc:
                # The sender broke: what it did not report counts as a failed attempt.
                for d in list(by_id.values()):
                    tally[queue.mark_retry(session, d, self.owner, f"sender stopped ({type(exc).__name__})", node.retry_base_s, node.retry_max_s, node.max_attempts) or "LOST"] += 1
                session.commit()
                raise
            finally:
                sending.stop()
                self.health.after_batch(tally, reasons)
            # Not tried (the lease was lost, or the sender stopped early): back to the
            # queue without counting an attempt, where still this worker's.
            for d in by_id.values():
                queue.release(session, d, self.owner)
            audit.dispatched(session, self.dest.name, claimed)
            metrics.observe_dispatched(session, self.dest.name, claimed)
            session.commit()
            return len(claimed)
