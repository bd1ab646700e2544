"""Images the domain gate must turn away, made from files on this machine.

Real images, read with pydicom and prepared as the node prepares an image without a
window in its header (1st-99th percentile, aspect kept, padded: ``engine.imaging.to_unit``):
pydicom's own CT_small and MR_small; and, when the ``pydicom-data`` package is installed
(``casemask[train]``, ``casemask[test]``), a real chest CR (RG1, 1955 x 1841), a CR of an
extremity (RG3) and a photograph (OT-PAL-8-face, a face, palette colour made grey).
Made ones: a flat grey image and uniform noise; and near cases made from in-domain
images: inverted, upside down, rotated by 90 and by 30 degrees, the centre half enlarged,
the top half alone (aspect kept, padded). Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

from engine.imaging import resize, to_unit

REAL = {
    "ct_slice": "CT_small.dcm",
    "mr_slice": "MR_small.dcm",
    "real_chest_cr": "RG1_UNCR.dcm",
    "extremity_cr": "RG3_UNCR.dcm",
    "photo_face": "OT-PAL-8-face.dcm",
}


def dicom_image(name: str):
    """A grey 2-D array of pydicom test file ``name`` (palette colour made grey, MONOCHROME1
    inverted), or None when the file is not installed."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name)
    except (ValueError, OSError, RuntimeError):  # not present, and nothing may be downloaded
        path = None
    if path is None:
        return None
    ds = dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # OT-PAL-8-face has no file meta
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    arr = ds.pixel_array.astype(np.float64)
    pi = str(ds.get("PhotometricInterpretation", ""))
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(ds.pixel_array, ds)[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif pi == "MONOCHROME1":
        arr = -arr
    return arr[0] if arr.ndim == 3 else arr


def rotate(images: np.ndarray, degrees: float, fill: float = -1.0) -> np.ndarray:
    """(N, 1, S, S) rotated about the centre (bilinear), ``fill`` where nothing was."""
    n, c, s, _ = images.shape
    a = np.deg2rad(degrees)
    g = (np.arange(s) - (s - 1) / 2)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    sx = np.cos(a) * xx + np.sin(a) * yy + (s - 1) / 2
    sy = -np.sin(a) * xx + np.cos(a) * yy + (s - 1) / 2
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    wx, wy = sx - x0, sy - y0
    pad = np.pad(images, ((0, 0), (0, 0), (1, 2), (1, 2)), constant_values=fill)

    def at(yi, xi):
        return pad[:, :, np.clip(yi + 1, 0, s + 2), np.clip(xi + 1, 0, s + 2)]

    out = (at(y0, x0) * (1 - wx) * (1 - wy) + at(y0, x0 + 1) * wx * (1 - wy) + at(y0 + 1, x0) * (1 - wx) * wy + at(y0 + 1, x0 + 1) * wx * wy)
    inside = (sx > -1) & (sx < s) & (sy > -1) & (sy < s)
    return np.where(inside, out, fill).astype(np.float32)


def crop(images: np.ndarray, frac: float, where: str = "centre") -> np.ndarray:
    """The centre (or top) ``frac`` of each image enlarged to the full size (bilinear)."""
    n, c, s, _ = images.shape
    k = max(2, int(round(s * frac)))
    o = (s - k) // 2
    part = images[:, 0, o : o + k, o : o + k] if where == "centre" else images[:, 0, :k, o : o + k]
    return resize(np.ascontiguousarray(part, np.float32), s, s)[:, None]


def top_half(images: np.ndarray) -> np.ndarray:
    """The top half of each image alone, aspect kept (as the node pads a cropped image)."""
    s = images.shape[-1]
    out = np.full_like(images, -1.0)
    out[:, :, s // 4 : s // 4 + s // 2] = images[:, :, : s // 2]
    return out


def out_of_domain(in_domain: np.ndarray, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Named sets of images (N, 1, size, size) in [-1, 1] outside the training domain.

    ``in_domain``: images of the training domain (N, 1, size, size) the near cases are made
    from. Real cases whose files are not installed are left out.
    """
    cases: dict[str, np.ndarray] = {}
    for case, name in REAL.items():
        img = dicom_image(name)
        if img is not None:
            cases[case] = to_unit(img, size)[None, None]
    rng = np.random.default_rng(seed)
    cases["flat_grey"] = np.zeros((1, 1, size, size), np.float32)
    cases["noise"] = rng.uniform(-1, 1, (8, 1, size, size)).astype(np.float32)
    x = np.asarray(in_domain, np.float32)
    cases["inverted"] = -x
    cases["upside_down"] = np.ascontiguousarray(x[:, :, ::-1])
    cases["rotated_90"] = np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))
    cases["rotated_30"] = rotate(x, 30)
    cases["cropped_centre_half"] = crop(x, 0.5)
    cases["cropped_top_half"] = top_half(x)
    return cases


def near_cases(in_domain: np.ndarray) -> dict[str, np.ndarray]:
    """Milder versions of the near cases, to show where the domain gate's edge lies
    (reported, not required to fail): rotations of 10 and 20 degrees, the centre 85% and
    70% enlarged."""
    x = np.asarray(in_domain, np.float32)
    return {"rotated_10": rotate(x, 10), "rotated_20": rotate(x, 20), "cropped_centre_85": crop(x, 0.85), "cropped_centre_70": crop(x, 0.7)}
