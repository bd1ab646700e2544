"""A label-free description of an image's ribs: a matched-filter fit of curved bands.

Ribs on a frontal chest radiograph are nearly periodic bands, bent upward at the sides.
Their phase is the hard part for an autoencoder: a reconstruction loss says nothing
about a band's position until the decoder already draws bands of the right spacing, and
it draws them only once the latent says where they are. With no signal at the start,
the encoder never learns to keep the ribs (the read-out of rib spacing, curvature and
phase from its latent stays at zero; see the README).

:func:`fit_ribs` reads them from the image itself. It high-passes the image and
correlates it with a grid of curved sinusoids ``cos(w (v + c u^2) + t u + phi)``
(u, v in [-1, 1] across and down the image): the grid point with the most energy gives
the frequency ``w``, the curvature ``c`` and the tilt ``t``, and the phase of the
correlation gives ``phi``. It needs no labels: it is a search over the same family of
bands that :class:`engine.model.QuadraticPhaseFeatures` draws. Training asks a linear
head on the latent for these numbers (``TrainConfig.rib_fit``), which gives the encoder
the signal that the reconstruction loss lacks at the start.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

#: frequency (radians per half image), curvature, tilt: the grid searched by default.
#: Ribs repeat every 4 to 7 pixels at 64x64: 27 to 52 radians per half image.
GRID = (np.linspace(24.0, 54.0, 31), np.linspace(0.2, 1.2, 26), np.linspace(-10.0, 10.0, 15))


def highpass(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """The image minus its Gaussian blur (sigma in pixels of a 64x64 image, scaled)."""
    sigma = sigma * x.shape[-1] / 64
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    b = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    b = F.conv2d(F.pad(b, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x - b


@torch.no_grad()
def fit_ribs(images: np.ndarray | torch.Tensor, grid=GRID, chunk: int = 256, batch: int = 1024) -> np.ndarray:
    """(N, 1, S, S) images -> (N, 5) float32: frequency, curvature, tilt, cos(phi), sin(phi)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    dev = x.device  # a CUDA tensor is fitted on its GPU
    s = x.shape[-1]
    g = torch.linspace(-1.0, 1.0, s, device=dev)
    v, u = (t.flatten() for t in torch.meshgrid(g, g, indexing="ij"))
    ws, cs, ts = (torch.as_tensor(a, dtype=torch.float32, device=dev) for a in grid)
    w, c, t = (a.flatten() for a in torch.meshgrid(ws, cs, ts, indexing="ij"))
    out = []
    for start in range(0, len(x), batch):
        h = highpass(x[start : start + batch, :1]).flatten(1)
        n = len(h)
        best = torch.full((n,), -1.0, device=dev)
        arg = torch.zeros(n, dtype=torch.long, device=dev)
        re, im = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
        for i in range(0, len(w), chunk):
            phase = w[i : i + chunk, None] * (v + c[i : i + chunk, None] * u * u) + t[i : i + chunk, None] * u
            a, b = h @ torch.cos(phase).T, h @ torch.sin(phase).T
            m, j = (a * a + b * b).max(1)
            better = m > best
            best = torch.where(better, m, best)
            arg = torch.where(better, j + i, arg)
            re = torch.where(better, a.gather(1, j[:, None])[:, 0], re)
            im = torch.where(better, b.gather(1, j[:, None])[:, 0], im)
        # h ~ A cos(P + phi) correlates with cos(P) as A cos(phi) and with sin(P) as -A sin(phi).
        phi = torch.atan2(-im, re)
        out.append(torch.stack([w[arg], c[arg], t[arg], torch.cos(phi), torch.sin(phi)], 1))
    return torch.cat(out).cpu().numpy().astype(np.float32)
