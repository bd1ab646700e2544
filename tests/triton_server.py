"""A real Triton Inference Server for the tests and the benchmark, on the CPU.

    .venv-triton/bin/python tests/triton_server.py --model NAME=GRAPH.onnx [--model ...] \\
        --grpc-port P --http-port Q [--max-batch 128] [--preferred 32,128] [--queue-delay-us 1000]

Run with the interpreter of ``.venv-triton`` (``make triton-venv``): NVIDIA's PyTriton
(``nvidia-pytriton``) bundles ``tritonserver`` and its Python backend, and needs numpy < 2,
which the project's own environment does not have. Each ``--model`` is served under its
NAME by Triton (gRPC and HTTP, loopback only, dynamic batching as given) and computed by
ONNX Runtime on the CPU from the given ONNX graph, the same graph the local
``onnxruntime`` backend runs. Prints ``READY <grpc port>`` once every model is loaded;
stops on SIGINT or SIGTERM.

PyTriton's Python-backend stub is linked against the system's ``libpython3.X.so``; under
an interpreter built elsewhere (pyenv) the stub would run this interpreter's standard
library on the system's runtime and fail at model load (seen here: Debian's libpython
3.11.2 under pyenv's 3.11.7 standard library, ``'_thread.RLock' object has no attribute
'_recursion_count'``). The server therefore gets this interpreter's own shared libpython
first on ``LD_LIBRARY_PATH``.

From the project's own environment, :class:`TritonServer` starts and stops this script
(its process group: tritonserver and the backend stubs are its children), and
:func:`unavailable` says why it cannot run here, if it cannot.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
# nvidia-pytriton 0.7.0's wheel is tagged manylinux_2_35: its tritonserver needs glibc 2.35.
GLIBC_NEEDED = (2, 35)


def unavailable() -> str | None:
    """None when a Triton server can be started here; else exactly why not."""
    if not TRITON_PYTHON.exists():
        return f"{TRITON_PYTHON.parent.parent.name} is missing: `make triton-venv` installs nvidia-pytriton (tritonserver) there"
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    try:
        have = tuple(int(x) for x in libc.split()[-1].split(".")[:2])
    except ValueError:
        have = (0, 0)
    if have < GLIBC_NEEDED:
        return f"this machine has {libc or 'no glibc'}; nvidia-pytriton's tritonserver needs glibc {GLIBC_NEEDED[0]}.{GLIBC_NEEDED[1]} or newer"
    probe = (
        "import pathlib, sys, pytriton, onnxruntime; "
        "v = f'{sys.version_info[0]}.{sys.version_info[1]}'; "
        "stub = pathlib.Path(pytriton.__file__).parent / 'tritonserver' / 'python_backend_stubs' / v / 'triton_python_backend_stub'; "
        "sys.exit(0 if stub.exists() else f'nvidia-pytriton has no Python backend stub for Python {v}')"
    )
    r = subprocess.run([str(TRITON_PYTHON), "-c", probe], capture_output=True, text=True, timeout=120)
    if r.returncode:
        return f"{TRITON_PYTHON} cannot serve: {(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}"
    return None


class TritonServer:
    """This script as a server process, serving ``models`` (Triton name -> ONNX path).

    ``start`` waits for READY (bounded) and raises with the server's log when it dies or
    times out; ``stop(hard=True)`` is a crash (SIGKILL to the process group), ``stop()``
    a shutdown (SIGTERM, then SIGKILL after ``timeout``). Use as a context manager.
    """

    def __init__(self, models: dict[str, Path], workdir: Path, grpc_port: int, http_port: int, max_batch: int = 128, preferred: str = "32,128", queue_delay_us: int = 1000, threads: int = 0, tls: tuple[Path, Path] | None = None) -> None:
        self.models = models
        self.workdir = Path(workdir)
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.args = ["--max-batch", str(max_batch), "--preferred", preferred, "--queue-delay-us", str(queue_delay_us), "--threads", str(threads)]
        if tls:
            self.args += ["--tls", f"{tls[0]},{tls[1]}"]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"triton-{self.starts}.log"

    def start(self, timeout: float = 180.0) -> TritonServer:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [str(TRITON_PYTHON), __file__, "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--workspace", str(self.workdir / f"ws{self.starts}"), *self.args]
        for name, path in self.models.items():
            cmd += ["--model", f"{name}={path}"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"READY" in self.log_path.read_bytes():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop(hard=True)
        raise RuntimeError(f"the Triton server did not start (see {self.log_path}):\n{tail}")

    def stop(self, hard: bool = False, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        # tritonserver and the backend stubs share the script's process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _own_libpython_first() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and (Path(libdir) / name).exists():
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)


def _onnx_model(path: str, threads: int):
    """(infer function, input Tensors, output Tensors) of an ONNX graph on ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import Tensor

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def tensors(items):
        return [Tensor(name=i.name, dtype=np.float32, shape=tuple(int(d) for d in i.shape[1:])) for i in items]

    @batch
    def infer(**feed):
        return dict(zip(names, session.run(names, feed)))

    return infer, tensors(session.get_inputs()), tensors(session.get_outputs())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--preferred", default="32,128")
    ap.add_argument("--queue-delay-us", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    ap.add_argument("--workspace", required=True, help="a private folder for PyTriton's sockets and model store")
    ap.add_argument("--tls", metavar="CERT,KEY", help="serve gRPC over TLS with this certificate and key")
    args = ap.parse_args()
    _own_libpython_first()

    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    tls = {}
    if args.tls:
        cert, key = args.tls.split(",")
        tls = {"grpc_use_ssl": True, "grpc_server_cert": cert, "grpc_server_key": key}
    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1", http_port=args.http_port,
        allow_metrics=False, exit_timeout_secs=5, **tls,
    )
    preferred = [int(p) for p in args.preferred.split(",") if p]
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    # PyTriton guards the administrative endpoints with a token; statistics stay open, so
    # that a test can read how the batcher grouped its requests.
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        for spec in args.model:
            name, path = spec.split("=", 1)
            infer, inputs, outputs = _onnx_model(path, args.threads)
            batcher = DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us, preferred_batch_size=preferred)
            triton.bind(model_name=name, infer_func=infer, inputs=inputs, outputs=outputs, config=ModelConfig(max_batch_size=args.max_batch, batcher=batcher))
        print(f"READY {args.grpc_port}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
