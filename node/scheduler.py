"""APScheduler jobs: stability check and routing, processing, dispatch per destination."""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)


def _drain(fn: Callable[[], int], max_rounds: int = 1000) -> Callable[[], None]:
    """Run ``fn`` until it reports no work (bounded), logging instead of dying."""

    def job() -> None:
        for _ in range(max_rounds):
            try:
                if not fn():
                    return
            except Exception:
                log.exception("scheduled job %s failed; it runs again at the next tick", getattr(fn, "__qualname__", fn))
                return

    return job


def make_scheduler(interval_s: float, jobs: dict[str, Callable[[], int]]) -> BackgroundScheduler:
    """One interval job per entry, never two instances of the same job at once."""
    sched = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=max(4, len(jobs) + 1))},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone="UTC",
    )
    for name, fn in jobs.items():
        add_job(sched, name, fn, interval_s)
    return sched


def add_job(sched: BackgroundScheduler, name: str, fn: Callable[[], int], interval_s: float) -> None:
    """Add one drained interval job (also to a running scheduler, on reload)."""
    sched.add_job(_drain(fn), "interval", seconds=interval_s, id=name, name=name)
