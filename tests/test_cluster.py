"""Several nodes on one PostgreSQL database and one data folder (docs/cluster.md):
``casemask serve --role ingest`` and ``--role worker`` processes split the work, a
study may arrive through several ingest nodes, and a worker killed with SIGKILL in the
middle of a batch loses and repeats nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from node.config import parse
from node.db import Delivery, DeliveryState, Instance, InstanceState, Job, JobState, Pseudonym, Study
from tests.conftest import ROOT, STORESCU, NodeProcess, database_engine, dcmtk_env, free_port, make_study, needs_dcmtk, node_config, receive, wait_until, write_toml

SECRET = "5e" * 32  # the cluster's pseudonym secret, given to every node by environment


def _cluster_config(tmp_path: Path, url: str, archive_port: int, node_id: str, port: int) -> dict:
    dest = {"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive_port, "timeout_s": 10.0}
    return node_config(
        tmp_path, [dest], database_url=url, node_id=node_id, port=port, secret_env="CASEMASK_TEST_SECRET",
        stable_after_s=1.0, lease_s=3.0, poll_interval_s=0.2,
    )


@pytest.mark.usefixtures("database")
def test_an_ingest_node_only_receives_and_a_worker_only_works(tmp_path, start_node, archive_factory):
    """In one process each: the ingest node stores and never routes; the worker binds
    no port and routes, processes and delivers what the ingest node stored."""
    archive = archive_factory()
    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}], stable_after_s=0)
    from node.app import Node

    ingest = Node(parse({**raw, "node": {**raw["node"], "node_id": "in-1"}}, "test", base_dir=tmp_path), pixel_step=None, role="ingest")
    worker = Node(parse({**raw, "node": {**raw["node"], "node_id": "work-1"}}, "test", base_dir=tmp_path), pixel_step=None, role="worker")
    try:
        ingest.start()
        for f in make_study(tmp_path / "s", 3):
            receive(ingest, dcmread(f))
        assert ingest.server is not None and sorted(j.id for j in ingest.scheduler.get_jobs()) == ["health", "presence", "sweep"]
        with ingest.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Job)) == 0
        worker.start()
        assert worker.server is None
        assert sorted(j.id for j in worker.scheduler.get_jobs()) == ["audit:syslog", "dispatch:pacs", "health", "presence", "process", "retention", "route"]
        wait_until(lambda: len(archive.received) == 3, timeout=30, what="the worker to deliver what the ingest node stored")
    finally:
        ingest.stop()
        worker.stop()


def _freeze_and_kill(proc: subprocess.Popen, engine, owner_prefix: str, timeout: float = 60.0) -> int:
    """SIGKILL ``proc`` while it holds PROCESSING jobs and no delivery is being sent by
    it (frozen with SIGSTOP first, so that no C-STORE of its own is in flight at the
    kill: then every object must reach the archive exactly once). Returns how many jobs
    it held."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as c:
            jobs = c.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.PROCESSING, Job.owner.startswith(owner_prefix)))
        if jobs:
            proc.send_signal(signal.SIGSTOP)
            with engine.connect() as c:
                jobs = c.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.PROCESSING, Job.owner.startswith(owner_prefix)))
                sending = c.scalar(select(func.count()).select_from(Delivery).where(Delivery.state == DeliveryState.SENDING, Delivery.owner.startswith(owner_prefix)))
            if jobs and not sending:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                return int(jobs)
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)  # on a quiet machine a batch is PROCESSING for a few hundred ms only
    raise AssertionError(f"{owner_prefix} never held a batch without a send in flight")


@pytest.mark.slow
@needs_dcmtk
def test_two_ingest_nodes_two_workers_one_killed_mid_batch(tmp_path, pg_database, archive_factory):
    """300 instances (12 studies, each split between two dcmtk senders, so that each
    study arrives through both ingest nodes) to two ingest nodes; two workers on the
    same PostgreSQL database and data folder; one worker is killed with SIGKILL while
    it holds a batch. Every instance reaches the archive exactly once, and each study's
    outputs share one pseudonymous Study Instance UID."""
    archive = archive_factory()
    env = {**os.environ, "CASEMASK_TEST_SECRET": SECRET}
    ports = {"ingest-a": free_port(), "ingest-b": free_port()}
    procs: dict[str, NodeProcess] = {}
    for name, role in (("ingest-a", "ingest"), ("ingest-b", "ingest"), ("worker-a", "worker"), ("worker-b", "worker")):
        raw = _cluster_config(tmp_path, pg_database, archive.port, name, ports.get(name, free_port()))
        procs[name] = NodeProcess(write_toml(raw, tmp_path / f"{name}.toml"), tmp_path / f"{name}.log", role=role, env=env)
    settings = parse(raw, "test", base_dir=tmp_path)
    engine = database_engine(settings)
    studies = [make_study(tmp_path / f"study{k}", n=25) for k in range(12)]
    halves = ([f for s in studies for f in s[0::2]], [f for s in studies for f in s[1::2]])
    try:
        for name, p in procs.items():
            p.start(ports.get(name))
        senders = [
            subprocess.Popen([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(ports[name]), *map(str, files)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for name, files in zip(("ingest-a", "ingest-b"), halves)
        ]
        held = _freeze_and_kill(procs["worker-a"].proc, engine, "worker-a/")
        for s in senders:
            assert s.wait(120) == 0, s.stderr.read()
        wait_until(lambda: len(set(archive.received)) >= 300, timeout=120, interval=0.2, what="all 300 instances at the archive")

        def settled() -> bool:
            with engine.connect() as c:
                return c.scalar(select(func.count()).select_from(Delivery).where(Delivery.state != DeliveryState.SENT)) == 0

        wait_until(settled, timeout=30, what="every delivery SENT")
    finally:
        for p in procs.values():
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
    assert held > 0
    assert len(archive.received) == 300 and len(set(archive.received)) == 300, f"{len(archive.received)} C-STOREs for {len(set(archive.received))} instances"
    with engine.connect() as c:
        instances = c.execute(select(Instance.state, Instance.received_by)).all()
        assert {st for st, _ in instances} == {InstanceState.PROCESSED} and len(instances) == 300
        by_ingest = {who.split("/")[0] for _, who in instances}
        assert by_ingest == {"ingest-a", "ingest-b"}
        assert c.scalar(select(func.count()).select_from(Study)) == len(studies)
        finished_by = set(c.scalars(select(Delivery.owner)))  # cleared once SENT
        assert finished_by == {None}
        sop_map = dict(c.execute(select(Pseudonym.old, Pseudonym.new).where(Pseudonym.kind == "sop/deid")).all())
    engine.dispose()
    # Each study came through both ingest nodes and was worked by both workers (before
    # and after the kill), yet its outputs share one pseudonymous Study Instance UID.
    study_of_output = {str(ds.SOPInstanceUID): str(ds.StudyInstanceUID) for ds in archive.datasets}
    per_study: dict[int, set[str]] = defaultdict(set)
    for k, files in enumerate(studies):
        for f in files:
            per_study[k].add(study_of_output[sop_map[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)]])
    assert all(len(uids) == 1 for uids in per_study.values()), per_study
    assert len({next(iter(u)) for u in per_study.values()}) == len(studies)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    assert "role ingest" in logs["ingest-a"] and "role worker" in logs["worker-b"]


def _presence(node, role: str, *, host: str | None = None, pid: int, age_s: float = 0.0, owner: str = "other/1-x") -> None:
    """Write another process's presence entry for ``node``'s node id (node.leases)."""
    import datetime as dt
    import json
    import socket

    from node.db import Meta, db_now
    from node.leases import _put_presence

    with node.sessions() as s:
        _put_presence(s, node.node_id, role, owner, db_now(s))
        row = s.get(Meta, f"alive/{node.node_id}/{role}")
        row.value = json.dumps({"owner": owner, "host": host or socket.gethostname(), "pid": pid, "at": (db_now(s) - dt.timedelta(seconds=age_s)).isoformat()})
        s.commit()


def test_a_second_node_with_a_running_nodes_id_refuses_to_start_and_starts_once_it_stopped(tmp_path, start_node, archive_factory):
    """Two processes with one node id and the same role (a shared data folder without
    [node] node_id gives every node the same id): the second's start-up sweep and
    take-over would treat the first's rows and claims as a crashed run's. It exits 2,
    naming the running node; once the first stops, it starts."""
    archive = archive_factory()
    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}], node_id="in-1")
    first = start_node(raw)
    second_raw = {**raw, "node": {**raw["node"], "port": free_port()}, "http": {"host": "127.0.0.1", "port": free_port()}}
    config = write_toml(second_raw, tmp_path / "second.toml")
    out = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"node id 'in-1' is in use by a running node (role all, host {socket.gethostname()}, PID {os.getpid()}" in out.stderr
    first.stop()
    second = NodeProcess(config, tmp_path / "second.log")
    try:
        second.start(second_raw["node"]["port"])
    finally:
        second.stop()


@pytest.mark.usefixtures("database")
def test_which_presence_entries_keep_a_node_id_busy(tmp_path, start_node, archive_factory):
    """A live process of this host, or another host's entry younger than
    PRESENCE_STALE_S, holds the id in the roles it meets; a dead PID, an old entry, a
    role that does not meet, or this process's own PID (a node made again in the same
    process, a container's PID 1) does not."""
    from node.leases import PRESENCE_STALE_S, NodeIdInUse, claim_presence

    archive = archive_factory()
    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}], node_id="n-1")
    node = start_node(raw, listen=False, schedule=False)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _presence(node, "ingest", pid=sleeper.pid)
        with pytest.raises(NodeIdInUse, match=f"role ingest, host .*, PID {sleeper.pid}"):
            claim_presence(node.sessions, "n-1", "all", "n-1/me")
        with pytest.raises(NodeIdInUse):
            claim_presence(node.sessions, "n-1", "ingest", "n-1/me")
        claim_presence(node.sessions, "n-1", "worker", "n-1/me")  # ingest and worker do not meet
        _presence(node, "ingest", pid=os.getpid())
        claim_presence(node.sessions, "n-1", "ingest", "n-1/me")  # this process's own PID: an earlier node object
    finally:
        sleeper.kill()
        sleeper.wait()
    _presence(node, "ingest", pid=sleeper.pid)
    claim_presence(node.sessions, "n-1", "ingest", "n-1/me2")  # dead PID on this host: gone at once
    _presence(node, "ingest", host="elsewhere.example", pid=sleeper.pid, owner="n-1/far")
    with pytest.raises(NodeIdInUse, match="host elsewhere.example"):
        claim_presence(node.sessions, "n-1", "ingest", "n-1/me3")
    _presence(node, "ingest", host="elsewhere.example", pid=sleeper.pid, owner="n-1/far", age_s=PRESENCE_STALE_S + 1)
    claim_presence(node.sessions, "n-1", "ingest", "n-1/me4")  # silent for longer than the stale time
