"""A hostile client of the operator's HTTP server, fourth pass (docs/security.md, "Fourth
attack"): each test is an attack that worked before its fix."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time

import httpx
import pytest

from tests.conftest import node_config, wait_until
from tests.test_attack_http import _closed_by_server
from tests.httpnode import http_nodes, start_http_node  # noqa: F401  (fixture)


def _folder(tmp_path) -> list[dict]:
    return [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]


def _https_node(tmp_path, http_nodes):  # noqa: F811
    crt, key = tmp_path / "http.crt", tmp_path / "http.key"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)], capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    raw = node_config(tmp_path, _folder(tmp_path))
    raw["http"]["tls"] = {"certificate": str(crt), "private_key": str(key)}
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    return hn, ssl.create_default_context(cafile=str(crt))


def test_https_handshakes_that_never_finish_are_closed_and_counted(tmp_path, http_nodes, monkeypatch):  # noqa: F811
    """With [http] tls, asyncio gave a TLS handshake 60 s (uvicorn passes no
    ssl_handshake_timeout) and the connection cap did not see a connection before its
    handshake had finished: a client connecting and sending no ClientHello (or half of
    one) held a descriptor for a minute each, uncounted, so a few hundred a minute starved
    the admins and the node's DICOM side. Now a handshake must finish within
    HANDSHAKE_TIMEOUT_S and connections in their handshake count towards the cap."""
    from node.http import server

    monkeypatch.setattr(server, "CONNECTION_CAP", 8)
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT_S", 15.0)
    hn, ctx = _https_node(tmp_path, http_nodes)
    port = hn.node.settings.http.port
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    held[0].sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, never its end
    extra = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        wait_until(lambda: all(_closed_by_server(s) for s in extra), timeout=8, what="connections beyond the cap closed at once")
        assert not any(_closed_by_server(s) for s in held[:4])  # within the cap: still open before the deadline
        wait_until(lambda: all(_closed_by_server(s) for s in held), timeout=40, what="stalled handshakes closed at their deadline")
        with httpx.Client(base_url=hn.base.replace("http://", "https://"), verify=ctx, timeout=30) as c:
            assert c.get("/healthz").text == "ok\n"
            login = c.get("/login")
            assert login.status_code == 200 and login.headers["strict-transport-security"] == "max-age=31536000"
            assert c.get("/api/v1/status", headers={"Authorization": f"Bearer {hn.tokens['viewer']}"}).status_code == 200
    finally:
        for s in held + extra:
            s.close()


def _login(client: httpx.Client, name: str, password: str) -> int:
    token = re.search(r'name="login_token" value="([^"]+)"', client.get("/login").text).group(1)
    return client.post("/login", data={"name": name, "password": password, "login_token": token}).status_code


def test_a_stranger_cannot_lock_an_admin_out_by_name(tmp_path, http_nodes):  # noqa: F811
    """Failed logins were counted per name: anyone who could reach the login form locked
    a known admin out for login_window_s with login_attempts wrong passwords, from
    anywhere. Now they are counted per name and address (and per address): the stranger's
    address is refused, the admin logging in from elsewhere is not; a second address
    guessing the same name gets its own login_attempts."""
    from node import accounts

    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    with hn.node.sessions() as s:
        accounts.add_user(s, "admin", "admin", "correct horse battery")
        s.commit()

    def client(address: str) -> httpx.Client:
        return httpx.Client(base_url=hn.base, timeout=60, transport=httpx.HTTPTransport(local_address=address))

    with client("127.0.0.2") as stranger:
        assert [_login(stranger, "admin", f"guess-{i:06d}") for i in range(5)] == [401] * 5
        assert _login(stranger, "admin", "correct horse battery") == 429  # this address is done for the window
    with client("127.0.0.3") as other:
        assert _login(other, "admin", "guess-xxxxxx") == 401  # not refused unchecked: its own count
    with client("127.0.0.1") as admin:
        assert _login(admin, "admin", "correct horse battery") == 303


PLANTED = "DOE^JANE^Q"  # a synthetic patient's name, typed where a number or date belongs
PLANTED_ID = "PID-0042-SYN"


def test_urls_and_rejected_values_reach_neither_the_log_nor_the_answer(tmp_path, http_nodes, caplog):  # noqa: F811
    """uvicorn's access log wrote every request's path and query string (anonymous ones
    too) to the node's log at INFO, the level `casemask serve` runs at: a name in a URL
    went to the log as typed. FastAPI's 422 answers quoted the rejected input back
    ("input": "DOE^JANE^Q", or an uploaded file's internals where a password belongs).
    Now the access log names the route (its template), never the path or query, and a
    422 names the field and what is wrong with it, never the value."""
    import logging

    caplog.set_level(logging.INFO)
    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    quoted = PLANTED.replace("^", "%5E")
    answers = []
    with hn.client() as anonymous:
        answers.append(anonymous.get(f"/?patient={quoted}"))
        answers.append(anonymous.get(f"/no/such/{PLANTED_ID}"))
        answers.append(anonymous.post("/login", files={"name": (None, "admin"), "password": ("pw.txt", PLANTED_ID.encode())}))
        answers.append(anonymous.post("/login", data={"name": PLANTED_ID}))
    with hn.client("viewer") as viewer:
        answers.append(viewer.post("/api/v1/routes/explain", files={"file": (None, PLANTED)}))  # text where a file belongs
        answers.append(viewer.get(f"/api/v1/studies/{quoted}"))
        answers.append(viewer.get("/api/v1/studies", params={"limit": PLANTED, "offset": PLANTED_ID}))
        answers.append(viewer.get("/api/v1/audit", params={"since": PLANTED, "study_id": PLANTED_ID}))
    # (a login form sent as multipart is refused before it is read: test_form_bodies_are_bounded_before_they_are_read)
    assert [a.status_code for a in answers] == [303, 404, 415, 422, 422, 422, 422, 422], [a.status_code for a in answers]
    for a in answers[2:]:
        assert PLANTED not in a.text and PLANTED_ID not in a.text and "_TemporaryFileArgs" not in a.text, a.text
    for a in answers[3:]:
        assert a.json()["detail"][0]["loc"], a.text  # still says which field
    node_side = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not the test's client
    assert any('"GET /api/v1/studies/{study_id}" 422' in m for m in node_side)  # the access log is still there
    logged = "\n".join(node_side)
    assert PLANTED not in logged and quoted not in logged and PLANTED_ID not in logged


def _status_before_body(port: int, path: str, content_type: str, length: int | None, headers: str = "") -> bytes:
    """Send a POST head announcing ``length`` bytes of body (chunked when None) and none
    of it; the status line the server sends within 10 s (b"" when it waits for the body)."""
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{framing}{headers}\r\n".encode())
        try:
            return s.recv(4096).split(b"\r\n", 1)[0]
        except TimeoutError:
            return b""


def test_form_bodies_are_bounded_before_they_are_read(tmp_path, http_nodes):  # noqa: F811
    """POST /login takes no credentials, and Starlette parses a form, writing each file
    part over 1 MB to the system's temporary folder, before any route runs: an anonymous
    300 MB "password" file was read whole into /tmp (measured: 294 MB in an unlinked
    file, no limit), so anyone reaching the login page could fill the disk the node's
    spool may share. A viewer's upload to routes/explain was likewise read whole before
    its 256 MiB check. Now form bodies must declare their length, the login form at most
    LOGIN_FORM_MAX bytes and as a urlencoded form, others at most the upload cap: refused
    from the head, before a byte of body is read."""
    from node.http import app as http_app

    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    port = hn.node.settings.http.port
    multipart = "multipart/form-data; boundary=XX"
    urlencoded = "application/x-www-form-urlencoded"
    bearer = f"Authorization: Bearer {hn.tokens['viewer']}\r\n"
    assert _status_before_body(port, "/login", multipart, 300 * 2**20).startswith(b"HTTP/1.1 415")
    assert _status_before_body(port, "/login", urlencoded, 300 * 2**20).startswith(b"HTTP/1.1 413")
    assert _status_before_body(port, "/login", urlencoded, None).startswith(b"HTTP/1.1 411")
    assert _status_before_body(port, "/api/v1/routes/explain", multipart, 300 * 2**20, bearer).startswith(b"HTTP/1.1 413")
    assert _status_before_body(port, "/api/v1/routes/explain", multipart, None, bearer).startswith(b"HTTP/1.1 411")
    assert getattr(http_app, "LOGIN_FORM_MAX", 4096) >= 4096
    with hn.client() as c:  # the real login form still goes through
        assert _login(c, "nobody", "wrong password") == 401
    with hn.client("viewer") as c:
        assert c.post("/api/v1/routes/explain", files={"file": ("x.dcm", b"not dicom")}).status_code == 422


def test_bodies_held_in_memory_at_once_are_bounded(tmp_path, http_nodes, monkeypatch):  # noqa: F811
    """routes/explain and similar hold a body of up to 256 MiB in memory each, and
    nothing bounded how many at once: a viewer's token and a few connections declaring
    256 MiB each (sent, or trickled under the body's idle limit) could take the memory of
    the process that also receives DICOM. Now the bodies in flight share a budget
    (BODY_BUDGET, by their declared length; a chunked one as a whole upload): a request
    that does not fit is answered 503 from its head, small ones still pass, and the
    budget comes back when a hoarder goes away."""
    from node.http import app as http_app

    monkeypatch.setattr(http_app, "BODY_BUDGET", 3 * 2**20, raising=False)
    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    port = hn.node.settings.http.port
    bearer = f"Authorization: Bearer {hn.tokens['viewer']}\r\n"
    hoarder = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        hoarder.sendall(f"POST /api/v1/similar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/dicom\r\nContent-Length: {2 * 2**20}\r\n{bearer}\r\n".encode() + b"\0" * 1024)
        time.sleep(0.5)
        assert _status_before_body(port, "/api/v1/similar", "application/dicom", 2 * 2**20, bearer).startswith(b"HTTP/1.1 503")
        assert _status_before_body(port, "/api/v1/routes/explain", "multipart/form-data; boundary=XX", 2 * 2**20, bearer).startswith(b"HTTP/1.1 503")
        with hn.client("viewer") as c:  # a small one fits beside the hoarder
            assert c.post("/api/v1/routes/explain", files={"file": ("x.dcm", b"not dicom")}).status_code == 422
    finally:
        hoarder.close()

    def fits_again() -> bool:
        return not _status_before_body(port, "/api/v1/similar", "application/dicom", 2 * 2**20, bearer).startswith(b"HTTP/1.1 503")

    wait_until(fits_again, timeout=20, what="the hoarder's share of the budget back")


def test_an_https_certificate_that_cannot_be_loaded_stops_the_start_with_a_message(tmp_path):
    """The HTTPS context is loaded by the node now (not by uvicorn): files that are not
    PEM are a start-up error naming [http] tls, and nothing is left listening."""
    from node.startup import StartupError

    raw = node_config(tmp_path, _folder(tmp_path))
    (tmp_path / "not.crt").write_text("not a certificate\n")
    (tmp_path / "not.key").write_text("not a key\n")
    raw["http"]["tls"] = {"certificate": str(tmp_path / "not.crt"), "private_key": str(tmp_path / "not.key")}
    with pytest.raises(StartupError, match=r"\[http\] tls"):
        start_http_node(raw, tmp_path)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", raw["http"]["port"])) != 0


def test_a_page_under_another_host_name_is_refused_dns_rebinding(tmp_path, http_nodes):  # noqa: F811
    """DNS rebinding: a web page at attacker.example, whose name the attacker then points
    at 127.0.0.1, reaches a loopback dashboard from the admin's own browser (same address,
    so it also spends that address's login attempts). The server answers only the Host
    names it is reached by: 400 for another, before any route runs; with [http]
    allowed_hosts, those names."""
    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    port = hn.node.settings.http.port
    with httpx.Client(base_url=hn.base, timeout=30) as c:
        assert c.get("/healthz").text == "ok\n"  # Host: 127.0.0.1:port
        assert c.get("/healthz", headers={"Host": f"localhost:{port}"}).status_code == 200
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}"):
            r = c.get("/login", headers={"Host": host})
            assert r.status_code == 400, (host, r.status_code)
            assert c.post("/login", headers={"Host": host}, data={"name": "admin", "password": "x"}).status_code == 400
    (tmp_path / "named").mkdir()
    raw = node_config(tmp_path / "named", _folder(tmp_path / "named"))
    raw["http"]["allowed_hosts"] = ["casemask.example.org"]
    named = start_http_node(raw, tmp_path / "named")
    http_nodes.append(named)
    with httpx.Client(base_url=named.base, timeout=30) as c:
        assert c.get("/healthz", headers={"Host": "casemask.example.org"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400
        assert c.get("/healthz").status_code == 400  # 127.0.0.1 is not among the names given


def test_allowed_hosts_is_checked_and_an_open_dashboard_is_warned_about(tmp_path):
    from node import config

    raw = node_config(tmp_path, _folder(tmp_path))
    raw["http"]["allowed_hosts"] = ["https://casemask.example.org:8080"]
    with pytest.raises(config.ConfigError, match="allowed_hosts"):
        config.parse(raw)
    raw["http"]["allowed_hosts"] = []
    raw["http"]["host"] = "0.0.0.0"
    assert any("allowed_hosts" in w for w in config.parse(raw).warnings)
    raw["http"]["allowed_hosts"] = ["casemask.example.org"]
    assert not any("allowed_hosts" in w for w in config.parse(raw).warnings)
