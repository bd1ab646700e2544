"""Backends: PyTorch (eager or compiled), ONNX Runtime (CPU, CUDA, TensorRT EP), TensorRT.

Each reports :meth:`is_available` with what is missing, so that ``auto`` can say why it
did not pick a faster one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import numpy as np

from engine.runtime.base import Runner, RunnerError, TensorSpec
from engine.runtime.plans import GpuInfo, PlanCache, plan_key, timing_key

log = logging.getLogger(__name__)


class TorchRunner(Runner):
    """A torch.nn.Module in eager mode (or torch.compile), on CPU or CUDA."""

    backend = "torch"

    def __init__(self, module, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str = "cpu", compile: bool = False, max_batch: int = 128, half: bool = False) -> None:
        super().__init__(inputs, outputs, max_batch)
        self.module = module
        self.device = device
        self.compile = compile
        self.half = half

    @classmethod
    def is_available(cls) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed (pip install torch)"
        return None

    @staticmethod
    def cuda_available() -> str | None:
        import torch

        return None if torch.cuda.is_available() else "no CUDA device visible to torch"

    def _activate_impl(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RunnerError("torch: CUDA requested but no CUDA device is visible")
        self._torch = torch
        self._mod = self.module.to(self.device).eval()
        if self.half:
            self._mod = self._mod.half()
        self._fn = torch.compile(self._mod) if self.compile else self._mod

    @contextlib.contextmanager
    def _float32(self):
        """On CUDA in float32, convolutions without TF32. cuDNN uses TF32 (10 mantissa bits)
        by default on Ampere and later: on an H100 the reference anonymizer then differed
        from the CPU by 1.5e-3. float32 here means float32; ``half`` is the fast mode."""
        cudnn = self._torch.backends.cudnn
        if self.half or not self.device.startswith("cuda"):
            yield
            return
        was = cudnn.allow_tf32
        cudnn.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32 = was

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode(), self._float32():
            args = []
            for spec in self.inputs:
                t = torch.from_numpy(feed[spec.name]).to(self.device)
                args.append(t.half() if self.half and t.is_floating_point() else t)
            out = self._fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {s.name: o.float().cpu().numpy() for s, o in zip(self.outputs, outs)}

    def describe(self) -> str:
        return f"torch{' compiled' if self.compile else ' eager'}{' fp16' if self.half else ''} on {self.device}"


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime with the given execution providers (CPU always available)."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], providers: list[str] | None = None, max_batch: int = 128, threads: int = 0, spin: bool = True) -> None:
        super().__init__(inputs, outputs, max_batch)
        self.onnx_path = Path(onnx_path)
        self.spin = spin
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.device = "cuda" if any(p in self.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")) else "cpu"

    @classmethod
    def is_available(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        return None

    @staticmethod
    def provider_available(name: str) -> str | None:
        import onnxruntime as ort

        if name not in ort.get_available_providers():
            return f"this onnxruntime build has no {name} (installed: {', '.join(ort.get_available_providers())})"
        if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            try:
                import torch

                if not torch.cuda.is_available():
                    return "no CUDA device visible"
            except ImportError:
                pass
        return None

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # ONNX Runtime's worker threads spin for a while after each run by default. The node
        # asks for spin=False: its receiving and scheduling threads need those cores between
        # batches (the pixel benchmark showed no measurable difference either way on 2
        # cores). Alone, sleeping workers cost the engine 8-11% at batch 1 to 32.
        if not self.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=self.providers)

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run([s.name for s in self.outputs], feed)
        return {s.name: o for s, o in zip(self.outputs, outs)}

    def _deactivate_impl(self) -> None:
        self.session = None

    def describe(self) -> str:
        return f"onnxruntime {self.providers[0].replace('ExecutionProvider', '')} on {self.device}"


class TensorRTRunner(Runner):
    """A TensorRT engine built from ONNX, executed on torch-allocated CUDA tensors.

    Build: an optimization profile (min/opt/max batch), FP16 where the GPU and TensorRT
    allow it, TF32 off in fp32 (TensorRT allows TF32 by default, 10 mantissa bits, as
    cuDNN does for torch: float32 here means float32), a timing cache per GPU model, and
    a plan cache (:mod:`engine.runtime.plans`) keyed by ONNX hash, TensorRT version, the
    model and compute capability of the GPU the engine runs on, precision and profile,
    built once across processes. FP16 comes two ways: where ``BuilderFlag.FP16`` exists
    (TensorRT 10 and before) the fp32 ONNX is built with that flag; where it is gone
    (TensorRT 11 keeps only strongly typed networks) the fp16 ONNX export (``fp16_onnx``,
    a callable that makes it) is built as a strongly typed network, its inputs and
    outputs float16. Execution: set_tensor_address + execute_async_v3 on a torch CUDA
    stream, buffers allocated by torch, all on CUDA device ``device`` (default: the
    current device when the runner is built or activated).
    """

    backend = "tensorrt"

    def __init__(self, onnx_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], cache_dir: Path, profile: tuple[int, int, int] = (1, 32, 128), fp16: bool = True, max_batch: int | None = None, fp16_onnx=None, device: int | None = None) -> None:
        super().__init__(inputs, outputs, max_batch or profile[2])
        self.onnx_path = Path(onnx_path)
        self.cache = PlanCache(Path(cache_dir))
        self.profile = profile
        self.fp16 = fp16
        self.fp16_onnx = fp16_onnx
        self.device_index = device
        self.device = "cuda" if device is None else f"cuda:{device}"
        self.strongly_typed = False

    @property
    def cache_dir(self) -> Path:
        return self.cache.folder

    @property
    def builds(self) -> int:
        """Plans this runner built (0 when it found its plan in the cache)."""
        return self.cache.builds

    def _source(self) -> Path:
        """The ONNX to build from, deciding between the FP16 flag and strong typing."""
        import tensorrt as trt

        self.strongly_typed = self.fp16 and not hasattr(trt.BuilderFlag, "FP16")
        if self.strongly_typed:
            if self.fp16_onnx is None:
                raise RunnerError("this TensorRT has no FP16 builder flag and no fp16 ONNX export was given")
            return Path(self.fp16_onnx())
        return self.onnx_path

    @classmethod
    def is_available(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed (pip install 'casemask[tensorrt]')"
        try:
            import torch
        except ImportError:
            return "torch is needed for CUDA buffers"
        if not torch.cuda.is_available():
            return "no CUDA device visible"
        return None

    # -- build ----------------------------------------------------------------------
    def _index(self) -> int:
        """The CUDA device the engine is built for and runs on (fixed at first use)."""
        if self.device_index is None:
            import torch

            self.device_index = torch.cuda.current_device()
            self.device = f"cuda:{self.device_index}"
        return self.device_index

    def gpu(self) -> GpuInfo:
        import torch

        return GpuInfo.of(torch.cuda.get_device_properties(self._index()))

    def cache_key(self) -> str:
        import tensorrt as trt

        onnx_hash = hashlib.sha256(self._source().read_bytes()).hexdigest()[:16]
        return plan_key(onnx_hash, trt.__version__, self.gpu(), self.fp16, tuple(self.profile))

    def build(self) -> Path:
        """Build (or find in the cache) the serialized engine; returns its path."""
        import torch

        with torch.cuda.device(self._index()):
            name = f"{self.onnx_path.stem}-{self.cache_key()}.plan"
            return self.cache.get(name, self._build_engine)

    def _build_engine(self) -> bytes:
        """The serialized engine for the current CUDA device.

        Raises:
            RunnerError: the ONNX does not parse or TensorRT fails to build.
        """
        import tensorrt as trt

        source = self._source()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        creation = trt.NetworkDefinitionCreationFlag
        if hasattr(creation, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
            flags |= 1 << int(creation.EXPLICIT_BATCH)
        if self.strongly_typed:
            flags |= 1 << int(creation.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(source.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RunnerError(f"TensorRT cannot parse {source.name}: {errors}")
        config = builder.create_builder_config()
        if self.fp16 and not self.strongly_typed and getattr(builder, "platform_has_fast_fp16", True):
            config.set_flag(trt.BuilderFlag.FP16)
        if not self.fp16 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        tkey = timing_key(trt.__version__, self.gpu())
        timing = config.create_timing_cache(self.cache.read_timing(tkey))
        config.set_timing_cache(timing, ignore_mismatch=True)
        prof = builder.create_optimization_profile()
        lo, opt, hi = self.profile
        for spec in self.inputs:
            rest = tuple(spec.shape[1:])
            prof.set_shape(spec.name, (lo, *rest), (opt, *rest), (hi, *rest))
        config.add_optimization_profile(prof)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RunnerError("TensorRT failed to build the engine (see the TensorRT log above)")
        self.cache.write_timing(tkey, bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def _activate_impl(self) -> None:
        import tensorrt as trt
        import torch

        plan = self.build()
        self._torch = torch
        with torch.cuda.device(self._index()):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if self._engine is None:
                raise RunnerError(f"TensorRT cannot load the plan {plan.name} (see the TensorRT log above)")
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream()

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        n = next(iter(feed.values())).shape[0]
        if n < self.profile[0]:
            raise RunnerError(f"batch {n} is below the engine's profile minimum {self.profile[0]}")
        keep = []
        io_dtype = torch.float16 if self.strongly_typed else torch.float32
        dev = torch.device("cuda", self._index())
        with torch.cuda.device(dev), torch.cuda.stream(self._stream):
            for spec in self.inputs:
                t = torch.from_numpy(feed[spec.name]).to(dev, non_blocking=True).to(io_dtype).contiguous()
                keep.append(t)
                self._context.set_input_shape(spec.name, tuple(t.shape))
                self._context.set_tensor_address(spec.name, t.data_ptr())
            outs = {}
            for spec in self.outputs:
                shape = tuple(self._context.get_tensor_shape(spec.name))
                t = torch.empty(shape, dtype=io_dtype, device=dev)
                outs[spec.name] = t
                self._context.set_tensor_address(spec.name, t.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RunnerError("TensorRT execution failed")
        self._stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}

    def _deactivate_impl(self) -> None:
        self._context = None
        self._engine = None

    def describe(self) -> str:
        return f"tensorrt {'fp16' if self.fp16 else 'fp32'} on {self.device}"
