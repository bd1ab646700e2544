"""What the node keeps about patients, and for how long, beyond the files of
test_lifecycle: the pseudonym mapping ([retention] mapping_days), deliveries owed to a
destination that was removed from the configuration ([retention] unconfigured_days), the
state a study ends in when nothing of it was delivered, and the operator's quarantine
commands. Every test runs on SQLite and on PostgreSQL; only the clock is mocked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node import retention
from node.db import AuditEvent, Pseudonym
from tests.conftest import PHI, ROOT, STORESCU, dcmtk_env, make_study, needs_dcmtk, node_config, receive, write_toml
from tests.test_lifecycle import clock, delivery_states, drain, fill, folder  # noqa: F401  (clock is a fixture)

pytestmark = pytest.mark.usefixtures("database")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def mapping_rows(node) -> list[tuple[str, str]]:
    with node.sessions() as s:
        return list(s.execute(select(Pseudonym.kind, Pseudonym.old).order_by(Pseudonym.id)).all())


def patients(node) -> set[str]:
    return {json.loads(old)[1] for kind, old in mapping_rows(node) if kind == "patient"}


# -- 1. the pseudonym mapping --------------------------------------------------------------
def test_mapping_rows_go_mapping_days_after_last_met_and_the_deletion_is_audited(tmp_path, start_node, clock):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"mapping_days": 7}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 2, name="a")
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    first = mapping_rows(node)
    assert patients(node) == {PHI["PatientID"]} and len(first) > 3
    clock(days=5)
    fill(node, tmp_path, 1, name="b")  # the same patient comes back: the patient's rows are met again
    drain(node, until=lambda: delivery_states(node) == {"SENT": 3})
    assert retention.run(node.sessions, node.settings).mapping_rows == 0
    clock(days=3)  # 8 days after the first study, 3 after the second
    dry = retention.run(node.sessions, node.settings, dry_run=True)
    report = retention.run(node.sessions, node.settings)
    assert report.mapping_rows == dry.mapping_rows > 0
    left = mapping_rows(node)
    assert patients(node) == {PHI["PatientID"]}, "the patient met 3 days ago is still mapped"
    assert not {old for kind, old in first if kind.startswith("study/")} & {old for kind, old in left}, "the first study's UIDs are gone"
    clock(days=8)
    retention.run(node.sessions, node.settings)
    assert mapping_rows(node) == []
    with node.sessions() as s:
        entries = s.scalars(select(AuditEvent).where(AuditEvent.event == "mapping-purged").order_by(AuditEvent.id)).all()
    assert [json.loads(e.detail)["rows"] for e in entries] == [report.mapping_rows, len(left)]
    for e in entries:  # counts only: no identifier of the patient
        assert not any(v in e.detail + e.object_ref for v in PHI.values())


def test_mapping_days_zero_stores_no_mapping(tmp_path, start_node):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"mapping_days": 0}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 2)
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})  # de-identified and delivered all the same
    assert mapping_rows(node) == []


def test_mapping_days_minus_one_keeps_the_mapping(tmp_path, start_node, clock):
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"mapping_days": -1}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 1)
    drain(node, until=lambda: delivery_states(node) == {"SENT": 1})
    clock(days=3650)
    assert retention.run(node.sessions, node.settings).mapping_rows == 0 and patients(node) == {PHI["PatientID"]}


def test_config_check_says_what_retention_keeps_and_warns_about_a_mapping_kept_for_ever(tmp_path):
    raw = node_config(tmp_path, [folder(tmp_path)])
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "a.toml")))
    assert r.returncode == 0, r.stderr
    assert "pseudonym mapping (original Patient IDs, names, UIDs): deleted 30 days after" in r.stdout, r.stdout
    assert "mapping_days" not in r.stderr
    raw["retention"] = {"mapping_days": -1}
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "b.toml")))
    assert r.returncode == 0 and "kept for ever" in r.stdout
    assert "warning: [retention] mapping_days = -1" in r.stderr, r.stderr
    raw["retention"] = {"mapping_days": 0}
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "c.toml")))
    assert "not stored (mapping_days = 0)" in r.stdout, r.stdout


def test_db_upgrade_dates_the_mapping_rows_already_there(tmp_path):
    """A database of revision 0001 (no seen_at): `casemask db upgrade` gives its mapping
    rows the upgrade's time, so they are kept mapping_days from then, not deleted at once
    (nor kept for ever: retention deletes rows without a date)."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from node import schema

    url = f"sqlite:///{tmp_path / 'var' / 'casemask.db'}"
    (tmp_path / "var").mkdir()
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(schema._config(conn), "0001")
        conn.execute(text("INSERT INTO pseudonyms (kind, old, new) VALUES ('uid', '1.2.826.0.1.3680043.8.498.5', '2.25.5')"))
    engine.dispose()
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["node"]["database_url"] = url
    r = run_cli("db", "upgrade", "--config", str(write_toml(raw, tmp_path / "node.toml")))
    assert r.returncode == 0, r.stdout + r.stderr
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pseudonyms WHERE seen_at IS NOT NULL")).scalar() == 1
    engine.dispose()


# -- 2. deliveries owed to a destination that was removed ------------------------------------
def test_deliveries_to_a_removed_destination_are_unconfigured_then_given_up_unless_owed_elsewhere(tmp_path, start_node, clock):
    """Objects of study CT went to f and g, objects of study MR to f, g and h (h down).
    g is removed: its deliveries become UNCONFIGURED (seen in status), the files stay
    while they are owed; after unconfigured_days the CT original and output go, the MR
    ones stay (still owed to h, a configured destination). g back: what can still be
    sent is PENDING again, what retention deleted is FAILED with the reason."""
    from node.config import parse
    from node.db import Delivery, DeliveryState, Instance
    from node.service import Service
    from tests.conftest import free_port

    down = lambda name: {"name": name, "kind": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "timeout_s": 2.0}  # noqa: E731
    dests = [folder(tmp_path), down("g"), down("h")]
    deid = {"profile": "basic"}
    routes = [{"name": "ct", "match": {"Modality": ["CT"]}, "deid": deid, "destinations": ["f", "g"]},
              {"name": "mr", "match": {"Modality": ["MR"]}, "deid": deid, "destinations": ["f", "g", "h"]}]
    raw = node_config(tmp_path, dests, routes, max_attempts=2)
    raw["retention"] = {"originals_days": 0, "outputs_days": 0, "unconfigured_days": 30}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 1, name="ct", modality="CT")
    fill(node, tmp_path, 1, name="mr", modality="MR")
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2, "FAILED": 3})
    data = node.settings.node.data_dir
    spooled = lambda: len([p for p in (data / "spool").rglob("*.dcm")])  # noqa: E731
    retention.run(node.sessions, node.settings)
    assert spooled() == 2, "g and h are owed: nothing deleted"

    without_g = dict(raw, destinations=[d for d in dests if d["name"] != "g"],
                     routes=[dict(r, destinations=[n for n in r["destinations"] if n != "g"]) for r in routes])
    node.reload(parse(without_g, "test", base_dir=tmp_path))
    assert delivery_states(node) == {"SENT": 2, "FAILED": 1, "UNCONFIGURED": 2}
    counts = Service(node.settings, node.sessions).status()["counts"]
    assert counts["destination:g"] == {"UNCONFIGURED": 2}
    clock(days=29)
    retention.run(node.sessions, node.settings)
    assert spooled() == 2, "within unconfigured_days the originals stay"
    clock(days=2)
    report = retention.run(node.sessions, node.settings)
    assert report.files == {"original": 1, "output": 1}, report.files  # CT's; MR's are still owed to h
    with node.sessions() as s:
        kept = s.scalars(select(Instance).where(Instance.purged_at.is_(None))).all()
        assert [i.modality for i in kept] == ["MR"]

    node.reload(parse(raw, "test", base_dir=tmp_path))  # g is back
    with node.sessions() as s:
        rows = s.execute(select(Delivery.state, Delivery.reason).where(Delivery.destination == "g").order_by(Delivery.id)).all()
    assert [r.state for r in rows] == [DeliveryState.FAILED, DeliveryState.PENDING], rows  # CT's output was deleted, MR's can go
    assert "deleted by retention" in rows[0].reason


# -- 3. the state a study ends in --------------------------------------------------------------
def study_states(node) -> list[str]:
    from node.service import Service

    return [s["state"] for s in Service(node.settings, node.sessions).studies()]


def test_a_study_nothing_of_which_went_out_does_not_end_done(tmp_path, start_node):
    """All objects quarantined: QUARANTINED (status and the studies' view), not DONE;
    some quarantined and some processed: PARTIAL; the quarantined ones all discarded by
    an operator: IGNORED; every object processed: DONE."""
    from node.accounts import Principal
    from node.db import Job, JobState, Role
    from node.service import Service

    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["partial"] = "skip-object"
    node = start_node(raw, schedule=False, listen=False)
    uid = "1.2.826.0.1.3680043.8.498.4401"
    fill(node, tmp_path, 2, name="us", modality="US")  # burned-in text likely, the route does not clean pixels: quarantined
    drain(node, until=lambda: study_states(node) and set(study_states(node)) <= {"QUARANTINED", "DONE"})
    assert study_states(node) == ["QUARANTINED"]
    service = Service(node.settings, node.sessions)
    assert service.status()["counts"]["studies"] == {"QUARANTINED": 1}
    for item in make_study(tmp_path / "mix-ct", 1, study_uid=uid, modality="CT") + make_study(tmp_path / "mix-us", 1, study_uid=uid, modality="US"):
        receive(node, dcmread(item))
    drain(node, until=lambda: "PARTIAL" in study_states(node))
    fill(node, tmp_path, 1, name="ct", modality="CT")
    drain(node, until=lambda: sorted(study_states(node)) == ["DONE", "PARTIAL", "QUARANTINED"])
    quarantined = [st["id"] for st in service.studies() if st["state"] == "QUARANTINED"]
    with node.sessions() as s:
        first = s.scalars(select(Job).where(Job.study_id.in_(quarantined), Job.state == JobState.QUARANTINED)).all()
    who = Principal("alice", Role.OPERATOR, "user")
    service.discard_job(first[0].id, who)
    assert "QUARANTINED" in study_states(node), "one object is still quarantined"
    service.discard_job(first[1].id, who)
    assert sorted(study_states(node)) == ["DONE", "IGNORED", "PARTIAL"]


# -- 4. the operator's quarantine commands -------------------------------------------------------
def test_quarantine_commands_list_show_retry_and_discard_without_phi_and_audited(tmp_path, start_node):
    from node.db import Job, JobState

    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"quarantine_days": 30}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 3, modality="US")  # burned-in text likely, the route does not clean pixels
    drain(node, until=lambda: study_states(node) == ["QUARANTINED"])
    cfg = str(write_toml(raw, tmp_path / "node.toml"))
    with node.sessions() as s:
        ids = sorted(s.scalars(select(Job.id).where(Job.state == JobState.QUARANTINED)))
    assert len(ids) == 3

    r = run_cli("quarantine", "list", "--config", cfg)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("3 quarantined")
    assert sorted(int(line.split()[0]) for line in lines[2:]) == ids
    assert all(" headers " in line for line in lines[2:]), r.stdout  # the step that refused them
    listed = json.loads(run_cli("quarantine", "list", "--json", "--config", cfg).stdout)
    assert {row["job_id"] for row in listed} == set(ids) and all(row["original_kept"] for row in listed)

    r = run_cli("quarantine", "show", str(ids[0]), "--config", cfg)
    assert r.returncode == 0, r.stderr
    shown = dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert shown["study_state"] == "QUARANTINED" and shown["step"] == "headers" and shown["original_kept"] == "True"
    assert shown["original_deleted_after"] != "-"  # quarantine_days from the quarantine
    for out in (r.stdout, json.dumps(listed)):
        assert not any(v in out for v in PHI.values()), "no header value of the patient"
        assert node.settings.node.data_dir.name + "/" not in out, "no path"
    assert run_cli("quarantine", "show", "999999", "--config", cfg).returncode == 1

    r = run_cli("quarantine", "discard", str(ids[0]), "--config", cfg)
    assert r.returncode == 0 and f"job {ids[0]}: DISCARDED" in r.stdout, r.stdout + r.stderr
    r = run_cli("quarantine", "retry", str(ids[1]), str(ids[0]), "--config", cfg)
    assert r.returncode == 1 and f"job {ids[1]}: PENDING" in r.stdout and "not QUARANTINED" in r.stderr, r.stdout + r.stderr
    assert f"casemask: job {ids[0]} is DISCARDED, not QUARANTINED" in r.stderr, r.stderr  # said once, not "job N: job N is"
    with node.sessions() as s:
        states = dict(s.execute(select(Job.id, Job.state).where(Job.id.in_(ids))).all())
        events = [e.event for e in s.scalars(select(AuditEvent).where(AuditEvent.actor.startswith("cli:")).order_by(AuditEvent.id))]
    assert states == {ids[0]: JobState.DISCARDED, ids[1]: JobState.PENDING, ids[2]: JobState.QUARANTINED}
    assert events == ["job-discarded", "job-retried"]


@needs_dcmtk
def test_a_discarded_object_sent_again_is_not_processed_again_and_blocks_nothing(tmp_path, start_node):
    """Found in a new admin's walk: quarantined, discarded by an operator, sent again by
    the modality (storescu). The re-send put the discarded object back to routing, which
    added a second job for its route; the database refused it (one job per instance and
    route), and routing failed at every tick from then on, for every study: nothing
    received afterwards was ever processed. Now the re-send is answered Success, the
    object stays discarded, its rewritten file goes at the next retention run, and a
    study sent afterwards is delivered."""
    from node.accounts import Principal
    from node.db import Instance, InstanceState, Job, JobState, Role
    from node.service import Service
    from tests.test_lifecycle import files_under

    raw = node_config(tmp_path, [folder(tmp_path)])
    node = start_node(raw, schedule=False)
    port = node.settings.node.port

    def send(files) -> None:
        r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    us = make_study(tmp_path / "us", 1, modality="US")  # burned-in text likely, the route does not clean pixels
    send(us)
    drain(node, until=lambda: study_states(node) == ["QUARANTINED"])
    with node.sessions() as s:
        job = s.scalars(select(Job).where(Job.state == JobState.QUARANTINED)).one()
    Service(node.settings, node.sessions).discard_job(job.id, Principal("olga", Role.OPERATOR, "user"))
    retention.run(node.sessions, node.settings)  # the discarded original goes
    assert files_under(node.settings.node.data_dir / "spool") == []
    send(us)  # the modality sends it again
    send(make_study(tmp_path / "ct", 2))
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    with node.sessions() as s:
        inst = s.scalars(select(Instance).where(Instance.id == job.instance_id)).one()
        assert inst.state == InstanceState.IGNORED
        assert [j.state for j in s.scalars(select(Job).where(Job.instance_id == inst.id))] == [JobState.DISCARDED]
    assert sorted(study_states(node)) == ["DONE", "IGNORED"]
    retention.run(node.sessions, node.settings)
    assert files_under(node.settings.node.data_dir / "spool") == []  # the re-sent copy is not kept


def test_a_node_an_older_version_left_routing_a_discarded_object_again_recovers(tmp_path, start_node):
    """The state an older version left behind (a discarded object put back to RECEIVED by
    its re-send, its study RECEIVING): routing failed at every tick. Routing now puts it
    back to IGNORED and goes on with the other studies."""
    from sqlalchemy import update

    from node.accounts import Principal
    from node.db import Instance, InstanceState, Job, JobState, Role, Study, StudyState
    from node.service import Service

    node = start_node(node_config(tmp_path, [folder(tmp_path)]), schedule=False, listen=False)
    fill(node, tmp_path, 1, name="us", modality="US")
    drain(node, until=lambda: study_states(node) == ["QUARANTINED"])
    with node.sessions() as s:
        job = s.scalars(select(Job).where(Job.state == JobState.QUARANTINED)).one()
    Service(node.settings, node.sessions).discard_job(job.id, Principal("olga", Role.OPERATOR, "user"))
    with node.sessions() as s:  # what the older version's re-send did
        s.execute(update(Instance).where(Instance.id == job.instance_id).values(state=InstanceState.RECEIVED))
        s.execute(update(Study).where(Study.id == job.study_id).values(state=StudyState.RECEIVING))
        s.commit()
    fill(node, tmp_path, 2, name="ct")
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    with node.sessions() as s:
        assert s.get(Instance, job.instance_id).state == InstanceState.IGNORED
        assert [j.state for j in s.scalars(select(Job).where(Job.instance_id == job.instance_id))] == [JobState.DISCARDED]
    assert sorted(study_states(node)) == ["DONE", "IGNORED"]


def test_a_study_the_database_refuses_to_route_does_not_stop_the_others(tmp_path, start_node, monkeypatch, caplog):
    """Whatever makes the database refuse one study's routing (here: an IntegrityError
    raised for its instances), the other studies are routed and delivered; that study
    is rolled back alone, named in an error, and tried again later, and routed once
    the cause is gone. Before, the exception ended every routing pass."""
    from sqlalchemy.exc import IntegrityError

    from node import queue as q

    node = start_node(node_config(tmp_path, [folder(tmp_path)]), schedule=False, listen=False)
    bad = fill(node, tmp_path, 1, name="bad")
    real = q.route_instance

    def refuse(session, inst, *a, **kw):
        if inst.sop_instance_uid in bad:
            raise IntegrityError("INSERT INTO jobs", {}, Exception("UNIQUE constraint failed"))
        return real(session, inst, *a, **kw)

    monkeypatch.setattr(q, "route_instance", refuse)
    fill(node, tmp_path, 2, name="good")
    with caplog.at_level("ERROR", logger="node.app"):
        drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    assert any("routing study" in r.getMessage() and "IntegrityError" in r.getMessage() for r in caplog.records)
    assert sorted(study_states(node)) == ["DONE", "RECEIVING"]
    monkeypatch.setattr(q, "route_instance", real)
    node._route_failures.clear()  # the back-off's wait, over
    drain(node, until=lambda: delivery_states(node) == {"SENT": 3})
    assert study_states(node) == ["DONE", "DONE"]
