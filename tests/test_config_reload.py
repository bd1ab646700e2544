"""A reload names each [node] key it applied, as it names those that need a restart."""

from __future__ import annotations

from node.config import parse
from tests.conftest import node_config


def test_reload_names_the_node_keys_it_applied(tmp_path, start_node):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    node = start_node(raw, listen=False, schedule=False)
    raw["node"] = {**raw["node"], "stable_after_s": 12.0, "max_attempts": 3, "port": raw["node"]["port"] + 1}
    result = node.reload(parse(raw, "test", base_dir=tmp_path))
    assert sorted(result["applied"]) == ["node.max_attempts", "node.stable_after_s"], result
    assert result["restart_required"] == ["node.port"], result
    assert node.settings.node.stable_after_s == 12.0
