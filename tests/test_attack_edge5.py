"""A hostile DICOM sender, eighth pass (docs/security.md, "Eighth attack"): the fragment
checks of one P-DATA-TF that carries more than one message part."""

from __future__ import annotations

import time

from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, encode, p_data, store_status
from tests.test_attack import _ct
from tests.test_attack_edge4 import _associated, _command, _folder_node, _incoming, _raw_store_ok, _rows, _statuses, _store_fields

MR = "1.2.840.10008.5.1.4.1.1.4"


def test_a_second_command_in_the_p_data_of_the_first_is_refused(tmp_path, start_node):
    """The second-command check of the seventh pass, with both commands in one P-DATA-TF
    (two PDVs, each a command's last fragment): the check stopped reading a P-DATA at a
    command's last fragment ("what follows is pynetdicom's to judge"), and pynetdicom
    joined the second command to the first, opened a second incoming file for it and
    left the first one behind. The association is aborted now, as with the commands in
    two P-DATA: nothing answered Success, nothing stored, no incoming file left."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct(pn="SYNTHETIC^OTHER")
    cmd_b = _store_fields(b, 2)
    cmd_b["AffectedSOPClassUID"] = MR
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, MR, [EXPLICIT_VR_LE])]) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x03, _command(cmd_b))]))
        r.send(p_data([(1, 0x02, encode(a, implicit=False))]))
        got = r.read_pdu()
    assert got is None or got[0] != 0x04 or store_status(got[1]) != 0x0000, "answered Success"
    assert got is None or got[0] == 0x07, f"not aborted: PDU type {got[0]:#x}, status {store_status(got[1])}"
    time.sleep(0.5)  # the association's close deletes its partial data set
    assert _rows(node) == 0
    assert _incoming(node) == []
    assert _raw_store_ok(port)


def test_a_data_set_on_another_context_in_the_p_data_of_its_command_is_refused(tmp_path, start_node):
    """The other-context check of the seventh pass, with the command and its data set in
    one P-DATA-TF: the data set (explicit VR) on context 3 (implicit VR) after its
    command on context 1 was not looked at, and the node answered Success. It is aborted
    now, as with the data set in a P-DATA of its own."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, CT_IMAGE_STORAGE, ["1.2.840.10008.1.2"])]) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 1))), (3, 0x02, encode(ds, implicit=False))]))
        got = r.read_pdu()
    assert got is None or got[0] != 0x04 or store_status(got[1]) != 0x0000, "answered Success"
    assert _rows(node) == 0
    time.sleep(0.5)
    assert _incoming(node) == []
    assert _statuses(port, [(_command(_store_fields(ds, 1)), encode(ds, implicit=False))]) == [0x0000]


def test_a_command_and_its_data_set_in_one_p_data_are_stored(tmp_path, start_node):
    """A sender may put a C-STORE-RQ's command and its whole data set in one P-DATA-TF
    (PS3.8 9.3.5: one or more PDVs): stored, answered Success."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 1))), (1, 0x00, encode(ds, implicit=False)[:100]), (1, 0x02, encode(ds, implicit=False)[100:])]))
        got = r.read_pdu()
    assert got is not None and got[0] == 0x04 and store_status(got[1]) == 0x0000
    assert _rows(node) == 1


def test_an_empty_or_padded_certificate_cn_is_a_configuration_problem(tmp_path):
    """``certificate_cn = ""`` was read as no binding at all (``s.certificate_cn or
    None``): the operator who wrote it meant to bind the AE title, and it stayed open to
    any sender on the plain port (and to anyone with accept_unknown_sources). A CN with
    spaces around it matched no certificate. Both are refused when the configuration is
    read."""
    import pytest

    from node.config import ConfigError, parse
    from tests.conftest import node_config

    for cn in ("", " modality-1", "modality-1 "):
        raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
        raw["sources"] = [{"ae_title": "MODALITY1", "certificate_cn": cn}]
        with pytest.raises(ConfigError, match="certificate_cn"):
            parse(raw, "test", base_dir=tmp_path)
