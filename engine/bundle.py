"""A model bundle: a directory with ``model.json`` (metadata) and ``weights.pt``.

ONNX exports are made on first use (or by ``casemask engine export``) into ``onnx/``, named
``<graph>.<digest>.onnx`` after the weights they were made from, so a bundle whose weights
change never runs an old export; TensorRT plans are cached under ``plans/``. Where the
bundle is read-only, both go to ``~/.cache/casemask`` (``CASEMASK_CACHE``).

``builtin:reference`` is the bundle shipped in ``engine/bundles/reference``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from engine.model import GRAPHS, DisentanglementModel, ModelConfig

BUILTIN_DIR = Path(__file__).resolve().parent / "bundles"
FORMAT = "casemask-bundle/1"
# Only what inference needs is shipped: the heads and discriminator stay behind.
INFERENCE_PREFIXES = ("encoder.", "generator.", "vae.", "prototypes")


class BundleError(ValueError):
    pass


def resolve(name_or_path: str | Path) -> Path:
    """``builtin:NAME`` or a directory path -> the bundle directory.

    Raises:
        BundleError: no such bundle, or not a bundle directory.
    """
    s = str(name_or_path)
    path = BUILTIN_DIR / s.split(":", 1)[1] if s.startswith("builtin:") else Path(s)
    if not (path / "model.json").exists():
        known = ", ".join(f"builtin:{p.name}" for p in sorted(BUILTIN_DIR.glob("*")) if (p / "model.json").exists())
        raise BundleError(f"{s}: not a model bundle (no model.json); built in: {known or 'none'}")
    return path


@dataclasses.dataclass
class Bundle:
    path: Path
    meta: dict
    _digest: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(**self.meta["model_config"])

    @property
    def image_size(self) -> int:
        return int(self.meta["model_config"]["image_size"])

    def weights_digest(self) -> str:
        """The first 16 hex digits of the SHA-256 of ``weights.pt``."""
        if self._digest is None:
            h = hashlib.sha256()
            with open(self.path / "weights.pt", "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._digest = h.hexdigest()[:16]
        return self._digest

    def export_path(self, graph: str, half: bool = False) -> Path:
        """Where the ONNX export of ``graph`` for these weights is (or will be) written."""
        return self.writable_dir("onnx") / f"{graph}{'.fp16' if half else ''}.{self.weights_digest()}.onnx"

    def writable_dir(self, sub: str) -> Path:
        """A folder for exports or plans: inside the bundle when writable, else a cache."""
        d = self.path / sub
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
        cache = Path(os.environ.get("CASEMASK_CACHE", Path.home() / ".cache" / "casemask")) / self.path.name / sub
        cache.mkdir(parents=True, exist_ok=True)
        return cache

    def load_torch(self) -> DisentanglementModel:
        model = DisentanglementModel(self.config)
        state = torch.load(self.path / "weights.pt", map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Bundles from before the VAE standardised its input have no center/scale; the
        # defaults (0 and 1) give exactly their old behaviour.
        needed = [k for k in missing if k.startswith(INFERENCE_PREFIXES) and k not in ("vae.center", "vae.scale")]
        if needed or unexpected:
            raise BundleError(f"{self.path}: weights do not fit the model (missing {needed[:3]}, unexpected {unexpected[:3]})")
        return model.eval()


def load(name_or_path: str | Path) -> Bundle:
    path = resolve(name_or_path)
    meta = json.loads((path / "model.json").read_text())
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return Bundle(path, meta)


def save(model: DisentanglementModel, out: Path, meta: dict) -> Bundle:
    """Write a bundle with the inference weights of ``model`` and ``meta``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(INFERENCE_PREFIXES)}
    torch.save(state, out / "weights.pt")
    full = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(model.cfg),
        "graphs": sorted(GRAPHS),
        "prototypes": model.prototypes.tolist(),
        **meta,
    }
    (out / "model.json").write_text(json.dumps(full, indent=1) + "\n")
    stale = out / "onnx"
    if stale.exists():
        shutil.rmtree(stale)
    return Bundle(out, full)
