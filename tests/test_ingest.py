"""Ingest internals against real peers: the event-driven reactor (node.reactor) and two
writers of one SOP Instance UID that share a database (node.scp's clean-ups)."""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.db import Instance, data_path
from tests.conftest import free_port, make_study, node_config, wait_until
from tests.test_node import c_store


def test_the_reactor_hooks_match_the_installed_pynetdicom():
    """node.reactor replaces pynetdicom's two reactor loops with copies that wait instead
    of polling; a pynetdicom whose loops changed must be read again (and the digests in
    node.reactor.EXPECTED_SOURCES updated) before the hooks are trusted with it."""
    from node import reactor

    assert reactor.check_pynetdicom() == [], f"pynetdicom's reactor code changed: re-read node/reactor.py against it ({reactor.source_digests()})"


@pytest.mark.single_process
def test_accepted_associations_wait_instead_of_polling(tmp_path, start_node):
    """With the node's reactor an idle accepted association's two threads wake at most
    every MAX_WAIT_S, not every 50 us; C-STOREs are answered all the same."""
    from node import reactor

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600)
    node = start_node(raw, schedule=False)
    files = make_study(tmp_path / "in", 3)
    from pynetdicom import AE

    passes = [0]
    original = reactor.wait_for_message

    def counting(assoc):
        passes[0] += 1
        original(assoc)

    reactor.wait_for_message = counting
    try:
        ae = AE(ae_title="MODALITY1")
        ds = dcmread(files[0])
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK")
        assert assoc.is_established
        for f in files:
            assert int(assoc.send_c_store(dcmread(f)).Status) == 0
        before = passes[0]
        threading.Event().wait(0.5)
        idle_passes = passes[0] - before
        assoc.release()
    finally:
        reactor.wait_for_message = original
    assert idle_passes > 0, "the association's thread polls (reactor_max_wait_ms = 0?)"
    assert idle_passes <= 0.5 / reactor.MAX_WAIT_S + 3, idle_passes  # polling at 50 us: thousands


class _FailingSpool:
    """Stands in for a StoreHandler's spool thread pool: each write fails (EIO) once
    ``release`` is set, as a disk error would after the row was committed."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def submit(self, fn, *args) -> Future:
        done: Future = Future()

        def fail() -> None:
            self.release.wait(30)
            done.set_exception(OSError(errno.EIO, "injected disk error"))

        threading.Thread(target=fail, daemon=True).start()
        return done

    def shutdown(self, wait: bool = True) -> None:
        self.release.set()


@pytest.mark.single_process
def test_a_failed_write_never_deletes_a_row_another_node_acknowledged(tmp_path, database, start_node):
    """Two nodes share a database and a data folder (docs/cluster.md). Node A commits the
    row of an object; before its file is written, node B receives the same object,
    finds A's row, writes the file and answers Success; then A's write fails. A must
    not delete the row B acknowledged (it did, by SOP Instance UID, before). On SQLite
    and on PostgreSQL (what a cluster runs on)."""
    from node.scp import start_server

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600)
    node_a = start_node(raw, schedule=False)
    spool = _FailingSpool()
    node_a.server.store_handler._spool = spool
    settings_b = node_a.settings.model_copy(update={"node": node_a.settings.node.model_copy(update={"port": free_port(), "tls": None})})
    node_b = start_server(settings_b, node_a.engine, pseudo=node_a.pseudo, writer="other-node/1-b")
    try:
        ds = dcmread(make_study(tmp_path / "in", 1)[0])
        answered: list[int] = []
        to_a = threading.Thread(target=lambda: answered.append(c_store(node_a.settings.node.port, ds)))
        to_a.start()

        def row():
            with node_a.sessions() as s:
                return s.scalars(select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))).first()

        wait_until(row, timeout=30, what="node A's row")
        assert c_store(settings_b.node.port, ds) == 0, "node B stores the same object and answers Success"
        spool.release.set()
        to_a.join(30)
        assert answered == [0xA700], "node A's write failed: not acknowledged"
        kept = row()
        assert kept is not None, "the row node B acknowledged is still there"
        assert kept.received_by == "other-node/1-b"
        assert data_path(node_a.settings.node.data_dir, kept.path).is_file()
    finally:
        spool.release.set()
        node_b.shutdown()
        node_b.store_handler.close()


def test_remove_if_same_leaves_a_file_another_writer_put_there(tmp_path):
    """A clean-up removes a spool path only while it is still the caller's own link."""
    from node.spool import place, remove_if_same, replace

    ours, theirs, path = tmp_path / "ours", tmp_path / "theirs", tmp_path / "spool" / "x.dcm"
    ours.write_bytes(b"ours")
    theirs.write_bytes(b"theirs")
    assert place(ours, path)
    replace(theirs, path)  # another writer took the name meanwhile
    assert not remove_if_same(path, ours) and path.read_bytes() == b"theirs"
    path.unlink()
    assert place(ours, path) and remove_if_same(path, ours) and not path.exists()


# -- parallel durability: a torn file under a committed row (docs/ingest.md) ---------------------
def _folder(tmp_path) -> dict:
    return {"name": "f", "kind": "folder", "path": str(tmp_path / "archive")}


def _tear(path) -> None:
    """What a power loss leaves of a file whose data fsync had not returned: its name
    and size are there, its second half never reached the disk (zeros)."""
    data = bytearray(path.read_bytes())
    half = len(data) // 2
    data[half:] = bytes(len(data) - half)
    with open(path, "r+b") as fp:  # in place: the same inode, as the crash leaves it
        fp.write(data)


def _instances(node) -> dict[str, Instance]:
    with node.sessions() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def _delivered(tmp_path) -> int:
    archive = tmp_path / "archive"
    return sum(1 for p in archive.rglob("*.dcm")) if archive.exists() else 0


def test_a_torn_file_under_a_committed_row_is_dropped_at_start_and_never_processed(tmp_path, database, start_node):
    """The handler links a received file under its final name before its data fsync
    returns, so a crash can leave a committed row naming a torn file (that C-STORE was
    never answered Success). The next start hashes the files of its earlier run's rows:
    the torn one's row and file are dropped, audited and counted, and only the whole
    object is processed. On SQLite and PostgreSQL. (Without the digest the torn file,
    a valid header over zeroed pixels, went out as the patient's image.)"""
    from node import metrics
    from node.app import Node
    from node.db import AuditEvent

    raw = node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600, node_id="torn-a")
    writer = start_node(raw, schedule=False)
    dss = [dcmread(f) for f in make_study(tmp_path / "in", 2)]
    for ds in dss:
        assert c_store(writer.settings.node.port, ds) == 0
    rows = _instances(writer)
    assert all(len(i.digest or "") == 64 for i in rows.values()), "each row carries its file's SHA-256"
    torn_uid, whole_uid = str(dss[0].SOPInstanceUID), str(dss[1].SOPInstanceUID)
    torn = data_path(writer.settings.node.data_dir, rows[torn_uid].path)
    writer.stop()
    _tear(torn)  # the crash: the process is gone, and so is the page cache
    before = metrics.SPOOL_DIGEST_MISMATCHES.labels(where="startup")._value.get()
    again = Node(writer.settings, pixel_step=None)
    try:
        assert set(_instances(again)) == {whole_uid}, "the torn object's row is dropped at start"
        assert not torn.exists(), "and its file"
        assert metrics.SPOOL_DIGEST_MISMATCHES.labels(where="startup")._value.get() == before + 1
        with again.sessions() as s:
            entries = [e for e in s.scalars(select(AuditEvent).where(AuditEvent.event == "spool-dropped"))]
        assert len(entries) == 1 and '"instances": 1' in entries[0].detail
        again.tick(0)
        assert _delivered(tmp_path) == 1, "the whole object goes out, the torn one never"
    finally:
        again.stop()


def test_routing_quarantines_a_torn_file_and_a_resend_replaces_it(tmp_path, database, start_node):
    """A torn file the start-up sweep did not drop (a row of the running process, of
    another node, or younger than the sweep) is never read as the object: routing finds
    the mismatch and quarantines it, named. The sender, never answered Success for it,
    sends it again: the handler finds the stored file torn, puts the re-sent one in its
    place (durably) with its digest, and the object is routed again and processed once.
    On SQLite and PostgreSQL."""
    from node import queue
    from node.db import InstanceState

    raw = node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600)
    node = start_node(raw, schedule=False)
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    uid = str(ds.SOPInstanceUID)
    assert c_store(node.settings.node.port, ds) == 0
    path = data_path(node.settings.node.data_dir, _instances(node)[uid].path)
    whole = path.read_bytes()
    _tear(path)
    node.tick(0)
    inst = _instances(node)[uid]
    assert (inst.state, inst.reason) == (InstanceState.QUARANTINED, queue.SPOOL_FILE_TORN)
    assert _delivered(tmp_path) == 0
    assert c_store(node.settings.node.port, ds) == 0, "the re-send is stored and acknowledged"
    assert path.read_bytes() == whole, "the re-sent bytes replaced the torn file"
    node.tick(0)
    inst = _instances(node)[uid]
    assert inst.state == InstanceState.PROCESSED, inst.reason
    assert _delivered(tmp_path) == 1


def test_the_pipeline_never_processes_a_file_torn_after_routing(tmp_path, start_node):
    """A crash can tear a file after routing read it (the row was committed, routed and
    its job made before the data fsync returned): the pipeline hashes the bytes it read
    and quarantines the job, named, instead of processing them."""
    from node.db import Job, JobState

    raw = node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600)
    node = start_node(raw, schedule=False)
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    assert c_store(node.settings.node.port, ds) == 0
    node.route_stable(0)
    _tear(data_path(node.settings.node.data_dir, _instances(node)[str(ds.SOPInstanceUID)].path))
    for _ in range(10):
        if not node.pipeline.run_once():
            break
    with node.sessions() as s:
        jobs = list(s.scalars(select(Job)))
    assert [j.state for j in jobs] == [JobState.QUARANTINED]
    assert "does not match its digest" in jobs[0].reason
    assert _delivered(tmp_path) == 0


@pytest.mark.parametrize("parallel", [True, False])
def test_a_received_file_is_whole_and_matches_its_digest_either_way(tmp_path, start_node, parallel):
    """Both orders of making a received file durable leave the same file and row."""
    from node.spool import file_digest

    raw = node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600, parallel_durability=parallel)
    node = start_node(raw, schedule=False)
    for f in make_study(tmp_path / "in", 3):
        assert c_store(node.settings.node.port, dcmread(f)) == 0
    rows = _instances(node)
    assert len(rows) == 3
    for inst in rows.values():
        path = data_path(node.settings.node.data_dir, inst.path)
        assert file_digest(path) == inst.digest and path.stat().st_size == inst.size
        assert path.stat().st_nlink == 1, "the incoming name is gone"
    assert not any((node.settings.node.data_dir / "spool" / ".incoming").iterdir())


def test_a_failed_folder_fsync_after_the_early_link_leaves_neither_row_nor_file(tmp_path, start_node, monkeypatch):
    """The file is linked under its final name before its folder's fsync: when that
    fsync fails (EIO), the C-STORE is answered 0xA700, and its row and its link are both
    gone (no unacknowledged copy stays under a name a row could point to); the retry is
    stored."""
    import node.scp as scp
    from node.spool import spool_path

    node = start_node(node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600), schedule=False)

    def disk_error(*a, **k):
        raise OSError(errno.EIO, "injected disk error")

    monkeypatch.setattr(scp, "fsync_dir", disk_error)
    ds = dcmread(make_study(tmp_path / "in", 1)[0])
    assert c_store(node.settings.node.port, ds) == 0xA700
    assert _instances(node) == {}
    path = spool_path(node.settings.node.data_dir / "spool", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    assert not path.exists(), "the early link went with the row"
    monkeypatch.undo()
    assert c_store(node.settings.node.port, ds) == 0
    assert path.is_file() and len(_instances(node)) == 1


def _row(study: str, sop: str) -> "queue.Received":
    from node import queue

    return queue.Received(sop, "1.2.840.10008.5.1.4.1.1.2", study, "1.2.3.9", "CT", "1.2.840.10008.1.2.1", f"spool/{sop}.dcm", 10, "MODALITY1", "CASEMASK", "127.0.0.1", identity="id")


def test_one_batch_of_rows_files_each_under_its_study_and_reports_each_study_change_once(tmp_path):
    """record_received_many (the group commit's batch): rows of a study still receiving,
    of a new study (twice) and of a routed study (an amendment) in one transaction; each
    row lands in its own study, the routed study is reopened, and each change is
    reported once, on the study's first row."""
    from sqlalchemy import update

    from node import queue
    from node.db import Study, StudyState, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with engine.begin() as conn:
            queue.record_received(conn, _row("1.2.3.1", "1.2.3.1.1"))
            queue.record_received(conn, _row("1.2.3.2", "1.2.3.2.1"))
            conn.execute(update(Study.__table__).where(Study.__table__.c.study_uid == "1.2.3.2").values(state=StudyState.ROUTED))
        batch = [_row("1.2.3.1", "1.2.3.1.2"), _row("1.2.3.3", "1.2.3.3.1"), _row("1.2.3.2", "1.2.3.2.2"), _row("1.2.3.3", "1.2.3.3.2"), _row("1.2.3.1", "1.2.3.1.3")]
        with engine.begin() as conn:
            changes = queue.record_received_many(conn, batch)
        assert changes[0] == "" and changes[4] == "", "a study still receiving changes nothing"
        assert changes[1].endswith(": RECEIVING") and changes[3] == "", "a new study: once, on its first row"
        assert changes[2].endswith("ROUTED -> RECEIVING (amendment)")
        with engine.connect() as conn:
            studies = dict(conn.execute(select(Study.__table__.c.study_uid, Study.__table__.c.id)).all())
            states = dict(conn.execute(select(Study.__table__.c.study_uid, Study.__table__.c.state)).all())
            rows = dict(conn.execute(select(Instance.__table__.c.sop_instance_uid, Instance.__table__.c.study_id)).all())
        assert len(studies) == 3 and set(states.values()) == {StudyState.RECEIVING}
        assert rows == {r.sop_instance_uid: studies[r.study_uid] for r in [_row("1.2.3.1", "1.2.3.1.1"), _row("1.2.3.2", "1.2.3.2.1"), *batch]}
    finally:
        engine.dispose()


def test_the_wal_is_checkpointed_beside_the_commits_and_stays_small(tmp_path):
    """node.groupcommit: the committer's connection leaves checkpoints to the
    checkpointer thread (every CHECKPOINT_EVERY rows), so the WAL restarts from its first
    frame every few dozen rows: 320 rows committed one by one leave it far below the
    4 MB that SQLite's own checkpoint (1000 pages) lets it grow to, and every row is in
    the database."""
    from node import groupcommit
    from node.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    gc = groupcommit.GroupCommit(engine, lambda r, change: None)
    try:
        assert gc._checkpointer is not None
        for step in range(20):
            for i in range(groupcommit.CHECKPOINT_EVERY):
                assert gc.record(_row(f"1.2.3.{step % 4}", f"1.2.3.{step}.{i}")) is None
            wait_until(lambda: gc._checkpointer.done > step, timeout=30, what="the checkpointer to run")
        wal = tmp_path / "db.sqlite-wal"
        assert wal.stat().st_size < 1024 * 1024, f"the WAL grew to {wal.stat().st_size} bytes"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select count(*) from instances").scalar() == 20 * groupcommit.CHECKPOINT_EVERY
    finally:
        gc.close()
        engine.dispose()



@pytest.fixture(params=["sqlite", "postgresql"])
def two_engines(request, tmp_path):
    """Engines on two new databases of one kind (SQLite, PostgreSQL), at the schema's head."""
    from node.db import make_engine

    if request.param == "sqlite":
        urls = [f"sqlite:///{tmp_path / name}" for name in ("a.sqlite", "b.sqlite")]
    else:
        cluster = request.getfixturevalue("pg_cluster")
        names = [cluster.create_database(template="casemask_template") for _ in range(2)]
        urls = [cluster.url(name) for name in names]
    engines = [make_engine(url) for url in urls]
    yield engines
    for engine in engines:
        engine.dispose()
    if request.param == "postgresql":
        for name in names:
            cluster.drop_database(name)


def _stored_rows(engine) -> list[tuple]:
    """Every column of every study and instance row, as the DBAPI returns them (not
    through SQLAlchemy's result processing), without the row ids."""
    with engine.connect() as conn:
        studies = conn.exec_driver_sql("SELECT study_uid, state, first_received_at, last_received_at FROM studies ORDER BY study_uid").all()
        instances = conn.exec_driver_sql(
            "SELECT sop_instance_uid, sop_class_uid, series_uid, modality, transfer_syntax, path, size, calling_ae, called_ae,"
            " peer_host, identity, digest, received_at, received_by, state, reason, state_changed_at, purged_at,"
            " (SELECT study_uid FROM studies WHERE studies.id = instances.study_id) FROM instances ORDER BY sop_instance_uid"
        ).all()
    return [tuple(r) for r in studies] + [tuple(r) for r in instances]


def test_the_group_commit_writes_on_the_dbapi_cursor_the_rows_core_writes(two_engines, monkeypatch):
    """queue.HotStatements (the group commit's UPDATE and INSERT on the DBAPI cursor)
    stores what SQLAlchemy Core stores for the same batches, value for value as the
    database holds them (times, the state's enum text, NULLs), on SQLite and
    PostgreSQL: the same rows, at the same clock, once through Core into one database
    and once through the hot statements into another, read back raw."""
    import dataclasses
    import datetime as dt

    from sqlalchemy import update

    from node import queue
    from node.db import Study, StudyState

    stored = []
    for engine, hot in zip(two_engines, (None, queue.HotStatements(two_engines[1].dialect))):
        clock = iter([dt.datetime(2026, 11, 30, 22, 0, 0) + dt.timedelta(microseconds=123457 * k) for k in range(100)])
        monkeypatch.setattr(queue, "utcnow", lambda: next(clock))
        with engine.begin() as conn:
            queue.record_received(conn, _row("1.2.3.1", "1.2.3.1.1"), hot)
            queue.record_received(conn, _row("1.2.3.2", "1.2.3.2.1"), hot)
            conn.execute(update(Study.__table__).where(Study.__table__.c.study_uid == "1.2.3.2").values(state=StudyState.ROUTED))
        batch = [_row("1.2.3.1", "1.2.3.1.2"), _row("1.2.3.3", "1.2.3.3.1"), _row("1.2.3.2", "1.2.3.2.2"), _row("1.2.3.3", "1.2.3.3.2"), _row("1.2.3.1", "1.2.3.1.3")]
        batch[1] = dataclasses.replace(batch[1], received_by="owner-1", digest="ab" * 32)
        with engine.begin() as conn:
            changes = queue.record_received_many(conn, batch, hot)
        assert changes[0] == changes[3] == changes[4] == ""
        assert changes[1].endswith(": RECEIVING") and changes[2].endswith("ROUTED -> RECEIVING (amendment)")
        with engine.begin() as conn:
            queue.record_received_many(conn, [_row("1.2.3.1", "1.2.3.1.4")], hot)
        stored.append(_stored_rows(engine))
    core, hot_rows = stored
    assert tuple(queue._instance_row(_row("1.2.3.1", "1.2.3.1.9"), 1, dt.datetime(2026, 1, 1))) == queue._INSTANCE_KEYS, "every column the row sets"
    assert len(core) == 3 + 8
    assert [r for r in core if r[0] == "1.2.3.3.1"][0][11] == "ab" * 32, "the values differ between the rows"
    assert hot_rows == core


def test_a_stored_sop_instance_uid_raises_integrity_error_on_the_hot_path_and_a_lost_connection_is_invalidated(two_engines):
    """The hot statements raise what Core raises: IntegrityError for a SOP Instance UID
    already stored (the group commit then answers the re-send from the stored row);
    any other database error invalidates the connection, so that the committer opens a
    new one instead of failing every later batch on a dead one."""
    from sqlalchemy.exc import DBAPIError, IntegrityError

    from node import groupcommit, queue

    engine = two_engines[0]
    hot = queue.HotStatements(engine.dialect)
    with engine.begin() as conn:
        queue.record_received(conn, _row("1.2.3.1", "1.2.3.1.1"), hot)
    with engine.connect() as conn:
        with pytest.raises(IntegrityError):
            with conn.begin():
                queue.record_received(conn, _row("1.2.3.1", "1.2.3.1.1"), hot)
        assert not conn.invalidated
        conn.connection.driver_connection.close()  # the server went away under it
        with pytest.raises(DBAPIError):
            with conn.begin():
                queue.record_received(conn, _row("1.2.3.1", "1.2.3.1.2"), hot)
        assert conn.invalidated
    gc = groupcommit.GroupCommit(engine, lambda r, change: None)
    try:
        assert gc.record(_row("1.2.3.1", "1.2.3.1.3")) is None
        assert gc.record(_row("1.2.3.1", "1.2.3.1.3")) is not None, "a re-send: the stored object"
    finally:
        gc.close()
