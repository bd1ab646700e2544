"""Shared fixtures: free ports, real peers (Orthanc, dcmtk, pynetdicom) and nodes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
PYDICOM_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
STORESCU = shutil.which("storescu", path="/usr/bin")
ECHOSCU = shutil.which("echoscu", path="/usr/bin")
ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
needs_dicomweb = pytest.mark.skipif(not Path(DICOMWEB_PLUGIN).exists(), reason="Orthanc's DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)")
needs_dcmtk = pytest.mark.skipif(STORESCU is None, reason="dcmtk is not installed (apt-get install -y dcmtk)")
needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install -y orthanc)")


# Ports for the servers tests start come from below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 by default), which every outgoing
# connection draws its source port from: a port handed out from inside that range can be
# taken by an unrelated outgoing connection (a storescu, a database client) before the
# server binds it, and a probe polling it before anyone listens can connect to itself
# (TCP simultaneous open). A port is never handed out twice in one session, so that a
# server started late never meets a port another test's server still holds.
_PORTS = range(20000, 32000)
_handed_out: set[int] = set()
_ports_lock = threading.Lock()
_random = random.SystemRandom()  # not the seeded module generator: two sessions at once draw differently


def _ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A loopback TCP port nothing is bound to now, outside the ephemeral range, not
    handed out before in this session."""
    ephemeral = _ephemeral_range()
    with _ports_lock:
        for _ in range(2000):
            port = _random.choice(_PORTS)
            if port in _handed_out or port in ephemeral:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: a TIME_WAIT on it counts as taken
                except OSError:
                    continue
            _handed_out.add(port)
            return port
        for _ in range(100):  # the ephemeral range covers ours on this machine: the kernel's choice
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1} outside the ephemeral range {ephemeral.start}-{ephemeral.stop - 1}")


def port_listens(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port``. A probe polling a port of the kernel's
    ephemeral range that nobody listens on yet can be given that very port as its own
    source port and connect to itself (TCP simultaneous open; free_port() avoids that
    range, other ports may be in it): that is not a listener, and is answered False."""
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            return s.getsockname() != s.getpeername()
    except OSError:
        return False


def wait_until(pred: Callable[[], object], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> object:
    """Poll ``pred`` until it returns something truthy (bounded); fail the test otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_logged(caplog, text: str, count: int = 1, timeout: float = 30.0) -> str:
    """Wait until ``text`` occurs ``count`` times (or more) in ``caplog``'s text, and
    return that text. With receiver processes (CASEMASK_TEST_RECEIVERS=2) an association
    the kernel gave to a receiver is logged there, and its records reach the node
    process's log through a pipe a moment after the peer got its answer; the caller
    then asserts the exact count."""
    wait_until(lambda: caplog.text.count(text) >= count, timeout=timeout, what=f"{count} x {text!r} in the log")
    return caplog.text


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# -- synthetic objects ---------------------------------------------------------------------
PHI = {
    "PatientName": "Doe^Janet^Q",
    "PatientID": "MRN-99812734",
    "PatientBirthDate": "19610704",
    "AccessionNumber": "ACC77129035",
    "InstitutionName": "Saint Synthetic Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "StudyID": "SID4471",
}


def make_study(folder: Path, n: int = 5, study_uid: str | None = None, phi: dict | None = None, modality: str = "CT") -> list[Path]:
    """``n`` small CT objects of one study, with synthetic PHI in their headers."""
    base = dcmread(PYDICOM_FILES / "CT_small.dcm")
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        ds = base.copy()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.Modality = modality
        ds.StudyDate = "20240311"
        for kw, v in (phi or PHI).items():
            setattr(ds, kw, v)
        p = folder / f"obj{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


# -- Orthanc ----------------------------------------------------------------------------------
def read_quietly(path):
    """The dataset of ``path``, or None where it is not one (pydicom ships a few such)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dcmread(path, force=True)
        except Exception:
            return None


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Orthanc:
    def __init__(self, workdir: Path, aet: str = "ORTHANC", dicomweb: bool = False, extra: dict | None = None, https_ca: Path | None = None, http_auth: tuple[str, str] | None = None) -> None:
        """``extra``: more Orthanc settings (DICOM TLS, HTTPS, users); ``https_ca``: its
        REST API is HTTPS with a certificate from this CA; ``http_auth``: (user, password)."""
        self.aet = aet
        self.https_ca, self.http_auth = https_ca, http_auth
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.workdir = workdir
        cfg = {
            "Name": "casemask-test-archive",
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "TcpNoDelay": True,
            "SyncStorageArea": True,
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "SaveJobs": False,
            "StableAge": 1,
        }
        cfg.update(extra or {})
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps(cfg))
        self.log = (workdir / "orthanc.log").open("wb")
        # Orthanc speaks DICOM through dcmtk, which reads TCP_NODELAY from the environment.
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir, env=dcmtk_env())
        try:
            wait_until(self._up, timeout=60, what="Orthanc to start")
        except BaseException:
            self.stop()  # a failed start leaves no Orthanc behind holding its ports
            raise

    def _up(self) -> bool:
        """Orthanc answers /system (it opens its DICOM port before its HTTP port) and
        is the process this object started (not another one on a reused port)."""
        import http.client

        if self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.workdir / 'orthanc.log'}")
        if not port_listens(self.http_port):
            return False
        try:
            self.get("/system")
        except (OSError, http.client.HTTPException):
            return False
        return self.proc.poll() is None and port_listens(self.dicom_port)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.https_ca else 'http'}://127.0.0.1:{self.http_port}"

    def get(self, path: str):
        import base64
        import ssl

        req = urllib.request.Request(self.base_url + path)
        if self.http_auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(self.http_auth).encode()).decode())
        ctx = ssl.create_default_context(cafile=str(self.https_ca)) if self.https_ca else None
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:  # Orthanc busy storing on a loaded machine
            return json.loads(r.read())

    def instances(self) -> list[str]:
        return self.get("/instances")

    def instance_tags(self, orthanc_id: str) -> dict:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.log.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install -y orthanc)")
    o = Orthanc(tmp_path / "orthanc")
    yield o
    o.stop()


@pytest.fixture
def orthanc_dicomweb(tmp_path: Path) -> Iterator[Orthanc]:
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install -y orthanc)")
    o = Orthanc(tmp_path / "orthanc-web", dicomweb=True)
    yield o
    o.stop()


# -- in-process counting archive (pynetdicom) --------------------------------------------------
class CountingArchive:
    """A pynetdicom C-STORE SCP that counts every C-STORE it receives, duplicates included."""

    def __init__(self, port: int | None = None, aet: str = "ARCHIVE", delay_s: float = 0.0, status: int = 0x0000, require_calling: list[str] | None = None,
                 after_store: Callable[[int], None] | None = None) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.port = port or free_port()
        self.aet = aet
        self.received: list[str] = []
        self.datasets: list[Dataset] = []
        self.lock = threading.Lock()
        self.delay_s = delay_s
        self.status = status
        ae = AE(ae_title=aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")
        if require_calling:
            ae.require_calling_aet = require_calling

        def on_store(event):
            if self.delay_s:
                time.sleep(self.delay_s)
            ds = event.dataset
            with self.lock:
                self.received.append(str(ds.SOPInstanceUID))
                self.datasets.append(ds)
                count = len(self.received)
            if after_store is not None:  # called with the count before the response goes out
                after_store(count)
            return self.status

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def archive_factory() -> Iterator[Callable[..., CountingArchive]]:
    made: list[CountingArchive] = []

    def make(**kw) -> CountingArchive:
        a = CountingArchive(**kw)
        made.append(a)
        return a

    yield make
    _stop_all([a.stop for a in made])


# -- databases ----------------------------------------------------------------------------------
# The database_url node_config() writes while a test runs under the `database` fixture:
# "" (SQLite under data_dir) or a fresh PostgreSQL database's URL.
_DATABASE = {"url": ""}


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL cluster for the whole session (tests/pg.py), started on first use,
    with a template database already at the schema's head (each test's database is a
    copy of it, which is quicker than migrating each)."""
    from tests import pg

    why = pg.missing()
    if why:
        pytest.skip(why)
    cluster = pg.PostgresCluster().start()
    try:
        from node.db import make_engine

        cluster.create_database("casemask_template")
        make_engine(cluster.url("casemask_template")).dispose()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_database(pg_cluster) -> Iterator[str]:
    """A new PostgreSQL database at the schema's head; its URL. Dropped afterwards.
    A test during which the server detected a deadlock fails: workers, ingest and
    routing must take their row locks in one order (a deadlock costs a C-STORE its
    answer or a batch its work)."""
    name = pg_cluster.create_database(template="casemask_template")
    mark = pg_cluster.log_size()
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)
    deadlocks = [line for line in pg_cluster.log_since(mark).splitlines() if "deadlock detected" in line]
    assert not deadlocks, f"PostgreSQL detected {len(deadlocks)} deadlock(s) during the test"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> Iterator[str]:
    """Runs a test once on SQLite and once on PostgreSQL: node_config() writes the
    database_url ("" for SQLite under data_dir). Use it with
    ``pytestmark = pytest.mark.usefixtures("database")``."""
    url = request.getfixturevalue("pg_database") if request.param == "postgresql" else ""
    before = _DATABASE["url"]
    _DATABASE["url"] = url
    yield url
    _DATABASE["url"] = before


def database_engine(node_or_settings):
    """A small engine on a node's database (for tests that look into it from outside)."""
    from node.db import make_engine

    settings = getattr(node_or_settings, "settings", node_or_settings)
    return make_engine(settings.node.resolved_database_url, 1, 0, prepare=False)


# -- nodes ------------------------------------------------------------------------------------
def node_config(tmp_path: Path, destinations: list[dict], routes: list[dict] | None = None, **node_kw) -> dict:
    node = {
        "ae_title": "CASEMASK",
        "host": "127.0.0.1",
        "port": free_port(),
        "data_dir": str(tmp_path / "var"),
        "database_url": _DATABASE["url"],
        "stable_after_s": 0.5,
        "poll_interval_s": 0.1,
        "retry_base_s": 0.2,
        "retry_max_s": 1.0,
        "lease_s": 5.0,
    }
    node.update(node_kw)
    routes = routes or [
        {
            "name": "all",
            "deid": {"profile": "basic", "options": ["retain-longitudinal-modified-dates"]},
            "destinations": [d["name"] for d in destinations],
        }
    ]
    return {"node": node, "sources": [{"ae_title": "STORESCU"}, {"ae_title": "ECHOSCU"}, {"ae_title": "CASEMASK"}, {"ae_title": "MODALITY1"}], "destinations": destinations, "routes": routes,
            "http": {"host": "127.0.0.1", "port": free_port()}}


def write_toml(raw: dict, path: Path) -> Path:
    """A tiny TOML writer for the shapes our configs use (tests only)."""

    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    lines = ["[node]"] + [f"{k} = {val(v)}" for k, v in raw["node"].items()]
    for table in ("retention", "http", "audit"):
        if table in raw:
            lines += ["", f"[{table}]"] + [f"{k} = {val(v)}" for k, v in raw[table].items()]
    for table in ("sources", "destinations", "routes", "models"):
        for entry in raw.get(table, []):
            lines += ["", f"[[{table}]]"] + [f"{k} = {val(v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# Receiving processes of the in-process nodes (``[node] receivers``; the node process is
# one of them): CASEMASK_TEST_RECEIVERS=2 runs the network-edge tests against a node whose
# associations the kernel spreads over two processes (`make test-receivers`).
TEST_RECEIVERS = int(os.environ.get("CASEMASK_TEST_RECEIVERS", "1"))


@pytest.fixture
def start_node(tmp_path: Path, request):
    """Start in-process nodes from raw config dicts; stopped at teardown. They receive
    in ``CASEMASK_TEST_RECEIVERS`` processes (default 1), unless the test is marked
    ``single_process``."""
    from node.app import Node
    from node.config import parse

    nodes = []
    receivers = 1 if request.node.get_closest_marker("single_process") else TEST_RECEIVERS

    def start(raw: dict, pixel_step="auto", listen: bool = True, schedule: bool = True, http: bool = False) -> Node:
        settings = parse(raw, "test", base_dir=tmp_path)
        n = Node(settings, pixel_step=pixel_step)
        nodes.append(n)  # before starting: a start that fails half-way is stopped at teardown too
        if schedule:
            n.start(listen=listen, http=http, receivers=receivers)
        elif listen:
            n.start_listening(receivers)
        return n

    yield start
    _stop_all([n.stop for n in nodes])


def _stop_all(stops: list[Callable[[], None]]) -> None:
    """Call every one of ``stops``, even after one raised (then raise the first error):
    a node left running holds its port and threads for the rest of the session."""
    errors = []
    for stop in stops:
        try:
            stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def receive(node, ds: Dataset, modality: str = "") -> None:
    """Put an object into a node's spool and queue as the C-STORE handler would."""
    from node import queue
    from node.db import row_path
    from node.spool import spool_path, write_atomic
    from node.deid import to_bytes

    data = node.settings.node.data_dir
    p = spool_path(data / "spool", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    size = write_atomic(p, to_bytes(ds))
    r = queue.Received(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.get("SeriesInstanceUID", "")),
                       modality or str(ds.get("Modality", "")), str(ds.file_meta.TransferSyntaxUID), row_path(data, p), size, "MODALITY1", "CASEMASK", "127.0.0.1",
                       received_by=node.owner)
    with node.engine.begin() as conn:
        queue.record_received(conn, r)  # returns the study's state change, not needed here


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def is_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class NodeProcess:
    """``casemask serve [--role ROLE]`` as a subprocess (for SIGKILL tests)."""

    def __init__(self, config: Path, log: Path, role: str = "all", env: dict | None = None) -> None:
        self.config, self.logpath, self.role, self.env = config, log, role, env
        self.proc: subprocess.Popen | None = None

    def start(self, port: int | None = None) -> None:
        """Start it and wait until it has started: it says so in its log (after its
        listeners, HTTP server and scheduler are up) and, given ``port``, something
        answers there while it runs. A start that fails or times out leaves no process
        behind."""
        self.log = self.logpath.open("ab")
        seen = self.logpath.stat().st_size
        args = [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config), "--role", self.role]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; see {self.logpath}")
            with self.logpath.open("rb") as f:
                f.seek(seen)
                if b" started (id " not in f.read():
                    return False
            return port is None or port_listens(port)

        try:
            wait_until(up, timeout=120, what=f"the node ({self.role}) to start")
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the node and wait until its receiver processes (node.receivers: they
        die with it) are gone too, as a supervisor killing its process group would."""
        assert self.proc is not None
        children = child_pids(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        wait_until(lambda: not any(is_alive(p) for p in children), timeout=30, what="the node's receiver processes to exit")
        self.log.close()

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 15 s) and wait until its receiver processes are gone
        too: a node started next on the same port must not meet them still listening."""
        if self.proc is None:
            return
        children = child_pids(self.proc.pid)
        if self.proc.poll() is None:
            stop_process(self.proc, 15)
        wait_until(lambda: not any(is_alive(p) for p in children), timeout=30, what="the node's receiver processes to exit")
        self.log.close()
