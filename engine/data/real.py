"""Real data for training on a hospital's own images.

- The paper's HDF5 layout: datasets ``images`` (N x H x W or N x 1 x H x W), ``id``
  (patient ids), ``dis`` (disease labels) and ``set`` (0 train, 1 validation, 2 test).
- A folder of DICOM files with a CSV of ``file,patient_id,label`` (file relative to the
  folder).

Both return :class:`engine.data.Batch` with images resized to ``size`` and mapped to
[-1, 1]; patient ids are re-numbered 0..P-1.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from engine.data.synthetic import Batch


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Aspect-preserving resize and centre pad of one 2-D image to size x size (padded with
    the image's minimum)."""
    from engine.imaging import fit_box, resize

    top, left, nh, nw = fit_box(*img.shape, size)
    r = resize(np.ascontiguousarray(img, dtype=np.float32)[None], nh, nw)[0]
    out = np.full((size, size), float(r.min()), np.float32)
    out[top : top + nh, left : left + nw] = r
    return out


def _to_unit(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6) * 2 - 1, -1, 1).astype(np.float32)


def _renumber(ids: np.ndarray) -> np.ndarray:
    _, inv = np.unique(ids, return_inverse=True)
    return inv.astype(np.int64)


def load_hdf5(path: str | Path, size: int, split: int | None = None) -> Batch:
    """Load the paper's HDF5 layout; ``split`` keeps only rows whose ``set`` equals it."""
    import h5py

    with h5py.File(path, "r") as f:
        for key in ("images", "id", "dis"):
            if key not in f:
                raise ValueError(f"{path}: dataset '{key}' is missing (expected images, id, dis, set)")
        sel = np.ones(len(f["id"]), bool) if split is None or "set" not in f else np.asarray(f["set"][:]) == split
        images = np.asarray(f["images"][:])[sel]
        ids = np.asarray(f["id"][:])[sel]
        dis = np.asarray(f["dis"][:])[sel].astype(np.int64)
    if images.ndim == 4:
        images = images[:, 0]
    imgs = np.stack([_to_unit(_resize(im.astype(np.float32), size)) for im in images])[:, None]
    pids = _renumber(ids)
    visits = np.zeros(len(pids), np.int64)
    for p in np.unique(pids):
        visits[pids == p] = np.arange((pids == p).sum())
    return Batch(images=imgs, patient_ids=pids, labels=dis, visits=visits)


def load_dicom_folder(folder: str | Path, csv_path: str | Path, size: int) -> Batch:
    """Load DICOM images listed in a CSV with columns file, patient_id, label."""
    from pydicom import dcmread

    folder = Path(folder)
    rows = list(csv.DictReader(Path(csv_path).open()))
    if not rows or not {"file", "patient_id", "label"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: needs a header with columns file,patient_id,label")
    imgs, ids, labels = [], [], []
    for r in rows:
        ds = dcmread(folder / r["file"])
        px = ds.pixel_array.astype(np.float32)
        if px.ndim == 3:
            px = px[0]
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            px = px.max() - px
        imgs.append(_to_unit(_resize(px, size)))
        ids.append(r["patient_id"])
        labels.append(int(r["label"]))
    pids = _renumber(np.asarray(ids))
    visits = np.zeros(len(pids), np.int64)
    for p in np.unique(pids):
        visits[pids == p] = np.arange((pids == p).sum())
    return Batch(images=np.stack(imgs)[:, None], patient_ids=pids, labels=np.asarray(labels, np.int64), visits=visits)
