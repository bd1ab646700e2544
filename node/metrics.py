"""Prometheus metrics (prometheus-client).

Counters and histograms live in the process's default registry and are bumped by the
stages as things happen (one call each, see the ``observe_*`` helpers). Values that are
state rather than events (queue depth, disk free) are read from the database and the
disk when /metrics is scraped, by :class:`NodeCollector`, so they are right after a
restart and shared by every process on one database.

Labels carry names from the configuration (destinations, steps, results), never an
identifier of a patient or a study.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import Delivery, DeliveryState, Instance, Job, Output, Study

log = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: nobody alerts on them, they double the output

ASSOCIATIONS = Counter("casemask_associations", "DICOM associations requested, by result (accepted, rejected)", ["result"])
INSTANCES_RECEIVED = Counter("casemask_instances_received", "Objects received and stored (C-STORE answered Success)")
BYTES_RECEIVED = Counter("casemask_bytes_received", "Bytes of objects received and stored")
STORES_REFUSED = Counter("casemask_stores_refused", "C-STOREs answered with a failure status, by status (0xA700, 0xC210, ...); their log lines are written at most once a second per AE title and kind", ["status"])
SPOOL_DIGEST_MISMATCHES = Counter("casemask_spool_digest_mismatches", "Spool files that did not match their row's digest (torn by a crash mid-write), by where found (startup: dropped; route, pipeline: quarantined; resend: replaced)", ["where"])
QUARANTINED = Counter("casemask_quarantined", "Objects quarantined, by the step that refused them", ["step"])
DELIVERIES = Counter("casemask_deliveries", "Delivery attempts, by destination and result (sent, retry, failed)", ["destination", "result"])
DELIVERY_LATENCY = Histogram(
    "casemask_delivery_latency_seconds", "From an object's reception to its delivery, seconds",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600),
)
STEP_SECONDS = Histogram("casemask_step_seconds", "Duration of one batch of a step, seconds", ["step"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
ENGINE_BATCH_SECONDS = Histogram("casemask_engine_batch_seconds", "Duration of one model inference batch, seconds",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
AUDIT_WRITE_ERRORS = Counter("casemask_audit_write_errors", "Audit entries the database refused")
LOGIN_FAILURES = Counter("casemask_login_failures", "Failed dashboard logins")

# How a quarantine reason names its step (reasons start with or contain these words).
_STEPS = (
    ("another object of this study", "study"),
    ("verifier", "verifier"),
    ("route ", "route"),
    ("spooled", "read"),
    ("cannot read", "read"),
    ("burned", "burned_in"),
    ("gate", "gates"),
    ("pixel", "pixels"),
    ("model", "pixels"),
    ("header", "headers"),
)


def step_of(reason: str) -> str:
    """The step a quarantine reason names: read, route, pixels, gates, burned_in,
    headers, verifier, study (the rest of a study), or other."""
    low = reason.lower()
    for needle, step in _STEPS:
        if needle in low:
            return step
    return "headers" if "attribute" in low or "(00" in low else "other"


class timed:
    """``with timed("pixels"):`` (or ``t = timed("headers").start()`` ... ``t.stop()``)
    observes a duration in casemask_step_seconds{step}, or in ``histogram``."""

    def __init__(self, step: str, histogram: Histogram | None = None) -> None:
        self.metric = histogram if histogram is not None else STEP_SECONDS.labels(step=step)

    def start(self) -> timed:
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> None:
        self.metric.observe(time.perf_counter() - self.t0)

    def __enter__(self) -> timed:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- hooks the stages call ---------------------------------------------------------------------
def observe_received(size: int) -> None:
    INSTANCES_RECEIVED.inc()
    BYTES_RECEIVED.inc(size)


def observe_processed(jobs: Sequence[Job]) -> None:
    """After a pipeline batch: count quarantined objects by step."""
    from node.db import JobState

    for job in jobs:
        if job.state == JobState.QUARANTINED:
            QUARANTINED.labels(step=step_of(job.reason)).inc()


def observe_dispatched(session: Session, destination: str, deliveries: Sequence[Delivery]) -> None:
    """After a dispatch batch: results per destination, and reception-to-delivery
    latency of what was sent (one query for the batch)."""
    sent = [d.output_id for d in deliveries if d.state == DeliveryState.SENT]
    for d in deliveries:
        result = {DeliveryState.SENT: "sent", DeliveryState.FAILED: "failed"}.get(d.state, "retry")
        DELIVERIES.labels(destination=destination, result=result).inc()
    if not sent:
        return
    rows = session.execute(
        select(Instance.received_at, Delivery.sent_at)
        .join(Job, Job.instance_id == Instance.id).join(Output, Output.job_id == Job.id).join(Delivery, Delivery.output_id == Output.id)
        .where(Delivery.output_id.in_(sent), Delivery.destination == destination)
    ).all()
    for received_at, sent_at in rows:
        if received_at and sent_at:
            DELIVERY_LATENCY.observe(max(0.0, (sent_at - received_at).total_seconds()))


# -- state read at scrape time -----------------------------------------------------------------
class NodeCollector(Collector):
    """casemask_queue_depth{kind,state} from the database, casemask_disk_free_bytes of
    the data folder's file system."""

    def __init__(self, sessions: sessionmaker, data_dir: Path) -> None:
        self.sessions, self.data_dir = sessions, data_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("casemask_queue_depth", "Rows per kind (studies, instances, jobs, deliveries) and state", labels=["kind", "state"])
        with self.sessions() as session:
            for kind, model in (("studies", Study), ("instances", Instance), ("jobs", Job), ("deliveries", Delivery)):
                for state, n in session.execute(select(model.state, func.count()).group_by(model.state)):
                    depth.add_metric([kind, str(state.value)], float(n))
        yield depth
        disk = GaugeMetricFamily("casemask_disk_free_bytes", "Free bytes on the data folder's file system")
        disk.add_metric([], float(disk_free(self.data_dir)))
        yield disk


def disk_free(path: Path) -> int:
    """Free bytes for the node on ``path``'s file system (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def exposition(node_registry: CollectorRegistry) -> bytes:
    """The text exposition: process-wide counters, then the node's state gauges."""
    return generate_latest(REGISTRY) + generate_latest(node_registry)


def node_registry(sessions: sessionmaker, data_dir: Path) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(sessions, data_dir))
    return reg
