"""The inference graphs a bundle can be run as, and their inputs and outputs (no torch).

Two families:

- model graphs, made from ``weights.pt``: ``anonymize``, ``counterfactual``,
  ``reconstruct`` and ``encode`` (whole operations, for engine users and benchmarks), and
  the parts the node composes: ``encode`` (image -> medical, identity, other),
  ``identity`` (identity noise -> a synthetic identity vector, the VAE's decoder) and
  ``generate`` (the three vectors -> image);
- gate graphs, made from ``gates.pt`` (``engine.gates``): ``classify`` (the gates'
  independent disease classifier) and ``domain`` (the domain gate's two scores).

``NODE_GRAPHS`` are what the node runs; a bundle ships them as ONNX (``graphs/``), so a
node needs neither PyTorch nor an export step. The composed graphs hold the encoder and
the generator once each: the four whole-operation graphs held them four times.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.runtime.base import TensorSpec

MODEL_GRAPHS = ("anonymize", "counterfactual", "reconstruct", "encode", "identity", "generate")
GATE_GRAPHS = ("classify", "domain")
NODE_GRAPHS = ("encode", "identity", "generate", "classify", "domain")
ALL_GRAPHS = MODEL_GRAPHS + GATE_GRAPHS


def source_of(graph: str) -> str:
    """The bundle file a graph is made from: ``weights.pt`` or ``gates.pt``."""
    if graph in GATE_GRAPHS:
        return "gates.pt"
    if graph in MODEL_GRAPHS:
        return "weights.pt"
    raise ValueError(f"unknown graph {graph!r}; known: {', '.join(ALL_GRAPHS)}")


def graph_specs(dims: Mapping[str, int], graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of ``graph`` for a bundle whose ``model_config`` is ``dims``
    (image_size, channels, med_dim, id_dim, other_dim, vae_latent, n_classes); the batch
    axis is -1.

    Raises:
        ValueError: an unknown graph.
    """
    s, c = int(dims["image_size"]), int(dims.get("channels", 1))
    img = TensorSpec("image", (-1, c, s, s))
    med = TensorSpec("medical", (-1, int(dims["med_dim"])))
    ident = TensorSpec("identity", (-1, int(dims["id_dim"])))
    other = TensorSpec("other", (-1, int(dims["other_dim"])))
    out = TensorSpec("output", img.shape)
    if graph == "anonymize":
        return [img, TensorSpec("noise", (-1, int(dims["vae_latent"])))], [out]
    if graph == "counterfactual":
        return [img, TensorSpec("target", (-1, int(dims["n_classes"])))], [out]
    if graph == "reconstruct":
        return [img], [out]
    if graph == "encode":
        return [img], [med, ident, other]
    if graph == "identity":
        return [TensorSpec("noise", (-1, int(dims["vae_latent"])))], [ident]
    if graph == "generate":
        return [med, ident, other], [out]
    if graph == "classify":
        return [img], [TensorSpec("probabilities", (-1, int(dims["n_classes"])))]
    if graph == "domain":
        return [img, med, ident, other], [TensorSpec("reconstruction_error", (-1, 1)), TensorSpec("latent_distance", (-1, 1))]
    raise ValueError(f"unknown graph {graph!r}; known: {', '.join(ALL_GRAPHS)}")
