"""Association slots shared by the node's processes, so that ``max_associations`` and
``max_associations_per_host`` hold for the node as a whole with ``[node] receivers``.

With receivers (node.receivers) the kernel hands each connection to one of N processes;
each counted only its own associations, so the node admitted N times its limits. Here
the limits are counted in one table that every process of the node maps:

- the table is an anonymous memory file (``memfd_create``) that the node process makes
  before it starts its receivers and hands to each as an inherited descriptor: nothing
  on disk, nothing left after the node;
- slot ``i`` (``max_associations`` of them) holds the process id of its holder and a
  digest of the peer's address (the per-host count, never the address itself);
- a process that takes slot ``i`` also takes a POSIX record lock on byte ``1 + i`` of
  that file, and holds it while the association lasts. The kernel drops a process's
  record locks when it dies, however it dies, so a slot whose byte another process can
  lock is a dead process's slot, taken back by the next count: a SIGKILLed receiver
  leaks nothing;
- byte 0 is the table's mutex (a blocking record lock), taken with a thread lock first
  (record locks belong to the process, not the thread);
- this process's own slots are counted from its live association objects (the
  predicate ``still_open``), never from a counter a missed event could leave wrong, as
  node.admission does.

Record locks have one trap: closing *any* descriptor of the file drops all of the
process's locks on it. Each process therefore opens the table once (:meth:`attach`) and
closes it only when it stops listening (:meth:`close`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

_SLOT = struct.Struct("<i16s")  # holder's process id (0: free), digest of the peer's address
_SLOT_SIZE = 32  # bytes per slot in the table (a record, padded)


def _host_key(host: str) -> bytes:
    return hashlib.blake2b(host.encode(), digest_size=16).digest()


class SharedSlots:
    """The node-wide association table (see the module docstring).

    ``still_open(holder)``: whether an association this process holds a slot for is
    still open (a holder that is gone or closed frees its slot at the next count)."""

    def __init__(self, fd: int, max_total: int, max_per_host: int, still_open: Callable[[object], bool]) -> None:
        self.fd = fd
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.still_open = still_open
        self._map = mmap.mmap(fd, max_total * _SLOT_SIZE)
        self._thread_lock = threading.Lock()
        self._mine: dict[int, weakref.ref] = {}  # slot -> the association holding it
        self._pid = os.getpid()

    @classmethod
    def create(cls, max_total: int, max_per_host: int, still_open: Callable[[object], bool]) -> SharedSlots:
        """A new, empty table of ``max_total`` slots (in the node process, before its
        receivers start; pass :attr:`fd` to them).

        Raises:
            OSError: no memory file could be made.
        """
        fd = os.memfd_create("casemask-associations")
        try:
            os.ftruncate(fd, max_total * _SLOT_SIZE)
            return cls(fd, max_total, max_per_host, still_open)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, max_total: int, max_per_host: int, still_open: Callable[[object], bool]) -> SharedSlots:
        """The table made by the node process, from the descriptor this process inherited."""
        return cls(fd, max_total, max_per_host, still_open)

    def take(self, holder: object, host: str) -> str:
        """Take a slot for ``holder`` (an association from ``host``); "" when taken, else
        why not (a limit reached: the caller rejects the association)."""
        key = _host_key(host)
        with self._thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
            try:
                used = from_host = 0
                free = -1
                for i in range(self.max_total):
                    pid, slot_key = self._read(i)
                    if pid and not self._held(i, pid):
                        self._write(i, 0, b"")
                        pid = 0
                    if not pid:
                        free = i if free < 0 else free
                        continue
                    used += 1
                    from_host += slot_key == key
                if used >= self.max_total:
                    return f"local limit exceeded: {used} associations open in the node (max_associations = {self.max_total})"
                if from_host >= self.max_per_host:
                    return f"local limit exceeded: {from_host} associations open in the node from {host} (max_associations_per_host = {self.max_per_host})"
                ref = weakref.ref(holder)
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1 + free)
                self._write(free, self._pid, key)
                self._mine[free] = ref
                return ""
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def give_back(self, holder: object) -> None:
        """``holder``'s association closed: free its slot (if it has one)."""
        with self._thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
            try:
                for i, ref in list(self._mine.items()):
                    if ref() is holder:
                        self._free_mine(i)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def in_use(self) -> int:
        """Slots held now, in the whole node (dead processes' slots not counted)."""
        with self._thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
            try:
                return sum(1 for i in range(self.max_total) if (pid := self._read(i)[0]) and self._held(i, pid))
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def close(self) -> None:
        """Stop using the table (this process's slots are freed with its locks)."""
        with self._thread_lock:
            self._mine.clear()
            self._map.close()
            os.close(self.fd)

    # -- with the mutex held ---------------------------------------------------------------
    def _read(self, i: int) -> tuple[int, bytes]:
        return _SLOT.unpack_from(self._map, i * _SLOT_SIZE)

    def _write(self, i: int, pid: int, key: bytes) -> None:
        _SLOT.pack_into(self._map, i * _SLOT_SIZE, pid, key)

    def _held(self, i: int, pid: int) -> bool:
        """Whether slot ``i`` (holder ``pid``) is still held; frees this process's slot
        of an association that closed."""
        if pid == self._pid:
            ref = self._mine.get(i)
            holder = ref() if ref is not None else None
            if holder is not None and self.still_open(holder):
                return True
            self._free_mine(i)
            return False
        try:  # another process's slot: its byte is locked while that process lives
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1 + i)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return True
            raise
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 1 + i)
        log.info("association slot %d of process %d taken back (that process is gone)", i, pid)
        return False

    def _free_mine(self, i: int) -> None:
        self._mine.pop(i, None)
        self._write(i, 0, b"")
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 1 + i)
