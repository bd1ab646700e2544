"""A hostile or merely busy client of the operator's HTTP server, sixth pass
(docs/security.md, "Sixth attack"): what the log says about the HTTP side."""

from __future__ import annotations

import logging

import httpx

from tests.conftest import wait_until
from tests.httpnode import http_nodes  # noqa: F401  (fixture)
from tests.test_attack_http2 import _https_node


def test_the_log_names_https_and_keeps_probes_out_of_the_access_lines(tmp_path, http_nodes, caplog):  # noqa: F811
    """``[http] tls``: uvicorn's start line said ``Uvicorn running on http://...`` (it
    serves plain TCP, the node's protocol adds TLS); only the node's own line, with
    ``https://``, is left. 30 successful /healthz, /readyz and /metrics (a load balancer
    and Prometheus every few seconds) wrote 30 INFO access lines that buried the
    requests an operator looks for: now at DEBUG, while a refused probe (401) and an
    API request keep their INFO line."""
    caplog.set_level(logging.INFO)
    hn, ctx = _https_node(tmp_path, http_nodes)
    started = caplog.text
    assert "Uvicorn running on" not in started
    assert f"HTTP API and dashboard on https://127.0.0.1:{hn.node.settings.http.port}" in started
    with httpx.Client(base_url=hn.base.replace("http://", "https://"), verify=ctx, timeout=30) as c:
        viewer = {"Authorization": f"Bearer {hn.tokens['viewer']}"}
        for _ in range(10):
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            assert c.get("/metrics", headers=viewer).status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/api/v1/status", headers=viewer).status_code == 200
    def access() -> list[str]:  # the access line is written once the answer has gone: it may come after the client has it
        return [r.getMessage() for r in caplog.records if r.name == "node.http.app" and r.levelno >= logging.INFO]

    wait_until(lambda: any("/api/v1/status" in a for a in access()), timeout=10, what="the last request's access log line")
    assert [a.split(" - ", 1)[1] for a in access()] == ['"GET /metrics" 401', '"GET /api/v1/status" 200'], access()


def test_a_stranger_sharing_the_admins_address_cannot_lock_the_admin_out(tmp_path, http_nodes):  # noqa: F811
    """Behind one NAT or proxy (all here from 127.0.0.2): a stranger's 5 wrong passwords
    for ``admin`` lock the address out (429, for browsers without a device cookie), but
    the admin's browser, which logged in as ``admin`` before and holds its device cookie,
    gets in: failures are counted per device cookie for it. Before, it got 429 for
    ``login_window_s``. A forged device cookie, or the admin's cookie offered for
    another name, counts as none; guessing with the admin's cookie is bounded too."""
    from node import accounts
    from tests.conftest import node_config
    from tests.httpnode import start_http_node
    from tests.test_attack_http2 import _folder, _login

    hn = start_http_node(node_config(tmp_path, _folder(tmp_path)), tmp_path)
    http_nodes.append(hn)
    with hn.node.sessions() as s:
        accounts.add_user(s, "admin", "admin", "correct horse battery")
        accounts.add_user(s, "viewer1", "viewer", "another long passphrase")
        s.commit()

    def client(**kw) -> httpx.Client:
        return httpx.Client(base_url=hn.base, timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.2"), **kw)

    with client() as admin:
        assert _login(admin, "admin", "correct horse battery") == 303
        device = next((c.value for c in admin.cookies.jar if c.name == "casemask_device"), "")
        with client() as stranger:
            assert [_login(stranger, "admin", f"guess-{i:06d}") for i in range(5)] == [401] * 5
            assert _login(stranger, "admin", "correct horse battery") == 429  # the address is locked for browsers without a cookie
        with client(cookies={"casemask_device": "AAAA." + "0" * 32}) as forger:
            assert _login(forger, "admin", "correct horse battery") == 429
        with client(cookies={"casemask_device": device}) as other_name:
            assert _login(other_name, "viewer1", "another long passphrase") == 429  # the cookie is admin's only
        assert _login(admin, "admin", "correct horse battery") == 303  # the admin's browser gets in
    with client(cookies={"casemask_device": device}) as thief:
        assert [_login(thief, "admin", f"guess-{i:06d}") for i in range(5)] == [401] * 5
        assert _login(thief, "admin", "correct horse battery") == 429  # a stolen cookie guesses no faster
