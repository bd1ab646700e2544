"""The disentanglement network of Montenegro & Cardoso (arXiv 2311.04833), in PyTorch.

An encoder splits an image into three vectors: *medical* (what the disease head reads),
*identity* (what the identity head reads) and *other* (acquisition and whatever else the
generator needs to rebuild the image). A generator rebuilds the image from their
concatenation. Anonymization replaces the identity vector with one drawn from a small VAE
trained so that the frozen identity head recognises nobody in its samples; a
counterfactual replaces the medical vector with the prototype of another class.

Beyond the paper, two *privacy* heads read the medical and the other vectors and try to
recognise the patient: the encoder is trained to make them fail (through a
gradient-reversal layer, or towards a uniform prediction: ``TrainConfig.privacy``), which
pushes identity out of the slots that anonymization keeps.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the network. ``image_size`` must be a power of two, 32 to 256."""

    image_size: int = 64
    channels: int = 1
    width: int = 16
    med_dim: int = 16
    id_dim: int = 32
    other_dim: int = 32
    n_classes: int = 3
    n_identities: int = 200
    vae_latent: int = 16
    # "conv": upsampling convolutions from a 4x4 seed (bundles from before "fourier" have
    # no such key and load as "conv"). "fourier": the same path with every layer modulated
    # by the latent, beside sinusoids of latent-predicted quadratic phase at full
    # resolution (QuadraticPhaseFeatures), which draw fine periodic structure such as ribs.
    generator: str = "conv"
    fourier_features: int = 16

    def __post_init__(self) -> None:
        if self.image_size not in (32, 64, 128, 256):
            raise ValueError(f"image_size must be 32, 64, 128 or 256, got {self.image_size}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, got {self.generator!r}")

    @property
    def n_levels(self) -> int:
        return int(math.log2(self.image_size // 4))

    @property
    def latent_dim(self) -> int:
        return self.med_dim + self.id_dim + self.other_dim


def _widths(cfg: ModelConfig) -> list[int]:
    return [min(cfg.width * 2**i, 256) for i in range(cfg.n_levels)]


class Encoder(nn.Module):
    """Image (N, C, S, S) -> medical, identity and other vectors."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.channels
        for w in _widths(cfg):
            layers += [nn.Conv2d(c_in, w, 4, stride=2, padding=1), nn.GroupNorm(4, w), nn.LeakyReLU(0.2)]
            c_in = w
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(c_in * 16, 256), nn.LeakyReLU(0.2), nn.Linear(256, cfg.latent_dim))
        self.split = (cfg.med_dim, cfg.id_dim, cfg.other_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.fc(self.features(x))
        med, ident, other = torch.split(z, self.split, dim=1)
        return med, ident, other


class Generator(nn.Module):
    """Concatenated (medical, identity, other) -> image in [-1, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = list(reversed(_widths(cfg)))
        self.c0 = widths[0]
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, 256), nn.LeakyReLU(0.2), nn.Linear(256, widths[0] * 16))
        layers: list[nn.Module] = []
        c_in = widths[0]
        for w in widths[1:] + [widths[-1]]:
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, w, 3, padding=1),
                nn.GroupNorm(4, w),
                nn.LeakyReLU(0.2),
            ]
            c_in = w
        layers += [nn.Conv2d(c_in, cfg.channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, med: torch.Tensor, ident: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([med, ident, other], dim=1))
        return self.net(h.view(h.shape[0], self.c0, 4, 4))


class QuadraticPhaseFeatures(nn.Module):
    """``2k`` full-resolution maps ``a sin(P) , b cos(P)`` whose phase ``P`` is a quadratic
    polynomial of the pixel coordinates (u, v in [-1, 1]), with coefficients and amplitudes
    predicted from the latent.

    Why: an upsampling convolutional decoder cannot draw a stripe pattern finer than its
    coarser layers resolve (ribs repeat every 4-7 pixels at 64x64, beyond what the 16x16
    layer can hold), so it averages ribs away. A sinusoid of the coordinates draws them at
    any resolution; the quadratic terms bend the bands (ribs curve), the linear ones set
    their spacing and tilt, and the sin/cos amplitude pair sets their phase continuously.
    This is the Fourier-feature input of coordinate-based generators (StyleGAN3 turns its
    Fourier features by a latent-predicted transform) with a curved phase.

    The coefficients are ``scale`` times the layer's output: Adam moves each parameter by
    about the learning rate per step, and frequencies must move by tens of radians to find
    their pattern. (Measured on a toy that draws the synthetic ribs from their true
    parameters: the error fell to 17% of the pattern's variance in 2500 steps at scale 30,
    to 48% in 3000 at scale 1, and an upsampling convolutional decoder stayed at 99%.)
    """

    def __init__(self, d_in: int, k: int, size: int, scale: float = 30.0) -> None:
        super().__init__()
        self.k, self.scale = k, scale
        self.mlp = nn.Sequential(nn.Linear(d_in, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2))
        self.coef = nn.Linear(128, 5 * k)
        self.amp = nn.Linear(128, 2 * k)
        # Start every feature at its own fixed pattern (the latent part starts at zero):
        # linear frequencies up to 35 rad per half image, quadratic up to 15.
        nn.init.zeros_(self.coef.weight)
        g = torch.Generator().manual_seed(0)
        base = torch.cat([(torch.rand(k, 2, generator=g) * 2 - 1) * 35, (torch.rand(k, 3, generator=g) * 2 - 1) * 15], 1)
        with torch.no_grad():
            self.coef.bias.copy_(base.flatten() / scale)
        c = torch.linspace(-1.0, 1.0, size)
        v, u = torch.meshgrid(c, c, indexing="ij")
        self.register_buffer("monomials", torch.stack([u, v, u * u, u * v, v * v]).flatten(1), persistent=False)
        self.size = size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        h = self.mlp(z)
        coef = self.coef(h).view(n, self.k, 5) * self.scale
        phase = torch.matmul(coef, self.monomials).view(n, self.k, self.size, self.size)
        amp = self.amp(h).view(n, 2 * self.k, 1, 1)
        return torch.cat([torch.sin(phase), torch.cos(phase)], 1) * amp


class FourierGenerator(nn.Module):
    """Concatenated (medical, identity, other) -> image in [-1, 1].

    The convolutional path of :class:`Generator` with each normalised layer scaled and
    shifted by the latent (FiLM), so that global parameters reach every resolution rather
    than only the 4x4 seed; at full resolution its features meet
    :class:`QuadraticPhaseFeatures` and two convolutions mix them (the lungs' outline from
    the convolutional path gates where the bands show).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = list(reversed(_widths(cfg)))
        d = cfg.latent_dim
        self.c0 = widths[0]
        self.fc = nn.Sequential(nn.Linear(d, 256), nn.LeakyReLU(0.2), nn.Linear(256, widths[0] * 16))
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.films = nn.ModuleList()
        c_in = widths[0]
        for w in widths[1:] + [widths[-1]]:
            self.convs.append(nn.Conv2d(c_in, w, 3, padding=1))
            self.norms.append(nn.GroupNorm(4, w, affine=False))
            self.films.append(nn.Linear(d, 2 * w))
            c_in = w
        k = cfg.fourier_features
        self.fourier = QuadraticPhaseFeatures(d, k, cfg.image_size)
        mix = 32
        self.mix = nn.Sequential(
            nn.Conv2d(c_in + 2 * k, mix, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(mix, mix, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(mix, cfg.channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, med: torch.Tensor, ident: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        z = torch.cat([med, ident, other], dim=1)
        h = self.fc(z).view(z.shape[0], self.c0, 4, 4)
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            h = norm(conv(F.interpolate(h, scale_factor=2.0, mode="nearest")))
            gain, shift = film(z).chunk(2, dim=1)
            h = F.leaky_relu(h * (1 + gain[:, :, None, None]) + shift[:, :, None, None], 0.2)
        return self.mix(torch.cat([h, self.fourier(z)], dim=1))


GENERATORS: dict[str, type[nn.Module]] = {"conv": Generator, "fourier": FourierGenerator}


class Discriminator(nn.Module):
    """Real or generated, from the image (PatchGAN-like, averaged to one logit)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.channels
        for w in _widths(cfg)[:3]:
            layers += [nn.Conv2d(c_in, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = w
        layers += [nn.Conv2d(c_in, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return _GradReverse.apply(x, scale)


def _mlp(d_in: int, d_out: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, d_out))


class IdentityVAE(nn.Module):
    """Manufactures synthetic identity vectors: decode(z), z ~ N(0, I).

    It works on identity vectors standardised per dimension by the training set's mean and
    spread (``center``, ``scale``, set before stage 2): the encoder's raw identity vectors
    are large (norm about 70 in the reference model) and, unscaled, the VAE fitted them so
    poorly that its samples fell far outside what the generator had learnt to draw.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.latent = cfg.vae_latent
        self.enc = _mlp(cfg.id_dim, 2 * cfg.vae_latent)
        self.dec = _mlp(cfg.vae_latent, cfg.id_dim)
        self.register_buffer("center", torch.zeros(cfg.id_dim))
        self.register_buffer("scale", torch.ones(cfg.id_dim))

    def standardize(self, ident: torch.Tensor) -> torch.Tensor:
        return (ident - self.center) / self.scale

    def forward(self, ident: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardised reconstruction, mean and log-variance of ``ident``."""
        mu, logvar = self.enc(self.standardize(ident)).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z) * self.scale + self.center


class DisentanglementModel(nn.Module):
    """Encoder, generator, heads, discriminator and identity VAE together."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.generator = GENERATORS[cfg.generator](cfg)
        self.disease_head = _mlp(cfg.med_dim, cfg.n_classes, 64)
        self.identity_head = _mlp(cfg.id_dim, cfg.n_identities, 128)
        # Privacy heads (not in the paper): try to find the patient in the kept slots.
        self.privacy_med = _mlp(cfg.med_dim, cfg.n_identities, 128)
        self.privacy_other = _mlp(cfg.other_dim, cfg.n_identities, 128)
        self.discriminator = Discriminator(cfg)
        self.vae = IdentityVAE(cfg)
        # Mean medical vector of each class, filled in after training (counterfactuals).
        self.register_buffer("prototypes", torch.zeros(cfg.n_classes, cfg.med_dim))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(*self.encoder(x))

    def anonymize(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        med, _, other = self.encoder(x)
        return self.generator(med, self.vae.sample(z), other)

    def counterfactual(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _, ident, other = self.encoder(x)
        return self.generator(self.prototypes[target], ident, other)


class AnonymizeGraph(nn.Module):
    """Inference graph: (image, identity noise) -> anonymized image. What is exported."""

    def __init__(self, model: DisentanglementModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.anonymize(image, noise)


class CounterfactualGraph(nn.Module):
    """Inference graph: (image, target one-hot) -> counterfactual image."""

    def __init__(self, model: DisentanglementModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        med, ident, other = self.model.encoder(image)
        return self.model.generator(target @ self.model.prototypes, ident, other)


class ReconstructGraph(nn.Module):
    def __init__(self, model: DisentanglementModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(image)


class EncodeGraph(nn.Module):
    def __init__(self, model: DisentanglementModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.encoder(image)


class IdentityGraph(nn.Module):
    """Inference graph: identity noise -> a synthetic identity vector (the VAE's decoder)."""

    def __init__(self, model: DisentanglementModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.model.vae.sample(noise)


class GenerateGraph(nn.Module):
    """Inference graph: (medical, identity, other) -> image. With ``encode`` and
    ``identity`` it composes anonymization and counterfactuals (what the node runs)."""

    def __init__(self, model: DisentanglementModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, medical: torch.Tensor, identity: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.model.generator(medical, identity, other)


GRAPHS: dict[str, type[nn.Module]] = {
    "anonymize": AnonymizeGraph,
    "counterfactual": CounterfactualGraph,
    "reconstruct": ReconstructGraph,
    "encode": EncodeGraph,
    "identity": IdentityGraph,
    "generate": GenerateGraph,
}


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of (N, 1, H, W) images in [-1, 1] (Gaussian window 11, sigma 1.5, data range
    2): the evaluation's reconstruction metric, and differentiable, so training can use
    ``1 - ssim`` as a loss."""
    k = torch.exp(-((torch.arange(11, dtype=a.dtype, device=a.device) - 5.0) ** 2) / (2 * 1.5**2))
    k = k / k.sum()
    w = (k[:, None] * k[None, :])[None, None]
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    ma, mb = F.conv2d(a, w), F.conv2d(b, w)
    va, vb, cov = F.conv2d(a * a, w) - ma**2, F.conv2d(b * b, w) - mb**2, F.conv2d(a * b, w) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return s.mean()


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the softmax: minimising it spreads the prediction evenly."""
    logp = F.log_softmax(logits, dim=1)
    return (logp.exp() * logp).sum(dim=1).mean()
