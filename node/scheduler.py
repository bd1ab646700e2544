"""APScheduler jobs: stability check and routing, processing, dispatch per destination,
retention."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from node.reasons import location

log = logging.getLogger(__name__)


def _drain(fn: Callable[[], int], max_rounds: int = 1000) -> Callable[[], None]:
    """Run ``fn`` until it reports no work (bounded), logging instead of dying.

    A failure is logged by its class and where it was raised, never its message (which
    may quote a header value); the frames, which are code only, follow at debug level."""

    def job() -> None:
        for _ in range(max_rounds):
            try:
                if not fn():
                    return
            except Exception as exc:
                name = getattr(fn, "__qualname__", fn)
                log.error("scheduled job %s failed (%s at %s); it runs again at the next tick", name, type(exc).__name__, location(exc))
                log.debug("scheduled job %s failed at:\n%s", name, "".join(traceback.format_tb(exc.__traceback__)))
                return

    return job


def make_scheduler(interval_s: float, jobs: dict[str, Callable[[], int]], intervals: Mapping[str, float] | None = None) -> BackgroundScheduler:
    """One interval job per entry (every ``intervals[name]`` seconds, else
    ``interval_s``), never two instances of the same job at once."""
    intervals = intervals or {}
    sched = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=max(4, len(jobs) + 1))},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone="UTC",
    )
    for name, fn in jobs.items():
        add_job(sched, name, fn, intervals.get(name, interval_s))
    return sched


def add_job(sched: BackgroundScheduler, name: str, fn: Callable[[], int], interval_s: float) -> None:
    """Add one drained interval job (also to a running scheduler, on reload)."""
    sched.add_job(_drain(fn), "interval", seconds=interval_s, id=name, name=name)
