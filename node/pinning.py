"""Digests of the pynetdicom functions the node replaces or reaches into.

``node.dimsefast``, ``node.pdatafast`` and ``node.reactor`` each take over a piece of
pynetdicom's work, written against a given version of its source. Each keeps the digest
of the source it was written against (``EXPECTED_SOURCES``), and the node falls back to
pynetdicom's own path, logged, when an installed pynetdicom's source differs.
"""

from __future__ import annotations

import hashlib
import inspect


def source_digest(fn) -> str:
    """The first 16 hex digits of the SHA-256 of ``fn``'s source text (``inspect.getsource``).

    Raises:
        OSError, TypeError: as ``inspect.getsource`` (no source available)."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
