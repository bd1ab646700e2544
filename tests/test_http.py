"""The operator's HTTP API against a running node: authentication and roles, retrying a
quarantined object into Orthanc, live configuration while storescu sends, metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from node.db import AuditEvent, Delivery, DeliveryState, Instance, Job, JobState
from tests.conftest import ROOT, STORESCU, NodeProcess, dcmtk_env, free_port, make_study, needs_dcmtk, needs_orthanc, node_config, wait_until, write_toml
from tests.httpnode import breakable_deid, http_nodes, sample, start_http_node  # noqa: F401 (fixture)

pytestmark = needs_dcmtk


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)],
                          env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def folder(tmp_path: Path, name: str = "out") -> dict:
    return {"name": name, "kind": "folder", "path": str(tmp_path / name)}


def test_every_endpoint_but_health_needs_authentication_and_roles_are_enforced(tmp_path, http_nodes):
    hn = start_http_node(node_config(tmp_path, [folder(tmp_path)]), tmp_path)
    http_nodes.append(hn)
    anon = hn.client()
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/readyz").status_code == 200
    assert anon.get("/readyz").text == "ready\n"  # no details without a token
    # Every route of the application, every method, without credentials: 401 for the API
    # and /metrics, a redirect to the login page for the dashboard.
    from node.http import pages

    spec = anon.get("/api/v1/openapi.json").json()
    endpoints = [(m.upper(), path) for path, ops in spec["paths"].items() for m in ops]
    endpoints += [(m, r.path) for r in pages.router.routes for m in r.methods - {"HEAD"} if r.path != "/login"]
    endpoints.append(("GET", "/metrics"))
    checked = 0
    for method, path in endpoints:
        url = path.replace("{study_id}", "1").replace("{job_id}", "1").replace("{output_id}", "1")
        if True:
            r = anon.request(method, url, follow_redirects=False)
            if path.startswith(("/api/", "/metrics")):
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer"
            else:
                assert r.status_code == 303 and r.headers["location"].startswith("/login"), (method, path, r.status_code)
            checked += 1
    assert checked >= 30
    assert hn.client().get("/api/v1/status", headers={"Authorization": "Bearer cm_not-a-token"}).status_code == 401
    # The OpenAPI document lists the API and its bearer scheme.
    assert {"/api/v1/status", "/api/v1/jobs/{job_id}/retry", "/api/v1/config", "/api/v1/config/reload", "/api/v1/audit"} <= set(spec["paths"])
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())

    viewer, operator, admin = hn.client("viewer"), hn.client("operator"), hn.client("admin")
    assert viewer.get("/api/v1/status").status_code == 200
    assert viewer.get("/metrics").status_code == 200
    assert viewer.post("/api/v1/jobs/1/retry").status_code == 403  # viewer cannot retry
    assert viewer.post("/api/v1/deliveries/retry").status_code == 403
    assert operator.post("/api/v1/jobs/1/retry").status_code == 404  # allowed; no such job
    assert operator.post("/api/v1/deliveries/retry").json() == {"requeued": 0}
    text = hn.config.read_text()
    assert operator.put("/api/v1/config", content=text).status_code == 403  # operator cannot change config
    assert operator.post("/api/v1/config/reload").status_code == 403
    assert operator.post("/api/v1/mapping/export").status_code == 403
    assert admin.post("/api/v1/config/reload").status_code == 200

    # An invalid configuration is refused with the lines `casemask config check` prints.
    bad = text.replace('kind = "folder"', 'kind = "floppy"').replace("stable_after_s = 0.5", "stable_after_s = -1")
    hn.config.with_name("bad.toml").write_text(bad)
    check = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(hn.config.with_name("bad.toml"))], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 2
    r = admin.put("/api/v1/config", content=bad, headers={"Content-Type": "application/toml"})
    assert r.status_code == 422
    problems = r.json()["problems"]
    assert len(problems) >= 2 and any("floppy" in p for p in problems) and any("stable_after_s" in p for p in problems)
    assert problems == [line.removeprefix("  - ") for line in check.stderr.splitlines() if line.startswith("  - ")]
    assert hn.config.read_text() == text  # nothing written


def test_quarantined_object_retried_through_the_api_reaches_orthanc(tmp_path, http_nodes, orthanc, monkeypatch):
    broken = breakable_deid(monkeypatch)
    broken["on"] = True
    dest = {"name": "orthanc", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    hn = start_http_node(node_config(tmp_path, [dest]), tmp_path)
    http_nodes.append(hn)
    before = hn.metrics()  # before the objects arrive: they may be quarantined by the time storescu exits
    assert storescu(hn.node.settings.node.port, make_study(tmp_path / "s", 3)).returncode == 0
    viewer, operator = hn.client("viewer"), hn.client("operator")
    rows = wait_until(lambda: len(q := viewer.get("/api/v1/quarantine").json()) == 3 and q, timeout=60, what="3 quarantined jobs")
    assert sample(hn.metrics(), "casemask_quarantined_total", step="headers") - sample(before, "casemask_quarantined_total", step="headers") == 3
    assert all(r["reason"] == "headers: RuntimeError" for r in rows)
    assert orthanc.instances() == []
    study_id = rows[0]["study_id"]
    detail = viewer.get(f"/api/v1/studies/{study_id}").json()
    assert detail["study_uid"].startswith("2.25.") and {j["state"] for j in detail["jobs"]} == {"QUARANTINED"}
    assert [e["event"] for e in detail["timeline"]][:2] == ["study-received", "quarantined"]

    broken["on"] = False  # the admin fixed the cause
    for r in rows[:2]:
        assert operator.post(f"/api/v1/jobs/{r['job_id']}/retry").json() == {"job_id": r["job_id"], "state": "PENDING"}
    assert operator.post(f"/api/v1/jobs/{rows[2]['job_id']}/discard").json()["state"] == "DISCARDED"
    assert operator.post(f"/api/v1/jobs/{rows[2]['job_id']}/retry").status_code == 409  # no longer quarantined
    wait_until(lambda: len(orthanc.instances()) == 2, timeout=60, what="the 2 retried objects at Orthanc")
    wait_until(lambda: viewer.get("/api/v1/deliveries", params={"state": "SENT"}).json().__len__() == 2, what="2 SENT deliveries")
    time.sleep(1.0)
    assert len(orthanc.instances()) == 2  # the discarded one never leaves
    tags = orthanc.instance_tags(orthanc.instances()[0])
    assert tags["StudyInstanceUID"] == detail["study_uid"]  # the dashboard names the study as the archive does
    entries = viewer.get("/api/v1/audit", params={"actor": "token:test-operator"}).json()
    assert sorted(e["event"] for e in entries) == ["job-discarded", "job-retried", "job-retried"]
    assert all(e["study_uid"] == detail["study_uid"] for e in entries)


def test_passwords_in_the_configuration_are_shown_to_admins_only(tmp_path, http_nodes, caplog):
    """A viewer or operator reads the configuration (API and dashboard) and the
    destinations, but not the password of a URL in it (a database_url or a dicomweb url
    with user:password@): with it they could read the database, or the archive, directly."""
    import re

    from node import accounts

    password = "Xq7-never-shown-9z"
    dw = {"name": "dw", "kind": "dicomweb", "url": f"https://archiver:{password}@127.0.0.1:9/dicom-web"}
    hn = start_http_node(node_config(tmp_path, [folder(tmp_path), dw]), tmp_path)
    http_nodes.append(hn)
    assert password in hn.config.read_text()
    for role in ("viewer", "operator"):
        c = hn.client(role)
        cfg = c.get("/api/v1/config").json()
        assert password not in cfg["text"] and "archiver:***@127.0.0.1:9" in cfg["text"] and not cfg["editable"], role
        assert password not in c.get("/api/v1/destinations").text and password not in c.get("/api/v1/status").text
    admin = hn.client("admin").get("/api/v1/config").json()
    assert password in admin["text"] and admin["editable"]  # the admin edits the file as it is
    # The trail every viewer reads names the configuration by a digest of what a viewer
    # sees: one of the whole file would let a weak password be guessed offline.
    import hashlib

    assert hn.client("admin").post("/api/v1/config/reload").status_code == 200
    shown = hn.client("viewer").get("/api/v1/config").json()["text"]
    entry = hn.client("viewer").get("/api/v1/audit", params={"event": "config-reloaded"}).json()[0]
    assert entry["detail"]["sha256"] == hashlib.sha256(shown.encode()).hexdigest() != hashlib.sha256(admin["text"].encode()).hexdigest()
    # The dashboard's configuration page, logged in as a viewer.
    with hn.node.sessions() as s:
        accounts.add_user(s, "vera", "viewer", "a long enough password")
        s.commit()
    ui = hn.client()
    token = re.search(r'name="login_token" value="([^"]+)"', ui.get("/login").text).group(1)
    r = ui.post("/login", data={"name": "vera", "password": "a long enough password", "login_token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = ui.get("/config")
    assert page.status_code == 200 and "archiver:***@" in page.text and password not in page.text
    assert password not in caplog.text


def test_config_put_adds_a_destination_while_a_sender_sends_and_nothing_is_lost(tmp_path, http_nodes, archive_factory):
    """A configuration PUT while a modality's association is open: the association goes
    on (every C-STORE answered Success, before and after the reload), and every object
    reaches the destination the PUT added. The sender is a pynetdicom association held
    open across the PUT (100 objects before it, 100 after): with storescu the test
    depended on storescu still sending when the PUT came, which a fast run missed."""
    from pynetdicom import AE

    # The study cannot be routed to the old routes alone before the PUT, however slow
    # the machine: it is stable only after 600 s; the new file says 2 s.
    raw = node_config(tmp_path, [folder(tmp_path, "first")], stable_after_s=600.0)
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    archive = archive_factory()
    datasets = [dcmread(f) for f in make_study(tmp_path / "s", 200)]
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", hn.node.settings.node.port, ae_title="CASEMASK")
    assert assoc.is_established

    def stored() -> int:
        with hn.node.sessions() as s:
            return s.scalar(select(func.count()).select_from(Instance)) or 0

    try:
        statuses = [assoc.send_c_store(ds).Status for ds in datasets[:100]]
        assert stored() == 100
        raw2 = {**raw, "node": {**raw["node"], "stable_after_s": 2.0},
                "destinations": [folder(tmp_path, "first"), {"name": "second", "kind": "dicom", "ae_title": archive.aet, "host": "127.0.0.1", "port": archive.port}]}
        raw2["routes"] = [{**raw["routes"][0], "destinations": ["first", "second"]}]
        new_text = write_toml(raw2, tmp_path / "next.toml").read_text()
        r = hn.client("admin").put("/api/v1/config", content=new_text)
        assert r.status_code == 200, r.text
        assert set(r.json()["applied"]) >= {"destinations", "routes"} and r.json()["restart_required"] == []
        assert assoc.is_established  # the reload dropped no association
        statuses += [assoc.send_c_store(ds).Status for ds in datasets[100:]]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 200
    assert stored() == 200
    wait_until(lambda: len(set(archive.received)) == 200, timeout=180, what="200 objects at the new destination")
    wait_until(lambda: len(list((tmp_path / "first").rglob("*.dcm"))) == 200, timeout=60, what="200 objects in the first folder")
    assert hn.config.read_text() == new_text
    changed = hn.client("viewer").get("/api/v1/audit", params={"event": "config-changed"}).json()
    assert changed[0]["actor"] == "token:test-admin" and "destinations" in changed[0]["detail"]["applied"]


def test_sighup_reloads_the_configuration_file(tmp_path, archive_factory):
    archive = archive_factory()
    raw = node_config(tmp_path, [folder(tmp_path, "first")], receivers=2)  # one receiver process, on every machine
    port = raw["node"]["port"]
    cfg = write_toml(raw, tmp_path / "node.toml")
    proc = NodeProcess(cfg, tmp_path / "node.log")
    proc.start(port)
    try:
        newcomer = [STORESCU, "-aet", "NEWWARD", "-aec", "CASEMASK", "127.0.0.1", str(port)]
        assert subprocess.run([*newcomer, str(make_study(tmp_path / "n", 1)[0])], env=dcmtk_env(), capture_output=True, timeout=60).returncode != 0
        raw["destinations"].append({"name": "second", "kind": "dicom", "ae_title": archive.aet, "host": "127.0.0.1", "port": archive.port})
        raw["routes"][0]["destinations"] = ["first", "second"]
        raw["sources"].append({"ae_title": "NEWWARD"})
        write_toml(raw, cfg)
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in (tmp_path / "node.log").read_text(), timeout=30, what="the reload in the log")
        # The receiver process takes the new [[sources]] a moment after the node logged it.
        wait_until(lambda: "[[sources]] and accept_unknown_sources taken" in (tmp_path / "node.log").read_text(), timeout=30, what="the receiver to take the reload")
        assert storescu(port, make_study(tmp_path / "s", 2)).returncode == 0
        assert subprocess.run([*newcomer, str(make_study(tmp_path / "m", 1)[0])], env=dcmtk_env(), capture_output=True, timeout=60).returncode == 0  # a new source
        wait_until(lambda: len(archive.received) == 3, timeout=60, what="3 objects at the destination added by SIGHUP")
        assert proc.proc.poll() is None
        # A broken file: refused, each problem on a line of its own (not one line of \n).
        good = cfg.read_text()
        cfg.write_text(good.replace('stable_after_s = 0.5', 'stable_after_s = "soon"'))
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration not reloaded, still running on the previous one" in (tmp_path / "node.log").read_text(), timeout=30, what="the refused reload in the log")
        refused = [line for line in (tmp_path / "node.log").read_text().splitlines() if "stable_after_s" in line]
        assert refused and all("\\n" not in line for line in refused), refused
        assert proc.proc.poll() is None
    finally:
        proc.stop()


def test_metrics_change_as_studies_flow(tmp_path, http_nodes, archive_factory):
    archive = archive_factory()
    dest = {"name": "pacs", "kind": "dicom", "ae_title": archive.aet, "host": "127.0.0.1", "port": archive.port}
    hn = start_http_node(node_config(tmp_path, [dest]), tmp_path)
    http_nodes.append(hn)
    before = hn.metrics()
    files = make_study(tmp_path / "s", 4)
    size = sum(len(Path(f).read_bytes()) for f in files)
    assert storescu(hn.node.settings.node.port, files).returncode == 0
    wait_until(lambda: len(archive.received) == 4, timeout=60, what="4 objects at the archive")

    def settled() -> dict[str, float] | None:
        """/metrics once the queue says 4 SENT and the dispatch batch that sent them has
        counted them (after committing each delivery SENT) and the study is DONE."""
        m = hn.metrics()
        done = (sample(m, "casemask_queue_depth", kind="deliveries", state="SENT") == 4 and sample(m, "casemask_queue_depth", kind="studies", state="DONE") == 1
                and sample(m, "casemask_deliveries_total", destination="pacs", result="sent") - sample(before, "casemask_deliveries_total", destination="pacs", result="sent") >= 4)
        return m if done else None

    after = wait_until(settled, what="4 SENT in the queue depth and counted as sent")

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("casemask_instances_received_total") == 4
    assert size * 0.9 < delta("casemask_bytes_received_total") < size * 1.1
    assert delta("casemask_associations_total", result="accepted") >= 1
    assert delta("casemask_deliveries_total", destination="pacs", result="sent") == 4
    assert delta("casemask_delivery_latency_seconds_count") == 4
    assert delta("casemask_step_seconds_count", step="headers") >= 1
    assert sample(after, "casemask_queue_depth", kind="studies", state="DONE") == 1
    assert sample(after, "casemask_disk_free_bytes") > 0
    # A rejected association is counted too.
    r = subprocess.run([STORESCU, "-aet", "INTRUDER", "-aec", "CASEMASK", "127.0.0.1", str(hn.node.settings.node.port), str(files[0])], env=dcmtk_env(), capture_output=True, timeout=60)
    assert r.returncode != 0
    assert delta_now(hn, after, "casemask_associations_total", result="rejected") == 1


def delta_now(hn, before: dict, name: str, **labels: str) -> float:
    return sample(hn.metrics(), name, **labels) - sample(before, name, **labels)


def test_public_metrics_and_the_rest_still_locked(tmp_path, http_nodes):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["http"]["public_metrics"] = True
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    assert hn.client().get("/metrics").status_code == 200
    assert hn.client().get("/api/v1/status").status_code == 401


def test_routes_explain_uploads_a_file_and_stores_nothing(tmp_path, http_nodes):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"] = [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["out"]}, {"name": "mr", "match": {"Modality": "MR"}, "destinations": ["out"]}]
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    f = make_study(tmp_path / "s", 1)[0]
    r = hn.client("viewer").post("/api/v1/routes/explain", files={"file": ("x.dcm", f.read_bytes())})
    assert r.status_code == 200, r.text
    assert r.json()["routes"] == ["ct"] and [v["matched"] for v in r.json()["verdicts"]] == [True, False]
    assert hn.client("viewer").post("/api/v1/routes/explain", files={"file": ("x.txt", b"not dicom")}).status_code == 422
    with hn.node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0


def test_https_with_the_configured_certificate(tmp_path, http_nodes):
    import ssl

    import httpx

    crt, key = tmp_path / "http.crt", tmp_path / "http.key"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)], capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["http"]["tls"] = {"certificate": str(crt), "private_key": str(key)}
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    base = hn.base.replace("http://", "https://")
    ctx = ssl.create_default_context(cafile=str(crt))
    with httpx.Client(base_url=base, verify=ctx) as c:
        assert c.get("/healthz").text == "ok\n"
        assert c.get("/api/v1/status", headers={"Authorization": f"Bearer {hn.tokens['viewer']}"}).status_code == 200
        login = c.get("/login")
        assert "secure" in login.headers["set-cookie"].lower()
        assert login.headers["strict-transport-security"] == "max-age=31536000"
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
        httpx.get(hn.base + "/healthz", timeout=5)
