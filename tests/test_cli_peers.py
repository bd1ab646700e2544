"""`casemask echo` and `send` call as an AE title the admin chooses (`--calling-aet`, as
echoscu's -aet; by default the node's own), and `casemask status` says how each
destination's last health check went, before any delivery too."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT, free_port, make_study, node_config, write_toml


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_echo_calls_as_the_calling_aet_given(archive_factory):
    archive = archive_factory(require_calling=["RESEARCH1"])
    peer = f"ARCHIVE@127.0.0.1:{archive.port}"
    r = run_cli("echo", peer)  # the built-in configuration's node: CASEMASK, which the peer does not know
    assert r.returncode == 1
    assert "as CASEMASK: no association" in r.stderr and "does not accept calls from 'CASEMASK'" in r.stderr and "--calling-aet" in r.stderr, r.stderr
    for option in ("--calling-aet", "-aet", "--calling-ae"):  # -aet as echoscu; --calling-ae as before
        r = run_cli("echo", option, "RESEARCH1", peer)
        assert r.returncode == 0 and f"C-ECHO {peer} as RESEARCH1: status 0x0000" in r.stdout, (option, r.stdout + r.stderr)
    r = run_cli("echo", "--calling-aet", "A" * 17, peer)
    assert r.returncode == 2 and "1 to 16 characters" in r.stderr


def test_echo_and_send_call_as_the_nodes_own_ae_title_by_default(tmp_path, archive_factory):
    archive = archive_factory(require_calling=["SITENODE"])
    cfg = write_toml(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], ae_title="SITENODE"), tmp_path / "site.toml")
    peer = f"ARCHIVE@127.0.0.1:{archive.port}"
    r = run_cli("echo", "--config", str(cfg), peer)
    assert r.returncode == 0 and "as SITENODE: status 0x0000" in r.stdout, r.stdout + r.stderr
    files = make_study(tmp_path / "study", 2)
    r = run_cli("send", *map(str, files), "--to", peer, "--config", str(cfg))
    assert r.returncode == 0 and f"sent 2 of 2 to {peer} as SITENODE" in r.stdout, r.stdout + r.stderr
    assert len(archive.received) == 2
    r = run_cli("send", *map(str, files), "--to", peer)  # as CASEMASK: refused, and said what to do
    assert r.returncode == 1 and "does not accept calls from 'CASEMASK'" in r.stdout, r.stdout + r.stderr
    assert len(archive.received) == 2


def test_status_says_each_destinations_health_before_the_first_delivery(tmp_path, start_node):
    closed = free_port()  # nobody listens there
    dests = [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")},
             {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": closed}]
    raw = node_config(tmp_path, dests)
    cfg = write_toml(raw, tmp_path / "n.toml")
    assert run_cli("db", "upgrade", "--config", str(cfg)).returncode == 0
    r = run_cli("status", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"\n  configuration {cfg}\n" in r.stdout, r.stdout  # whose routes and destinations these are
    for name in ("out", "pacs"):
        assert re.search(rf"destination:{name} +- \(no delivery yet\)\n +health: not tried yet", r.stdout), r.stdout
    node = start_node(raw, listen=False, schedule=False)
    node.health.check_all()  # what the node's scheduler does every 30 s
    node.stop()
    r = run_cli("status", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert re.search(r"destination:out +- \(no delivery yet\)\n +health: reachable at the node's last check, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(writable\)", r.stdout), r.stdout
    assert re.search(r"destination:pacs +- \(no delivery yet\)\n +health: NOT REACHABLE at the node's last check, .* UTC \(no association \(cannot connect", r.stdout), r.stdout
    r = run_cli("status", "--json", "--config", str(cfg))
    import json

    health = json.loads(r.stdout)["health"]
    assert health["out"]["reachable"] is True and health["pacs"]["reachable"] is False and health["pacs"]["checked_at"]
