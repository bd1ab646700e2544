"""A DICOMweb destination reached with an account that may store but not search (the
usual upload account of a research archive): its QIDO-RS search answers 403. The probe
counted that as unreachable, so the dashboard said *unreachable* and /readyz answered
503 while every STOW-RS went through. Against a real Orthanc (DICOMweb plugin) whose
HTTP filter refuses the searches, or everything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from node.config import Destination
from node.health import probe
from tests.conftest import ORTHANC, STORESCU, Orthanc, dcmtk_env, make_study, needs_dcmtk, needs_dicomweb, node_config, wait_until
from tests.httpnode import http_nodes, start_http_node  # noqa: F401 (fixture)

pytestmark = [pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install -y orthanc)"), needs_dicomweb]

# Orthanc's Lua hook for every HTTP request: false answers 403 Forbidden.
_FILTER = """function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if string.find(uri, '^/dicom%%-web/') and (%s) then
    return false
  end
  return true
end
"""


def _orthanc(tmp_path: Path, refuse: str) -> Orthanc:
    """Orthanc with DICOMweb, refusing with 403 the /dicom-web requests for which the
    Lua condition ``refuse`` (on ``method``) holds."""
    script = tmp_path / f"filter-{len(refuse)}.lua"
    script.write_text(_FILTER % refuse)
    return Orthanc(tmp_path / f"orthanc-{len(refuse)}", dicomweb=True, extra={"LuaScripts": [str(script)]})


@needs_dcmtk
def test_a_store_only_account_is_reachable_with_a_note_and_the_node_ready(tmp_path, http_nodes):
    """QIDO-RS 403, STOW-RS allowed: reachable, the detail says this account may not
    search; /readyz 200; a study sent to the node arrives at the archive by STOW-RS."""
    archive = _orthanc(tmp_path, "method == 'GET'")
    try:
        url = archive.base_url + "/dicom-web"
        h = probe(Destination(name="web", kind="dicomweb", url=url), "CASEMASK", timeout_s=10)
        assert h.reachable and "QIDO-RS answered HTTP 403 (this account may not search)" in h.detail, h
        assert archive.instances() == []  # the probe stored nothing

        hn = start_http_node(node_config(tmp_path, [{"name": "web", "kind": "dicomweb", "url": url}]), tmp_path)
        http_nodes.append(hn)
        health = wait_until(lambda: hn.node.health.get("web"), timeout=60, what="the first health check")
        assert health.reachable, health
        assert hn.client().get("/readyz").status_code == 200
        row = next(d for d in hn.client("viewer").get("/api/v1/destinations").json() if d["name"] == "web")
        assert row["reachable"] is True and "may not search" in row["health"], row
        sent = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(hn.node.settings.node.port), *map(str, make_study(tmp_path / "s", 2))],
                              env=dcmtk_env(), capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(archive.instances()) == 2, timeout=120, what="2 objects stored by STOW-RS")
    finally:
        archive.stop()


def test_an_account_refused_searching_and_storing_is_unreachable(tmp_path, http_nodes):
    """QIDO-RS and STOW-RS both 403: unreachable, saying it may not store (check auth),
    and /readyz 503."""
    archive = _orthanc(tmp_path, "true")
    try:
        url = archive.base_url + "/dicom-web"
        h = probe(Destination(name="web", kind="dicomweb", url=url), "CASEMASK", timeout_s=10)
        assert not h.reachable and "STOW-RS HTTP 403: not allowed to store: check auth" in h.detail, h
        hn = start_http_node(node_config(tmp_path, [{"name": "web", "kind": "dicomweb", "url": url}]), tmp_path)
        http_nodes.append(hn)
        wait_until(lambda: hn.node.health.get("web"), timeout=60, what="the first health check")
        assert hn.client().get("/readyz").status_code == 503
    finally:
        archive.stop()
