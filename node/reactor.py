"""Event-driven waits for pynetdicom's two per-association reactor threads on the
node's accepted associations, in place of their polling.

pynetdicom 3.0 runs two threads per association, and both poll:

- the DUL thread (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay``
  whenever a pass found nothing to do, then ``select``s the socket with a zero timeout;
- the association thread (``Association._run_reactor``) sleeps a fixed 1 ms per pass,
  then looks for a decoded DIMSE message.

A short sleep answers fast and burns CPU; a long one is cheap and slow. The node used
to poll every 50 us while busy (``reactor_delay_s``): strace counted 49 clock_nanosleep
and 35 pselect6 per C-STORE, and a GIL hand-off each. Here, for *accepted*
associations only (the node's SCU keeps pynetdicom's loops):

- the DUL thread blocks in ``poll()`` on the socket and an eventfd, which is written
  when the association thread hands it a primitive to send (``to_provider_queue.put``),
  when it is told to stop (``kill_dul``, ``stop_dul``), or at most every
  :data:`MAX_WAIT_S` (and by the ARTIM timer's expiry) so every check of the original
  loop still runs;
- the association thread waits on a ``threading.Event`` that the DUL thread sets once a
  pass leaves something for it (a decoded message, a release or abort indication) and
  when it ends, again at most :data:`MAX_WAIT_S`.

Each pass of either loop does exactly what pynetdicom's does; only *when* a pass runs
changes. One exception on the DUL thread: a P-DATA-TF read in Sta6 goes straight to the
DIMSE layer (node.pdatafast, "A P-DATA fast path" in docs/ingest.md), with DT-2's
effects, instead of through the event queue and the state machine. This reaches below pynetdicom's public API (the names above and the loop's
body): :func:`check_pynetdicom` fails when the installed version's loops differ from
the ones this module was written against, and ``tests/test_reactor.py`` runs it.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import threading
import time

from pynetdicom import dul as _dul
from pynetdicom.pdu import A_ABORT_RQ

from node import pdatafast
from node.pinning import source_digest

log = logging.getLogger(__name__)

# The longest a reactor thread sleeps without being woken: it bounds how late a timer
# (idle, ARTIM) or a thread's death is noticed. 0: pynetdicom's polling loops
# (``[node] reactor_max_wait_ms``, set by install()).
MAX_WAIT_S = 0.05

# SHA-256 (first 16 hex digits) of the source of the pynetdicom functions this module
# replaces or depends on, as in pynetdicom 3.0.4. A new version with other loops must be
# read again before these hooks are trusted with it (check_pynetdicom).
EXPECTED_SOURCES = {
    "DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "DULServiceProvider.stop_dul": "28a7e0be126e7b30",
    "DULServiceProvider.kill_dul": "5ceccf8dd01c2072",
    "Association._run_reactor": "f28838c5559e462a",
}



def source_digests() -> dict[str, str]:
    """The digests :data:`EXPECTED_SOURCES` is compared with, for the installed pynetdicom."""
    from pynetdicom.association import Association

    return {
        "DULServiceProvider.run_reactor": source_digest(_ORIGINAL_RUN_REACTOR),
        "DULServiceProvider.stop_dul": source_digest(_ORIGINAL_STOP_DUL),
        "DULServiceProvider.kill_dul": source_digest(_ORIGINAL_KILL_DUL),
        "Association._run_reactor": source_digest(Association._run_reactor),
    }


def check_pynetdicom() -> list[str]:
    """Names of the pynetdicom functions whose source differs from the version these
    hooks were written against ([] when all agree)."""
    got = source_digests()
    return [name for name, want in EXPECTED_SOURCES.items() if got.get(name) != want]


# -- wake-ups -------------------------------------------------------------------------------------
class _Wake:
    """An eventfd the DUL thread polls beside its socket. Writes and the close are
    serialized: a write racing the close must never reach a file that reused the number."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._guard = threading.Lock()

    def set(self) -> None:
        with self._guard:
            if self.fd >= 0:
                try:
                    os.eventfd_write(self.fd, 1)
                except BlockingIOError:  # the counter is full: a wake-up is pending anyway
                    pass

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:  # nothing written since the last drain
            pass

    def close(self) -> None:
        with self._guard:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


_lock = threading.Lock()


def assoc_event(assoc) -> threading.Event:
    """The event an accepted association's thread waits on (made on first use)."""
    ev = assoc.__dict__.get("_casemask_wake")
    if ev is None:
        with _lock:
            ev = assoc.__dict__.setdefault("_casemask_wake", threading.Event())
    return ev


def _blocking(dul) -> bool:
    return getattr(dul, "_casemask_wake", None) is not None


# -- the DUL thread ---------------------------------------------------------------------------------
_ORIGINAL_RUN_REACTOR = _dul.DULServiceProvider.run_reactor
_ORIGINAL_STOP_DUL = _dul.DULServiceProvider.stop_dul
_ORIGINAL_KILL_DUL = _dul.DULServiceProvider.kill_dul


def _run_reactor(self) -> None:
    """``DULServiceProvider.run_reactor`` with a blocking wait where it sleeps."""
    if not self.assoc.is_acceptor or MAX_WAIT_S <= 0:
        return _ORIGINAL_RUN_REACTOR(self)
    wake = _Wake()
    provider_queue = self.to_provider_queue
    plain_put = provider_queue.put

    def put(item, block=True, timeout=None):
        plain_put(item, block, timeout)
        wake.set()

    provider_queue.put = put  # the association thread's primitives to send wake us
    self._casemask_wake = wake
    assoc_wake = assoc_event(self.assoc)
    poller = select.poll()
    polled = None  # the socket file number registered with poller
    poller.register(wake.fd, select.POLLIN)
    try:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            readable = False  # poll() just saw the socket readable (node.pdatafast then skips its select)
            if idle:
                polled, readable = _wait(self, poller, polled, wake)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            fast = None  # a P-DATA read by node.pdatafast, for DT-2 below
            try:
                if self._process_recv_primitive():
                    pass
                elif read := pdatafast.read_event(self, readable):
                    self._idle_timer.restart()
                    if read is not True:
                        fast = read
            except Exception as exc:  # as pynetdicom: abort, bypassing the state machine
                log.error("association reactor failed (%s): aborting the association", type(exc).__name__)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            if fast is not None:  # what do_action("Evt10") does in Sta6; raises as it does
                pdatafast.deliver(self, fast)
                if self.assoc.dimse.msg_queue.qsize() or self.to_user_queue.qsize():
                    assoc_wake.set()
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False
            if self.assoc.dimse.msg_queue.qsize() or self.to_user_queue.qsize():
                assoc_wake.set()
    finally:
        self._kill_thread = True
        assoc_wake.set()
        wake.close()


def _wait(dul, poller, polled, wake: _Wake) -> tuple[int | None, bool]:
    """Block until the socket is readable, a primitive waits to be sent, the thread is
    told to stop, or MAX_WAIT_S (less when the ARTIM timer expires sooner) has passed.
    Returns the socket file number now registered with ``poller``, and whether poll()
    found that socket readable (False when it did not poll)."""
    if dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return polled, False
    sock = getattr(dul.socket, "socket", None)
    fileno = -1
    if sock is not None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return polled, False  # decrypted bytes wait in the TLS layer: poll() cannot see them
        try:
            fileno = sock.fileno()
        except OSError:
            fileno = -1
    if fileno != polled:
        if polled is not None and polled >= 0:
            try:
                poller.unregister(polled)
            except (KeyError, ValueError):
                pass
        if fileno >= 0:
            # POLLIN only: TCP urgent data (POLLPRI) is no PDU, and the select behind a
            # wake-up does not count it as readable, so a poll() that reported it woke
            # at once, again and again (a spinning thread until the idle timeout).
            # pynetdicom's loop ignores it too; errors and hang-ups are always reported.
            poller.register(fileno, select.POLLIN)
        polled = fileno
    timeout = MAX_WAIT_S or 0.05
    artim = dul.artim_timer
    if artim._start_time is not None and artim._end_time is None and artim.timeout is not None:
        timeout = max(0.0, min(timeout, artim.remaining))
    readable = False
    for fd, events in poller.poll(timeout * 1000):
        if fd == wake.fd:
            wake.drain()  # only when written: an empty eventfd's read is a failed syscall
        elif fd == polled and events & select.POLLIN:
            readable = True
    return polled, readable


def _stop_dul(self) -> bool:
    """``DULServiceProvider.stop_dul``, waking a blocked reactor."""
    if not _blocking(self):
        return _ORIGINAL_STOP_DUL(self)
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        self._casemask_wake.set()
        while self.is_alive():
            time.sleep(self._run_loop_delay)
        return True
    return False


def _kill_dul(self) -> None:
    """``DULServiceProvider.kill_dul``, waking a blocked reactor."""
    self._kill_thread = True
    wake = getattr(self, "_casemask_wake", None)
    if wake is not None:
        wake.set()


# -- the association thread ----------------------------------------------------------------------------
class ReactorClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``.

    The association reactor's ``time.sleep(0.001)``, on an accepted association's own
    thread, becomes a wait for the event the DUL thread sets (at most
    :data:`MAX_WAIT_S`); on a requested association (the node's SCU) it sleeps
    ``delay`` while the association is busy (a C-STORE in the last half second on that
    thread, :meth:`mark_busy`), 1 ms otherwise. Every other sleep, and every other
    name, is the time module's."""

    BUSY_S = 0.5

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.local = threading.local()

    def mark_busy(self) -> None:
        self.local.busy_until = time.monotonic() + self.BUSY_S

    def sleep(self, seconds: float) -> None:
        if seconds == 0.001:
            assoc = threading.current_thread()
            if getattr(assoc, "is_acceptor", False) and _blocking(getattr(assoc, "dul", None)):
                wait_for_message(assoc)
                return
            if getattr(self.local, "busy_until", 0.0) > time.monotonic():
                seconds = self.delay
        time.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def wait_for_message(assoc) -> None:
    """Block an accepted association's reactor until the DUL thread left it something
    (a message, a release or abort indication), its DUL ended, or MAX_WAIT_S passed."""
    ev = assoc_event(assoc)
    if not (assoc.dimse.msg_queue.qsize() or assoc.dul.to_user_queue.qsize() or assoc._kill or not assoc.dul.is_alive()):
        ev.wait(MAX_WAIT_S or 0.05)
    ev.clear()


_clock: ReactorClock | None = None


def install(delay: float, max_wait_s: float = 0.05) -> ReactorClock:
    """Install the hooks (once per process). ``delay``: the busy poll of requested
    associations (and of accepted ones when ``max_wait_s`` is 0); ``max_wait_s``:
    :data:`MAX_WAIT_S`, for associations accepted from now on (0: pynetdicom's polling)."""
    global _clock, MAX_WAIT_S
    import pynetdicom.association

    with _lock:
        MAX_WAIT_S = max_wait_s
        if _clock is None:
            _clock = ReactorClock(delay)
            pynetdicom.association.time = _clock  # type: ignore[attr-defined]
            _dul.DULServiceProvider.run_reactor = _run_reactor
            _dul.DULServiceProvider.stop_dul = _stop_dul
            _dul.DULServiceProvider.kill_dul = _kill_dul
        _clock.delay = delay
    return _clock


def mark_busy() -> None:
    """Note that the calling association thread handled a C-STORE (see ReactorClock)."""
    if _clock is not None:
        _clock.mark_busy()
