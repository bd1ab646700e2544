"""Atomic, durable files, and where each kind of file lives.

Writing: to a temporary name, fsync, rename (or link, when an existing file must not be
replaced), fsync the directory. A reader never sees a half-written file under its final
name, and once a function here returns, the file survives a crash or power loss.

Naming: no value that arrived from outside (UIDs, route names, anything read from a
header) ever becomes a path component. Every name below is a SHA-256 digest of the
value (32 hex digits, 128 bits), so a UID such as ``1.2.3/../../etc`` or a value that
passes the UI grammar but is long, or equal to another on a case-insensitive file
system, names one file inside its root and nothing else:

    spool/<study>[:2]/<study>/<sop>.dcm                      received originals
    outbox/<route>/<study>/<sop>.dcm                         de-identified outputs
    <folder destination>/<study>/<series>/<sop>.dcm          what a folder receives
    <casemask deid --out>/<sop>.dcm                          standalone de-identification

where each ``<x>`` is :func:`digest` of that UID (``<route>`` of the route's name).

Modes: files under the data folder are created 0600 and folders 0700 (owner only:
they hold PHI); folder destinations keep 0640 files (they hold de-identified data for
another reader).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

from pydicom import Dataset

FILE_MODE = 0o600
DIR_MODE = 0o700
SHARED_FILE_MODE = 0o640


def digest(value: str) -> str:
    """The name a value gets in a path: 32 hex digits of its SHA-256."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def spool_path(root: Path, study_uid: str, sop_uid: str) -> Path:
    """Where a received object lives: one folder per study, one file per SOP Instance
    UID, both named by digest."""
    h = digest(study_uid)
    return root / h[:2] / h / f"{digest(sop_uid)}.dcm"


def outbox_path(root: Path, route: str, study_uid: str, sop_uid: str) -> Path:
    """Where a route's de-identified output waits for delivery."""
    return root / digest(route) / digest(study_uid) / f"{digest(sop_uid)}.dcm"


def folder_path(root: Path, ds: Dataset) -> Path:
    """Where a folder destination stores a (de-identified) object: study, series and
    instance named by the digests of their UIDs."""
    study = str(ds.get("StudyInstanceUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    return root / digest(study) / digest(series) / f"{digest(_sop_uid(ds))}.dcm"


def output_name(ds: Dataset) -> str:
    """The file name ``casemask deid`` gives a de-identified dataset in ``--out``."""
    return f"{digest(_sop_uid(ds))}.dcm"


def _sop_uid(ds: Dataset) -> str:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    meta = getattr(ds, "file_meta", None)
    if not uid and meta is not None:
        uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` (its entries become durable).

    Raises:
        OSError: the directory is gone or the disk fails.
    """
    _fsync_dir(path)


def new_digest():
    """The hash a spool file's bytes are checked with (SHA-256, hashlib): 22 us for a
    38 KB object with the CPU's SHA instructions."""
    return hashlib.sha256()


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of the file at ``path``, read in 1 MiB steps.

    Raises:
        OSError: the file cannot be read (FileNotFoundError when it is gone).
    """
    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def matches_digest(path: Path, expected: str | None) -> bool:
    """Whether the file at ``path`` holds the bytes a row's ``digest`` names (True
    when the row has none: written before digests, its file fsynced before it was
    linked).

    Raises:
        OSError: the file cannot be read (FileNotFoundError when it is gone).
    """
    return expected is None or file_digest(path) == expected


def make_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """Create ``path`` and its missing parents with ``mode``, each new entry made durable
    (its parent fsynced)."""
    if path.is_dir():
        return
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def write_atomic(path: Path, chunks: bytes | list[bytes], mode: int = FILE_MODE, dir_mode: int = DIR_MODE) -> int:
    """Write ``chunks`` to ``path`` durably (created with ``mode``); returns the number of
    bytes written.

    Raises:
        OSError: the disk is full, read-only or the directory cannot be made. The final
            path is left untouched and the temporary file removed.
    """
    make_dirs(path.parent, dir_mode)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return size


def place(tmp: Path, path: Path, fsync_folder: bool = True) -> bool:
    """Give the durable (already fsynced) file ``tmp`` the name ``path`` unless a file
    is there already; returns True when it did (the new entry is then durable), False
    when ``path`` existed and was left alone. ``tmp`` keeps its own name either way.
    ``fsync_folder=False``: the caller fsyncs the folder itself (:func:`fsync_dir`),
    and ``tmp`` need not be durable yet (node.scp's parallel durability).

    Raises:
        OSError: the directory cannot be made or the link fails (disk full, read-only).
    """
    make_dirs(path.parent)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    if fsync_folder:
        _fsync_dir(path.parent)
    return True


def replace(tmp: Path, path: Path) -> None:
    """Move the durable file ``tmp`` to ``path``, replacing what is there, durably.

    Raises:
        OSError: as :func:`place`.
    """
    make_dirs(path.parent)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Delete a file if it exists (a missing file is not an error)."""
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def remove_if_same(path: Path, ours: Path) -> bool:
    """Delete ``path`` only while it is the same file as ``ours`` (a hard link the
    caller made): a writer elsewhere (a node sharing the data folder) may have replaced
    it with its own since. Returns whether it was deleted. Between the check and the
    unlink another node could still replace it: nodes on one host never race here (they
    serialize C-STOREs of one SOP Instance UID); see docs/ingest.md."""
    try:
        if not os.path.samefile(path, ours):
            return False
    except FileNotFoundError:
        return False
    remove(path)
    return True


def clean_stale_temporaries(root: Path, older_than_s: float = 0.0) -> int:
    """Remove temporary files left by a crash mid-write (``.*.tmp``, and whatever a
    C-STORE left in ``spool/.incoming``) not written to for ``older_than_s`` seconds;
    returns how many. Nodes sharing a data folder pass their grace time: a younger
    temporary may be another process's write in progress (a C-STORE still arriving)."""
    n = 0
    if root.exists():
        cutoff = time.time() - older_than_s
        for p in root.rglob(".*.tmp"):
            try:
                if older_than_s and p.stat().st_mtime > cutoff:
                    continue
                p.unlink()
            except FileNotFoundError:  # finished (renamed) or removed meanwhile
                continue
            n += 1
    return n
