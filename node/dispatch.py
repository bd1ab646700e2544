"""Deliveries to destinations: claim due ones, send, commit each outcome at once."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from node import audit, metrics, queue
from node.config import Settings
from node.db import Delivery
from node.scu import Outcome, Work, make_sender

log = logging.getLogger(__name__)


class Dispatcher:
    """One per destination, so that a dead destination never holds up another."""

    def __init__(self, settings: Settings, sessions: sessionmaker, destination: str, batch: int = 256) -> None:
        self.settings = settings
        self.sessions = sessions
        self.dest = settings.destination(destination)
        self.sender = make_sender(self.dest, settings.node.ae_title, settings.node.reactor_delay_s)
        self.batch = batch

    def run_once(self) -> int:
        """Send one batch of due deliveries; returns how many were attempted."""
        node = self.settings.node
        with self.sessions() as session:
            claimed = queue.claim_deliveries(session, self.dest.name, node.lease_s, self.batch)
            session.commit()
            if not claimed:
                return 0
            by_id: dict[int, Delivery] = {d.id: d for d in claimed}
            work = [Work(d.id, Path(d.output.path), d.output.sop_class_uid, d.output.transfer_syntax) for d in claimed]

            def report(w: Work, outcome: Outcome) -> None:
                d = by_id[w.key]
                if outcome.kind == "sent":
                    queue.mark_sent(d)
                elif outcome.kind == "retry":
                    queue.mark_retry(d, outcome.reason, node.retry_base_s, node.retry_max_s, node.max_attempts)
                else:
                    queue.mark_failed(d, outcome.reason)
                session.commit()

            sending = metrics.timed("send").start()
            try:
                self.sender.send(work, report)
            finally:
                sending.stop()
                # Anything not reported (a crash of the sender) goes back to the queue.
                for d in claimed:
                    if d.state.value == "SENDING":
                        queue.mark_retry(d, "sender stopped before reporting", node.retry_base_s, node.retry_max_s, node.max_attempts)
                audit.dispatched(session, self.dest.name, claimed)
                metrics.observe_dispatched(session, self.dest.name, claimed)
                session.commit()
            return len(claimed)
