"""Who may connect and associate, and how many at once.

Three gates, from the cheapest:

1. TCP (``accept``): a connection beyond twice ``max_associations_per_host`` from one
   address, or while four times ``max_associations`` association threads are still
   alive (a flood of connect-and-close), is closed at once, before any thread or TLS
   handshake is spent on it. Beyond twice ``max_associations`` open connections in all,
   it takes the place of the oldest connection that sent no A-ASSOCIATE-RQ yet, from
   the address holding the most of those (else it is closed). The margin lets
   connections just over the association limits get a proper answer.
2. A-ASSOCIATE-RQ (EVT_REQUESTED): the called AE title must be the node's and the
   calling AE title (and host, where configured) one of ``[[sources]]``, else
   A-ASSOCIATE-RJ rejected-permanent, service-user, reason 7 or 3. Then the limits:
   more than ``max_associations`` admitted associations, or ``max_associations_per_host``
   from one address, is refused with A-ASSOCIATE-RJ rejected-transient, service-provider
   (presentation), reason 2 "local-limit-exceeded" (PS3.8 9.3.4): the sender tries
   again later. With ``[node] receivers`` these two limits are counted for the node as a
   whole, in a table its processes share (:mod:`node.slots`); the TCP gate stays per
   process (a flood guard, its margins apply to each listening process).
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
import time
import weakref
from collections.abc import Callable, Iterable

from node.config import Settings
from node.slots import SharedSlots
from node.tls import peer_common_name

log = logging.getLogger(__name__)

# The largest P-DATA-TF PDU the node accepts (announced as Maximum Length Received).
MAX_PDU = 1024 * 1024
# The largest PDU of any kind read into memory (an A-ASSOCIATE-RQ with 128 contexts of
# 64-character UIDs is about 0.2 MB).
MAX_PDU_READ = MAX_PDU + 64 * 1024

# The smallest Maximum Length a peer may announce: a PDV's 6-byte header and 1 byte.
MIN_PEER_PDU = 7

# A-ASSOCIATE-RJ (PS3.8 Table 9-21): (result, source, reason)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_NO_REASON = (0x01, 0x02, 0x01)  # rejected-permanent, service-provider (ACSE), no reason given


def network_of(host: str) -> str:
    """What the limits count as one sender: an IPv4 address (also written IPv4-mapped),
    or the /64 an IPv6 address lies in (a site hands each IPv6 host a /64, and the host
    may use any of its 2**64 addresses: counted per address, one host could take every
    place ``max_associations_per_host`` leaves to the others). Anything else as it is."""
    if ":" not in host:
        return host
    import ipaddress

    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _certificate_cn(assoc) -> str:
    """The CN of ``assoc``'s verified client certificate ("" when none, or no TLS)."""
    dul_socket = getattr(getattr(assoc, "dul", None), "socket", None)
    return peer_common_name(getattr(dul_socket, "socket", None))


class AccessPolicy:
    """Who may associate: the [[sources]] list, or anyone when accept_unknown_sources."""

    def __init__(self, settings: Settings) -> None:
        self.ae_title = settings.node.ae_title
        self.update(settings)

    def update(self, settings: Settings) -> None:
        """Take new [[sources]] and accept_unknown_sources (a configuration reload)."""
        sources: dict[str, set[tuple[str | None, str | None]]] = {}
        for s in settings.sources:
            sources.setdefault(s.ae_title.strip(), set()).add((_resolve(s.host) if s.host else None, s.certificate_cn or None))
        self.accept_unknown, self.sources = settings.node.accept_unknown_sources, sources

    def check(self, calling_ae: str, called_ae: str, host: str, certificate_cn: str = "") -> tuple[tuple[int, int, int], str] | None:
        """None when allowed; else (A-ASSOCIATE-RJ result/source/reason, why).

        ``certificate_cn``: the CN of the peer's verified client certificate ("" on the
        plain port or without one); a source with ``certificate_cn`` admits its AE title
        only with that CN, whatever accept_unknown_sources says (a bound AE title is
        never free for anyone to claim)."""
        if called_ae.strip() != self.ae_title:
            return REJECT_CALLED_AE, f"called AE title {called_ae.strip()!r} is not this node's ({self.ae_title!r})"
        entries = self.sources.get(calling_ae.strip())
        bound = {cn for _, cn in entries or () if cn is not None}
        if bound and certificate_cn not in bound:
            shown = f"a client certificate with CN {certificate_cn!r}" if certificate_cn else "no verified client certificate"
            return REJECT_CALLING_AE, f"calling AE title {calling_ae.strip()!r} is bound to a client certificate ([[sources]] certificate_cn) and came with {shown}"
        if self.accept_unknown:
            return None
        entries = {(h, cn) for h, cn in entries or () if cn is None or cn == certificate_cn}
        hosts = {h for h, _ in entries} if entries else None
        if hosts is None:
            # AE titles are compared exactly (PS3.8 9.3.2: case matters); a sender set up as
            # "ct_room1" for a source written "CT_ROOM1" is told apart from a stranger.
            same = [ae for ae in self.sources if ae.upper() == calling_ae.strip().upper()]
            why = f" ([[sources]] has {same[0]!r}: AE titles are case-sensitive)" if same else ""
            return REJECT_CALLING_AE, f"calling AE title {calling_ae.strip()!r} is not in [[sources]]{why}"
        if None not in hosts and host not in hosts:
            allowed = ", ".join(sorted(h for h in hosts if h is not None))
            return REJECT_CALLING_AE, f"calling AE title {calling_ae.strip()!r} is not allowed from {host} ([[sources]] host: {allowed})"
        return None


class RejectionRecord:
    """Which rejected associations are written to the audit trail and the log: per
    sender address, at most one per ``every_s`` seconds; the next one written says how
    many were left out.

    Each rejection was an audit row committed on its own (an fsync) and a log line: a
    peer that is not in [[sources]] reconnecting in a loop (measured: 116 rejections a
    second from one client on a loaded 2-core machine) grew the database by some
    10 million rows a day and slowed every sender's C-STOREs (100 objects took 4.5 s
    instead of 1.9 s). The Prometheus counter still counts every rejection."""

    def __init__(self, every_s: float = 1.0, max_hosts: int = 4096) -> None:
        self.every_s = every_s
        self.max_hosts = max_hosts
        self._lock = threading.Lock()
        self._hosts: dict[str, list] = {}  # host -> [when last written (monotonic), left out since]

    def should_record(self, host: str) -> int | None:
        """None: leave this rejection out (counted); else write it, and the number of
        rejections from ``host`` left out since the last one written."""
        now = time.monotonic()
        with self._lock:
            entry = self._hosts.get(host)
            if entry is not None and now - entry[0] < self.every_s:
                entry[1] += 1
                return None
            left_out = entry[1] if entry is not None else 0
            if entry is None and len(self._hosts) >= self.max_hosts:
                self._hosts = {h: e for h, e in self._hosts.items() if now - e[0] < self.every_s or e[1]}
                if len(self._hosts) >= self.max_hosts:  # many addresses at once: one line each second for all
                    host = "*"
                    entry = self._hosts.get(host)
                    if entry is not None and now - entry[0] < self.every_s:
                        entry[1] += 1
                        return None
                    left_out = entry[1] if entry is not None else 0
            self._hosts[host] = [now, 0]
            return left_out


class Admission:
    """The three gates for every listener of one node (plain and TLS share the limits)."""

    def __init__(self, settings: Settings, slots: SharedSlots | None = None) -> None:
        """``slots``: the node-wide association table its processes share
        (``[node] receivers`` > 1); None: this process counts alone."""
        self.policy = AccessPolicy(settings)
        self.max_total = settings.node.max_associations
        self.max_per_host = settings.node.max_associations_per_host
        self.slots = slots
        self.rejections = RejectionRecord()
        self._lock = threading.Lock()
        self._admitted: weakref.WeakSet = weakref.WeakSet()
        self._connecting: dict[int, str] = {}  # accepted sockets not yet an association
        self._handshaking: dict[int, tuple[str, socket.socket, float]] = {}  # TLS: host, a dup of its socket, since (monotonic)
        self._first_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # association -> when the TCP gate first saw it
        self._hung_up: weakref.WeakSet = weakref.WeakSet()  # silent connections closed to make room (their threads end soon)
        self.hang_ups = RejectionRecord()  # their log lines: one a second per address
        self.closed_at_once = RejectionRecord()  # connections the TCP gate refused: one line a second per address
        self._listeners: list[Callable[[], Iterable]] = []
        quiet_cut_pdus()

    def add_listener(self, active_associations: Callable[[], Iterable]) -> None:
        """A server whose live associations count towards the limits."""
        self._listeners.append(active_associations)

    def _live(self) -> list:
        return [a for listing in self._listeners for a in listing()]

    # -- gate 1: TCP ----------------------------------------------------------------------
    def connect(self, key: int, host: str, handshake: socket.socket | None = None) -> bool:
        """A TCP connection was accepted; False when it must be closed at once.

        Beyond the total, the connection takes the place of a *silent* one (no
        A-ASSOCIATE-RQ yet, or, on a TLS port, no finished handshake yet: ``handshake``
        is its socket until :meth:`handshake_done`; :func:`make_room`) rather than being
        closed: else connections from a few addresses that never send a request (or a
        ClientHello) held every place for ``acse_timeout_s`` at a time, and a real
        sender's connection was closed at once."""
        host = network_of(host)
        with self._lock:
            live = self._live()
            if len(live) + len(self._connecting) >= 4 * self.max_total:
                return False  # threads of closed connections still winding down: a flood
            now = time.monotonic()
            held = [a for a in live if _open(a) and a not in self._hung_up]
            for a in held:
                self._first_seen.setdefault(a, now)
            hosts = [network_of(_host(a)) for a in held] + list(self._connecting.values())
            if hosts.count(host) >= 2 * self.max_per_host:
                return False
            if len(hosts) >= 2 * self.max_total and not self._make_room(held, host):
                return False
            self._connecting[key] = host
            if handshake is not None:  # a descriptor of its own: ssl's wrap_socket detaches the one accepted
                try:
                    mine = handshake.dup()
                except OSError:  # out of descriptors: a flood
                    return False
                self._handshaking[key] = (host, mine, now)
            return True

    def handshake_done(self, key: int) -> None:
        """The TLS handshake of connection ``key`` ended (an association may follow, or
        the connection closed): it can no longer be closed as a silent handshake."""
        with self._lock:
            entry = self._handshaking.pop(key, None)
        if entry is not None:
            entry[1].close()

    def _make_room(self, held: list, host: str) -> bool:
        """Close one silent connection for a new one from ``host`` (called holding the
        lock): the oldest of the address holding the most silent connections, provided it
        holds more than ``host`` does. A sender's A-ASSOCIATE-RQ follows its connect at
        once, so its connection is silent for milliseconds and is never the oldest of the
        busiest address; the flood's connections replace each other. False: none to close
        (every place holds an association, or ``host`` is the busiest itself)."""
        silent: dict[str, list] = {}  # host -> [(since, association or handshake key)]
        for a in held:
            if _silent(a):
                silent.setdefault(network_of(_host(a)), []).append((self._first_seen.get(a, 0.0), a))
        for key, (h, _sock, since) in self._handshaking.items():
            silent.setdefault(h, []).append((since, key))
        if not silent:
            return False
        busiest = max(silent, key=lambda h: len(silent[h]))
        if len(silent[busiest]) <= len(silent.get(host, ())):
            return False
        victim = min(silent[busiest], key=lambda e: e[0])[1]
        if isinstance(victim, int):  # a TLS handshake: its thread's wrap_socket fails and closes it
            raw = self._handshaking.pop(victim)[1]
            _shut(raw)
            raw.close()
        else:
            self._hung_up.add(victim)
            hang_up(victim)
        left_out = self.hang_ups.should_record(busiest)
        if left_out is not None:
            more = f"; {left_out} more since not logged" if left_out else ""
            log.warning("connection from %s closed: it sent no A-ASSOCIATE-RQ and its place was needed for a new connection "
                        "(too many connections open: max_associations)%s", busiest, more)
        return True

    def connected(self, key: int) -> None:
        """The connection became an association thread (or was closed) and counts as such."""
        with self._lock:
            self._connecting.pop(key, None)

    # -- gate 2: A-ASSOCIATE-RQ -------------------------------------------------------------
    def request(self, assoc, calling_ae: str, called_ae: str, host: str) -> tuple[tuple[int, int, int], str] | None:
        """None when the association may proceed (it then counts); else the A-ASSOCIATE-RJ
        (result, source, reason) and why."""
        refusal = self.policy.check(calling_ae, called_ae, host, _certificate_cn(assoc))
        if refusal is not None:
            return refusal
        host = network_of(host)  # the limits count an IPv6 /64 as one sender
        if self.slots is not None:
            why = self.slots.take(assoc, host)
            if why:
                return REJECT_LOCAL_LIMIT, why
            with self._lock:
                self._admitted.add(assoc)
            return None
        with self._lock:
            admitted = [a for a in self._admitted if still_open(a)]
            if len(admitted) >= self.max_total:
                return REJECT_LOCAL_LIMIT, f"local limit exceeded: {len(admitted)} associations open (max_associations = {self.max_total})"
            from_host = sum(1 for a in admitted if network_of(_host(a)) == host)
            if from_host >= self.max_per_host:
                return REJECT_LOCAL_LIMIT, f"local limit exceeded: {from_host} associations open from {host} (max_associations_per_host = {self.max_per_host})"
            self._admitted.add(assoc)
        return None

    def closed(self, assoc) -> None:
        """The association's connection closed: it no longer counts."""
        with self._lock:
            self._admitted.discard(assoc)
        if self.slots is not None:
            self.slots.give_back(assoc)


def _host(assoc) -> str:
    return str(assoc.requestor.address)


def _open(assoc) -> bool:
    """Its connection is still open (pynetdicom drops the socket when it closes)."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None) is not None


def _silent(assoc) -> bool:
    """No A-ASSOCIATE-RQ arrived whole on this accepted connection yet."""
    return bool(assoc.is_acceptor and assoc.requestor.primitive is None)


def hang_up(assoc) -> None:
    """Close the association's connection from our side: pynetdicom's DUL reads the end
    of the stream (Evt17) and the association ends, its close event included."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is not None:
        _shut(raw)


def _shut(raw: socket.socket) -> None:
    """Shut both directions of ``raw``: whoever blocks reading it reads the end."""
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def wake_if_waiting(assoc) -> None:
    """The connection closed before any A-ASSOCIATE-RQ arrived: pynetdicom's association
    thread would still wait ``acse_timeout`` for one. Hand it the 'nothing came' it waits
    for (``receive_pdu`` returning None), so it ends now."""
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


def _closed(assoc) -> bool:
    return bool(assoc.is_released or assoc.is_aborted or assoc.is_rejected)


def still_open(assoc) -> bool:
    """An admitted association still counts: its thread runs and it has not ended."""
    return bool(assoc.is_alive() and not _closed(assoc))


def malformed_request(assoc) -> str:
    """Why an A-ASSOCIATE-RQ cannot be negotiated ("" when it can): PS3.8 9.3.2.2 wants
    an abstract syntax and at least one transfer syntax in every presentation context
    (pynetdicom's negotiation raises on a context without one, killing the association's
    thread and leaving its connection open), and each context its own odd ID from 1 to
    255 (pynetdicom refuses an even one while decoding, but answers two contexts with one
    ID as if both were accepted, and a P-DATA then names either). A request needs one
    presentation context at least (PS3.8 9.3.2): with none, nothing can be sent on it.

    The Maximum Length sub-item is required (PS3.8 D.1), and a length of 1 to 6 bytes
    leaves no room for a PDV's header: pynetdicom accepts both, then fails to fragment
    its first answer (TypeError, ValueError) and aborts the association after the
    C-STORE was handled, so the sender never gets a status. 0 means no limit."""
    max_length = assoc.requestor.maximum_length
    if max_length is None:
        return "no Maximum Length item"
    if 0 < max_length < MIN_PEER_PDU:
        return f"a Maximum Length below {MIN_PEER_PDU} bytes"
    contexts = assoc.requestor.primitive.presentation_context_definition_list
    if not contexts:
        return "no presentation context"
    seen: set[int] = set()
    for cx in contexts:
        if not cx.abstract_syntax or not cx.transfer_syntax:
            return "a presentation context without abstract or transfer syntax"
        if cx.context_id in seen:
            return "two presentation contexts with one ID"
        seen.add(cx.context_id)
    return ""


# The slowest rate at which a DIMSE message may go on arriving once its
# ``message_timeout_s`` has passed (bytes per second, averaged from its first fragment).
MIN_MESSAGE_RATE = 16 * 1024
# DIMSE messages of one association received and waiting for the handler (not counting
# the one it handles). The node negotiates no asynchronous operations window, so a
# sender waits for each answer before its next request (PS3.7 D.3.3.3: one operation
# outstanding); one that does not is aborted once this many wait.
MAX_WAITING_MESSAGES = 4
# A DIMSE command set's bytes at most (a C-STORE-RQ's is about 200; none the node
# answers comes near), and the bytes of a data set pynetdicom keeps in memory (that of
# any message but a C-STORE-RQ, whose data set goes to a bounded file): the node answers
# C-ECHO (no data set) and C-STORE only.
MAX_COMMAND_BYTES = 64 * 1024
MAX_MEMORY_DATA_SET = 1024 * 1024
# The most PDVs one P-DATA-TF may carry. PS3.8 9.3.5 sets no bound, and senders put one
# or two in a PDU (a command, a data set fragment); a PDU of 1 MiB holds 174762 empty
# ones, each decoded into objects and handed on one by one: measured, 30 MiB of memory
# and 0.8 s of CPU per such PDU, fast path on or off (docs/security.md).
MAX_PDVS = 4096
# Within one DIMSE message, the PDVs after the first MESSAGE_PDVS_FREE must carry at least
# MIN_PDV_BYTES each on average: tiny PDVs spread over many P-DATA-TFs of MAX_PDVS each
# cost the DUL thread about 0.8 s of CPU per MiB (against 0.1 s for a sender's usual PDVs
# of 16 KiB or more), a core for a sender at 1.3 MB/s. No sender fragments a message this
# finely (dcmtk's smallest Maximum Length, 4 KiB, gives PDVs of 4 KiB).
MESSAGE_PDVS_FREE = 64
MIN_PDV_BYTES = 256


def fragment_problem(message, primitive) -> str:
    """Why the PDVs of P-DATA ``primitive`` may not be added to ``message`` (the DIMSE
    message in progress, None before its first fragment); "" when they may.

    pynetdicom keeps in memory, without a bound, a data fragment that comes before its
    message's command set is complete (PS3.8 E.2 and PS3.7 6.3.1: the command, then the
    data set), every fragment of a command set whose last fragment never comes, and the
    data set of any message other than a C-STORE-RQ (measured: 400 fragments of 1 MiB
    took the node from 134 to 540 MB resident, on one association). A command fragment
    after the command's last one was joined to it (a second C-STORE-RQ before the first
    one's data set: the data set was stored under the first command, its file named
    after the second). A data fragment on another presentation context than its
    command's (PS3.8 9.3.5.1: a message goes on one context) was read as if it were on
    the command's, in that context's transfer syntax."""
    from pynetdicom.dimse_messages import DIMSEMessage

    if len(primitive.presentation_data_value_list) > MAX_PDVS:
        return f"a P-DATA-TF of more than {MAX_PDVS} PDVs"
    done = message is not None and type(message) is not DIMSEMessage  # its command set was decoded
    command = message.encoded_command_set.tell() if message is not None and not done else 0
    in_memory = message.data_set.tell() if done and message._data_set_file is None and message.data_set is not None else 0
    command_context = message.context_id if done else None
    ended_here = False  # the command set's last fragment is in this P-DATA
    for context_id, data in primitive.presentation_data_value_list:
        if not data:
            # pynetdicom raises on it, but only when it reaches it: after a message that
            # ends before it (a C-ECHO-RQ's command), it dropped it and every PDV after it
            return "a PDV without a message control header"
        if data[0] & 1:
            if done:
                return "a command fragment after its command set was complete"
            command += len(data) - 1
            if command > MAX_COMMAND_BYTES:
                return f"a command set over {MAX_COMMAND_BYTES} bytes"
            if data[0] & 2:
                # complete: the PDVs after it in this P-DATA are checked as those of the
                # next one (a second command, a data set on another context: pynetdicom
                # read them as in two P-DATA, unchecked). Their bytes in memory are those
                # of one PDU (MAX_PDU_READ); the next P-DATA counts them.
                done, ended_here, command_context = True, True, context_id
        elif not done:
            return "a data set fragment before its command set was complete"
        elif context_id != command_context:
            return "a data set fragment on another presentation context than its command's"
        else:
            if not ended_here and message._data_set_file is None:
                in_memory += len(data) - 1
                if in_memory > MAX_MEMORY_DATA_SET:
                    return f"a data set over {MAX_MEMORY_DATA_SET} bytes for a message that is not a C-STORE-RQ"
            if data[0] & 2:
                return ""  # the data set's last fragment: pynetdicom ends the message here and reads no further PDV
    return ""


def guard_dimse(assoc, message_timeout_s: float | None = None, min_rate: int = MIN_MESSAGE_RATE) -> None:
    """Turn an exception while decoding a received DIMSE message into an abort, and
    abort a message that arrives too slowly.

    pynetdicom decodes P-DATA into DIMSE messages on the association's DUL thread, inside
    its state machine, where nothing catches an exception: a command set that pydicom
    cannot decode, an unknown command, a P-DATA on a context that was never accepted
    (``KeyError`` in pynetdicom's chunked reception) end that thread, and the
    association then hangs until its idle timeout, skipping its close event. This wraps
    ``receive_primitive`` on this association's DIMSE provider: on an exception the
    association is aborted (Evt19, "invalid PDU", as pynetdicom does for a message it
    cannot convert).

    The idle timer restarts with every PDU, so a peer that sends a small P-DATA just
    inside ``network_timeout_s``, again and again, never finishing its C-STORE, would
    hold the association for good. A message still incomplete ``message_timeout_s``
    (``[node] dimse_timeout_s``) after its first fragment must have arrived at
    ``min_rate`` bytes per second on average so far, else the association is aborted
    (a 4 GiB object at 16 KiB/s takes three days; no modality's link is that slow).

    pynetdicom queues every message received whole until the handler takes it, without
    a bound: a sender that sends C-STORE after C-STORE without waiting for the answers
    (no asynchronous operations were negotiated) piled up thousands of data sets, each
    an incoming file on disk and its first 64 KiB in memory (measured: 2900 waiting,
    +230 MiB resident, after 10 s of one such association). When a new message begins
    while ``MAX_WAITING_MESSAGES`` wait, the association is aborted.

    Fragments pynetdicom would keep in memory without a bound, or join to a complete
    command set, abort the association before it reads them (:func:`fragment_problem`);
    so does a message whose PDVs, beyond its first :data:`MESSAGE_PDVS_FREE`, carry
    fewer than :data:`MIN_PDV_BYTES` each on average (tiny PDVs cost the DUL thread CPU
    out of all proportion to the bytes they bring)."""
    dimse = assoc.dimse
    original = dimse.receive_primitive
    current = [0.0, 0, 0]  # the message in progress: its first fragment (monotonic s), bytes and PDVs so far

    def count(primitive) -> None:
        """Add ``primitive``'s PDVs and bytes to the message in progress."""
        pdvs = primitive.presentation_data_value_list
        if dimse.message is None:  # the first fragment of a new message
            current[0], current[1], current[2] = time.monotonic(), 0, 0
        current[1] += sum(len(pdv[1]) for pdv in pdvs)
        current[2] += len(pdvs)

    def too_fine() -> bool:
        return current[2] > MESSAGE_PDVS_FREE and current[1] < MIN_PDV_BYTES * current[2]

    def too_slow() -> bool:
        elapsed = time.monotonic() - current[0]
        return elapsed > message_timeout_s and current[1] < min_rate * elapsed  # type: ignore[operator]

    def receive_primitive(primitive) -> None:
        if len(primitive.presentation_data_value_list) > MAX_PDVS:
            log.warning("association from %s: a P-DATA-TF of more than %d PDVs: aborted", _host(assoc), MAX_PDVS)
            dimse.message = None
            assoc.dul.event_queue.put("Evt19")
            return
        for part in message_parts(primitive):
            if not receive_part(part):
                return

    def receive_part(primitive) -> bool:
        """Hand on one part of a P-DATA (:func:`message_parts`); False when the
        association is being aborted (the parts after it are not read)."""
        try:
            if problem := fragment_problem(dimse.message, primitive):
                log.warning("association from %s: %s: aborted", _host(assoc), problem)
                dimse.message = None
                assoc.dul.event_queue.put("Evt19")
                return False
            if dimse.message is None and dimse.msg_queue.qsize() >= MAX_WAITING_MESSAGES:
                log.warning("association from %s: a DIMSE message began while %d others waited for their answers (no asynchronous operations negotiated): aborted",
                            _host(assoc), MAX_WAITING_MESSAGES)
                assoc.dul.event_queue.put("Evt19")
                return False
            count(primitive)
            if too_fine():
                log.warning("association from %s: a DIMSE message in PDVs of fewer than %d bytes on average (%d PDVs): aborted", _host(assoc), MIN_PDV_BYTES, current[2])
                dimse.message = None
                assoc.dul.event_queue.put("Evt19")
                return False
            if message_timeout_s is not None and too_slow():
                log.warning("association from %s: a DIMSE message arrived slower than %d bytes/s after dimse_timeout_s = %g s: aborted", _host(assoc), min_rate, message_timeout_s)
                dimse.message = None
                assoc.dul.event_queue.put("Evt19")
                return False
            original(primitive)
            return True
        except Exception as exc:
            log.warning("association from %s: malformed DIMSE message (%s): aborted", _host(assoc), type(exc).__name__)
            dimse.message = None
            assoc.dul.event_queue.put("Evt19")
            return False

    dimse.receive_primitive = receive_primitive


def message_parts(primitive) -> list:
    """``primitive`` cut where one DIMSE message may end and the next begin: after the
    last fragment of a data set, and after the last fragment of a command set when a
    command fragment follows (a message without a data set, or a second command the
    fragment check refuses). P-DATA primitives of consecutive PDVs, in order;
    ``[primitive]`` itself when there is no such place (one message's PDVs, a command
    and its data set included).

    PS3.8 9.3.5 lets one P-DATA-TF carry PDVs of several messages. pynetdicom's
    ``receive_primitive`` ends a message at its last fragment and silently drops the
    PDVs after it in the same P-DATA: a second C-STORE-RQ there was never answered, its
    sender left waiting. Handed on one part at a time, each message is completed (and
    queued for its answer) before the next one's first fragment is read."""
    from pynetdicom.pdu_primitives import P_DATA

    pdvs = primitive.presentation_data_value_list
    cuts = [k + 1 for k, (_, data) in enumerate(pdvs[:-1]) if data and data[0] & 2 and (not data[0] & 1 or pdvs[k + 1][1][:1] and pdvs[k + 1][1][0] & 1)]
    if not cuts:
        return [primitive]
    parts = []
    for start, stop in zip([0, *cuts], [*cuts, len(pdvs)]):
        part = P_DATA()
        part.presentation_data_value_list.extend(pdvs[start:stop])
        parts.append(part)
    return parts


def guard_state_machine(assoc) -> None:
    """Drop a local A-ASSOCIATE-AC/RJ (or any local primitive) that arrives after the DUL
    already began closing the connection (Sta13), instead of ending the DUL thread.

    When a peer follows its A-ASSOCIATE-RQ with garbage, pynetdicom's DUL aborts (Sta13)
    while the association thread is still deciding; its answer is then an event the state
    machine rejects with ``InvalidEventError``, raised on the DUL thread, which dies and
    leaves the association to its idle timeout. In Sta13 the only way on is the
    connection's close, so the late answer is dropped."""
    from pynetdicom.fsm import InvalidEventError

    machine = assoc.dul.state_machine
    original = machine.do_action

    def do_action(event: str) -> None:
        try:
            original(event)
        except InvalidEventError:
            if machine.current_state != "Sta13":
                raise
            log.debug("association from %s: %s dropped, connection already closing", _host(assoc), event)

    machine.do_action = do_action


# The node's log lines about PDU reads it cut off: at most one a second per address and kind.
READ_REFUSALS = RejectionRecord()


class CutPduLines(logging.Filter):
    """For pynetdicom's DUL logger: its lines about a PDU cut short by the peer ("The
    received PDU is shorter than expected", "Connection closed before the entire PDU was
    received") or of an unknown type are written at most once a second, the next one
    saying how many were left out, and without a traceback. Each is one connection a
    peer closed or garbled, an ERROR line apiece: a peer connecting, sending half a PDU
    and closing in a loop wrote one per connection. Its records name no address, so the
    limit is for the process; the Prometheus counters of associations still count."""

    PREFIXES = ("The received PDU is shorter than expected", "Connection closed before the entire PDU", "Unknown PDU type received")

    def __init__(self) -> None:
        super().__init__()
        self.record = RejectionRecord()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith(self.PREFIXES):
            return True
        left_out = self.record.should_record("*")
        if left_out is None:
            return False
        more = f" ({left_out} more such lines since not logged)" if left_out else ""
        record.msg, record.args = msg + more, ()
        record.exc_info, record.exc_text = None, None
        return True


class RefusedStoreLines(logging.Filter):
    """For the C-STORE handler's logger (``node.scp``): a refused C-STORE's line ("C-STORE
    from AE: ... -> 0xC212") is written at most once a second per calling AE title and
    kind of refusal, the next one saying how many were left out. Each refusal was a
    WARNING line, and a sender looping one bad object on one association wrote 1486 in
    10 s (measured). Every refusal is still answered with its status."""

    def __init__(self) -> None:
        super().__init__()
        self.record = RejectionRecord()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str) or not record.msg.startswith("C-STORE from "):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        left_out = self.record.should_record(f"{record.msg}\x00{args[:1]}")
        if left_out is None:
            return False
        if left_out:
            record.msg, record.args = record.getMessage() + f" ({left_out} more like it from this AE title since not logged)", ()
        return True


def quiet_cut_pdus() -> None:
    """Install :class:`CutPduLines` on pynetdicom's DUL logger and
    :class:`RefusedStoreLines` on ``node.scp``'s (idempotent)."""
    for name, kind in (("pynetdicom.dul", CutPduLines), ("node.scp", RefusedStoreLines)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


# The most one ``recv`` of a PDU asks for. pynetdicom asks for 4096 bytes at a time: ten
# calls (and ten bytearray growths) for the bench's 38 KB data set, 23-28 us of thread
# CPU against 8-11 us in 64 KiB calls (a socketpair with the PDU waiting, load 10); a
# call returns what has arrived, so the deadline below is checked as often either way.
READ_CHUNK = 64 * 1024


def guard_pdu_length(assoc, limit: int = MAX_PDU_READ, read_timeout_s: float | None = None) -> None:
    """Make the association's socket refuse to read a PDU longer than ``limit``, or to
    spend more than ``read_timeout_s`` on one PDU: the connection is shut down instead
    (pynetdicom then sees it closed, Evt17).

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``,
    each a loop of blocking ``socket.recv`` calls whose timeout (``network_timeout_s``)
    applies to each call alone: a peer that sends one byte now and then, just inside
    that timeout, would hold the association's threads for as long as it likes (a PDU
    of 1 MiB at a byte a minute: two years). Here the whole read of a PDU's header or
    body must end within ``read_timeout_s`` of its first bytes (1 MiB in 60 s is 17 KiB/s,
    far below any link a modality uses). This replaces ``recv`` on this one
    association's ``AssociationSocket`` instance with the same loop plus the deadline.

    A read that fails (the peer reset the connection, or ``network_timeout_s`` passed
    with half a PDU read) returns what arrived, as a close does: pynetdicom logged each
    such failure as two ERROR lines and a traceback, and a peer that connects and resets
    in a loop wrote a dozen log lines a connection (2000 in 12 s, measured). The node's
    own lines here are written at most once a second per address and kind
    (:data:`READ_REFUSALS`)."""
    sock = assoc.dul.socket
    original = sock.recv

    def refuse(why: str, *args) -> bytearray:
        left_out = READ_REFUSALS.should_record(f"{_host(assoc)} {why}")
        if left_out is not None:
            more = f"; {left_out} more like it from this address since not logged" if left_out else ""
            log.warning("association from %s: " + why + ": connection closed%s", _host(assoc), *args, more)
        raw = sock.socket
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return bytearray()

    def recv(nr_bytes: int) -> bytearray:
        if nr_bytes > limit:
            return refuse("a PDU declared %d bytes (at most %d accepted)", nr_bytes, limit)
        if read_timeout_s is None:
            try:
                return original(nr_bytes)
            except OSError:  # reset or timed out: a close (pynetdicom sees the short read)
                return bytearray()
        raw = sock.socket
        out = bytearray()
        deadline = 0.0
        while len(out) < nr_bytes:
            try:
                chunk = raw.recv(min(nr_bytes - len(out), READ_CHUNK))
            except TimeoutError:
                return refuse("a PDU stopped arriving for network_timeout_s = %g s", read_timeout_s)
            except OSError:  # reset by the peer: a close
                return bytearray()
            if not chunk:  # closed: pynetdicom sees the short read
                return out
            out += chunk
            if len(out) < nr_bytes:
                now = time.monotonic()
                if not deadline:
                    deadline = now + read_timeout_s
                elif now > deadline:
                    refuse("a PDU took longer than network_timeout_s = %g s to arrive", read_timeout_s)
                    return bytearray()
        return out

    sock.recv = recv
