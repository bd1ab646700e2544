"""Relative paths in a configuration file are relative to that file's folder (as nginx
and Orthanc resolve theirs), so that ``--config /etc/casemask/site.toml`` means the same
from any folder; the files casemask ships keep theirs relative to the working folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import DEFAULT_CONFIG, ConfigError, base_dir_for, load
from node.resources import config_file
from tests.conftest import ROOT, node_config, write_toml


def _site(tmp_path: Path, **node_kw) -> Path:
    """A site configuration in tmp_path/etc whose paths are all relative."""
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    raw = node_config(tmp_path, [{"name": "research", "kind": "folder", "path": "out/research"}],
                      **{"data_dir": "var", "database_url": "", **node_kw})
    return write_toml(raw, etc / "site.toml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc" / "bundles" / "mine").mkdir(parents=True)
    (tmp_path / "etc" / "rules.toml").write_text("")
    cfg = _site(tmp_path, secret_path="keys/secret.key", burned_in_regions="rules.toml")
    raw = cfg.read_text() + '\n[[models]]\nname = "mine"\npath = "bundles/mine"\n'
    cfg.write_text(raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load(cfg)
    etc = (tmp_path / "etc").resolve()
    assert s.node.data_dir == etc / "var"
    assert s.node.resolved_database_url == f"sqlite:///{etc / 'var' / 'casemask.db'}"
    assert s.node.secret_path == etc / "keys" / "secret.key"
    assert s.node.burned_in_regions == etc / "rules.toml"
    assert s.destination("research").path == etc / "out" / "research"
    assert s.model("mine").path == str(etc / "bundles" / "mine")
    # A relative path is relative to the same folder when the file is named relatively.
    monkeypatch.chdir(tmp_path)
    assert load(Path("etc/site.toml")).node.data_dir == etc / "var"


def test_a_linked_config_file_is_read_relative_to_the_folder_of_the_link(tmp_path, monkeypatch):
    """As a Kubernetes ConfigMap mounts it: site.toml a link into a hidden folder beside it."""
    cfg = _site(tmp_path)
    hidden = tmp_path / "etc" / "..data"
    hidden.mkdir()
    cfg.rename(hidden / "site.toml")
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "site.toml").symlink_to(hidden / "site.toml")
    monkeypatch.chdir(tmp_path)
    assert load(mount / "site.toml").node.data_dir == (mount / "var").resolve()


def test_absolute_paths_and_urls_are_kept(tmp_path, monkeypatch):
    db = tmp_path / "db" / "node.db"
    cfg = _site(tmp_path, data_dir=str(tmp_path / "data"), database_url=f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    s = load(cfg)
    assert s.node.data_dir == tmp_path / "data"
    assert s.node.resolved_database_url == f"sqlite:///{db}"
    cfg = _site(tmp_path, database_url="sqlite:///rel/node.db?timeout=5")
    assert load(cfg).node.resolved_database_url == f"sqlite:///{(tmp_path / 'etc' / 'rel' / 'node.db').resolve()}?timeout=5"
    cfg = _site(tmp_path, database_url="postgresql+psycopg://casemask@db-host/casemask")
    assert load(cfg).node.resolved_database_url == "postgresql+psycopg://casemask@db-host/casemask"


def test_a_data_dir_that_moved_with_the_new_rule_is_refused(tmp_path, monkeypatch):
    """A site started in /srv/node with --config /etc/casemask/site.toml and data_dir =
    "var" kept its data in /srv/node/var; read relative to the file, a start would make a
    new database and secret (every pseudonym would change). Refused, with both paths."""
    cfg = _site(tmp_path)
    node_folder = tmp_path / "srv"
    (node_folder / "var").mkdir(parents=True)
    (node_folder / "var" / "secret.key").write_text("00" * 32)
    monkeypatch.chdir(node_folder)
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    text = str(exc.value)
    etc = (tmp_path / "etc").resolve()
    assert f'data_dir = "{node_folder.resolve() / "var"}" to keep' in text and f'data_dir = "{etc / "var"}" for a new node' in text, text
    (etc / "var").mkdir()
    (etc / "var" / "casemask.db").write_text("")  # a node's data is there too: the file's folder is taken
    assert load(cfg).node.data_dir == etc / "var"
    cfg.write_text(cfg.read_text().replace('data_dir = "var"', f'data_dir = "{node_folder / "var"}"'))
    assert load(cfg).node.data_dir == node_folder / "var"


def test_shipped_configs_stay_relative_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load().node.data_dir == tmp_path / "var"
    assert load(DEFAULT_CONFIG).node.data_dir == tmp_path / "var"  # named explicitly: the same file, the same meaning
    assert load(config_file("demo.toml")).node.data_dir == tmp_path / "var" / "demo"
    assert base_dir_for(None) == tmp_path and base_dir_for(tmp_path / "etc" / "x.toml") == tmp_path / "etc"


def test_a_missing_file_names_the_resolved_path(tmp_path, monkeypatch):
    cfg = _site(tmp_path)
    cfg.write_text(cfg.read_text() + '\n[node.tls]\nport = 2762\ncertificate = "tls/node.crt"\nprivate_key = "tls/node.key"\nrequire_client_certificate = false\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    assert f"certificate = 'tls/node.crt': no such file ({(tmp_path / 'etc' / 'tls' / 'node.crt').resolve()})" in str(exc.value)
    assert "relative to the configuration file's folder" in str(exc.value)


def test_reload_resolves_against_the_running_file(tmp_path, monkeypatch):
    """A reload (SIGHUP, the dashboard) reads the file with the same rule as the start."""
    from node.service import Service

    cfg = _site(tmp_path)
    monkeypatch.chdir(tmp_path)
    service = Service(load(cfg), sessions=None)  # type: ignore[arg-type]  # checking reads no database
    new = service.check_config(cfg.read_text().replace('"out/research"', '"out/other"'))
    assert new.destination("research").path == (tmp_path / "etc" / "out" / "other").resolve()


def test_config_check_shows_resolved_paths_and_commands_work_from_any_folder(tmp_path):
    cfg = _site(tmp_path)
    etc = (tmp_path / "etc").resolve()
    run = lambda *a, cwd: subprocess.run([sys.executable, "-m", "node.cli", *a], capture_output=True, text=True,  # noqa: E731
                                          cwd=cwd, timeout=120, env={**_env(), "PYTHONPATH": str(ROOT)})
    r = run("config", "check", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"relative to the configuration file's folder, {etc}" in r.stdout
    assert "[node] data_dir" in r.stdout and str(etc / "var") in r.stdout
    assert str(etc / "out" / "research") in r.stdout
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert run("db", "upgrade", "--config", str(cfg), cwd=a).returncode == 0
    assert (etc / "var" / "casemask.db").is_file() and not (a / "var").exists()
    r = run("status", "--config", str(cfg), cwd=b)
    assert r.returncode == 0, r.stderr
    assert f"data {etc / 'var'}" in r.stdout


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
