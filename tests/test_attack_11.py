"""A hostile sender and a hostile network peer, eleventh pass (docs/security.md,
"Eleventh attack"): two DIMSE messages in one P-DATA-TF, PostgreSQL failing while
C-STOREs are committed, limits on what a sender or an archive can make the node read.
Synthetic values only."""

from __future__ import annotations

import struct

from pydicom import Dataset

from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION, encode, p_data, store_status
from tests.test_attack import _ct
from tests.test_attack_edge4 import _associated, _command, _folder_node, _raw_store_ok, _rows, _store_fields


def _echo_command(message_id: int) -> bytes:
    return _command({"AffectedSOPClassUID": VERIFICATION, "CommandField": 0x0030, "MessageID": message_id, "CommandDataSetType": 0x0101})


def _answers(r, n: int) -> list[tuple[int, int | None]]:
    """Up to ``n`` PDUs read (type, C-STORE/C-ECHO status), stopping at the first that is
    not a P-DATA-TF or at the connection's end / the read timeout."""
    out = []
    for _ in range(n):
        got = r.read_pdu()
        if got is None:
            break
        out.append((got[0], store_status(got[1]) if got[0] == 0x04 else None))
        if got[0] != 0x04:
            break
    return out


# -- two messages in one P-DATA-TF (PS3.8 9.3.5: PDVs of several messages may share one) ------
def test_two_whole_c_stores_in_one_p_data_are_both_stored_and_answered(tmp_path, start_node):
    """Two complete C-STORE-RQs (command and data set each) in one P-DATA-TF. pynetdicom
    ended the first message at its data set's last fragment and dropped the PDVs after it:
    the first object was answered Success, the second never answered, the sender left
    waiting until its own timeout. Each message is now handed on in turn: two answers, two
    rows."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x02, encode(a, implicit=False)),
                       (1, 0x03, _command(_store_fields(b, 2))), (1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 2)
    assert answers == [(0x04, 0x0000), (0x04, 0x0000)], answers
    assert _rows(node) == 2
    assert _raw_store_ok(port)


def test_two_c_echoes_in_one_p_data_are_both_answered(tmp_path, start_node):
    """Two C-ECHO-RQs (command sets without a data set) in one P-DATA-TF, then a C-STORE
    in the next: the second echo was dropped unanswered (or the association aborted as
    "a command fragment after its command set was complete"). Both are answered now, and
    the association goes on."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, VERIFICATION, [IMPLICIT_VR_LE])]) as r:
        r.send(p_data([(3, 0x03, _echo_command(1)), (3, 0x03, _echo_command(2))]))
        echoes = _answers(r, 2)
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 3))), (1, 0x02, encode(ds, implicit=False))]))
        store = _answers(r, 1)
    assert echoes == [(0x04, 0x0000), (0x04, 0x0000)], echoes
    assert store == [(0x04, 0x0000)], store
    assert _rows(node) == 1


def test_a_store_then_a_command_and_its_data_in_the_next_p_data_are_both_stored(tmp_path, start_node):
    """A C-STORE-RQ whole and the next one's command in one P-DATA-TF, that command's data
    set in the next: the second command was dropped with the rest of the P-DATA, so its
    data set came without a command (aborted, the sender's second object refused for
    nothing). Both are stored now."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x02, encode(a, implicit=False)), (1, 0x03, _command(_store_fields(b, 2)))]))
        r.send(p_data([(1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 2)
    assert answers == [(0x04, 0x0000), (0x04, 0x0000)], answers
    assert _rows(node) == 2


def test_a_second_command_before_the_first_ones_data_set_is_still_aborted(tmp_path, start_node):
    """What the split must not open: a C-STORE-RQ's command, then another command in the
    same P-DATA (the first one's data set was due). Aborted, nothing stored."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x03, _command(_store_fields(b, 2))), (1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 1)
    assert answers in ([], [(0x07, None)]), answers
    assert _rows(node) == 0


# -- PostgreSQL failing while C-STOREs are committed ----------------------------------------
def _storescu_statuses(output: str) -> dict[str, str]:
    """storescu -v: each file sent and the status of its answer ("Success", "Out of
    Resources", ...); a file whose answer never came (the association ended) is absent."""
    import re

    out, current = {}, None
    for line in output.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Received Store Response \(([^)]*)\)", line)
        if m and current is not None:
            out[current] = m.group(1)
            current = None
    return out


def _sop_uid(path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _stored(url: str, data_dir) -> dict[str, bool]:
    """Per SOP Instance UID with a row: whether its spool file is there and matches the
    row's digest."""
    from sqlalchemy import create_engine, text

    from node.spool import matches_digest

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("select sop_instance_uid, path, digest from instances")).all()
    finally:
        engine.dispose()
    return {sop: (data_dir / path).is_file() and matches_digest(data_dir / path, digest) for sop, path, digest in rows}


def test_postgresql_crashing_while_c_stores_are_committed_loses_no_acknowledged_object(tmp_path, start_node):
    """Four dcmtk storescu send 12 objects each at once (their rows share the group
    commit's transactions) while PostgreSQL is crashed (immediate shutdown, every backend
    gone at once) and started again 2 s later (crash recovery). The server runs as
    production runs it: fsync and synchronous_commit on.

    Every object answered Success has its row after the restart and its spool file
    matching the row's digest; every other answer is a failure status (the sender keeps
    it), and sending all of them again afterwards stores each (a row the crash left
    committed without its answer is adopted by the re-send, not refused)."""
    import os
    import subprocess
    import threading
    import time

    import pytest

    from tests import pg
    from tests.conftest import dcmtk_env, make_study, node_config, wait_until

    why = pg.missing()
    if why:
        pytest.skip(why)
    cluster = pg.PostgresCluster(durable=True).start()
    procs: list[subprocess.Popen] = []
    try:
        name = cluster.create_database()
        url = cluster.url(name)
        raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, database_url=url)
        node = start_node(raw, schedule=False)
        port = node.settings.node.port
        folders = [tmp_path / f"send{k}" for k in range(4)]
        files = {k: make_study(folders[k], n=12) for k in range(4)}
        outputs: dict[int, str] = {}

        def send(k: int) -> None:
            proc = subprocess.Popen(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files[k])],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
            procs.append(proc)
            outputs[k] = proc.communicate(timeout=240)[0]

        def rows() -> int:
            try:
                import psycopg

                with psycopg.connect(host="127.0.0.1", port=cluster.port, user=pg.SUPERUSER, dbname=name, connect_timeout=5) as c:
                    return int(c.execute("select count(*) from instances").fetchone()[0])
            except Exception:
                return -1

        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: rows() >= 6, timeout=120, interval=0.02, what="some rows committed")
        cluster.crash()
        time.sleep(2)
        cluster.restart()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a storescu did not end"

        statuses: dict[str, str] = {}
        for k in range(4):
            statuses.update(_storescu_statuses(outputs[k]))
        assert statuses, "storescu printed no answer"
        succeeded = {_sop_uid(p) for p, s in statuses.items() if s == "Success"}
        failed = {_sop_uid(p) for p, s in statuses.items() if s != "Success"}
        stored = _stored(url, node.settings.node.data_dir)
        lost = [uid for uid in succeeded if not stored.get(uid)]
        assert not lost, f"{len(lost)} object(s) answered Success missing from the database or the spool"
        assert failed, "the crash cost no C-STORE a failure: nothing was tested"  # a test that cannot fail otherwise

        # Everything again, one storescu: each object is stored (or stored before) now.
        every = [p for k in range(4) for p in files[k]]
        again = subprocess.run(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, every)],
                               capture_output=True, text=True, env=dcmtk_env(), timeout=240)
        second = _storescu_statuses(again.stdout + again.stderr)
        assert set(second.values()) == {"Success"}, sorted(set(second.values()))
        stored = _stored(url, node.settings.node.data_dir)
        assert len(stored) == len(every) and all(stored.values()), f"{sum(stored.values())} of {len(every)} stored with their files"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.stop()
