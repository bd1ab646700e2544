"""The one service layer for queries and actions on the queue, the configuration, the
audit trail and the pseudonym mapping: the CLI and the HTTP API both call it, and
neither talks to the database on its own.

Views are pseudonymous: studies are named by row id and by the pseudonymous Study
Instance UID the archive receives (when the node's secret is at hand), outputs by their
own (pseudonymous) SOP Instance UIDs; original UIDs, paths and header values are never
returned. Every action is written to the audit trail in its own transaction, naming who
asked (:class:`node.accounts.Principal`).
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import io
import json
import logging
import re
import threading
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node import audit, queue, retention, routing
from node.accounts import Principal
from node.config import DEFAULT_CONFIG, ConfigError, Settings, base_dir_for, hide_credentials, parse
from node.db import Delivery, DeliveryState, Instance, InstanceState, Job, JobState, Output, Role, Study, StudyState, data_path, db_now, utcnow
from node.metrics import disk_free, step_of

if TYPE_CHECKING:
    from node.app import Node
    from node.deid import Pseudonymizer

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An action that cannot be done; ``status`` is the HTTP status that says why."""

    status = 400

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Invalid(ServiceError):
    status = 422


class Unavailable(ServiceError):
    status = 503


def _audit_digest(text: str) -> str:
    """SHA-256 of a configuration as the audit trail records it: with the passwords of
    its URLs hidden, since every viewer reads the trail and the rest of the file (a
    digest of the whole would let a weak password be guessed offline)."""
    return hashlib.sha256(hide_credentials(text).encode()).hexdigest()


def cli_principal() -> Principal:
    """Who runs a CLI command: the operating-system account, with every right (it can
    read the database and the secret anyway)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "unknown"
    return Principal(name, Role.ADMIN, "cli")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("casemask")
    except PackageNotFoundError:
        return "unknown"


_STEP_PREFIX = re.compile(r"[a-z][a-z_ -]{0,30}")


def _step(reason: str) -> str:
    """The step that wrote a quarantine reason: its prefix (reasons read ``step: what``,
    node.reasons), else what :func:`node.metrics.step_of` finds in it."""
    head, sep, _ = reason.partition(":")
    return head.strip().replace(" ", "_") if sep and _STEP_PREFIX.fullmatch(head.strip()) else step_of(reason)


def _burned_in_notes(ds, routes: list) -> dict[str, str]:
    """Per matched route, what its burned-in text policy does with an object whose pixels
    may carry text (routes explain matched a route; the header step then quarantined the
    object, which explain did not say)."""
    from node.deid.burned_in import burned_in_reason

    why = burned_in_reason(ds)
    notes: dict[str, str] = {}
    for r in routes:
        if not why or r.deid is None or r.pixels == "anonymize" or r.deid.burned_in == "allow":
            continue
        notes[r.name] = (f"{why}: its text is masked (burned_in = \"clean\"), what cannot be is quarantined" if r.deid.burned_in == "clean" else
                         f"{why}: quarantined by this route's deid burned_in = \"quarantine\" (\"clean\" masks the text: docs/burned-in.md)")
    return notes


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") + "Z" if t else None


class Service:
    """Queries and actions of one node (``node`` given: a running node, whose settings
    follow reloads) or of its database alone (the CLI)."""

    def __init__(self, settings: Settings, sessions: sessionmaker, pseudo: Pseudonymizer | None = None, node: Node | None = None) -> None:
        self._settings = settings
        self.sessions = sessions
        self.pseudo = pseudo
        self.node = node
        self._similar = None  # node.similar.SimilarService of the current settings, made on first use
        self._similar_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings) -> Service:
        """For the CLI: the node's database, and its secret when it exists (none is made)."""
        from node.db import make_engine, make_sessionmaker
        from node.deid import Pseudonymizer
        from node.startup import read_secret_file

        engine = make_engine(settings.node.resolved_database_url)
        secret_path = settings.node.resolved_secret_path
        pseudo = Pseudonymizer(read_secret_file(secret_path)) if secret_path.exists() else None
        return cls(settings, make_sessionmaker(engine), pseudo)

    @property
    def settings(self) -> Settings:
        return self.node.settings if self.node is not None else self._settings

    def study_uid(self, original: str) -> str | None:
        """The pseudonymous Study Instance UID the archive receives, or None without the secret."""
        return self.pseudo.uid(original) if self.pseudo is not None else None

    def audit_source(self) -> audit.Source:
        return audit.Source(self.settings.node.ae_title, self.settings.audit.site)

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counts per state and destination, why each destination has objects waiting or
        FAILED (its newest such delivery's reason) and when it is tried next, when the next
        receiving study is complete, models, disk, throughput, version."""
        s = self.settings
        hour_ago = utcnow() - dt.timedelta(hours=1)
        with self.sessions() as session:
            counts = queue.counts(session)
            received_1h = session.scalar(select(func.count()).select_from(Instance).where(Instance.received_at >= hour_ago)) or 0
            sent_1h = session.scalar(select(func.count()).select_from(Delivery).where(Delivery.sent_at >= hour_ago)) or 0
            waiting = {}  # per destination: why its newest waiting or failed delivery is not sent (no PHI: reasons never carry values)
            for dest, state, reason in session.execute(select(Delivery.destination, Delivery.state, Delivery.reason)
                                                       .where(Delivery.state.in_((DeliveryState.RETRY_WAIT, DeliveryState.FAILED)))
                                                       .order_by(Delivery.id.desc()).limit(1000)):
                waiting.setdefault(dest, f"{state.value}: {reason or 'no reason recorded'}")
            now = db_now(session)
            next_attempt = {dest: {"at": _iso(due), "in_s": max(0, round((due - now).total_seconds())), "attempts": int(tries)}
                            for dest, due, tries in session.execute(
                                select(Delivery.destination, func.min(Delivery.next_attempt_at), func.max(Delivery.attempts))
                                .where(Delivery.state == DeliveryState.RETRY_WAIT).group_by(Delivery.destination))}
            oldest_quiet = session.scalar(select(func.min(Study.last_received_at)).where(Study.state == StudyState.RECEIVING))
            kept = retention.failed_kept(session)
            from node import health

            checked = health.saved(session)
        monitor = getattr(self.node, "health", None)  # in the node's own process: its live results
        for d in s.destinations:
            h = monitor.get(d.name) if monitor is not None else None
            if h is not None:
                checked[d.name] = {"reachable": h.reachable, "detail": h.detail,
                                   "checked_at": dt.datetime.fromtimestamp(h.checked_at, dt.UTC).isoformat(timespec="seconds")}
        return {
            "node": s.node.ae_title,
            "version": version(),
            "data_dir": str(s.node.data_dir),
            "counts": counts,
            "throughput": {"received_last_hour": int(received_1h), "sent_last_hour": int(sent_1h)},
            "not_sent": waiting,
            # Per destination with deliveries in RETRY_WAIT: the soonest next attempt (database
            # time), the most attempts any of them has made, out of [node] max_attempts.
            "next_attempt": next_attempt,
            "max_attempts": s.node.max_attempts,
            # Per configured destination: the node's last health check ({"reachable", "detail",
            # "checked_at"}), or None where no node has checked it yet.
            "health": {d.name: checked.get(d.name) for d in s.destinations},
            # The RECEIVING study that has been quiet longest is complete this many seconds from
            # now (stable_after_s without a new object); None when no study is receiving.
            "next_study_complete_in_s": None if oldest_quiet is None else max(0, round(s.node.stable_after_s - (now - oldest_quiet).total_seconds())),
            # Originals kept for a FAILED delivery (dead letter): [retention] failed_days (-1 keeps them).
            "dead_letters": {"originals": kept.count, "oldest_days": round(kept.oldest_days, 1), "failed_days": s.retention.failed_days},
            "disk_free_bytes": disk_free(s.node.data_dir),
            "models": self.models(),
            "routes": _route_models(s),
            "config": str(s.source_file) if s.source_file else None,
        }

    def models(self) -> dict[str, dict]:
        """Per model: backend, device and why (what the node wrote when it loaded them)."""
        path = self.settings.node.data_dir / "models.json"
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            return {}

    # -- studies --------------------------------------------------------------------------
    def studies(self, state: str = "", limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Newest first: each study's state, objects per state, jobs and deliveries per state."""
        with self.sessions() as session:
            q = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(min(limit, 1000)).offset(offset)
            if state:
                q = q.where(Study.state == StudyState(state.upper()))
            rows = list(session.scalars(q))
            return [self._study_summary(st, agg) for st, agg in zip(rows, self._aggregates(session, [r.id for r in rows]))]

    def _aggregates(self, session, ids: list[int]) -> list[dict]:
        agg: dict[int, dict] = {i: {"instances": {}, "jobs": {}, "deliveries": {}, "modalities": set(), "senders": set()} for i in ids}
        if not ids:
            return []
        for sid, st, n in session.execute(select(Instance.study_id, Instance.state, func.count()).where(Instance.study_id.in_(ids)).group_by(Instance.study_id, Instance.state)):
            agg[sid]["instances"][st.value] = n
        for sid, mod, ae in session.execute(select(Instance.study_id, Instance.modality, Instance.calling_ae).where(Instance.study_id.in_(ids)).distinct()):
            agg[sid]["modalities"].add(mod)
            agg[sid]["senders"].add(ae)
        for sid, st, n in session.execute(select(Job.study_id, Job.state, func.count()).where(Job.study_id.in_(ids)).group_by(Job.study_id, Job.state)):
            agg[sid]["jobs"][st.value] = n
        q = (select(Job.study_id, Delivery.state, func.count()).join(Output, Output.job_id == Job.id).join(Delivery, Delivery.output_id == Output.id)
             .where(Job.study_id.in_(ids)).group_by(Job.study_id, Delivery.state))
        for sid, st, n in session.execute(q):
            agg[sid]["deliveries"][st.value] = n
        return [agg[i] for i in ids]

    def _study_summary(self, st: Study, agg: dict) -> dict[str, Any]:
        return {
            "id": st.id,
            "study_uid": self.study_uid(st.study_uid),
            "state": st.state.value,
            "first_received_at": _iso(st.first_received_at),
            "last_received_at": _iso(st.last_received_at),
            "instances": agg["instances"],
            "jobs": agg["jobs"],
            "deliveries": agg["deliveries"],
            "modalities": sorted(m for m in agg["modalities"] if m),
            "senders": sorted(a for a in agg["senders"] if a),
        }

    def study(self, study_id: int, max_jobs: int = 500) -> dict[str, Any]:
        """One study's path through the node: jobs (route, state, reason, what the steps
        found), outputs, deliveries, and its audit entries in order.

        Raises:
            NotFound: no such study.
        """
        with self.sessions() as session:
            st = session.get(Study, study_id)
            if st is None:
                raise NotFound(f"no study {study_id}")
            out = self._study_summary(st, self._aggregates(session, [st.id])[0])
            jobs = list(session.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id).limit(max_jobs)))
            outputs: dict[int, list[Output]] = {}
            for o in session.scalars(select(Output).where(Output.job_id.in_([j.id for j in jobs]))):
                outputs.setdefault(o.job_id, []).append(o)
            deliveries: dict[int, list[Delivery]] = {}
            out_ids = [o.id for os_ in outputs.values() for o in os_]
            for d in session.scalars(select(Delivery).where(Delivery.output_id.in_(out_ids)).order_by(Delivery.id)):
                deliveries.setdefault(d.output_id, []).append(d)
            out["jobs"] = [self._job_view(j, outputs.get(j.id, []), deliveries) for j in jobs]
            unrouted = session.scalars(select(Instance).where(Instance.study_id == st.id, Instance.state.in_([InstanceState.HELD, InstanceState.IGNORED, InstanceState.QUARANTINED, InstanceState.RECEIVED])))
            out["unrouted_instances"] = [{"id": i.id, "state": i.state.value, "modality": i.modality, "reason": i.reason} for i in unrouted if not any(j.instance_id == i.id for j in jobs)]
            entries = audit.query(session, audit.Filter(study_id=st.id), limit=500)
            out["timeline"] = [audit.as_dict(e, out["study_uid"]) for e in reversed(entries)]
        return out

    def _job_view(self, j: Job, outputs: list[Output], deliveries: dict[int, list[Delivery]]) -> dict[str, Any]:
        return {
            "id": j.id, "route": j.route, "state": j.state.value, "reason": j.reason, "attempts": j.attempts,
            "updated_at": _iso(j.updated_at), "modality": j.instance.modality, "record": json.loads(j.record or "{}"),
            "outputs": [
                {"id": o.id, "kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "in_outbox": data_path(self.settings.node.data_dir, o.path).exists(),
                 "deliveries": [self._delivery_view(d) for d in deliveries.get(o.id, [])]}
                for o in outputs
            ],
        }

    @staticmethod
    def _delivery_view(d: Delivery) -> dict[str, Any]:
        return {"id": d.id, "destination": d.destination, "state": d.state.value, "attempts": d.attempts, "reason": d.reason,
                "next_attempt_at": _iso(d.next_attempt_at), "sent_at": _iso(d.sent_at)}

    # -- quarantine -----------------------------------------------------------------------
    def quarantine(self, limit: int = 500) -> list[dict[str, Any]]:
        """Quarantined jobs (retry or discard them) and objects quarantined before any
        route (unreadable files), newest first. Each names the step that quarantined it
        (read, route, pixels, gates, burned-in, headers, verifier, study, ...: :func:`_step`) and whether its original is still kept (else it cannot
        be retried)."""
        with self.sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.state == JobState.QUARANTINED).order_by(Job.updated_at.desc()).limit(limit)))
            studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_({j.study_id for j in jobs})))}
            out = [{"job_id": j.id, "instance_id": j.instance_id, "study_id": j.study_id,
                    "study_uid": self.study_uid(studies[j.study_id].study_uid) if j.study_id in studies else None,
                    "route": j.route, "modality": j.instance.modality, "step": _step(j.reason), "reason": j.reason, "attempts": j.attempts,
                    "updated_at": _iso(j.updated_at), "original_kept": j.instance.purged_at is None, "record": json.loads(j.record or "{}")} for j in jobs]
            loose = session.scalars(select(Instance).where(Instance.state == InstanceState.QUARANTINED, ~Instance.id.in_(select(Job.instance_id))).limit(limit))
            out += [{"job_id": None, "instance_id": i.id, "study_id": i.study_id, "study_uid": None, "route": "", "modality": i.modality, "step": _step(i.reason),
                     "reason": i.reason, "attempts": 0, "updated_at": _iso(i.state_changed_at or i.received_at), "original_kept": i.purged_at is None,
                     "record": {}} for i in loose]
        return out

    def quarantined(self, job_id: int | None = None, instance_id: int | None = None) -> dict[str, Any]:
        """One quarantined job (or object quarantined before routing): what
        :meth:`quarantine` lists, plus its study's state and pseudonymous UID, what the
        steps found, and when retention deletes its original (``[retention]
        quarantine_days``). No header value, path or original UID.

        Raises:
            NotFound: no such job or object, or it is not quarantined.
        """
        with self.sessions() as session:
            job = session.get(Job, job_id) if job_id is not None else None
            inst = job.instance if job is not None else session.get(Instance, instance_id) if instance_id is not None else None
            if inst is None or (job is not None and job.state != JobState.QUARANTINED) or (job is None and inst.state != InstanceState.QUARANTINED):
                raise NotFound(f"no quarantined {'job' if job_id is not None else 'object'} {job_id if job_id is not None else instance_id}")
            study = session.get(Study, inst.study_id)
            since = (job.updated_at if job is not None else None) or inst.state_changed_at or inst.received_at
            counted = inst.state_changed_at or inst.received_at  # what retention counts quarantine_days from
            days = self.settings.retention.quarantine_days
            reason = job.reason if job is not None else inst.reason
            return {
                "job_id": job.id if job is not None else None, "instance_id": inst.id, "study_id": inst.study_id,
                "study_uid": self.study_uid(study.study_uid) if study is not None else None, "study_state": study.state.value if study is not None else None,
                "route": job.route if job is not None else "", "modality": inst.modality, "sender": inst.calling_ae,
                "step": _step(reason), "reason": reason, "attempts": job.attempts if job is not None else 0,
                "received_at": _iso(inst.received_at), "quarantined_at": _iso(since),
                "original_kept": inst.purged_at is None, "original_deleted_at": _iso(inst.purged_at),
                "original_deleted_after": None if days < 0 or inst.purged_at is not None else _iso(counted + dt.timedelta(days=days)),
                "record": json.loads(job.record or "{}") if job is not None else {},
            }

    def retry_job(self, job_id: int, who: Principal, host: str = "") -> dict[str, Any]:
        """Process a quarantined job again.

        Raises:
            NotFound: no such job.  Conflict: it is not QUARANTINED.
        """
        return self._job_action(job_id, who, host, "job-retried", lambda session, job: queue.requeue_job(session, job))

    def discard_job(self, job_id: int, who: Principal, host: str = "") -> dict[str, Any]:
        """Give up on a quarantined job: nothing of it will ever be sent.

        Raises:
            NotFound: no such job.  Conflict: it is not QUARANTINED.
        """
        return self._job_action(job_id, who, host, "job-discarded", lambda session, job: queue.discard_job(session, job, f"discarded by {who.label}"))

    def _job_action(self, job_id: int, who: Principal, host: str, event: str, action: Callable[[Session, Job], None]) -> dict[str, Any]:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            try:
                action(session, job)
            except ValueError as exc:
                raise Conflict(str(exc)) from None
            audit.record(session, event, actor=who.label, actor_kind=who.kind, host=host, study_id=job.study_id, object_kind="job",
                         object_ref=str(job.id), detail={"route": job.route, "job": job.id})
            session.commit()
            return {"job_id": job.id, "state": job.state.value}

    def retry_quarantined(self, who: Principal, host: str = "") -> int:
        """Every quarantined job back to PENDING, and every object quarantined because
        its spool file was missing whose file is there now back to routing; returns how
        many."""
        with self.sessions() as session:
            jobs = list(session.scalars(select(Job).join(Instance, Instance.id == Job.instance_id).where(Job.state == JobState.QUARANTINED, Instance.purged_at.is_(None))))
            for job in jobs:
                queue.requeue_job(session, job)
            found = queue.requeue_missing_files(session, self.settings.node.data_dir)
            if found:
                audit.record(session, "job-retried", actor=who.label, actor_kind=who.kind, host=host, object_kind="instance", detail={"instances": found, "reason": "spool file found again"})
            for study_id in sorted({j.study_id for j in jobs}):
                n = sum(1 for j in jobs if j.study_id == study_id)
                audit.record(session, "job-retried", actor=who.label, actor_kind=who.kind, host=host, study_id=study_id, object_kind="job", detail={"jobs": n})
            session.commit()
        return len(jobs) + found

    def retry_held(self, who: Principal, host: str = "") -> int:
        """Objects held because they matched no route are routed again (by the running
        node's next routing pass); returns how many."""
        with self.sessions() as session:
            n = queue.release_held(session)
            audit.record(session, "held-released", actor=who.label, actor_kind=who.kind, host=host, object_kind="instance", detail={"instances": n})
            session.commit()
        return n

    # -- deliveries and destinations -------------------------------------------------------
    def deliveries(self, state: str = "FAILED", destination: str = "", limit: int = 500) -> list[dict[str, Any]]:
        """Deliveries in ``state`` (all when empty), newest first."""
        with self.sessions() as session:
            q = select(Delivery, Output, Job.study_id, Job.route).join(Output, Output.id == Delivery.output_id).join(Job, Job.id == Output.job_id)
            if state:
                try:
                    q = q.where(Delivery.state == DeliveryState(state.upper()))
                except ValueError:
                    raise Invalid(f"state {state!r}: choose one of {', '.join(s.value for s in DeliveryState)}") from None
            if destination:
                q = q.where(Delivery.destination == destination)
            rows = session.execute(q.order_by(Delivery.id.desc()).limit(limit)).all()
            return [{**self._delivery_view(d), "output_id": o.id, "kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "study_id": sid, "route": route}
                    for d, o, sid, route in rows]

    def retry_deliveries(self, destination: str, who: Principal, host: str = "") -> int:
        """FAILED deliveries (of one destination, or all when empty) back to PENDING, and
        those waiting for their next attempt (RETRY_WAIT) due now; returns how many of
        both."""
        if destination and destination not in {d.name for d in self.settings.destinations}:
            raise NotFound(f"no destination {destination!r} is configured")
        with self.sessions() as session:
            n = queue.requeue_failed(session, destination or None)
            w = queue.hasten_waiting(session, destination or None)
            audit.record(session, "deliveries-retried", actor=who.label, actor_kind=who.kind, host=host, object_kind="destination", object_ref=destination or "*",
                         detail={"deliveries": n, "waiting_due_now": w})
            session.commit()
        return n + w

    def destinations(self) -> list[dict[str, Any]]:
        """Each configured destination: address, deliveries per state, last sent, why the
        newest waiting or failed delivery was not sent and when the next attempt is, health."""
        with self.sessions() as session:
            counts: dict[str, dict[str, int]] = {}
            for dest, st, n in session.execute(select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)):
                counts.setdefault(dest, {})[st.value] = n
            last = dict(session.execute(select(Delivery.destination, func.max(Delivery.sent_at)).group_by(Delivery.destination)).all())
            why: dict[str, str] = {}  # the newest waiting or failed delivery's reason, as casemask status says it
            for dest, st, reason in session.execute(select(Delivery.destination, Delivery.state, Delivery.reason)
                                                    .where(Delivery.state.in_((DeliveryState.RETRY_WAIT, DeliveryState.FAILED)))
                                                    .order_by(Delivery.id.desc()).limit(1000)):
                why.setdefault(dest, f"{st.value}: {reason or 'no reason recorded'}")
            due = dict(session.execute(select(Delivery.destination, func.min(Delivery.next_attempt_at))
                                       .where(Delivery.state == DeliveryState.RETRY_WAIT).group_by(Delivery.destination)).all())
        monitor = getattr(self.node, "health", None)
        out = []
        for d in self.settings.destinations:
            h = monitor.get(d.name) if monitor is not None else None
            address = {"dicom": f"{d.ae_title}@{d.host}:{d.port}", "folder": str(d.path), "dicomweb": hide_credentials(d.url)}[d.kind]
            out.append({"name": d.name, "kind": d.kind, "address": address, "deliveries": counts.get(d.name, {}), "last_sent_at": _iso(last.get(d.name)),
                        "not_sent": why.get(d.name), "next_attempt_at": _iso(due.get(d.name)),
                        "reachable": None if h is None else h.reachable, "health": "not checked yet" if h is None else h.detail,
                        "checked_at": None if h is None else dt.datetime.fromtimestamp(h.checked_at, dt.UTC).isoformat(timespec="seconds")})
        for name in sorted(set(counts) - {d.name for d in self.settings.destinations}):
            out.append({"name": name, "kind": "", "address": "no longer configured", "deliveries": counts[name], "last_sent_at": _iso(last.get(name)),
                        "not_sent": why.get(name), "next_attempt_at": _iso(due.get(name)),
                        "reachable": None, "health": "not configured", "checked_at": None})
        return out

    # -- routes ---------------------------------------------------------------------------
    def explain(self, data: bytes | Path, calling_ae: str = "") -> dict[str, Any]:
        """Which routes an object would take and why; nothing is stored or logged.

        Raises:
            Invalid: the bytes are not a DICOM object.
        """
        from pydicom import dcmread

        try:
            # Pixel Data present but not read (deferred): the burned-in policy asks only whether it is there.
            ds = dcmread(io.BytesIO(data), defer_size=1024) if isinstance(data, bytes) else dcmread(data, defer_size=1024)
            ds.get("SOPClassUID")
        except Exception as exc:
            raise Invalid(f"not readable as DICOM ({type(exc).__name__})") from None
        s = self.settings
        attrs = routing.attributes_of(ds, calling_ae, s.node.ae_title, routing.keys_used(s.routes))
        verdicts = routing.match_routes(s.routes, attrs)
        matched = [v.route for v in verdicts if v.matched]
        return {"routes": matched, "unrouted": None if matched else s.node.unrouted,
                "verdicts": [{"route": v.route, "matched": v.matched, "reasons": list(v.reasons)} for v in verdicts],
                "burned_in": _burned_in_notes(ds, [r for r in s.routes if r.name in matched])}

    def routes(self) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in self.settings.routes]

    # -- configuration --------------------------------------------------------------------
    def config_text(self, reveal: bool = True) -> dict[str, Any]:
        """The configuration file the node runs on. ``reveal=False`` (anyone but an
        admin): the passwords of URLs in it (``database_url``, a dicomweb ``url``) are
        hidden (:func:`hide_credentials`), and it is not editable."""
        src = self.settings.source_file
        builtin = src is None or Path(src).resolve() == DEFAULT_CONFIG.resolve()
        text = Path(src).read_text() if src and Path(src).exists() else ""
        if not reveal:
            text = hide_credentials(text)
        return {"path": str(src) if src else None, "builtin": builtin, "editable": reveal and not builtin, "text": text,
                "sha256": hashlib.sha256(text.encode()).hexdigest()}

    def check_config(self, text: str) -> Settings:
        """Validate a whole configuration as ``casemask config check`` does.

        Raises:
            Invalid: with the same problem lines ``casemask config check`` prints.
        """
        src = str(self.settings.source_file or "config")
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            err = ConfigError([f"not valid TOML: {exc}"], src)
            raise Invalid(str(err), err.problems) from None
        except RecursionError:  # tomllib recurses per nested array or inline table
            err = ConfigError(["not valid TOML here: arrays or tables nested too deep"], src)
            raise Invalid(str(err), err.problems) from None
        try:
            new = parse(raw, src, base_dir_for(self.settings.source_file))
        except ConfigError as exc:
            raise Invalid(str(exc), exc.problems) from None
        new.source_file = self.settings.source_file
        return new

    def put_config(self, text: str, who: Principal, host: str = "") -> dict[str, Any]:
        """Validate, write (atomically) and apply a new configuration.

        Raises:
            Conflict: the node runs on the built-in configuration (nothing to write).
            Invalid: the configuration has problems (nothing written).
        """
        from node.spool import write_atomic

        current = self.config_text()
        if not current["editable"]:
            raise Conflict("the node runs on the built-in configuration: start it with --config FILE to change its configuration here")
        new = self.check_config(text)
        path = Path(current["path"])
        write_atomic(path, text.encode())
        detail: dict[str, Any] = {"sha256_before": _audit_digest(current["text"]), "sha256_after": _audit_digest(text)}
        result: dict[str, Any] = {"saved": str(path), "warnings": new.warnings}
        if self.node is not None:
            applied = self.node.reload(new)
            result.update(applied)
            detail.update(applied)
        with self.sessions() as session:
            audit.record(session, "config-changed", actor=who.label, actor_kind=who.kind, host=host, object_kind="config", object_ref=path.name, detail=detail)
            session.commit()
        return result

    def reload(self, who: Principal, host: str = "") -> dict[str, Any]:
        """Read the configuration file again and apply it (also on SIGHUP).

        Raises:
            Conflict: no running node.  Invalid: the file has problems (nothing changes).
        """
        if self.node is None:
            raise Conflict("no running node to reload")
        text = self.config_text()
        new = self.check_config(text["text"]) if not text["builtin"] else self.settings
        applied = self.node.reload(new)
        with self.sessions() as session:
            audit.record(session, "config-reloaded", actor=who.label, actor_kind=who.kind, host=host, object_kind="config",
                         object_ref=Path(text["path"] or "config").name, detail={"sha256": _audit_digest(text["text"]), **applied})
            session.commit()
        return applied

    # -- audit trail ----------------------------------------------------------------------
    def audit(self, f: audit.Filter, limit: int = 200) -> list[dict[str, Any]]:
        with self.sessions() as session:
            events = audit.query(session, f, limit=min(limit, 5000))
            uids = audit.study_uids(session, events, self.pseudo.uid if self.pseudo else None)
            return [audit.as_dict(e, uids.get(e.study_id or -1)) for e in events]

    def audit_export(self, f: audit.Filter, who: Principal, host: str = "", limit: int = 5000) -> bytes:
        """The entries as DICOM Audit Messages (one XML document); the export itself is
        recorded ("Audit Log Used")."""
        with self.sessions() as session:
            events = list(reversed(audit.query(session, f, limit=limit)))
            uids = audit.study_uids(session, events, self.pseudo.uid if self.pseudo else None)
            data = audit.export_xml(events, self.audit_source(), uids)
            audit.record(session, "audit-exported", actor=who.label, actor_kind=who.kind, host=host, object_kind="audit", object_ref="audit-trail", detail={"entries": len(events)})
            session.commit()
        return data

    # -- pseudonym mapping ----------------------------------------------------------------
    def _mapping_exported(self, who: Principal, host: str, where: str, counts: dict[str, int]) -> None:
        with self.sessions() as session:
            audit.record(session, "mapping-exported", actor=who.label, actor_kind=who.kind, host=host, object_kind="mapping", object_ref=where[:128], detail=counts)
            session.commit()

    def export_mapping(self, out: Path, who: Principal, overwrite: bool = False) -> dict[str, int]:
        """Write the mapping (node.mapping) owner-only into ``out``; returns rows per file.

        Raises:
            MappingError: ``out`` exists and others can read it, or already holds an
                export and ``overwrite`` is false.
        """
        from node import mapping

        folder = mapping.private_folder(out)
        with self.sessions() as session:
            tables = mapping.tables(session)
        if not overwrite:
            mapping.refuse_existing(folder, list(tables))
        for name, (header, rows) in tables.items():
            try:
                mapping.write_private_csv(folder / name, header, rows, overwrite=overwrite)
            except FileExistsError:  # made between the check and the write
                mapping.refuse_existing(folder, [name])
        counts = {name: len(rows) for name, (_, rows) in tables.items()}
        self._mapping_exported(who, "", str(out), counts)
        return counts

    def mapping_zip(self, who: Principal, host: str = "") -> bytes:
        """The same files in a ZIP archive (for the API); the export is audited."""
        from node import mapping

        with self.sessions() as session:
            tables = mapping.tables(session)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, (header, rows) in tables.items():
                zf.writestr(name, mapping.csv_text(header, rows))
        self._mapping_exported(who, host, "http", {name: len(rows) for name, (_, rows) in tables.items()})
        return buf.getvalue()

    # -- previews -------------------------------------------------------------------------
    def preview(self, output_id: int, size: int = 256) -> bytes:
        """A PNG thumbnail of a de-identified output (outputs only: there is no way to
        ask for an original).

        Raises:
            NotFound: no such output, or its file is gone or has no image.
        """
        from node.preview import PreviewError, thumbnail_png

        with self.sessions() as session:
            o = session.get(Output, output_id)
            if o is None:
                raise NotFound(f"no output {output_id}")
            path = data_path(self.settings.node.data_dir, o.path)
        try:
            return thumbnail_png(path, size)
        except PreviewError as exc:
            raise NotFound(str(exc)) from None

    # -- similar cases (node.similar) ----------------------------------------------------
    def similar(self, data: bytes, k: int = 5, contrast: bool = False, model: str | None = None) -> dict[str, Any]:
        """The indexed anonymized cases nearest to one DICOM image, as ``casemask similar
        --json`` prints them (:class:`node.similar.SimilarService`). The query is held in
        memory only: never stored, logged or indexed, and the answer carries none of it
        but what the model reads in its pixels (label, probabilities).

        Raises:
            Invalid: not a DICOM image the model can take, ``k`` out of range, nothing
                indexed, or no single model to search with (the message says which).
            Unavailable: the model cannot be loaded.
        """
        from engine.bundle import BundleError
        from engine.runtime import RunnerError
        from node.similar import QueryError, public

        try:
            answer, _query = self._similar_service().similar(data, k=k, contrast=contrast, model=model)
        except QueryError as exc:
            raise Invalid(str(exc)) from None
        except (BundleError, RunnerError) as exc:
            log.error("similar cases: the model cannot be loaded (%s)", type(exc).__name__)
            raise Unavailable(f"the model cannot be loaded ({type(exc).__name__}); see the node's log") from None
        return public(answer)

    def _similar_service(self):
        """The similar-case service of the settings in force (a reload makes a new one);
        in a running node it uses the pixel step's loaded models."""
        from node.index import model_loader
        from node.similar import SimilarService

        settings = self.settings
        with self._similar_lock:
            if self._similar is None or self._similar.settings is not settings:
                load = model_loader(settings)
                node = self.node

                def model(name: str):
                    loaded = getattr(getattr(node, "pixel_step", None), "models", {}).get(name)
                    return loaded if loaded is not None else load(name)

                self._similar = SimilarService(settings, self.sessions, model)
            return self._similar

    # -- readiness ------------------------------------------------------------------------
    def ready(self) -> bool:
        """Database answers, disk has room, every pixel route's model is loaded, every
        destination was reachable at its last check."""
        from sqlalchemy import text

        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means: not ready
            log.warning("readiness: database unavailable (%s)", type(exc).__name__)
            return False
        if disk_free(self.settings.node.data_dir) < 64 * 2**20:
            return False
        node = self.node
        if node is not None:
            for r in self.settings.routes:
                if r.pixels == "anonymize" and (node.pixel_step is None or node.pixel_step.available(r) is not None):
                    return False
            monitor = getattr(node, "health", None)
            if monitor is not None and any(h is not None and not h.reachable for h in (monitor.get(d.name) for d in self.settings.destinations)):
                return False
        return True


def _route_models(settings: Settings) -> list[dict]:
    """Per route, the bundle its pixel step runs and the bundle's intended use."""
    from node.pixels import route_models

    return route_models(settings)
