"""A hostile client of the operator's HTTP server (API, dashboard): each test is an
attack that worked before its fix (docs/security.md, "The HTTP side")."""

from __future__ import annotations

import socket
import time

from tests.conftest import node_config, wait_until
from tests.httpnode import http_nodes, start_http_node  # noqa: F401  (fixture)


def _node(tmp_path, http_nodes):  # noqa: F811
    hn = start_http_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), tmp_path)
    http_nodes.append(hn)
    return hn


def _closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed (or reset) the connection."""
    s.settimeout(0.05)
    try:
        return s.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _half_request(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
    return s


def test_connections_that_never_finish_their_headers_are_closed(tmp_path, http_nodes, monkeypatch):  # noqa: F811
    """Slowloris: before, uvicorn kept a connection with half a request head open for
    ever (measured: 300 of them under a limit of 256 descriptors made the node refuse
    DICOM associations). Now the head must be complete within HEADER_TIMEOUT_S of the
    connection's start, however it trickles in, and a complete request is still served."""
    from node.http import server

    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 1.0)
    hn = _node(tmp_path, http_nodes)
    port = hn.node.settings.http.port
    silent = [_half_request(port) for _ in range(5)]
    trickle = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        deadline = time.monotonic() + 20
        closed_trickle = False
        while time.monotonic() < deadline and not closed_trickle:
            try:
                trickle.sendall(b"X-Pad: 1\r\n")  # a header line every 0.2 s: never a whole request
            except OSError:
                closed_trickle = True
                break
            closed_trickle = _closed_by_server(trickle)
            time.sleep(0.2)
        assert closed_trickle, "a client trickling header lines kept its connection for 20 s"
        wait_until(lambda: all(_closed_by_server(s) for s in silent), timeout=10, what="half requests closed by the server")
        with hn.client() as c:
            assert c.get("/healthz").status_code == 200
    finally:
        for s in [*silent, trickle]:
            s.close()


def test_open_connections_are_capped_and_the_server_still_answers_afterwards(tmp_path, http_nodes, monkeypatch):  # noqa: F811
    """Connections beyond the cap are closed at once (they cost the process descriptors
    it needs for DICOM, spool and database); once the hoarder's connections time out, a
    normal request is served."""
    from node.http import server

    monkeypatch.setattr(server, "CONNECTION_CAP", 8)
    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 10.0)  # the held ones must outlive the check below on a loaded machine
    hn = _node(tmp_path, http_nodes)
    port = hn.node.settings.http.port
    held = [_half_request(port) for _ in range(8)]
    extra = [_half_request(port) for _ in range(4)]
    try:
        wait_until(lambda: all(_closed_by_server(s) for s in extra), timeout=8, what="connections beyond the cap closed at once")
        assert not any(_closed_by_server(s) for s in held[:4])  # within the cap: still open before the deadline
        wait_until(lambda: all(_closed_by_server(s) for s in held), timeout=40, what="held connections closed at their deadline")
        with hn.client() as c:
            assert c.get("/healthz").status_code == 200
    finally:
        for s in held + extra:
            s.close()


def test_a_viewer_cannot_probe_the_node_s_files_through_a_configuration_check(tmp_path, http_nodes):  # noqa: F811
    """POST /api/v1/config/check was open to viewers, and checking opens the files a
    configuration names: ``burned_in_regions = "/any/path"`` told a viewer whether the
    file exists and the names of its TOML tables. The dashboard checks for admins only;
    now so does the API."""
    hn = _node(tmp_path, http_nodes)
    text = hn.config.read_text().replace("[node]", f'[node]\nburned_in_regions = "{hn.config}"', 1)
    with hn.client("viewer") as c:
        assert c.post("/api/v1/config/check", content=text.encode()).status_code == 403
    with hn.client("operator") as c:
        assert c.post("/api/v1/config/check", content=text.encode()).status_code == 403
    with hn.client("admin") as c:
        assert c.post("/api/v1/config/check", content=hn.config.read_bytes()).status_code == 200


def test_a_client_cannot_make_the_node_hold_a_huge_or_deep_configuration(tmp_path, http_nodes, caplog):  # noqa: F811
    """POST /api/v1/config/check was open to the lowest role. Before, its body was read
    whole whatever its size (a 200 MB body: the node's resident memory rose by 650 MB,
    and nothing stopped four at once), and a TOML document of arrays nested 5000 deep
    raised RecursionError: a 500 and a 3000-line traceback in the log per request. Now a
    body over 1 MiB is refused (413) by its Content-Length or while it streams, and deep
    nesting is a problem like any other (422)."""
    hn = _node(tmp_path, http_nodes)
    with hn.client("admin") as c:
        r = c.post("/api/v1/config/check", content=b"x = 1\n" + b"#" * (2 * 2**20))
        assert r.status_code == 413, r.text

        def chunks():
            yield b"x = 1\n"
            for _ in range(40):
                yield b"#" * 65536

        r = c.post("/api/v1/config/check", content=chunks())  # no Content-Length: chunked
        assert r.status_code == 413, r.text
        caplog.clear()
        r = c.post("/api/v1/config/check", content=("x = " + "[" * 5000 + "]" * 5000).encode())
        assert r.status_code == 422, r.text
        assert "nested too deep" in r.json()["detail"]
        assert not [rec for rec in caplog.records if rec.levelname == "ERROR"], "a traceback was logged"
        r = c.put("/api/v1/config", content=b"#" * (2 * 2**20))
        assert r.status_code == 413, r.text
        assert c.get("/api/v1/config").json()["text"] == hn.config.read_text()  # nothing written


def test_the_protocol_hooks_uvicorn_offers_are_still_there():
    """BoundedH11Protocol overrides uvicorn internals: fail loudly when they move."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    for name in ("connection_made", "data_received", "on_response_complete", "connection_lost", "pause_writing", "resume_writing"):
        assert callable(getattr(H11Protocol, name, None)), name
    import inspect

    assert "http" in inspect.signature(__import__("uvicorn").Config).parameters




def test_concurrent_logins_check_at_most_two_passwords_at_once(tmp_path, http_nodes, monkeypatch):  # noqa: F811
    """An argon2id check holds 64 MiB: 60 logins sent at once by a client without an
    account took the node from 0.2 to 1.8 GB resident (every one had passed the rate
    limiter, which counts failures). Now at most VERIFY_SLOTS run at once, and the rate
    limiter is asked after the wait, so once an address has failed 5 times its queued
    attempts are refused without a check (but for those already checking then)."""
    import re
    import threading

    import httpx

    from node import accounts
    from node.http import auth

    running, peak, calls, lock = [0], [0], [0], threading.Lock()
    real = accounts.authenticate

    def counted(*a, **kw):
        with lock:
            running[0] += 1
            calls[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(*a, **kw)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(accounts, "authenticate", counted)
    hn = _node(tmp_path, http_nodes)
    statuses: list[int] = []

    def attempt(i: int) -> None:
        with httpx.Client(base_url=hn.base, timeout=120) as w:
            page = w.get("/login").text
            token = re.search(r'name="login_token" value="([^"]+)"', page).group(1)
            r = w.post("/login", data={"name": f"nobody{i}", "password": "x" * 12, "login_token": token})
            statuses.append(r.status_code)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(statuses) == 12 and set(statuses) <= {401, 429, 503}, statuses
    assert peak[0] <= getattr(auth, "VERIFY_SLOTS", 2), f"{peak[0]} password checks at once"
    assert calls[0] <= 5 + getattr(auth, "VERIFY_SLOTS", 2) - 1, f"{calls[0]} passwords checked for one address past its 5 failures"


def test_what_a_rate_limited_login_typed_as_its_name_is_not_kept(tmp_path, http_nodes):  # noqa: F811
    """A failed login with an unknown name is audited as "(unknown name)" (it may be a
    password typed into the wrong box); a login refused by the rate limiter stored the
    typed text as the entry's object, shown to every viewer on the audit page."""
    import re

    import httpx

    hn = _node(tmp_path, http_nodes)
    typed = "Tr0ub4dor-typed-in-the-name-box"
    with httpx.Client(base_url=hn.base, timeout=60) as w:
        def attempt(name: str) -> int:
            token = re.search(r'name="login_token" value="([^"]+)"', w.get("/login").text).group(1)
            return w.post("/login", data={"name": name, "password": "x" * 12, "login_token": token}).status_code

        assert [attempt("nobody") for _ in range(5)] == [401] * 5
        assert attempt(typed) == 429
    with hn.client("viewer") as c:
        entries = c.get("/api/v1/audit", params={"event": "login", "limit": 50}).text
    assert "too many failed logins" in entries
    assert typed not in entries


def _answer_before_body(port: int, path: str, headers: str = "") -> bytes:
    """Send a request head announcing 100 MB of multipart body and none of it; the
    status line the server sends back within 30 s (b"" when it waits for the body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
                   f"Content-Length: 100000000\r\n{headers}\r\n").encode())
        try:
            return s.recv(4096).split(b"\r\n", 1)[0]
        except TimeoutError:
            return b""


def test_an_anonymous_upload_is_answered_before_its_body_is_read(tmp_path, http_nodes):  # noqa: F811
    """FastAPI parses a form (and spools a file over 1 MB to the system's temporary
    folder) before the route's dependencies check credentials: an anonymous 150 MB
    upload to /routes/explain was read whole, then redirected to the login page. Now a
    write request without a live token or session is answered at once, as the route
    would answer it (API: 401 with WWW-Authenticate; pages: 303 to /login), forged
    credentials included; a real token still reaches the route."""
    hn = _node(tmp_path, http_nodes)
    port = hn.node.settings.http.port
    assert _answer_before_body(port, "/api/v1/routes/explain").startswith(b"HTTP/1.1 401")
    assert _answer_before_body(port, "/api/v1/routes/explain", "Authorization: Bearer cm_forged\r\n").startswith(b"HTTP/1.1 401")
    assert _answer_before_body(port, "/routes/explain").startswith(b"HTTP/1.1 303")
    assert _answer_before_body(port, "/routes/explain", "Cookie: casemask_session=forged\r\n").startswith(b"HTTP/1.1 303")
    with hn.client("viewer") as c:
        r = c.post("/api/v1/routes/explain", files={"file": ("x.dcm", b"not dicom")})
        assert r.status_code == 422, r.text  # through to the route, which reads the file


# Who may call what (docs/security.md, third pass): every route the app serves, found by
# walking it, so that a route added later without a role check fails here.
_ANONYMOUS = {("GET", "/login"), ("POST", "/login"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/api/v1/openapi.json")}
_VIEWER_WRITES = {"/api/v1/routes/explain", "/api/v1/similar"}  # a viewer may ask; nothing is stored
_ADMIN_READS = {"/api/v1/audit/export"}


def _routes(app) -> list[tuple[str, str]]:
    from starlette.routing import Route

    from node.http import api, pages

    out = []
    for r in [*app.routes, *api.router.routes, *pages.router.routes]:  # FastAPI 0.165 keeps included routers apart
        if isinstance(r, Route) and r.methods:
            path = r.path.replace("{action}", "retry")
            for param in ("{study_id}", "{job_id}", "{output_id}"):
                path = path.replace(param, "1")
            out += [(m, path) for m in sorted(r.methods - {"HEAD"})]
    return out


def test_every_route_checks_who_asks(tmp_path, http_nodes):  # noqa: F811
    """Anonymous: nothing but the login, health and schema routes answers 2xx. With a
    viewer's token: no API write (but explain and similar) and no admin read gets past
    403. An operator's token: no admin route. Held in the third pass; kept so that a
    new route without its role check fails."""
    hn = _node(tmp_path, http_nodes)
    routes = _routes(hn.node.http.app)
    assert len(routes) > 30, "the walk found too few routes: the test would prove nothing"
    anon = hn.client(None, follow_redirects=False)
    viewer, operator = hn.client("viewer", follow_redirects=False), hn.client("operator", follow_redirects=False)
    leaks = []
    for method, path in routes:
        if (method, path) in _ANONYMOUS:
            continue
        r = anon.request(method, path, content=b"x", headers={"Content-Type": "application/octet-stream"})
        if r.status_code < 300 or (r.status_code == 303 and path.startswith("/api/")) or (r.status_code == 303 and "/login" not in r.headers.get("location", "")):
            leaks.append(f"anonymous {method} {path}: {r.status_code}")
        if not path.startswith("/api/"):
            continue
        if (method != "GET" and path not in _VIEWER_WRITES) or path in _ADMIN_READS:
            r = viewer.request(method, path, content=b"x", headers={"Content-Type": "application/octet-stream"})
            if r.status_code != 403:
                leaks.append(f"viewer {method} {path}: {r.status_code}")
    for method, path in (("PUT", "/api/v1/config"), ("POST", "/api/v1/config/check"), ("POST", "/api/v1/config/reload"), ("POST", "/api/v1/mapping/export"), ("GET", "/api/v1/audit/export")):
        r = operator.request(method, path, content=b"x", headers={"Content-Type": "application/toml"})
        if r.status_code != 403:
            leaks.append(f"operator {method} {path}: {r.status_code}")
    assert leaks == []
