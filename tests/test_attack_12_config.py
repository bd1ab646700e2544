"""Relative paths read against the configuration file's folder (the day's change): a
start must never silently take a new empty data folder, database or pseudonym secret
where the same words in the file named a node's own before (docs/security.md, "Twelfth
attack"). Synthetic values only."""

from __future__ import annotations

import pytest

from node.config import ConfigError, load
from tests.test_config_paths import _site


def test_a_moved_data_dir_holding_only_a_spool_is_refused(tmp_path, monkeypatch):
    """A node on PostgreSQL with its secret in secret_env keeps neither casemask.db nor
    secret.key in data_dir, only its spool (objects answered Success, not yet sent) and
    outbox: the guard looked for those two files only, so data_dir = "var" read relative
    to the file's folder was taken silently, a new empty spool, the database's rows
    naming files that are no longer found. A spool counts as a node's data now."""
    cfg = _site(tmp_path, database_url="postgresql+psycopg://casemask@db-host/casemask", secret_env="CASEMASK_SECRET")
    node_folder = tmp_path / "srv"
    (node_folder / "var" / "spool" / "1.2.3").mkdir(parents=True)
    (node_folder / "var" / "spool" / "1.2.3" / "1.2.3.4.dcm").write_bytes(b"\0" * 132)
    monkeypatch.chdir(node_folder)
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    assert str(node_folder.resolve() / "var") in str(exc.value)
    (tmp_path / "etc" / "var" / "spool").mkdir(parents=True)  # the file's folder holds a node's spool too: taken
    assert load(cfg).node.data_dir == tmp_path / "etc" / "var"


def test_a_moved_relative_sqlite_database_is_refused(tmp_path, monkeypatch):
    """database_url = "sqlite:///var/casemask.db" beside an absolute data_dir: read
    relative to the file's folder now, a start would make a new empty database while
    the node's own (its queue, its rows, its audit trail) stays where the working
    folder put it. Refused, naming both; written absolute, taken."""
    data = tmp_path / "data"
    cfg = _site(tmp_path, data_dir=str(data), database_url="sqlite:///var/casemask.db")
    node_folder = tmp_path / "srv"
    (node_folder / "var").mkdir(parents=True)
    (node_folder / "var" / "casemask.db").write_bytes(b"")
    monkeypatch.chdir(node_folder)
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    assert "database_url" in str(exc.value) and str(node_folder.resolve() / "var" / "casemask.db") in str(exc.value)
    cfg.write_text(cfg.read_text().replace("sqlite:///var/casemask.db", f"sqlite:///{node_folder / 'var' / 'casemask.db'}"))
    assert load(cfg).node.resolved_database_url == f"sqlite:///{node_folder / 'var' / 'casemask.db'}"


def test_a_moved_relative_secret_path_is_refused(tmp_path, monkeypatch):
    """secret_path = "keys/secret.key" with the database on PostgreSQL: read relative to
    the file's folder, a start would make a new secret there (every pseudonym changes)
    unless the database already recorded a fingerprint. Refused at load."""
    cfg = _site(tmp_path, data_dir=str(tmp_path / "data"), database_url="postgresql+psycopg://casemask@db-host/casemask", secret_path="keys/secret.key")
    node_folder = tmp_path / "srv"
    (node_folder / "keys").mkdir(parents=True)
    (node_folder / "keys" / "secret.key").write_text("00" * 32)
    monkeypatch.chdir(node_folder)
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    assert "secret_path" in str(exc.value) and "pseudonym" in str(exc.value)
    monkeypatch.chdir(tmp_path)  # nothing there: a first start, taken
    assert load(cfg).node.secret_path == tmp_path / "etc" / "keys" / "secret.key"
