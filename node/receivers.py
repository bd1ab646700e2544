"""More processes receiving on the node's port: ``[node] receivers = N``.

One Python process decodes DIMSE messages and runs C-STORE handlers on one core at a
time (the GIL), however many modalities send at once. With ``receivers = N`` the node
process opens the listening socket of each port (and TLS port) and starts N - 1
*receiver processes* that inherit it: all N accept from the one socket, a less busy
process first (node.sharedport), so associations are received on up to N cores. A
receiver runs only the network edge
(:func:`node.scp.start_server`, with its own database engine): it stores, commits and
answers exactly as the node process does; routing, processing and delivery stay in the
node process, which reads the rows the receivers committed.

Guarantees kept:

- Success only after the file and row are durable: the receivers run the same handler.
- Two associations sending the same SOP Instance UID to two processes at once are
  handled one at a time: the handler takes a lock on a byte of
  ``data_dir/receivers.lock`` (``fcntl.lockf``, released by the kernel if a process
  dies), as well as its per-process lock.
- No orphan listener: a receiver asks the kernel for SIGKILL when the node process dies
  (``PR_SET_PDEATHSIG``), so a SIGKILLed node leaves no process holding the port.
- No silent sharing with another node: the port is bound once, by the node process,
  without ``SO_REUSEPORT``; if anything listens there already, it stops with "address
  in use" as a single process would.

- One node's limits: ``max_associations`` and ``max_associations_per_host`` are counted
  for the node as a whole, in a table the node process makes before starting its
  receivers and each inherits (:mod:`node.slots`); a receiver that dies frees its slots
  (the kernel drops its record locks). The TCP gate of node.admission (a flood guard,
  with its margins) stays per process.

A configuration reload (SIGHUP, the API) reaches the receivers: the node sends each the
new settings through its stdin and it takes the new [[sources]] and
``accept_unknown_sources`` (:meth:`Receivers.update`), and says so on its stdout; the
reload returns once every receiver has (bounded), so a source removed is refused by
every process by the time the reload is reported done. The Prometheus counters a
receiver bumps (associations, instances and bytes received, audit write errors) are
added to the node process's, which serves /metrics (:func:`_add_counts`). Their log
records go to the node process too, which writes them through its own handlers with
"[receiver PID]" before the message (:func:`_read_receiver`): one log, escaped as the
node's (node.logfmt).

Per process still: the TCP gate and the "disk below min_free_disk_mb" message (once a
minute in each process).

A receiver that dies while the node runs (its slots come back; the others and the node
process go on receiving) is started again after a pause, logged; one that keeps dying
within a minute of its start is given up after a few tries (:class:`Restarts`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from node.config import Settings

log = logging.getLogger(__name__)

LOCK_FILE = "receivers.lock"
_PR_SET_PDEATHSIG = 1
READY = b"listening\n"
RELOADED = b"reloaded\n"  # a receiver took the settings the node sent it (Receivers.update)
RELOAD_WAIT_S = 10.0


# A receiver that dies while the node runs is started again after a pause that doubles
# with each *quick* death in a row (one within QUICK_DEATH_S of its start): 1 s, 2 s,
# 4 s ... at most MAX_BACKOFF_S. After MAX_QUICK_DEATHS quick deaths in a row it is not
# started again (something kills it at once: a restart loop would only fill the log);
# the node goes on receiving in its other processes.
QUICK_DEATH_S = 60.0
MAX_QUICK_DEATHS = 5
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0


class Restarts:
    """When to start one receiver again after it died (one per receiver place)."""

    def __init__(self, quick_s: float = QUICK_DEATH_S, max_quick: int = MAX_QUICK_DEATHS, first_s: float = FIRST_BACKOFF_S, max_s: float = MAX_BACKOFF_S) -> None:
        self.quick_s, self.max_quick, self.first_s, self.max_s = quick_s, max_quick, first_s, max_s
        self.quick = 0  # quick deaths in a row

    def after_death(self, lived_s: float) -> float | None:
        """The receiver died ``lived_s`` seconds after it was started: seconds to wait
        before starting it again, or None to give up (``max_quick`` quick deaths in a row)."""
        self.quick = self.quick + 1 if lived_s < self.quick_s else 0
        if self.quick >= self.max_quick:
            return None
        return min(self.first_s * 2 ** max(self.quick - 1, 0), self.max_s)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Receivers:
    """The node's receiver processes (``count`` of them, possibly 0). One that dies while
    the node runs is started again (:class:`Restarts`)."""

    def __init__(self, settings: Settings, count: int, writer: str, slots_fd: int, sockets: dict[int, int] | None = None, board_fd: int = -1) -> None:
        """``writer``: the node process's owner token, which the receivers' rows carry
        (``received_by``): they are part of its run (node.queue.drop_unspooled).
        ``slots_fd``: the node's association table (node.slots), inherited by each.
        ``sockets``: port -> descriptor of the listening socket the node process opened
        for it, and ``board_fd``: who holds how many connections (node.sharedport);
        inherited by each, receiver ``i`` (0-based) takes place ``i + 1`` on the board."""
        self.settings = settings
        self.count = count
        self.writer = writer
        self.slots_fd = slots_fd
        self.sockets = dict(sockets or {})
        self.board_fd = board_fd
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()  # self.procs and the settings a new receiver gets
        self._stopping = threading.Event()
        self._reloads: dict[int, int] = {}  # PID -> settings updates it has confirmed
        self._reloaded = threading.Condition()

    def _spawn(self, place: int) -> subprocess.Popen:
        """Receiver process ``place`` (0-based), given the current settings.

        Raises:
            OSError: it could not be started.
        """
        shared = (self.sockets, self.board_fd, place + 1, self.count + 1)
        blob = pickle.dumps((self.settings, logging.getLogger().level, os.getpid(), self.writer, self.slots_fd, shared))
        fds = (self.slots_fd, self.board_fd, *self.sockets.values())
        p = subprocess.Popen([sys.executable, "-m", "node.receivers"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=fds)
        assert p.stdin is not None
        try:
            p.stdin.write(blob)
            p.stdin.flush()
        except OSError:
            p.kill()
            p.wait()
            raise
        return p

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the receiver processes and wait until each listens (importing the
        node takes a few seconds).

        Raises:
            OSError: a receiver exited or did not listen within ``timeout_s`` (the others
                are stopped).
        """
        with self._lock:
            for place in range(self.count):
                self.procs.append(self._spawn(place))
        readies = []
        for place, p in enumerate(self.procs):
            ready = threading.Event()
            readies.append(ready)
            threading.Thread(target=self._watch, args=(place, p, ready), name=f"receiver-{place}", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        for p, ready in zip(self.procs, readies):
            while not ready.wait(0.2):
                if p.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise OSError(f"a receiver process did not start listening (exit status {p.poll()}); see the log above")
        # Not "listening" yet: the shared sockets listen once the node process starts its
        # own listeners (node.sharedport), and "listening on" is what serve says then.
        log.info("%d receiver process(es) ready to accept on the node's port(s)", self.count)

    def _watch(self, place: int, p: subprocess.Popen, ready: threading.Event) -> None:
        """Read receiver ``place``'s output until it exits; while the node runs, start it
        again (bounded by :class:`Restarts`)."""
        restarts = Restarts()
        started = time.monotonic()
        restarted = False
        while True:
            _read_receiver(p.stdout, p.pid, ready, restarted, on_reloaded=self._confirmed)
            code = p.wait()
            if self._stopping.is_set() or not ready.is_set() and not restarted:
                return  # stopped by the node, or it failed at start (start() says so)
            lived = time.monotonic() - started
            log.error("receiver process %d died (%s) after %.0f s while the node runs", p.pid, _exit_status(code), lived)
            new = self._restart(place, p.pid, restarts, lived)
            if new is None:
                return
            p, ready, restarted, started = new, threading.Event(), True, time.monotonic()

    def _restart(self, place: int, pid: int, restarts: Restarts, lived: float) -> subprocess.Popen | None:
        """Start receiver ``place`` again (dead process ``pid``, which lived ``lived``
        seconds) after the pause :class:`Restarts` says; None when it gives up or the node
        stops."""
        while True:
            delay = restarts.after_death(lived)
            if delay is None:
                log.error("receiver process %d is not restarted: %d quick deaths in a row (each within %g s of its start); the node goes on receiving "
                          "in its other process(es); find the cause in the log above, then restart the node", pid, restarts.quick, restarts.quick_s)
                return None
            log.warning("starting a receiver process in place of %d in %g s", pid, delay)
            if self._stopping.wait(delay):
                return None
            with self._lock:
                if self._stopping.is_set():
                    return None
                try:
                    new = self._spawn(place)
                except OSError as exc:
                    log.error("a receiver process could not be started in place of %d (%s)", pid, exc.strerror or type(exc).__name__)
                    lived = 0.0  # a quick death
                    continue
                self.procs[place] = new
                return new

    def _confirmed(self, pid: int) -> None:
        """Receiver ``pid`` took the settings sent to it (its RELOADED line)."""
        with self._reloaded:
            self._reloads[pid] = self._reloads.get(pid, 0) + 1
            self._reloaded.notify_all()

    def update(self, settings: Settings, wait_s: float = RELOAD_WAIT_S) -> list[int]:
        """A configuration reload: each receiver takes the new [[sources]] and
        accept_unknown_sources (as the node process's own listeners do); a receiver
        started later gets them too. Returns once each running receiver has confirmed
        it (before, a reload reported done could still find a receiver admitting a
        source it removed), or after ``wait_s`` seconds.

        Fails closed: a receiver that did not confirm in time (hung, or its pipe
        broken) is killed (:func:`_kill_unconfirmed`) before this returns, so that no
        process still running the old settings accepts anything; the node starts another
        in its place, with the new settings (:meth:`_watch`). Returns the PIDs killed."""
        blob = pickle.dumps(settings)
        with self._lock:
            self.settings = settings
            procs = list(self.procs)
        with self._reloaded:
            before = {p.pid: self._reloads.get(p.pid, 0) for p in procs}
        sent, unsent = [], []
        for p in procs:
            try:
                assert p.stdin is not None
                p.stdin.write(blob)
                p.stdin.flush()
                sent.append(p)
            except (OSError, ValueError) as exc:
                log.error("receiver process %d did not take the new configuration (%s)", p.pid, type(exc).__name__)
                unsent.append(p)
        deadline = time.monotonic() + wait_s
        with self._reloaded:
            while waiting := [p for p in sent if self._reloads.get(p.pid, 0) <= before[p.pid] and p.poll() is None]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._reloaded.wait(min(left, 0.5))  # 0.5: a receiver that dies meanwhile is noticed
        if waiting:
            log.error("receiver process(es) %s did not confirm the new configuration within %g s: killed, so that none admits by the old "
                      "[[sources]]; each is started again with the new configuration", ", ".join(str(p.pid) for p in waiting), wait_s)
        unconfirmed = waiting + [p for p in unsent if p.poll() is None]  # a broken pipe: it never will
        _kill_unconfirmed(unconfirmed)
        return [p.pid for p in unconfirmed]

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every receiver (each finishes the C-STOREs it is answering), then
        SIGKILL what is still running after ``timeout_s``. None is started again."""
        self._stopping.set()
        with self._lock:
            procs, self.procs = self.procs, []
        for p in procs:
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass  # it is gone already
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _kill_unconfirmed(procs: list[subprocess.Popen], wait_s: float = 5.0) -> None:
    """SIGKILL receivers that did not confirm a reload (a hung one may not act on
    SIGTERM) and wait for them to exit: the kernel closes their listening sockets, so
    connections go to processes that run the new settings. An association one of them
    was answering ends without an answer, and its sender sends again (nothing it had
    been answered Success for is lost). The watcher thread starts another in its place."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:  # stuck in the kernel (D state): its threads that accept are gone already
            log.error("receiver process %d did not exit within %g s of SIGKILL", p.pid, wait_s)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the process that started this one dies; exit at
    once if it is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(0)


def run_receiver(settings: Settings, parent: int, writer: str, slots_fd: int, shared: tuple[dict[int, int], int, int, int]) -> int:
    """A receiver process: accept from the node's listening sockets until SIGTERM (or the
    node's death). Its rows carry ``writer``, the node process's owner token; it counts
    associations in the node's table ``slots_fd`` (node.slots). ``shared``: (port ->
    inherited listening socket's descriptor, the accept board's descriptor, this
    process's place on it, the number of places) (node.sharedport)."""
    from node.admission import still_open
    from node.db import make_engine, pool_size_for
    from node.slots import SharedSlots
    from node.deid import Pseudonymizer
    from node.reasons import withhold_warning_texts
    from node.scp import start_server
    from node.sharedport import AcceptBoard, SharedListening
    from node.startup import load_secret

    _die_with_parent(parent)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the node's (Receivers.update)
    withhold_warning_texts()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = settings.node
    size = node.db_pool_size or pool_size_for("ingest", node.max_associations, 0)
    engine = make_engine(node.resolved_database_url, size, node.db_max_overflow, node.db_pool_timeout_s, name=f"{node.node_id or 'node'}:receiver", prepare=False)
    slots = SharedSlots.attach(slots_fd, node.max_associations, node.max_associations_per_host, still_open)
    fds, board_fd, place, places = shared
    listening = SharedListening({port: _inherited(fd) for port, fd in fds.items()}, AcceptBoard(board_fd, places), place, owner=False)
    listeners = start_server(settings, engine, pseudo=Pseudonymizer(load_secret(node)), writer=writer, slots=slots, shared=listening)
    _send(READY)
    threading.Thread(target=_take_updates, args=(listeners,), name="receiver-config", daemon=True).start()
    counts = _CountReporter()
    try:
        while not stop.wait(1.0):
            counts.report()
    finally:
        listeners.shutdown()
        listeners.store_handler.close()
        listening.close()
        slots.close()
        engine.dispose()
        counts.report()
    return 0


def _inherited(fd: int) -> socket.socket:
    """The listening socket the node process passed as descriptor ``fd``."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)  # as in the node process (node.sharedport.open_listening)
    return sock


def _take_updates(listeners) -> None:
    """Receiver side of :meth:`Receivers.update` (until the node closes the pipe)."""
    while True:
        try:
            new = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        policy = getattr(listeners, "access_policy", None)
        if policy is not None:
            policy.update(new)
            log.info("configuration reloaded: [[sources]] and accept_unknown_sources taken")
        _send(RELOADED)  # the node's reload waits for this (Receivers.update)


# -- counters ---------------------------------------------------------------------------------
# Prometheus counters live in each process's registry; /metrics is served by the node
# process. Each receiver sends what its counters grew by, once a second, as a JSON line
# on its stdout; the node adds it to its own counters of the same name.
def _forwarded() -> dict:
    from node import metrics

    return {"casemask_associations": metrics.ASSOCIATIONS, "casemask_instances_received": metrics.INSTANCES_RECEIVED,
            "casemask_bytes_received": metrics.BYTES_RECEIVED, "casemask_audit_write_errors": metrics.AUDIT_WRITE_ERRORS}


class _CountReporter:
    def __init__(self) -> None:
        self.sent: dict[tuple[str, tuple], float] = {}

    def report(self) -> None:
        from prometheus_client import REGISTRY

        names = _forwarded()
        grown = []
        for family in REGISTRY.collect():
            if family.name not in names:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = (family.name, tuple(sorted(sample.labels.items())))
                delta = sample.value - self.sent.get(key, 0.0)
                if delta:
                    self.sent[key] = sample.value
                    grown.append([family.name, sample.labels, delta])
        if grown:
            _send(json.dumps(grown).encode() + b"\n")


def _add_counts(grown: list) -> None:
    """Node side: add what a receiver's counters grew by."""
    names = _forwarded()
    for name, labels, delta in grown:
        counter = names[name]
        (counter.labels(**labels) if labels else counter).inc(delta)


# -- the pipe from a receiver to the node ------------------------------------------------------
# A receiver's stdout carries, one per line: READY once it listens, its counters' growth
# (a JSON list) and its log records (a JSON object {"log": [logger, level, message]}). The
# node re-emits each record through its own logger of that name, prefixed with
# "[receiver PID]": one log, formatted (and escaped, node.logfmt) by the node's handlers.
_send_lock = threading.Lock()


def _send(line: bytes) -> None:
    with _send_lock:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()


class _ForwardHandler(logging.Handler):
    """Receiver side: each log record, as a line to the node."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            _send(json.dumps({"log": [record.name, record.levelno, text]}).encode() + b"\n")
        except Exception:
            self.handleError(record)


def _read_receiver(stream, pid: int, ready: threading.Event, restarted: bool = False, on_reloaded: Callable[[int], None] | None = None) -> None:
    """Node side: read receiver ``pid``'s lines until its stdout closes;
    ``on_reloaded(pid)`` for each settings update it confirms."""
    for line in stream:
        if line == READY:
            ready.set()
            if restarted:
                log.warning("receiver process %d listening (started in place of one that died)", pid)
            continue
        if line == RELOADED:
            if on_reloaded is not None:
                on_reloaded(pid)
            continue
        try:
            item = json.loads(line)
            if isinstance(item, dict):
                name, level, text = item["log"]
                logging.getLogger(name).handle(logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": "[receiver %d] %s", "args": (pid, text)}))
            else:
                _add_counts(item)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("a line from receiver process %d could not be read (%s)", pid, type(exc).__name__)
    log.info("receiver process %d: its output closed (it stopped)", pid)


def main() -> int:
    settings, level, parent, writer, slots_fd, shared = pickle.load(sys.stdin.buffer)
    root = logging.getLogger()
    root.addHandler(_ForwardHandler())
    root.setLevel(level)
    if level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return run_receiver(settings, parent, writer, slots_fd, shared)


if __name__ == "__main__":  # run as node.receivers, not __main__: its records name their module
    from node.receivers import main as _main

    sys.exit(_main())
