"""A Triton Inference Server model repository for a bundle (``casemask engine triton-repo``).

One Triton model per graph, named ``<name>_<graph>`` (:func:`engine.runtime.triton.served_name`)::

    OUT/<name>_anonymize/config.pbtxt
    OUT/<name>_anonymize/<version>/model.onnx      (or model.plan)

``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (from tritonclient) and
written in its text format, so every field name and value is one Triton parses. It holds
the graph's tensors (batch axis first, ``max_batch_size``), dynamic batching (preferred
batch sizes, a queue delay), an instance group, and either

* ``onnx`` (default): the onnxruntime backend on the bundle's ONNX export, optionally with
  TensorRT as its GPU execution accelerator (``accelerator="tensorrt"``, FP16 with
  ``fp16``), warmed up at load so the TensorRT engines are built before the first
  request; or
* ``plan``: a serialized TensorRT engine built here by :class:`TensorRTRunner` (which
  needs TensorRT and the GPU model of the server, and the server's TensorRT version).

It also records, as parameters, which bundle weights and graph it was made from
(``casemask_weights``, ``casemask_graph``, ``casemask_onnx_sha256``); the triton runner
refuses a served model whose ``casemask_weights`` is not its bundle's. Files are written
under temporary names and renamed, model file first, so a server polling the repository
never loads half a file.

Field reference: Triton's model configuration documentation and ``model_config.proto``;
the TensorRT accelerator's parameters: Triton's optimization documentation
("ONNX with TensorRT Optimization (ORT-TRT)").
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from engine.bundle import Bundle
from engine.runtime.base import RunnerError, TensorSpec
from engine.runtime.plans import write_atomic
from engine.runtime.triton import served_name

log = logging.getLogger(__name__)

FORMATS = ("onnx", "plan")
ACCELERATORS = ("none", "tensorrt")


@dataclasses.dataclass(frozen=True)
class RepoOptions:
    """What ``casemask engine triton-repo`` writes.

    ``preferred`` batch sizes must not exceed ``max_batch``; ``queue_delay_us`` is how long
    Triton may hold a request to fill a batch; ``instances`` model instances per GPU (or
    on the CPU with ``kind="cpu"``). ``trt_cache_path`` is a folder *on the server* where
    the TensorRT accelerator keeps its engines across restarts (empty: rebuilt at each load).
    """

    name: str
    version: int = 1
    fmt: str = "onnx"
    accelerator: str = "none"
    fp16: bool = False
    max_batch: int = 128
    preferred: tuple[int, ...] = (32, 128)
    queue_delay_us: int = 1000
    instances: int = 1
    kind: str = "gpu"
    trt_cache_path: str = ""
    trt_workspace_bytes: int = 1 << 30

    def problems(self) -> list[str]:
        """What is wrong with these options, one line each (empty when none)."""
        out = []
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            out.append(f"--name {self.name!r}: a model name without slashes, spaces or a leading dot")
        if self.version < 1:
            out.append(f"--version {self.version}: Triton versions are integers from 1")
        if self.fmt not in FORMATS:
            out.append(f"--format {self.fmt!r}: choose one of {', '.join(FORMATS)}")
        if self.accelerator not in ACCELERATORS:
            out.append(f"--accelerator {self.accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
        if self.max_batch < 1:
            out.append(f"--max-batch {self.max_batch}: 1 or more")
        if not self.preferred or any(p < 1 or p > self.max_batch for p in self.preferred):
            out.append(f"--preferred {','.join(map(str, self.preferred))}: batch sizes from 1 to --max-batch {self.max_batch}")
        if self.queue_delay_us < 0:
            out.append(f"--queue-delay-us {self.queue_delay_us}: 0 or more")
        if self.instances < 1:
            out.append(f"--instances {self.instances}: 1 or more")
        if self.kind not in ("gpu", "cpu"):
            out.append(f"--kind {self.kind!r}: choose one of gpu, cpu")
        if self.kind == "cpu" and (self.fmt == "plan" or self.accelerator == "tensorrt"):
            out.append("--kind cpu: TensorRT (--format plan, --accelerator tensorrt) needs a GPU")
        if self.fmt == "plan" and self.accelerator != "none":
            out.append("--accelerator applies to --format onnx; a plan is TensorRT already")
        if self.fp16 and self.fmt == "onnx" and self.accelerator != "tensorrt":
            out.append("--fp16 needs --accelerator tensorrt (or --format plan)")
        return out


def _tensor(cls, spec: TensorSpec, data_type: int):
    return cls(name=spec.name, data_type=data_type, dims=list(spec.shape[1:]))


def model_config(bundle: Bundle, graph: str, opts: RepoOptions, model_sha256: str, half_io: bool = False):
    """Triton's ``ModelConfig`` protobuf for ``graph`` of ``bundle``.

    ``half_io``: the served tensors are float16 (a strongly typed TensorRT plan).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    from engine.export import graph_specs

    inputs, outputs = graph_specs(bundle, graph)
    dtype = mc.TYPE_FP16 if half_io else mc.TYPE_FP32
    config = mc.ModelConfig(
        name=served_name(opts.name, graph),
        max_batch_size=opts.max_batch,
        input=[_tensor(mc.ModelInput, s, dtype) for s in inputs],
        output=[_tensor(mc.ModelOutput, s, dtype) for s in outputs],
        dynamic_batching=mc.ModelDynamicBatching(preferred_batch_size=sorted(set(opts.preferred)), max_queue_delay_microseconds=opts.queue_delay_us),
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU if opts.kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU, count=opts.instances)],
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[opts.version])),
    )
    config.backend = "tensorrt" if opts.fmt == "plan" else "onnxruntime"
    config.default_model_filename = "model.plan" if opts.fmt == "plan" else "model.onnx"
    if opts.accelerator == "tensorrt":
        trt = {"precision_mode": "FP16" if opts.fp16 else "FP32", "max_workspace_size_bytes": str(opts.trt_workspace_bytes)}
        if opts.trt_cache_path:
            trt.update(trt_engine_cache_enable="1", trt_engine_cache_path=opts.trt_cache_path)
        config.optimization.execution_accelerators.gpu_execution_accelerator.append(mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(name="tensorrt", parameters=trt))
    if opts.accelerator == "tensorrt" or opts.fmt == "plan":
        # Build the engines (or load the plan) at model load, not on the first request.
        largest = max(opts.preferred)
        config.model_warmup.append(
            mc.ModelWarmup(
                name="casemask-warmup",
                batch_size=largest,
                inputs={s.name: mc.ModelWarmup.Input(data_type=dtype, dims=list(s.shape[1:]), random_data=True) for s in inputs},
            )
        )
    from engine.graphs import source_of

    params = {
        "casemask_weights": bundle.digest(source_of(graph)),  # weights.pt, or gates.pt for the gates' graphs
        "casemask_graph": graph,
        "casemask_bundle": str(bundle.meta.get("name", bundle.path.name)),
        "casemask_model_sha256": model_sha256,
    }
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_file(bundle: Bundle, graph: str, opts: RepoOptions) -> tuple[Path, bool]:
    """(the file to serve, whether its tensors are float16) for ``graph``."""
    if opts.fmt == "onnx":
        from engine.runtime import graph_path

        return graph_path(bundle, graph), False  # the bundle's shipped graph when current
    from engine.runtime import make_runner, unavailable

    why = unavailable("tensorrt")
    if why:
        raise RunnerError(f"--format plan builds a TensorRT engine here, on the server's GPU model with the server's TensorRT version: {why}")
    lo = min(opts.preferred)
    runner, _ = make_runner(bundle, graph, "tensorrt", trt_profile=(1, lo, opts.max_batch))
    runner.fp16 = opts.fp16  # type: ignore[attr-defined]
    plan = runner.build()  # type: ignore[attr-defined]
    return plan, bool(runner.strongly_typed)  # type: ignore[attr-defined]


def write_repository(bundle: Bundle, out: Path, opts: RepoOptions, graphs: list[str] | None = None) -> list[Path]:
    """Write one Triton model per graph under ``out``; returns the config.pbtxt paths.

    Raises:
        ValueError: bad options (every problem, one per line).
        engine.runtime.RunnerError: ``plan`` asked for where TensorRT cannot run.
    """
    from google.protobuf import text_format

    problems = opts.problems()
    if problems:
        raise ValueError("\n".join(problems))
    written = []
    from engine.graphs import NODE_GRAPHS

    for graph in graphs or list(NODE_GRAPHS):  # what the node's pixel step runs
        source, half_io = _model_file(bundle, graph, opts)
        folder = Path(out) / served_name(opts.name, graph)
        target = folder / str(opts.version) / ("model.plan" if opts.fmt == "plan" else "model.onnx")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, source.read_bytes())
        config = model_config(bundle, graph, opts, _sha256(target), half_io)
        write_atomic(folder / "config.pbtxt", text_format.MessageToString(config).encode())
        log.info("triton model %s version %d written to %s", config.name, opts.version, folder)
        written.append(folder / "config.pbtxt")
    return written
