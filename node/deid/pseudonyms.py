"""Stable keyed pseudonyms: HMAC-SHA256 with the node's secret.

The same input maps to the same output in every object, across restarts, and across
nodes that share the secret file; another secret gives unrelated outputs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path


def load_or_create_secret(path: Path) -> bytes:
    """Read the node's secret, creating a random 32-byte one (mode 0600) on first start.

    Raises:
        PermissionError: the file exists but is readable by group or others.
    """
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path} has mode {mode:o}: the pseudonym secret must be 0600 (chmod 600 {path})")
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def patient_key(patient_id: str, issuer: str = "") -> str:
    """Who a patient is: the Patient ID together with its issuer (IssuerOfPatientID, or
    the qualifiers' Universal Entity ID), since an ID is unique only at its issuer. Without
    an issuer the key is the ID alone, as before issuers were taken into account, so the
    pseudonyms of such patients do not change."""
    patient_id, issuer = patient_id.strip(), issuer.strip()
    return f"{patient_id}\x1f{issuer}" if issuer else patient_id


def split_patient_key(key: str) -> tuple[str, str]:
    """(issuer, patient ID) of a patient key."""
    patient_id, _, issuer = key.partition("\x1f")
    return issuer, patient_id


class Pseudonymizer:
    """Derives UIDs, patient IDs, names and date offsets from a secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the pseudonym secret must be at least 16 bytes")
        self._secret = secret

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        """A 2.25 UID (PS3.5 B.2): a 128-bit integer derived from the old UID."""
        return "2.25." + str(int.from_bytes(self._digest("uid", old.strip())[:16], "big"))

    def patient_id(self, key: str) -> str:
        """The pseudonymous Patient ID for a patient key (see :func:`patient_key`)."""
        return "CM" + base64.b32encode(self._digest("pid", key.strip())[:10]).decode().rstrip("=")

    def patient_name(self, key: str) -> str:
        """The pseudonymous Patient's Name for a patient key."""
        return "ANON^" + self.patient_id(key)[2:10]

    def date_offset_days(self, patient_key: str, lo: int, hi: int) -> int:
        """A per-patient shift in [lo, hi] days (never 0 unless the range is [0, 0])."""
        span = hi - lo + 1
        n = int.from_bytes(self._digest("date", patient_key.strip())[:8], "big")
        off = lo + n % span
        if off == 0 and span > 1:
            off = lo if lo != 0 else hi
        return off

    def log_id(self, value: str) -> str:
        """A short keyed hash naming an original identifier in logs and reasons
        (``h:`` and 12 hex digits): stable for one secret, meaningless without it, so an
        original UID (which may embed dates or device serials) never reaches a log."""
        return "h:" + self._digest("log", value.strip()).hex()[:12]

    def seed(self, value: str) -> int:
        """A 63-bit seed for per-object randomness that must repeat on re-processing."""
        return int.from_bytes(self._digest("seed", value)[:8], "big") >> 1
