"""The C-STORE handler's fast reading of the row attributes, checked against pydicom."""

from __future__ import annotations

import io
import warnings

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from node import wire
from tests.conftest import PYDICOM_FILES, make_study, read_quietly

KEYWORDS = wire.ROW_KEYWORDS


def encodings_of(path):
    """The dataset of ``path`` encoded implicit and explicit VR little endian."""
    ds = read_quietly(path)
    if ds is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for implicit in (True, False):
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, implicit
            try:
                write_dataset(fp, ds)
            except Exception:
                continue
            yield implicit, fp.getvalue()


def pydicom_row(encoded: bytes, implicit: bool) -> dict[str, str]:
    ds = read_dataset(io.BytesIO(encoded), implicit, True, stop_when=lambda tag, vr, length: tag > 0x0020000E, specific_tags=wire.ROW_TAGS)
    return {kw: str(ds.get(kw, "") or "").strip("\x00 ") for kw in KEYWORDS}


def test_scanner_reads_what_pydicom_reads(tmp_path):
    """Every bundled pydicom file (sequences of defined and undefined length, private
    and UN elements) and a synthetic study, in both little-endian encodings."""
    paths = sorted(PYDICOM_FILES.rglob("*.dcm")) + make_study(tmp_path / "s", 2)
    compared = 0
    for path in paths:
        for implicit, encoded in encodings_of(path):
            try:
                want = pydicom_row(encoded, implicit)
            except Exception:
                continue
            assert wire.row_attributes(encoded, implicit, True) == want, (path.name, implicit)
            assert wire._scan(encoded, implicit) == want, (path.name, implicit)  # not pydicom's fallback
            compared += 1
    assert compared > 100


def test_a_value_cut_short_is_left_to_pydicom():
    """The scanner never returns a UID cut off by the end of the data."""
    implicit, encoded = next(encodings_of(PYDICOM_FILES / "CT_small.dcm"))
    uid = dcmread(PYDICOM_FILES / "CT_small.dcm").SOPInstanceUID.encode()
    cut = encoded.index(uid) + len(uid) // 2
    with pytest.raises(wire._Unusual):
        wire._scan(encoded[:cut], implicit)


def test_busy_association_polls_at_the_reactor_delay(monkeypatch):
    """pynetdicom's association reactor sleeps 1 ms between polls; on a thread that just
    handled a C-STORE the node's clock sleeps the configured delay instead, and goes back
    to 1 ms once the association has been idle for half a second."""
    import node.reactor as scp

    slept: list[float] = []
    now = [100.0]
    monkeypatch.setattr(scp.time, "sleep", slept.append)
    monkeypatch.setattr(scp.time, "monotonic", lambda: now[0])
    clock = scp.ReactorClock(0.0002)
    clock.sleep(0.001)  # idle
    clock.mark_busy()
    clock.sleep(0.001)  # busy
    clock.sleep(0.01)  # any other sleep is left alone
    now[0] += clock.BUSY_S + 0.01
    clock.sleep(0.001)  # idle again
    assert slept == [0.001, 0.0002, 0.01, 0.001]
    assert clock.monotonic() == now[0]  # everything else is the time module's


def test_sequence_scanner_lists_what_pydicom_decodes():
    """Every element pydicom finds inside a still-raw sequence, at any depth, in order."""
    from pydicom.dataelem import RawDataElement

    compared = 0
    for path in sorted(PYDICOM_FILES.rglob("*.dcm")):
        ds = read_quietly(path)
        if ds is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for tag, elem in list(ds._dict.items()):
                if type(elem) is not RawDataElement or not elem.is_little_endian or elem.value is None:
                    continue
                try:
                    decoded = ds[tag]
                except Exception:
                    continue
                if decoded.VR != "SQ" or elem.VR == "UN":
                    continue
                try:
                    got = [t for t, _ in wire.sequence_elements(elem.value, bool(elem.is_implicit_VR))]
                except ValueError:
                    continue  # left to pydicom (private nested sequences in implicit VR, UN)

                def walk(seq):
                    for item in seq:
                        for e in item:
                            yield int(e.tag)
                            if e.VR == "SQ":
                                yield from walk(e.value)

                assert got == list(walk(decoded.value)), (path.name, hex(tag))
                compared += 1
    assert compared > 20


def _nested(depth: int) -> bytes:
    """(0008,1140) sequences of undefined length nested ``depth`` deep, implicit VR."""
    import struct

    nest = struct.pack("<HHI", 0x0008, 0x1140, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return nest * depth + close * depth


def test_sequences_nested_beyond_the_cap_are_refused_and_pydicom_reads_the_cap():
    """The walk takes MAX_SEQUENCE_DEPTH levels (pydicom reads that deep) and refuses one
    more, before pydicom's own recursion limit (about 190 levels) is near."""
    at_cap = _nested(wire.MAX_SEQUENCE_DEPTH)
    assert wire.dataset_end(at_cap, True) == len(at_cap)
    read_dataset(io.BytesIO(at_cap), True, True).to_json_dict()  # decoded to the bottom
    with pytest.raises(wire.Refused):
        wire.dataset_end(_nested(wire.MAX_SEQUENCE_DEPTH + 1), True)
    with pytest.raises(wire.Refused):
        wire.scan_whole(_nested(900), True)


def test_a_file_meta_element_inside_the_data_set_is_refused():
    import struct

    ts = b"1.2.840.10008.1.2.4.50\x00"
    planted = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(ts)) + ts
    with pytest.raises(wire.Refused):
        wire.dataset_end(planted, False)


def _nested_defined(depth: int, implicit: bool, mixed: bool = False) -> bytes:
    """(0008,1140) sequences of defined length nested ``depth`` deep; ``mixed``: every
    other level an undefined-length sequence whose item has a defined length."""
    import struct

    inner = b""
    for level in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        undefined = mixed and level % 2
        length = 0xFFFFFFFF if undefined else len(item)
        tail = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) if undefined else b""
        head = struct.pack("<HHI", 0x0008, 0x1140, length) if implicit else struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, length)
        inner = head + item + tail
    return inner


@pytest.mark.parametrize("implicit,mixed", [(True, False), (False, False), (True, True), (False, True)])
def test_defined_length_sequences_count_toward_the_nesting_cap(implicit, mixed):
    at_cap = _nested_defined(wire.MAX_SEQUENCE_DEPTH, implicit, mixed)
    assert wire.dataset_end(at_cap, implicit) == len(at_cap)
    read_dataset(io.BytesIO(at_cap), implicit, True).to_json_dict()
    with pytest.raises(wire.Refused):
        wire.dataset_end(_nested_defined(wire.MAX_SEQUENCE_DEPTH + 1, implicit, mixed), implicit)
    with pytest.raises(wire.Refused):
        wire.dataset_end(_nested_defined(400, implicit, mixed), implicit)
