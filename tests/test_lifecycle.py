"""Data lifecycle and failure isolation (#19): retention, poison jobs, claims with owner
tokens and leases, reasons without PHI, the secret's fingerprint, held objects, and
delivery problems logged as state changes. Every test runs on SQLite and on PostgreSQL.
Only the clock is mocked (``node.db.clock_offset``, added to the database's clock)."""

from __future__ import annotations

import copy
import datetime as dt
import errno
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

import node.db as db
from node import queue, retention
from node.app import Node
from node.config import ConfigError, parse
from node.db import Delivery, DeliveryState, Instance, InstanceState, Job, JobState, Output, Study, StudyState, data_path
from node.dispatch import Dispatcher
from node.pipeline import Pipeline
from node.startup import StartupError
from tests.conftest import (
    ROOT,
    STORESCU,
    NodeProcess,
    database_engine,
    dcmtk_env,
    free_port,
    make_study,
    needs_dcmtk,
    node_config,
    receive,
    wait_until,
    write_toml,
)


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=180)


pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)


def folder(tmp_path: Path) -> dict:
    return {"name": "f", "kind": "folder", "path": str(tmp_path / "archive")}  # outside the data folder


def dicom(archive) -> dict:
    return {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port, "timeout_s": 5.0}


def fill(node, tmp_path: Path, n: int, name: str = "s", **kw) -> list[str]:
    """``n`` objects of a new study into the node's spool and queue; their SOP UIDs."""
    uids = []
    for f in make_study(tmp_path / name, n, **kw):
        ds = dcmread(f)
        receive(node, ds)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def job_states(node) -> dict[str, int]:
    with node.sessions() as s:
        return {st.value: n for st, n in s.execute(select(Job.state, func.count()).group_by(Job.state)).all()}


def delivery_states(node) -> dict[str, int]:
    with node.sessions() as s:
        return {st.value: n for st, n in s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()}


def files_under(folder: Path) -> list[Path]:
    """The files under ``folder``, read again when retention removes a subfolder while
    the walk is in it (rglob then raises FileNotFoundError)."""
    for _ in range(10):
        try:
            return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
        except FileNotFoundError:
            continue
    raise AssertionError(f"{folder} kept changing under the walk")


@pytest.fixture
def clock(monkeypatch):
    """The database's clock (this process's on SQLite, the server's on PostgreSQL),
    moved on at will (``node.db.clock_offset``)."""
    monkeypatch.setattr(db, "clock_offset", dt.timedelta(0))

    def advance(**kw) -> None:
        db.clock_offset += dt.timedelta(**kw)

    return advance


class StandInPixels:
    """Stands in for the engine's pixel step (node.pixels needs a model): passes each
    image through as its "anonymized" output, and fails the whole batch when asked,
    like a runtime that crashes on one input or whose server is away."""

    def __init__(self, poison: set[str] = frozenset(), error: BaseException | None = None, transient: int = 0, sleep_s: float = 0.0) -> None:
        self.poison = set(poison)
        self.error = error or RuntimeError("the runtime crashed")
        self.transient = transient
        self.sleep_s = sleep_s
        self.batches: list[list[str]] = []

    def available(self, route) -> str | None:
        return None

    def process(self, items, route, pseudo) -> None:
        from engine.runtime import TransientRunnerError

        uids = [str(it.source.SOPInstanceUID) for it in items]
        self.batches.append(uids)
        if self.transient > 0:
            self.transient -= 1
            raise TransientRunnerError("inference server out of reach")
        time.sleep(self.sleep_s)
        if self.poison & set(uids):
            raise self.error
        for it in items:
            it.outputs = [("anonymized", copy.deepcopy(it.source))]


def pixel_config(tmp_path: Path, dests: list[dict], **node_kw) -> dict:
    raw = node_config(tmp_path, dests, **node_kw)
    raw["routes"][0].update(pixels="anonymize", allow_demonstration_model=True)  # a stand-in runs, not the demonstration
    return raw


def drain(node, timeout: float = 30.0, until=None) -> None:
    """Tick the node (routing, processing, dispatch) until ``until()`` holds."""
    wait_until(lambda: (node.tick(0), until())[1], timeout=timeout, interval=0.05, what="the queue to settle")


# -- 1. retention --------------------------------------------------------------------------
@needs_dcmtk
def test_delivered_study_leaves_no_file_under_the_data_folder(tmp_path, start_node, archive_factory):
    """Sent, delivered, then the scheduled retention job: spool and outbox are empty,
    the rows (UIDs and states) stay, and the data folder, database and secret are
    readable by their owner only."""
    archive = archive_factory()
    raw = node_config(tmp_path, [dicom(archive)])
    raw["retention"] = {"interval_s": 0.3}
    node = start_node(raw)
    data = node.settings.node.data_dir
    assert storescu(node.settings.node.port, make_study(tmp_path / "s", 5)).returncode == 0
    wait_until(lambda: delivery_states(node) == {"SENT": 5}, what="5 deliveries SENT")
    wait_until(lambda: not files_under(data / "spool") and not files_under(data / "outbox"), timeout=30, what="retention to empty spool and outbox")
    assert len(archive.received) == 5

    def all_marked() -> bool:  # the files go first, then their rows are marked (committed a moment later)
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
            return len(rows) == 5 and all(i.state == InstanceState.PROCESSED and i.purged_at is not None for i in rows) \
                and all(o.purged_at is not None for o in s.scalars(select(Output)))

    wait_until(all_marked, timeout=10, what="the rows marked purged")
    left = {p.name for p in files_under(data)}
    assert left <= {"casemask.db", "casemask.db-wal", "casemask.db-shm", "secret.key", "node-id"}, left
    assert data.stat().st_mode & 0o777 == 0o700
    for name in ("casemask.db", "secret.key", "node-id") if not node.settings.node.database_url else ("secret.key", "node-id"):
        assert (data / name).stat().st_mode & 0o777 == 0o600, name


def test_quarantined_original_stays_until_its_days_are_over(tmp_path, start_node, clock):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"quarantine_days": 30}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 1, modality="US")  # burned-in text likely, route does not clean pixels
    node.tick(0)
    with node.sessions() as s:
        inst = s.scalars(select(Instance)).one()
    assert inst.state == InstanceState.QUARANTINED
    path = data_path(node.settings.node.data_dir, inst.path)
    for days, kept in ((0, True), (29, True), (2, False)):  # 0, 29, then 31 days later
        clock(days=days)
        retention.run(node.sessions, node.settings)
        assert path.exists() == kept, f"after {days} more days"
    with node.sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.state == InstanceState.QUARANTINED and inst.purged_at is not None  # the row stays
        assert queue.requeue_quarantined(s) == 0  # nothing left to process again


def test_retention_days_count_from_delivery_and_minus_one_keeps(tmp_path, start_node, clock):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"originals_days": 7, "outputs_days": -1}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 2)
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    data = node.settings.node.data_dir
    assert retention.run(node.sessions, node.settings).deleted == 0
    clock(days=8)
    report = retention.run(node.sessions, node.settings)
    assert report.files == {"original": 2}
    assert not files_under(data / "spool") and len(files_under(data / "outbox")) == 2


def test_purge_dry_run_says_what_it_would_delete_and_deletes_nothing(tmp_path, start_node):
    raw = node_config(tmp_path, [folder(tmp_path)])
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 3)
    drain(node, until=lambda: delivery_states(node) == {"SENT": 3})
    cfg = write_toml(raw, tmp_path / "node.toml")
    data = node.settings.node.data_dir
    before = files_under(data / "spool") + files_under(data / "outbox")
    r = run_cli("purge", "--dry-run", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "would delete 6 files" in r.stdout and "original" in r.stdout and "output" in r.stdout
    assert files_under(data / "spool") + files_under(data / "outbox") == before
    r = run_cli("purge", "--config", str(cfg))
    assert r.returncode == 0 and "deleted 6 files" in r.stdout, r.stdout + r.stderr
    assert not files_under(data / "spool") and not files_under(data / "outbox")


def test_files_no_row_names_are_deleted_after_the_grace_time(tmp_path, start_node):
    """A spooled file whose row was never committed (the node stopped between placing it
    and committing: never acknowledged) and an outbox file whose output row was never
    committed, both named as node.spool names files (digests), go once older than
    ORPHAN_GRACE_S; files rows name, hidden folders and younger orphans stay."""
    import os

    from node.spool import outbox_path, spool_path, write_atomic

    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"originals_days": -1, "outputs_days": -1, "quarantine_days": 30}
    node = start_node(raw, schedule=False, listen=False)
    data = node.settings.node.data_dir
    fill(node, tmp_path, 2)  # acknowledged, still RECEIVED: their files must stay
    spooled = files_under(data / "spool")
    assert len(spooled) == 2
    with node.sessions() as s:  # a row of before relative paths, the folder spelt as it was then
        first = s.scalars(select(Instance).order_by(Instance.id)).first()
        first.path = "/srv/old-mount/casemask/" + first.path
        s.commit()
    orphan = spool_path(data / "spool", "1.2.826.0.1.3680043.2.1125.9.1", "1.2.826.0.1.3680043.2.1125.9.1.1")
    young = spool_path(data / "spool", "1.2.826.0.1.3680043.2.1125.9.1", "1.2.826.0.1.3680043.2.1125.9.1.2")
    hidden = data / "spool" / ".incoming" / (orphan.name)
    out_orphan = outbox_path(data / "outbox", "chest", "2.25.1", "2.25.2")
    for p in (orphan, young, hidden, out_orphan):
        write_atomic(p, b"a DICOM object")
    week_ago = time.time() - 7 * 86400
    for p in (orphan, hidden, out_orphan, *spooled):
        os.utime(p, (week_ago, week_ago))
    assert retention.run(node.sessions, node.settings, dry_run=True).files == {"orphan": 1}  # outputs kept (-1): outbox not searched
    node.settings.retention.outputs_days = 0
    report = retention.run(node.sessions, node.settings)
    assert report.files == {"orphan": 2}
    assert not orphan.exists() and not out_orphan.exists()
    assert young.exists() and hidden.exists() and all(p.exists() for p in spooled)


def test_resend_of_a_purged_object_is_purged_again(tmp_path, start_node):
    """The C-STORE handler rewrites the file of an object sent again; once retention
    deleted the first copy, the second is deleted at the next run as well."""
    from node.spool import write_atomic

    node = start_node(node_config(tmp_path, [folder(tmp_path)]), schedule=False, listen=False)
    uid = fill(node, tmp_path, 1)[0]
    drain(node, until=lambda: delivery_states(node) == {"SENT": 1})
    retention.run(node.sessions, node.settings)
    with node.sessions() as s:
        inst = s.scalars(select(Instance)).one()
    path = data_path(node.settings.node.data_dir, inst.path)
    write_atomic(path, b"the same object again")  # what the handler does on a re-send
    with node.engine.begin() as conn:
        assert queue.on_resend(conn, uid) == ""
    retention.run(node.sessions, node.settings)
    assert not path.exists()


# -- 2. poison jobs ------------------------------------------------------------------------
def test_an_object_that_breaks_its_batch_is_quarantined_after_max_tries_alone(tmp_path, start_node):
    raw = pixel_config(tmp_path, [folder(tmp_path)])
    pixels = StandInPixels()
    node = start_node(raw, pixel_step=pixels, schedule=False, listen=False)
    a = fill(node, tmp_path, 4, name="a")
    b = fill(node, tmp_path, 3, name="b")
    pixels.poison = {a[1]}
    drain(node, until=lambda: job_states(node) == {"DONE": 6, "QUARANTINED": 1})
    with node.sessions() as s:
        bad = s.scalars(select(Job).where(Job.state == JobState.QUARANTINED)).one()
        assert bad.instance.sop_instance_uid == a[1]
        assert bad.attempts == 3
        assert bad.reason.startswith("gave up after 3 tries") and "pixels: RuntimeError" in bad.reason
        assert "crashed" not in bad.reason  # the exception's message is never a reason
        # The poison's study is not held up: its other objects went through (PARTIAL: one did not).
        assert s.scalar(select(Study.state).join(Instance).where(Instance.sop_instance_uid == a[0])) == StudyState.PARTIAL
    assert delivery_states(node) == {"SENT": 6}
    tries = [batch for batch in pixels.batches if a[1] in batch]
    assert len(tries) == 3 and tries[-1] == [a[1]]  # its last try ran alone
    assert len(b) == 3


class Crash(BaseException):
    """The worker process dies (as with SIGKILL): nothing after it runs."""


def test_a_crash_loop_ends_and_a_restart_takes_up_its_claims_at_once(tmp_path):
    """An object that kills the worker whenever it is processed: each restart takes up
    the previous run's claims at once (lease_s is 300 s), the tries run out, the
    object is quarantined and every other object is delivered."""
    raw = pixel_config(tmp_path, [folder(tmp_path)], lease_s=300.0)
    settings = parse(raw, "test", base_dir=tmp_path)
    pixels = StandInPixels(error=Crash())
    node = Node(settings, pixel_step=pixels)
    uids = fill(node, tmp_path, 5)
    pixels.poison = {uids[2]}
    node.route_stable(0)
    restarts = 0
    try:
        for _ in range(10):
            try:
                while node.pipeline.run_once():
                    pass
                break
            except Crash:
                node.stop()  # its claims stay PROCESSING, leased for 300 s
                node = Node(settings, pixel_step=pixels)
                restarts += 1
        node.tick(0)
        assert restarts == 3
        assert job_states(node) == {"DONE": 4, "QUARANTINED": 1}
        assert delivery_states(node) == {"SENT": 4}
        with node.sessions() as s:
            bad = s.scalars(select(Job).where(Job.state == JobState.QUARANTINED)).one()
            assert bad.instance.sop_instance_uid == uids[2]
            assert "gave up after 3 tries" in bad.reason and "lost its lease" in bad.reason
    finally:
        node.stop()


def test_transient_backend_and_outbox_errors_are_retried_and_never_counted(tmp_path, start_node, monkeypatch):
    import node.pipeline as pipeline_module

    raw = pixel_config(tmp_path, [folder(tmp_path)], max_job_attempts=1)
    pixels = StandInPixels(transient=3)
    node = start_node(raw, pixel_step=pixels, schedule=False, listen=False)
    fill(node, tmp_path, 3)
    real_write = pipeline_module.write_atomic
    full = {"left": 4}

    def disk_full_for_a_while(path, data):
        if full["left"] > 0:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(pipeline_module, "write_atomic", disk_full_for_a_while)
    drain(node, until=lambda: delivery_states(node) == {"SENT": 3})
    assert job_states(node) == {"DONE": 3}  # with max_job_attempts = 1, a counted try would have quarantined
    with node.sessions() as s:
        jobs = s.scalars(select(Job)).all()
    assert all(j.attempts <= 1 for j in jobs) and sum(j.deferrals for j in jobs) >= 3 * 3 + 1
    assert not list((node.settings.node.data_dir / "outbox").rglob(".*.tmp"))


# -- 3. leases -----------------------------------------------------------------------------
def test_an_expired_holder_can_neither_finish_nor_mark_sent(tmp_path, start_node, clock):
    node = start_node(node_config(tmp_path, [folder(tmp_path)], lease_s=10.0), schedule=False, listen=False)
    fill(node, tmp_path, 2)
    node.route_stable(0)
    with node.sessions() as s:
        mine = queue.claim_jobs(s, "a/1", 10.0)
        s.commit()
        assert len(mine) == 2 and queue.claim_jobs(s, "b/1", 10.0) == []  # held: nobody else gets them
    clock(seconds=11)
    with node.sessions() as s:
        theirs = queue.claim_jobs(s, "b/1", 10.0)
        s.commit()
        assert {j.id for j in theirs} == {j.id for j in mine}
    with node.sessions() as s:
        job = s.get(Job, mine[0].id)
        assert not queue.finish_job(s, job, [], ["f"], owner="a/1")
        assert not queue.quarantine_job(s, job, "x", owner="a/1")
        assert queue.renew_jobs(s, "a/1", [j.id for j in mine], 10.0) == 0
        s.commit()
        assert s.get(Job, mine[0].id).state == JobState.PROCESSING and s.get(Job, mine[0].id).owner == "b/1"
    # Deliveries: the same.
    node.pipeline.owner = "b/1"
    with node.sessions() as s:
        node.pipeline.process(s, list(s.scalars(select(Job))))
        s.commit()
    with node.sessions() as s:
        claimed = queue.claim_deliveries(s, "f", "a/1", 10.0)
        s.commit()
    clock(seconds=11)
    with node.sessions() as s:
        assert len(queue.claim_deliveries(s, "f", "b/1", 10.0)) == 2
        s.commit()
        assert queue.renew_deliveries(s, "a/1", [d.id for d in claimed], 10.0)[0] == set()
        assert not queue.mark_sent(s, claimed[0], "a/1")
        assert queue.mark_sent(s, claimed[0], "b/1")
        s.commit()


def test_a_lease_that_expires_mid_batch_sends_nothing_twice(tmp_path, start_node, archive_factory, clock):
    """Worker A sends a batch; after its 4th object the database clock passes its
    lease. A stops before the 5th object; worker B claims the rest and sends them. Every
    object reaches the archive once."""
    lease_s = 30.0

    def after(count: int) -> None:
        if count == 4:
            clock(seconds=lease_s * 2)  # A is (as if) paused past its lease

    archive = archive_factory(after_store=after)
    node = start_node(node_config(tmp_path, [dicom(archive)], lease_s=lease_s), schedule=False, listen=False)
    fill(node, tmp_path, 12)
    node.route_stable(0)
    while node.pipeline.run_once():
        pass
    a = node.dispatchers["pacs"]
    b = Dispatcher(node.settings, node.sessions, "pacs", owner="other-node/1")
    assert a.run_once() == 12
    with node.sessions() as s:
        sent_by_a = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state == DeliveryState.SENT))
    assert sent_by_a == 4
    assert b.run_once() == 8
    assert delivery_states(node) == {"SENT": 12}
    assert len(archive.received) == 12 and len(set(archive.received)) == 12


def test_a_long_batch_renews_its_lease(tmp_path, start_node):
    """A pixel step that takes longer than the lease: the batch keeps its claim (renewed
    in the background), so another worker gets nothing meanwhile, and it finishes."""
    # The lease is renewed every lease_s / 3: a lease of 0.6 s was lost whenever a
    # loaded machine held the renewing thread back for 0.4 s. 3 s leaves 2 s for that.
    raw = pixel_config(tmp_path, [folder(tmp_path)], lease_s=3.0)
    pixels = StandInPixels(sleep_s=7.5)
    node = start_node(raw, pixel_step=pixels, schedule=False, listen=False)
    fill(node, tmp_path, 3)
    node.route_stable(0)
    other = Pipeline(node.settings, node.sessions, node.pseudo, StandInPixels(), owner="other-node/1")
    stolen: list[int] = []

    def try_to_steal() -> None:
        time.sleep(6.0)  # twice the lease into the batch
        with node.sessions() as s:
            stolen.extend(j.id for j in queue.claim_jobs(s, other.owner, 3.0))
            s.commit()

    t = threading.Thread(target=try_to_steal)
    t.start()
    assert node.pipeline.run_once() == 3
    t.join()
    assert stolen == []
    assert job_states(node) == {"DONE": 3}


@pytest.mark.slow
@needs_dcmtk
def test_sigkill_while_processing_300_objects_recovers_in_seconds(tmp_path, archive_factory):
    """SIGKILL while the node processes 300 acknowledged objects; the restarted node
    takes up its previous run's claims at once (lease_s is 300 s) and delivers all of
    them well before that lease would have passed, each once."""
    archive = archive_factory()
    raw = node_config(tmp_path, [dicom(archive)], stable_after_s=0.5, lease_s=300.0, poll_interval_s=0.2, receivers=2)  # two receiving processes on every machine
    port = raw["node"]["port"]
    node = NodeProcess(write_toml(raw, tmp_path / "node.toml"), tmp_path / "node.log")
    files = make_study(tmp_path / "study", n=300)
    engine = database_engine(parse(raw, "test", base_dir=tmp_path))

    def processing() -> int:
        with engine.connect() as c:
            return c.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.PROCESSING))

    node.start(port)
    try:
        r = storescu(port, files)
        assert r.returncode == 0, r.stderr
        wait_until(processing, timeout=60, interval=0.02, what="jobs being processed")
        node.kill()
        assert processing() > 0 and len(archive.received) < 300, "the kill did not land during processing"
        node.start(port)
        # 30 s on a quiet machine; on a loaded 2-core one processing 300 objects takes
        # longer, but waiting out the claims' lease would take 300 s.
        wait_until(lambda: len(set(archive.received)) >= 300, timeout=150, what="all 300 objects at the archive well within the 300 s lease of the restart")
    finally:
        node.stop()
        engine.dispose()
    assert len(archive.received) - len(set(archive.received)) <= 1  # at most the one in flight at the kill
    assert "took up the previous run's claims" in (tmp_path / "node.log").read_text()


# -- 4. reasons without PHI ----------------------------------------------------------------
NAME = "Zebulon^Quixote^Marmaduke"


def test_a_step_failing_on_the_patient_name_leaves_it_in_no_reason_database_or_log(tmp_path, start_node, monkeypatch, caplog, request):
    """pydicom's value errors quote the value they choke on. A header step and a pixel
    step fail on an object whose PatientName is NAME: neither the database file nor the
    log holds the name afterwards."""
    from node.deid import Deidentifier

    caplog.set_level(logging.DEBUG)
    real_apply = Deidentifier.apply

    def apply(self, ds, extra_codes=()):
        if str(ds.get("PatientName", "")) == NAME:
            raise ValueError(f"Invalid value for VR PN: '{ds.PatientName}'")  # as pydicom words it
        return real_apply(self, ds, extra_codes)

    monkeypatch.setattr(Deidentifier, "apply", apply)
    phi = {"PatientName": NAME, "PatientID": "MRN-77"}
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"].append({"name": "px", "pixels": "anonymize", "allow_demonstration_model": True, "match": {"Modality": "CR"}, "destinations": ["f"]})
    raw["routes"][0]["match"] = {"Modality": "CT"}
    pixels = StandInPixels(error=RuntimeError(f"cannot decode the image of {NAME}"))
    node = start_node(raw, pixel_step=pixels, schedule=False, listen=False)
    fill(node, tmp_path, 1, name="h", phi=phi, modality="CT")
    pixels.poison = set(fill(node, tmp_path, 1, name="p", phi=phi, modality="CR"))
    drain(node, until=lambda: job_states(node) == {"QUARANTINED": 2})
    with node.sessions() as s:
        reasons = sorted(j.reason for j in s.scalars(select(Job)))
        inst_reasons = [i.reason for i in s.scalars(select(Instance))]
    assert any(r.startswith("headers: ValueError") for r in reasons), reasons
    assert any("pixels: RuntimeError" in r for r in reasons), reasons
    node.engine.dispose()  # close connections; the WAL may still hold pages: read it too
    data = node.settings.node.data_dir
    if node.settings.node.database_url:  # PostgreSQL: everything it stores, as pg_dump writes it
        stored = request.getfixturevalue("pg_cluster").dump(node.settings.node.database_url.rsplit("/", 1)[1])
    else:
        stored = b"".join(p.read_bytes() for p in data.glob("casemask.db*"))
    for part in [NAME, *NAME.split("^")]:
        assert part.encode() not in stored, f"{part!r} is in the database"
        assert part not in caplog.text, f"{part!r} is in the log"
        assert not any(part in r for r in reasons + inst_reasons)


def test_reasons_name_the_attribute_a_step_failed_on():
    from pydicom import Dataset

    from node.reasons import describe, scrub

    ds = Dataset()
    ds.PatientName = NAME

    def step(ds):
        for elem in ds:
            raise ValueError(f"bad value {elem.value!r}")

    try:
        step(ds)
    except ValueError as exc:
        assert describe("headers", exc) == "headers: ValueError at PatientName (0010,0010)"
        assert "Zebulon" not in scrub(str(exc), ds) and "Marmaduke" not in scrub(str(exc), ds)


# -- 6. the secret -------------------------------------------------------------------------
def test_a_database_made_with_another_secret_refuses_to_start(tmp_path):
    raw = node_config(tmp_path, [folder(tmp_path)])
    settings = parse(raw, "test", base_dir=tmp_path)
    Node(settings, pixel_step=None).stop()
    key = settings.node.data_dir / "secret.key"
    key.write_text("ab" * 32 + "\n")  # another secret (a restore from the wrong backup, say)
    with pytest.raises(StartupError, match="another pseudonym secret"):
        Node(settings, pixel_step=None)
    r = run_cli("serve", "--config", str(write_toml(raw, tmp_path / "node.toml")))
    assert r.returncode == 2
    assert "another pseudonym secret" in r.stderr and "secret_path or secret_env" in r.stderr
    assert "ab" * 16 not in r.stderr  # the secret itself is never shown


def test_a_lost_secret_file_is_not_replaced_by_a_new_one(tmp_path):
    """A database made with a secret whose file is gone: start-up refuses and writes no
    new secret (a stray key where the admin restores the right one); the message says
    to restore it. With the file restored the node starts."""
    raw = node_config(tmp_path, [folder(tmp_path)])
    settings = parse(raw, "test", base_dir=tmp_path)
    Node(settings, pixel_step=None).stop()
    key = settings.node.data_dir / "secret.key"
    kept = key.read_bytes()
    key.unlink()
    with pytest.raises(StartupError, match="is missing") as exc:
        Node(settings, pixel_step=None)
    assert "restore the file from your backup" in str(exc.value)
    assert not key.exists()
    r = run_cli("serve", "--config", str(write_toml(raw, tmp_path / "node.toml")))
    assert r.returncode == 2 and "is missing" in r.stderr, r.stderr[-500:]
    assert not key.exists()
    key.write_bytes(kept)
    key.chmod(0o600)
    Node(settings, pixel_step=None).stop()


def test_deid_beside_a_node_reads_the_node_secret_and_never_makes_one(tmp_path):
    """`casemask deid --config NODE.toml` pseudonymises with the node's secret: from its
    secret_env (before, it made a random secret.key in the data folder and every
    pseudonym differed from the node's), and never a new file for a database made with
    a secret whose file is missing."""
    import os

    files = make_study(tmp_path / "in", 1)
    raw = node_config(tmp_path, [folder(tmp_path)], secret_env="CASEMASK_TEST_SECRET")
    cfg = write_toml(raw, tmp_path / "env.toml")
    env = {**os.environ, "CASEMASK_TEST_SECRET": "12" * 32}
    r = run_cli("deid", "--config", str(cfg), "--out", str(tmp_path / "by-env"), str(files[0]), env=env)
    assert r.returncode == 0, r.stderr[-800:]
    settings = parse(raw, "test", base_dir=tmp_path)
    assert not (settings.node.data_dir / "secret.key").exists()
    key = tmp_path / "same.key"
    key.write_text("12" * 32 + "\n")
    key.chmod(0o600)
    r = run_cli("deid", "--secret", str(key), "--out", str(tmp_path / "by-file"), str(files[0]))
    assert r.returncode == 0, r.stderr[-800:]
    (a,), (b,) = (list((tmp_path / d).rglob("*.dcm")) for d in ("by-env", "by-file"))
    assert dcmread(a).PatientID == dcmread(b).PatientID != dcmread(files[0]).PatientID

    raw = node_config(tmp_path / "n2", [folder(tmp_path)])
    settings = parse(raw, "test", base_dir=tmp_path)
    Node(settings, pixel_step=None).stop()
    (settings.node.data_dir / "secret.key").unlink()
    r = run_cli("deid", "--config", str(write_toml(raw, tmp_path / "n2.toml")), "--out", str(tmp_path / "lost"), str(files[0]))
    assert r.returncode == 2 and "is missing" in r.stderr, r.stderr[-800:]
    assert not (settings.node.data_dir / "secret.key").exists()


def test_secret_from_an_environment_variable(tmp_path, monkeypatch):
    raw = node_config(tmp_path, [folder(tmp_path)], secret_env="CASEMASK_TEST_SECRET")
    settings = parse(raw, "test", base_dir=tmp_path)
    monkeypatch.delenv("CASEMASK_TEST_SECRET", raising=False)
    with pytest.raises(StartupError, match="not set"):
        Node(settings, pixel_step=None)
    monkeypatch.setenv("CASEMASK_TEST_SECRET", "12" * 32)
    Node(settings, pixel_step=None).stop()
    assert not (settings.node.data_dir / "secret.key").exists()  # never written to disk
    monkeypatch.setenv("CASEMASK_TEST_SECRET", "34" * 32)
    with pytest.raises(StartupError, match="another pseudonym secret"):
        Node(settings, pixel_step=None)


def test_new_settings_are_strictly_typed_with_hints():
    with pytest.raises(ConfigError) as exc:
        parse({"node": {"max_job_attempts": 0, "secret_env": "1BAD", "node_id": "a b"}, "retention": {"originals_days": "0", "quarantine_days": -5, "interval_s": 0}})
    text = str(exc.value)
    for expected in ("max_job_attempts", "secret_env", "node_id", "originals_days", "quarantine_days", "interval_s", "-1 keeps"):
        assert expected in text, expected
    with pytest.raises(ConfigError, match="keep one of them"):
        parse({"node": {"secret_path": "k", "secret_env": "CASEMASK_SECRET"}})


# -- 7. held objects -----------------------------------------------------------------------
@needs_dcmtk
def test_held_objects_are_routed_again_when_routes_change(tmp_path, start_node):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["match"] = {"Modality": "MR"}
    node = start_node(raw, schedule=False)
    port = node.settings.node.port
    files = make_study(tmp_path / "s", 2)
    assert storescu(port, files).returncode == 0
    node.tick(0)
    assert {i.state for i in node.sessions().scalars(select(Instance))} == {InstanceState.HELD}
    # A re-send of a held object with the routes changed (a reload): it is routed again.
    node.settings.routes[0].match = {"Modality": "CT"}
    assert storescu(port, files[:1]).returncode == 0
    drain(node, until=lambda: delivery_states(node) == {"SENT": 1})
    # A restart with the new routes takes up the other held object.
    node.stop()
    restarted = Node(node.settings, pixel_step=None)
    try:
        drain(restarted, until=lambda: delivery_states(restarted) == {"SENT": 2})
    finally:
        restarted.stop()


def test_retry_held_routes_held_objects_again(tmp_path, start_node):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["match"] = {"Modality": "MR"}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 2)
    node.tick(0)
    r = run_cli("retry", "--held", "--config", str(write_toml(raw, tmp_path / "node.toml")))
    assert r.returncode == 0 and "2 held objects" in r.stdout, r.stdout + r.stderr
    with node.sessions() as s:
        assert {i.state for i in s.scalars(select(Instance))} == {InstanceState.RECEIVED}
    node.tick(0)  # same routes: held again, nothing lost
    with node.sessions() as s:
        assert {i.state for i in s.scalars(select(Instance))} == {InstanceState.HELD}


# -- 8. logs -------------------------------------------------------------------------------
@needs_dcmtk
def test_an_outage_is_logged_as_state_changes_not_per_object(tmp_path, start_node, archive_factory, caplog):
    port = free_port()
    # Refused at once while down; once up, a timeout on a slow answer (a loaded machine)
    # would log the destination down again.
    dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": port, "timeout_s": 30.0}
    node = start_node(node_config(tmp_path, [dest]))
    caplog.set_level(logging.INFO, logger="node")
    n = 40
    assert storescu(node.settings.node.port, make_study(tmp_path / "s", n)).returncode == 0

    def tried_three_times() -> bool:
        with node.sessions() as s:
            return s.scalar(select(func.count()).select_from(Delivery)) == n and s.scalar(select(func.min(Delivery.attempts))) >= 3

    wait_until(tried_three_times, timeout=60, what="three delivery attempts of every object")
    archive_factory(port=port)
    wait_until(lambda: delivery_states(node) == {"SENT": n}, timeout=60, what="all SENT after the archive came up")

    def about_pacs() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("node.") and ("pacs" in r.getMessage() or "deliver" in r.getMessage())]

    # The dispatcher logs a batch's outcome after committing its states: wait for that line.
    wait_until(lambda: any("back up" in m for m in about_pacs()), timeout=10, what="the 'back up' line")
    about = about_pacs()
    assert any("down" in m for m in about) and any("back up" in m for m in about), about
    assert len(about) <= 4, about  # not one line per object per attempt (that was 3 x 40 here)


def test_logs_never_name_an_original_uid(tmp_path, start_node, caplog):
    caplog.set_level(logging.DEBUG)
    node = start_node(node_config(tmp_path, [folder(tmp_path)]), schedule=False, listen=False)
    files = make_study(tmp_path / "s", 3)
    originals = set()
    for f in files:
        ds = dcmread(f)
        receive(node, ds)
        originals |= {str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)}
    drain(node, until=lambda: delivery_states(node) == {"SENT": 3})
    retention.run(node.sessions, node.settings)
    ours = ("node.queue", "node.pipeline", "node.dispatch", "node.retention", "node.app", "node.scheduler", "node.leases")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(ours))
    assert "instance" in text and "h:" in text  # rows are named, with the keyed hash
    for uid in originals:
        assert uid not in text


def test_node_ids_are_kept_and_owner_tokens_are_per_process(tmp_path):
    from node.leases import node_identity, owner_token

    data = tmp_path / "var"
    data.mkdir()
    first = node_identity(data)
    assert node_identity(data) == first and (data / "node-id").stat().st_mode & 0o777 == 0o600
    assert node_identity(data, "node-b") == "node-b"
    a, b = owner_token(first), owner_token(first)
    assert a != b and a.startswith(first + "/") and b.startswith(first + "/")


def test_warnings_reach_the_log_without_their_text(caplog):
    """pydicom warns about an invalid value by quoting it; a serving node logs where the
    warning came from and its category only."""
    import warnings

    from node.reasons import WithheldWarnings, withhold_warning_texts

    logger = logging.getLogger("py.warnings")
    try:
        withhold_warning_texts()
        with caplog.at_level(logging.WARNING, logger="py.warnings"), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"Invalid value for VR PN: '{NAME}'", UserWarning)
        assert "UserWarning at test_lifecycle.py" in caplog.text
        assert "Zebulon" not in caplog.text
    finally:  # global state restored
        logging.captureWarnings(False)
        for f in [f for f in logger.filters if isinstance(f, WithheldWarnings)]:
            logger.removeFilter(f)


def _as_node(settings, node_id: str):
    """``settings`` with another ``[node] node_id`` (a second node on the same database
    and data folder)."""
    return settings.model_copy(update={"node": settings.node.model_copy(update={"node_id": node_id})})


def test_the_start_up_sweep_drops_only_its_own_earlier_rows(tmp_path, start_node):
    """A row whose spool file is missing, older than the grace time, is dropped at start
    only by a later run of the node that wrote it: another node sharing the database
    and data folder leaves it alone (its writer may still be renaming the file into
    place on a slow shared file system), and so does the writer's own live process."""
    from node.app import SPOOL_GRACE_S

    raw = node_config(tmp_path, [folder(tmp_path)], stable_after_s=3600, node_id="ingest-a")
    writer = start_node(raw, schedule=False, listen=False)
    for f in make_study(tmp_path / "s", 2):
        receive(writer, dcmread(f))
    with writer.sessions() as s:
        first = s.scalars(select(Instance).order_by(Instance.id)).first()
        first_study = first.study_id
        data_path(writer.settings.node.data_dir, first.path).unlink()
        for inst in s.scalars(select(Instance)):
            inst.received_at -= dt.timedelta(seconds=SPOOL_GRACE_S + 1)
        s.commit()
    assert writer.sweep_unspooled() == 0  # the live writer: its own rows of this run
    other = Node(_as_node(writer.settings, "ingest-b"), pixel_step=None, role="ingest")
    try:
        assert other.sweep_unspooled() == 0
        with other.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 2
    finally:
        other.stop()
    writer.stop()
    again = Node(writer.settings, pixel_step=None, role="ingest")  # ingest-a's next run sweeps at start
    try:
        with again.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 1
            # The dropped row is audited against its study, as a torn file's is.
            entries = list(s.scalars(select(db.AuditEvent).where(db.AuditEvent.event == "spool-dropped")))
            assert [(e.study_id, e.object_kind) for e in entries] == [(first_study, "original")]
            detail = json.loads(entries[0].detail)
            assert detail["instances"] == 1 and "never written" in detail["reason"]
    finally:
        again.stop()


def test_the_start_up_sweep_drops_nothing_when_more_files_are_missing_than_could_be_in_flight(tmp_path, start_node, caplog):
    """At most one C-STORE per association is under way when a node stops, so at most
    max_associations rows can lack their file because of it. When more do (the data
    folder is not mounted, the files were moved), they are acknowledged objects: the
    next run drops none of them, says so, and routing quarantines them; once the folder
    is back, casemask retry --quarantined routes them again: nothing is lost."""
    from node.app import SPOOL_GRACE_S

    raw = node_config(tmp_path, [folder(tmp_path)], stable_after_s=3600, node_id="ingest-a", max_associations=2)
    writer = start_node(raw, schedule=False, listen=False)
    for f in make_study(tmp_path / "s", 3):
        receive(writer, dcmread(f))
    data = writer.settings.node.data_dir
    (data / "spool").rename(data / "spool-elsewhere")  # the data folder as seen without its mount
    with writer.sessions() as s:
        for inst in s.scalars(select(Instance)):
            inst.received_at -= dt.timedelta(seconds=SPOOL_GRACE_S + 1)
        s.commit()
    writer.stop()
    with caplog.at_level(logging.ERROR, logger="node.queue"):
        again = Node(writer.settings, pixel_step=None)
    try:
        assert again.sweep_unspooled() == 0
        with again.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 3
        assert "3 received objects of this node's earlier runs have no spool file" in caplog.text
        again.tick(0)
        with again.sessions() as s:
            assert {(i.state, i.reason) for i in s.scalars(select(Instance))} == {(InstanceState.QUARANTINED, queue.SPOOL_FILE_MISSING)}
        (data / "spool-elsewhere").rename(data / "spool")  # the folder is back
        from node.service import cli_principal

        assert again.service.retry_quarantined(cli_principal()) == 3  # casemask retry --quarantined
        drain(again, until=lambda: delivery_states(again) == {"SENT": 3})
    finally:
        again.stop()


def test_two_workers_routing_at_once_route_each_study_once(tmp_path, start_node):
    """Two workers on one database route the same stable studies at the same time: each
    study is routed by one of them (claimed per study), every instance gets exactly one
    job per route, and neither fails on the jobs' unique key."""
    raw = node_config(tmp_path, [folder(tmp_path)], stable_after_s=3600, node_id="work-a")
    first = start_node(raw, schedule=False, listen=False)
    second = Node(_as_node(first.settings, "work-b"), pixel_step=None, role="worker")
    try:
        for k in range(8):
            for f in make_study(tmp_path / f"s{k}", 3):
                receive(first, dcmread(f))
        routed: dict[str, int] = {}
        errors: list[BaseException] = []
        go = threading.Barrier(2)

        def route(name: str, n: Node) -> None:
            try:
                go.wait(10)
                routed[name] = n.route_stable(0)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=route, args=(name, n)) for name, n in (("a", first), ("b", second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert sum(routed.values()) == 24, routed  # instances routed, by one worker each
        with first.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Job)) == 24
            assert s.scalar(select(func.count(func.distinct(Job.instance_id))).select_from(Job)) == 24
            assert set(s.scalars(select(Study.state))) == {StudyState.ROUTED}
    finally:
        second.stop()


def test_a_pseudonym_mapping_written_by_two_workers_is_kept_once(tmp_path, start_node):
    """Two workers that worked objects of one study write the same mappings: the second
    insert does not fail its batch on the unique constraint (ON CONFLICT), and the
    first mapping stays."""
    from threading import Thread

    from node.db import Pseudonym
    from node.mapping import save

    node = start_node(node_config(tmp_path, [folder(tmp_path)]), schedule=False, listen=False)
    first = [{"kind": "uid", "old": "1.2.826.0.1.3680043.8.498.77", "new": "2.25.1"}]
    second = [{"kind": "uid", "old": "1.2.826.0.1.3680043.8.498.77", "new": "2.25.2"}, {"kind": "uid", "old": "1.2.826.0.1.3680043.8.498.78", "new": "2.25.3"}]
    errors: list[BaseException] = []
    with node.sessions() as a:
        save(a, first)  # not committed yet: the other worker's insert waits for it (PostgreSQL)

        def other() -> None:
            try:
                with node.sessions() as b:
                    save(b, second)
                    b.commit()
            except BaseException as exc:  # reported below
                errors.append(exc)

        t = Thread(target=other)
        t.start()
        time.sleep(0.5)
        a.commit()
        t.join(60)
    assert not errors, errors
    with node.sessions() as s:
        assert dict(s.execute(select(Pseudonym.old, Pseudonym.new)).all()) == {"1.2.826.0.1.3680043.8.498.77": "2.25.1", "1.2.826.0.1.3680043.8.498.78": "2.25.3"}
