"""The data lifecycle's nevers, found open by reviews and closed here:

1. every deletion of patient data by retention leaves an audit entry (study by row id,
   the count, the setting; no identifier), for every kind it deletes;
2. originals kept for a FAILED delivery (dead letter) are counted and aged where an
   admin looks (``casemask status``, the API's status, ``casemask purge``, a daily log
   warning), and ``[retention] failed_days`` deletes them, audited;
3. ``casemask purge`` says what it deleted per kind and which setting made it due;
4. a re-send racing the retention run that deletes its held original is never lost;
5. a study received before revision 0004 (no ``patient_key``) takes its patient from
   the objects it already holds, not from the first object routed after the upgrade;
6. the audit trail has a retention (``audit_days``), audited itself, and the database
   refuses to delete an entry younger than 365 days.

Tests talk to a real node (in-process, dcmtk's storescu as the modality) on SQLite and
on PostgreSQL; only the clock is mocked."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from node import queue, retention
from node.db import AuditEvent, Delivery, DeliveryState, Instance, InstanceState, data_path
from tests.conftest import PHI, ROOT, make_study, needs_dcmtk, node_config, write_toml
from tests.test_lifecycle import clock, delivery_states, drain, fill, folder  # noqa: F401  (clock is a fixture)
from tests.test_never import both_clocks, instances, storescu, uids_of  # noqa: F401  (both_clocks is a fixture)

pytestmark = pytest.mark.usefixtures("database")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def audit_entries(node, prefix: str = "") -> list[tuple[str, int | None, dict]]:
    with node.sessions() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.event.like(f"{prefix}%")).order_by(AuditEvent.id)).all()
    return [(e.event, e.study_id, json.loads(e.detail)) for e in rows]


def study_of(node, uid: str) -> int:
    return instances(node)[uid].study_id


def no_phi(entries) -> None:
    said = json.dumps(entries)
    assert not any(v in said for v in PHI.values())


# -- 1 and 3. every kind retention deletes is audited; purge says per kind and setting -----------
def test_every_kind_retention_deletes_is_audited_and_purge_names_each_setting(tmp_path, start_node):
    """Delivered originals and outputs, a quarantined original, a held original and a
    file no row names, all due at once (days 0): ``casemask purge`` deletes them, says
    per kind how many and which setting, and each deletion has its audit entry (per
    study and kind, the count and the setting); before, only held ones were audited and
    the summary named quarantine_days alone."""
    from node.spool import spool_path, write_atomic

    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["match"] = {"Modality": ["CT", "US"]}  # MR matches no route: held
    raw["retention"] = {"originals_days": 0, "outputs_days": 0, "quarantine_days": 0, "held_days": 0}
    node = start_node(raw, schedule=False, listen=False)
    delivered = fill(node, tmp_path, 2, name="a")
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    (quarantined,) = fill(node, tmp_path, 1, name="b", modality="US")  # burned-in text likely, pixels not cleaned: quarantined
    (held,) = fill(node, tmp_path, 1, name="c", modality="MR")
    node.tick(0)
    rows = instances(node)
    assert rows[quarantined].state == InstanceState.QUARANTINED and rows[held].state == InstanceState.HELD
    data = node.settings.node.data_dir
    orphan = spool_path(data / "spool", "1.2.826.0.1.3680043.2.1125.9.1", "1.2.826.0.1.3680043.2.1125.9.1.1")
    write_atomic(orphan, b"a DICOM object never acknowledged")
    week_ago = time.time() - 7 * 86400
    os.utime(orphan, (week_ago, week_ago))

    cfg = write_toml(raw, tmp_path / "node.toml")
    r = run_cli("purge", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert "deleted 7 files" in r.stdout, r.stdout
    for kind, n, setting in (("original", 2, "originals_days = 0"), ("output", 2, "outputs_days = 0"), ("quarantined", 1, "quarantine_days = 0"),
                             ("held", 1, "held_days = 0"), ("orphan", 1, "no row names them for 24 h")):
        assert kind in lines and f" {n} files" in lines[kind] and setting in lines[kind], r.stdout

    entries = audit_entries(node, "")
    purged = [(e, s, d) for e, s, d in entries if e.endswith("-purged") and e != "mapping-purged"]
    assert sorted(purged, key=lambda x: (x[0], x[1] or 0)) == sorted([
        ("originals-purged", study_of(node, delivered[0]), {"instances": 2, "originals_days": 0}),
        ("outputs-purged", study_of(node, delivered[0]), {"outputs": 2, "outputs_days": 0}),
        ("quarantined-purged", study_of(node, quarantined), {"instances": 1, "quarantine_days": 0}),
        ("held-purged", study_of(node, held), {"instances": 1, "held_days": 0}),
        ("orphans-purged", None, {"files": 1, "grace_h": 24}),
    ], key=lambda x: (x[0], x[1] or 0))
    no_phi(entries)
    assert not orphan.exists() and all(instances(node)[u].purged_at is not None for u in (*delivered, quarantined, held))


# -- 2. dead letters: visible, and deleted (audited) only when failed_days says so ------------------
def failing(tmp_path: Path) -> dict:
    """A DICOM destination nobody listens at: every delivery FAILED after one attempt."""
    from tests.conftest import free_port

    return {"name": "gone", "kind": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "timeout_s": 2.0}


def test_originals_of_failed_deliveries_are_counted_aged_warned_and_deleted_only_after_failed_days(tmp_path, start_node, clock, caplog):
    raw = node_config(tmp_path, [failing(tmp_path)], max_job_attempts=3)
    raw["node"]["max_attempts"] = 1
    node = start_node(raw, schedule=False, listen=False)
    assert node.settings.retention.failed_days == -1, "the default keeps dead letters (an acknowledged object is never lost silently)"
    uids = fill(node, tmp_path, 2)
    drain(node, until=lambda: delivery_states(node) == {"FAILED": 2})
    data = node.settings.node.data_dir
    paths = [data_path(data, i.path) for i in instances(node).values()]
    clock(days=400)
    caplog.set_level(logging.WARNING, logger="node.retention")
    report = retention.run(node.sessions, node.settings)
    assert report.deleted == 0 and all(p.exists() for p in paths), "kept: failed_days = -1"
    assert report.failed_kept.count == 2 and report.failed_kept.oldest_days >= 399
    warned = [r for r in caplog.records if "FAILED delivery" in r.getMessage()]
    assert len(warned) == 1 and "2 originals" in warned[0].getMessage()
    retention.run(node.sessions, node.settings)
    assert len([r for r in caplog.records if "FAILED delivery" in r.getMessage()]) == 1, "once a day, not every run"

    from node.service import Service

    status = Service(node.settings, node.sessions).status()
    assert status["dead_letters"]["originals"] == 2 and status["dead_letters"]["oldest_days"] >= 399

    cfg = write_toml(raw, tmp_path / "node.toml")
    r = run_cli("status", "--config", str(cfg))
    assert r.returncode == 0 and "2 originals with a FAILED delivery" in r.stdout and "failed_days = -1" in r.stdout, r.stdout + r.stderr
    raw["retention"] = {"failed_days": 30}
    cfg = write_toml(raw, tmp_path / "node.toml")
    r = run_cli("purge", "--dry-run", "--config", str(cfg))  # the node's clock is not moved in a subprocess: only today's ages
    assert r.returncode == 0 and "kept" in r.stdout and "2 originals with a FAILED delivery" in r.stdout, r.stdout + r.stderr
    raw["retention"] = {"failed_days": 0}
    r = run_cli("purge", "--dry-run", "--config", str(write_toml(raw, tmp_path / "node.toml")))
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert "would delete 4 files" in r.stdout and "failed_days = 0" in lines["failed"] and " 2 files" in lines["failed-output"], r.stdout + r.stderr

    node.settings.retention.failed_days = 500
    assert retention.run(node.sessions, node.settings).deleted == 0, "not yet 500 days"
    node.settings.retention.failed_days = 30
    dry = retention.run(node.sessions, node.settings, dry_run=True)
    assert dict(dry.files) == {"failed": 2, "failed-output": 2}
    report = retention.run(node.sessions, node.settings)
    assert dict(report.files) == {"failed": 2, "failed-output": 2} and not any(p.exists() for p in paths)
    assert retention.setting_of("failed", node.settings) == "failed_days = 30"
    study = study_of(node, uids[0])
    assert sorted(audit_entries(node, "failed-purged"), key=lambda e: sorted(e[2])) == [
        ("failed-purged", study, {"failed_days": 30, "instances": 2}), ("failed-purged", study, {"failed_days": 30, "outputs": 2})]
    with node.sessions() as s:
        assert queue.requeue_failed(s) == 0, "nothing left to send"
        assert {d.state for d in s.scalars(select(Delivery))} == {DeliveryState.FAILED}
    assert retention.run(node.sessions, node.settings).failed_kept.count == 0


def test_a_dead_letter_requeued_while_retention_plans_its_deletion_keeps_its_files(tmp_path, start_node, clock, monkeypatch):
    """An operator re-queues the FAILED deliveries (``casemask retry``) between retention's
    plan and its deletion: their originals and outputs are owed again and stay."""
    raw = node_config(tmp_path, [failing(tmp_path)])
    raw["node"]["max_attempts"] = 1
    raw["retention"] = {"failed_days": 30}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 1)
    drain(node, until=lambda: delivery_states(node) == {"FAILED": 1})
    clock(days=31)
    real_plan = retention.plan

    def plan_then_requeue(session, settings, now=None, limit=1000):
        due = real_plan(session, settings, now, limit)
        if due:
            session.rollback()
            with node.sessions() as s:
                assert queue.requeue_failed(s) == 1
                s.commit()
        return due

    monkeypatch.setattr(retention, "plan", plan_then_requeue)
    assert retention.run(node.sessions, node.settings).deleted == 0
    assert delivery_states(node) == {"PENDING": 1}
    (inst,) = instances(node).values()
    assert inst.purged_at is None and data_path(node.settings.node.data_dir, inst.path).exists()


# -- 4. a re-send racing the purge of its held original ----------------------------------------------
@needs_dcmtk
def test_a_resend_racing_the_held_purge_is_never_lost(tmp_path, start_node, both_clocks, monkeypatch):
    """Retention has planned to delete a held study's originals when the modality sends
    the study again (routes now take it; the re-send is answered Success, so the
    modality may delete its copy). Made deterministic by ordering: the re-send runs to
    its end between the plan and the deletion. The objects must be routed and
    delivered, not QUARANTINED "file missing" (before: the planned files were deleted
    under the re-sent rows)."""
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["match"] = {"Modality": "MR"}  # the CT objects are held
    node = start_node(raw, schedule=False)
    study = make_study(tmp_path / "s", 2)
    assert storescu(node.settings.node.port, study).returncode == 0
    node.tick(0)
    assert {i.state for i in instances(node).values()} == {InstanceState.HELD}
    both_clocks(days=31)

    real_plan = retention.plan
    sent = []

    def plan_then_resend(session, settings, now=None, limit=1000):
        due = real_plan(session, settings, now, limit)
        if due and not sent:
            session.rollback()  # the plan's read ends (SQLite: no lock held), as between two statements
            node.settings.routes[0].match = {"Modality": "CT"}
            sent.append(storescu(node.settings.node.port, study))
        return due

    monkeypatch.setattr(retention, "plan", plan_then_resend)
    report = retention.run(node.sessions, node.settings)
    assert sent and sent[0].returncode == 0, "the re-send was answered Success"
    assert report.deleted == 0, "the re-sent objects are no longer held: their files stay"
    monkeypatch.setattr(retention, "plan", real_plan)
    ended = {InstanceState.PROCESSED, InstanceState.QUARANTINED, InstanceState.HELD}
    drain(node, until=lambda: {i.state for i in instances(node).values()} <= ended and not {"PENDING", "SENDING"} & set(delivery_states(node)))
    rows = instances(node)
    assert {(i.state, i.reason) for i in rows.values()} == {(InstanceState.PROCESSED, "")}
    assert delivery_states(node) == {"SENT": 2}
    assert not audit_entries(node, "held-purged")


@needs_dcmtk
def test_a_resend_that_saw_the_file_before_the_purge_claimed_it_is_not_lost(tmp_path, start_node, both_clocks, monkeypatch):
    """The other order of the race above: the C-STORE handler has found the held file in
    place, and retention claims the row and deletes the file before the handler records
    the re-send. Made deterministic by running retention just before the handler takes
    the row's lock (queue.lock_instance), after it found the file in place."""
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["match"] = {"Modality": "MR"}
    node = start_node(raw, schedule=False)
    study = make_study(tmp_path / "s", 1)
    assert storescu(node.settings.node.port, study).returncode == 0
    node.tick(0)
    both_clocks(days=31)
    real = queue.lock_instance
    ran = []

    def purge_first(conn, sop_instance_uid):
        if not ran:
            ran.append(retention.run(node.sessions, node.settings).deleted)
        return real(conn, sop_instance_uid)

    monkeypatch.setattr(queue, "lock_instance", purge_first)
    node.settings.routes[0].match = {"Modality": "CT"}
    assert storescu(node.settings.node.port, study).returncode == 0, "answered Success"
    assert ran == [1]
    monkeypatch.setattr(queue, "lock_instance", real)
    ended = {InstanceState.PROCESSED, InstanceState.QUARANTINED, InstanceState.HELD}
    drain(node, until=lambda: {i.state for i in instances(node).values()} <= ended)
    assert {(i.state, i.reason) for i in instances(node).values()} == {(InstanceState.PROCESSED, "")}


# -- 5. studies received before revision 0004 ---------------------------------------------------------
OTHER = {**PHI, "PatientID": "MRN-55500011", "PatientName": "Roe^Richard"}


def _back_to_revision_0003(node) -> None:
    """The node's database as revision 0003 left it: no ``studies.patient_key``."""
    from alembic import command

    from node import schema
    from tests.conftest import database_engine

    engine = database_engine(node)
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":  # the column goes by rebuilding the table (as node.schema upgrades)
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        command.downgrade(schema._config(conn), "0003")
        assert schema.current_revision(conn) == "0003"
        conn.commit()
    engine.dispose()


@needs_dcmtk
def test_a_study_from_before_revision_0004_takes_its_patient_from_its_stored_objects(tmp_path, start_node):
    """A study routed while the database was at revision 0003 (no patient_key), then
    ``casemask db upgrade``: another patient's object sent first under that Study
    Instance UID is quarantined instead of taking the study (before: it set the study's
    patient, was delivered as part of it, and the first patient's own amendment was then
    quarantined). Where the study's originals are gone already, nothing joins it."""
    from pydicom import dcmread

    from node.db import Study

    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"originals_days": -1}  # the first study's original is still kept
    node = start_node(raw, schedule=False, listen=False)
    first = make_study(tmp_path / "a", 1)
    gone = make_study(tmp_path / "g", 1)
    for f in first + gone:
        from tests.conftest import receive

        receive(node, dcmread(f))
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    with node.sessions() as s:  # the second study's original was deleted by retention
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == uids_of(gone)[0])).one()
        data_path(node.settings.node.data_dir, inst.path).unlink()
        inst.purged_at = inst.state_changed_at
        s.commit()
    node.stop()
    _back_to_revision_0003(node)
    r = run_cli("db", "upgrade", "--config", str(write_toml(raw, tmp_path / "node.toml")))
    assert r.returncode == 0 and "0005" in r.stdout + r.stderr, r.stdout + r.stderr
    node = start_node(raw, schedule=False)
    with node.sessions() as s:
        assert {st.patient_key for st in s.scalars(select(Study))} == {None}, "as the upgrade left them"
    port = node.settings.node.port
    uid, gone_uid = (str(dcmread(f[0]).StudyInstanceUID) for f in (first, gone))
    intruder = make_study(tmp_path / "b", 1, study_uid=uid, phi=OTHER)
    later = make_study(tmp_path / "c", 1, study_uid=uid)
    into_gone = make_study(tmp_path / "d", 1, study_uid=gone_uid)
    settled = (InstanceState.QUARANTINED, InstanceState.PROCESSED)
    assert storescu(port, intruder + into_gone).returncode == 0
    drain(node, until=lambda: all(instances(node)[u].state in settled for u in uids_of(intruder + into_gone)))
    assert storescu(port, later).returncode == 0
    drain(node, until=lambda: instances(node)[uids_of(later)[0]].state in settled)
    rows = instances(node)
    assert (rows[uids_of(intruder)[0]].state, rows[uids_of(intruder)[0]].reason) == (InstanceState.QUARANTINED, queue.OTHER_PATIENT)
    assert rows[uids_of(later)[0]].state == InstanceState.PROCESSED, "the first patient's amendment joins its study"
    assert (rows[uids_of(into_gone)[0]].state, rows[uids_of(into_gone)[0]].reason) == (InstanceState.QUARANTINED, queue.STUDY_PATIENT_UNKNOWN)
    with node.sessions() as s:
        keys = {st.study_uid: st.patient_key for st in s.scalars(select(Study))}
    assert keys[uid].startswith("h:") and keys[gone_uid] == "unknown"


# -- 6. the audit trail's retention ---------------------------------------------------------------------
def test_audit_entries_go_after_audit_days_audited_and_the_database_keeps_younger_ones(tmp_path, start_node):
    from node import audit
    from node.config import parse

    raw = node_config(tmp_path, [folder(tmp_path)])
    node = start_node(raw, schedule=False, listen=False)
    assert node.settings.retention.audit_days == 2190, "six years by default"
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with node.sessions() as s:
        for years in (8, 7, 5, 0):
            e = audit.record(s, "node-started", actor="CASEMASK")
            e.at = now - dt.timedelta(days=365 * years + 1)
        s.commit()
    dry = retention.run(node.sessions, node.settings, dry_run=True)
    assert dry.audit_rows == 2
    report = retention.run(node.sessions, node.settings)
    assert report.audit_rows == 2
    left = audit_entries(node, "")
    assert [e for e, _, _ in left].count("node-started") >= 2  # 5 years and today's (and the node's own start)
    ((_, _, detail),) = [x for x in left if x[0] == "audit-purged"]
    assert detail["entries"] == 2 and detail["audit_days"] == 2190
    node.settings.retention.audit_days = 365 * 5 - 10  # would reach the 5-year-old entry
    assert retention.run(node.sessions, node.settings).audit_rows == 1
    node.settings.retention.audit_days = -1
    assert retention.run(node.sessions, node.settings).audit_rows == 0
    with pytest.raises(Exception, match="append-only"), node.engine.begin() as conn:  # the database keeps the last 365 days whatever a setting says
        conn.execute(text("DELETE FROM audit_events"))
    problems = []
    try:
        parse({**raw, "retention": {"audit_days": 30}}, "test", base_dir=tmp_path)
    except Exception as exc:  # ConfigError lists what to write
        problems.append(str(exc))
    assert problems and "365 or more" in problems[0]
