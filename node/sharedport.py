"""One listening socket for all of the node's receiving processes, and who accepts next.

With ``[node] receivers = N`` (node.receivers) N processes receive on the node's DICOM
port(s). They used to listen on N sockets bound with ``SO_REUSEPORT``: the kernel then
hands each connection to a socket chosen by a hash of the connection's addresses, blind
to how busy each process is. 4 senders on 2 processes were split 3-1 in 6 of 10 starts:
one process GIL-bound with three associations while the other idled
(docs/ingest.md).

Here the node process opens *one* listening socket per port (:func:`open_listening`,
bound without ``SO_REUSEPORT``, so nothing else can share the port) and each receiver
process inherits it (``subprocess.Popen(pass_fds=...)``). Every process waits for
connections on that socket and accepts them, the way pre-forking servers do, and an
:class:`AcceptBoard` decides who takes the next one: a process that holds more open
connections than the least busy live process leaves a pending connection to it for up
to :data:`YIELD_S` (then takes it anyway, so a stalled or descheduled process never
holds a connection back for longer). The losers of the race on ``accept`` get
``EAGAIN``: the shared socket is non-blocking in every process (``O_NONBLOCK`` belongs
to the open file, which all of them share).

The board is an anonymous memory file (``memfd_create``) of one record per process
place: the process id, how many connections it holds open (accepted and not yet
closed), and how many times it wrote its record (so a process that accepted and closed
a connection is seen to have moved though its count is back where it was). The node process makes it before starting its receivers; each inherits it.
A record whose process is gone (a receiver killed, waiting to be started again) is
ignored. Nothing in it is needed for a guarantee: association limits are counted by
node.slots, admission by node.admission, exactly as before; a wrong count only sends a
connection to a busier process.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# How long a busier process leaves a pending connection to an idler one before taking
# it itself: bounds the delay a connection can get from the balancing.
YIELD_S = 0.1
# How often the busier process looks whether the connection was taken meanwhile.
_LOOK_S = 0.002
# How often a receiver waiting for the node process to listen looks (wait_listening).
_GATE_S = 0.02
# How often a process writes its count again if it changed since it last wrote it
# (:meth:`AcceptBoard._refresh`).
REFRESH_S = 0.2
# Listen backlog (socketserver's 5 drops SYNs when connections come in bursts).
BACKLOG = 128

_RECORD = struct.Struct("<iiI")  # process id (0: none), connections open, times published (wraps)


def open_listening(host: str, port: int, wait_s: float = 10.0) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (``SO_REUSEADDR``, never
    ``SO_REUSEPORT``), not yet listening (the node listens once every receiver process
    is ready: :func:`start_listening`). While the address is in use, try again for up
    to ``wait_s`` seconds (the receivers of a node killed a moment ago may still be
    exiting, e.g. from a long fsync, and hold the old socket).

    Raises:
        OSError: something listens there still (EADDRINUSE), or the address is wrong.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.setblocking(False)  # shared: accept() must never block in any process
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def start_listening(sock: socket.socket) -> None:
    """Make the shared socket accept connections (every process waiting on it starts
    accepting within :data:`_GATE_S`)."""
    sock.listen(BACKLOG)


def is_listening(sock: socket.socket) -> bool:
    """Whether ``sock`` listens (the node process has called :func:`start_listening`)."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def wait_listening(sock: socket.socket, stopping: threading.Event) -> bool:
    """Wait until ``sock`` listens; False when ``stopping`` was set first. (Polling a
    socket that does not listen yet reports it ready at once: a receiver waits here
    instead.)"""
    while not is_listening(sock):
        if stopping.wait(_GATE_S):
            return False
    return True


def pending(sock: socket.socket) -> bool:
    """Whether a connection waits on the listening ``sock`` (without taking it)."""
    poller = select.poll()  # not select(): it fails for descriptors above 1023
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class AcceptBoard:
    """Who holds how many open connections, per process place (see the module
    docstring). One object per process: :meth:`claim` a place, then :meth:`publish`
    this process's count whenever it changes (a connection accepted or closed)."""

    def __init__(self, fd: int, places: int) -> None:
        self.fd = fd
        self.places = places
        self._map = mmap.mmap(fd, places * _RECORD.size)
        self._place = -1
        self._count: Callable[[], int] = lambda: 0
        self._published = 0
        self._last_count = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        # place -> (pid, times published) of a process that let a connection wait out
        # YIELD_S: not waited for again until it writes its record again (it accepted or
        # closed something). Keyed by its count instead, a process frozen with 0 open
        # connections stayed passed over for good once it thawed, accepted one and closed
        # it (its count back at 0): the node no longer left it any connection.
        self._passed_over: dict[int, tuple[int, int]] = {}

    @classmethod
    def create(cls, places: int) -> AcceptBoard:
        """A new board of ``places`` records, all empty (in the node process, before its
        receivers start; pass :attr:`fd` to them).

        Raises:
            OSError: no memory file could be made.
        """
        fd = os.memfd_create("casemask-accept-board")
        try:
            os.ftruncate(fd, places * _RECORD.size)
            return cls(fd, places)
        except BaseException:
            os.close(fd)
            raise

    def claim(self, place: int, count: Callable[[], int]) -> None:
        """This process takes record ``place`` (0: the node process, 1..: its
        receivers); ``count()`` says how many connections it holds open now."""
        if not 0 <= place < self.places:
            raise ValueError(f"accept board: place {place} outside 0..{self.places - 1}")
        with self._lock:
            self._place, self._count = place, count
        self.publish()
        threading.Thread(target=self._refresh, name="AcceptBoard", daemon=True).start()

    def _refresh(self) -> None:
        """Write this process's count again whenever it moved since it was last written.
        A connection closed by its peer is still counted when its close event publishes
        (pynetdicom drops the socket after that event): the record then said 1 for a
        process holding nothing, until its next connection, and a process that has
        moved looked as if it had not (:meth:`least_other`)."""
        while not self._closing.wait(REFRESH_S):
            if self._count() != self._last_count:
                self.publish()

    def publish(self) -> None:
        """Write this process's count of open connections into its record."""
        mine = self._count()
        with self._lock:
            if self._place >= 0:
                self._published = (self._published + 1) & 0xFFFFFFFF
                self._last_count = mine
                _RECORD.pack_into(self._map, self._place * _RECORD.size, os.getpid(), mine, self._published)

    def least_other(self) -> int | None:
        """The fewest open connections a live other process holds; None if none lives."""
        least = None
        with self._lock:
            if self._place < 0:
                return None
            records = [(i, *_RECORD.unpack_from(self._map, i * _RECORD.size)) for i in range(self.places) if i != self._place]
            for place, pid, _count, published in records:
                if self._passed_over.get(place, (pid, published)) != (pid, published):
                    del self._passed_over[place]  # it moved since: waited for again
            passed_over = dict(self._passed_over)
        for place, pid, count, published in records:
            if pid > 0 and passed_over.get(place) != (pid, published) and _alive(pid):
                least = count if least is None else min(least, count)
        return least

    def _pass_over_idlers(self) -> None:
        """Every other process less busy than this one let a connection wait the whole
        :data:`YIELD_S`: a stopped (SIGSTOP, frozen) or hung process never takes one, and
        waiting for it on every connection held this process's accepting to ten a second,
        so a flood of connects kept a sender's association waiting past its ACSE timeout.
        It is waited for again once its record changes."""
        mine = self._count()
        with self._lock:
            if self._place < 0:
                return
            for i in range(self.places):
                pid, count, published = _RECORD.unpack_from(self._map, i * _RECORD.size)
                if i != self._place and pid > 0 and count < mine:
                    self._passed_over[i] = (pid, published)

    def should_yield(self) -> bool:
        """Whether another live process holds fewer open connections than this one."""
        least = self.least_other()
        return least is not None and least < self._count()

    def yield_to_idler(self, sock: socket.socket, limit_s: float = YIELD_S) -> None:
        """Before accepting from the shared ``sock``: while a less busy live process
        exists and the connection is still pending, leave it for up to ``limit_s``
        seconds. Returns when the caller should try ``accept`` (which raises
        BlockingIOError if another process took the connection meanwhile)."""
        if not self.should_yield():
            return
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            time.sleep(_LOOK_S)
            if not pending(sock) or not self.should_yield():
                return
        self._pass_over_idlers()

    def close(self) -> None:
        """Empty this process's record and unmap the board (the descriptor is the
        caller's: the node process passes it to receivers it starts later)."""
        self._closing.set()
        with self._lock:
            if self._place >= 0:
                _RECORD.pack_into(self._map, self._place * _RECORD.size, 0, 0, 0)
                self._place = -1
            self._map.close()


@dataclass
class SharedListening:
    """What one process of the node needs to accept from the shared sockets."""

    sockets: dict[int, socket.socket]  # port -> the listening socket (plain, TLS)
    board: AcceptBoard
    place: int  # this process's record on the board: 0 the node process, 1.. its receivers
    owner: bool  # the node process: it makes the sockets listen (the others wait for it)

    def close(self) -> None:
        """Empty this process's record; close its descriptors of the sockets."""
        self.board.close()
        for sock in self.sockets.values():
            sock.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
