"""Image resizing in NumPy, as PyTorch's ``F.interpolate`` does it (no torch at run time).

- Shrinking: ``mode="area"`` (adaptive average pooling): output pixel ``i`` of ``n`` averages
  input rows ``floor(i * H / n)`` to ``ceil((i + 1) * H / n) - 1``. Whole factors sum blocks
  (a reshape); other factors take differences of a running sum, both separable, so a
  1955 x 1841 radiograph costs two passes over its pixels.
- Growing: ``mode="bilinear", align_corners=False``: source coordinate
  ``(i + 0.5) * H / n - 0.5``, clamped at 0, linear between its two neighbours.

Both work on batches (N, H, W) of float32 and agree with PyTorch within float32 rounding
(``tests/test_pixels.py`` holds them to it).
"""

from __future__ import annotations

import numpy as np


def _area_axis(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Adaptive average pooling of ``x`` along ``axis`` to ``n`` samples."""
    size = x.shape[axis]
    if size == n:
        return x
    if size % n == 0:
        f = size // n
        shape = list(x.shape)
        shape[axis : axis + 1] = [n, f]
        return x.reshape(shape).mean(axis=axis + 1, dtype=np.float64).astype(np.float32)
    i = np.arange(n)
    start = (i * size) // n
    stop = -((-(i + 1) * size) // n)  # ceil
    moved = np.moveaxis(x, axis, 0).astype(np.float64)
    run = np.concatenate([np.zeros((1, *moved.shape[1:])), np.cumsum(moved, axis=0)])
    out = (run[stop] - run[start]) / (stop - start).reshape(-1, *([1] * (moved.ndim - 1)))
    return np.moveaxis(out.astype(np.float32), 0, axis)


def _linear_axis(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``x`` along ``axis`` to ``n`` samples (half-pixel centres)."""
    size = x.shape[axis]
    if size == n:
        return x
    src = np.maximum((np.arange(n, dtype=np.float64) + 0.5) * (size / n) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size - 1)
    i1 = np.minimum(i0 + 1, size - 1)
    w = (src - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    a, b = np.take(x, i0, axis=axis), np.take(x, i1, axis=axis)
    return a + (b - a) * w


def resize(batch: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """(N, H, W) float32 -> (N, nh, nw): area average along an axis that shrinks, bilinear
    along one that grows (the same mode for both axes, chosen by the rows, as the pixel
    step always resizes preserving the aspect ratio)."""
    n, h, w = batch.shape
    if (nh, nw) == (h, w):
        return batch
    x = np.asarray(batch, dtype=np.float32)
    if nh < h:
        return _area_axis(_area_axis(x, nh, 1), nw, 2)
    return _linear_axis(_linear_axis(x, nh, 1), nw, 2)


def fit_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an h x w image scaled to fit size x size, centred."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def to_unit(img: np.ndarray, size: int, low_q: float = 1.0, high_q: float = 99.0, pad: float = -1.0) -> np.ndarray:
    """A 2-D image -> size x size float32 in [-1, 1] as the node prepares one without a
    window in its header: the ``low_q``-``high_q`` percentiles mapped to -1..1, the aspect
    kept, the rest padded with ``pad``."""
    lo, hi = np.percentile(img, [low_q, high_q])
    x = np.clip((np.asarray(img, np.float64) - lo) / max(hi - lo, 1e-6) * 2 - 1, -1, 1).astype(np.float32)
    top, left, nh, nw = fit_box(*x.shape, size)
    out = np.full((size, size), pad, np.float32)
    out[top : top + nh, left : left + nw] = resize(x[None], nh, nw)[0]
    return out
