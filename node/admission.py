"""Who may connect and associate, and how many at once.

Three gates, from the cheapest:

1. TCP (``accept``): a connection beyond twice ``max_associations`` in all, or twice
   ``max_associations_per_host`` from one address, is closed at once, before any thread
   or TLS handshake is spent on it (a flood of idle connections cannot exhaust threads).
   The margin lets connections just over the association limits get a proper answer.
2. A-ASSOCIATE-RQ (EVT_REQUESTED): the called AE title must be the node's and the
   calling AE title (and host, where configured) one of ``[[sources]]``, else
   A-ASSOCIATE-RJ rejected-permanent, service-user, reason 7 or 3. Then the limits:
   more than ``max_associations`` admitted associations, or ``max_associations_per_host``
   from one address, is refused with A-ASSOCIATE-RJ rejected-transient, service-provider
   (presentation), reason 2 "local-limit-exceeded" (PS3.8 9.3.4): the sender tries
   again later.
3. PDUs: pynetdicom reads a whole PDU into memory before decoding it, whatever length
   its header declares. :func:`guard_pdu_length` closes a connection whose PDU declares
   more than the node announced as its maximum (``MAX_PDU``) plus room for an
   A-ASSOCIATE-RQ, so one PDU costs at most about a MiB.

Counts come from live association threads, never from counters that a missed event
could leave wrong.
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections.abc import Callable, Iterable

from node.config import Settings

log = logging.getLogger(__name__)

# The largest P-DATA-TF PDU the node accepts (announced as Maximum Length Received).
MAX_PDU = 1024 * 1024
# The largest PDU of any kind read into memory (an A-ASSOCIATE-RQ with 128 contexts of
# 64-character UIDs is about 0.2 MB).
MAX_PDU_READ = MAX_PDU + 64 * 1024

# A-ASSOCIATE-RJ (PS3.8 Table 9-21): (result, source, reason)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


class AccessPolicy:
    """Who may associate: the [[sources]] list, or anyone when accept_unknown_sources."""

    def __init__(self, settings: Settings) -> None:
        self.ae_title = settings.node.ae_title
        self.update(settings)

    def update(self, settings: Settings) -> None:
        """Take new [[sources]] and accept_unknown_sources (a configuration reload)."""
        sources: dict[str, set[str | None]] = {}
        for s in settings.sources:
            sources.setdefault(s.ae_title.strip(), set()).add(_resolve(s.host) if s.host else None)
        self.accept_unknown, self.sources = settings.node.accept_unknown_sources, sources

    def check(self, calling_ae: str, called_ae: str, host: str) -> tuple[tuple[int, int, int], str] | None:
        """None when allowed; else (A-ASSOCIATE-RJ result/source/reason, why)."""
        if called_ae.strip() != self.ae_title:
            return REJECT_CALLED_AE, f"called AE title {called_ae.strip()!r} is not this node's ({self.ae_title!r})"
        if self.accept_unknown:
            return None
        hosts = self.sources.get(calling_ae.strip())
        if hosts is None:
            return REJECT_CALLING_AE, f"calling AE title {calling_ae.strip()!r} is not in [[sources]]"
        if None not in hosts and host not in hosts:
            return REJECT_CALLING_AE, f"calling AE title {calling_ae.strip()!r} is not allowed from {host}"
        return None


class Admission:
    """The three gates for every listener of one node (plain and TLS share the limits)."""

    def __init__(self, settings: Settings) -> None:
        self.policy = AccessPolicy(settings)
        self.max_total = settings.node.max_associations
        self.max_per_host = settings.node.max_associations_per_host
        self._lock = threading.Lock()
        self._admitted: weakref.WeakSet = weakref.WeakSet()
        self._connecting: dict[int, str] = {}  # accepted sockets not yet an association
        self._listeners: list[Callable[[], Iterable]] = []

    def add_listener(self, active_associations: Callable[[], Iterable]) -> None:
        """A server whose live associations count towards the limits."""
        self._listeners.append(active_associations)

    def _live(self) -> list:
        return [a for listing in self._listeners for a in listing()]

    # -- gate 1: TCP ----------------------------------------------------------------------
    def connect(self, key: int, host: str) -> bool:
        """A TCP connection was accepted; False when it must be closed at once."""
        with self._lock:
            hosts = [_host(a) for a in self._live()] + list(self._connecting.values())
            if len(hosts) >= 2 * self.max_total or hosts.count(host) >= 2 * self.max_per_host:
                return False
            self._connecting[key] = host
            return True

    def connected(self, key: int) -> None:
        """The connection became an association thread (or was closed) and counts as such."""
        with self._lock:
            self._connecting.pop(key, None)

    # -- gate 2: A-ASSOCIATE-RQ -------------------------------------------------------------
    def request(self, assoc, calling_ae: str, called_ae: str, host: str) -> tuple[tuple[int, int, int], str] | None:
        """None when the association may proceed (it then counts); else the A-ASSOCIATE-RJ
        (result, source, reason) and why."""
        refusal = self.policy.check(calling_ae, called_ae, host)
        if refusal is not None:
            return refusal
        with self._lock:
            admitted = [a for a in self._admitted if a.is_alive() and not _closed(a)]
            if len(admitted) >= self.max_total:
                return REJECT_LOCAL_LIMIT, f"local limit exceeded: {len(admitted)} associations open (max_associations = {self.max_total})"
            from_host = sum(1 for a in admitted if _host(a) == host)
            if from_host >= self.max_per_host:
                return REJECT_LOCAL_LIMIT, f"local limit exceeded: {from_host} associations open from {host} (max_associations_per_host = {self.max_per_host})"
            self._admitted.add(assoc)
        return None

    def closed(self, assoc) -> None:
        """The association's connection closed: it no longer counts."""
        with self._lock:
            self._admitted.discard(assoc)


def _host(assoc) -> str:
    return str(assoc.requestor.address)


def _closed(assoc) -> bool:
    return bool(assoc.is_released or assoc.is_aborted or assoc.is_rejected)


def guard_pdu_length(assoc, limit: int = MAX_PDU_READ) -> None:
    """Make the association's socket refuse to read a PDU longer than ``limit``: the
    connection is shut down instead (pynetdicom then sees it closed, Evt17).

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``;
    this wraps ``recv`` on this one association's ``AssociationSocket`` instance."""
    sock = assoc.dul.socket
    original = sock.recv

    def recv(nr_bytes: int) -> bytearray:
        if nr_bytes > limit:
            log.warning("association from %s: a PDU declared %d bytes (at most %d accepted): connection closed", _host(assoc), nr_bytes, limit)
            raw = sock.socket
            if raw is not None:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return bytearray()
        return original(nr_bytes)

    sock.recv = recv
