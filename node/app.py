"""The node: settings, database, secret, SCP, pipeline, dispatch, retention and the
scheduler wired together, in one of three roles:

- ``all`` (default): everything in one process;
- ``ingest``: the network edge only (the SCP, and the HTTP server where there is one):
  receive, spool, record. Several ingest processes may share one database and data
  folder, behind one load-balanced port; a study may arrive through several of them;
- ``worker``: routing, processing, dispatch and retention. Several workers share the
  work through claims (node.queue); routing takes a stable study at a time.

At start (in this order): the data folder is made owner-only; the pseudonym secret is
read (file or environment) and its fingerprint checked against the database's, whose
schema is brought up to date where safe (node.schema); an ingest process drops the rows
its own earlier runs left without a spool file; a worker takes up its previous run's
claims at once and routes held objects again when the routes changed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Literal

from pydicom import dcmread
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from node import audit, logfmt, metrics, queue, retention, routing
from node.config import Settings
from node.db import data_path, make_engine, make_sessionmaker, pool_size_for
from node.deid import Pseudonymizer
from node.dispatch import Dispatcher
from node.leases import PRESENCE_BEAT_S, PRESENCE_STALE_S, NodeIdInUse, claim_presence, node_identity, owner_token, release_presence, renew_presence
from node.pipeline import PixelStep, Pipeline
from node.reasons import withhold_warning_texts
from node.spool import clean_stale_temporaries, matches_digest
from node.startup import StartupError, check_secret, load_secret, owner_only_folder, refuse_lost_secret, routes_changed

log = logging.getLogger(__name__)


Role = Literal["all", "ingest", "worker"]
ROLES: tuple[str, ...] = ("all", "ingest", "worker")

# How long a committed row may wait for its spool file before the file counts as lost
# (the C-STORE handler writes the file and commits the row at the same time, and answers
# only when both are done; on a shared file system another node may see the file late).
SPOOL_GRACE_S = 120.0



def _audit_dropped(session, dropped: list[tuple[str, int]], reason: str) -> None:
    """One ``spool-dropped`` audit entry per study for the never-acknowledged rows a
    start dropped (``dropped``: (SOP Instance UID, study row id) pairs), with the count
    and ``reason``."""
    studies: dict[int, int] = {}
    for _, study_id in dropped:
        studies[study_id] = studies.get(study_id, 0) + 1
    for study_id, n in studies.items():
        audit.record(session, "spool-dropped", outcome=audit.MINOR_FAILURE, study_id=study_id, object_kind="original",
                     detail={"instances": n, "reason": reason})


def _audit_temporaries(session, files: int, when: str) -> None:
    """One audit entry for temporary files removed (``when``: "start" or "sweep"): what
    an interrupted write or C-STORE left, never acknowledged, no row naming it; they may
    hold received data, so their deletion is recorded as retention's deletions are."""
    audit.record(session, "orphans-purged", actor="startup" if when == "start" else "sweep", object_kind="files",
                 detail={"files": files, "reason": "temporary files of interrupted writes, never acknowledged", "grace_s": round(SPOOL_GRACE_S)})

class Node:
    """A running casemask node. ``start()`` listens and schedules what its ``role``
    does; ``tick()`` runs each worker stage once, synchronously (for tests and tools)."""

    def __init__(self, settings: Settings, pixel_step: PixelStep | None | str = "auto", role: Role = "all") -> None:
        """Prepare a node (nothing listens or runs yet).

        Raises:
            StartupError: the secret is missing or is not the one the database was made
                with, the node id file is damaged, the role is unknown, or the
                database's schema cannot be brought to this version's (node.schema).
        """
        if role not in ROLES:
            raise StartupError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
        self.settings = settings
        self.role = role
        self.ingests = role in ("all", "ingest")
        self.works = role in ("all", "worker")
        data = settings.node.data_dir
        owner_only_folder(data)
        # Other processes may share this folder (roles, a cluster): only what nobody has
        # written to for the grace time is a crash's leftover; the sweep takes the rest.
        removed = clean_stale_temporaries(data, SPOOL_GRACE_S)
        if removed:
            log.info("removed %d temporary files left by an interrupted write", removed)
        self._temporaries_removed = removed  # audited once the database is open (_recover)
        try:
            self.node_id = node_identity(data, settings.node.node_id)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.owner = owner_token(self.node_id)
        self.engine = self._engine()
        try:  # a secret is made only for a database that has none yet
            refuse_lost_secret(self.engine, settings.node)
            secret = load_secret(settings.node)
        except BaseException:
            self.engine.dispose()
            raise
        self.pseudo = Pseudonymizer(secret)
        logfmt.name_uids_with(self.pseudo.log_id)  # pynetdicom's -vv lines name UIDs as the node's do
        self.sessions: sessionmaker = make_sessionmaker(self.engine, info={"log_id": self.pseudo.log_id})
        try:
            self._recover(secret)
        except BaseException:
            self.engine.dispose()
            raise
        if pixel_step == "auto":
            pixel_step = _default_pixel_step(settings) if self.works else None
        self.pixel_step = pixel_step
        self.pipeline = Pipeline(settings, self.sessions, self.pseudo, pixel_step, owner=self.owner, indexer=_indexer(settings, pixel_step))  # type: ignore[arg-type]
        self.dispatchers = {d.name: Dispatcher(settings, self.sessions, d.name, owner=self.owner) for d in settings.destinations}
        self.server = None
        self.receivers = None
        self.slots = None
        self.listening = None  # node.sharedport.SharedListening, with receivers
        self.scheduler = None
        self.http = None
        self._stop = threading.Event()
        self._route_failures: dict[int, tuple[int, float]] = {}  # study id -> (failures, monotonic time of the next try)
        self._reload_requested = threading.Event()
        self._reload_lock = threading.Lock()
        from node.health import HealthMonitor
        from node.service import Service

        self.health = HealthMonitor(settings, sessions=self.sessions)
        self.service = Service(settings, self.sessions, self.pseudo, node=self)
        self.syslog = self._audit_forwarder(settings)

    def _engine(self):
        """The process's engine, its pool sized for the role (``[node] db_pool_size``,
        or the formula of node.db.pool_size_for), its schema brought up to date."""
        node = self.settings.node
        size = node.db_pool_size or pool_size_for(self.role, node.max_associations, len(self.settings.destinations))
        return make_engine(node.resolved_database_url, size, node.db_max_overflow, node.db_pool_timeout_s, name=f"{self.node_id}:{self.role}")

    def _recover(self, secret: bytes) -> None:
        """The start-up checks and recoveries that need the database: the secret's
        fingerprint, this node id's presence (node.leases.claim_presence), the take-over
        of earlier claims, the sweep of unspooled rows.

        Raises:
            StartupError: another secret made the database, or a running node holds
                this node id in an overlapping role.
        """
        where = self.settings.node.database_url and "at database_url" or f"in {self.settings.node.data_dir}"
        with self.sessions() as session:
            check_secret(session, secret, where)
            session.commit()
        try:  # before the take-over and the sweep, which treat this node id's other rows as a crashed run's
            claim_presence(self.sessions, self.node_id, self.role, self.owner)
        except NodeIdInUse as exc:
            raise StartupError(str(exc)) from None
        with self.sessions() as session:
            if self.works:
                queue.take_over(session, self.node_id, self.owner)
                if routes_changed(session, self.settings.routes):
                    queue.release_held(session)
                queue.sort_unconfigured(session, [d.name for d in self.settings.destinations])
            session.commit()
        if self.ingests:
            self.sweep_torn()
            self.sweep_unspooled()
        if self._temporaries_removed:
            with self.sessions() as session:
                _audit_temporaries(session, self._temporaries_removed, "start")
                session.commit()

    def sweep_torn(self) -> int:
        """At start: drop the rows of this node's earlier runs whose spool file does not
        match its digest (a crash tore it before its C-STORE was acknowledged,
        node.queue.drop_torn), audited and counted; returns how many."""
        with self.sessions() as session:
            dropped = queue.drop_torn(session, self.settings.node.data_dir, self.node_id, self.owner, self.settings.node.max_associations)
            _audit_dropped(session, dropped, "spool file torn by a crash before it was acknowledged (digest mismatch)")
            session.commit()
        if dropped:
            metrics.SPOOL_DIGEST_MISMATCHES.labels(where="startup").inc(len(dropped))
            log.warning("%d received objects' spool files were torn by a crash before they were acknowledged (digest mismatch): dropped", len(dropped))
        return len(dropped)

    def sweep_unspooled(self) -> int:
        """Drop the rows this node's earlier runs committed but never gave a spool file,
        once SPOOL_GRACE_S old (node.queue.drop_unspooled), and incoming files no
        process wrote to for that long; returns how many rows."""
        with self.sessions() as session:
            dropped = queue.drop_unspooled(session, self.settings.node.data_dir, self.node_id, self.owner, SPOOL_GRACE_S, self.settings.node.max_associations)
            _audit_dropped(session, dropped, "row committed, file never written: an earlier run stopped before the C-STORE was acknowledged")
            session.commit()
        left = clean_stale_temporaries(self.settings.node.data_dir / "spool" / ".incoming", SPOOL_GRACE_S)
        if left:
            log.info("removed %d incoming files left by an interrupted C-STORE", left)
            with self.sessions() as session:
                _audit_temporaries(session, left, "sweep")
                session.commit()
        if dropped:
            log.warning("%d received objects had no spool file (an earlier run stopped before they were acknowledged): dropped", len(dropped))
        return len(dropped)

    def _still_arriving(self, inst) -> bool:
        """Whether ``inst``'s file is missing but may still come (its row is younger than
        SPOOL_GRACE_S, measured with this node's clock against the writer's)."""
        if data_path(self.settings.node.data_dir, inst.path).exists():
            return False
        age = (queue.utcnow() - inst.received_at).total_seconds()
        return age < SPOOL_GRACE_S

    # -- stages ---------------------------------------------------------------------
    def route_stable(self, stable_after_s: float | None = None) -> int:
        """Route every instance of the studies that are stable; returns instances routed.

        Each study is routed in its own transaction, which holds it (PostgreSQL: SKIP
        LOCKED) so that nodes sharing the database never route one study twice. A study
        whose routing the database refuses (a constraint, a value) is rolled back alone
        and tried again later (1, 2, 4 ... 300 s), with an error naming it: the other
        studies are routed meanwhile (before, one such study stopped routing for all).
        A database out of reach (OperationalError) still ends the whole pass. A study
        whose oldest waiting object waited ``[node] max_study_wait_s`` is routed though
        objects still arrive (a sender trickling objects into it kept it unrouted)."""
        stable = self.settings.node.stable_after_s if stable_after_s is None else stable_after_s
        keys = routing.keys_used(self.settings.routes)
        n = 0
        now = time.monotonic()
        waiting: set[int] = {sid for sid, (_, until) in self._route_failures.items() if until > now}
        with self.sessions() as session:
            for _ in range(100_000):
                study = queue.next_stable_study(session, stable, waiting, self.settings.node.max_study_wait_s)
                if study is None:
                    break
                sid = study.id
                try:
                    routed = self._route_study(session, study, waiting, keys)
                except OperationalError:
                    raise
                except Exception as exc:
                    session.rollback()
                    waiting.add(sid)
                    failures = self._route_failures.get(sid, (0, 0.0))[0] + 1
                    delay = min(300.0, 2.0 ** (failures - 1))
                    self._route_failures[sid] = (failures, time.monotonic() + delay)
                    log.error("routing study %d failed (%s, %d time(s)); tried again in %.0f s, other studies go on", sid, type(exc).__name__, failures, delay)
                    continue
                if routed is not None:
                    self._route_failures.pop(sid, None)
                    n += routed
        return n

    def _route_study(self, session, study, waiting: set[int], keys) -> int | None:
        """Route one stable study in ``session`` and commit; the number of instances
        routed, or None when it is not this pass's to route (held by another worker, or
        a file still being placed: then it joins ``waiting``). ``keys``: the attributes
        the routes read (``routing.keys_used``, once per pass)."""
        if not queue.hold_study(session, study):
            session.rollback()  # another worker routed it meanwhile
            return None
        instances = queue.received_instances(session, study)
        if any(self._still_arriving(inst) for inst in instances):
            waiting.add(study.id)  # a row is committed while its file is renamed into place
            session.rollback()
            return None
        n = other_patient = 0
        routing.recall_patient(session, study, self.settings.node.data_dir, self.pseudo.log_id)  # a study routed before revision 0004
        routed_before = queue.instances_with_jobs(session, study)
        for inst in instances:
            if inst.id in routed_before:
                queue.keep_discarded(session, inst)
                continue
            try:
                spooled = data_path(self.settings.node.data_dir, inst.path)
                if not matches_digest(spooled, inst.digest):
                    queue.quarantine_instance(session, inst, queue.SPOOL_FILE_TORN)
                    metrics.SPOOL_DIGEST_MISMATCHES.labels(where="route").inc()
                    metrics.QUARANTINED.labels(step="read").inc()
                    continue
                ds = dcmread(spooled, stop_before_pixels=True)
                patient = routing.patient_of(ds, self.pseudo.log_id)  # an undecodable Patient ID: unreadable, quarantined
            except FileNotFoundError:
                queue.quarantine_instance(session, inst, queue.SPOOL_FILE_MISSING)
                continue
            except Exception as exc:
                queue.quarantine_instance(session, inst, f"route: spooled file unreadable ({type(exc).__name__})")
                metrics.QUARANTINED.labels(step="read").inc()
                continue
            if not queue.join_study(session, study, inst, patient):
                other_patient += 1  # another patient under this Study Instance UID: never merged
                continue
            attrs = routing.attributes_of(ds, inst.calling_ae, inst.called_ae, keys)
            matched = [v.route for v in routing.match_routes(self.settings.routes, attrs) if v.matched]
            if not matched and not routing.is_known_sop_class(inst.sop_class_uid):
                queue.quarantine_instance(session, inst, routing.UNKNOWN_SOP_CLASS)  # held for review, never forwarded
                continue
            queue.route_instance(session, inst, matched, self.settings.node.unrouted)
            n += 1
        queue.mark_study_routed(session, study)
        audit.study_received(session, study, len(instances), instances[0].calling_ae if instances else "", instances[0].peer_host if instances else "")
        if other_patient:
            metrics.QUARANTINED.labels(step="route").inc(other_patient)
            audit.record(session, "quarantined", outcome=audit.MINOR_FAILURE, study_id=study.id, object_kind="study", detail={"instances": other_patient, "reason": queue.OTHER_PATIENT})
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
    def start(self, listen: bool = True, http: bool = False, receivers: int = 1) -> None:
        """Listen for DICOM (``listen``; roles all and ingest), run the role's stages on
        the scheduler, and serve the operator's HTTP API and dashboard (``http``; roles
        all and ingest; ``casemask serve`` passes ``[http] enabled``). ``receivers``:
        processes receiving DICOM on the port, this one included (node.receivers;
        ``casemask serve`` passes ``[node] receivers``).

        Raises:
            StartupError: the DICOM listener or the HTTP server could not listen on its
                address (in use by another process, or not an address of this machine).
        """
        from node.scheduler import make_scheduler

        if listen and self.ingests:
            try:
                self.start_listening(receivers)
            except OSError as exc:
                node = self.settings.node
                raise StartupError(f"cannot listen for DICOM on {node.host}:{node.port} ({exc.strerror or exc}): another casemask or DICOM "
                                   "node may hold the port; stop it, or set [node] host and port") from None
        # Jobs look the pipeline and dispatchers up at each run, so that a reload can
        # replace them (and add or remove dispatch jobs) without restarting anything.
        jobs: dict[str, Callable[[], int]] = {"health": self.health.check_due, "presence": lambda: renew_presence(self.sessions, self.node_id, self.role, self.owner)}
        intervals = {"retention": self.settings.retention.interval_s, "sweep": SPOOL_GRACE_S / 2, "presence": PRESENCE_BEAT_S}
        if self.ingests:
            jobs["sweep"] = self.sweep_unspooled
        if self.works:
            jobs.update({"route": self.route_stable, "process": lambda: self.pipeline.run_once(), "audit:syslog": self._forward_audit, "retention": self.retain})
            for name in self.dispatchers:
                jobs[f"dispatch:{name}"] = self._dispatch_job(name)
        self.scheduler = make_scheduler(self.settings.node.poll_interval_s, jobs, intervals)
        self.scheduler.start()
        if http and self.ingests:
            from node.http.server import HttpServer

            self.http = HttpServer(self)
            try:
                self.http.start()
            except RuntimeError as exc:
                self.http = None
                raise StartupError(str(exc)) from None
        audit.record_now(self.sessions, "node-started", actor=self.settings.node.ae_title, detail={"routes": len(self.settings.routes), "destinations": len(self.settings.destinations), "role": self.role})
        routes, dests = len(self.settings.routes), len(self.settings.destinations)
        log.info("node %s started (id %s, role %s): %d route%s, %d destination%s", self.settings.node.ae_title, self.node_id, self.role,
                 routes, "" if routes == 1 else "s", dests, "" if dests == 1 else "s")

    def start_listening(self, receivers: int = 1) -> None:
        """Listen in this process and, with ``receivers`` > 1, in receiver processes that
        share its listening sockets and one association table (node.receivers,
        node.sharedport, node.slots)."""
        from node.admission import still_open
        from node.receivers import Receivers
        from node.scp import start_server
        from node.sharedport import AcceptBoard, SharedListening, open_listening
        from node.slots import SharedSlots

        try:
            if receivers > 1:
                node = self.settings.node
                self.listening = SharedListening({}, AcceptBoard.create(receivers), place=0, owner=True)
                for port in (node.port, node.tls.port if node.tls else 0):
                    if port:
                        try:
                            self.listening.sockets[port] = open_listening(node.host, port)
                        except OSError as exc:
                            raise StartupError(f"cannot listen for DICOM on {node.host}:{port} ({exc.strerror or exc}): another casemask or DICOM "
                                               "node may hold the port; stop it, or set [node] host and port") from None
                self.slots = SharedSlots.create(node.max_associations, node.max_associations_per_host, still_open)
                fds = {port: sock.fileno() for port, sock in self.listening.sockets.items()}
                self.receivers = Receivers(self.settings, receivers - 1, writer=self.owner, slots_fd=self.slots.fd, sockets=fds, board_fd=self.listening.board.fd)
                self.receivers.start()  # each waits until this process listens: once the port answers, all accept
            self.server = start_server(self.settings, self.engine, pseudo=self.pseudo, writer=self.owner, slots=self.slots, shared=self.listening)
        except BaseException:
            self._stop_receivers()
            raise

    def _stop_receivers(self) -> None:
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        if self.slots is not None:
            self.slots.close()
            self.slots = None
        self._close_listening()

    def _close_listening(self) -> None:
        """After the receivers and this process's listeners: the shared sockets and board."""
        if self.listening is not None:
            self.listening.close()
            os.close(self.listening.board.fd)
            self.listening = None

    def _dispatch_job(self, name: str) -> Callable[[], int]:
        def run() -> int:
            d = self.dispatchers.get(name)
            return d.run_once() if d is not None else 0

        return run

    def _forward_audit(self) -> int:
        forwarder = self.syslog
        return forwarder.run_once() if forwarder is not None else 0

    def _audit_forwarder(self, settings: Settings) -> audit.Forwarder | None:
        a = settings.audit
        if not a.syslog_host:
            return None
        sender = audit.SyslogSender(a.syslog_host, a.syslog_port, a.syslog_transport, a.syslog_ca)
        return audit.Forwarder(self.sessions, sender, audit.Source(settings.node.ae_title, a.site), self.pseudo.uid)

    # -- live configuration -----------------------------------------------------------------
    def reload(self, new: Settings) -> dict[str, list[str]]:
        """Apply a validated configuration without a restart: sources, destinations,
        routes, models, [audit] and the queue's timings. Open associations, claimed work
        and queued objects are untouched: stages pick the new settings up at their next
        batch; deliveries to a destination that was removed wait in the database,
        UNCONFIGURED (node.queue.sort_unconfigured), PENDING again if it comes back.
        Settings that need a restart (listening addresses, data folder, database, secret,
        timeouts of the DICOM server, [http]) keep their running values and are listed.

        Returns ``{"applied": [...], "restart_required": [...]}`` (names of tables/keys).
        """
        with self._reload_lock:
            old = self.settings
            restart = [f"node.{k}" for k in _RESTART_KEYS if getattr(old.node, k) != getattr(new.node, k)]
            restart += [f"http.{k}" for k in type(old.http).model_fields if getattr(old.http, k) != getattr(new.http, k)]
            merged_node = new.node.model_copy(update={k: getattr(old.node, k) for k in _RESTART_KEYS})
            new = new.model_copy(update={"node": merged_node, "http": old.http, "source_file": new.source_file or old.source_file})
            applied = [name for name in ("sources", "destinations", "routes", "models", "audit") if getattr(old, name) != getattr(new, name)]
            # [node] keys by name, as restart_required names them ("node" alone left the admin guessing)
            applied += [f"node.{k}" for k in type(old.node).model_fields if getattr(old.node, k) != getattr(merged_node, k)]
            pixel_step = self.pixel_step
            if self.works and (_pixel_models(old) != _pixel_models(new) or (new.models != old.models and _pixel_models(new))):
                pixel_step = _default_pixel_step(new)  # an ingest process loads no model
            # The same owner token: claims made before the reload stay this process's.
            dispatchers = {d.name: Dispatcher(new, self.sessions, d.name, owner=self.owner) for d in new.destinations}
            self.pipeline = Pipeline(new, self.sessions, self.pseudo, pixel_step, owner=self.owner, indexer=_indexer(new, pixel_step))  # type: ignore[arg-type]
            self.pixel_step = pixel_step
            self.dispatchers = dispatchers
            self.settings = new
            self.health.settings = new
            if new.audit != old.audit:
                if self.syslog is not None:
                    self.syslog.close()
                self.syslog = self._audit_forwarder(new)
            policy = getattr(self.server, "access_policy", None)
            if policy is not None:  # who may associate from now on (open associations go on)
                policy.update(new)
            restarted = self.receivers.update(new) if self.receivers is not None else []  # unconfirmed ones killed (fail closed)
            if self.scheduler is not None and self.works:
                wanted = {f"dispatch:{d}" for d in dispatchers}
                present = {j.id for j in self.scheduler.get_jobs() if j.id.startswith("dispatch:")}
                from node.scheduler import add_job

                for job_id in present - wanted:
                    self.scheduler.remove_job(job_id)
                for job_id in sorted(wanted - present):
                    add_job(self.scheduler, job_id, self._dispatch_job(job_id.split(":", 1)[1]), new.node.poll_interval_s)
            if self.works and "destinations" in applied:  # owed to a removed one: UNCONFIGURED now, not at the next retention run
                with self.sessions() as session:
                    queue.sort_unconfigured(session, [d.name for d in new.destinations])
                    session.commit()
        log.info("configuration reloaded: %s changed%s", ", ".join(applied) or "nothing", f"; needs a restart: {', '.join(restart)}" if restart else "")
        result = {"applied": applied, "restart_required": restart}
        if restarted:  # receivers that did not confirm: killed, started again with the new settings
            result["receivers_restarted"] = [str(pid) for pid in restarted]
        return result

    def request_reload(self) -> None:
        """Ask the main loop to reload the configuration file (what SIGHUP does)."""
        self._reload_requested.set()

    def _reload_from_file(self) -> None:
        from node.accounts import Principal
        from node.db import Role
        from node.service import ServiceError

        try:
            self.service.reload(Principal("SIGHUP", Role.ADMIN, "node"))
        except ServiceError as exc:
            if exc.problems:  # one line each: the log escapes line breaks inside a record
                log.error("configuration not reloaded, still running on the previous one: %s", str(exc).splitlines()[0])
                for problem in exc.problems:
                    log.error("  - %s", problem)
            else:
                log.error("configuration not reloaded, still running on the previous one: %s", exc)

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        if self.server is not None:
            self.server.shutdown()
            store = getattr(self.server, "store_handler", None)
            if store is not None:
                store.close()
            self.server = None
        if self.slots is not None:  # after the listeners: their associations are gone
            self.slots.close()
            self.slots = None
        self._close_listening()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
            audit.record_now(self.sessions, "node-stopped", actor=self.settings.node.ae_title)
        try:
            release_presence(self.sessions, self.node_id, self.role, self.owner)
        except Exception as exc:  # the database is away: the entry goes stale by itself
            log.warning("could not remove this node's presence entry (%s); it counts as gone after %.0f s", type(exc).__name__, PRESENCE_STALE_S)
        if self.syslog is not None:
            self.syslog.flush()  # the last entries, if the collector is there
            self.syslog.close()
        self.engine.dispose()
        log.info("node stopped")

    def serve_forever(self, started: Callable[[], None] | None = None) -> None:
        """Start (with the HTTP server when ``[http] enabled``) and block until SIGINT or
        SIGTERM; SIGHUP reloads the configuration file. ``started`` is called once the
        listeners are bound. Python warnings go to the log with their text withheld
        (pydicom's quote header values)."""
        withhold_warning_texts()
        # Handlers first: a SIGHUP during start-up would otherwise end the process.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        try:
            # inside: a failed start stops what it started
            self.start(http=self.settings.http.enabled, receivers=self.settings.node.receivers or os.cpu_count() or 1)
            if started is not None:  # the ports are bound: say so only now
                started()
            while not self._stop.wait(0.5):
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self._reload_from_file()
        finally:
            self.stop()


# [node] settings a reload cannot change in a running node.
_RESTART_KEYS = ("ae_title", "host", "port", "data_dir", "database_url", "db_pool_size", "db_max_overflow", "db_pool_timeout_s", "secret_path", "secret_env", "node_id", "poll_interval_s",
                 "acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "reactor_delay_s", "reactor_max_wait_ms",
                 "max_associations", "max_associations_per_host", "max_object_mb", "min_free_disk_mb", "strict_uids", "tls", "receivers")


def _pixel_models(settings: Settings) -> set[str]:
    return {r.model for r in settings.routes if r.pixels == "anonymize"}




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


def _indexer(settings: Settings, pixel_step: PixelStep | None):
    """The index hook (node.index) when a route has ``index = true``: it encodes outputs
    with the pixel step's loaded models."""
    if not any(r.index for r in settings.routes):
        return None
    from node.index import Indexer

    return Indexer(lambda name: getattr(pixel_step, "models", {}).get(name))
