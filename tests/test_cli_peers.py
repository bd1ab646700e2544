"""`casemask echo` and `send` call as an AE title the admin chooses (`--calling-aet`, as
echoscu's -aet; by default the node's own)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, make_study, node_config, write_toml


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

