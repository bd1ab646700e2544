"""Where small, faint text may hide, and a view of the frame that shows it to the detector.

Text of about 7 px over speckle is drawn with strokes under a pixel wide: anti-aliasing
leaves no run of equal values for the ink reading (:mod:`node.burnedin.ink`), and the
network, on the frame as shown, gives its letters no probability at scales 1.5 to 3.0
(docs/burned-in.md, "Small text"). Its strokes still stand out of their surroundings
as thin bright marks. Two things here:

- :func:`tophat_view`: the white top-hat of the frame (each pixel less its opening by
  a TOPHAT x TOPHAT square; Serra, "Image Analysis and Mathematical Morphology", 1982),
  stretched: thin bright marks on black. Speckle becomes scattered dots, image
  structures wider than the square (walls, cysts, the sector) vanish, and letters
  become white strokes on black, which the detector reads at scale 3;
- :func:`candidate_areas`: whether a frame needs that reading at all (at scale 3 it
  costs about nine plain readings): the places where thin marks fill a line-shaped
  window (WINDOW, rows x cols) at DENSITY or more. A line of small text does along
  its length; speckle does in few places (walls across the window's rows, 2-6% of a
  text-free synthetic frame, most ultrasound frames have some). The frame is then
  read whole: the network pools over the whole image, and crops read alone gave
  lines of text on 10 of 36 text-free frames (docs/burned-in.md).

What the detector finds there is judged by :mod:`node.burnedin.clean` as for the other
readings (next to a mask: masked; a line of text elsewhere: the object is held back).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from node.burnedin.ink import brightest

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive)

TOPHAT = 7  # pixels: marks thinner than this stand out (as ink.TOPHAT)
GAIN = 3  # the top-hat stretched this many times (marks 25 levels above their opening show at 75)
MARK = 25  # grey levels above the opening that make a pixel a thin mark (as ink.STROKE)
WINDOW = (5, 40)  # pixels (rows, cols): a piece of a line of 7 px text
DENSITY = 0.45  # share of thin marks in WINDOW that makes it a candidate (7 px tokens: 0.55 and more)
SCALE = 3.0  # the detector's scale on the view: the smallest text is found at 3, not at 2
# A line of small text away from the masks, as this reading counts it: at most
# MAX_HEIGHT pixels tall (7 px text gives boxes 7-13 px tall at SCALE) and LINE_RATIO
# times as wide as tall (the 7 px tokens of the tests: 2.6 to 8.3, a part of a line
# included; the boxes it found on the seeded set's speckle beside masked lines: 1.7 to
# 2.1, 7 to 25 px tall). Larger text is the other readings' to find.
MAX_HEIGHT = 24
LINE_RATIO = 2.5


def _tophat(rgb: np.ndarray) -> np.ndarray:
    import cv2

    g = np.ascontiguousarray(brightest(rgb))
    return cv2.morphologyEx(g, cv2.MORPH_TOPHAT, np.ones((TOPHAT, TOPHAT), np.uint8))


def tophat_view(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) uint8 -> the same shape, grey: the white top-hat of the brightest
    channel, GAIN times (thin bright marks on black)."""
    v = np.clip(_tophat(rgb).astype(np.int16) * GAIN, 0, 255).astype(np.uint8)
    return np.repeat(v[..., None], 3, -1)


def candidate_areas(rgb: np.ndarray, masks: Sequence[Box] = ()) -> list[Box]:
    """Areas of one frame (rows, cols, 3) uint8 where a line of small text may be: the
    windows of WINDOW pixels at least DENSITY of whose pixels are thin marks (MARK
    levels above their opening), outside ``masks``, joined into rectangles."""
    import cv2

    rows, cols = rgb.shape[:2]
    marks = (_tophat(rgb) > MARK).astype(np.float32)
    for t, l, b, r in masks:
        marks[t:b, l:r] = 0
    dens = cv2.boxFilter(marks, -1, (WINDOW[1], WINDOW[0]), normalize=True, borderType=cv2.BORDER_CONSTANT)
    hot = (dens >= DENSITY).astype(np.uint8)
    if not hot.any():
        return []
    # The window around each hot centre, then the surroundings the detector needs.
    hot = cv2.dilate(hot, np.ones(WINDOW, np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(hot, connectivity=8)
    return [(int(y), int(x), min(rows, int(y + h)), min(cols, int(x + w))) for x, y, w, h, _a in stats[1:n]]
