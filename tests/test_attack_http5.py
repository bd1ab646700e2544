"""A hostile HTTP client, fifth pass (docs/security.md, "Eighth attack"): the dashboard
refresh's header that lowers a request's access log line to DEBUG."""

from __future__ import annotations

import logging

from tests.conftest import node_config, wait_until
from tests.httpnode import http_nodes, start_http_node  # noqa: F401  (fixture)

REFRESH = {"X-Casemask-Refresh": "1"}


def test_the_refresh_header_quiets_only_the_pages_the_dashboard_refreshes(tmp_path, http_nodes, caplog):  # noqa: F811
    """X-Casemask-Refresh moved the access log line of any GET answered 200 to DEBUG: a
    client holding an admin token sent it with the audit trail's XML export, the API's
    study and audit lists and the configuration page, and the log at INFO showed none of
    them. Only the pages the dashboard refreshes (data-refresh) are quieted now; every
    other read stays at INFO, header or not."""
    caplog.set_level(logging.DEBUG, logger="node.http.app")
    hn = start_http_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), tmp_path)
    http_nodes.append(hn)
    with hn.client("admin") as admin:
        loud = {route: admin.get(path, headers=REFRESH).status_code for route, path in (
            ("/api/v1/audit/export", "/api/v1/audit/export"), ("/api/v1/audit", "/api/v1/audit"),
            ("/api/v1/studies", "/api/v1/studies"), ("/api/v1/config", "/api/v1/config"))}
    from node import accounts
    from node.db import Role
    from tests.test_attack_http2 import _login

    with hn.node.sessions() as session:
        accounts.add_user(session, "operator1", Role.ADMIN, "correct horse battery")
        session.commit()
    with hn.client() as browser:
        assert _login(browser, "operator1", "correct horse battery") in (200, 303)
        quiet = browser.get("/destinations", headers=REFRESH).status_code
    assert set(loud.values()) == {200} and quiet == 200, (loud, quiet)

    def level(route: str) -> int:
        # the access line is written once the response has gone (the middleware's finally):
        # the client may read the answer before the server thread logs it
        def lines() -> list[int]:
            return [r.levelno for r in caplog.records if r.name == "node.http.app" and f'"GET {route}" 200' in r.getMessage()]

        wait_until(lambda: lines(), timeout=10, what=f"the access log line of {route}")
        assert len(lines()) == 1, (route, lines())
        return lines()[0]

    assert {route: logging.getLevelName(level(route)) for route in loud} == dict.fromkeys(loud, "INFO")
    assert level("/destinations") == logging.DEBUG  # the dashboard's own refresh stays quiet
