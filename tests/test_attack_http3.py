"""A hostile or merely busy client of the operator's HTTP server, sixth pass
(docs/security.md, "Sixth attack"): what the log says about the HTTP side."""

from __future__ import annotations

import logging

import httpx

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
    access = [r.getMessage() for r in caplog.records if r.name == "node.http.app" and r.levelno >= logging.INFO]
    assert [a.split(" - ", 1)[1] for a in access] == ['"GET /metrics" 401', '"GET /api/v1/status" 200'], access
