"""A throwaway PostgreSQL cluster for tests and benchmarks: ``initdb`` in a temporary
folder, the server on a free loopback port (and a socket in that folder), one database
per test, stopped by its PID.

PostgreSQL refuses to run as root, and the tests run as root here and in CI: its
binaries then run as an unprivileged user (``postgres``, which Debian's package makes;
created when missing), the server started directly as that user (``subprocess`` with
``user=``) so that the PID we hold is the postmaster's own.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER = "postgres"  # the unprivileged user the server runs as when we are root
SUPERUSER = "casemask"  # the cluster's superuser, trusted on loopback only


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (the newest Debian one), or None."""
    env = os.environ.get("CASEMASK_PG_BIN")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def missing() -> str | None:
    """Why a cluster cannot be made here (None when it can)."""
    b = pg_bin()
    if b is None or not (b / "postgres").exists():
        return "PostgreSQL's server is not installed (apt-get install -y postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    return None


def _free_port() -> int:
    """A port outside the kernel's ephemeral range (tests.conftest.free_port says why):
    initdb takes seconds, during which an outgoing connection could take a port of that
    range."""
    from tests.conftest import free_port

    return free_port()


def _run_as() -> dict:
    """``subprocess`` arguments that run a command as the unprivileged user when we are
    root (the user is created if missing); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
        pw = pwd.getpwnam(PG_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


class PostgresCluster:
    """One cluster: ``start()``, ``create_database()`` per test, ``stop()``.

    ``durable=False`` (tests) turns fsync off: the tests kill casemask, never the
    server, and a test database is thrown away. Benchmarks keep PostgreSQL's durable
    defaults (fsync, synchronous_commit), as production runs it.
    """

    def __init__(self, durable: bool = False, max_connections: int = 200) -> None:
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError(missing() or "PostgreSQL not found")
        self.durable = durable
        self.max_connections = max_connections
        self.root = Path(tempfile.mkdtemp(prefix="casemask-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._as = _run_as()
        self._log = None
        self._n = 0

    # -- the server -----------------------------------------------------------------
    def start(self) -> PostgresCluster:
        if self._as:
            os.chown(self.root, self._as["user"], self._as["group"])
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        init = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            capture_output=True, text=True, env=env, timeout=120, **self._as,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr[-2000:]}")
        self._launch(env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}; see {self.root / 'server.log'}")
            try:  # over this cluster's own Unix socket: a server of another session on the port would answer TCP
                with self._admin(socket_dir=True):
                    pass
            except Exception:
                time.sleep(0.1)
                continue
            if self.proc.poll() is None:  # it bound the TCP port too (it exits when it cannot)
                return self
        self.stop()
        raise RuntimeError("postgres did not accept connections within 60 s")

    def _launch(self, env: dict) -> None:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": str(self.max_connections),
            "shared_buffers": "128MB",
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "log_min_messages": "warning",
        }
        args = [str(self.bin / "postgres"), "-D", str(self.data)]
        for k, v in settings.items():
            args += ["-c", f"{k}={v}"]
        self._log = (self.root / "server.log").open("ab")
        # Started directly as the user (no runuser in between): self.proc.pid is the
        # postmaster's PID, which stop() signals.
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, **self._as)

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster: every backend quits at once, no
        checkpoint, as after a crash); the data folder stays for :meth:`restart`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            self.proc.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> PostgresCluster:
        """Start the server again on the same data folder and port (crash recovery after
        :meth:`crash`) and wait until it accepts connections."""
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        deadline = time.monotonic() + 60
        while True:
            self._launch(env)
            try:
                self.proc.wait(1.0)  # exited at once: the port is not free yet (TIME_WAIT listeners)
            except subprocess.TimeoutExpired:
                break
            self._log.close()
            self._log = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not restart; see {self.root / 'server.log'}")
        while time.monotonic() < deadline:
            try:
                with self._admin(socket_dir=True):
                    return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("postgres did not accept connections within 60 s of its restart")

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster's PID), SIGKILL after 30 s; the
        folder is removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if os.environ.get("CASEMASK_PG_KEEP_LOG"):
            shutil.copy(self.root / "server.log", os.environ["CASEMASK_PG_KEEP_LOG"])
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ------------------------------------------------------------------
    def url(self, dbname: str, socket_dir: bool = False) -> str:
        """The SQLAlchemy URL of ``dbname`` (psycopg 3), over TCP on loopback or, with
        ``socket_dir``, over the cluster's Unix socket."""
        if socket_dir:
            return f"postgresql+psycopg://{SUPERUSER}@/{dbname}?host={self.root}&port={self.port}"
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, socket_dir: bool = False):
        import psycopg

        host = str(self.root) if socket_dir else "127.0.0.1"
        return psycopg.connect(host=host, port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True, connect_timeout=30)

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new, empty database (or a copy of ``template``); returns its name."""
        self._n += 1
        name = name or f"t{os.getpid()}_{self._n}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing any connection still open to it."""
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def connections(self, name: str) -> int:
        """Connections open to ``name`` right now."""
        with self._admin() as conn:
            return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0])

    def log_size(self) -> int:
        """The server log's size now (a mark for :meth:`log_since`)."""
        path = self.root / "server.log"
        return path.stat().st_size if path.exists() else 0

    def log_since(self, mark: int) -> str:
        """What the server logged after ``mark``."""
        with (self.root / "server.log").open("rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def dump(self, name: str) -> bytes:
        """``pg_dump`` of ``name`` (schema and data), for tests that search what was stored."""
        r = subprocess.run([str(self.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name], capture_output=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {r.stderr.decode(errors='replace')[-500:]}")
        return r.stdout

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
