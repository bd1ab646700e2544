"""``[node] receivers``: several processes receiving on one port (node.receivers)."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import STORESCU, NodeProcess, child_pids, dcmtk_env, is_alive, make_study, needs_dcmtk, node_config, wait_until, write_toml

pytestmark = [needs_dcmtk, pytest.mark.slow]


def _rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "casemask.db") as db:
        return db.execute("select count(*) from instances").fetchone()[0]


def _node(tmp_path: Path, name: str, port: int | None = None, receivers: int = 3) -> tuple[NodeProcess, dict]:
    raw = node_config(tmp_path / name, [{"name": "f", "kind": "folder", "path": str(tmp_path / f"out-{name}")}], stable_after_s=3600, receivers=receivers)
    if port is not None:
        raw["node"]["port"] = port
    return NodeProcess(write_toml(raw, tmp_path / f"{name}.toml"), tmp_path / f"{name}.log"), raw


def test_receivers_share_the_port_store_everything_and_die_with_the_node(tmp_path):
    """receivers = 3: one port, said once in the log; every object stored; the receiver
    processes die with the node and the port is free again."""
    node, raw = _node(tmp_path, "a")
    port = raw["node"]["port"]
    corpora = [tmp_path / f"in{k}" for k in range(8)]
    for c in corpora:
        make_study(c, 10)
    node.start(port)
    try:
        receivers = child_pids(node.proc.pid)  # type: ignore[union-attr]
        assert len(receivers) == 2, "receivers = 3: the node and two receiver processes"
        senders = [subprocess.Popen([STORESCU, "-aec", "CASEMASK", "+sd", "127.0.0.1", str(port), str(c)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in corpora]
        for s in senders:
            out, _ = s.communicate(timeout=180)
            assert s.returncode == 0, out
        assert _rows(Path(raw["node"]["data_dir"])) == 80
        # A receiver's log lines reach the node's log through a pipe, a moment later.
        wait_until(lambda: "[receiver " in (log := (tmp_path / "a.log").read_text()) and "study" in log, timeout=30, what="an association logged by a receiver process")
        assert (tmp_path / "a.log").read_text().count("listening as CASEMASK") == 1, "one port, said once (not by each of the 3 processes)"
    finally:
        node.kill()
    # SIGKILL of the node: its receivers go with it and the port is free again.
    wait_until(lambda: not any(is_alive(p) for p in receivers), timeout=10, what="the receivers to die with the node")

    def bindable() -> bool:
        with socket.socket() as s:  # SO_REUSEADDR: the closed connections' TIME_WAIT does not count
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    # The kernel finishes closing the killed processes' connections (FIN/ACK on loopback) a
    # moment after they are gone; a listener left behind would keep the port for good.
    if not bindable():
        try:
            wait_until(bindable, timeout=10, what=f"port {port} to be free")
        except AssertionError:
            held = subprocess.run(["ss", "-tanp", f"sport = :{port}"], capture_output=True, text=True).stdout if shutil.which("ss") else "(no ss to list the sockets)"
            raise AssertionError(f"port {port} still held 10 s after the node was killed:\n{held}") from None


def test_a_second_node_on_a_port_in_use_does_not_start(tmp_path):
    first, raw = _node(tmp_path, "first")
    port = raw["node"]["port"]
    first.start(port)
    try:
        second, _ = _node(tmp_path, "second", port=port)
        with pytest.raises(RuntimeError, match="node exited"):
            second.start(_unused_port())  # waits on a port nobody opens: until it exits
        assert "already in use" in (tmp_path / "second.log").read_text()
    finally:
        first.stop()


def _unused_port() -> int:
    from tests.conftest import free_port

    return free_port()


# -- group commit (node.groupcommit) ------------------------------------------------------------
def _received(study: str, sop: str, path: str = "p") -> object:
    from node import queue

    return queue.Received(sop, "1.2.840.10008.5.1.4.1.1.2", study, "1.2.3.9", "CT", "1.2.840.10008.1.2.1", path, 10, "MODALITY1", "CASEMASK", "127.0.0.1", identity="id")


def test_a_batch_with_a_resend_commits_every_other_row_and_answers_each_its_own(tmp_path):
    from concurrent.futures import Future

    from node.db import make_engine
    from node.groupcommit import GroupCommit

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    changes = []
    gc = GroupCommit(engine, lambda r, change: changes.append(change))
    try:
        assert gc.record(_received("1.2.3.1", "1.2.3.1.1", "first")) is None
        batch = [(_received("1.2.3.1", "1.2.3.1.2"), Future()), (_received("1.2.3.1", "1.2.3.1.1"), Future()), (_received("1.2.3.2", "1.2.3.2.1"), Future())]
        with engine.connect() as conn:
            gc._commit(conn, batch)  # the batch fails on its second row: each on its own
        results = [done.result(timeout=5) for _, done in batch]
        assert results == [None, ("id", "first", None), None]  # (identity, path, digest) of the stored row
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select count(*) from instances").scalar() == 3
            assert conn.exec_driver_sql("select count(*) from studies").scalar() == 2
        assert len(changes) == 2, "one 'RECEIVING' per new study, logged once committed"
    finally:
        gc.close()
        engine.dispose()


def test_four_associations_sending_the_same_study_at_once_store_it_once(tmp_path, start_node):
    node = start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600))
    port = node.settings.node.port
    files = make_study(tmp_path / "s", 30)
    senders = [subprocess.Popen([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    for s in senders:
        out, _ = s.communicate(timeout=180)
        assert s.returncode == 0, out
    assert _rows(node.settings.node.data_dir) == 30
    assert len([p for p in (node.settings.node.data_dir / "spool").rglob("*.dcm")]) == 30


def test_a_reload_reaches_the_receivers(tmp_path):
    """SIGHUP with a source removed: the receivers take the new [[sources]] too, so no
    process lets the removed modality in."""
    import signal

    node, raw = _node(tmp_path, "r")
    port = raw["node"]["port"]
    files = make_study(tmp_path / "in", 1)
    node.start(port)
    try:
        raw["sources"] = [s for s in raw["sources"] if s["ae_title"] != "STORESCU"]
        write_toml(raw, tmp_path / "r.toml")
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        log = tmp_path / "r.log"
        wait_until(lambda: log.read_text().count("[[sources]] and accept_unknown_sources taken") == 2, timeout=30, what="both receivers to take the reload")
        for _ in range(8):  # spread over the three processes by the kernel
            r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), str(files[0])], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "Rejected" in r.stderr, r.stderr
        assert _rows(Path(raw["node"]["data_dir"])) == 0
    finally:
        node.stop()


_TAKES_SETTINGS = """
import pickle, sys, time
from pathlib import Path
while True:
    try:
        pickle.load(sys.stdin.buffer)  # settings the node sent
    except EOFError:  # the node closed the pipe
        break
    if sys.argv[1] != "silent":
        time.sleep(0.3)  # applying them takes a moment
        Path(sys.argv[1]).write_text("taken")
        sys.stdout.buffer.write(b"reloaded\\n")
        sys.stdout.buffer.flush()
"""


def test_a_reload_returns_once_every_receiver_has_taken_it(tmp_path, caplog):
    """Receivers.update (a SIGHUP or API reload) returns only once each receiver says it
    took the new settings: before, a reload reported done could meet a receiver still
    admitting a source the reload removed. One that never says so holds the reload up
    for wait_s at most, and is named."""
    import sys
    import threading

    from node.config import parse
    from node.receivers import Receivers, _read_receiver
    from tests.conftest import ROOT

    settings = parse(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), "test", base_dir=tmp_path)
    receivers = Receivers(settings, 0, writer="n/1", slots_fd=-1)
    marks = [tmp_path / "taken-1", tmp_path / "taken-2"]
    procs = [subprocess.Popen([sys.executable, "-c", _TAKES_SETTINGS, str(m)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT) for m in marks]
    procs.append(subprocess.Popen([sys.executable, "-c", _TAKES_SETTINGS, "silent"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT))
    try:
        for p in procs:
            threading.Thread(target=_read_receiver, args=(p.stdout, p.pid, threading.Event()), kwargs={"on_reloaded": receivers._confirmed}, daemon=True).start()
        receivers.procs = procs[:2]
        receivers.update(settings)
        assert all(m.exists() for m in marks), "the reload returned before every receiver had taken it"
        receivers.procs = procs
        receivers.update(settings, wait_s=1.0)  # returns although one never confirms
        assert f"receiver process(es) {procs[2].pid} did not confirm the new configuration" in caplog.text
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(30)


def test_receiver_counters_are_added_to_the_nodes(monkeypatch):
    """A receiver's counter growth, as its JSON lines, lands in the node's counters."""
    import io
    import threading

    from prometheus_client import REGISTRY

    from node import metrics, receivers

    out = io.BytesIO()
    monkeypatch.setattr("sys.stdout", type("Out", (), {"buffer": out})())
    reporter = receivers._CountReporter()
    reporter.report()  # what was counted before is sent once
    out.seek(0)
    out.truncate()
    before = REGISTRY.get_sample_value("casemask_instances_received_total") or 0.0
    metrics.observe_received(1000)
    metrics.ASSOCIATIONS.labels(result="accepted").inc()
    reporter.report()
    reporter.report()  # nothing grew since: nothing sent
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    accepted = REGISTRY.get_sample_value("casemask_associations_total", {"result": "accepted"})
    receivers._read_receiver(io.BytesIO(lines[0] + b"\n"), 0, threading.Event())  # here the same registry: counted twice
    assert REGISTRY.get_sample_value("casemask_instances_received_total") == before + 2
    assert REGISTRY.get_sample_value("casemask_associations_total", {"result": "accepted"}) == accepted + 1


# -- node-wide association limits (node.slots) -----------------------------------------------------
_HOLD_SLOT = """
import sys, time
from node.slots import SharedSlots
slots = SharedSlots.attach(int(sys.argv[1]), 2, 1, lambda holder: True)
class Holder: pass
holder = Holder()
assert slots.take(holder, "10.0.0.1") == ""
print("held", flush=True)
time.sleep(600)
"""


class _Holder:
    """Stands for an association (the table only keeps a weak reference to it)."""


def test_slots_are_counted_across_processes_and_a_dead_processs_slots_come_back():
    """Two processes share one table of 2 slots, 1 per host: the other process's slot
    counts towards both limits, and once that process is SIGKILLed its slot is free."""
    import signal
    import sys

    from tests.conftest import ROOT

    from node.slots import SharedSlots

    open_holders: set[int] = set()
    slots = SharedSlots.create(2, 1, lambda holder: id(holder) in open_holders)
    child = subprocess.Popen([sys.executable, "-c", _HOLD_SLOT, str(slots.fd)], pass_fds=(slots.fd,), stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        a, b, c = _Holder(), _Holder(), _Holder()
        open_holders.update(map(id, (a, b, c)))
        assert "max_associations_per_host = 1" in slots.take(a, "10.0.0.1"), "the other process holds 10.0.0.1's one slot"
        assert slots.take(b, "10.0.0.2") == ""
        assert "max_associations = 2" in slots.take(c, "10.0.0.3")
        assert slots.in_use() == 2
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert slots.take(c, "10.0.0.3") == "", "the dead process's slot was taken back"
        assert "max_associations = 2" in slots.take(a, "10.0.0.1")
        open_holders.discard(id(b))  # an association of this process that ended without its close event
        assert slots.take(a, "10.0.0.1") == ""
        slots.give_back(c)
        assert slots.in_use() == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        slots.close()


def _associate(port: int, source: str = "127.0.0.1"):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="CASEMASK", bind_address=(source, 0))


def _rejections(log: Path) -> tuple[int, int]:
    """Associations rejected for a local limit, by the node process and by receivers."""
    lines = [ln for ln in log.read_text().splitlines() if "rejected (local limit exceeded" in ln]
    by_receiver = sum("[receiver " in ln for ln in lines)
    return len(lines) - by_receiver, by_receiver


def _associate_once_free(port: int):
    """An association, retried (bounded) while the node still counts one the test has
    just released: release() returns on the A-RELEASE-RP, a moment before the node's
    side of that association ends and frees its slot."""
    for _ in range(50):
        a = _associate(port)
        if a.is_established:
            return a
        time.sleep(0.1)
    raise AssertionError("no association admitted within 5 s of a released slot")


def _hold_one_in_each(port: int, node_pid: int, receiver: int) -> dict[str, object]:
    """One association held by the node process and one by the receiver ({"node": ...,
    "receiver": ...}). The less busy process accepts first (node.sharedport), but a
    connection still closing (the test's port probe, a released association) counts
    for a moment: retry, bounded."""
    held: dict[str, object] = {}
    for _ in range(60):
        a = _associate_once_free(port)
        owner = _server_pid(port, a.dul.socket.socket.getsockname()[1], [node_pid, receiver])  # type: ignore[attr-defined]
        kind = "receiver" if owner == receiver else "node" if owner == node_pid else ""
        if kind and kind not in held:
            held[kind] = a
            if len(held) == 2:
                return held
        else:
            a.release()  # type: ignore[attr-defined]
    for a in held.values():
        a.release()  # type: ignore[attr-defined]
    raise AssertionError("no association was ever accepted by each process")


def _third_is_rejected_by_every_process(port: int, log: Path, source: str = "127.0.0.1") -> None:
    """With the limit reached by one association in each process, open one more again
    and again (both processes are as busy: either accepts it) until both processes have
    rejected one; each must be rejected."""
    for _ in range(60):
        a = _associate(port, source)
        established = a.is_established
        if established:
            a.release()
        assert a.is_rejected and not established, "an association beyond the node's limit was accepted"
        if all(_rejections(log)):
            return
    raise AssertionError(f"the kernel never gave the extra association to both processes: {_rejections(log)}")


@pytest.mark.parametrize("limit", ["max_associations", "max_associations_per_host"])
def test_association_limits_hold_for_the_whole_node_with_two_receivers(tmp_path, limit):
    """receivers = 2 and a limit of 2: with two associations open (one in each process),
    a third is rejected (A-ASSOCIATE-RJ) whichever process accepts it; for the per-host
    limit, another host is still admitted."""
    kw = {"max_associations": 2, "max_associations_per_host": 8} if limit == "max_associations" else {"max_associations": 8, "max_associations_per_host": 2}
    node, raw = _node(tmp_path, "lim", receivers=2)
    raw["node"].update(kw)
    write_toml(raw, tmp_path / "lim.toml")
    port = raw["node"]["port"]
    node.start(port)
    held: list = []
    try:
        node_pid = node.proc.pid  # type: ignore[union-attr]
        held = list(_hold_one_in_each(port, node_pid, *child_pids(node_pid)).values())
        _third_is_rejected_by_every_process(port, tmp_path / "lim.log")
        other = _associate(port, "127.0.0.2")
        try:
            assert other.is_established == (limit == "max_associations_per_host")
        finally:
            if other.is_established:
                other.release()
        for a in held:
            a.release()
        held = []

        def two_again() -> bool:
            """Released slots are free again. The sender's release() returns on the
            A-RELEASE-RP, a moment before the node's side of the association ends, so
            an immediate retry may meet the old count (a transient rejection): poll."""
            for a in held:
                if a.is_established:
                    a.release()
            held[:] = [_associate(port) for _ in range(2)]
            return all(a.is_established for a in held)

        wait_until(two_again, timeout=10, interval=0.2, what="both released slots to be free again")
    finally:
        for a in held:
            if a.is_established:
                a.release()
        node.stop()


def _server_pid(node_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the accepted socket of the connection from
    ``client_port`` to ``node_port`` (Linux /proc)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == node_port and int(f[2].split(":")[1], 16) == client_port:
            inode = f[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if fd.readlink().name == f"socket:[{inode}]" or str(fd.readlink()) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def test_a_receiver_killed_while_holding_an_association_leaks_no_slot(tmp_path):
    """receivers = 2, max_associations = 2: one association on the receiver process and
    one on the node process; SIGKILL the receiver. Its slot comes back (one more
    association is admitted), and the limit still holds (the next is rejected)."""
    import os
    import signal

    node, raw = _node(tmp_path, "dead", receivers=2)
    raw["node"]["max_associations"] = 2
    write_toml(raw, tmp_path / "dead.toml")
    port = raw["node"]["port"]
    node.start(port)
    held: dict[str, object] = {}
    extra = []
    try:
        node_pid = node.proc.pid  # type: ignore[union-attr]
        (receiver,) = child_pids(node_pid)
        held.update(_hold_one_in_each(port, node_pid, receiver))
        assert _associate(port).is_rejected
        os.kill(receiver, signal.SIGKILL)
        wait_until(lambda: not is_alive(receiver), timeout=30, what="the receiver to die")
        wait_until(lambda: held["receiver"].is_aborted or not held["receiver"].is_established, timeout=30, what="its association to end")  # type: ignore[attr-defined]
        extra.append(_associate(port))
        assert extra[-1].is_established, "the dead receiver's slot was not taken back"
        extra.append(_associate(port))
        assert extra[-1].is_rejected, "the limit no longer holds after the receiver died"
    finally:
        for a in [*held.values(), *extra]:
            if a.is_established:  # type: ignore[attr-defined]
                a.release()  # type: ignore[attr-defined]
        node.stop()


# -- one listening socket, the idlest process accepts first (node.sharedport) ---------------------
def _established(port: int) -> int:
    """Connections to ``port`` open on the node's side: ESTABLISHED or CLOSE_WAIT (Linux /proc)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if int(line.split()[1].split(":")[1], 16) == port and line.split()[3] in ("01", "08"))


def test_associations_go_to_the_least_busy_process(tmp_path):
    """receivers = 2: four associations opened one after another (each held) end up two
    in each process, three times over. With SO_REUSEPORT the kernel chose by a hash of
    the addresses (2-2 in 3 of 8 splits); here both processes accept from one socket and
    the busier one leaves a waiting connection to the other (node.sharedport)."""
    from collections import Counter

    node, raw = _node(tmp_path, "spread", receivers=2)
    port = raw["node"]["port"]
    node.start(port)
    try:
        pids = [node.proc.pid, *child_pids(node.proc.pid)]  # type: ignore[union-attr]
        assert len(pids) == 2
        for _ in range(3):
            wait_until(lambda: _established(port) == 0, timeout=30, what="the last round's connections to close")
            held = []
            try:
                for _ in range(4):
                    a = _associate(port)
                    assert a.is_established
                    held.append(a)
                owners = Counter(_server_pid(port, a.dul.socket.socket.getsockname()[1], pids) for a in held)
            finally:
                for a in held:
                    a.release()
            assert sorted(owners.values()) == [2, 2], f"four associations split {dict(owners)} over the node's two processes"
    finally:
        node.stop()


def test_the_shared_socket_is_bound_once_without_reuseport(tmp_path):
    """The node's processes share one listening socket: /proc lists one listener on the
    port, and a socket with SO_REUSEPORT cannot bind next to it (a second node could
    with the old per-process sockets only if it set SO_REUSEPORT too; now nobody can)."""
    node, raw = _node(tmp_path, "once", receivers=3)
    port = raw["node"]["port"]
    node.start(port)
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        assert sum(1 for line in lines if int(line.split()[1].split(":")[1], 16) == port and line.split()[3] == "0A") == 1
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError, match="in use"):
                s.bind(("127.0.0.1", port))
    finally:
        node.stop()


# -- a receiver that dies is started again (node.receivers.Restarts) ------------------------------
def test_a_sigkilled_receiver_is_restarted_and_serves_the_port(tmp_path):
    """receivers = 2: SIGKILL the receiver process. The node logs its death, starts
    another in its place, and the kernel hands connections to the new one (an
    association served by the new process, and a C-STORE through it stored)."""
    import os
    import signal

    node, raw = _node(tmp_path, "restart", receivers=2)
    port = raw["node"]["port"]
    files = make_study(tmp_path / "in", 1)
    node.start(port)
    try:
        log = tmp_path / "restart.log"
        wait_until(lambda: " started (id " in log.read_text(), timeout=60, what="the node to finish starting (a receiver listens a moment before the node hears so)")
        node_pid = node.proc.pid  # type: ignore[union-attr]
        (first,) = child_pids(node_pid)
        os.kill(first, signal.SIGKILL)
        replaced = wait_until(lambda: [p for p in child_pids(node_pid) if p != first and is_alive(p)], timeout=60, what="a receiver started in place of the killed one")
        (second,) = replaced  # type: ignore[misc]
        wait_until(lambda: "listening (started in place of one that died)" in log.read_text(), timeout=60, what="the new receiver to listen")
        text = log.read_text()
        assert f"receiver process {first} died (killed by SIGKILL)" in text
        for _ in range(60):  # the kernel spreads connections over the two processes
            a = _associate(port)
            assert a.is_established
            owner = _server_pid(port, a.dul.socket.socket.getsockname()[1], [node_pid, second])
            a.release()
            if owner == second:
                break
        else:
            raise AssertionError("the kernel never gave an association to the restarted receiver")
        for _ in range(30):
            r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), str(files[0])], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        assert _rows(Path(raw["node"]["data_dir"])) == 1
        assert is_alive(second) and child_pids(node_pid) == [second]
    finally:
        node.stop()


def test_restarts_back_off_and_give_up_after_quick_deaths():
    """The restart policy: pauses that double with each quick death in a row (1, 2, 4 s,
    at most the cap), back to the first after a receiver lived long, and no restart
    after max_quick quick deaths in a row."""
    from node.receivers import Restarts

    r = Restarts(quick_s=60, max_quick=4, first_s=1, max_s=3)
    assert [r.after_death(1.0) for _ in range(3)] == [1, 2, 3]
    assert r.after_death(600.0) == 1, "a receiver that lived long starts the count again"
    assert [r.after_death(0.5) for _ in range(3)] == [1, 2, 3]
    assert r.after_death(0.5) is None, "the fourth quick death in a row: given up"
