"""A hostile sender against the day's changes, twelfth pass (docs/security.md, "Twelfth
attack"): the sequence item limits of the edge's walk, the P-DATA split into messages.
Synthetic values only."""

from __future__ import annotations

import struct

from pydicom import Dataset

from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION, Raw, associate_rq, c_store_pdus, encode, p_data, store_status
from tests.test_attack import _ct
from tests.test_attack_11 import _storescu_statuses
from tests.test_attack_edge4 import _associated, _command, _folder_node, _raw_store_ok, _rows, _store_fields

EMPTY_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
# A private creator whose element (0071,xx18) pydicom's private dictionary knows as SQ.
CREATOR = b"AGFA-AG_HPState "


def _private_items(n: int, implicit: bool, item: bytes = b"") -> tuple[Dataset, bytes]:
    """A synthetic CT data set with a private block (0071,0010) whose element (0071,1018)
    holds ``n`` defined-length items of ``item`` each, itself of defined length: VR UN in
    explicit VR (as a sender that does not know the element writes it), none in implicit."""
    ds = _ct()
    body = encode(ds, implicit=implicit)
    value = (struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item) * n
    if implicit:
        block = struct.pack("<HHI", 0x0071, 0x0010, len(CREATOR)) + CREATOR + struct.pack("<HHI", 0x0071, 0x1018, len(value)) + value
    else:
        block = struct.pack("<HH2sH", 0x0071, 0x0010, b"LO", len(CREATOR)) + CREATOR + struct.pack("<HH2sHI", 0x0071, 0x1018, b"UN", 0, len(value)) + value
    pos = 0  # the block goes before the first element of a group above 0071 (Pixel Data)
    while pos < len(body):
        group, element = struct.unpack_from("<HH", body, pos)
        if group > 0x0071:
            break
        if implicit:
            length, head = struct.unpack_from("<I", body, pos + 4)[0], 8
        elif body[pos + 4 : pos + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
            length, head = struct.unpack_from("<I", body, pos + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", body, pos + 6)[0], 8
        pos += head + length
    return ds, body[:pos] + block + body[pos:]


def _store(port: int, ds: Dataset, data: bytes, syntax: str) -> int | None:
    with Raw(port, timeout=60) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [syntax])], max_pdu=1 << 20))
        assert r.read_pdu()[0] == 0x02
        for pdu in c_store_pdus(_command(_store_fields(ds, 1)), data, fragment=1 << 19):
            r.send(pdu)
        got = r.read_pdu()
    return store_status(got[1]) if got and got[0] == 0x04 else None


# -- the sequence item limits (node/wire.py) -------------------------------------------------
def test_items_of_a_private_sequence_count_towards_the_item_limits(tmp_path, start_node):
    """The edge counted the items of defined-length values of sequences the public
    dictionary knows (or written as SQ) only: 200 000 empty items (1.6 MB) in a private
    element of implicit VR (or explicit VR UN) passed, answered Success, though pydicom
    reads them as a sequence as soon as the element is touched (its private dictionary
    knows the creator's element as SQ: measured 5.8 s of CPU for 200 000, as many as the
    public ones the eleventh pass refused). The walk now follows the private creators
    and walks as items the elements their private dictionary knows as sequences:
    refused 0xC210, nothing stored; the same element with a few real items is stored."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    for implicit, syntax in ((True, IMPLICIT_VR_LE), (False, EXPLICIT_VR_LE)):
        ds, data = _private_items(200_000, implicit)
        status = _store(port, ds, data, syntax)
        assert status == 0xC210, f"{syntax}: answered {status!r}"
    assert _rows(node) == 0
    uid = b"1.2.826.0.1.3680043.8.498.12345678901234567890123456789012\x00"
    ds, data = _private_items(50, True, struct.pack("<HHI", 0x0008, 0x1155, len(uid)) + uid)
    assert _store(port, ds, data, IMPLICIT_VR_LE) == 0x0000
    assert _rows(node) == 1


def test_a_private_sequence_whose_first_tag_is_not_an_item_tag_is_counted(tmp_path):
    """pydicom reads a first tag that is not an item tag as an item (a warning), so a
    private sequence's first bytes say nothing: 8 bytes of another tag, then 200 000
    empty items, passed a check on the value's first tag. A private sequence (by its
    creator's dictionary) whose content the walk cannot follow has its item tags counted
    as bytes: refused; an element of a creator without sequences, of text, is not."""
    import io

    from pydicom.filereader import read_dataset

    from node.wire import Refused, scan_whole

    ds, data = _private_items(200_000, True)
    data = data.replace(EMPTY_ITEM, struct.pack("<HHI", 0x0008, 0x1150, 0), 1)
    assert len(read_dataset(io.BytesIO(data), True, True)[0x00711018].value) == 200_000  # what pydicom makes of it
    try:
        scan_whole(data, True, 0)
    except Refused as exc:
        assert "sequence items" in str(exc)
    else:
        raise AssertionError("a private sequence of 200 000 items after a non-item tag passed the walk")
    _, other = _private_items(200_000, True)
    other = other.replace(CREATOR, b"SOME VENDOR 1   ")  # a creator pydicom knows nothing of: bytes to it
    assert read_dataset(io.BytesIO(other), True, True)[0x00711018].VR == "UN"
    assert scan_whole(other, True, 0)[1] == len(other)


def test_private_sequence_items_nested_in_a_public_item_are_counted(tmp_path):
    """The same inside an item of a public sequence (the walk's nested path)."""
    from node.wire import Refused, dataset_end

    value = EMPTY_ITEM * 200_000
    inner = struct.pack("<HHI", 0x0071, 0x0010, len(CREATOR)) + CREATOR + struct.pack("<HHI", 0x0071, 0x1018, len(value)) + value
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
    data = struct.pack("<HHI", 0x0008, 0x1115, 0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)  # Referenced Series Sequence
    try:
        dataset_end(data, True)
    except Refused as exc:
        assert "sequence items" in str(exc)
    else:
        raise AssertionError("200 000 private items inside a public item passed the walk")


def _public_sequence(first: bytes, n: int) -> bytes:
    """An explicit VR little endian data set whose ROI Contour Sequence (defined length)
    begins with ``first`` and then holds ``n`` empty items."""
    base = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 26) + b"1.2.840.10008.5.1.4.1.1.2\x00" + struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 8) + b"1.2.3.4\x00"
    value = first + EMPTY_ITEM * n
    return base + struct.pack("<HH2sHI", 0x3006, 0x0039, b"SQ", 0, len(value)) + value


def test_items_after_one_the_walk_cannot_follow_are_counted(tmp_path):
    """The walk gave up on a defined-length sequence at the first item it could not
    follow and counted none after it; pydicom reads on: an element whose VR bytes are not
    a VR (read as implicit VR) or a first tag that is not an item tag (read as an item).
    One such item, then 200 000 empty ones: 1.6 MB that pydicom took 4.8 s of CPU to read
    (200 001 items), past the edge. The rest of the value's item tags are counted as
    bytes now (as a big endian data set's): refused. A sequence of real items after the
    odd one is not."""
    import io

    from pydicom.filereader import read_dataset

    from node.wire import Refused, scan_whole

    odd = struct.pack("<HHI", 0x0008, 0x1150, 8) + b"1.2.3.4\x00"  # no VR: its "VR" bytes are \x08\x00
    firsts = {"an element without a VR": struct.pack("<HHI", 0xFFFE, 0xE000, len(odd)) + odd,
              "a first tag that is not an item tag": struct.pack("<HHI", 0x0008, 0x1150, 0)}
    for why, first in firsts.items():
        data = _public_sequence(first, 200_000)
        assert len(read_dataset(io.BytesIO(data), False, True)[0x30060039].value) > 200_000  # what pydicom makes of it
        try:
            scan_whole(data, False, 0)
        except Refused as exc:
            assert "sequence items" in str(exc), why
        else:
            raise AssertionError(f"{why}, then 200 000 empty items: passed the walk")
    uid = b"1.2.826.0.1.3680043.8.498.12345678901234567890123456789012\x00"
    element = struct.pack("<HH2sH", 0x0008, 0x1155, b"UI", len(uid)) + uid
    real = (struct.pack("<HHI", 0xFFFE, 0xE000, len(element)) + element) * 20_000
    data = _public_sequence(firsts["an element without a VR"] + real, 0)
    assert scan_whole(data, False, 0)[1] == len(data)


def _storescu(port: int, path, *args: str) -> str:
    import subprocess

    from tests.conftest import dcmtk_env

    r = subprocess.run(["/usr/bin/storescu", "-v", *args, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(port), str(path)],
                       capture_output=True, text=True, env=dcmtk_env(), timeout=120)
    return r.stdout + r.stderr


def test_a_big_endian_image_whose_pixels_spell_item_tags_is_stored(tmp_path, start_node):
    """Big endian data sets have their item tags counted as bytes, Pixel Data included:
    a 512 x 512 16-bit image of alternating pixel values 65534 and 57344 (a test pattern;
    big endian, its bytes spell FF FE E0 00 every 4 bytes: 65 536 "items" of 8 bytes)
    sent by storescu -xb was refused 0xC210 (Cannot Understand). The big endian data set
    is walked now (explicit VR, into its sequences, here a Referenced Image Sequence with
    a nested code sequence), values skipped: stored. The same number of real empty items,
    in a sequence, is still refused; so are items nested too deep."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = struct.pack("<HH", 0xFFFE, 0xE000) * (512 * 512 // 2)
    ds["PixelData"].VR = "OW"
    ref = Dataset()  # sequences before Pixel Data, one nested: walked, not counted as bytes
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.8.498.1"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D0050", "SRT", "Tissue"
    ref.PurposeOfReferenceCodeSequence = [code]
    ds.ReferencedImageSequence = [ref, ref]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "pattern.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = _storescu(port, path, "-xb")
    assert "BigEndian" in out or "Big Endian" in out, "not sent big endian"
    assert list(_storescu_statuses(out).values()) == ["Success"], out[-600:]
    assert _rows(node) == 1
    # real items are still counted: 65 536 empty ones in a sequence of a big endian data set
    from node.wire import item_tags_problem
    import io

    empty = struct.pack(">HHI", 0xFFFE, 0xE000, 0)
    seq = struct.pack(">HH2sHI", 0x3006, 0x0039, b"SQ", 0, 0xFFFFFFFF) + empty * 65_536 + struct.pack(">HHI", 0xFFFE, 0xE0DD, 0)
    head = struct.pack(">HH2sH", 0x0008, 0x0018, b"UI", 8) + b"1.2.3.4\x00"
    assert "sequence items" in item_tags_problem(io.BytesIO(head + seq), len(head + seq))
    nested = head
    for _ in range(70):  # undefined-length sequences in undefined-length items, 70 deep
        nested += struct.pack(">HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + struct.pack(">HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    nested += (struct.pack(">HHI", 0xFFFE, 0xE00D, 0) + struct.pack(">HHI", 0xFFFE, 0xE0DD, 0)) * 70
    assert "nested deeper" in item_tags_problem(io.BytesIO(nested), len(nested))


# -- two messages in one P-DATA-TF (node/admission.py, message_parts) --------------------------
def _pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


def _pdata(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def test_a_pdv_without_a_control_header_between_two_messages_aborts(tmp_path, start_node):
    """A PDV of item length 1 (a context ID, no message control header) after a C-ECHO-RQ
    and before a whole C-STORE-RQ, all in one P-DATA-TF: the fragment check stopped at the
    empty PDV ("pynetdicom refuses it"), the split did not cut there, and pynetdicom
    ended the echo's message at its command and dropped the rest: the echo answered, the
    C-STORE-RQ never answered nor refused, its sender left waiting for its own timeout.
    Such a PDV aborts the association now, whatever comes before it."""
    import time

    from tests.test_attack_11 import _answers, _echo_command

    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a = _ct()
    empty = struct.pack(">IB", 1, 3)
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, VERIFICATION, [IMPLICIT_VR_LE])]) as r:
        r.sock.settimeout(8)
        began = time.monotonic()
        r.send(_pdata(_pdv(3, 0x03, _echo_command(1)), empty, _pdv(1, 0x03, _command(_store_fields(a, 2))), _pdv(1, 0x02, encode(a, implicit=False))))
        answers = _answers(r, 3)
        waited = time.monotonic() - began
    assert answers and answers[-1] == (0x07, None), f"no abort: {answers} after {waited:.1f} s"
    assert waited < 5, waited
    assert _rows(node) == 0
    assert _raw_store_ok(port)


def test_items_of_a_repeating_group_sequence_count_towards_the_item_limits(tmp_path, start_node):
    """(50xx,2600) Curve Referenced Overlay Sequence is in pydicom's dictionary of
    repeating groups, not its main one, where the walk took the tags of sequences from:
    200 000 empty items in (5002,2600), implicit VR, defined length, passed the edge
    (Success) and cost pydicom 7.0 s of CPU to read. Counted now: 0xC210."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    body = encode(ds, implicit=True)
    value = EMPTY_ITEM * 200_000
    pixel = body.index(struct.pack("<HH", 0x7FE0, 0x0010))  # (5002,2600) before Pixel Data
    data = body[:pixel] + struct.pack("<HHI", 0x5002, 0x2600, len(value)) + value + body[pixel:]
    assert _store(port, ds, data, IMPLICIT_VR_LE) == 0xC210
    assert _rows(node) == 0
    assert _raw_store_ok(port)


def test_a_thousand_c_stores_in_one_p_data_answer_success_only_for_what_is_stored(tmp_path, start_node):
    """1000 whole C-STORE-RQs (2000 PDVs) in one P-DATA-TF: the split hands them on one
    by one and the association is aborted once more than MAX_WAITING_MESSAGES wait
    (held: aborted at once, measured). Whatever was answered, every Success names an
    object with its row, and the node answers the next sender."""
    import sqlite3

    from tests.test_attack_11 import _answers

    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    objects = [_ct() for _ in range(1000)]
    pdvs = []
    for k, ds in enumerate(objects):
        pdvs += [_pdv(1, 0x03, _command(_store_fields(ds, k + 1))), _pdv(1, 0x02, encode(ds, implicit=False))]
    with _associated(port) as r:
        r.sock.settimeout(10)
        r.send(_pdata(*pdvs))
        answers = _answers(r, 1001)
    assert answers and answers[-1][0] == 0x07, f"not aborted: {len(answers)} answers"
    successes = sum(1 for kind, status in answers if kind == 0x04 and status == 0x0000)
    import time

    time.sleep(1)
    with sqlite3.connect(node.settings.node.data_dir / "casemask.db") as db:
        stored = {row[0] for row in db.execute("select sop_instance_uid from instances")}
    assert successes <= len(stored) <= 5, (successes, len(stored))
    assert stored <= {str(ds.SOPInstanceUID) for ds in objects}
    assert _raw_store_ok(port)
