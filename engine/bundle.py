"""A model bundle: a directory with ``model.json`` (metadata), ``weights.pt`` (the
network) and ``gates.pt`` (the gates, ``engine.gates``).

The graphs the node runs (``engine.graphs.NODE_GRAPHS``) are shipped as ONNX in
``graphs/`` and listed in ``model.json`` (``shipped_graphs``) with the SHA-256 of each
file and the digest of the weights it was made from; a shipped graph whose weights have
changed since is not used. Other graphs, and shipped ones that are stale, are exported on
first use (or by ``casemask engine export``, which needs PyTorch) into ``onnx/``, named
``<graph>.<digest>.onnx`` after the weights they were made from; TensorRT plans are cached
under ``plans/``. Where the bundle is read-only, both go to ``~/.cache/casemask``
(``CASEMASK_CACHE``).

Reading a bundle and finding its graphs needs no PyTorch; ``load_torch``,
``load_gates_torch`` and ``save`` do.

``builtin:reference`` is the bundle shipped in ``engine/bundles/reference``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import shutil
from pathlib import Path

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.model import DisentanglementModel, ModelConfig

BUILTIN_DIR = Path(str(importlib.resources.files("engine") / "bundles"))  # unzipped by pip: a folder
FORMAT = "casemask-bundle/1"
# Only what inference needs is shipped: the heads and discriminator stay behind.
INFERENCE_PREFIXES = ("encoder.", "generator.", "vae.", "prototypes")
SHIPPED_DIR = "graphs"
DEMONSTRATION = "demonstration"


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


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Bundle:
    path: Path
    meta: dict
    _digests: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self) -> ModelConfig:
        from engine.model import ModelConfig

        return ModelConfig(**self.meta["model_config"])

    @property
    def dims(self) -> dict[str, Any]:
        """The network's sizes (``model_config``) as plain values, without PyTorch."""
        return dict(self.meta["model_config"])

    @property
    def image_size(self) -> int:
        return int(self.meta["model_config"]["image_size"])

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def intended_use(self) -> dict[str, str]:
        """``{"kind": ..., "summary": ...}``; a bundle that says nothing counts as a
        demonstration (nothing says it is fit for more)."""
        use = self.meta.get("intended_use")
        if not isinstance(use, dict) or not use.get("kind"):
            return {"kind": DEMONSTRATION, "summary": "the bundle does not say what it is fit for (no intended_use in model.json)"}
        return {"kind": str(use["kind"]), "summary": str(use.get("summary", ""))}

    @property
    def is_demonstration(self) -> bool:
        return self.intended_use["kind"] == DEMONSTRATION

    def digest(self, source: str = "weights.pt") -> str:
        """The first 16 hex digits of the SHA-256 of ``source`` (``weights.pt`` or ``gates.pt``)."""
        if source not in self._digests:
            self._digests[source] = file_digest(self.path / source)
        return self._digests[source]

    def weights_digest(self) -> str:
        """The first 16 hex digits of the SHA-256 of ``weights.pt``."""
        return self.digest("weights.pt")

    def export_path(self, graph: str, half: bool = False) -> Path:
        """Where the ONNX export of ``graph`` for these weights is (or will be) written."""
        from engine.graphs import source_of

        return self.writable_dir("onnx") / f"{graph}{'.fp16' if half else ''}.{self.digest(source_of(graph))}.onnx"

    def shipped_graph(self, graph: str) -> Path | None:
        """The shipped ONNX of ``graph`` when it was made from the current weights and is
        intact (its SHA-256 as recorded); None when there is none or it is stale.

        Raises:
            BundleError: a shipped file whose content is not what ``model.json`` records.
        """
        from engine.graphs import source_of

        entry = self.meta.get("shipped_graphs", {}).get(graph)
        if not entry:
            return None
        path = self.path / entry["file"]
        source = source_of(graph)
        if not path.exists() or not (self.path / source).exists() or entry.get("from") != self.digest(source):
            return None
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise BundleError(f"{path}: content differs from the SHA-256 model.json records (damaged or replaced)")
        return path

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

    @property
    def has_gates(self) -> bool:
        return bool(self.meta.get("gates")) and (self.path / "gates.pt").exists()

    def load_torch(self) -> DisentanglementModel:
        import torch

        from engine.model import DisentanglementModel

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
    """Write a bundle with the inference weights of ``model`` and ``meta``.

    Gates and shipped graphs of an earlier bundle in ``out`` are removed: they were fitted
    to, or made from, other weights (``casemask engine fit-gates`` fits new ones).
    """
    import torch

    from engine.model import GRAPHS

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
    full.pop("gates", None)
    full.pop("shipped_graphs", None)
    write_meta(out, full)
    for stale in (out / "onnx", out / SHIPPED_DIR):
        if stale.exists():
            shutil.rmtree(stale)
    (out / "gates.pt").unlink(missing_ok=True)
    return Bundle(out, full)


def write_meta(path: Path, meta: dict) -> None:
    """Write ``model.json`` of the bundle at ``path`` (atomically: a reader never sees half)."""
    tmp = path / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path / "model.json")
