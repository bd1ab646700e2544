"""The text detector's graph, folded for ONNX Runtime's CPU kernels.

PP-OCRv4's detector (PPLCNetV3 backbone, exported from Paddle by paddle2onnx) writes
three things as chains of element-wise nodes that ONNX Runtime does not fuse:

- the backbone's "learnable affine blocks": every convolution is followed by
  ``Mul(a) -> Add(b)`` with scalar a and b;
- hard-swish, as ``x * Clip(x + 3, 0, 6) / 6``;
- the affine ``Mul(c) -> Add(d)`` after each learnable activation.

Each element-wise node is a pass over a whole feature map, and each one cuts ONNX
Runtime's blocked (NCHWc) convolution path, so every convolution was wrapped in layout
reorders: on a 1920 x 1440 input about half the model's time was spent outside the
convolutions (docs/burned-in.md, "Folding the detector's graph"). Here, on the model as
loaded (the wheel's file is never changed):

1. ``Conv -> Mul(a) -> Add(b)`` becomes one Conv with weights ``a W`` and bias
   ``a B + b`` (exact in real arithmetic);
2. the hard-swish chain becomes ONNX's ``HardSwish`` (opset 14), which ONNX Runtime
   fuses into the convolution before it;
3. ``Mul(c) -> Add(d)`` in front of a 1 x 1 convolution without padding becomes that
   convolution with weights ``c W`` and bias ``B + d sum(W)`` (exact: no padded border
   where the shift ``d`` would be missing). In front of a padded (depthwise)
   convolution it is left as it is: folding it there would change the border.

The results differ from the shipped graph's by float rounding only (a probability
differs by at most about 3e-5; tests/test_burnedin.py compares the boxes of both).

This goes below the model's public surface (node names and shapes of one export), so
:func:`folded_model` checks what it folded: when the wheel ships another model whose
chains do not match, it returns None and the detector runs the shipped file unchanged
(slower, never different). The test fails loudly when the counts change.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Folded:
    """How many chains of each kind were folded."""

    conv_affine: int = 0  # Conv -> Mul -> Add into the Conv
    hard_swish: int = 0  # x * Clip(x + 3, 0, 6) / 6 into HardSwish
    affine_conv: int = 0  # Mul -> Add into the 1 x 1 Conv after it


# What the PP-OCRv4 detector of rapidocr-onnxruntime 1.4.x holds (tests/test_burnedin.py).
EXPECTED = Folded(conv_affine=28, hard_swish=24, affine_conv=10)


class _Graph:
    """The nodes and constant tensors of one ONNX graph, with the few look-ups the folds need."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.outputs = {o.name for o in g.output}
        self.tensors = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.nodes = []
        for n in g.node:  # paddle2onnx writes its weights as Constant nodes
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                self.tensors[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            else:
                self.nodes.append(n)

    def only_user(self, name: str):
        """The one node reading ``name`` (None when several do, or it is a graph output)."""
        users = [n for n in self.nodes if name in n.input]
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def scalar(self, name: str) -> float | None:
        v = self.tensors.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def scalar_operand(self, node, other: str) -> float | None:
        """The scalar constant ``node`` combines with ``other`` (None if there is none)."""
        rest = [i for i in node.input if i != other]
        return self.scalar(rest[0]) if len(rest) == 1 else None

    def add_tensor(self, name: str, value: np.ndarray) -> str:
        self.tensors[name] = value.astype(np.float32)
        return name

    def drop(self, nodes) -> None:
        gone = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in gone]

    def write(self, model) -> None:
        from onnx import numpy_helper

        g = model.graph
        used = {i for n in self.nodes for i in n.input}
        del g.node[:]
        g.node.extend(self.nodes)
        del g.initializer[:]
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in self.tensors.items() if k in used)
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 14)  # HardSwish


def _conv_bias(g: _Graph, conv) -> np.ndarray:
    w = g.tensors[conv.input[1]]
    return g.tensors[conv.input[2]] if len(conv.input) > 2 else np.zeros(w.shape[0], np.float32)


def _fold_conv_affine(g: _Graph) -> int:
    """Conv -> Mul(a) -> Add(b) (scalars) into the Conv."""
    done, gone = 0, []
    for conv in g.nodes:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in g.tensors:
            continue
        mul = g.only_user(conv.output[0])
        a = g.scalar_operand(mul, conv.output[0]) if mul is not None and mul.op_type == "Mul" else None
        add = g.only_user(mul.output[0]) if a is not None else None
        b = g.scalar_operand(add, mul.output[0]) if add is not None and add.op_type == "Add" else None
        if b is None:
            continue
        w, bias = g.tensors[conv.input[1]], _conv_bias(g, conv)
        inputs = [conv.input[0], g.add_tensor(f"{conv.output[0]}.folded_w", w * a), g.add_tensor(f"{conv.output[0]}.folded_b", bias * a + b)]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = add.output[0]
        gone += [mul, add]
        done += 1
    g.drop(gone)
    return done


def _fold_hard_swish(g: _Graph) -> int:
    """x * Clip(x + 3, 0, 6) / 6 into HardSwish(x)."""
    done, gone = 0, []
    for add in g.nodes:
        if add.op_type != "Add" or len(add.input) != 2 or g.scalar(add.input[1]) != 3.0:
            continue
        x = add.input[0]
        clip = g.only_user(add.output[0])
        if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or (g.scalar(clip.input[1]), g.scalar(clip.input[2])) != (0.0, 6.0):
            continue
        mul = g.only_user(clip.output[0])
        if mul is None or mul.op_type != "Mul" or sorted(mul.input) != sorted([x, clip.output[0]]):
            continue
        div = g.only_user(mul.output[0])
        if div is None or div.op_type != "Div" or div.input[0] != mul.output[0] or g.scalar(div.input[1]) != 6.0:
            continue
        add.op_type = "HardSwish"
        del add.input[1:]
        add.output[0] = div.output[0]
        gone += [clip, mul, div]
        done += 1
    g.drop(gone)
    return done


def _fold_affine_conv(g: _Graph) -> int:
    """Mul(c) -> Add(d) (scalars) in front of an unpadded, ungrouped 1 x 1 Conv into it."""
    from onnx import helper

    done, gone = 0, []
    for mul in g.nodes:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        x = mul.input[1] if g.scalar(mul.input[0]) is not None else mul.input[0]
        c = g.scalar_operand(mul, x)
        add = g.only_user(mul.output[0]) if c is not None else None
        d = g.scalar_operand(add, mul.output[0]) if add is not None and add.op_type == "Add" else None
        conv = g.only_user(add.output[0]) if d is not None else None
        if conv is None or conv.op_type != "Conv" or conv.input[0] != add.output[0] or conv.input[1] not in g.tensors:
            continue
        w = g.tensors[conv.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if w.shape[2:] != (1, 1) or any(attrs.get("pads", [])) or attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        bias = _conv_bias(g, conv)
        inputs = [x, g.add_tensor(f"{conv.output[0]}.prefolded_w", w * c), g.add_tensor(f"{conv.output[0]}.prefolded_b", bias + d * w.sum(axis=(1, 2, 3)))]
        del conv.input[:]
        conv.input.extend(inputs)
        gone += [mul, add]
        done += 1
    g.drop(gone)
    return done


def fold(path: Path) -> tuple[bytes, Folded]:
    """The model at ``path`` with the chains above folded, serialised, and what was folded.

    Raises:
        ImportError: the ``onnx`` package is missing.
        onnx.checker.ValidationError: the folded graph is not a valid model.
    """
    import onnx

    model = onnx.load(str(path))
    g = _Graph(model)
    done = Folded(_fold_conv_affine(g), _fold_hard_swish(g), _fold_affine_conv(g))
    g.write(model)
    onnx.checker.check_model(model)
    return model.SerializeToString(), done


def folded_model(path: Path) -> bytes | None:
    """The folded model (:func:`fold`) when it folded exactly what :data:`EXPECTED`
    says the shipped detector holds; None otherwise (run the file as shipped)."""
    try:
        data, done = fold(path)
    except ImportError:
        log.warning("text detector: the onnx package is missing; the model runs unfolded (slower)")
        return None
    except Exception as exc:  # a model of another shape: run it as shipped, and say so
        log.warning("text detector: the model could not be folded (%s); it runs unfolded (slower)", type(exc).__name__)
        return None
    if done != EXPECTED:
        log.warning("text detector: the model is not the one the folds were written for (%s); it runs unfolded (slower)", done)
        return None
    return data
