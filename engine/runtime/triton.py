"""A runner on a Triton Inference Server (gRPC), shared by several nodes.

The graph runs on the server; this side only sends tensors and reads tensors back. Each
request carries the input arrays and nothing else (no request or sequence id, no shared
memory region), so any number of nodes can use one server, and Triton's dynamic batcher
merges their concurrent requests into its batches.

Failures are split in two (see :class:`engine.runtime.TransientRunnerError`):

* the server or the model out of reach (connection refused or reset, a timeout, the model
  loading or unloaded, the server's queue full) raises ``TransientRunnerError``: the
  work is to be retried later and says nothing about the images;
* a server that serves something else than the bundle (other tensors, other shapes,
  other weights) raises ``RunnerError`` at activation: a configuration to fix.

Activation checks the served model twice: its configuration (tensor names, shapes and
types; a ``casemask_weights`` parameter, where the repository was written by
``casemask engine triton-repo``, must name the bundle's weights) and its arithmetic (a
seeded probe batch run on the server and by ONNX Runtime on the bundle's own export must
agree within ``verify_atol``), so a node never passes off another model's output as this
bundle's.

Per the tritonclient documentation a client object is not thread safe: each thread gets
its own, and a client whose call failed transiently is closed and made again on the next
call: a gRPC channel that kept failing to connect waits longer and longer between
attempts (gRPC's connection backoff grows to 120 s), so after a long outage an old
channel could go on failing for minutes after the server is back.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.runtime.base import Runner, RunnerError, TensorSpec, TransientRunnerError

log = logging.getLogger(__name__)

# gRPC status codes that say the request itself is wrong. Everything else (UNAVAILABLE,
# DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, NOT_FOUND for a model being reloaded, INTERNAL
# for a server-side failure, ...) is about the server, and so transient for the caller.
REQUEST_ERRORS = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})
PROBE_SEED = 20240424
PROBE_BATCH = 2


@dataclasses.dataclass(frozen=True)
class TritonTarget:
    """Where a bundle's graphs are served.

    ``url`` is the server's gRPC endpoint, ``host:port`` (Triton's default port is 8001).
    Graph ``g`` is served as the model ``f"{model}_{g}"`` (what ``casemask engine
    triton-repo --name MODEL`` writes); ``version`` 0 asks for the server's newest.
    ``ca_file`` turns TLS on (``cert_file`` and ``key_file`` add a client certificate).
    ``timeout_s`` bounds each request; ``verify_atol`` is the largest difference allowed
    between the server's and ONNX Runtime's output on the probe batch at activation.
    """

    url: str
    model: str
    version: int = 0
    timeout_s: float = 30.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_atol: float = 5e-2

    def model_name(self, graph: str) -> str:
        return served_name(self.model, graph)


def served_name(model: str, graph: str) -> str:
    """The Triton model name of ``graph`` of the bundle served as ``model``."""
    return f"{model}_{graph}"


def _status(exc: Exception) -> str:
    """'UNAVAILABLE' from tritonclient's 'StatusCode.UNAVAILABLE' (or '' when absent)."""
    status = getattr(exc, "status", None)
    text = status() if callable(status) else ""
    return (text or "").rsplit(".", 1)[-1]


def _message(exc: Exception) -> str:
    msg = getattr(exc, "message", None)
    return (msg() if callable(msg) else str(exc)) or type(exc).__name__


class TritonRunner(Runner):
    """One graph of a bundle, run by a Triton Inference Server over gRPC."""

    backend = "triton"

    def __init__(self, target: TritonTarget, graph: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int = 128, reference: Path | None = None, weights_digest: str | None = None) -> None:
        """``reference``: the bundle's ONNX export of ``graph``, run locally on the probe
        batch at activation (None skips that check); ``weights_digest``: the bundle's, for
        the served configuration's ``casemask_weights`` parameter."""
        super().__init__(inputs, outputs, max_batch)
        self.target = target
        self.graph = graph
        self.model_name = target.model_name(graph)
        self.version = str(target.version) if target.version else ""
        self.reference = Path(reference) if reference is not None else None
        self.weights_digest = weights_digest
        self.device = target.url
        self.wire_dtypes: dict[str, np.dtype] = {}
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()

    @classmethod
    def is_available(cls) -> str | None:
        try:
            import tritonclient.grpc  # noqa: F401
        except ImportError:
            return "tritonclient is not installed (pip install 'casemask[triton]')"
        return None

    # -- connection -----------------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as grpcclient

            t = self.target
            tls = {}
            if t.ca_file is not None:
                tls = {"ssl": True, "root_certificates": str(t.ca_file)}
                if t.cert_file is not None:
                    tls.update(private_key=str(t.key_file), certificate_chain=str(t.cert_file))
            client = grpcclient.InferenceServerClient(t.url, **tls)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _drop_client(self) -> None:
        """Close this thread's client; the next call connects afresh."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` on this thread's client, its failures sorted into transient
        (the server) and permanent (the request)."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn(self._client(), *args, **kw)
        except InferenceServerException as exc:
            code = _status(exc)
            if code in REQUEST_ERRORS:
                raise RunnerError(f"triton {self.model_name} at {self.target.url}: {what} refused ({code}): {_message(exc)}") from None
            self._drop_client()
            raise TransientRunnerError(f"triton {self.model_name} at {self.target.url}: {what} failed ({code or 'no status'}): {_message(exc)}") from None

    # -- lifecycle ------------------------------------------------------------------
    def _activate_impl(self) -> None:
        try:
            self._connect_and_check()
        except BaseException:
            self._deactivate_impl()
            raise

    def _connect_and_check(self) -> None:
        timeout = self.target.timeout_s
        if not self._call("liveness check", lambda c: c.is_server_live(client_timeout=timeout)):
            self._drop_client()
            raise TransientRunnerError(f"triton server at {self.target.url} is not live")
        if not self._call("readiness check", lambda c: c.is_model_ready(self.model_name, self.version, client_timeout=timeout)):
            self._drop_client()
            raise TransientRunnerError(f"triton model {self.model_name} (version {self.version or 'newest'}) is not ready at {self.target.url}")
        config = self._call("model configuration", lambda c: c.get_model_config(self.model_name, self.version, client_timeout=timeout)).config
        self._check_config(config)
        if self.reference is not None:
            self._check_probe()
        log.info("triton model %s ready at %s (batches up to %d)", self.model_name, self.target.url, self.max_batch)

    def _deactivate_impl(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()
        self._local = threading.local()

    # -- checks ---------------------------------------------------------------------
    def _check_config(self, config) -> None:
        """The served tensors must be the graph's; the batch limit becomes the server's.

        Raises:
            RunnerError: another model is served under this name.
        """
        from tritonclient.grpc import model_config_pb2
        from tritonclient.utils import triton_to_np_dtype

        where = f"triton model {self.model_name} at {self.target.url}"
        if config.max_batch_size < 1:
            raise RunnerError(f"{where} has max_batch_size {config.max_batch_size}: serve it with batching (casemask engine triton-repo writes such a repository)")
        served = {t.name: t for t in (*config.input, *config.output)}
        for spec in (*self.inputs, *self.outputs):
            t = served.get(spec.name)
            if t is None:
                raise RunnerError(f"{where} has no tensor {spec.name!r} (it has {', '.join(sorted(served))})")
            dims = tuple(t.dims)
            want = tuple(spec.shape[1:])
            if len(dims) != len(want) or any(d not in (-1, w) for d, w in zip(dims, want)):
                raise RunnerError(f"{where}: tensor {spec.name} has dims {list(dims)}, the bundle's graph {list(want)} (after the batch axis)")
            wire = model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
            if wire not in ("FP32", "FP16"):
                raise RunnerError(f"{where}: tensor {spec.name} is {wire}; float32 or float16 expected")
            self.wire_dtypes[spec.name] = np.dtype(triton_to_np_dtype(wire))
        self.max_batch = min(self.max_batch, int(config.max_batch_size))
        digest = config.parameters["casemask_weights"].string_value if "casemask_weights" in config.parameters else None
        if digest is not None and self.weights_digest is not None and digest != self.weights_digest:
            raise RunnerError(f"{where} was made from weights {digest}, this bundle's are {self.weights_digest}: update the server's repository (casemask engine triton-repo)")

    def probe_feed(self) -> dict[str, np.ndarray]:
        """A fixed batch of inputs (seeded): images in [-1, 1], one-hot targets, normal noise."""
        rng = np.random.default_rng(PROBE_SEED)
        feed = {}
        for s in self.inputs:
            shape = (PROBE_BATCH, *s.shape[1:])
            if s.name == "target":
                feed[s.name] = np.eye(shape[1], dtype=np.float32)[np.arange(PROBE_BATCH) % shape[1]]
            elif s.name == "image":
                feed[s.name] = rng.uniform(-1, 1, shape).astype(np.float32)
            else:
                feed[s.name] = rng.standard_normal(shape).astype(np.float32)
        return feed

    def _check_probe(self) -> None:
        """The server must compute the bundle's function: the probe batch, run there and by
        ONNX Runtime on the bundle's export, must agree within ``verify_atol``.

        Raises:
            RunnerError: the outputs differ (another model or other weights are served).
        """
        from engine.runtime.backends import OnnxRuntimeRunner

        feed = self.probe_feed()
        with OnnxRuntimeRunner(self.reference, self.inputs, self.outputs, threads=1) as local:
            want = local.infer(feed)
        got = self._infer_impl(feed)
        for spec in self.outputs:
            err = float(np.abs(got[spec.name] - want[spec.name]).max())
            if not err <= self.target.verify_atol:  # NaN fails too
                raise RunnerError(
                    f"triton model {self.model_name} at {self.target.url} does not compute this bundle's {self.graph}: "
                    f"output {spec.name} differs from the local export by {err:.3g} (> verify_atol {self.target.verify_atol:g}) on the probe batch"
                )
        log.info("triton model %s matches the local export within %g", self.model_name, self.target.verify_atol)

    # -- inference ------------------------------------------------------------------
    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        n = next(iter(feed.values())).shape[0]
        request = []
        for spec in self.inputs:
            arr = feed[spec.name].astype(self.wire_dtypes.get(spec.name, np.float32), copy=False)
            t = grpcclient.InferInput(spec.name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            t.set_data_from_numpy(arr)
            request.append(t)
        wanted = [grpcclient.InferRequestedOutput(s.name) for s in self.outputs]
        result = self._call(
            "inference",
            lambda c: c.infer(self.model_name, request, model_version=self.version, outputs=wanted, client_timeout=self.target.timeout_s),
        )
        out = {}
        for spec in self.outputs:
            arr = result.as_numpy(spec.name)
            want = (n, *spec.shape[1:])
            if arr is None or arr.shape != want:
                raise RunnerError(f"triton model {self.model_name}: output {spec.name} has shape {None if arr is None else arr.shape}, expected {want}")
            out[spec.name] = arr.astype(np.float32, copy=False)
        return out

    def describe(self) -> str:
        return f"triton {self.model_name}{':' + self.version if self.version else ''} at {self.target.url}"
