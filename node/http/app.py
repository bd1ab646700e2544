"""The FastAPI application: API, dashboard, /metrics, /healthz, /readyz, static files."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.security import HTTPAuthorizationCredentials
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from node import accounts
from node.accounts import LoginLimiter
from node.config import HttpSettings
from node.http import api, pages
from node.http.auth import SESSION_COOKIE, AuthContext, LoginRequired, bearer, load_device_key, token_principal
from node.metrics import exposition, node_registry
from node.service import Service, ServiceError, version

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)

# The dashboard loads nothing from elsewhere and runs no inline script or style.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        response = await call_next(request)
        h = response.headers
        h.setdefault("Content-Security-Policy", _CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "no-referrer")
        if request.url.scheme == "https":  # [http] tls: browsers keep to HTTPS for this host (RFC 6797)
            h.setdefault("Strict-Transport-Security", "max-age=31536000")
        if not request.url.path.startswith("/static/"):
            h.setdefault("Cache-Control", "no-store")
        return response


_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CredentialsBeforeBody(BaseHTTPMiddleware):
    """A request that may carry a body (a form, a file, a configuration) is answered
    before its body is read when it holds no valid token (API) or session (pages), as the
    route would answer it: FastAPI reads a form, and spools a file over 1 MB to the
    system's temporary folder, before the route's dependencies check who is asking (an
    anonymous 150 MB upload to /routes/explain was read whole, then redirected to the
    login page). Roles and CSRF tokens are still checked by the routes."""

    async def dispatch(self, request: Request, call_next):
        path = request.url.path
        if request.method in _WRITES and path != "/login" and not await run_in_threadpool(_signed_in, request):
            if path.startswith("/api/"):
                return JSONResponse({"detail": "a valid bearer token is required (casemask token create)"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        return await call_next(request)


LOGIN_FORM_MAX = 16 * 2**10  # bytes of a login form (a name of 64 characters, a password, two tokens)
_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
# Bytes of request bodies over SMALL_BODY in flight at once, by their declared length (a
# chunked body counts as a whole upload): explain and similar hold theirs in memory.
BODY_BUDGET = 512 * 2**20
SMALL_BODY = 2**20


class _Budget:
    """Bytes reserved by request bodies in flight (for ``BodyLimits``; thread-safe, one per process)."""

    def __init__(self) -> None:
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > BODY_BUDGET:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


_budget = _Budget()


class BodyLimits:
    """Request bodies are bounded from the request head, before anything reads them.

    Forms: Starlette parses a form (writing each file part over 1 MB to the system's
    temporary folder) before any route or dependency runs, with no limit on a file's
    size, and POST /login takes no credentials: an anonymous 300 MB "password" file
    filled /tmp. A form must declare its Content-Length (411 otherwise); the login form
    is urlencoded (415) and at most ``LOGIN_FORM_MAX`` bytes, any other form at most one
    upload (``api.MAX_UPLOAD``) and 1 MiB of fields (413).

    All bodies over ``SMALL_BODY``: explain and similar hold theirs (up to 256 MiB) in
    memory, and a viewer's token with a few connections could take the memory of the
    process that also receives DICOM; such bodies share ``BODY_BUDGET`` by their declared
    length (a chunked one as a whole upload), and one that does not fit is answered 503
    with Retry-After. Raw bodies are also bounded where they are read
    (``api._bounded_body``). A pure ASGI middleware."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _WRITES:
            await self.app(scope, receive, send)
            return
        refusal = _form_refusal(scope)
        share = 0 if refusal is not None else _declared_share(scope)
        if refusal is None and share and not _budget.reserve(share):
            refusal = 503, "the node is reading other large uploads: try again in a minute"
        if refusal is not None:
            status, detail = refusal
            await JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": "60"} if status == 503 else None)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if share:
                _budget.release(share)


def _declared_share(scope) -> int:
    """What a body takes of the budget: its declared length when over SMALL_BODY, a
    whole upload when chunked, else 0."""
    headers = dict(scope.get("headers") or ())
    declared = headers.get(b"content-length", b"").decode("latin-1").strip()
    if declared.isdigit():
        return int(declared) if int(declared) > SMALL_BODY else 0
    return api.MAX_UPLOAD if b"transfer-encoding" in headers else 0


def _form_refusal(scope) -> tuple[int, str] | None:
    """(status, message) for a write request whose form body may not be read, or None."""
    headers = dict(scope.get("headers") or ())
    ctype = headers.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
    login = scope.get("path") == "/login"
    if login and ctype != "application/x-www-form-urlencoded":
        return 415, "the login form is sent as application/x-www-form-urlencoded"
    if ctype not in _FORMS:
        return None
    declared = headers.get(b"content-length", b"").decode("latin-1").strip()
    if not declared.isdigit():
        return 411, "a form must be sent with its Content-Length"
    cap = LOGIN_FORM_MAX if login else api.MAX_UPLOAD + 2**20
    if int(declared) > cap:
        return 413, f"the form is larger than {cap // 2**10} KiB" if cap < 2**20 else f"the form is larger than {cap // 2**20} MiB"
    return None


def _signed_in(request: Request) -> bool:
    """Whether the request holds a live bearer token (API) or dashboard session (pages)."""
    ctx = request.app.state.auth
    if request.url.path.startswith("/api/"):
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token_principal(ctx, value.strip()) is not None
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if not cookie:
        return False
    with ctx.service.sessions() as session:
        return accounts.session_principal(session, cookie) is not None


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


# Routes a load balancer, an orchestrator or Prometheus asks every few seconds: their
# successful answers are logged at DEBUG (AccessLog), else a line every few seconds per
# prober buried the requests an operator looks for.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
# Sent by the dashboard's own refresh (static/app.js re-fetches an open page every 3 to 10
# s): a GET it makes that is answered 200 is logged at DEBUG as well, else one open tab
# wrote 360 to 1200 lines an hour at INFO. A client can send it too, but only to lower
# the level of its own successful reads; anything refused (303, 401, 403) stays INFO,
# and what the audit trail records does not depend on it.
REFRESH_HEADER = b"x-casemask-refresh"
# The pages the dashboard refreshes (their templates have data-refresh): only their
# answers are quieted by REFRESH_HEADER. Any GET was: a client sending the header read
# the audit trail's export, a study's API rows or de-identified previews with a token
# and left only DEBUG lines in the access log an operator reads at INFO.
REFRESHED_PAGES = frozenset({"/", "/studies", "/studies/{study_id}", "/quarantine", "/destinations"})


class AccessLog:
    """One log line per request (INFO): client address, method, the *route* that answered
    (its template, ``/api/v1/studies/{study_id}``) and the status, never the path or query
    string as sent. uvicorn's access log (off in ``node.http.server``) wrote those as
    typed, anonymous requests included, at the level ``casemask serve`` runs at: a name
    in a URL went to the log. Successful answers of :data:`PROBES` and of the dashboard's
    refresh (:data:`REFRESH_HEADER`) are logged at DEBUG; a probe refused or failing (401,
    503) at INFO. A pure ASGI middleware (no body
    buffering)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            method = scope.get("method", "")
            route = route_name(scope)
            quiet = (route in PROBES and 200 <= status < 400) or (method == "GET" and status == 200 and route in REFRESHED_PAGES and _refresh(scope))
            level = logging.DEBUG if quiet else logging.INFO
            log.log(level, '%s - "%s %s" %d', client[0], method if method in _METHODS else "(other)", route, status or 500)


def _refresh(scope) -> bool:
    """Whether the request says it is the dashboard's periodic refresh (REFRESH_HEADER)."""
    return any(name == REFRESH_HEADER for name, _ in scope.get("headers") or ())


def route_name(scope) -> str:
    """How a request is named in the log: the template of the route that took it, or
    ``/static/...`` or ``(no route)``; nothing a client chose (path values, query)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if str(scope.get("path", "")).startswith("/static/"):
        return "/static/..."
    return "(no route)"


def validation_problems(exc: RequestValidationError) -> list[dict]:
    """FastAPI's 422 details without the rejected values: each names the field (``loc``)
    and what is wrong (``type``, ``msg``); its default answer also quoted the ``input``
    (a name typed where an ID belongs, an uploaded file's internals where a password
    belongs)."""
    return [{"type": e.get("type", ""), "loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", "")} for e in exc.errors()]


def create_app(service: Service, http: HttpSettings | None = None) -> FastAPI:
    """The application for one node's service layer."""
    http = http or HttpSettings()
    app = FastAPI(
        title="casemask", version=version(), openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None,
        description="Operator API of a casemask de-identification node. Authenticate with `Authorization: Bearer <token>` "
                    "(`casemask token create --name N --role viewer|operator|admin`). Viewers read; operators retry and "
                    "discard; admins change the configuration and export the pseudonym mapping.",
    )
    app.state.auth = AuthContext(service, http, LoginLimiter(http.login_attempts, http.login_window_s), device_key=load_device_key(service.settings.node.data_dir))
    registry = node_registry(service.sessions, service.settings.node.data_dir)
    app.add_middleware(CredentialsBeforeBody)
    app.add_middleware(BodyLimits)  # outside the credentials check: POST /login has none
    app.add_middleware(SecurityHeaders)  # added last but one: it also heads the answers above
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=http.trusted_hosts(), www_redirect=False)  # DNS rebinding: 400
    app.add_middleware(AccessLog)  # the outermost: logs every answer, those of the middlewares too

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc), "problems": exc.problems}, status_code=exc.status)
        return pages.error_page(request, exc.status, str(exc), exc.problems)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = validation_problems(exc)
        if request.url.path.startswith("/api/") or request.url.path == "/login":
            return JSONResponse({"detail": problems}, status_code=422)
        return pages.error_page(request, 422, "the request is not valid", [f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems])

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith(("/api/", "/metrics")) or exc.status_code == 401:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return pages.error_page(request, exc.status_code, str(exc.detail), [])

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        """Alive: the process answers."""
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> PlainTextResponse:
        """Ready: database, disk, models and destinations (no details without a token)."""
        ok = service.ready()
        return PlainTextResponse("ready\n" if ok else "not ready\n", status_code=200 if ok else 503)

    def metrics_access(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if http.public_metrics:
            return
        if not creds or token_principal(app.state.auth, creds.credentials) is None:
            raise HTTPException(401, "a valid bearer token is required for /metrics (or [http] public_metrics = true)", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_access)])
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
