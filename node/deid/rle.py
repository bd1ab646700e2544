"""RLE Lossless frames (PS3.5 Annex G) as byte planes, without a pixel codec.

RLE keeps every byte of every stored word: one segment per byte plane of each sample,
most significant plane first. Bits outside BitsStored (where retired overlays were
embedded) therefore survive RLE as they survive native Pixel Data; the header step reads
the planes that hold them, clears those bits and writes the changed planes back.
"""

from __future__ import annotations

import struct

import numpy as np

_HEADER = 64  # UL segment count and 15 UL offsets


def split_frame(frame: bytes) -> list[bytes]:
    """The segments of one RLE frame, in order.

    Raises:
        ValueError: the header is not an RLE header (count 1 to 15, offsets increasing
            inside the frame).
    """
    if len(frame) < _HEADER:
        raise ValueError("RLE frame shorter than its header")
    count, *offsets = struct.unpack("<16L", frame[:_HEADER])
    if not 1 <= count <= 15:
        raise ValueError("RLE header with an invalid segment count")
    bounds = [*offsets[:count], len(frame)]
    if bounds[0] != _HEADER or any(b <= a for a, b in zip(bounds, bounds[1:])) or bounds[-2] > len(frame):
        raise ValueError("RLE header with invalid segment offsets")
    return [frame[a:b] for a, b in zip(bounds, bounds[1:])]


def join_frame(segments: list[bytes]) -> bytes:
    """One RLE frame from its segments (each of even length)."""
    offsets, at = [], _HEADER
    for seg in segments:
        offsets.append(at)
        at += len(seg)
    header = struct.pack("<16L", len(segments), *offsets, *([0] * (15 - len(segments))))
    return header + b"".join(segments)


def decode_segment(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes a PackBits segment decodes to.

    Raises:
        ValueError: the segment decodes to fewer than ``size`` bytes.
    """
    return decode_segment_exact(data, size)[0]


def decode_segment_exact(data: bytes, size: int) -> tuple[bytes, bool]:
    """The first ``size`` bytes a PackBits segment decodes to, and whether the segment
    holds exactly those: its runs end at ``size`` bytes, and at most one byte (an even
    length's pad) follows them. Bytes beyond (a run past the frame, a second segment's
    runs after the first's) are no part of the image, and would leave the node unchecked
    if the segment were kept as it came.

    Raises:
        ValueError: the segment decodes to fewer than ``size`` bytes.
    """
    out = bytearray()
    i, n = 0, len(data)
    while i < n and len(out) < size:
        h = data[i]
        i += 1
        if h < 128:  # h + 1 literal bytes
            out += data[i : i + h + 1]
            i += h + 1
        elif h > 128:  # the next byte 257 - h times
            if i < n:
                out += data[i : i + 1] * (257 - h)
            i += 1
    if len(out) < size:
        raise ValueError("RLE segment shorter than the frame")
    return bytes(out[:size]), len(out) == size and n - i <= 1


def encode_segment(data: bytes, columns: int) -> bytes:
    """A PackBits segment for ``data`` (one byte plane, rows of ``columns`` bytes), each
    row encoded on its own (PS3.5 G.3.1: a run does not cross a row boundary), padded
    to an even length."""
    out = bytearray()
    for start in range(0, len(data), columns):
        out += _encode_row(data[start : start + columns])
    if len(out) % 2:
        out.append(0)
    return bytes(out)


def _encode_row(data: bytes) -> bytearray:
    """PackBits of one row: runs of 3 or more equal bytes as replicate runs (at most 128),
    everything else as literal runs (at most 128)."""
    a = np.frombuffer(data, np.uint8)
    out = bytearray()
    literal = bytearray()

    def flush() -> None:
        for k in range(0, len(literal), 128):
            chunk = literal[k : k + 128]
            out.append(len(chunk) - 1)
            out.extend(chunk)
        literal.clear()

    if a.size:
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        lengths = np.diff(np.r_[starts, a.size])
        for start, length in zip(starts.tolist(), lengths.tolist()):
            value = int(a[start])
            if length < 3:
                literal.extend(bytes([value]) * length)
                continue
            flush()
            while length >= 2:
                m = min(length, 128)
                out.extend((257 - m, value))
                length -= m
            if length:
                literal.append(value)
    flush()
    return out
