"""The node: settings, database, secret, SCP, pipeline, dispatch, retention and the
scheduler wired together.

At start (in this order): the data folder is made owner-only; the pseudonym secret is
read (file or environment) and its fingerprint checked against the database's; rows
left without a spool file are dropped; claims of this node's previous run are taken up
at once; held objects are routed again when the routes changed.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from sqlalchemy.orm import sessionmaker

from node import queue, retention, routing
from node.config import Settings
from node.db import make_engine, make_sessionmaker
from node.deid import Pseudonymizer
from node.dispatch import Dispatcher
from node.leases import node_identity, owner_token
from node.pipeline import PixelStep, Pipeline
from node.reasons import withhold_warning_texts
from node.spool import clean_stale_temporaries
from node.startup import StartupError, check_secret, load_secret, owner_only_folder, routes_changed

log = logging.getLogger(__name__)


# How long a committed row may wait for its spool file before the file counts as lost
# (the C-STORE handler writes the file and commits the row at the same time, and answers
# only when both are done).
SPOOL_GRACE_S = 120.0


def _still_arriving(inst) -> bool:
    if Path(inst.path).exists():
        return False
    age = (queue.utcnow() - inst.received_at).total_seconds()
    return age < SPOOL_GRACE_S


class Node:
    """A running casemask node. ``start()`` listens and schedules; ``tick()`` runs each
    stage once, synchronously (for tests and tools)."""

    def __init__(self, settings: Settings, pixel_step: PixelStep | None | str = "auto") -> None:
        """Prepare a node (nothing listens or runs yet).

        Raises:
            StartupError: the secret is missing or is not the one the database was made
                with, or the node id file is damaged.
        """
        self.settings = settings
        data = settings.node.data_dir
        owner_only_folder(data)
        removed = clean_stale_temporaries(data)
        if removed:
            log.info("removed %d temporary files left by an interrupted write", removed)
        secret = load_secret(settings.node)
        self.pseudo = Pseudonymizer(secret)
        try:
            self.node_id = node_identity(data, settings.node.node_id)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.owner = owner_token(self.node_id)
        self.engine = make_engine(settings.node.resolved_database_url)
        self.sessions: sessionmaker = make_sessionmaker(self.engine, info={"log_id": self.pseudo.log_id})
        try:
            self._recover(secret)
        except BaseException:
            self.engine.dispose()
            raise
        if pixel_step == "auto":
            pixel_step = _default_pixel_step(settings)
        self.pixel_step = pixel_step
        self.pipeline = Pipeline(settings, self.sessions, self.pseudo, pixel_step, owner=self.owner)  # type: ignore[arg-type]
        self.dispatchers = {d.name: Dispatcher(settings, self.sessions, d.name, owner=self.owner) for d in settings.destinations}
        self.server = None
        self.scheduler = None
        self._stop = threading.Event()

    def _recover(self, secret: bytes) -> None:
        """The start-up checks and recoveries that need the database (one transaction)."""
        where = self.settings.node.database_url and "at database_url" or f"in {self.settings.node.data_dir}"
        with self.sessions() as session:
            check_secret(session, secret, where)
            dropped = queue.drop_unspooled(session)
            queue.take_over(session, self.node_id, self.owner)
            if routes_changed(session, self.settings.routes):
                queue.release_held(session)
            session.commit()
        if dropped:
            log.warning("%d received objects had no spool file (interrupted before they were acknowledged): dropped", len(dropped))

    # -- stages ---------------------------------------------------------------------
    def route_stable(self, stable_after_s: float | None = None) -> int:
        """Route every instance of the studies that are stable; returns instances routed.

        Each study is routed in its own transaction, which holds it (PostgreSQL: SKIP
        LOCKED) so that nodes sharing the database never route one study twice."""
        stable = self.settings.node.stable_after_s if stable_after_s is None else stable_after_s
        keys = routing.keys_used(self.settings.routes)
        n = 0
        waiting: set[int] = set()  # studies whose files are still being renamed into place
        with self.sessions() as session:
            for _ in range(100_000):
                study = queue.next_stable_study(session, stable, waiting)
                if study is None:
                    break
                instances = queue.received_instances(session, study)
                if any(_still_arriving(inst) for inst in instances):
                    waiting.add(study.id)  # a row is committed while its file is renamed into place
                    session.rollback()
                    continue
                for inst in instances:
                    try:
                        ds = dcmread(inst.path, stop_before_pixels=True)
                    except Exception as exc:
                        queue.quarantine_instance(session, inst, f"route: spooled file unreadable ({type(exc).__name__})")
                        continue
                    attrs = routing.attributes_of(ds, inst.calling_ae, inst.called_ae, keys)
                    matched = [v.route for v in routing.match_routes(self.settings.routes, attrs) if v.matched]
                    queue.route_instance(session, inst, matched, self.settings.node.unrouted)
                    n += 1
                queue.mark_study_routed(session, study)
                session.commit()
        return n

    def retain(self) -> int:
        """One retention run (node.retention); returns how many files it deleted."""
        return retention.run(self.sessions, self.settings).deleted

    def tick(self, stable_after_s: float | None = None) -> None:
        """Route, process and dispatch until nothing is left to do right now."""
        self.route_stable(stable_after_s)
        while self.pipeline.run_once():
            pass
        for d in self.dispatchers.values():
            for _ in range(1000):
                if not d.run_once():
                    break

    # -- lifecycle ------------------------------------------------------------------
    def start(self, listen: bool = True) -> None:
        from node.scheduler import make_scheduler

        if listen:
            from node.scp import start_server

            self.server = start_server(self.settings, self.engine)
        jobs: dict[str, Callable[[], int]] = {"route": self.route_stable, "process": self.pipeline.run_once}
        for name, d in self.dispatchers.items():
            jobs[f"dispatch:{name}"] = d.run_once
        jobs["retention"] = self.retain
        self.scheduler = make_scheduler(self.settings.node.poll_interval_s, jobs, {"retention": self.settings.retention.interval_s})
        self.scheduler.start()
        log.info("node %s started (id %s): %d routes, %d destinations", self.settings.node.ae_title, self.node_id, len(self.settings.routes), len(self.settings.destinations))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            store = getattr(self.server, "store_handler", None)
            if store is not None:
                store.close()
            self.server = None
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        self.engine.dispose()
        log.info("node stopped")

    def serve_forever(self) -> None:
        """Start and block until SIGINT or SIGTERM. Python warnings go to the log with
        their text withheld (pydicom's quote header values)."""
        withhold_warning_texts()
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()


def _default_pixel_step(settings: Settings) -> PixelStep | None:
    """The engine-backed pixel step when any route needs it (models load at start)."""
    if not any(r.pixels == "anonymize" for r in settings.routes):
        return None
    try:
        from node.pixels import EnginePixelStep
    except ImportError as exc:  # the engine's dependencies are missing
        log.error("pixel anonymization unavailable: %s", exc)
        return None
    step = EnginePixelStep(settings)
    step.warm()
    return step
