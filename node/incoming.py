"""Where a C-STORE's data set goes while it arrives: a file under ``spool/.incoming``,
written fragment by fragment, capped in size, and not written at all when the disk is
below its free-space floor.

pynetdicom receives a C-STORE data set into memory by default; with its documented
option ``_config.STORE_RECV_CHUNKED_DATASET`` it writes each P-DATA fragment to a
temporary file instead and gives the handler ``event.dataset_path``, so an object is
never held in memory whole (a P-DATA PDU at most, see :mod:`node.admission`). It makes
that file with ``tempfile.NamedTemporaryFile`` in the system's temporary folder, with
the default mode, without a size limit, and leaves it behind when an association is
aborted mid-object. :func:`install` replaces the name ``NamedTemporaryFile`` inside
``pynetdicom.dimse_messages`` (the one place that creates the file) with a factory that,
on the reader threads of this node's associations only, returns an :class:`IncomingFile`
(and ``create_file_meta`` / ``write_file_meta_info`` there with node.wire's encoder of
the File Meta Information, five times cheaper than a pydicom FileMetaDataset):

- in ``spool/.incoming`` (the spool's file system, so the handler can link it into
  place instead of copying it), mode 0600;
- counting bytes: beyond ``max_object_mb`` it stops writing and drops what it wrote
  (the handler answers 0xA700);
- refusing to start below ``min_free_disk_mb`` of free space (0xA700 as well);
- keeping the first 64 KiB in memory, where the handler reads the row's attributes;
- hashing every byte as it is written (SHA-256, :attr:`IncomingFile.digest`): the row
  carries it, and every reader checks the file against it (the file gets its final name
  before its data is fsynced, docs/ingest.md "Parallel durability");
- deleted when its association closes before a handler took it.

This reaches below pynetdicom's public API; ``tests/test_edge.py`` fails loudly if the
name disappears or the option stops routing data sets through it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path

from pynetdicom import _config
from pynetdicom import dimse_messages

from node.spool import new_digest

log = logging.getLogger(__name__)

HEAD_BYTES = 64 * 1024
_CHECK_FREE_EVERY = 64 * 1024 * 1024  # bytes written between free-space checks
_BUFFER = 256 * 1024


def free_bytes(path: Path) -> int:
    """Bytes available to this (unprivileged) process on the file system of ``path``."""
    return shutil.disk_usage(path).free


class IncomingFile:
    """One C-STORE data set being received (what pynetdicom writes and then reads back
    through ``name``). Writes never raise: a failure, the size cap or the disk floor
    sets :attr:`refused` and the rest of the data is only counted."""

    def __init__(self, owner: IncomingFiles) -> None:
        self.owner = owner
        self.path = owner.directory / f".{uuid.uuid4().hex}.tmp"
        self.name = str(self.path)
        self.file = self  # pynetdicom calls ``.file.flush()`` after every fragment
        self.size = 0
        self.head = bytearray()
        self._hash = new_digest()
        self.refused = ""  # "too large" | "disk below its floor" | "cannot write (ENOSPC)"
        self._fp = None
        self._next_check = _CHECK_FREE_EVERY
        if owner.below_floor():
            self.refused = "disk below its floor"
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._fp = os.fdopen(fd, "wb", buffering=_BUFFER)
        except OSError as exc:
            self.refused = f"cannot write ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})"

    def write(self, data: bytes) -> int:
        n = len(data)
        self.size += n
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        if self.refused:
            return n
        if self.size > self.owner.max_bytes:
            self._drop("too large")
            return n
        if self.size >= self._next_check:
            self._next_check += _CHECK_FREE_EVERY
            if self.owner.below_floor():
                self._drop("disk below its floor")
                return n
        try:
            self._fp.write(data)  # type: ignore[union-attr]
            self._hash.update(data)
        except OSError as exc:
            self._drop(f"cannot write ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})")
        return n

    def flush(self) -> None:
        """Nothing: the handler makes the file durable once, with :meth:`sync`."""

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of every byte written to the file."""
        return self._hash.hexdigest()

    def hand_to_kernel(self) -> None:
        """Flush Python's buffer: from now on every process that opens the file by any
        of its names reads all of its bytes (not yet durable: :meth:`sync`).

        Raises:
            OSError: the disk is full or failing.
        """
        if self._fp is None:
            raise OSError(errno.EIO, "incoming file is not open")
        self._fp.flush()

    def sync(self) -> None:
        """Flush and fsync the data; the file stays open.

        Raises:
            OSError: the disk is full or failing.
        """
        if self._fp is None:
            raise OSError(errno.EIO, "incoming file is not open")
        self._fp.flush()
        os.fsync(self._fp.fileno())

    def close(self) -> None:
        if self._fp is not None:
            fp, self._fp = self._fp, None
            try:
                fp.close()
            except OSError:
                pass  # a failed flush of data that is being dropped anyway

    def discard(self) -> None:
        """Close and delete (what was written, if anything)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def _drop(self, why: str) -> None:
        self.refused = why
        self.discard()


class IncomingFiles:
    """The incoming files of one node's listeners: which threads write them, and what
    each association left behind."""

    def __init__(self, directory: Path, max_bytes: int, min_free_bytes: int) -> None:
        from node.spool import make_dirs

        self.directory = directory
        make_dirs(directory)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._open: dict[threading.Thread, list[IncomingFile]] = {}

    def below_floor(self) -> bool:
        return self.min_free_bytes > 0 and free_bytes(self.directory) < self.min_free_bytes

    def watch(self, reader: threading.Thread) -> None:
        """Data sets that ``reader`` (an association's DUL thread) receives come here."""
        _owners[reader] = self

    def open(self) -> IncomingFile:
        f = IncomingFile(self)
        with self._lock:
            self._open.setdefault(threading.current_thread(), []).append(f)
        return f

    def take(self, path: Path | str) -> IncomingFile | None:
        """The handler claims the file at ``path``; None when it is not one of ours (or
        its association closed and it was deleted)."""
        name = str(path)
        with self._lock:
            for files in self._open.values():
                for f in files:
                    if f.name == name:
                        files.remove(f)
                        return f
        return None

    def release(self, reader: threading.Thread | None) -> int:
        """The association of ``reader`` closed: delete what no handler took; returns how
        many (data sets cut off mid-transfer, never acknowledged)."""
        if reader is None:
            return 0
        _owners.pop(reader, None)
        with self._lock:
            left = self._open.pop(reader, [])
        for f in left:
            f.discard()
        return len(left)


_owners: weakref.WeakKeyDictionary[threading.Thread, IncomingFiles] = weakref.WeakKeyDictionary()
_original = getattr(dimse_messages, "NamedTemporaryFile", None)
_original_create_meta = getattr(dimse_messages, "create_file_meta", None)
_original_write_meta = getattr(dimse_messages, "write_file_meta_info", None)


def _named_temporary_file(*args, **kwargs):
    owner = _owners.get(threading.current_thread())
    if owner is None:  # another pynetdicom SCP in this process: pynetdicom's own behaviour
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    return owner.open()


class _Meta(tuple):
    """(SOP class, SOP instance, transfer syntax) of a file meta still to be encoded."""


def _create_file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax, **kwargs):
    if _owners.get(threading.current_thread()) is None:
        return _original_create_meta(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax, **kwargs)  # type: ignore[misc]
    return _Meta((str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax)))


def _write_file_meta_info(fp, file_meta, *args, **kwargs):
    """The File Meta Information, encoded by node.wire (pynetdicom builds and encodes a
    pydicom FileMetaDataset for every C-STORE: a fifth of the handler's CPU time)."""
    if not isinstance(file_meta, _Meta):
        return _original_write_meta(fp, file_meta, *args, **kwargs)  # type: ignore[misc]
    from node.wire import part10_header

    fp.write(part10_header(*file_meta)[132:])  # pynetdicom wrote the preamble and 'DICM'


def install() -> None:
    """Route C-STORE data sets of watched associations into :class:`IncomingFile`.

    Raises:
        RuntimeError: pynetdicom no longer creates its chunked file through
            ``dimse_messages.NamedTemporaryFile`` (a new pynetdicom: adapt this module).
    """
    if None in (_original, _original_create_meta, _original_write_meta) or not hasattr(_config, "STORE_RECV_CHUNKED_DATASET"):
        raise RuntimeError("pynetdicom no longer offers chunked C-STORE reception through dimse_messages.NamedTemporaryFile / create_file_meta / write_file_meta_info: node.incoming needs adapting")
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]
