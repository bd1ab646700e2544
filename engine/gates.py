"""Gates: what a synthesised image must pass before anyone may see it (no torch here).

A model redraws whatever it is given as an image of its training domain: a CT slice, a
photograph or a real radiograph in, a synthetic chest out. Three gates decide, image by
image, whether an anonymized image (and a counterfactual) may stand for the patient's:

- ``domain``: the input looks like the model's training data. Two scores, each with a
  limit: ``reconstruction_error``, the mean absolute difference between the input
  (averaged to 16 x 16) and what a small decoder, fitted on the training images, draws
  back from the model's own encoding of it; and ``latent_distance``, the Mahalanobis
  distance of that encoding (medical, identity and other vectors together) from the
  training images' encodings. The model's own encoder-generator path separates the same
  cases a little better, but costs a second generator pass per image, about 90% more
  pixel-step time (docs/gates.md).
- ``medical``: an independent classifier (fitted on the training images at gate-fitting
  time, not the generator's own head) gives the original's class, which it must read with
  probability at least ``original_limit`` (an original whose finding the classifier
  cannot tell is held back: no draw can be vouched for; this part judges the input and
  earns no other draw); the anonymized image must show that class with probability at
  least ``limit``, and each counterfactual its target class with probability at least
  ``counterfactual_limit``.
- ``identity``: the identity vector the model's encoder reads from the anonymized image
  (and from the counterfactual, which carries the same synthetic identity) must lie
  farther from the original's than ``limit``: a low quantile of the distances between
  different patients of the training data. Distances are measured after whitening by the
  spread of a patient's own visits, so that what changes between visits of one patient
  (exposure, position) counts for little and what tells patients apart counts for much.

An image that fails only the gates that judge the draw (medical, identity) gets another
synthetic identity, up to ``DRAWS`` in all; the first draw that passes every gate is kept
(``Verdict.draw``; docs/gates.md has what this costs in changed findings that pass).

Limits, the rates at which they reject held-out in-domain images, and the identity
whitening are in ``model.json`` (``gates``); the classifier and the domain scorer are in
``gates.pt`` and run as the ``classify`` and ``domain`` graphs. ``engine.gate_fit`` fits
them (``casemask engine fit-gates``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

GATES = ("domain", "medical", "identity")
# Synthetic identities tried for an image whose failed gates all judge the draw (RETRIED):
# a draw that landed near the patient, or that the classifier reads as another class, is
# replaced by another (each is an equally valid anonymization, and each is judged by every
# gate again); after the last, the image is quarantined. The domain gate judges the input
# and is never retried.
DRAWS = 3
RETRIED = ("medical", "identity")


class GateError(ValueError):
    """A bundle whose gates are missing or were fitted to other weights."""


@dataclasses.dataclass(frozen=True)
class GateSet:
    """The limits of a bundle's gates and the identity metric (from ``model.json``)."""

    reconstruction_limit: float
    latent_limit: float
    medical_limit: float
    counterfactual_limit: float
    original_limit: float  # the classifier's least probability for its reading of the original (0: any)
    identity_limit: float
    identity_whiten: np.ndarray  # (id_dim, id_dim): distance = |(a - b) @ W|
    classes: tuple[str, ...]
    rates: dict

    @classmethod
    def from_meta(cls, meta: dict, weights_digest: str, gates_digest: str) -> GateSet:
        """The gates of a bundle's ``model.json``.

        Raises:
            GateError: none, or fitted to other weights or another ``gates.pt``.
        """
        g = meta.get("gates")
        if not g:
            raise GateError("the bundle has no gates: run `casemask engine fit-gates --model DIR`")
        if g.get("weights") != weights_digest or g.get("digest") != gates_digest:
            raise GateError("the bundle's gates were fitted to other weights: run `casemask engine fit-gates --model DIR` again")
        lim = g["limits"]
        return cls(
            reconstruction_limit=float(lim["reconstruction_error"]),
            latent_limit=float(lim["latent_distance"]),
            medical_limit=float(lim["medical"]),
            counterfactual_limit=float(lim["counterfactual"]),
            original_limit=float(lim.get("medical_original", 0.0)),
            identity_limit=float(lim["identity_distance"]),
            identity_whiten=np.asarray(g["identity_whiten"], np.float32),
            classes=tuple(meta.get("classes", [str(i) for i in range(int(meta["model_config"]["n_classes"]))])),
            rates=dict(g.get("rates", {})),
        )

    def identity_distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(N,) whitened distances between identity vectors ``a`` and ``b`` (N, id_dim)."""
        return np.linalg.norm((np.asarray(a, np.float32) - b) @ self.identity_whiten, axis=1)

    def judge(self, scores: Scores) -> list[Verdict]:
        """One verdict per image, every gate's scores kept (also of gates that passed)."""
        out = []
        for i in range(len(scores.reconstruction_error)):
            domain = {
                "reconstruction_error": _r(scores.reconstruction_error[i]),
                "reconstruction_limit": _r(self.reconstruction_limit),
                "latent_distance": _r(scores.latent_distance[i]),
                "latent_limit": _r(self.latent_limit),
            }
            domain["passed"] = bool(scores.reconstruction_error[i] <= self.reconstruction_limit and scores.latent_distance[i] <= self.latent_limit)
            expected = int(np.argmax(scores.p_original[i]))
            medical: dict = {"class": self.classes[expected], "p_original": _r(scores.p_original[i, expected]), "limit": _r(self.medical_limit)}
            identity: dict = {"limit": _r(self.identity_limit)}
            ok_id = True
            ok_med = bool(scores.p_original[i, expected] >= self.original_limit)
            if self.original_limit > 0:
                medical["original_limit"], medical["original_passed"] = _r(self.original_limit), ok_med
            for kind, probs in scores.p_outputs.items():
                want = expected if kind == "anonymized" else int(scores.targets[i])  # type: ignore[index]
                limit = self.medical_limit if kind == "anonymized" else self.counterfactual_limit
                p = float(probs[i, want])
                medical[kind] = {"class": self.classes[want], "p": _r(p)} if kind != "anonymized" else _r(p)
                if kind != "anonymized":
                    medical["counterfactual_limit"] = _r(limit)
                ok_med &= p >= limit
                d = float(scores.identity_distance[kind][i])
                identity[kind] = _r(d)
                ok_id &= d > self.identity_limit
            medical["passed"], identity["passed"] = bool(ok_med), bool(ok_id)
            out.append(Verdict({"domain": domain, "medical": medical, "identity": identity}))
        return out


def _r(v: float) -> float:
    return round(float(v), 4)


@dataclasses.dataclass
class Scores:
    """What the gates read, per image (N first): the domain scores of the input, the
    classifier's probabilities for the input and each output kind, the identity distance
    of each output kind from the input, and the counterfactual's target class."""

    reconstruction_error: np.ndarray
    latent_distance: np.ndarray
    p_original: np.ndarray
    p_outputs: dict[str, np.ndarray]
    identity_distance: dict[str, np.ndarray]
    targets: np.ndarray | None = None


@dataclasses.dataclass
class Verdict:
    """The gates' scores for one image, gate by gate (JSON-ready, no PHI)."""

    gates: dict[str, dict]
    draw: int = 1  # which synthetic identity this verdict is of (1: the first)

    @property
    def failed(self) -> list[str]:
        return [g for g in GATES if not self.gates[g]["passed"]]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def input_failed(self) -> bool:
        """A gate that judges the input failed (domain, or the medical gate's reading of the
        original): another draw cannot pass."""
        return not self.gates["domain"]["passed"] or not self.gates["medical"].get("original_passed", True)

    def reason(self) -> str:
        """Why the first failed gate failed: its name and scores against their limits."""
        for g in self.failed:
            s = self.gates[g]
            if g == "domain":
                return (f"gate domain failed: reconstruction_error {s['reconstruction_error']:.4f} (limit {s['reconstruction_limit']:.4f}), "
                        f"latent_distance {s['latent_distance']:.2f} (limit {s['latent_limit']:.2f}): the input does not look like the model's training data")
            if g == "medical" and not s.get("original_passed", True):
                return (f"gate medical failed: original p({s['class']}) {s['p_original']:.3f} (limit {s['original_limit']:.3f}): "
                        "the classifier cannot tell the original's medical content, so no synthesised image of it can be vouched for")
            if g == "medical":
                parts = [f"anonymized p({s['class']}) {s['anonymized']:.3f} (limit {s['limit']:.3f})"]
                if "counterfactual" in s:
                    parts.append(f"counterfactual p({s['counterfactual']['class']}) {s['counterfactual']['p']:.3f} (limit {s['counterfactual_limit']:.3f})")
                return "gate medical failed: " + ", ".join(parts) + ": the synthesised image does not show the original's medical content"
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k not in ("limit", "passed"))
            return f"gate identity failed: distance {kinds} (must exceed {s['limit']:.2f}): the synthesised image is too close to the patient"
        return ""


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """The job record of one object (its frames' verdicts): passed, failed gates, scores."""
    failed = sorted({g for v in verdicts for g in v.failed}, key=GATES.index)
    return {"passed": not failed, "failed": failed, "draws": max((v.draw for v in verdicts), default=1),
            "frames": [{**v.gates, "draw": v.draw} for v in verdicts]}
