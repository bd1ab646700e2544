"""casemask engine: disentanglement-based anonymization of medical images (arrays in, arrays out)."""

from engine.api import Model, load_model

__all__ = ["Model", "load_model"]
