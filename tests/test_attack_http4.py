"""A hostile client of the operator's HTTP server, seventh pass (docs/security.md,
"Seventh attack")."""

from __future__ import annotations

import logging
import os

import httpx

from tests.conftest import node_config
from tests.httpnode import http_nodes, start_http_node  # noqa: F401  (fixture)
from tests.test_attack_http2 import _folder, _login


def _client(hn, **kw) -> httpx.Client:
    return httpx.Client(base_url=hn.base, timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.2"), **kw)


def _restart(hn):
    """The same node (configuration, data folder) started again."""
    from node.app import Node
    from node.config import load
    from tests.httpnode import HttpNode

    node = Node(load(hn.config), pixel_step=None)
    node.start(http=True)
    return HttpNode(node, hn.base, hn.config, hn.tokens)


def _device(c: httpx.Client) -> str:
    return next((k.value for k in c.cookies.jar if k.name == "casemask_device"), "")


def test_an_admins_device_cookie_outlives_a_restart(tmp_path, http_nodes):  # noqa: F811
    """The admin logs in from a shared address (127.0.0.2) and gets a device cookie; the
    node restarts (an upgrade, a crash); a stranger on that address then spends the
    address's login attempts on ``admin``. The key that signs device cookies was made
    at each start, so after the restart the admin's browser counted as unknown and got
    429 for ``login_window_s``. Now the key is kept in ``data_dir/device.key`` (0600):
    the admin's browser gets in."""
    from node import accounts

    raw = node_config(tmp_path, _folder(tmp_path))
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    with hn.node.sessions() as s:
        accounts.add_user(s, "admin", "admin", "correct horse battery")
        s.commit()
    with _client(hn) as admin:
        assert _login(admin, "admin", "correct horse battery") == 303
        device = _device(admin)
    assert device
    key = hn.node.settings.node.data_dir / "device.key"
    assert key.stat().st_mode & 0o777 == 0o600
    hn.node.stop()
    http_nodes.remove(hn)
    hn = _restart(hn)
    http_nodes.append(hn)
    with _client(hn) as stranger:
        assert [_login(stranger, "admin", f"guess-{i:06d}") for i in range(5)] == [401] * 5
        assert _login(stranger, "admin", "correct horse battery") == 429
    with _client(hn, cookies={"casemask_device": device}) as admin:
        assert _login(admin, "admin", "correct horse battery") == 303


def test_a_device_key_others_can_read_is_not_used(tmp_path, http_nodes, caplog):  # noqa: F811
    """Whoever reads the device-cookie key can make device cookies, each counted on its
    own: guessing a password unbounded from one address. A key file readable by group or
    others is not used (an ERROR says what to fix) and cookies made with it are refused."""
    import hashlib
    import hmac

    from node import accounts

    caplog.set_level(logging.ERROR)
    raw = node_config(tmp_path, _folder(tmp_path))
    data_dir = tmp_path / "var"
    data_dir.mkdir(parents=True, exist_ok=True)
    leaked = bytes(range(32))
    (data_dir / "device.key").write_text(leaked.hex() + "\n")
    os.chmod(data_dir / "device.key", 0o644)
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    assert "device.key not used (mode 644" in caplog.text
    with hn.node.sessions() as s:
        accounts.add_user(s, "admin", "admin", "correct horse battery")
        s.commit()
    nonce = "n" * 22
    forged = f"{nonce}." + hmac.new(leaked, f"admin\x00{nonce}".encode(), hashlib.sha256).hexdigest()[:32]
    with _client(hn) as stranger:
        assert [_login(stranger, "admin", f"guess-{i:06d}") for i in range(5)] == [401] * 5
    with _client(hn, cookies={"casemask_device": forged}) as forger:
        assert _login(forger, "admin", "guess-more") == 429


def test_ids_out_of_the_databases_range_are_refused_not_a_server_error(tmp_path, http_nodes, caplog):  # noqa: F811
    """A viewer (or an operator) asking for a study, an output, a job or an audit page
    with a number past a database integer's range (2**63, 10**30), or a Unicode digit
    ('²', which str.isdigit() accepts and int() refuses): SQLite's driver raised
    OverflowError, answered 500 (or the connection reset), and the log had an "Exception
    in ASGI application" traceback of 100 to 270 lines per request. Now 404 or 422, and no
    traceback."""
    from node import accounts

    caplog.set_level(logging.INFO)
    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    with hn.node.sessions() as s:
        accounts.add_user(s, "admin", "admin", "correct horse battery")
        s.commit()
    answers = {}
    with hn.client("operator") as c:
        for big in (str(2**63), "9" * 30):
            for path in (f"/api/v1/studies/{big}", f"/api/v1/outputs/{big}/preview.png", f"/api/v1/audit?study_id={big}", f"/api/v1/studies?offset={big}"):
                answers[path] = c.get(path).status_code
            for path in (f"/api/v1/jobs/{big}/retry", f"/api/v1/jobs/{big}/discard"):
                answers[path] = c.post(path).status_code
    with httpx.Client(base_url=hn.base, timeout=30) as b:
        assert _login(b, "admin", "correct horse battery") == 303
        for big in (str(2**63), "9" * 30):
            for path in (f"/studies/{big}", f"/previews/{big}.png", f"/audit?study_id={big}", f"/studies?page={big}"):
                answers[path] = b.get(path).status_code
        answers["/audit?study_id=²"] = b.get("/audit", params={"study_id": "²"}).status_code
    assert all(400 <= code < 500 or (code == 200 and path.startswith("/audit")) for path, code in answers.items()), answers
    assert "Exception in ASGI application" not in caplog.text
    assert "Traceback" not in caplog.text


def test_ipv6_clients_are_limited_per_64_not_per_address():
    """The login limiter counted failures per client address: an IPv6 client, which
    chooses any of the 2**64 addresses of its /64, guessed ``login_attempts`` passwords
    per address without end. Addresses of one /64 now share one count (and an
    IPv4-mapped address is its IPv4 address); IPv4 addresses stay apart."""
    from node.accounts import LoginLimiter
    from node.http.auth import limiter_keys

    limiter = LoginLimiter(attempts=5, window_s=300)
    for k in range(5):
        limiter.failed(*limiter_keys("admin", f"2001:db8:1:2::{k + 1:x}"))
    assert limiter.retry_after(*limiter_keys("admin", "2001:db8:1:2:ffff:ffff:ffff:ffff")) > 0
    assert limiter.retry_after(*limiter_keys("someone", "2001:db8:1:2::abcd")) > 0  # the address key too
    assert limiter.retry_after(*limiter_keys("admin", "2001:db8:1:3::1")) == 0  # another /64
    assert limiter_keys("admin", "::ffff:10.1.2.3") == limiter_keys("admin", "10.1.2.3")
    assert limiter_keys("admin", "10.1.2.3") != limiter_keys("admin", "10.1.2.4")


def test_a_dicomweb_urls_password_never_reaches_a_delivery_reason(tmp_path):
    """A dicomweb destination written ``https://user:password@host/...`` (the
    configuration takes it over https): when the archive cannot be reached, the
    delivery's reason, which viewers read on the deliveries page and the API and which
    the log repeats, quoted the url whole, password included. Now with the password
    hidden, as ``node.health`` already does."""
    import socket

    from pydicom.uid import ExplicitVRLittleEndian

    from node.config import Destination
    from node.scu import DicomWebSender, Work
    from tests.test_attack import _ct

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ds = _ct()
    ds.file_meta = __import__("pydicom").dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "o.dcm", enforce_file_format=True)
    dest = Destination.model_validate({"name": "w", "kind": "dicomweb", "url": f"https://archivist:S3cretPass@127.0.0.1:{port}/dicom-web"})
    reasons = []
    DicomWebSender(dest).send([Work(1, tmp_path / "o.dcm", str(ds.SOPClassUID), ExplicitVRLittleEndian)], lambda w, o: reasons.append(o.reason))
    assert reasons and all("S3cretPass" not in r for r in reasons), reasons
    assert "127.0.0.1" in reasons[0]


def test_a_client_that_stops_reading_its_answers_is_closed(tmp_path, http_nodes, monkeypatch):  # noqa: F811
    """Anonymous connections (receive buffer 1 KiB) that pipeline 50 requests for the
    dashboard's style sheet (83 KB) and never read: no deadline ran while an answer was
    being written, so each was held for good (measured: 10 of 10 open after 25 s; with
    the API schema, 256 of 260 after 40 s, every place of the connection cap, and
    /healthz refused). Now a connection whose answer waits ``SEND_STALL_S`` (here 2 s)
    for the client to read is closed."""
    import socket
    import time

    from node.http import server
    from tests.test_attack_ingest import _sockets_to

    monkeypatch.setattr(server, "SEND_STALL_S", 2.0)
    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    port = hn.node.settings.http.port
    hold = []
    try:
        for _ in range(10):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /static/vendor/pico/pico.min.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 50)
            hold.append(s)
        time.sleep(1.0)
        assert _sockets_to(port, os.getpid()) >= 10  # held while the answers are being written
        deadline = time.monotonic() + 20
        while _sockets_to(port, os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _sockets_to(port, os.getpid()) == 0
        with httpx.Client(base_url=hn.base, timeout=10) as c:
            assert c.get("/healthz").status_code == 200
    finally:
        for s in hold:
            s.close()
