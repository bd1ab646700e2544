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
