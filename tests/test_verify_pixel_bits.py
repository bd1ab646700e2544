"""The verifier's pixel bits check (node.deid.verify._pixel_bits): an output whose native
Pixel Data still holds a set bit outside BitsStored (above HighBit, or below its lowest
stored bit) is refused, naming the check and never a value; a clean output passes; bits
that a kept overlay group declares as its own are allowed."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLossless, RLELossless

from node.config import DeidSettings
from node.deid import Deidentifier, Pseudonymizer, to_bytes
from node.deid.verify import reason, verify
from tests.conftest import PYDICOM_FILES, ROOT

SECRET = bytes(range(32))
CASES = ROOT.parent / "shared" / "cases"
needs_cases = pytest.mark.skipif(not CASES.is_dir(), reason=f"the shared case folder {CASES} is absent")
REFUSED = ("verifier: the pixel bits check: bits set outside BitsStored (above HighBit, or below its lowest stored bit) "
           "in the output's (7FE0,0010) PixelData")


def read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data), force=True)


def encode(ds: Dataset, syntax: str) -> bytes:
    """``ds`` written as a Part 10 file in ``syntax`` (its Pixel Data already in that byte order)."""
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(buf, ds, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=syntax != ExplicitVRBigEndian, enforce_file_format=True)
    return buf.getvalue()


def mr(words: np.ndarray, *, stored: int = 12, high: int = 11, signed: bool = False, frames: int = 1) -> Dataset:
    """pydicom's MR_small (64 x 64, 16 bits) holding ``words`` (frames x 64 x 64) as its
    Pixel Data, with the BitsStored, HighBit and PixelRepresentation given."""
    ds = dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stored, high, int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = words.astype("<u2").tobytes()
    return ds


def output(words: np.ndarray, syntax: str = ExplicitVRLittleEndian, **header) -> bytes:
    """What the node writes for ``mr(image(), **header)``, its Pixel Data then replaced by
    ``words`` (as a pixel step, a kept overlay or a bug could leave them), in ``syntax``."""
    ds = Deidentifier(DeidSettings(), Pseudonymizer(SECRET)).apply(mr(image(header.get("frames", 1)), **header)).dataset
    ds.PixelData = words.astype(">u2" if syntax == ExplicitVRBigEndian else "<u2").tobytes()
    return encode(ds, syntax)


def original(**header) -> bytes:
    return encode(mr(image(header.get("frames", 1)), **header), ExplicitVRLittleEndian)


def image(frames: int = 1) -> np.ndarray:
    """12-bit values (0..4095) in 16-bit words, nothing above bit 11."""
    return (np.arange(frames * 64 * 64, dtype=np.uint32) * 7 % 4096).astype(np.uint16).reshape(frames, 64, 64)


def planted(words: np.ndarray, bit: int, every: int = 97) -> np.ndarray:
    """``words`` with ``bit`` set in one word of every ``every``."""
    out = words.copy().reshape(-1)
    out[::every] |= np.uint16(1 << bit)
    return out.reshape(words.shape)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("bit", [12, 15])
def test_a_set_bit_above_high_bit_is_refused_and_a_clean_output_passes(syntax, bit):
    assert verify(original(), output(image(), syntax)) == []
    findings = verify(original(), output(planted(image(), bit), syntax))
    assert [f.kind for f in findings] == ["pixel-bits"]
    assert reason(findings) == REFUSED  # the check and the attribute, never a value


def test_bits_below_the_lowest_stored_bit_are_refused():
    """HighBit 15 with 12 bits stored: the image is bits 4 to 15, bits 0 to 3 are outside."""
    words = image() << np.uint16(4)
    assert verify(original(high=15), output(words, high=15)) == []
    assert [f.kind for f in verify(original(high=15), output(planted(words, 2), high=15))] == ["pixel-bits"]


def test_signed_data_keeps_its_sign_extension_and_nothing_else():
    values = (image().astype(np.int32) - 2048).astype(np.int16)  # -2048..2047, sign-extended in 16 bits
    words = values.view(np.uint16)
    assert verify(original(signed=True), output(words, signed=True)) == []
    negative = values.reshape(-1) < 0
    flipped = words.copy().reshape(-1)
    flipped[np.flatnonzero(negative)[::50]] &= np.uint16(~(1 << 14) & 0xFFFF)  # a hole in the extension of negative values
    assert [f.kind for f in verify(original(signed=True), output(flipped.reshape(words.shape), signed=True))] == ["pixel-bits"]
    raised = words.copy().reshape(-1)
    raised[np.flatnonzero(~negative)[::50]] |= np.uint16(1 << 13)  # a bit above HighBit in positive values
    assert [f.kind for f in verify(original(signed=True), output(raised.reshape(words.shape), signed=True))] == ["pixel-bits"]


def test_an_overlay_group_kept_in_the_output_allows_its_own_bit_only():
    """An embedded overlay kept on purpose (its group with Overlay Bit Position 12, no
    Overlay Data) may keep bit 12; a bit it does not declare is still refused."""

    def with_overlay(words: np.ndarray) -> bytes:
        ds = read(output(words))
        ds.add_new(0x60000010, "US", 64)
        ds.add_new(0x60000011, "US", 64)
        ds.add_new(0x60000100, "US", 16)
        ds.add_new(0x60000102, "US", 12)
        return encode(ds, ExplicitVRLittleEndian)

    assert verify(original(), with_overlay(planted(image(), 12))) == []
    assert [f.kind for f in verify(original(), with_overlay(planted(planted(image(), 12), 14)))] == ["pixel-bits"]


def test_high_bit_that_does_not_fit_bits_allocated_is_refused():
    ds = read(output(image()))
    ds.HighBit = 16
    findings = verify(original(), encode(ds, ExplicitVRLittleEndian))
    assert [f.kind for f in findings] == ["pixel-header"] and "cannot be checked" in reason(findings)


def test_a_multi_frame_output_with_one_dirty_word_in_its_last_frame_is_refused():
    words = image(frames=40)
    assert verify(original(frames=40), output(words, frames=40)) == []
    dirty = words.copy()
    dirty[-1, -1, -1] |= np.uint16(1 << 13)
    assert [f.kind for f in verify(original(frames=40), output(dirty, frames=40))] == ["pixel-bits"]


def rle(words: np.ndarray, **header) -> bytes:
    """``output(words)`` with its Pixel Data in RLE Lossless (pydicom's encoder)."""
    ds = read(output(image(header.get("frames", 1)), **header))
    stored, high = ds.BitsStored, ds.HighBit
    ds.BitsStored, ds.HighBit = 16, 15  # the encoder refuses values over BitsStored: given all 16 bits
    ds.compress(RLELossless, words.reshape(-1, 64, 64).squeeze().view(np.int16 if header.get("signed") else np.uint16), encoding_plugin="pydicom")
    ds.BitsStored, ds.HighBit = stored, high
    return encode(ds, RLELossless)


@pytest.mark.parametrize("frames", [1, 3])
def test_rle_frames_are_read_with_their_own_packbits_reader(frames):
    """RLE codes every byte of a word, so the bits travel in its frames: an RLE output
    with bit 13 set in its last frame is refused, a clean one passes; unsigned and signed."""
    words = image(frames)
    assert verify(original(frames=frames), rle(words, frames=frames)) == []
    assert [f.kind for f in verify(original(frames=frames), rle(planted(words, 13, every=frames * 4096 - 1), frames=frames))] == ["pixel-bits"]
    values = (words.astype(np.int32) - 2048).astype(np.int16).view(np.uint16)
    assert verify(original(frames=frames, signed=True), rle(values, frames=frames, signed=True)) == []
    assert [f.kind for f in verify(original(frames=frames, signed=True), rle(planted(values, 14, every=331), frames=frames, signed=True))] == ["pixel-bits"]


def test_rle_frames_that_cannot_be_read_are_refused():
    """A segment that decodes to fewer bytes than the frame's (the one of the high
    bytes: the low bytes' segment is not read where no checked bit lies), and a frame count the
    fragments do not match: the bits cannot be checked, so the object does not leave."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = read(rle(image()))
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    count, first, second = struct.unpack_from("<3I", frame)
    msb = frame[first:second][: (second - first) // 2]  # the high bytes' segment loses its second half
    short = struct.pack("<16I", count, 64, 64 + len(msb), *[0] * 13) + msb + frame[second:]
    for pixel_data, frames in ((encapsulate([short]), 1), (ds.PixelData, 2)):
        ds.PixelData = pixel_data
        ds.NumberOfFrames = frames
        findings = verify(original(), encode(ds, RLELossless))
        assert [f.kind for f in findings] == ["pixel-unread"] and "cannot be checked" in reason(findings)


def test_other_encapsulated_frames_are_not_decoded_by_the_verifier():
    """JPEG-family frames (here opaque bytes under JPEG Lossless) are not decoded by the
    verifier: the header step decodes those whose codestream declares more precision than
    BitsStored and quarantines them when such a bit is set (tests/test_deid_cases.py,
    case 10 in JPEG); docs/deidentification.md says so."""
    from pydicom.encaps import encapsulate

    ds = read(output(planted(image(), 13)))
    ds.PixelData = encapsulate([zlib.compress(ds.PixelData)])
    assert verify(original(), encode(ds, JPEGLossless)) == []


def test_a_keep_override_of_the_overlay_that_leaves_other_bits_is_quarantined_by_the_cli(tmp_path):
    """A route that keeps the overlay group (keep override of Overlay Data) leaves Pixel
    Data as it came: bit 12 is the overlay's own, but a bit 14 it does not declare makes
    ``casemask deid`` quarantine the object with the check's reason, writing nothing."""
    ds = mr(planted(planted(image(), 12), 14))
    ds.add_new(0x60000010, "US", 64)
    ds.add_new(0x60000011, "US", 64)
    ds.add_new(0x60000100, "US", 16)
    ds.add_new(0x60000102, "US", 12)
    src = tmp_path / "in.dcm"
    src.write_bytes(encode(ds, ExplicitVRLittleEndian))
    out = Deidentifier(DeidSettings(keep=["60003000"]), Pseudonymizer(SECRET)).apply(read(src.read_bytes())).dataset
    assert [f.kind for f in verify(src.read_bytes(), to_bytes(out))] == ["pixel-bits"]
    config = tmp_path / "c.toml"
    config.write_text('[[destinations]]\nname = "f"\nkind = "folder"\npath = "%s"\n\n[[routes]]\nname = "r"\ndeid = { profile = "basic", keep = ["60003000"] }\n'
                      'destinations = ["f"]\n' % (tmp_path / "f"))
    key = tmp_path / "s.key"
    key.write_text(SECRET.hex())
    key.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "node.cli", "deid", str(src), "--out", str(tmp_path / "o"), "--config", str(config), "--route", "r", "--secret", str(key)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and f"quarantined {src}: {REFUSED}" in r.stderr, r.stderr
    assert not list((tmp_path / "o").glob("*.dcm"))


@needs_cases
def test_case10_as_a_tool_left_it_is_refused_and_as_the_node_writes_it_passes(tmp_path):
    """Case 10 (the name in bit 12) with its overlay group removed and its bits left, as
    pydicom/deid#201's tool writes it, checked with ``casemask deid --verify-only``:
    refused, the reason naming the check; the node's own output of it passes."""
    src = next(CASES.glob("10*")) / "mr_embedded_overlay.dcm"
    ds = read(src.read_bytes())
    for tag in [t for t in ds.keys() if t.group == 0x6000]:
        del ds[tag]
    left = tmp_path / "left.dcm"
    left.write_bytes(encode(ds, ExplicitVRLittleEndian))
    r = subprocess.run([sys.executable, "-m", "node.cli", "deid", "--verify-only", str(src), str(left)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "the pixel bits check" in (r.stdout + r.stderr), r.stdout + r.stderr
    out = to_bytes(Deidentifier(DeidSettings(), Pseudonymizer(SECRET)).apply(read(src.read_bytes())).dataset)
    assert verify(src.read_bytes(), out) == []
