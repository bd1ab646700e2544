"""Atomic, durable files: write to a temporary name, fsync, rename, fsync the directory.

A reader never sees a half-written file under its final name, and once
:func:`write_atomic` returns, the file survives a crash or power loss.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: bytes | list[bytes]) -> int:
    """Write ``chunks`` to ``path`` durably; returns the number of bytes written.

    Raises:
        OSError: the disk is full, read-only or the directory cannot be made. The final
            path is left untouched and the temporary file removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
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


def spool_path(root: Path, study_uid: str, sop_uid: str) -> Path:
    """Where a received object lives: one folder per study (hashed, so no UID in paths
    needs escaping and folder names reveal nothing), one file per SOP Instance UID."""
    h = hashlib.sha256(study_uid.encode()).hexdigest()[:24]
    return root / h[:2] / h / f"{sop_uid}.dcm"


def clean_stale_temporaries(root: Path) -> int:
    """Remove temporary files left by a crash mid-write; returns how many."""
    n = 0
    if root.exists():
        for p in root.rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n
