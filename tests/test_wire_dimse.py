"""The C-STORE-RSP fast path (node.dimsefast): the same bytes as pynetdicom's encoder,
pynetdicom's own path for anything else, and a real association still answered."""

from __future__ import annotations

import itertools
import struct

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node import dimsefast
from tests.conftest import needs_dcmtk


def _response(status=0x0000, responded=1, sop_class="1.2.840.10008.5.1.4.1.1.2", sop_instance="1.2.3.4", comment=None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = responded
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


def _pynetdicom_bytes(rsp: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 0))
    ((_, pdv),) = pdata.presentation_data_value_list
    assert pdv[0] == 0x03
    return bytes(pdv[1:])


def test_the_installed_pynetdicom_is_the_one_the_fast_path_was_written_for():
    assert dimsefast.check_pynetdicom() == [], "pynetdicom's send_msg / encoders changed: read them again, then update EXPECTED_SOURCES"


UIDS = ["1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.128", "2.25." + "1" * 59, "1." + "9" * 62]


@pytest.mark.parametrize("status", [0x0000, 0x0001, 0xB000, 0xB007, 0xA700, 0xA900, 0xC210, 0xC214, 0xFFFF])
def test_responses_are_encoded_byte_for_byte_as_pynetdicom_does(status):
    for responded, sop_class, sop_instance in itertools.product([0, 1, 255, 256, 0x7FFF, 0xFFFF], UIDS, UIDS):
        rsp = _response(status, responded, sop_class, sop_instance)
        assert dimsefast.encode_store_response(rsp) == _pynetdicom_bytes(rsp), (status, responded, sop_class, sop_instance)


def test_a_response_without_uids_is_encoded_as_pynetdicom_does():
    rsp = _response(sop_class=None, sop_instance=None)
    assert dimsefast.encode_store_response(rsp) == _pynetdicom_bytes(rsp)


def test_a_response_with_an_error_comment_is_left_to_pynetdicom():
    assert dimsefast.encode_store_response(_response(0xC210, comment="data set: cannot decode")) is None


@pytest.mark.parametrize("uid", ["1.2.3 ", "1.2.x", "", "1." + "2" * 62 + "3", "١.٢", "01.2", "1..2", "1.2.3\x00"])
def test_whatever_the_primitive_takes_is_encoded_as_pynetdicom_does_or_left_to_it(uid):
    """Values pydicom would pad, reject or encode otherwise never get other bytes from
    the fast path: either the same as pynetdicom's, or None (pynetdicom encodes)."""
    try:
        rsp = _response(sop_instance=uid)
    except ValueError:
        return  # the primitive refuses it: pynetdicom's handler never gets that far
    fast = dimsefast.encode_store_response(rsp)
    assert fast is None or fast == _pynetdicom_bytes(rsp)


@pytest.mark.parametrize("uid", ["1.2.3 ", "1.2.x", "", "1." + "2" * 63, "١.٢", "1.2.3\x00"])
def test_unusual_uid_values_are_left_to_pynetdicom(uid):
    assert dimsefast._uid(uid) is None


# -- through a real association ------------------------------------------------------------------
def _folder(tmp_path):
    return {"name": "f", "kind": "folder", "path": str(tmp_path / "out")}


@needs_dcmtk
@pytest.mark.single_process  # counts the fast path's calls in this process
def test_storescu_gets_its_responses_through_the_fast_path(tmp_path, start_node, monkeypatch):
    """dcmtk's storescu sends 5 objects: each answered Success by the fast path, all
    stored; a refused object's response (with an Error Comment) goes through pynetdicom."""
    from pydicom import dcmread
    from pynetdicom import AE

    from tests.conftest import make_study, node_config
    from tests.test_node import storescu

    encoded = []

    def counting(primitive):
        out = real(primitive)
        encoded.append(out is not None)
        return out

    real = dimsefast.encode_store_response
    monkeypatch.setattr(dimsefast, "encode_store_response", counting)
    node = start_node(node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600), schedule=False)
    files = make_study(tmp_path / "in", 5)
    r = storescu(node.settings.node.port, files)
    assert r.returncode == 0, r.stderr
    assert encoded == [True] * 5
    from node.db import Instance

    with node.sessions() as s:
        assert s.query(Instance).count() == 5
    ds = dcmread(files[0])
    del ds.StudyInstanceUID  # 0xC211, with an Error Comment
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0xC211 and "ErrorComment" in status
    assert encoded[-1] is False, "a response with an Error Comment is pynetdicom's to encode"


# -- the C-STORE-RQ's command set read without pydicom ------------------------------------------
def _pynetdicom_primitive(command: bytes):
    """The primitive pynetdicom's own decoding makes of a complete command set."""
    from io import BytesIO

    from pynetdicom import dimse_messages

    msg = dimse_messages.DIMSEMessage()
    msg.command_set = dimse_messages.decode(BytesIO(command), True, True)
    msg.__class__ = dimse_messages.C_STORE_RQ
    msg.context_id = 1
    return msg, dimsefast._ORIGINAL_MESSAGE_TO_PRIMITIVE(msg)


_PRIMITIVE_FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority", "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID", "DataSet", "_context_id", "_dataset_path", "_dataset_file")


def _store_rq(sop_class: str, sop_instance: str, message_id: int = 1, priority: int = 0, data_set_type: int = 0x0000) -> bytes:
    from pydicom import Dataset

    from tests.rawdicom import encode

    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = priority
    cmd.CommandDataSetType = data_set_type
    cmd.AffectedSOPInstanceUID = sop_instance
    body = encode(cmd)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


@pytest.mark.parametrize("sop_instance", ["1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1." + "2" * 62, "1." + "2" * 61, "0.0"])
def test_a_plain_store_request_becomes_the_primitive_pynetdicom_would_make(sop_instance):
    """parse_store_rq + the direct primitive: every field pynetdicom's decoding sets, for
    UIDs of odd and even lengths up to 64 characters, message IDs 0 to 0xFFFF, the three
    priorities and data set types other than 0x0101, the same."""
    for message_id, priority, data_set_type in itertools.product((0, 1, 0x7FFF, 0xFFFF), (0, 1, 2), (0x0000, 0x0001, 0xFEFE)):
        command = _store_rq("1.2.840.10008.5.1.4.1.1.2", sop_instance, message_id, priority, data_set_type)
        request = dimsefast.parse_store_rq(command)
        assert request is not None, (sop_instance, message_id, priority, data_set_type)
        msg, theirs = _pynetdicom_primitive(command)
        ours = dimsefast._store_primitive(msg, request)
        assert type(ours) is type(theirs)
        for field in _PRIMITIVE_FIELDS:
            assert getattr(ours, field) == getattr(theirs, field), (field, sop_instance, message_id)
            assert type(getattr(ours, field)) is type(getattr(theirs, field)), field


def test_anything_but_a_plain_store_request_is_left_to_pynetdicom():
    """The fast path reads only the plain case: every malformed command set of
    tests/test_ingest_command.py, no data set (0x0101), a fourth priority, a C-ECHO-RQ,
    UIDs that are not digits and dots, longer than 64, or odd without padding, and Move
    Originator elements all go to pynetdicom's decoder (None)."""
    from tests.test_ingest_command import CASES

    uid = "1.2.826.0.1.3680043.8.498.1"
    for case, make in CASES.items():
        assert dimsefast.parse_store_rq(make(uid)) is None, case
    good = _store_rq("1.2.840.10008.5.1.4.1.1.2", uid)
    assert dimsefast.parse_store_rq(good) is not None
    assert dimsefast.parse_store_rq(_store_rq("1.2.840.10008.5.1.4.1.1.2", uid, data_set_type=0x0101)) is None
    assert dimsefast.parse_store_rq(_store_rq("1.2.840.10008.5.1.4.1.1.2", uid, priority=3)) is None
    assert dimsefast.parse_store_rq(_store_rq("1.2.840.10008.5.1.4.1.1.2", "1.2.3a")) is None
    assert dimsefast.parse_store_rq(good.replace(uid.encode() + b"\x00", uid.encode() + b" ")) is None  # padded with a space
    assert dimsefast.parse_store_rq(_store_rq("1.2.840.10008.5.1.4.1.1.2", "1." + "2" * 64)) is None
    echo = good.replace(b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00", b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00")
    assert echo != good and dimsefast.parse_store_rq(echo) is None
    move = good + struct.pack("<HHI", 0, 0x1030, 4) + b"MOVE"
    move = struct.pack("<HHII", 0, 0, 4, len(move) - 12) + move[12:]
    assert dimsefast.parse_store_rq(move) is None
    unpadded = good.replace(b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.840.10008.5.1.4.1.1.2")
    unpadded = struct.pack("<HHII", 0, 0, 4, len(unpadded) - 12) + unpadded[12:]
    assert dimsefast.parse_store_rq(unpadded) is None


@needs_dcmtk
def test_storescu_requests_are_read_by_the_fast_path(tmp_path, start_node, monkeypatch):
    """dcmtk's storescu sends 5 objects: each request is read by the fast path and
    stored (5 rows, the data sets whole), and a pynetdicom SCU's request too."""
    from pydicom import dcmread
    from pynetdicom import AE

    from tests.conftest import make_study, node_config
    from tests.test_node import storescu

    read = []

    def counting(message, request):
        read.append(request.sop_instance)
        return real(message, request)

    real = dimsefast._store_primitive
    monkeypatch.setattr(dimsefast, "_store_primitive", counting)
    node = start_node(node_config(tmp_path, [_folder(tmp_path)], stable_after_s=3600), schedule=False)
    files = make_study(tmp_path / "in", 5)
    r = storescu(node.settings.node.port, files)
    assert r.returncode == 0, r.stderr
    assert sorted(read) == sorted(str(dcmread(f).SOPInstanceUID) for f in files)
    ds = dcmread(files[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK")
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert read[-1] == str(ds.SOPInstanceUID)
    from node.db import Instance

    with node.sessions() as s:
        assert s.query(Instance).count() == 6
