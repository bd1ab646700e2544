"""A classical reading of text ink, beside the network's: flat strokes of one colour.

Burned-in text is drawn by the device in one ink colour: its strokes hold many pixels
of exactly the same stored value, side by side, brighter than what is just around
them (a thin bright mark). Speckle, noise and image content vary from pixel to pixel:
equal neighbours there are rare and their values spread over many levels. This module
finds, without the network, clusters of such "flat thin strokes" (runs of three equal
pixels that stand out of a morphological opening) sharing one value.

It is used two ways by :mod:`node.burnedin.clean` (measured: docs/burned-in.md,
"The ink reading"):

- :func:`extend_along_ink`: a mask the detector drew is grown sideways, a step at a
  time, while the strip beside it still holds the line's ink (the detector's box often
  stops a letter or two short of a line over speckle, and neither reading sees what is
  left beside the mask);
- :func:`ink_lines`: on the masked frame, lines of ink no mask covers; next to a mask
  they are masked too, elsewhere the object is quarantined (text both readings of the
  network missed: small, faint text across a bright structure).

Where stored values are not exact (lossy compression re-quantises the ink) it finds
less; it only ever adds masks or holds objects back, never removes a mask.

Techniques: the white top-hat (Serra, "Image Analysis and Mathematical Morphology",
1982) for thin bright marks; runs of equal values as the "flat" test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive)

TOPHAT = 7  # pixels: strokes thinner than this stand out in the top-hat (text up to about 30 px)
STROKE = 25  # grey levels a stroke must stand above its TOPHAT x TOPHAT opening
RUN = 3  # equal pixels in a row or column: a piece of a stroke (2 is common in speckle, 3 rare)
MIN_POINTS = 8  # stroke pixels of one value a cluster needs (speckle: 3 at most, docs/burned-in.md)
WINDOW = (16, 64)  # pixels (rows, cols) in which one value's strokes are counted: a piece of a line
MAX_FILL = 0.6  # share of a cluster's box in that value above which it is a solid band, not letters
MAX_HEIGHT = 80  # pixels: as clean.MAX_TEXT_HEIGHT
RING = 20  # pixels around a line whose ink-valued pixels tell what the background holds by chance


def brightest(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...): each pixel's largest channel, as ``rgb.max(-1)`` gives it but as
    two element-wise maxima (a reduction over a last axis of 3 took 20 times as long:
    about 11 ms a 640 x 480 frame, several times a frame)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def darkest(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...): each pixel's smallest channel (``rgb.min(-1)``, see :func:`brightest`)."""
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _key(rgb: np.ndarray) -> np.ndarray:
    """One int32 per pixel for its three 8-bit channels (rows, cols, 3) -> (rows, cols)."""
    v = rgb.astype(np.int32)
    return (v[..., 0] << 16) | (v[..., 1] << 8) | v[..., 2]


def _in_runs(key: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: pixels in a horizontal or vertical run of RUN (3) equal values."""
    out = np.zeros(key.shape, bool)
    for k, o in ((key, out), (key.T, out.T)):
        e = k[:, 1:] == k[:, :-1]  # e[:, j]: k[:, j] == k[:, j + 1]
        start = e[:, :-1] & e[:, 1:]  # a run of 3 starts at j
        o[:, :-2] |= start
        o[:, 1:-1] |= start
        o[:, 2:] |= start
    return out


def thin_marks(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) uint8 -> (rows, cols) bool: pixels whose brightest channel stands
    at least STROKE levels above its opening by a TOPHAT x TOPHAT square (the white
    top-hat): thin bright marks. (Dark marks on brighter ground, the black top-hat,
    doubled the clusters speckle makes: left out.)"""
    import cv2

    g = np.ascontiguousarray(brightest(rgb))
    return cv2.morphologyEx(g, cv2.MORPH_TOPHAT, np.ones((TOPHAT, TOPHAT), np.uint8)) > STROKE


def _paired(key: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: pixels equal to one of their 4 neighbours."""
    out = np.zeros(key.shape, bool)
    ex = key[:, :-1] == key[:, 1:]
    ey = key[:-1] == key[1:]
    out[:, :-1] |= ex
    out[:, 1:] |= ex
    out[:-1] |= ey
    out[1:] |= ey
    return out


def flat_strokes(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) uint8 -> (rows, cols) bool: thin marks (:func:`thin_marks`) in a
    run of RUN equal values (all channels)."""
    return _in_runs(_key(rgb)) & thin_marks(rgb)


def _ink_value(key: np.ndarray, strokes: np.ndarray, box: Box) -> tuple[int, int] | None:
    """(the most frequent value among the flat strokes in ``box``, how many), or None."""
    t, l, b, r = box
    vals = key[t:b, l:r][strokes[t:b, l:r]]
    if not len(vals):
        return None
    u, c = np.unique(vals, return_counts=True)
    return int(u[np.argmax(c)]), int(c.max())


def ink_lines(rgb: np.ndarray, masks: Sequence[Box]) -> list[Box]:
    """Clusters of ink in one frame (rows, cols, 3) uint8 that ``masks`` leave uncovered.

    The flat strokes (:func:`flat_strokes`) outside the masks are counted per value in
    windows of WINDOW pixels (rows, cols; moved by half a window): a window where one
    value holds at least MIN_POINTS of them is ink (the letters of one line, split
    into pieces, share their value; speckle's runs scatter over the values). Returned:
    the box around that value's strokes in the window, unless the value fills more
    than MAX_FILL of it (a solid band, not letters) or it is over MAX_HEIGHT tall."""
    rows, cols = rgb.shape[:2]
    key = _key(rgb)
    strokes = flat_strokes(rgb)
    for t, l, b, r in masks:
        strokes[max(0, t - 1) : b + 1, max(0, l - 1) : r + 1] = False
    ys, xs = np.nonzero(strokes)
    values, which, per_value = np.unique(key[ys, xs], return_inverse=True, return_counts=True)
    keep = per_value[which] >= MIN_POINTS
    ys, xs, which = ys[keep], xs[keep], which[keep]
    if not len(ys):
        return []
    hy, hx = WINDOW[0] // 2, WINDOW[1] // 2
    grid = np.zeros((len(values), rows // hy + 2, cols // hx + 2), np.int32)
    np.add.at(grid, (which, ys // hy, xs // hx), 1)
    window = grid[:, :-1, :-1] + grid[:, 1:, :-1] + grid[:, :-1, 1:] + grid[:, 1:, 1:]
    out: list[Box] = []
    for v, by, bx in zip(*np.nonzero(window >= MIN_POINTS)):
        sel = (which == v) & (ys // hy >= by) & (ys // hy <= by + 1) & (xs // hx >= bx) & (xs // hx <= bx + 1)
        box = (int(ys[sel].min()), int(xs[sel].min()), int(ys[sel].max()) + 1, int(xs[sel].max()) + 1)
        if box[2] - box[0] > MAX_HEIGHT or box in out:
            continue
        t, l, b, r = box
        if (key[t:b, l:r] == values[v]).mean() <= MAX_FILL:
            out.append(box)
    return out


def extend_along_ink(rgb: np.ndarray, boxes: Sequence[Box], steps: int = 32) -> list[Box]:
    """Each of ``boxes`` (detected lines of one frame (rows, cols, 3), margins added)
    grown sideways a third of its height at a time, as long as the next two thirds
    hold, in the middle half of the box's rows, 2 pixels or more (and more than the same area
    of the ring RING pixels wide around the box holds) of the line's ink value (the commonest value of the
    flat strokes inside the box) equal to a neighbour, thin or not (where the line
    crosses a bright wall its letters do not stand out of their surroundings, but
    keep their value); ``steps`` strips a side at most, and one more strip on a side
    that grew. A box with no flat strokes
    inside stays as it is."""
    if not boxes:
        return []
    rows, cols = rgb.shape[:2]
    key = _key(rgb)
    strokes = flat_strokes(rgb)
    paired = _paired(key)
    out: list[Box] = []
    for box in boxes:
        t, l, b, r = box
        found = _ink_value(key, strokes, box)
        if found is None:
            out.append(box)
            continue
        ink = paired & (key == found[0])
        step = max(3, (b - t) // 3)
        T, L, B, R = max(0, t - RING), max(0, l - RING), min(rows, b + RING), min(cols, r + RING)
        rate = (int(ink[T:B, L:R].sum()) - int(ink[t:b, l:r].sum())) / max((B - T) * (R - L) - (b - t) * (r - l), 1)
        # Counted on the line's middle half only: the box's margins reach into what runs
        # along the line (a bright wall holds pixels of the ink's value by chance).
        core = slice(t + (b - t) // 4, b - (b - t) // 4)
        need = max(2.0, rate * (core.stop - core.start) * 2 * step + 1)  # more than the ring around the line holds
        ink = ink[core]
        # Two strips are looked at, one step taken: a space between words is a strip
        # without ink.
        for _ in range(steps):
            if l <= 0 or ink[:, max(0, l - 2 * step) : l].sum() < need:
                break
            l = max(0, l - step)
        for _ in range(steps):
            if r >= cols or ink[:, r : min(cols, r + 2 * step)].sum() < need:
                break
            r = min(cols, r + step)
        # A side that grew gets one more step: the last letter's end (its soft edge, or
        # the few strokes of its value that fall short of ``need``) lies past the last
        # strip taken.
        l = max(0, l - step) if l < box[1] else l
        r = min(cols, r + step) if r > box[3] else r
        out.append((t, l, b, r))
    return out
