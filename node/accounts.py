"""Who may use the operator's HTTP server: users, bearer tokens, dashboard sessions.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106); bearer tokens and
session cookies are 256-bit random values of which only the SHA-256 is stored, so a copy
of the database lets nobody in. Failed logins are counted per name from a client address and per client
address by :class:`LoginLimiter` (in memory: a restart forgets them, argon2 still makes
each guess slow).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.db import ApiToken, Role, UiSession, User, utcnow

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
TOKEN_PREFIX = "cm_"
_hasher = PasswordHasher()
# Verified against when the name is unknown, so that a wrong name costs as long as a
# wrong password (no user enumeration by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))

RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class AccountError(ValueError):
    """A name, role or password that cannot be used; the message says what to give."""


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is asking: a logged-in user or a token, with its role."""

    name: str
    role: Role
    kind: str  # user | token | cli

    def may(self, needed: Role) -> bool:
        return RANK[self.role] >= RANK[needed]

    @property
    def label(self) -> str:
        """How audit entries name it: the user name, ``token:NAME`` or ``cli:NAME``
        (the operating-system account that ran a command)."""
        return self.name if self.kind == "user" else f"{self.kind}:{self.name}"


def parse_role(text: str | Role) -> Role:
    try:
        return Role(str(text).lower())
    except ValueError:
        raise AccountError(f"role {text!r}: choose one of {', '.join(r.value for r in Role)}") from None


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise AccountError(f"name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")


def digest(secret_value: str) -> str:
    """SHA-256 (hex) of a token or session cookie: what the database keeps."""
    return hashlib.sha256(secret_value.encode()).hexdigest()


# -- users -----------------------------------------------------------------------------------
def add_user(session: Session, name: str, role: Role | str, password: str, replace: bool = False) -> User:
    """Create a user (or, with ``replace``, set an existing one's role and password).

    Raises:
        AccountError: bad name or role, a password shorter than ``MIN_PASSWORD``, or the
            user exists and ``replace`` is false.
    """
    _check_name(name)
    role = parse_role(role)
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
    user = session.scalar(select(User).where(User.name == name))
    if user is not None and not replace:
        raise AccountError(f"user {name!r} exists (use --replace to set a new password and role)")
    if user is None:
        user = User(name=name, role=role, password_hash=_hasher.hash(password))
        session.add(user)
    else:
        user.role, user.password_hash, user.disabled = role, _hasher.hash(password), False
        session.execute(delete(UiSession).where(UiSession.user_id == user.id))  # log out everywhere
    session.flush()
    return user


def disable_user(session: Session, name: str) -> User:
    """Lock a user out: refuse their logins and end their dashboard sessions at once.
    ``add_user(..., replace=True)`` lets them in again with a new password.

    Raises:
        AccountError: no such user.
    """
    user = session.scalar(select(User).where(User.name == name)) if _NAME_RE.match(name) else None
    if user is None:
        raise AccountError(f"no user {name!r} (casemask user list)")
    user.disabled = True
    session.execute(delete(UiSession).where(UiSession.user_id == user.id))
    session.flush()
    return user


def authenticate(session: Session, name: str, password: str) -> Principal | None:
    """The user's principal when ``password`` is theirs; None otherwise (same cost)."""
    user = session.scalar(select(User).where(User.name == name)) if _NAME_RE.match(name) else None
    try:
        _hasher.verify(user.password_hash if user is not None else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return Principal(user.name, user.role, "user")


def user_exists(session: Session, name: str) -> bool:
    return bool(_NAME_RE.match(name)) and session.scalar(select(User.id).where(User.name == name)) is not None


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


# -- tokens ----------------------------------------------------------------------------------
def create_token(session: Session, name: str, role: Role | str) -> str:
    """A new bearer token (``cm_`` + 43 characters); returned once, only its hash stored.

    Raises:
        AccountError: bad name or role, or a token of that name exists (revoke it first).
    """
    _check_name(name)
    role = parse_role(role)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise AccountError(f"a token named {name!r} exists (casemask token revoke {name}, then create it again)")
    value = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=role, token_hash=digest(value)))
    session.flush()
    return value


def revoke_token(session: Session, name: str) -> bool:
    tok = session.scalar(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)))
    if tok is None:
        return False
    tok.revoked_at = utcnow()
    return True


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


def principal_for_token(session: Session, value: str) -> Principal | None:
    if not value.startswith(TOKEN_PREFIX) or len(value) > 128:
        return None
    tok = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest(value), ApiToken.revoked_at.is_(None)))
    return Principal(tok.name, tok.role, "token") if tok is not None else None


# -- dashboard sessions ----------------------------------------------------------------------
def open_session(session: Session, user_name: str, hours: float) -> tuple[str, str]:
    """A new dashboard session for a user: (cookie value, CSRF token)."""
    user = session.scalar(select(User).where(User.name == user_name))
    if user is None:
        raise AccountError(f"no user {user_name!r}")
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    session.execute(delete(UiSession).where(UiSession.expires_at < now))
    session.add(UiSession(token_hash=digest(cookie), user_id=user.id, csrf=csrf, created_at=now, expires_at=now + dt.timedelta(hours=hours)))
    session.flush()
    return cookie, csrf


def session_principal(session: Session, cookie: str) -> tuple[Principal, str] | None:
    """(principal, CSRF token) of a live dashboard session, or None."""
    if not cookie or len(cookie) > 128:
        return None
    row = session.scalar(select(UiSession).where(UiSession.token_hash == digest(cookie), UiSession.expires_at > utcnow()))
    if row is None or row.user.disabled:
        return None
    return Principal(row.user.name, row.user.role, "user"), row.csrf


def close_session(session: Session, cookie: str) -> None:
    session.execute(delete(UiSession).where(UiSession.token_hash == digest(cookie)))


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison (CSRF tokens)."""
    return hmac.compare_digest(a.encode(), b.encode())


class LoginLimiter:
    """At most ``attempts`` failed logins per key within ``window_s`` seconds.

    The HTTP server's keys are ``name:<user name>@<client address>`` and
    ``addr:<client address>`` (``node.http.auth.limiter_keys``: a name alone would let
    anyone lock its owner out), so that no address can guess quickly. ``clock`` is for
    tests.
    """

    def __init__(self, attempts: int, window_s: float, clock=time.monotonic) -> None:
        self.attempts, self.window_s, self.clock = attempts, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> float:
        """Seconds until another attempt is allowed for all ``keys`` (0: now)."""
        now = self.clock()
        with self._lock:
            waits = [q[0] + self.window_s - now for k in keys if len(q := self._recent(k, now)) >= self.attempts]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)
            if len(self._failures) > 10_000:  # bounded memory under a spray of names
                for k in [k for k, q in self._failures.items() if not q]:
                    del self._failures[k]

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
