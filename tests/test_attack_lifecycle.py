"""What is left of a patient on the node's disk after retention (docs/security.md,
"Data lifecycle"): every byte under the data folder, the database's write-ahead log
included, searched for the synthetic identifiers once the mapping was purged."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import node_config
from tests.test_lifecycle import clock, delivery_states, drain, fill, files_under, folder  # noqa: F401  (clock is a fixture)

NAME, PID = "SYNTH^WALKEEPER", "WALPID-7731"


def _holding(data: Path, needles: tuple[bytes, ...]) -> list[str]:
    """The files under ``data`` whose bytes hold any of ``needles``."""
    return [p.name for p in files_under(data) if any(n in p.read_bytes() for n in needles)]


def test_no_original_name_or_id_is_left_on_disk_after_the_mapping_is_purged(tmp_path, start_node, clock):  # noqa: F811
    """SQLite, WAL: retention deleted the mapping rows, but their page images stayed in
    casemask.db-wal until other writes happened to overwrite them (measured on a quiet
    node: 9 copies 60 s after the purge). Now retention truncates the log after deleting
    them, and deleted rows are zeroed in the database file (secure_delete)."""
    raw = node_config(tmp_path, [folder(tmp_path)])
    raw["retention"] = {"mapping_days": 1}
    node = start_node(raw, schedule=False, listen=False)
    data = node.settings.node.data_dir
    needles = (NAME.encode(), PID.encode())
    fill(node, tmp_path, 2, phi={"PatientName": NAME, "PatientID": PID})
    drain(node, until=lambda: delivery_states(node) == {"SENT": 2})
    from node import retention

    retention.run(node.sessions, node.settings)  # originals and outputs delivered: deleted
    assert any(n in (data / "casemask.db-wal").read_bytes() for n in needles), "the mapping holds the patient: the test would prove nothing"
    clock(days=2)
    assert retention.run(node.sessions, node.settings).mapping_rows > 0
    assert _holding(data, needles) == []
