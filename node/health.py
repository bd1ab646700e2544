"""Are the destinations reachable? A C-ECHO, a writable folder, an HTTP answer.

:class:`HealthMonitor` keeps the last result per destination; the node checks every
``interval_s`` from its scheduler, so /readyz and the dashboard never wait on a peer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from node.config import Destination, Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Health:
    reachable: bool
    detail: str
    checked_at: float  # time.time()


def probe(dest: Destination, calling_ae: str, timeout_s: float = 5.0) -> Health:
    """Check one destination now: dicom -> C-ECHO answered Success; folder -> exists (or
    can be made) and is writable; dicomweb -> the server answers HTTP at all."""
    if dest.kind == "dicom":
        from node.scu import echo

        status = echo(dest.ae_title, dest.host, dest.port, calling_ae=dest.calling_ae or calling_ae, timeout=timeout_s)
        ok = status == 0
        why = "C-ECHO answered Success" if ok else ("no association" if status is None else f"C-ECHO answered 0x{status:04X}")
        return Health(ok, why, time.time())
    if dest.kind == "folder":
        p = Path(dest.path or ".")
        while not p.exists() and p != p.parent:
            p = p.parent
        ok = os.access(p, os.W_OK)
        return Health(ok, "writable" if ok else "not writable", time.time())
    try:
        with urllib.request.urlopen(dest.url, timeout=timeout_s) as r:
            return Health(True, f"HTTP {r.status}", time.time())
    except urllib.error.HTTPError as exc:  # it answered: reachable
        return Health(True, f"HTTP {exc.code}", time.time())
    except (urllib.error.URLError, OSError) as exc:
        return Health(False, f"cannot reach ({type(getattr(exc, 'reason', exc)).__name__})", time.time())


class HealthMonitor:
    """The last :class:`Health` of each destination, refreshed by :meth:`check_due`."""

    def __init__(self, settings: Settings, interval_s: float = 30.0) -> None:
        self.settings = settings
        self.interval_s = interval_s
        self.results: dict[str, Health] = {}
        self._lock = threading.Lock()
        self._last = 0.0

    def check_all(self) -> None:
        for dest in list(self.settings.destinations):
            h = probe(dest, self.settings.node.ae_title)
            before = self.results.get(dest.name)
            if before is not None and before.reachable != h.reachable:
                log.warning("destination %s: %s (%s)", dest.name, "reachable again" if h.reachable else "unreachable", h.detail)
            with self._lock:
                self.results[dest.name] = h
        self._last = time.monotonic()

    def check_due(self) -> int:
        """Check every destination when ``interval_s`` has passed (scheduler job; returns
        0 so the scheduler does not call it again at once)."""
        if time.monotonic() - self._last >= self.interval_s or set(self.results) - {d.name for d in self.settings.destinations}:
            self.check_all()
        return 0

    def get(self, name: str) -> Health | None:
        with self._lock:
            return self.results.get(name)
