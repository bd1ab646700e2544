"""Authentication and roles for the HTTP server.

The API takes ``Authorization: Bearer <token>`` (tokens from ``casemask token create``);
the dashboard a session cookie (HttpOnly, SameSite=Strict, Secure over TLS) set by the
login form, and every form it posts carries the session's CSRF token. No token or
cookie: 401 (the dashboard redirects to its login page); a role too low: 403.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path
from collections.abc import Callable

from typing import Annotated

from fastapi import Depends, HTTPException, Path as PathParam, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from node import accounts, audit
from node.accounts import LoginLimiter, Principal
from node.config import HttpSettings
from node.db import Role
from node.service import Service

SESSION_COOKIE = "casemask_session"
LOGIN_COOKIE = "casemask_login"  # double-submit token of the login form (login CSRF)
DEVICE_COOKIE = "casemask_device"  # this browser logged in as a name before (device_keys)
DEVICE_DAYS = 30

# Row ids and offsets a client may name: a database integer (SQLite's and PostgreSQL's
# bigint). A larger number made SQLite's driver raise OverflowError inside a route: a 500
# (or a reset connection) and a traceback of some 200 lines in the log, per request.
MAX_ROW_ID = 2**63 - 1
RowId = Annotated[int, PathParam(ge=0, le=MAX_ROW_ID)]
RowIdQuery = Annotated[int | None, Query(ge=0, le=MAX_ROW_ID)]


def row_id(text: str) -> int | None:
    """A row id typed into a form field (ASCII digits, in range), else None."""
    return int(text) if text.isascii() and text.isdigit() and int(text) <= MAX_ROW_ID else None


bearer = HTTPBearer(auto_error=False, description="a token from `casemask token create`")

# Password checks at once. Each argon2id verification holds 64 MiB (argon2-cffi's
# default memory cost) and a CPU for about 0.1 s: 60 logins sent at once, before any had
# failed (the rate limiter counts failures), took the node from 0.2 to 1.8 GB resident.
VERIFY_SLOTS = 2
VERIFY_WAIT_S = 10.0  # a login waits this long for a slot, then is told to try again
_verifying = threading.BoundedSemaphore(VERIFY_SLOTS)
BUSY = "The node is busy checking other logins. Try again in a few seconds."


DEVICE_KEY_FILE = "device.key"  # in data_dir: signs device cookies (load_device_key)
log = logging.getLogger(__name__)


@dataclasses.dataclass
class AuthContext:
    service: Service
    http: HttpSettings
    limiter: LoginLimiter
    # signs device cookies: load_device_key (data_dir/device.key), or made for this run
    device_key: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @property
    def secure_cookies(self) -> bool:
        return self.http.tls is not None


def context(request: Request) -> AuthContext:
    return request.app.state.auth


def client_host(request: Request) -> str:
    return request.client.host if request.client else ""


def token_principal(ctx: AuthContext, value: str) -> Principal | None:
    with ctx.service.sessions() as session:
        return accounts.principal_for_token(session, value)


def api_role(role: Role) -> Callable[..., Principal]:
    """A dependency: the bearer token's principal, with at least ``role``."""

    def dependency(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        p = token_principal(context(request), creds.credentials) if creds and creds.scheme.lower() == "bearer" else None
        if p is None:
            raise HTTPException(401, "a valid bearer token is required (casemask token create)", headers={"WWW-Authenticate": "Bearer"})
        if not p.may(role):
            raise HTTPException(403, f"this needs the {role.value} role; the token has {p.role.value}")
        return p

    return dependency


# -- dashboard sessions ---------------------------------------------------------------------
class LoginRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to /login."""


@dataclasses.dataclass(frozen=True)
class UiUser:
    principal: Principal
    csrf: str
    cookie: str


def ui_user(request: Request) -> UiUser:
    """The logged-in dashboard user, or LoginRequired."""
    ctx = context(request)
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if not cookie:
        raise LoginRequired()
    with ctx.service.sessions() as session:
        found = accounts.session_principal(session, cookie)
    if found is None:
        raise LoginRequired()
    return UiUser(found[0], found[1], cookie)


def ui_role(role: Role) -> Callable[..., UiUser]:
    def dependency(user: UiUser = Depends(ui_user)) -> UiUser:
        if not user.principal.may(role):
            raise HTTPException(403, f"this needs the {role.value} role; you are {user.principal.role.value}")
        return user

    return dependency


def check_csrf(user: UiUser, token: str) -> None:
    if not token or not accounts.same_secret(token, user.csrf):
        raise HTTPException(403, "the form is out of date (CSRF check failed): reload the page and try again")


def login(ctx: AuthContext, name: str, password: str, host: str, device: str = "") -> tuple[str, str] | str:
    """Check a login; returns (cookie, csrf) or the message to show. Rate-limited per
    name and address, and per address (``limiter_keys``), or, from a browser holding a
    device cookie for ``name`` (``device``, :func:`device_keys`), per that cookie; every
    attempt is audited (an unknown name as such). At most ``VERIFY_SLOTS`` passwords are
    checked at once; a login that finds none free within ``VERIFY_WAIT_S`` gets ``BUSY``."""
    keys = device_keys(ctx, name, device) or limiter_keys(name, host)
    sessions = ctx.service.sessions
    if not _verifying.acquire(timeout=VERIFY_WAIT_S):
        return BUSY
    try:
        wait = ctx.limiter.retry_after(*keys)  # after the wait for a slot: failures meanwhile count
        if wait > 0:
            known = _known(ctx, name)  # an unknown "name" may be a password typed in the wrong box: never stored
            audit.record_now(sessions, "login", actor=name if known else "(unknown name)", actor_kind="user", host=host, outcome=audit.MINOR_FAILURE,
                             object_kind="user", object_ref=name[:64] if known else "", detail={"reason": "too many failed logins: refused without checking"})
            return f"Too many failed logins. Try again in {int(wait) + 1} seconds."
        with sessions() as session:
            return _check_password(ctx, session, name, password, host, keys)
    finally:
        _verifying.release()


def limiter_keys(name: str, host: str) -> tuple[str, str]:
    """The LoginLimiter keys of one attempt: the name *from this address*, and the address.

    Failures were counted per name alone, so anyone who could reach the login form locked
    a known admin out for ``login_window_s`` with ``login_attempts`` wrong passwords. Per
    name and address, a stranger locks out only their own address; guessing one name from
    many addresses is still bounded per address, slowed by argon2id and by VERIFY_SLOTS
    checks at once for the whole node, and every failure is audited and counted in
    ``casemask_login_failures_total``."""
    where = client_network(host)
    return f"name:{name.lower()}@{where}", f"addr:{where}"


def client_network(host: str) -> str:
    """What the login limiter counts as one address (:func:`node.admission.network_of`):
    an IPv4 address, or the /64 of an IPv6 one. Counted per address, an IPv6 client,
    which picks any of its /64's 2**64 addresses, guessed ``login_attempts`` passwords
    per address without end."""
    from node.admission import network_of

    return network_of(host)


def load_device_key(data_dir: Path) -> bytes:
    """The key that signs device cookies, kept in ``data_dir/device.key`` (32 random
    bytes as hex, mode 0600, made on first start; nodes sharing a data folder share it).

    It was made anew at each start, so after a restart (an upgrade, a crash) every
    admin's browser counted as unknown again, and a stranger on a shared address could
    lock the admin out until the admin's next successful login. Kept, a device cookie
    lasts its 30 days across restarts; deleting the file and restarting withdraws every
    device cookie at once. Anyone who reads the key can make device cookies, each with
    its own count of failed logins (guessing unbounded per address): a file readable by
    group or others, or one that does not hold a key, is not used. The node then signs
    with a key made for this run alone (the old behaviour) and logs an ERROR saying what
    to fix; it never stops the node."""
    path = data_dir / DEVICE_KEY_FILE
    try:
        return _read_device_key(path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.error("%s not used (%s): device cookies last until the next restart; fix it, or delete it and casemask makes a new one", path, exc)
        return secrets.token_bytes(32)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{DEVICE_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # whole or not at all; another node's key, made meanwhile, wins
        except FileExistsError:
            return _read_device_key(path)
        finally:
            tmp.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        log.error("cannot keep the device-cookie key in %s (%s): device cookies last until the next restart", path, exc)
    return key


def _read_device_key(path: Path) -> bytes:
    """Raises FileNotFoundError, PermissionError (readable by others), ValueError (no key)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"mode {mode:o}, must be 0600: chmod 600 {path}")
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 16:
        raise ValueError("it holds no key of 32 hex digits or more")
    return key


def new_device_cookie(ctx: AuthContext, name: str) -> str:
    """The device cookie a browser gets when it logs in as ``name``: a random nonce and
    its HMAC-SHA256 (with ``ctx.device_key``) bound to the name."""
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{_device_mac(ctx, name, nonce)}"


def _device_mac(ctx: AuthContext, name: str, nonce: str) -> str:
    return hmac.new(ctx.device_key, f"{name.lower()}\x00{nonce}".encode(), hashlib.sha256).hexdigest()[:32]


def device_keys(ctx: AuthContext, name: str, cookie: str) -> tuple[str] | tuple[()]:
    """The LoginLimiter key of a login from a browser that logged in as ``name`` before
    (its device cookie, made by :func:`new_device_cookie`, is valid for that name), else ().

    Failures counted per address let anyone sharing an admin's address (a NAT, a proxy)
    lock that address out, the admin included. A browser that has logged in as the name
    before is counted on its own instead (OWASP's "device cookies"): a stranger on the
    same address locks out only browsers without one, and guessing with a stolen cookie
    is bounded per cookie. A forged cookie, or one made for another name, is ignored."""
    nonce, _, mac = cookie.partition(".")
    if nonce and mac and hmac.compare_digest(mac, _device_mac(ctx, name, nonce)):
        return (f"device:{nonce}",)
    return ()


def _check_password(ctx: AuthContext, session, name: str, password: str, host: str, keys: tuple[str, ...]) -> tuple[str, str] | str:
    """``login`` once a verification slot is held: (cookie, csrf) or the message."""
    p = accounts.authenticate(session, name, password)
    if p is None:
        known = accounts.user_exists(session, name)
        audit.record(session, "login", actor=name if known else "(unknown name)", actor_kind="user", host=host, outcome=audit.MINOR_FAILURE,
                     object_kind="user", object_ref=name[:64] if known else "", detail={"reason": "wrong name or password"})
        session.commit()
        ctx.limiter.failed(*keys)
        from node.metrics import LOGIN_FAILURES

        LOGIN_FAILURES.inc()
        return "Wrong name or password."
    cookie, csrf = accounts.open_session(session, p.name, ctx.http.session_hours)
    audit.record(session, "login", actor=p.name, actor_kind="user", host=host, object_kind="user", object_ref=p.name, detail={"role": p.role.value})
    session.commit()
    ctx.limiter.succeeded(keys[0])
    return cookie, csrf


def _known(ctx: AuthContext, name: str) -> bool:
    with ctx.service.sessions() as session:
        return accounts.user_exists(session, name)


def logout(ctx: AuthContext, user: UiUser, host: str) -> None:
    with ctx.service.sessions() as session:
        accounts.close_session(session, user.cookie)
        audit.record(session, "logout", actor=user.principal.name, actor_kind="user", host=host, object_kind="user", object_ref=user.principal.name)
        session.commit()


def new_login_token() -> str:
    return secrets.token_urlsafe(24)
