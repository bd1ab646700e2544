"""Hostile Pixel Data against the step that clears the bits above BitsStored
(docs/security.md, ninth attack): RLE Lossless and JPEG-family frames whose bytes hold
more than the frames that step reads. A synthetic 16 x 16 image of 12 stored bits in 16
allocated, bit 12 set under a block (an overlay embedded in Pixel Data); each variant
is de-identified and its output searched for the bits (decoded the way a decoder that
follows every table would) and for the bytes that carried them."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from node.config import DeidSettings
from node.deid import Deidentifier, Pseudonymizer, QuarantineError, rle, to_bytes

ROWS = COLUMNS = 16
CLEAN = np.full(ROWS * COLUMNS, 100, np.uint16)
DIRTY = CLEAN.copy()
DIRTY[:40] |= 1 << 12  # the overlay's bit, above BitsStored


def _deid() -> Deidentifier:
    return Deidentifier(DeidSettings(options=[]), Pseudonymizer(b"k" * 32))


def _even(b: bytes) -> bytes:
    return b + b"\0" if len(b) % 2 else b


def _rle_frame(words: np.ndarray) -> bytes:
    high = ((words >> 8) & 0xFF).astype(np.uint8).tobytes()
    low = (words & 0xFF).astype(np.uint8).tobytes()
    return _even(rle.join_frame([rle.encode_segment(high, COLUMNS), rle.encode_segment(low, COLUMNS)]))


def _object(syntax: str, pixel_data: bytes, frames: int = 1) -> Dataset:
    """A synthetic MR object with encapsulated ``pixel_data``, as read from a file (raw
    elements, Pixel Data of undefined length)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality, ds.BurnedInAnnotation = "SYNTH^ONE", "SYN001", "MR", "NO"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def _as_read(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def _with_extended_offsets(ds: Dataset, offsets: list[int], lengths: list[int]) -> Dataset:
    ds.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
    ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(lengths)}Q", *lengths)
    return ds


def _frames_any_decoder_reads(ds: Dataset) -> list[bytes]:
    """The frames of ``ds`` as found by its Extended Offset Table where it has one (as
    pydicom 3 and DICOMweb servers do), else by the Basic Offset Table or fragments."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    kw = {}
    if "ExtendedOffsetTable" in ds:
        kw["extended_offsets"] = (ds.ExtendedOffsetTable, ds.get("ExtendedOffsetTableLengths"))
    return list(generate_frames(ds.PixelData, number_of_frames=n, **kw))


def _high_bits_in_rle(ds: Dataset) -> int:
    set_bits = 0
    for frame in _frames_any_decoder_reads(ds):
        msb = np.frombuffer(rle.decode_segment(rle.split_frame(frame)[0], ROWS * COLUMNS), np.uint8)
        set_bits += int((msb >> 4).astype(bool).sum())
    return set_bits


def _deidentified(ds: Dataset) -> Dataset:
    return dcmread(io.BytesIO(to_bytes(_deid().apply(_as_read(ds)).dataset)))


def _rle_variants() -> dict[str, Dataset]:
    clean, dirty = _rle_frame(CLEAN), _rle_frame(DIRTY)
    clean_segments, dirty_segments = rle.split_frame(clean), rle.split_frame(dirty)
    rle_ts = "1.2.840.10008.1.2.5"
    return {
        # a decoder following the table reads the dirty fragment; the step read the first
        "extended offset table to a second fragment": _with_extended_offsets(
            _object(rle_ts, encapsulate([clean, dirty], has_bot=False)), [8 + len(clean)], [len(dirty)]
        ),
        # one frame in two fragments: the second (a whole dirty frame) rides in the last segment
        "two fragments for one frame": _object(rle_ts, encapsulate([clean, dirty], has_bot=False)),
        # the dirty plane's runs after the clean plane's, in the same segment
        "runs after the frame's in a segment": _object(
            rle_ts, encapsulate([_even(rle.join_frame([clean_segments[0] + dirty_segments[0], clean_segments[1]]))])
        ),
    }


@pytest.mark.parametrize("variant", list(_rle_variants()))
def test_rle_pixel_data_keeps_no_unchecked_bytes(variant):
    """Before: each output kept the dirty frame's bytes (its most significant plane, the
    overlay's bitmap in PackBits); with the Extended Offset Table, pydicom 3 read the
    dirty frame from the output, 40 pixels with bit 12 set."""
    src = _rle_variants()[variant]
    dirty_plane = rle.split_frame(_rle_frame(DIRTY))[0]
    assert dirty_plane in src.PixelData
    out = _deidentified(src)
    assert "ExtendedOffsetTable" not in out and "ExtendedOffsetTableLengths" not in out
    assert _high_bits_in_rle(out) == 0
    assert dirty_plane not in out.PixelData
    for frame in _frames_any_decoder_reads(out):  # the image itself unchanged
        low = np.frombuffer(rle.decode_segment(rle.split_frame(frame)[1], ROWS * COLUMNS), np.uint8)
        assert np.array_equal(low, (CLEAN & 0xFF).astype(np.uint8))


@pytest.mark.parametrize("frames", [1, 3])
def test_a_clean_rle_object_is_left_as_it_came(frames):
    """The fix re-encodes only what it must: clean frames, one fragment each (after the
    Basic Offset Table, which is no fragment), stay byte for byte and are not reported
    as changed."""
    from node.deid.burned_in import zero_unused_high_bits

    src = _object("1.2.840.10008.1.2.5", encapsulate([_rle_frame(CLEAN)] * frames), frames)
    assert zero_unused_high_bits(_as_read(src)) is False
    out = _deidentified(src)
    assert out.PixelData == _as_read(src).PixelData


def _jpeg_header(precision: int) -> bytes:
    """SOI, SOF3 (lossless) of ``precision`` bits, one component, EOI: the step reads the
    precision and does not decode a frame whose precision is at most BitsStored."""
    sof = struct.pack(">BHHB", precision, ROWS, COLUMNS, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8\xff\xc3" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def test_a_jpeg_extended_offset_table_does_not_point_past_the_checked_frames():
    """JPEG Lossless: fragment 1 declares 12 bits (checked, passes), fragment 2 declares
    16 (it would be decoded and refused). Before: the Extended Offset Table pointing at
    fragment 2 was kept, and the output written: a decoder that follows the table read
    the 16-bit frame the step never looked at. Now fragment 2 is bytes after the end of
    the one frame read (NumberOfFrames 1): quarantined (and a table is never kept beside
    frames checked without it)."""
    a, b = _even(_jpeg_header(12)), _even(_jpeg_header(16))
    src = _with_extended_offsets(_object("1.2.840.10008.1.2.4.70", encapsulate([a, b], has_bot=False)), [8 + len(a)], [len(b)])
    with pytest.raises(QuarantineError, match="PixelData: compressed frame with bytes after its codestream's end"):
        _deid().apply(_as_read(src))


def _rle_bomb(n: int) -> Dataset:
    """One RLE frame of n x n 16-bit pixels, bit 12 set everywhere: PackBits codes 128
    equal bytes in 2, so 2 n^2 bytes of frame come from n^2 / 32 bytes sent."""
    high = bytes([257 - 128, 0x10]) * (n * n // 128)
    low = bytes([257 - 128, 0x01]) * (n * n // 128)
    ds = _object("1.2.840.10008.1.2.5", encapsulate([rle.join_frame([high, low])]))
    ds.Rows = ds.Columns = n
    return ds


def test_an_rle_frame_declaring_gigabytes_is_quarantined_before_it_is_decoded(monkeypatch):
    """PackBits amplifies 64 times, and clearing the bits held some 12 bytes a pixel: a
    frame of 0.5 MB sent took 195 MB of the worker (4096 x 4096, measured); 65535 x 65535
    (134 MB sent) would take some 50 GB. A frame over MAX_FRAME_BYTES decoded is
    quarantined with a reason, before a byte of it is decoded (here the limit is lowered
    to 1 MiB, and the frame is 8 MiB decoded, 128 KiB sent)."""
    from node.deid import burned_in

    def never(*_):
        raise AssertionError("a segment was decoded")

    monkeypatch.setattr(burned_in, "MAX_FRAME_BYTES", 1 << 20)
    monkeypatch.setattr(rle, "decode_segment_exact", never)
    with pytest.raises(QuarantineError, match="PixelData: RLE frame larger than 1 MiB decoded"):
        _deid().apply(_as_read(_rle_bomb(2048)))


@pytest.mark.parametrize("high_bit", [16, 20, 31])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"])
def test_a_high_bit_outside_the_word_is_a_named_quarantine(syntax, high_bit):
    """HighBit at or above BitsAllocated, signed: before, numpy's OverflowError left the
    step (the pipeline quarantined it as 'header de-identification raised OverflowError');
    now the reason names the attribute."""
    from node.deid import QuarantineError

    pixel_data = encapsulate([_rle_frame(DIRTY)]) if syntax.endswith(".5") else DIRTY.astype("<u2").tobytes()
    ds = _object(syntax, pixel_data)
    if not syntax.endswith(".5"):
        ds["PixelData"].is_undefined_length = False
    ds.HighBit, ds.PixelRepresentation = high_bit, 1
    with pytest.raises(QuarantineError, match="PixelData: HighBit outside BitsAllocated"):
        _deid().apply(_as_read(ds))


def _j2k(n: int) -> bytes:
    """A lossless JPEG 2000 codestream of an n x n constant image declared 16 bits deep
    (above BitsStored 12: the step decodes it to look at the bits); a few hundred bytes
    whatever n is."""
    from openjpeg import encode

    return _even(encode(np.full((n, n), 100, np.uint16), bits_stored=16, photometric_interpretation=2, use_mct=False))


@pytest.mark.parametrize("rows", [16, 1024])
def test_a_jpeg_2000_frame_declaring_gigabytes_is_quarantined_before_it_is_decoded(monkeypatch, rows):
    """8192 x 8192 in 1.5 KB sent took the worker 392 MB to decode (measured), 65535 x
    65535 would take some 25 GB. The size is the codestream's (SIZ), not Rows and
    Columns (16 here, the codestream 1024): the decoder allocates what the codestream
    declares. The limit is lowered to 1 MiB; the frame is 2 MiB decoded."""
    import pylibjpeg

    from node.deid import burned_in

    def never(*_, **__):
        raise AssertionError("a frame was decoded")

    pytest.importorskip("openjpeg")
    frame = _j2k(1024)
    monkeypatch.setattr(burned_in, "MAX_FRAME_BYTES", 1 << 20)
    monkeypatch.setattr(pylibjpeg, "decode", never)
    ds = _object("1.2.840.10008.1.2.4.90", encapsulate([frame]))
    ds.Rows = ds.Columns = rows
    with pytest.raises(QuarantineError, match="PixelData: compressed frame larger than 1 MiB decoded"):
        _deid().apply(_as_read(ds))


def test_a_compressed_frame_of_unknown_size_is_not_decoded(monkeypatch):
    """A JPEG 2000 codestream in a JP2 file's boxes (openjpeg reads those too), and a
    JPEG whose line count waits for a DNL marker: no size the step can read before the
    decoder allocates (nor, for JP2, an end the step can find), so the object is
    quarantined without decoding."""
    import pylibjpeg

    def never(*_, **__):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(pylibjpeg, "decode", never)
    jp2 = _even(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64))
    dnl = _even(_jpeg_header(16).replace(struct.pack(">HH", ROWS, COLUMNS), struct.pack(">HH", 0, COLUMNS), 1))
    for frame in (jp2, dnl):
        ds = _object("1.2.840.10008.1.2.4.90" if frame is jp2 else "1.2.840.10008.1.2.4.70", encapsulate([frame]))
        with pytest.raises(QuarantineError, match="codestream header cannot be read|bytes after its codestream's end"):
            _deid().apply(_as_read(ds))


def test_a_clean_jpeg_2000_frame_of_high_precision_is_still_checked_and_let_through():
    """The limit leaves ordinary frames alone: a 16-bit-deep codestream of a clean
    12-bit image is decoded, found clean, and written as it came."""
    pytest.importorskip("openjpeg")
    src = _object("1.2.840.10008.1.2.4.90", encapsulate([_j2k(64)]))
    src.Rows = src.Columns = 64
    out = _deidentified(src)
    assert out.PixelData == _as_read(src).PixelData


def test_a_second_codestream_after_a_jpeg_frames_end_is_quarantined():
    """JPEG Lossless, one frame in two fragments: the first a 12-bit codestream (checked
    by its header, passes), the second a 16-bit one pydicom joins after the first's EOI.
    Decoders stop at the EOI, so nothing showed, but the second codestream's bytes (which
    may carry bits above BitsStored) were written out unchecked. Now bytes after a
    codestream's end (but zero padding) quarantine the object; the same in one fragment."""
    a, b = _even(_jpeg_header(12)), _even(_jpeg_header(16) + b"ZQXHIDDEN")
    for pixel_data in (encapsulate([a, b], has_bot=False), encapsulate([a + b])):
        with pytest.raises(QuarantineError, match="bytes after its codestream's end"):
            _deid().apply(_as_read(_object("1.2.840.10008.1.2.4.70", pixel_data)))
    assert a.endswith(b"\xff\xd9\x00")  # padded to an even length: no bytes after the end that count
    out = _deidentified(_object("1.2.840.10008.1.2.4.70", encapsulate([a])))
    assert out.PixelData == _as_read(_object("1.2.840.10008.1.2.4.70", encapsulate([a]))).PixelData


def test_the_pixel_and_burned_in_steps_do_not_decode_frames_declaring_gigabytes(monkeypatch):
    """The header step's size limit, in the two steps that decode a whole object with
    pydicom (node.pixels.frames_of for the pixel model, node.burnedin.clean for burned-in
    text): a JPEG 2000 codestream of a few hundred bytes declaring a frame of 2 MiB (the
    limit lowered to 1 MiB), an RLE object whose Rows x Columns exceed it, and frames
    that exceed the whole-object limit together are refused before any decoder runs
    (quarantined by the pipeline with the reason); a small frame still decodes."""
    import pydicom.pixels

    from node import pixels
    from node.burnedin import clean
    from node.deid import burned_in

    pytest.importorskip("openjpeg")
    monkeypatch.setattr(burned_in, "MAX_FRAME_BYTES", 1 << 20)
    monkeypatch.setattr(burned_in, "MAX_DECODED_BYTES", 3 << 19)

    def never(*_, **__):
        raise AssertionError("a frame was decoded")

    big = _object("1.2.840.10008.1.2.4.90", encapsulate([_j2k(1024)]))
    big.Rows = big.Columns = 16
    rle = _object("1.2.840.10008.1.2.5", encapsulate([_rle_frame(DIRTY)]))
    rle.Rows = rle.Columns = 1024
    many = _object("1.2.840.10008.1.2.4.90", encapsulate([_j2k(512)] * 4), frames=4)
    many.Rows = many.Columns = 512
    with monkeypatch.context() as m:
        m.setattr(pydicom.pixels, "decompress", never)
        m.setattr(type(big), "pixel_array", property(never))
        for ds, why in ((big, "compressed frame larger than 1 MiB"), (rle, "a frame larger than 1 MiB"), (many, "frames larger than 1 MiB decoded")):
            ds = _as_read(ds)
            with pytest.raises(pixels.PixelError, match=why):
                pixels.frames_of(ds)
            with pytest.raises(clean.BurnedInError, match=why):
                clean._read_pixels(ds, clean.CleanReport())
    small = _as_read(_object("1.2.840.10008.1.2.4.90", encapsulate([_j2k(64)])))
    small.Rows = small.Columns = 64
    assert pixels.frames_of(small).shape == (1, 64, 64)
