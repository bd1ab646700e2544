"""A hostile sender and a hostile network peer, eleventh pass (docs/security.md,
"Eleventh attack"): two DIMSE messages in one P-DATA-TF, PostgreSQL failing while
C-STOREs are committed, limits on what a sender or an archive can make the node read.
Synthetic values only."""

from __future__ import annotations

import struct

from pydicom import Dataset

from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION, encode, p_data, store_status
from tests.test_attack import _ct
from tests.test_attack_edge4 import _associated, _command, _folder_node, _raw_store_ok, _rows, _store_fields


def _echo_command(message_id: int) -> bytes:
    return _command({"AffectedSOPClassUID": VERIFICATION, "CommandField": 0x0030, "MessageID": message_id, "CommandDataSetType": 0x0101})


def _answers(r, n: int) -> list[tuple[int, int | None]]:
    """Up to ``n`` PDUs read (type, C-STORE/C-ECHO status), stopping at the first that is
    not a P-DATA-TF or at the connection's end / the read timeout."""
    out = []
    for _ in range(n):
        got = r.read_pdu()
        if got is None:
            break
        out.append((got[0], store_status(got[1]) if got[0] == 0x04 else None))
        if got[0] != 0x04:
            break
    return out


# -- two messages in one P-DATA-TF (PS3.8 9.3.5: PDVs of several messages may share one) ------
def test_two_whole_c_stores_in_one_p_data_are_both_stored_and_answered(tmp_path, start_node):
    """Two complete C-STORE-RQs (command and data set each) in one P-DATA-TF. pynetdicom
    ended the first message at its data set's last fragment and dropped the PDVs after it:
    the first object was answered Success, the second never answered, the sender left
    waiting until its own timeout. Each message is now handed on in turn: two answers, two
    rows."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x02, encode(a, implicit=False)),
                       (1, 0x03, _command(_store_fields(b, 2))), (1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 2)
    assert answers == [(0x04, 0x0000), (0x04, 0x0000)], answers
    assert _rows(node) == 2
    assert _raw_store_ok(port)


def test_two_c_echoes_in_one_p_data_are_both_answered(tmp_path, start_node):
    """Two C-ECHO-RQs (command sets without a data set) in one P-DATA-TF, then a C-STORE
    in the next: the second echo was dropped unanswered (or the association aborted as
    "a command fragment after its command set was complete"). Both are answered now, and
    the association goes on."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, VERIFICATION, [IMPLICIT_VR_LE])]) as r:
        r.send(p_data([(3, 0x03, _echo_command(1)), (3, 0x03, _echo_command(2))]))
        echoes = _answers(r, 2)
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 3))), (1, 0x02, encode(ds, implicit=False))]))
        store = _answers(r, 1)
    assert echoes == [(0x04, 0x0000), (0x04, 0x0000)], echoes
    assert store == [(0x04, 0x0000)], store
    assert _rows(node) == 1


def test_a_store_then_a_command_and_its_data_in_the_next_p_data_are_both_stored(tmp_path, start_node):
    """A C-STORE-RQ whole and the next one's command in one P-DATA-TF, that command's data
    set in the next: the second command was dropped with the rest of the P-DATA, so its
    data set came without a command (aborted, the sender's second object refused for
    nothing). Both are stored now."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x02, encode(a, implicit=False)), (1, 0x03, _command(_store_fields(b, 2)))]))
        r.send(p_data([(1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 2)
    assert answers == [(0x04, 0x0000), (0x04, 0x0000)], answers
    assert _rows(node) == 2


def test_a_second_command_before_the_first_ones_data_set_is_still_aborted(tmp_path, start_node):
    """What the split must not open: a C-STORE-RQ's command, then another command in the
    same P-DATA (the first one's data set was due). Aborted, nothing stored."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x03, _command(_store_fields(b, 2))), (1, 0x02, encode(b, implicit=False))]))
        answers = _answers(r, 1)
    assert answers in ([], [(0x07, None)]), answers
    assert _rows(node) == 0
