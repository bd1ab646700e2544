"""The node end to end, against real peers: dcmtk as the modality, Orthanc or a
pynetdicom SCP as the archive."""

from __future__ import annotations

import errno
import logging
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import func, select

from node import retention
from node.db import Delivery, DeliveryState, Instance, InstanceState, Study, StudyState, data_path
from tests.conftest import (
    ECHOSCU,
    PHI,
    STORESCU,
    NodeProcess,
    dcmtk_env,
    free_port,
    make_study,
    needs_dcmtk,
    needs_dicomweb,
    needs_orthanc,
    node_config,
    receive,
    wait_logged,
    wait_until,
    write_toml,
)

pytestmark = [needs_dcmtk, pytest.mark.usefixtures("database")]  # each test on SQLite and on PostgreSQL


def storescu(port: int, files: list[Path], aet: str = "STORESCU", aec: str = "CASEMASK", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def echoscu(port: int, aet: str = "ECHOSCU", aec: str = "CASEMASK") -> subprocess.CompletedProcess:
    return subprocess.run([ECHOSCU, "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], env=dcmtk_env(), capture_output=True, text=True, timeout=30)


def c_store(port: int, ds) -> int:
    """One C-STORE with pynetdicom; returns the status the node answered."""
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CASEMASK")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def delivery_states(node) -> dict[str, int]:
    with node.sessions() as s:
        rows = s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
    return {st.value: n for st, n in rows}


@needs_orthanc
def test_study_from_storescu_reaches_orthanc_once_deidentified(tmp_path, orthanc, start_node, caplog):
    caplog.set_level(logging.DEBUG)
    dest = {"name": "orthanc", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    node = start_node(node_config(tmp_path, [dest]))
    files = make_study(tmp_path / "study", n=6)
    r = storescu(node.settings.node.port, files)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: len(orthanc.instances()) >= 6, timeout=60, what="6 instances at Orthanc")
    wait_until(lambda: delivery_states(node) == {"SENT": 6}, timeout=30, what="6 deliveries SENT")
    ids = orthanc.instances()
    assert len(ids) == 6
    stats = orthanc.get("/statistics")
    assert stats["CountStudies"] == 1 and stats["CountInstances"] == 6
    originals = {str(dcmread(f).SOPInstanceUID) for f in files}
    for oid in ids:
        tags = orthanc.instance_tags(oid)
        assert tags["SOPInstanceUID"] not in originals
        assert tags["PatientIdentityRemoved"] == "YES"
        text = repr(tags)
        for value in PHI.values():
            assert value not in text, f"{value!r} reached the archive"
    # Nor the node's log, at its most verbose.
    assert "C-STORE" in caplog.text
    for value in PHI.values():
        assert value not in caplog.text, f"{value!r} reached the log"


@needs_orthanc
@needs_dicomweb
def test_dicomweb_destination_stores_through_stow_rs(tmp_path, orthanc_dicomweb, start_node):
    web = {"name": "web", "kind": "dicomweb", "url": f"http://127.0.0.1:{orthanc_dicomweb.http_port}/dicom-web"}
    wrong = {"name": "wrong", "kind": "dicomweb", "url": f"http://127.0.0.1:{orthanc_dicomweb.http_port}/no-such-root"}
    node = start_node(node_config(tmp_path, [web, wrong]))
    storescu(node.settings.node.port, make_study(tmp_path / "s", 3))
    wait_until(lambda: len(orthanc_dicomweb.instances()) == 3, timeout=60, what="3 instances stored through STOW-RS")
    # A 404 is permanent: dead letter at once, and it does not hold up the other destination.
    wait_until(lambda: delivery_states(node) == {"SENT": 3, "FAILED": 3}, timeout=30, what="3 SENT and 3 FAILED")
    with node.sessions() as s:
        reasons = {d.reason for d in s.scalars(select(Delivery).where(Delivery.state == DeliveryState.FAILED))}
    assert reasons == {"STOW-RS answered HTTP 404: no DICOMweb service at this url: check url"}


class _NotAnArchive:
    """An HTTP server on loopback that answers STOW-RS without storing anything: a
    proxy's 200 page at /proxy, a 301 to a QIDO-like search (200 "[]") at /moved."""

    def __init__(self) -> None:
        import http.server
        import threading

        posts = self.posts = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                posts.append(self.path)
                if self.path.startswith("/proxy/"):
                    self._answer(200, b"<html>Please sign in</html>", "text/html")
                else:
                    self._answer(301, b"", "text/plain", {"Location": "/search/studies"})

            def do_GET(self) -> None:  # noqa: N802
                self._answer(200, b"[]", "application/dicom+json")

            def log_message(self, *a) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_stow_answer_that_does_not_list_the_object_is_never_taken_for_sent(tmp_path, start_node):
    """A 200 that is not a Store Instances Response naming the object (a proxy's sign-in
    page), or a redirect (which requests would follow as a GET, answered 200), stored
    nothing: the deliveries wait for a retry, never SENT (retention would then delete
    the original and the output, and the object would be lost)."""
    stub = _NotAnArchive()
    try:
        dests = [{"name": "proxy", "kind": "dicomweb", "url": f"http://127.0.0.1:{stub.port}/proxy/dicom-web"},
                 {"name": "moved", "kind": "dicomweb", "url": f"http://127.0.0.1:{stub.port}/moved/dicom-web"}]
        node = start_node(node_config(tmp_path, dests), schedule=False, listen=False)
        for f in make_study(tmp_path / "s", 2):
            receive(node, dcmread(f))
        node.tick(0)
        assert delivery_states(node) == {"RETRY_WAIT": 4}
        assert sorted(stub.posts) == ["/moved/dicom-web/studies"] * 2 + ["/proxy/dicom-web/studies"] * 2
        with node.sessions() as s:
            reasons = {d.destination: d.reason for d in s.scalars(select(Delivery))}
        assert reasons == {"proxy": "STOW-RS answered without listing the object as stored (ReferencedSOPSequence)",
                           "moved": f"cannot reach http://127.0.0.1:{stub.port}/moved/dicom-web/studies (TooManyRedirects)"}
        retention.run(node.sessions, node.settings)
        with node.sessions() as s:
            assert all(data_path(node.settings.node.data_dir, i.path).exists() for i in s.scalars(select(Instance)))
    finally:
        stub.stop()


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(tmp_path, start_node):
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]))
    port = node.settings.node.port
    ok = echoscu(port)
    assert ok.returncode == 0, ok.stderr
    bad_calling = echoscu(port, aet="INTRUDER")
    assert bad_calling.returncode != 0
    assert "Calling AE Title Not Recognized" in bad_calling.stderr + bad_calling.stdout
    bad_called = echoscu(port, aec="NOTME")
    assert bad_called.returncode != 0
    assert "Called AE Title Not Recognized" in bad_called.stderr + bad_called.stdout
    # A rejected sender's objects are never stored.
    r = storescu(port, make_study(tmp_path / "s", 1), aet="INTRUDER")
    assert r.returncode != 0
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0


def test_accept_unknown_sources(tmp_path, start_node):
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], accept_unknown_sources=True))
    r = echoscu(node.settings.node.port, aet="ANYBODY")
    assert r.returncode == 0, r.stderr


def test_source_restricted_to_a_host(tmp_path, start_node):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    raw["sources"] = [{"ae_title": "WARD", "host": "127.0.0.2"}]
    node = start_node(raw)
    port = node.settings.node.port

    def try_from(addr: str) -> bool:
        ae = AE(ae_title="WARD")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CASEMASK", bind_address=(addr, 0))
        ok = assoc.is_established
        if ok:
            assoc.release()
        return ok

    assert try_from("127.0.0.2")
    assert not try_from("127.0.0.1")


def test_resend_of_same_instance_is_stored_once(tmp_path, start_node):
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600))
    files = make_study(tmp_path / "s", 2)
    assert storescu(node.settings.node.port, files).returncode == 0
    assert storescu(node.settings.node.port, files).returncode == 0
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 2


@pytest.mark.single_process  # makes the node process's spool fail
def test_spool_write_failure_answers_out_of_resources(tmp_path, start_node, monkeypatch):
    import node.scp as scp

    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), schedule=False)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scp, "place", disk_full)
    ds = dcmread(make_study(tmp_path / "s", 1)[0])
    assert c_store(node.settings.node.port, ds) == 0xA700
    with node.sessions() as s:  # the row committed alongside the failed write is gone again
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    monkeypatch.undo()  # space again: the modality's retry is stored
    assert c_store(node.settings.node.port, ds) == 0x0000
    with node.sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert data_path(node.settings.node.data_dir, inst.path).stat().st_size == inst.size


def test_rows_without_spool_file_wait_then_are_dropped_at_start(tmp_path, start_node):
    """The handler commits a row while its file is still being renamed into place (and
    answers only when both are durable): routing waits for the file, and a node that
    starts after a crash in that moment drops such rows (never acknowledged) once they
    are older than the grace time."""
    import datetime as dt

    from node.app import SPOOL_GRACE_S, Node
    from tests.conftest import receive

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=0)
    node = start_node(raw, schedule=False, listen=False)
    files = make_study(tmp_path / "s", 2)
    for f in files:
        receive(node, dcmread(f))
    with node.sessions() as s:
        missing = s.scalars(select(Instance)).first()
        path = data_path(node.settings.node.data_dir, missing.path)
    hidden = path.with_name("elsewhere")
    path.rename(hidden)
    assert node.route_stable(0) == 0  # the study waits for its file
    with node.sessions() as s:
        assert {i.state for i in s.scalars(select(Instance))} == {InstanceState.RECEIVED}
    node.stop()
    with node.sessions() as s:  # the rows are older than the grace time
        for inst in s.scalars(select(Instance)):
            inst.received_at -= dt.timedelta(seconds=SPOOL_GRACE_S + 1)
        s.commit()
    restarted = Node(node.settings, pixel_step=None)  # a crash at that moment, then a start
    try:
        with restarted.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 1
        assert restarted.route_stable(0) == 1  # the rest of the study goes on
    finally:
        restarted.stop()


def test_many_open_associations_all_store(tmp_path, start_node):
    """An association holds a database connection while it stores: 24 at once (the
    node accepts 32; all from one host here, so its per-host limit is raised) must all be
    answered Success, none left waiting for a connection."""
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, max_associations_per_host=32), schedule=False)
    files = make_study(tmp_path / "s", 24)
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assocs = [ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK") for _ in datasets]
    try:
        assert all(a.is_established for a in assocs)
        statuses = [int(a.send_c_store(ds).Status) for a, ds in zip(assocs, datasets)]
    finally:
        for a in assocs:
            a.release()
    assert statuses == [0] * len(datasets)
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == len(datasets)


@pytest.mark.single_process  # counts the node process's pool
def test_idle_associations_hold_no_database_connection(tmp_path, start_node):
    """Associations open but not sending hold no database connection (the connection
    budget counts associations storing, not associations open): rows are committed by
    the process's one group-commit connection (node.groupcommit), so four associations
    that each stored an object and stay open hold nothing more, and each can store
    again."""
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600), schedule=False)
    datasets = [dcmread(f) for f in make_study(tmp_path / "s", 8)]
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assocs = [ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK") for _ in range(4)]
    try:
        assert all(a.is_established for a in assocs)
        assert [int(a.send_c_store(ds).Status) for a, ds in zip(assocs, datasets[:4])] == [0] * 4
        assert node.engine.pool.checkedout() <= 1, "only the group-commit connection is out while the associations idle"
        assert [int(a.send_c_store(ds).Status) for a, ds in zip(assocs, datasets[4:])] == [0] * 4
    finally:
        for a in assocs:
            a.release()
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 8


def test_dataset_without_study_uid_answers_cannot_understand(tmp_path, start_node):
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), schedule=False)
    ds = dcmread(make_study(tmp_path / "s", 1)[0])
    del ds.StudyInstanceUID
    assert 0xC000 <= c_store(node.settings.node.port, ds) <= 0xCFFF


def test_destination_down_then_up_delivers_exactly_once(tmp_path, start_node, archive_factory):
    port = free_port()
    # Refused at once while down; once up, an answer slower than timeout_s (a loaded
    # machine, the archive in this process) would be sent again: not exactly once.
    dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": port, "timeout_s": 30.0}
    node = start_node(node_config(tmp_path, [dest]))
    storescu(node.settings.node.port, make_study(tmp_path / "s", 4))
    wait_until(lambda: delivery_states(node).get("RETRY_WAIT", 0) == 4, timeout=30, what="deliveries waiting to retry")
    archive = archive_factory(port=port)
    wait_until(lambda: delivery_states(node) == {"SENT": 4}, timeout=30, what="deliveries SENT after the archive came up")
    assert len(archive.received) == 4
    assert len(set(archive.received)) == 4


def test_permanent_rejection_goes_to_dead_letter_at_once_and_retry_requeues(tmp_path, start_node, archive_factory):
    archive = archive_factory(require_calling=["SOMEONEELSE"])
    dead = {"name": "picky", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}
    good = {"name": "folder", "kind": "folder", "path": str(tmp_path / "out")}
    node = start_node(node_config(tmp_path, [dead, good]))
    storescu(node.settings.node.port, make_study(tmp_path / "s", 3))
    wait_until(lambda: delivery_states(node) == {"FAILED": 3, "SENT": 3}, timeout=30, what="3 FAILED and 3 SENT")
    with node.sessions() as s:
        failed = s.scalars(select(Delivery).where(Delivery.state == DeliveryState.FAILED)).all()
        assert all(d.attempts == 1 and "rejected" in d.reason for d in failed)
    # The dead destination never held up the folder.
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3
    from node import queue

    with node.sessions() as s:
        assert queue.requeue_failed(s, "picky") == 3
        s.commit()
    wait_until(lambda: delivery_states(node) == {"FAILED": 3, "SENT": 3}, timeout=30, what="re-queued deliveries to fail again")


def test_retry_sends_waiting_deliveries_now(tmp_path, start_node, archive_factory):
    """After the admin fixed a destination, `casemask retry` sends deliveries waiting
    for their next attempt now (before, only FAILED ones were re-queued and the waiting
    ones waited up to retry_max_s)."""
    from node import queue

    port = free_port()
    dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": port, "timeout_s": 30.0}
    node = start_node(node_config(tmp_path, [dest], retry_base_s=600.0, retry_max_s=600.0))
    storescu(node.settings.node.port, make_study(tmp_path / "s", 3))
    wait_until(lambda: delivery_states(node).get("RETRY_WAIT", 0) == 3, timeout=30, what="deliveries waiting to retry")
    archive = archive_factory(port=port)
    time.sleep(2)
    assert delivery_states(node) == {"RETRY_WAIT": 3}  # their next attempt is 600 s away
    with node.sessions() as s:
        assert queue.hasten_waiting(s, "other") == 0
        assert queue.hasten_waiting(s, "pacs") == 3
        s.commit()
    wait_until(lambda: delivery_states(node) == {"SENT": 3}, timeout=30, what="waiting deliveries SENT after retry")
    assert sorted(set(archive.received)) == sorted(archive.received) and len(archive.received) == 3


def test_failing_deid_step_never_forwards(tmp_path, start_node, monkeypatch):
    from node.deid import Deidentifier

    def boom(self, ds, extra_codes=()):
        raise RuntimeError("simulated de-identification failure")

    monkeypatch.setattr(Deidentifier, "apply", boom)
    out = tmp_path / "out"
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}]))
    storescu(node.settings.node.port, make_study(tmp_path / "s", 3))

    def quarantined() -> bool:
        with node.sessions() as s:
            return s.scalar(select(func.count()).select_from(Instance).where(Instance.state == InstanceState.QUARANTINED)) == 3

    wait_until(quarantined, timeout=30, what="3 quarantined instances")
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 0
        reasons = {i.reason for i in s.scalars(select(Instance))}
    # The reason names the step and the error's class, never the exception's message.
    assert any(r.startswith("headers: RuntimeError") for r in reasons), reasons
    assert not any("simulated de-identification failure" in r for r in reasons)
    assert not out.exists() or not list(out.rglob("*.dcm"))


def test_route_requiring_pixels_without_pixel_step_is_quarantined(tmp_path, start_node):
    out = tmp_path / "out"
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}])
    raw["routes"][0]["pixels"] = "anonymize"
    raw["routes"][0]["allow_demonstration_model"] = True
    node = start_node(raw, pixel_step=None)
    storescu(node.settings.node.port, make_study(tmp_path / "s", 2))

    def quarantined():
        with node.sessions() as s:
            return [i.reason for i in s.scalars(select(Instance).where(Instance.state == InstanceState.QUARANTINED))]

    reasons = wait_until(lambda: len(quarantined()) == 2 and quarantined(), timeout=30, what="quarantine")
    assert all("pixel" in r for r in reasons)
    assert not out.exists() or not list(out.rglob("*.dcm"))


def test_late_instance_is_an_amendment_of_the_same_output_study(tmp_path, start_node, archive_factory):
    archive = archive_factory()
    dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}
    node = start_node(node_config(tmp_path, [dest]))
    study_uid = "1.2.826.0.1.3680043.8.498.1111"
    first = make_study(tmp_path / "a", 3, study_uid=study_uid)
    storescu(node.settings.node.port, first)
    wait_until(lambda: len(archive.received) == 3, what="first 3 objects")
    late = make_study(tmp_path / "b", 1, study_uid=study_uid)
    storescu(node.settings.node.port, late)
    wait_until(lambda: len(archive.received) == 4, what="the late object")
    wait_until(lambda: delivery_states(node) == {"SENT": 4}, what="4 SENT")
    assert len(archive.received) == 4  # nothing re-sent
    assert len({str(d.StudyInstanceUID) for d in archive.datasets}) == 1
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 1


def test_unrouted_objects_are_held(tmp_path, start_node):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    raw["routes"][0]["match"] = {"Modality": "MR"}
    node = start_node(raw)
    storescu(node.settings.node.port, make_study(tmp_path / "s", 2))

    def held():
        with node.sessions() as s:
            return s.scalar(select(func.count()).select_from(Instance).where(Instance.state == InstanceState.HELD)) == 2

    wait_until(held, what="2 HELD instances")

    def study_held():
        with node.sessions() as s:
            return s.scalar(select(Study.state)) == StudyState.HELD

    wait_until(study_held, what="the study to be HELD (nothing left to do, nothing went out)")


@pytest.mark.slow
def test_sigkill_during_receive_and_forward_loses_and_duplicates_nothing(tmp_path, archive_factory):
    """Kill the node (SIGKILL) while it receives, then while it forwards; restart it;
    every object reaches the archive; re-sends carry the same SOP Instance UID."""
    archive = archive_factory(delay_s=0.01)
    dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}
    raw = node_config(tmp_path, [dest], stable_after_s=1.0, lease_s=2.0, poll_interval_s=0.2, receivers=2)  # two receiving processes on every machine
    port = raw["node"]["port"]
    cfg = write_toml(raw, tmp_path / "node.toml")
    node = NodeProcess(cfg, tmp_path / "node.log")
    files = make_study(tmp_path / "study", n=150)

    sender = None
    try:  # a failure at any step leaves no node (nor its receivers) running
        # 1. Kill while receiving.
        node.start(port)
        sender = subprocess.Popen([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spool = Path(raw["node"]["data_dir"]) / "spool"
        wait_until(lambda: spool.exists() and len(list(spool.rglob("*.dcm"))) >= 40, timeout=60, what="40 objects spooled")
        node.kill()
        sender.wait(60)
        # 2. Restart; the modality sends everything again (it keeps what was not acknowledged).
        node.start(port)
        r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        # 3. Kill while forwarding.
        wait_until(lambda: len(archive.received) >= 30, timeout=60, what="forwarding to start")
        node.kill()
        at_kill = len(archive.received)
        assert at_kill < 150, "forwarding finished before the kill; the test proves nothing"
        node.start(port)
        wait_until(lambda: len(set(archive.received)) >= 150, timeout=120, what="all 150 objects at the archive")
    finally:
        node.stop()
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait(10)
    distinct = set(archive.received)
    assert len(distinct) == 150
    # On the wire, only the object in flight at the kill may be sent twice (same UID).
    assert len(archive.received) - len(distinct) <= 1, f"{len(archive.received) - len(distinct)} duplicate C-STOREs"


def test_resend_after_processing_neither_reopens_the_study_nor_logs_an_amendment(tmp_path, start_node, caplog):
    out = tmp_path / "out"
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}]))
    files = make_study(tmp_path / "s", 2)
    assert storescu(node.settings.node.port, files).returncode == 0
    wait_until(lambda: delivery_states(node) == {"SENT": 2}, what="2 SENT")

    def study_state():
        with node.sessions() as s:
            return s.scalar(select(Study.state))

    wait_until(lambda: study_state() == StudyState.DONE, what="the study to be DONE")
    caplog.clear()
    with caplog.at_level("INFO", logger="node"):
        assert storescu(node.settings.node.port, files).returncode == 0
        wait_logged(caplog, "already stored", 2)  # from a receiver process: through its pipe, a moment later
    assert study_state() == StudyState.DONE
    assert not any("amendment" in r.getMessage() for r in caplog.records)
    assert sum("already stored" in r.getMessage() for r in caplog.records) == 2
    assert delivery_states(node) == {"SENT": 2}


def test_a_start_leaves_the_temporaries_another_process_is_writing(tmp_path, start_node):
    """Processes may share a data folder (roles, a cluster): a start removes only the
    temporaries nobody wrote to for the grace time (a crash's leftovers), never one a
    C-STORE on another process is still writing into spool/.incoming."""
    import os
    import time

    from node.app import SPOOL_GRACE_S, Node

    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), listen=False, schedule=False)
    incoming = node.settings.node.data_dir / "spool" / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    arriving, left = incoming / ".arriving.tmp", incoming / ".left.tmp"
    arriving.write_bytes(b"x")
    left.write_bytes(b"x")
    old = time.time() - SPOOL_GRACE_S - 5
    os.utime(left, (old, old))
    second = Node(node.settings, pixel_step=None, role="worker")
    try:
        assert arriving.exists(), "another process's C-STORE in progress was deleted"
        assert not left.exists(), "a crash's leftover was kept"
        # The leftover may hold received data: its deletion is audited, with the count.
        import json

        from sqlalchemy import select

        from node.db import AuditEvent

        with second.sessions() as s:
            entries = [(e.event, e.actor, e.detail) for e in s.scalars(select(AuditEvent).where(AuditEvent.event == "orphans-purged"))]
        assert len(entries) == 1 and entries[0][:2] == ("orphans-purged", "startup")
        assert json.loads(entries[0][2])["files"] == 1
    finally:
        second.stop()
