"""The schema through Alembic (node.schema, node/migrations): the models and the
migrations agree on both databases, a database of the previous release (made by its
``create_all``, no revision) is upgraded with its rows and then worked by a node, and
the upgrade runs only when it is safe."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from node import schema
from node.app import Node
from node.config import parse
from node.db import Base, Delivery, DeliveryState, Instance, InstanceState, Job, JobState, Pseudonym, make_engine
from node.deid import to_bytes
from node.spool import spool_path, write_atomic
from tests.conftest import ROOT, make_study, node_config, write_toml

OLD_SCHEMA = Path(__file__).parent / "data" / "schema_a9551c1.sql"


def differences(engine) -> list:
    """What Alembic's autogenerate would change to make the database match the models."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_head_names_the_newest_migration():
    assert schema.script_head() == schema.HEAD


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_models_and_migrations_agree(kind, tmp_path, request):
    """An empty database upgraded to the head has exactly the models' schema
    (autogenerate finds nothing to change)."""
    if kind == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        url = cluster.url(cluster.create_database())
    else:
        url = f"sqlite:///{tmp_path / 'new.db'}"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert schema.current_revision(conn) == schema.HEAD
        assert differences(engine) == []
    finally:
        engine.dispose()


def _previous_release_database(db_file: Path, spooled: Path) -> None:
    """A database as the previous release left it: its schema (its create_all's DDL)
    and a few rows: a routed study whose one job waits, an object delivered earlier
    (output, delivery SENT) and a pseudonym. Paths are absolute, as that release wrote."""
    conn = sqlite3.connect(db_file)
    conn.executescript(OLD_SCHEMA.read_text())
    t = "2026-11-20 10:00:00.000000"
    conn.executemany("INSERT INTO studies VALUES (?, ?, ?, ?, ?)", [(1, "1.2.826.0.1.3680043.8.498.1", "ROUTED", t, t)])
    conn.executemany(
        "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (1, "1.2.826.0.1.3680043.8.498.11", "1.2.840.10008.5.1.4.1.1.2", 1, "1.2.826.0.1.3680043.8.498.2", "CT", "1.2.840.10008.1.2.1", "/gone/old-1.dcm", 100, "MODALITY1", "CASEMASK", "127.0.0.1", t, "PROCESSED", ""),
            (2, "1.2.826.0.1.3680043.8.498.12", "1.2.840.10008.5.1.4.1.1.2", 1, "1.2.826.0.1.3680043.8.498.2", "CT", "1.2.840.10008.1.2.1", str(spooled), spooled.stat().st_size, "MODALITY1", "CASEMASK", "127.0.0.1", t, "ROUTED", "routes: all"),
        ],
    )
    conn.executemany(
        "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(1, 1, 1, "all", "DONE", None, 1, "", t, "{}"), (2, 2, 1, "all", "PENDING", None, 0, "", t, "{}")],
    )
    conn.execute("INSERT INTO outputs VALUES (1, 1, 'deidentified', '2.25.1', '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', '/gone/out-1.dcm')")
    conn.execute("INSERT INTO deliveries VALUES (1, 1, 'f', 'SENT', 1, ?, NULL, '', ?)", (t, t))
    conn.execute("INSERT INTO pseudonyms VALUES (1, 'uid', '1.2.826.0.1.3680043.8.498.11', '2.25.1')")
    conn.commit()
    conn.close()


def test_a_database_of_the_previous_release_is_upgraded_and_worked(tmp_path):
    """The previous release's database (no revision, its own columns only): the node
    upgrades it at start, keeps its rows, and processes and delivers the object that
    was waiting (its absolute path still honoured)."""
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "archive")}])
    settings = parse(raw, "test", base_dir=tmp_path)
    data = settings.node.data_dir
    data.mkdir(parents=True, mode=0o700)
    ds = __import__("pydicom").dcmread(make_study(tmp_path / "s", 1, study_uid="1.2.826.0.1.3680043.8.498.1")[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12"
    spooled = spool_path(data / "spool", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    write_atomic(spooled, to_bytes(ds))
    _previous_release_database(data / "casemask.db", spooled)

    node = Node(settings, pixel_step=None)
    try:
        assert differences(node.engine) == []
        with node.sessions() as s:
            assert [(i.id, i.state, i.received_by) for i in s.scalars(select(Instance).order_by(Instance.id))] == [
                (1, InstanceState.PROCESSED, None),
                (2, InstanceState.ROUTED, None),
            ]
            assert s.scalar(select(Pseudonym.new)) == "2.25.1"
            assert s.get(Job, 2).deferrals == 0 and s.get(Job, 2).owner is None
        node.tick(0)
        with node.sessions() as s:
            assert s.get(Job, 2).state == JobState.DONE
            assert [d.state for d in s.scalars(select(Delivery).order_by(Delivery.id))] == [DeliveryState.SENT, DeliveryState.SENT]
        assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 1
    finally:
        node.stop()


def test_a_failed_upgrade_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    """SQLite too changes the schema in one transaction: an upgrade that fails half way
    (here at its last step) leaves the previous release's tables and rows untouched."""
    from alembic import op

    db_file = tmp_path / "old.db"
    spooled = tmp_path / "x.dcm"
    spooled.write_bytes(b"x")
    _previous_release_database(db_file, spooled)
    before = sqlite3.connect(db_file).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()

    def fail(*a, **k):
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(op, "create_table", fail)
    with pytest.raises(RuntimeError, match="disk filled"):
        make_engine(f"sqlite:///{db_file}")
    conn = sqlite3.connect(db_file)
    assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before
    assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 2


def test_a_database_upgraded_by_a_newer_version_is_refused(tmp_path):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "archive")}])
    settings = parse(raw, "test", base_dir=tmp_path)
    Node(settings, pixel_step=None).stop()
    engine = create_engine(settings.node.resolved_database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(schema.SchemaError, match="revision 9999, which this casemask"):
        Node(settings, pixel_step=None)
    r = run_cli("serve", "--config", str(write_toml(raw, tmp_path / "node.toml")))
    assert r.returncode == 2 and "a newer casemask upgraded it" in r.stderr


def test_db_upgrade_and_current_commands(tmp_path):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "archive")}])
    cfg = write_toml(raw, tmp_path / "node.toml")
    r = run_cli("db", "current", "--config", str(cfg))
    assert r.returncode == 1 and "revision none" in r.stdout, r.stdout + r.stderr
    r = run_cli("db", "upgrade", "--config", str(cfg))
    assert r.returncode == 0 and f"to {schema.HEAD}" in r.stdout, r.stdout + r.stderr
    r = run_cli("db", "upgrade", "--config", str(cfg))
    assert r.returncode == 0 and "already" in r.stdout
    r = run_cli("db", "current", "--config", str(cfg))
    assert r.returncode == 0 and f"database: revision {schema.HEAD}" in r.stdout


def test_postgresql_nodes_starting_together_upgrade_once(pg_cluster):
    """Four processes open an empty PostgreSQL database at once: one upgrades (under
    the advisory lock), the others wait and find it done."""
    url = pg_cluster.url(pg_cluster.create_database())
    engines = [make_engine(url, 1, 0, name=f"n{k}", prepare=False) for k in range(4)]
    results: list[object] = []

    def open_it(engine) -> None:
        try:
            results.append(schema.prepare(engine))
        except Exception as exc:  # collected: the test says which
            results.append(exc)

    threads = [threading.Thread(target=open_it, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(map(repr, results)) == sorted([repr((None, schema.HEAD))] + [repr(None)] * 3)
        assert differences(engines[0]) == []
    finally:
        for e in engines:
            e.dispose()


def test_postgresql_upgrade_waits_for_nodes_of_another_version(pg_cluster):
    """A casemask of another version still connected: no upgrade (it would change the
    schema under that node), and the message names it."""
    import psycopg

    name = pg_cluster.create_database()
    url = pg_cluster.url(name)
    with psycopg.connect(host="127.0.0.1", port=pg_cluster.port, user="casemask", dbname=name, application_name="casemask/0000/old-node:all"):
        with pytest.raises(schema.SchemaError, match="casemask/0000/old-node"):
            make_engine(url)
        engine = make_engine(url, prepare=False)
        assert not inspect(engine).has_table("studies")
        engine.dispose()
    make_engine(url).dispose()  # gone: upgraded
