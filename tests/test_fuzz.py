"""Hostile and broken traffic, bounded and seeded (hypothesis): the node keeps serving,
its threads, file descriptors and memory return to where they were, and no row exists
for an object it did not acknowledge. Plus the byte readers of node.wire against
pydicom as the oracle.

Sizes here keep the run under a minute; docs/security.md gives a longer run's figures
(``CASEMASK_FUZZ_EXAMPLES=N`` scales both fuzzers)."""

from __future__ import annotations

import gc
import io
import itertools
import logging
import os
import random
import struct
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.filereader import read_dataset
from sqlalchemy import select

from node import wire
from node.db import Instance
from tests import rawdicom as rd
from tests.conftest import PYDICOM_FILES, STORESCU, make_study, node_config, read_quietly, wait_until
from tests.test_node import storescu

EXAMPLES = int(os.environ.get("CASEMASK_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(
    deadline=None,
    derandomize=True,  # seeded: the same cases every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def open_fds(database: bool = False) -> int:
    """Open file descriptors of this process: those of the SQLite database (its pooled
    connections, three each: bounded by the pool, kept open for reuse) when ``database``,
    else all the others (sockets, spool files, pipes)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (listdir's own descriptor among them)
            continue
        n += "casemask.db" in target.rsplit("/", 1)[-1] if database else "casemask.db" not in target.rsplit("/", 1)[-1]
    return n


# -- the node under fire ------------------------------------------------------------------------
@pytest.fixture
def target(tmp_path, start_node):
    """One node for every example; the test asserts on it after the last one."""
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600,
                      network_timeout_s=3.0, acse_timeout_s=3.0, dimse_timeout_s=3.0, max_associations_per_host=16, max_object_mb=1)
    node = start_node(raw, schedule=False)
    base = dcmread(make_study(tmp_path / "in", 1)[0])
    del base.PixelData
    return {"node": node, "port": node.settings.node.port, "base": base, "acked": set(), "uids": itertools.count(1)}


DAMAGES = ["intact", "cut", "inflate", "no-last", "garbage-pdv", "oversized-pdu", "wrong-context", "flip", "huge-element", "invalid-uid"]
CONTEXTS = st.lists(
    st.tuples(
        st.integers(0, 255),
        st.sampled_from([rd.CT_IMAGE_STORAGE, rd.VERIFICATION, "1.2.826.0.1.3680043.8.498.1", "", "1.2/../x", "9" * 70, "\x00\xff"]),
        st.lists(st.sampled_from([rd.EXPLICIT_VR_LE, rd.IMPLICIT_VR_LE, "1.2.840.10008.1.2.4.50", "1.2.3.4", "", "x" * 80]), max_size=4),
    ),
    max_size=4,
)


def _mutate(data: bytes, draw) -> bytes:
    """Flip, cut or insert a few bytes."""
    how = draw(st.sampled_from(["none", "flip", "cut", "insert"]))
    if not data or how == "none":
        return data
    k = draw(st.integers(0, len(data) - 1))
    if how == "flip":
        return data[:k] + bytes([data[k] ^ draw(st.integers(1, 255))]) + data[k + 1 :]
    if how == "cut":
        return data[:k]
    return data[:k] + draw(st.binary(min_size=1, max_size=16)) + data[k:]


@st.composite
def conversations(draw):
    """What one hostile or broken client does on one connection."""
    kind = draw(st.sampled_from(["garbage", "associate", "associate", "store", "store", "store"]))
    if kind == "garbage":
        prefix = draw(st.sampled_from([b"", b"\x01\x00", b"\x04\x00", b"\x07\x00\x00\x00\x00\x04", b"\x01\x00\xff\xff\xff\xff"]))
        return ("garbage", prefix + draw(st.binary(max_size=512)))
    if kind == "associate":
        contexts = [(2 * (cid % 128) + 1, a, ts) for cid, a, ts in draw(CONTEXTS)]
        declared = draw(st.sampled_from([None, None, 0, 1, 68, 0xFFFFFFFF, 2 * 1024 * 1024]))
        rq = rd.associate_rq(calling=draw(st.sampled_from(["MODALITY1", "INTRUDER", ""])), contexts=contexts, declared_length=declared)
        return ("associate", _mutate(rq, draw))
    damage = draw(st.sampled_from(DAMAGES + ["cut", "intact"]))
    return ("store", damage, draw(st.integers(0, 2**31)), draw(st.sampled_from([16, 100, 1000, 4000, 16000])))


def _associated(port: int) -> rd.Raw:
    """A connection with an accepted association; a transient rejection (the node still
    counts associations whose close it has not processed yet) is retried, as a modality
    would."""
    for _ in range(100):
        c = rd.Raw(port, timeout=30.0)  # the A-ASSOCIATE-AC may take seconds on a loaded machine; None would fail below
        if c.send(rd.associate_rq()):
            reply = c.read_pdu()
            if reply is not None and reply[0] == 0x02:
                c.sock.settimeout(3.0)  # what the conversation reads next may never be answered
                return c
            c.close()
            assert reply is not None and reply[0] == 0x03 and reply[1][1] == 0x02, "a well-formed association is accepted (or refused for a while)"
        else:
            c.close()
        time.sleep(0.1)
    raise AssertionError("a well-formed association was refused for 10 s")


def _play(t: dict, conv) -> None:
    if conv[0] == "store":
        with _associated(t["port"]) as c:
            _store(t, c, *conv[1:])
        return
    with rd.Raw(t["port"], timeout=3.0) as c:
        if conv[0] == "garbage":
            c.send(conv[1])
            return
        if conv[0] == "associate":
            rq = conv[1]
            whole = len(rq) >= 6 and struct.unpack(">I", rq[2:6])[0] == len(rq) - 6
            if c.send(rq) and whole:
                c.sock.settimeout(1.0)
                c.read_pdu()  # an AC, an RJ, an abort or a close: anything but a hang


def _store(t: dict, c: rd.Raw, damage: str, seed: int, fragment: int) -> None:
    """One C-STORE with ``damage`` done to it, on an accepted association."""
    ds = t["base"].copy()
    uid = f"2.25.{next(t['uids'])}{seed}"
    ds.SOPInstanceUID = uid
    data = rd.encode(ds, implicit=False)
    if damage == "invalid-uid":
        data = data.replace(uid.encode(), (uid[:-1] + "/").encode())
    command = rd.c_store_command(rd.CT_IMAGE_STORAGE, uid)
    must_fail = damage in ("inflate", "huge-element", "invalid-uid", "garbage-pdv", "wrong-context", "oversized-pdu")
    if damage == "cut":
        data = data[: seed % max(1, len(data) - 1)]
        must_fail = not _pydicom_reads_whole(data)  # a cut between two elements leaves a valid data set
    elif damage == "inflate":  # an element declares more than arrives (Series Instance UID's length)
        k = data.rfind(b"\x20\x00\x0e\x00")
        data = data[: k + 6] + struct.pack("<H", 0xFFF0) + data[k + 8 :]
    elif damage == "flip":  # anything may happen, but never a hang
        k = seed % len(data)
        data = data[:k] + bytes([data[k] ^ 0x5A]) + data[k + 1 :]
    elif damage == "huge-element":  # beyond max_object_mb (1 MiB), in fragments of at least 16 KB
        fragment = max(fragment, 16000)
        data = data + struct.pack("<HH2sHI", 0x0009, 0x0010, b"OB", 0, 1536 * 1024) + b"\x00" * (1536 * 1024)
    pdus = rd.c_store_pdus(command, data, fragment=fragment, last=damage != "no-last")
    if damage == "garbage-pdv":
        pdus[1:] = [rd.p_data([(1, seed % 4, random.Random(seed).randbytes(seed % 300))])]
    elif damage == "wrong-context":
        pdus = [rd.p_data([(99, 0x03, command)])]
    elif damage == "oversized-pdu":
        pdus = [struct.pack(">BBI", 0x04, 0, 16 * 1024 * 1024) + b"\x00" * 1000]
    for pdu in pdus:
        if not c.send(pdu):
            return
    if damage == "no-last":
        return  # hang up with the data set unfinished
    # An answer, an abort or a close comes within the node's own timeouts (3 s idle); a
    # Success read after the client gave up would count as never acknowledged.
    c.sock.settimeout(0.5 if damage == "garbage-pdv" else 30.0)  # garbage-pdv: an unfinished message is awaited, not answered
    reply = c.read_pdu()
    if not reply or reply[0] != 0x04:
        return  # aborted or closed: nothing acknowledged
    status = rd.store_status(reply[1])
    if status == 0x0000:
        t["acked"].add(uid)
        assert not must_fail, f"Success for a {damage} data set"
    c.send(rd.RELEASE_RQ)
    c.read_pdu()


def test_hostile_traffic_leaves_the_node_serving_and_nothing_unacknowledged(target, tmp_path):
    t = target
    # Warm up (first imports, pynetdicom's and pydicom's caches) before taking the figures
    # everything must return to.
    for damage in DAMAGES:
        _play(t, ("store", damage, 12345, 16000))
    _play(t, ("associate", rd.associate_rq()))
    gc.collect()
    threads0, fds0, rss0 = threading.active_count(), open_fds(), rss_kib()
    played: list = []

    @settings(FUZZ, max_examples=EXAMPLES or 600)
    @given(conversations())
    def one(conv) -> None:
        played.append(conv)
        _play(t, conv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one()
        # Memory: hypothesis keeps what it generated, and pytest every log record (and what
        # it references), so the Python memory the node keeps is measured over a replay of
        # those conversations, with neither running.
        root = logging.getLogger()
        saved, root.handlers = root.handlers, [logging.NullHandler()]
        try:
            gc.collect()
            tracemalloc.start(1)
            for conv in played[: max(150, len(played) // 4)]:
                _play(t, conv)
            # Thousands of connect-and-close in a loop.
            for _ in range(EXAMPLES or 2000):
                with rd.Raw(t["port"], timeout=3.0):
                    pass
            wait_until(lambda: threading.active_count() <= threads0 + 2, timeout=30, what=f"threads back to about {threads0}")
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
        finally:
            root.handlers = saved
    node = t["node"]
    # A normal modality right after.
    if STORESCU:
        r = storescu(t["port"], make_study(tmp_path / "after", 2))
        assert r.returncode == 0, r.stdout + r.stderr
        t["acked"] |= {str(dcmread(f).SOPInstanceUID) for f in (tmp_path / "after").iterdir()}
    wait_until(lambda: threading.active_count() <= threads0 + 2, timeout=30, what=f"threads back to about {threads0}")
    wait_until(lambda: open_fds() <= fds0 + 5, timeout=30, what=f"file descriptors back to about {fds0}")
    bound = node.engine.pool.size() + node.settings.node.db_max_overflow  # the role's pool (node.db.pool_size_for)
    assert open_fds(database=True) <= 3 * bound, "database connections beyond the pool's bound"
    gc.collect()
    kept = sum(stat.size for stat in snapshot.statistics("filename"))
    top = "\n".join(str(x) for x in snapshot.statistics("traceback")[:3] for x in [x, *x.traceback.format()[-8:]])
    assert kept < 2 * 1024 * 1024, f"{kept / 2**20:.1f} MiB allocated during the replay are still held; largest:\n{top}"
    # The resident size also counts glibc's per-thread malloc arenas, which keep freed
    # memory for reuse (one per thread that allocated, up to 8 per core): it grows with
    # the threads a run has seen, then levels off; only a gross growth fails here.
    grown = rss_kib() - rss0
    assert grown < 256 * 1024, f"resident memory grew by {grown / 1024:.0f} MiB"
    with node.sessions() as s:
        stored = set(s.scalars(select(Instance.sop_instance_uid)))
    assert stored <= t["acked"], f"{len(stored - t['acked'])} rows for objects never acknowledged"
    incoming = node.settings.node.data_dir / "spool" / ".incoming"
    wait_until(lambda: not any(incoming.iterdir()), timeout=10, what="no incoming file left behind")
    assert len(t["acked"]) > 10, "the fuzzer should also produce accepted objects"


# -- node.wire against pydicom ---------------------------------------------------------------------
def _encodings() -> list[tuple[bool, bytes]]:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = []
    for path in sorted(PYDICOM_FILES.rglob("*.dcm"))[:40]:
        ds = read_quietly(path)
        if ds is None or "PixelData" in ds and len(ds.PixelData) > 200_000:
            continue
        for implicit in (True, False):
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, implicit
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    write_dataset(fp, ds)
            except Exception:
                continue
            out.append((implicit, fp.getvalue()))
    return out


ENCODINGS = _encodings()


def _pydicom_reads_whole(data: bytes, implicit: bool = False) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(data), implicit, True)
            for _ in ds.iterall():
                pass
        return True
    except Exception:
        return False


def _pydicom_row(data: bytes, implicit: bool) -> dict[str, str] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(data), implicit, True, stop_when=lambda tag, vr, length: tag > 0x0020000E, specific_tags=wire.ROW_TAGS)
            return wire._from_pydicom(ds)
    except Exception:
        return None


@settings(FUZZ, max_examples=EXAMPLES or 1500)
@given(st.sampled_from(range(len(ENCODINGS))), st.data())
def test_wire_scanner_agrees_with_pydicom_on_damaged_data(which, data):
    implicit, encoded = ENCODINGS[which]
    damaged = _mutate(_mutate(encoded, data.draw), data.draw)
    try:
        ours = wire._scan(damaged, implicit)
    except (wire._Unusual, struct.error, UnicodeDecodeError):
        ours = None  # left to pydicom: allowed
    if ours is not None:
        theirs = _pydicom_row(damaged, implicit)
        if theirs is not None:
            assert ours == theirs
    # dataset_end never runs past the data and raises only what it documents.
    try:
        end = wire.dataset_end(damaged, implicit)
        assert end <= len(damaged)
    except ValueError:  # Incomplete is a ValueError
        pass


@settings(FUZZ, max_examples=EXAMPLES or 600)
@given(st.sampled_from(range(len(ENCODINGS))), st.integers(0, 2**31))
def test_dataset_end_finds_every_cut(which, seed):
    """A whole data set ends where its bytes end; one cut short is found unless the cut
    falls between two top-level elements, and then pydicom reads the rest whole too."""
    implicit, encoded = ENCODINGS[which]
    assert wire.dataset_end(encoded, implicit) == len(encoded)
    cut = seed % len(encoded)
    try:
        end = wire.dataset_end(encoded[:cut], implicit)
    except wire.Incomplete:
        return
    except ValueError:
        return
    assert end == cut
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(io.BytesIO(encoded[:cut]), implicit, True)
        for _ in ds.iterall():  # decodes every element: nothing cut inside
            pass
