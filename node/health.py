"""Are the destinations reachable? A C-ECHO, a writable folder, a QIDO-RS search answered
(or, for an account that may store but not search, an empty STOW-RS request answered).

:class:`HealthMonitor` keeps the last result per destination; the node checks every
``interval_s`` from its scheduler, so /readyz and the dashboard never wait on a peer.
It also writes the results to the database (one ``node_meta`` row, :data:`META_KEY`),
where ``casemask status``, another process, reads them (:func:`saved`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable

from node.config import Destination, Settings

log = logging.getLogger(__name__)

# The node_meta row holding the last check of every destination, as JSON:
# {name: {"reachable": bool, "detail": str, "checked_at": ISO 8601 UTC}}.
META_KEY = "destination-health"


@dataclasses.dataclass(frozen=True)
class Health:
    reachable: bool
    detail: str
    checked_at: float  # time.time()
    stored_empty: bool = False  # a dicomweb probe whose empty STOW-RS request was answered as reachable


# A store-only DICOMweb account (QIDO-RS answers 403) is asked to store an empty STOW-RS
# request at most this often; at the checks in between its search answered 403 says the
# server is there and knows the account. Every 30 s, the archive logged (and some audit)
# an upload of nothing, 2880 a day per node.
STOW_PROBE_EVERY_S = 600.0


def probe(dest: Destination, calling_ae: str, timeout_s: float = 5.0, stow: bool = True) -> Health:
    """Check one destination now: dicom -> C-ECHO answered Success; folder -> exists (or
    can be made) and is writable; dicomweb -> a QIDO-RS search is answered 2xx (or 403
    and an empty STOW-RS request is not refused: see :func:`_probe_dicomweb`; with
    ``stow`` False, a 403 is taken as reachable without that request)."""
    if dest.kind == "dicom":
        from node.scu import echo

        failure: list[str] = []
        status = echo(dest.ae_title, dest.host, dest.port, calling_ae=dest.calling_ae or calling_ae, timeout=timeout_s, why=failure)
        ok = status == 0
        why = "C-ECHO answered Success" if ok else (f"no association ({failure[0] if failure else 'timed out or aborted'})" if status is None else f"C-ECHO answered 0x{status:04X}")
        return Health(ok, why, time.time())
    if dest.kind == "folder":
        p = Path(dest.path or ".")
        while not p.exists() and p != p.parent:
            p = p.parent
        ok = os.access(p, os.W_OK)
        return Health(ok, "writable" if ok else "not writable", time.time())
    return _probe_dicomweb(dest, timeout_s, stow)


# What an HTTP status other than 2xx says about a dicomweb destination's settings.
_HTTP_MEANING = {401: "credentials refused: check auth", 403: "not allowed: check auth",
                 404: "no DICOMweb service at this url: check url", 405: "no QIDO-RS search at this url: check url"}
# ... and in answer to a STOW-RS request that carried objects (node.scu).
_STOW_MEANING = {**_HTTP_MEANING, 403: "not allowed to store: check auth", 405: "no STOW-RS at this url: check url",
                 400: "the server refused the objects (its log says why)", 409: "the server refused the objects (conflict: its log says why)",
                 413: "objects too large for the server (its upload limit)", 415: "the server does not take application/dicom: check url",
                 408: "the server timed out (tried again)", 429: "the server asks to slow down (tried again)"}


def stow_meaning(status: int) -> str:
    """What a STOW-RS answer's HTTP status (not 2xx) says to check: 'check auth' for
    401/403, 'check url' for 404/405, and so on."""
    return _STOW_MEANING.get(status, _meaning(status))


def _probe_dicomweb(dest: Destination, timeout_s: float, stow: bool = True) -> Health:
    """A QIDO-RS search for one study (PS3.18 10.6, ``GET {url}/studies?limit=1``) in
    the session STOW-RS uses (TLS, auth): reachable when it is answered 2xx. An account
    that may store but not search (a research archive's usual upload account) gets 403
    there: then a STOW-RS request with no part in it (PS3.18 10.5, nothing to store)
    decides: 2xx or a 4xx other than refused (401, 403) or absent (404, 405) is
    reachable, with that note (Orthanc answers 200, others 400 to the empty request).
    Any other answer, or none, is unreachable, with what failed (never the url's
    credentials, never an answer's body)."""
    from node.scu import dicomweb_session

    now = time.time
    try:
        session = dicomweb_session(dest)
    except LookupError as exc:
        return Health(False, str(exc), now())
    except (OSError, ssl.SSLError) as exc:
        return Health(False, f"cannot load the TLS certificates ({type(exc).__name__})", now())
    base = dest.url.rstrip("/") + "/studies"
    with session:
        status = _answer(session.get, base, timeout_s, params={"limit": "1"}, headers={"Accept": "application/dicom+json"})
        if isinstance(status, str):
            return Health(False, status, now())
        if 200 <= status < 300:
            return Health(True, f"QIDO-RS answered HTTP {status}", now())
        if status != 403:
            return Health(False, f"QIDO-RS answered HTTP {status}: {_meaning(status)}", now())
        if not stow:
            return Health(True, f"QIDO-RS answered HTTP 403 (this account may not search); an empty STOW-RS request is sent every {STOW_PROBE_EVERY_S:.0f} s", now())
        stowed = _answer(session.post, base, timeout_s, data=f"--{_EMPTY_BOUNDARY}--\r\n".encode(),
                       headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={_EMPTY_BOUNDARY}', "Accept": "application/dicom+json"})
    if isinstance(stowed, str):
        return Health(False, f"QIDO-RS answered HTTP 403 (this account may not search), then STOW-RS: {stowed}", now())
    if not (200 <= stowed < 300 or 400 <= stowed < 500) or stowed in (401, 403, 404, 405):
        return Health(False, f"QIDO-RS answered HTTP 403 and STOW-RS HTTP {stowed}: {'not allowed to store: check auth' if stowed in (401, 403) else _meaning(stowed)}", now())
    return Health(True, f"STOW-RS answered HTTP {stowed} to an empty request; QIDO-RS answered HTTP 403 (this account may not search)", now(), stored_empty=True)


# The boundary of the probe's empty STOW-RS request (RFC 2046: a multipart body of no part).
_EMPTY_BOUNDARY = "casemask-probe"


def _meaning(status: int) -> str:
    return _HTTP_MEANING.get(status, "server error" if status >= 500 else "not a DICOMweb answer")


def _answer(method: Callable[..., Any], url: str, timeout_s: float, **kw: Any) -> int | str:
    """The HTTP status ``method`` (a session's get or post) got, or why there was none.
    The answer's body is never read (``stream``): requests would otherwise read it whole
    into memory, and a server answering with an endless body held the node's health
    check (and ``config check --destinations``) for ever, gigabytes growing."""
    import requests

    try:
        with method(url, timeout=timeout_s, stream=True, **kw) as r:
            pass
    except requests.exceptions.SSLError:
        return "TLS failed (certificate not verified?)"
    except requests.exceptions.TooManyRedirects:
        return "answered with a redirect: write the server's own url"
    except (requests.exceptions.RequestException, OSError) as exc:
        return f"cannot reach ({type(exc).__name__})"
    return r.status_code


class HealthMonitor:
    """The last :class:`Health` of each destination, refreshed by :meth:`check_due`."""

    def __init__(self, settings: Settings, interval_s: float = 30.0, sessions: Any = None) -> None:
        self.settings = settings
        self.interval_s = interval_s
        self.sessions = sessions  # a sessionmaker: the results are also written for casemask status
        self.results: dict[str, Health] = {}
        self._lock = threading.Lock()
        self._last = 0.0
        self._stored_empty: dict[str, float] = {}  # per destination: when (monotonic) its empty STOW-RS was last answered

    def check_all(self) -> None:
        for dest in list(self.settings.destinations):
            stowed = self._stored_empty.get(dest.name)
            h = probe(dest, self.settings.node.ae_title, stow=stowed is None or time.monotonic() - stowed >= STOW_PROBE_EVERY_S)
            if h.stored_empty:
                self._stored_empty[dest.name] = time.monotonic()
            elif not h.reachable:
                self._stored_empty.pop(dest.name, None)
            before = self.results.get(dest.name)
            if before is None and not h.reachable:  # a destination wrong from the start: said in the log at once, not only on the dashboard
                log.warning("destination %s: unreachable at the first check (%s)", dest.name, h.detail)
            elif before is not None and before.reachable != h.reachable:  # back: INFO (the node's way: dispatch's "back up", audit's syslog)
                log.log(logging.INFO if h.reachable else logging.WARNING, "destination %s: %s (%s)", dest.name, "reachable again" if h.reachable else "unreachable", h.detail)
            with self._lock:
                self.results[dest.name] = h
        names = {d.name for d in self.settings.destinations}
        with self._lock:  # a destination a reload removed: its result goes (check_due would see a change at every tick)
            for gone in set(self.results) - names:
                del self.results[gone]
        self._last = time.monotonic()
        if self.sessions is not None:
            self._save()

    def _save(self) -> None:
        """Write the results of the configured destinations to :data:`META_KEY`. A failure
        (the database busy or away) is logged and left to the next check: the health
        check never stops on it."""
        from sqlalchemy.exc import SQLAlchemyError

        from node.db import Meta

        names = {d.name for d in self.settings.destinations}
        with self._lock:
            value = {n: {"reachable": h.reachable, "detail": h.detail,
                         "checked_at": dt.datetime.fromtimestamp(h.checked_at, dt.UTC).isoformat(timespec="seconds")}
                     for n, h in self.results.items() if n in names}
        try:
            with self.sessions() as session:
                session.merge(Meta(key=META_KEY, value=json.dumps(value, sort_keys=True)))
                session.commit()
        except SQLAlchemyError as exc:  # e.g. two processes inserting the row at once: the next check writes it
            log.debug("destination health not saved (%s)", type(exc).__name__)

    def check_due(self) -> int:
        """Check every destination when ``interval_s`` has passed, or at once when a
        reload added or removed one (scheduler job; returns 0 so the scheduler does not
        call it again at once)."""
        if time.monotonic() - self._last >= self.interval_s or set(self.results) != {d.name for d in self.settings.destinations}:
            self.check_all()
        return 0

    def get(self, name: str) -> Health | None:
        with self._lock:
            return self.results.get(name)


def saved(session: Any) -> dict[str, dict[str, Any]]:
    """The last check of each destination as a node wrote it (:data:`META_KEY`), by
    name; empty when no node has checked one yet."""
    from sqlalchemy import select

    from node.db import Meta

    value = session.scalar(select(Meta.value).where(Meta.key == META_KEY))
    try:
        found = json.loads(value) if value else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
