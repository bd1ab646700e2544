"""What a new admin meets walking through README.md from a fresh clone: the manual's
length and its first commands, and the messages of the steps that went wrong on the
walk (a pseudonym secret file they wrote themselves)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ECHOSCU, PYDICOM_FILES, ROOT, dcmtk_env, needs_dcmtk, node_config, stop_process, wait_until, write_toml

README = ROOT / "README.md"


def casemask(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("content", ["", "ab\n", "not hex at all\n"])
def test_a_secret_file_that_is_short_or_not_hex_is_refused_with_what_to_write(tmp_path, content):
    """A hand-written secret (empty, one byte, not hex) is refused with exit 2 and a
    message saying what to write, never a traceback; nothing is written."""
    key = tmp_path / "s.key"
    key.write_text(content)
    key.chmod(0o600)
    r = casemask("deid", str(PYDICOM_FILES / "CT_small.dcm"), "--out", str(tmp_path / "o"), "--secret", str(key), "-j", "1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "openssl rand -hex 32" in r.stderr, r.stderr
    assert not list((tmp_path / "o").glob("*.dcm")) if (tmp_path / "o").exists() else True



@needs_dcmtk
def test_the_start_line_names_the_pid_that_reloads_the_configuration(tmp_path):
    """README: a running node re-reads its file on `kill -HUP <pid>`; the start line
    gives that pid (the walk had to guess it among the node's processes), and a source
    added to the file is let in after the signal, without a restart."""
    cfg = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], receivers=2)  # one receiver process: its one "taken" line, whatever the core count
    config = write_toml(cfg, tmp_path / "site.toml")
    port = cfg["node"]["port"]
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: re.search(r"listening on .*; pid (\d+) \(kill -HUP \1 ", log.read_text()), timeout=60, what="the start line")
        pid = int(re.search(r"; pid (\d+) ", log.read_text()).group(1))
        assert pid == proc.pid

        def echo() -> int:
            return subprocess.run([ECHOSCU, "-aet", "NEWMODALITY", "-aec", "CASEMASK", "127.0.0.1", str(port)], env=dcmtk_env(), capture_output=True, timeout=30).returncode

        assert echo() != 0  # not yet a source
        cfg["sources"].append({"ae_title": "NEWMODALITY"})
        write_toml(cfg, config)
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "[[sources]] and accept_unknown_sources taken" in log.read_text(), timeout=30, what="the receivers to take the new sources")
        assert echo() == 0
        # A receiver process's own records name their module (they said `__main__`, as
        # `python -m node.receivers` runs it).
        text = log.read_text()
        assert re.search(r"INFO node\.receivers: \[receiver \d+\] configuration reloaded", text) and "__main__" not in text, text[-3000:]
    finally:
        stop_process(proc, 15)


def test_readme_is_at_most_300_lines_and_starts_with_its_two_commands():
    """The manual's length (a project hook holds it to 300 lines), its two first
    commands (`make serve`, `make test`) ahead of every section, and every relative
    link pointing at a file of the repository."""
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    first_section = text.index("\n## ")
    assert text.index("make serve") < first_section and text.index("make test") < first_section
    for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), target


def test_version_and_verbose_after_the_command_as_other_tools_take_them(tmp_path):
    """`casemask --version` (an admin upgrading asks which version runs: it was 'the
    following arguments are required: COMMAND') and `-v` after the command's name
    (`casemask status -v` was 'unrecognized arguments: -v'; only `casemask -v status`
    worked)."""
    r = casemask("--version")
    assert r.returncode == 0 and re.fullmatch(r"casemask \S+\n", r.stdout), r.stdout + r.stderr
    cfg = write_toml(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], database_url=""), tmp_path / "site.toml")
    for args in (("config", "check", str(cfg), "-v"), ("-v", "config", "check", str(cfg)), ("routes", "explain", "-vv", "--config", str(cfg), str(PYDICOM_FILES / "CT_small.dcm"))):
        r = casemask(*args)
        assert r.returncode == 0, (args, r.stderr)
    assert "-v, --verbose" in casemask("quarantine", "list", "--help").stdout


def test_commands_run_outside_the_nodes_folder_refuse_instead_of_making_an_empty_database(tmp_path):
    """The walk ran `casemask status` in another folder than the node's: with `data_dir =
    "var"` it made ./var/casemask.db there and reported an empty node (as did `quarantine
    list`, `purge`, `db current`, and `token create` put a token in a database no node
    reads). Now the read commands refuse with exit 2 and say where to run them, making
    nothing; `db current` says revision none without making the file; `user add` and
    `token create` (an admin may make accounts before the first start) make it and say so.
    Relative paths in a configuration file are relative to its folder: the database is
    the one beside site.toml, wherever the command runs."""
    cfg = write_toml(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], database_url="", data_dir="var"), tmp_path / "site.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    db = tmp_path / "var" / "casemask.db"
    for args in (["status"], ["quarantine", "list"], ["purge", "--dry-run"], ["retry"], ["token", "list"], ["user", "list"], ["export-mapping", "--out", "m"], ["index", "status"]):
        r = casemask(*args, "--config", str(cfg), cwd=elsewhere)
        assert r.returncode == 2 and f"no database at {db}" in r.stderr and "--config" in r.stderr, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and not db.exists(), args
    r = casemask("db", "current", "--config", str(cfg), cwd=elsewhere)
    assert r.returncode == 1 and "revision none" in r.stdout and not db.exists(), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "node.cli", "user", "add", "alice", "--role", "admin", "--config", str(cfg)], input="a long passphrase\n",
                       capture_output=True, text=True, cwd=elsewhere, timeout=120)
    assert r.returncode == 0 and "made a new one" in r.stderr and db.exists(), r.stderr
    r = casemask("status", "--json", "--config", str(cfg), cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert "made a new one" not in casemask("token", "create", "--name", "p", "--role", "viewer", "--config", str(cfg), cwd=elsewhere).stderr


def test_the_start_line_names_the_dicom_tls_port(tmp_path):
    """With [node.tls] the start line named only the plain port, and with `port = 0` (TLS
    only) it said `listening on 127.0.0.1:0`."""
    from node.cli import _listeners
    from node.config import load
    from tests.pki import CA

    ca = CA(tmp_path / "pki")
    pair = ca.issue("node", server=True)
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], database_url="", port=0)
    raw["node"]["tls"] = {"port": 2762, "certificate": str(pair.cert), "private_key": str(pair.key), "require_client_certificate": False}
    node = load(write_toml(raw, tmp_path / "tls.toml")).node
    assert _listeners(node) == "127.0.0.1:2762 (DICOM TLS)"
    node.port = 11112
    assert _listeners(node) == "127.0.0.1:11112 and 127.0.0.1:2762 (DICOM TLS)"


@needs_dcmtk
def test_the_deliveries_pages_say_that_their_button_also_sends_waiting_deliveries(tmp_path):
    """The deliveries page's button read `Re-queue N failed deliveries` and showed only
    when some had FAILED, though it also sends the deliveries waiting for their next
    attempt (RETRY_WAIT) now: an admin who had fixed a destination that was down (its
    deliveries waiting, none failed yet) found no button at all. Now both pages offer it
    to an operator and say what it does, and it sends the waiting delivery."""
    from node import accounts
    from node.db import Delivery, DeliveryState
    from tests.conftest import STORESCU, free_port, make_study
    from tests.httpnode import start_http_node

    down = {"name": "down", "kind": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}
    hn = start_http_node(node_config(tmp_path, [down], retry_base_s=600.0, retry_max_s=600.0), tmp_path)
    try:
        with hn.node.sessions() as s:
            accounts.add_user(s, "olga", "operator", "a long enough password")
            s.commit()
        sent = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(hn.node.settings.node.port), str(make_study(tmp_path / "s", 1)[0])],
                              env=dcmtk_env(), capture_output=True, timeout=60)
        assert sent.returncode == 0

        def states() -> list[DeliveryState]:
            with hn.node.sessions() as s:
                return [d.state for d in s.query(Delivery).all()]

        wait_until(lambda: states() == [DeliveryState.RETRY_WAIT], timeout=60, what="the delivery to wait for its next attempt")
        ui = hn.client()
        token = re.search(r'name="login_token" value="([^"]+)"', ui.get("/login").text).group(1)
        assert ui.post("/login", data={"name": "olga", "password": "a long enough password", "login_token": token}, follow_redirects=False).status_code == 303
        page = ui.get("/deliveries").text
        assert "Send the deliveries waiting for their next attempt now</button>" in page and "RETRY_WAIT" in page, page
        assert "Send 1 waiting now</button>" in ui.get("/destinations").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        r = ui.post("/deliveries/retry", data={"csrf": csrf, "destination": "", "next": "/deliveries"}, follow_redirects=True)
        assert "1 failed or waiting deliveries re-queued." in r.text, r.text
    finally:
        hn.node.stop()


def test_a_command_on_the_built_in_configuration_in_another_folder_names_this_folder(tmp_path):
    """`casemask status` run in /tmp on the built-in configuration said 'no node has run on
    the configuration .../config/casemask.toml yet', while a node had run on it in the
    clone: the built-in data_dir = "var" is relative to the working folder, so the message
    names the folder, and where to run the command."""
    r = casemask("status", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"no database at {tmp_path / 'var' / 'casemask.db'}" in r.stderr, r.stderr
    assert f"no node has run on the built-in configuration in this folder ({tmp_path}) yet" in r.stderr, r.stderr
    assert "Run the command in the folder the node is started in" in r.stderr and not (tmp_path / "var").exists(), r.stderr


def test_index_status_and_retry_held_on_a_stopped_node_say_what_they_mean(tmp_path):
    """`casemask index status` on the built-in configuration printed `model -  weights -  0
    entries`: it says that no route keeps an index, and how to start one. `retry --held`
    said the running node routes them, run while no node ran: it says when."""
    cfg = write_toml(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], database_url=""), tmp_path / "site.toml")
    r = subprocess.run([sys.executable, "-m", "node.cli", "user", "add", "alice", "--role", "admin", "--config", str(cfg)], input="a long passphrase\n",
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    r = casemask("index", "status", "--config", str(cfg))
    assert r.returncode == 0 and r.stdout == "no entries: no route has index = true (docs/retrieval.md)\n", r.stdout + r.stderr
    r = casemask("index", "status", "--json", "--config", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout + r.stderr
    # `retry --held` with no node running said "(routed again by the running node)"
    r = casemask("retry", "--held", "--config", str(cfg))
    assert r.returncode == 0 and "at once while it runs, else at its next start" in r.stdout, r.stdout + r.stderr
