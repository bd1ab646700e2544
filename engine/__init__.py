"""casemask engine: disentanglement-based anonymization of medical images (arrays in, arrays out).

``load_model`` and ``Model`` are imported lazily, so that importing a submodule (the CLI,
the synthetic data) does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.api import Model, load_model

__all__ = ["Model", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
