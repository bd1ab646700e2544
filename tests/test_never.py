"""What the node must never do, found open by hostile reviews and closed here:

1. keep PHI for ever: objects held for a route (``unrouted = "hold"``) had no retention;
   now ``[retention] held_days``;
2. merge two patients into one pseudonymous study: an object whose patient (Patient ID
   with its issuer) differs from its study's first object is quarantined, not merged;
3. let in a source a reload removed: a receiver process that does not confirm a reload
   is restarted with the new settings, not just named in an error.

Every test talks to a real node (dcmtk's storescu as the modality) and runs on SQLite
and on PostgreSQL where it touches the database; only the clock is mocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from node import retention
from node.config import parse
from node.db import AuditEvent, Instance, InstanceState, Study, StudyState, data_path
from tests.conftest import PHI, ROOT, STORESCU, dcmtk_env, make_study, needs_dcmtk, node_config, write_toml
from tests.test_lifecycle import clock, drain, folder  # noqa: F401  (clock is a fixture)


@pytest.fixture
def both_clocks(clock, monkeypatch):
    """The database's clock moved on (``clock``), and the node process's clock with it,
    which stamps state changes (``Instance.state_changed_at``): objects held after a
    move are held "later"."""
    import node.db as db
    from node import queue

    real = queue.utcnow
    monkeypatch.setattr(queue, "utcnow", lambda: real() + db.clock_offset)
    return clock


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=180)


def instances(node) -> dict[str, Instance]:
    with node.sessions() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def study_states(node) -> dict[str, str]:
    with node.sessions() as s:
        return {st.study_uid: st.state.value for st in s.scalars(select(Study))}


def uids_of(files: list[Path]) -> list[str]:
    from pydicom import dcmread

    return [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


# -- 1. held originals are not kept for ever --------------------------------------------------
@needs_dcmtk
@pytest.mark.usefixtures("database")
def test_held_originals_are_deleted_held_days_after_they_were_held_and_audited(tmp_path, start_node, both_clocks):
    """Objects that match no route (unrouted = hold) keep their originals held_days
    (30 by default), then retention deletes the files: the rows stay HELD, marked purged,
    with a reason saying so; their studies stay HELD; each study's deletion is audited
    with the count only. Objects held later are kept until their own days are over, and
    a re-send of a purged held object brings it back to routing."""
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["match"] = {"Modality": "MR"}  # the CT objects match no route: held
    node = start_node(raw, schedule=False)
    clock = both_clocks
    assert node.settings.retention.held_days == 30, "a bounded default"
    port = node.settings.node.port
    old, new = make_study(tmp_path / "old", 2), make_study(tmp_path / "new", 1)
    assert storescu(port, old).returncode == 0
    node.tick(0)
    clock(days=20)
    assert storescu(port, new).returncode == 0
    node.tick(0)
    held = instances(node)
    assert {i.state for i in held.values()} == {InstanceState.HELD}
    paths = {uid: data_path(node.settings.node.data_dir, i.path) for uid, i in held.items()}
    assert all(p.exists() for p in paths.values())

    clock(days=9)  # 29 days after the first study was held: nothing is due yet
    assert retention.run(node.sessions, node.settings).deleted == 0
    assert all(p.exists() for p in paths.values())

    clock(days=2)  # 31 days after the first, 11 after the second
    dry = retention.run(node.sessions, node.settings, dry_run=True)
    assert dict(dry.files) == {"held": 2}
    assert dict(retention.run(node.sessions, node.settings).files) == {"held": 2}
    rows = instances(node)
    for uid in uids_of(old):
        assert not paths[uid].exists(), "the held original is deleted"
        assert rows[uid].state == InstanceState.HELD and rows[uid].purged_at is not None, "the row stays, marked purged"
        assert rows[uid].reason == retention.HELD_PURGED
    (kept,) = uids_of(new)
    assert paths[kept].exists() and rows[kept].purged_at is None and rows[kept].reason == "matched no route (unrouted = hold)"
    assert set(study_states(node).values()) == {StudyState.HELD.value}
    with node.sessions() as s:
        entries = s.scalars(select(AuditEvent).where(AuditEvent.event == "held-purged")).all()
    old_study = rows[uids_of(old)[0]].study_id
    assert [(e.study_id, json.loads(e.detail)) for e in entries] == [(old_study, {"instances": 2, "held_days": 30})]
    assert not any(v in e.detail + e.object_ref for e in entries for v in PHI.values())

    with node.sessions() as s:  # casemask retry --held: nothing left to route for the purged ones
        from node import queue

        assert queue.release_held(s) == 1
        s.commit()
    node.tick(0)  # the kept one is held again (same routes)

    clock(days=29)  # held again 29 days ago (an operator's retry starts its days again): kept
    assert retention.run(node.sessions, node.settings).deleted == 0
    clock(days=2)
    assert dict(retention.run(node.sessions, node.settings).files) == {"held": 1}
    assert not any(p.exists() for p in paths.values())

    # The modality sends a purged held object again, the routes having changed: it is routed.
    node.settings.routes[0].match = {"Modality": "CT"}
    assert storescu(port, old[:1]).returncode == 0
    drain(node, until=lambda: instances(node)[uids_of(old)[0]].state == InstanceState.PROCESSED)


@pytest.mark.usefixtures("database")
def test_held_days_minus_one_keeps_held_originals_and_config_check_warns(tmp_path, start_node, clock):
    from tests.test_lifecycle import fill

    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["routes"][0]["match"] = {"Modality": "MR"}
    raw["retention"] = {"held_days": -1}
    node = start_node(raw, schedule=False, listen=False)
    fill(node, tmp_path, 1)
    node.tick(0)
    (inst,) = instances(node).values()
    assert inst.state == InstanceState.HELD
    clock(days=3650)
    assert retention.run(node.sessions, node.settings).deleted == 0
    assert data_path(node.settings.node.data_dir, inst.path).exists()
    settings = parse(raw, "test", base_dir=tmp_path)
    assert any("held_days = -1" in w for w in settings.warnings)
    assert "held originals (matched no route, unrouted = hold): kept for ever (-1)" in settings.retention.describe()
    r = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(write_toml(raw, tmp_path / "a.toml"))], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "held_days = -1" in r.stdout + r.stderr, r.stdout + r.stderr


# -- 2. one Study Instance UID, two patients ------------------------------------------------
OTHER = {**PHI, "PatientID": "MRN-55500011", "PatientName": "Roe^Richard"}
OTHER_ISSUER = {**PHI, "IssuerOfPatientID": "SYNTHETIC-OTHER-HOSPITAL"}


@needs_dcmtk
@pytest.mark.usefixtures("database")
def test_an_object_of_another_patient_under_a_studys_uid_is_quarantined_not_merged(tmp_path, start_node, caplog):
    """A modality sends one patient's object, then an object of another patient (another
    Patient ID; then the same Patient ID from another issuer) under the same Study
    Instance UID, before and after the study was routed (an amendment). Only the first
    patient's objects leave, as one pseudonymous study of one pseudonymous patient; the
    others are QUARANTINED with a reason that names the check and no value, and audited.
    Another object of the first patient is not held up."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from node import queue

    raw = node_config(tmp_path, [folder(tmp_path)])
    node = start_node(raw, schedule=False)
    port = node.settings.node.port
    uid = generate_uid()
    first = make_study(tmp_path / "a1", 1, study_uid=uid)
    other = make_study(tmp_path / "b1", 1, study_uid=uid, phi=OTHER)
    assert storescu(port, first).returncode == 0
    assert storescu(port, other).returncode == 0
    drain(node, until=lambda: settled(node))
    assert set(study_states(node).values()) == {"PARTIAL"}, "one object processed, the other patient's quarantined"
    later = make_study(tmp_path / "a2", 1, study_uid=uid)  # the first patient's, sent later: an amendment
    intruders = make_study(tmp_path / "b2", 1, study_uid=uid, phi=OTHER) + make_study(tmp_path / "c", 1, study_uid=uid, phi=OTHER_ISSUER)
    assert storescu(port, later + intruders).returncode == 0
    drain(node, until=lambda: settled(node))

    rows = instances(node)
    for uid_ in uids_of(first + later):
        assert rows[uid_].state == InstanceState.PROCESSED
    for uid_ in uids_of(other + intruders):
        assert rows[uid_].state == InstanceState.QUARANTINED and rows[uid_].reason == queue.OTHER_PATIENT
    out = [dcmread(f) for f in files(tmp_path)]
    assert len(out) == 2 and len({str(d.PatientID) for d in out}) == 1 and len({str(d.StudyInstanceUID) for d in out}) == 1
    assert {str(d.PatientID) for d in out} != {OTHER["PatientID"], PHI["PatientID"]}
    with node.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.state == StudyState.PARTIAL and study.patient_key and study.patient_key.startswith("h:")
        entries = s.scalars(select(AuditEvent).where(AuditEvent.event == "quarantined", AuditEvent.study_id == study.id)).all()
    assert sorted(json.loads(e.detail)["instances"] for e in entries) == [1, 2]
    said = caplog.text + queue.OTHER_PATIENT + "".join(e.detail for e in entries) + str(study.patient_key)
    for value in (*PHI.values(), *OTHER.values(), OTHER_ISSUER["IssuerOfPatientID"]):
        assert value not in said


def settled(node) -> bool:
    """Every object processed or quarantined, every delivery SENT."""
    from tests.test_lifecycle import delivery_states

    ended = {i.state for i in instances(node).values()} <= {InstanceState.PROCESSED, InstanceState.QUARANTINED}
    return ended and set(delivery_states(node)) <= {"SENT"} and set(study_states(node).values()) <= {"DONE", "PARTIAL", "QUARANTINED"}


def files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "archive"
    return sorted(p for p in root.rglob("*.dcm")) if root.exists() else []


# -- 3. a receiver that does not confirm a reload --------------------------------------------
@needs_dcmtk
@pytest.mark.slow
def test_a_receiver_that_does_not_confirm_a_reload_is_replaced_and_admits_no_removed_source(tmp_path):
    """receivers = 2, the receiver process stopped (SIGSTOP: hung, its socket still
    listening, the kernel still queueing connections for it); SIGHUP with the modality's
    source removed. Before, the reload only named it in an error and reported done; the
    hung process, once it ran again, could admit the removed source. Now it is killed
    before the reload returns and another, with the new settings, takes its place: every
    association of the removed source is rejected, by whichever process."""
    import os
    import signal

    from tests.conftest import NodeProcess, child_pids, is_alive, wait_until

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, receivers=2)
    port = raw["node"]["port"]
    config = write_toml(raw, tmp_path / "node.toml")
    log = tmp_path / "node.log"
    node = NodeProcess(config, log)
    files = make_study(tmp_path / "in", 1)
    node.start(port)
    hung = None
    try:
        node_pid = node.proc.pid  # type: ignore[union-attr]
        (hung,) = child_pids(node_pid)
        os.kill(hung, signal.SIGSTOP)
        raw["sources"] = [s for s in raw["sources"] if s["ae_title"] != "STORESCU"]
        write_toml(raw, config)
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "configuration reloaded:" in log.read_text(), timeout=60, what="the reload to be reported")
        text = log.read_text()
        assert f"receiver process(es) {hung} did not confirm the new configuration within 10 s: killed" in text, text[-3000:]
        assert not is_alive(hung), "the receiver that did not confirm is gone by the time the reload is reported"
        wait_until(lambda: "listening (started in place of one that died)" in log.read_text(), timeout=60, what="a receiver in its place")
        (second,) = [p for p in child_pids(node_pid) if is_alive(p)]
        assert second != hung
        for _ in range(8):  # spread over the two processes by the kernel
            r = storescu(port, files)
            assert r.returncode != 0 and "Rejected" in r.stderr, r.stderr
        with __import__("sqlite3").connect(Path(raw["node"]["data_dir"]) / "casemask.db") as db:
            assert db.execute("select count(*) from instances").fetchone()[0] == 0
    finally:
        if hung is not None and is_alive(hung):
            os.kill(hung, signal.SIGKILL)  # the test's own stopped receiver (before the fix it stayed)
        node.stop()


_SILENT = """
import os, sys, time
if sys.argv[1] == "closed":
    os.close(0)  # its pipe from the node is broken: a reload cannot even reach it
else:
    sys.stdin.buffer.read(1)  # reads, never confirms
time.sleep(120)
"""


def test_update_kills_every_receiver_that_cannot_or_does_not_confirm(tmp_path, caplog):
    """Receivers.update, on stand-ins for receiver processes: one whose pipe is broken
    is killed at once, one that reads but never confirms after wait_s; both are named
    and returned (the node's reload lists them), and neither is left running."""
    import threading

    from node.receivers import Receivers, _read_receiver

    settings = parse(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), "test", base_dir=tmp_path)
    receivers = Receivers(settings, 0, writer="n/1", slots_fd=-1)
    procs = [subprocess.Popen([sys.executable, "-c", _SILENT, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT) for kind in ("closed", "silent")]
    try:
        for p in procs:
            threading.Thread(target=_read_receiver, args=(p.stdout, p.pid, threading.Event()), kwargs={"on_reloaded": receivers._confirmed}, daemon=True).start()
        receivers.procs = procs
        from tests.conftest import wait_until

        wait_until(lambda: not Path(f"/proc/{procs[0].pid}/fd/0").exists(), what="the first to close its end of the pipe")
        assert sorted(receivers.update(settings, wait_s=1.0)) == sorted(p.pid for p in procs)
        assert all(p.poll() is not None for p in procs), "a receiver that did not confirm is still running"
        assert f"receiver process {procs[0].pid} did not take the new configuration" in caplog.text
        assert f"receiver process(es) {procs[1].pid} did not confirm the new configuration within 1 s: killed" in caplog.text
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
