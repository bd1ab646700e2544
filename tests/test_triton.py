"""The triton backend against a real Triton Inference Server started here, and the
model repository that ``casemask engine triton-repo`` writes.

The server is NVIDIA's tritonserver as PyTriton bundles it (``tests/triton_server.py``,
run from ``.venv-triton``), serving the bundle's own ONNX export through ONNX Runtime on
the CPU behind Triton's gRPC protocol, with Triton's dynamic batcher in front.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine import bundle as bundles
from engine.export import export_graph, graph_specs, random_feed
from engine.runtime import RunnerError, TransientRunnerError, TritonTarget, make_runner
from tests.conftest import free_port, wait_until
from tests.triton_server import TritonServer, unavailable

WHY_NOT = unavailable()
needs_server = pytest.mark.skipif(WHY_NOT is not None, reason=f"no Triton server here: {WHY_NOT}")
ROOT = Path(__file__).resolve().parent.parent
FP32_ATOL = 1e-4  # same graph, same ONNX Runtime, different batch compositions


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A private copy of the reference bundle, with its anonymize and reconstruct exports."""
    dst = tmp_path_factory.mktemp("bundle") / "reference"
    shutil.copytree(bundles.resolve("builtin:reference"), dst, ignore=shutil.ignore_patterns("onnx", "plans"))
    b = bundles.load(dst)
    for graph in ("anonymize", "reconstruct"):
        export_graph(b, graph)
    return b


@pytest.fixture(scope="module")
def other_weights(bundle, tmp_path_factory):
    """The anonymize export of a model of the same shape with other (untrained) weights."""
    import torch

    from engine.model import DisentanglementModel

    torch.manual_seed(5)
    other = bundles.save(DisentanglementModel(bundle.config).eval(), tmp_path_factory.mktemp("other") / "b", {"name": "other"})
    return export_graph(other, "anonymize")


@pytest.fixture(scope="module")
def server(bundle, other_weights, tmp_path_factory):
    """One server for the module: the bundle as "ref", another model as "other", and the
    reconstruct graph under an anonymize name as "wrong". Batches of at most 16, and a
    50 ms queue delay so that concurrent requests meet in the batcher."""
    if WHY_NOT:
        pytest.skip(f"no Triton server here: {WHY_NOT}")
    from engine.graphs import NODE_GRAPHS
    from engine.runtime import graph_path

    models = {
        **{f"ref_{g}": graph_path(bundle, g) for g in NODE_GRAPHS},  # what the node's pixel step runs
        "ref_anonymize": bundle.export_path("anonymize"),
        "ref_reconstruct": bundle.export_path("reconstruct"),
        "other_anonymize": other_weights,
        "wrong_anonymize": bundle.export_path("reconstruct"),
    }
    with TritonServer(models, tmp_path_factory.mktemp("triton"), free_port(), free_port(), max_batch=16, preferred="16", queue_delay_us=50_000) as s:
        yield s


def local(bundle, graph):
    runner, _ = make_runner(bundle, graph, "onnxruntime")
    return runner


@needs_server
def test_triton_matches_local_onnxruntime_and_splits_batches_to_the_served_limit(bundle, server):
    r, _ = make_runner(bundle, "anonymize", "triton", triton=TritonTarget(server.url, "ref"))
    with r, local(bundle, "anonymize") as here:
        assert r.max_batch == 16  # the server's max_batch_size, read at activation
        for n, seed in ((1, 1), (7, 2), (40, 3)):  # 40: three requests of at most 16
            feed = random_feed(r.inputs, n, seed)
            got, want = r.infer(feed)["output"], here.infer(feed)["output"]
            assert got.shape == (n, 1, 64, 64) and got.dtype == np.float32
            assert np.abs(got - want).max() <= FP32_ATOL
    r2, _ = make_runner(bundle, "reconstruct", "triton", triton=TritonTarget(server.url, "ref"))
    with r2, local(bundle, "reconstruct") as here:
        feed = random_feed(r2.inputs, 5, 4)
        assert np.abs(r2.infer(feed)["output"] - here.infer(feed)["output"]).max() <= FP32_ATOL


def batch_sizes(url: str, model: str) -> dict[int, int]:
    """Triton's own statistics: executions per batch size of ``model``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model).model_stats[0]
    finally:
        client.close()
    return {int(b.batch_size): int(b.compute_infer.count) for b in stats.batch_stats}


@needs_server
def test_concurrent_requests_of_two_nodes_are_batched_together(bundle, server):
    """Two runners (two nodes) send 12 single-image requests at once from 12 threads:
    Triton executes them in fewer, larger batches, and each image gets its own result."""
    target = TritonTarget(server.url, "ref")
    nodes = [make_runner(bundle, "anonymize", "triton", triton=target)[0] for _ in range(2)]
    inputs, _ = graph_specs(bundle, "anonymize")
    feeds = [random_feed(inputs, 1, 100 + k) for k in range(12)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(feeds))

    def send(k: int) -> None:
        try:
            go.wait(timeout=30)
            results[k] = nodes[k % 2].infer(feeds[k])["output"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    for n in nodes:
        n.activate()  # each sends its probe batch
    before = batch_sizes(server.url, "ref_anonymize")
    try:
        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(feeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for n in nodes:
            n.deactivate()
    assert not errors, errors
    # Triton counts an execution after its response is on the wire: on a loaded machine
    # the statistics trail the replies, so read them until all twelve show (bounded).
    deadline = time.monotonic() + 30
    while True:
        after = batch_sizes(server.url, "ref_anonymize")
        new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
        if sum(size * count for size, count in new.items()) >= 12 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(size * count for size, count in new.items()) == 12  # every image once
    assert max(size for size, count in new.items() if count) > 1  # batched across requests
    with local(bundle, "anonymize") as here:
        for k, feed in enumerate(feeds):
            assert np.abs(results[k] - here.infer(feed)["output"]).max() <= FP32_ATOL


@needs_server
def test_a_server_computing_other_weights_is_refused(bundle, server):
    r, _ = make_runner(bundle, "anonymize", "triton", triton=TritonTarget(server.url, "other"))
    with pytest.raises(RunnerError, match="does not compute this bundle's anonymize") as info:
        r.activate()
    assert not isinstance(info.value, TransientRunnerError) and not r.is_active


@needs_server
def test_a_served_model_with_other_tensors_is_refused(bundle, server):
    r, _ = make_runner(bundle, "anonymize", "triton", triton=TritonTarget(server.url, "wrong"))
    with pytest.raises(RunnerError, match="has no tensor 'noise'") as info:
        r.activate()
    assert not isinstance(info.value, TransientRunnerError)


@needs_server
def test_a_model_the_server_does_not_have_is_transient(bundle, server):
    """Not ready (loading, unloaded, not yet in the repository): retried later."""
    r, _ = make_runner(bundle, "counterfactual", "triton", triton=TritonTarget(server.url, "ref"))
    with pytest.raises(TransientRunnerError, match="not ready"):
        r.activate()


@needs_server
def test_an_outage_is_transient_and_the_same_runner_recovers(bundle, tmp_path):
    grpc_port = free_port()
    s = TritonServer({"ref_anonymize": bundle.export_path("anonymize")}, tmp_path, grpc_port, free_port())
    s.start()
    try:
        r, _ = make_runner(bundle, "anonymize", "triton", triton=TritonTarget(s.url, "ref", timeout_s=10))
        feed = random_feed(r.inputs, 3, 9)
        with r, local(bundle, "anonymize") as here:
            want = here.infer(feed)["output"]
            assert np.abs(r.infer(feed)["output"] - want).max() <= FP32_ATOL
            s.stop(hard=True)  # the GPU server crashes
            for _ in range(3):  # every call while it is down: transient, never a plain failure
                with pytest.raises(TransientRunnerError, match="UNAVAILABLE"):
                    r.infer(feed)
            fresh, _ = make_runner(bundle, "anonymize", "triton", triton=TritonTarget(s.url, "ref", timeout_s=10))
            with pytest.raises(TransientRunnerError):
                fresh.activate()  # a node starting during the outage
            s.start()  # back, on the same port
            (got,) = wait_until(lambda: _infer_or_none(r, feed), timeout=60, interval=0.5, what="inference after the restart")
            assert np.abs(got - want).max() <= FP32_ATOL
            with fresh:
                assert np.abs(fresh.infer(feed)["output"] - want).max() <= FP32_ATOL
    finally:
        s.stop(hard=True)


def _infer_or_none(runner, feed) -> list[np.ndarray] | None:
    try:
        return [runner.infer(feed)["output"]]
    except TransientRunnerError:
        return None


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "server.pem", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@needs_server
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (apt-get install -y openssl)")
def test_tls_to_the_server(bundle, tmp_path):
    """Images leave the node for the GPU server: with ca_file they travel over TLS, and a
    plaintext client cannot talk to that server at all."""
    cert, key = _self_signed(tmp_path)
    with TritonServer({"ref_anonymize": bundle.export_path("anonymize")}, tmp_path / "s", free_port(), free_port(), tls=(cert, key)) as s:
        r, _ = make_runner(bundle, "anonymize", "triton", triton=TritonTarget(s.url, "ref", ca_file=cert))
        feed = random_feed(r.inputs, 2, 12)
        with r, local(bundle, "anonymize") as here:
            assert np.abs(r.infer(feed)["output"] - here.infer(feed)["output"]).max() <= FP32_ATOL
        plain, _ = make_runner(bundle, "anonymize", "triton", triton=TritonTarget(s.url, "ref", timeout_s=5))
        with pytest.raises(TransientRunnerError):
            plain.activate()


@needs_server
def test_the_node_pixel_step_on_triton_gives_the_local_backend_s_pixels(bundle, server, tmp_path):
    """[[models]] backend = "triton" reaches the server from the node's pixel step, and the
    derived images carry the same pixels as with the local onnxruntime backend."""
    from pydicom import dcmread

    from engine.data import SyntheticPatients
    from engine.data.dicom import write_dicom_studies
    from node.config import parse
    from node.deid import Pseudonymizer
    from node.pipeline import Item
    from node.pixels import EnginePixelStep

    files = write_dicom_studies(SyntheticPatients(1, 3, 96, seed=41), tmp_path / "study")
    pixels = {}
    for backend, extra in (("onnxruntime", {}), ("triton", {"url": server.url, "triton_model": "ref"})):
        raw = {
            "node": {"data_dir": str(tmp_path / backend)},
            "destinations": [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}],
            "routes": [{"name": "chest", "match": {"Modality": "DX"}, "pixels": "anonymize", "model": "m", "allow_demonstration_model": True, "destinations": ["out"]}],
            "models": [{"name": "m", "path": str(bundle.path), "backend": backend, **extra}],
        }
        settings = parse(raw, "test", base_dir=tmp_path)
        settings.node.data_dir.mkdir(parents=True)
        step = EnginePixelStep(settings)
        step.warm()
        assert not step.errors and step.models["m"].describe()["backend"] == backend
        items = [Item(job=None, source=dcmread(f)) for f in files]  # type: ignore[arg-type]
        step.process(items, settings.routes[0], Pseudonymizer(bytes(32)))
        step.models["m"].close()
        assert all(not it.error and it.outputs for it in items)
        pixels[backend] = [ds.pixel_array.astype(np.int64) for it in items for _, ds in it.outputs]
    assert len(pixels["triton"]) == len(pixels["onnxruntime"]) == 3
    for a, b in zip(pixels["triton"], pixels["onnxruntime"]):
        assert np.abs(a - b).max() <= 1  # one stored value at most (rounding of a float difference)


# -- the model repository -----------------------------------------------------------------
def read_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(path.read_text(), mc.ModelConfig())


def triton_repo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "engine", "triton-repo", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_triton_repo_writes_a_batched_onnxruntime_repository(bundle, tmp_path):
    out = tmp_path / "repo"
    r = triton_repo("--model", str(bundle.path), "--out", str(out), "--name", "ref", "--version", "3", "--graph", "anonymize", "--preferred", "8,32")
    assert r.returncode == 0, r.stderr
    folder = out / "ref_anonymize"
    assert (folder / "3" / "model.onnx").read_bytes() == bundle.export_path("anonymize").read_bytes()
    c = read_config(folder / "config.pbtxt")
    assert c.name == "ref_anonymize" and c.backend == "onnxruntime" and c.max_batch_size == 128
    assert {t.name: list(t.dims) for t in c.input} == {"image": [1, 64, 64], "noise": [bundle.config.vae_latent]}
    assert [(t.name, list(t.dims)) for t in c.output] == [("output", [1, 64, 64])]
    assert list(c.dynamic_batching.preferred_batch_size) == [8, 32] and c.dynamic_batching.max_queue_delay_microseconds == 1000
    assert list(c.version_policy.specific.versions) == [3]
    assert c.parameters["casemask_weights"].string_value == bundle.weights_digest()
    assert not c.optimization.execution_accelerators.gpu_execution_accelerator and not c.model_warmup
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_the_runner_accepts_what_triton_repo_writes_and_refuses_other_weights(bundle):
    """The repository's config, as the server would return it, passes the runner's checks;
    the same config naming other weights does not."""
    from engine.runtime.triton import TritonRunner
    from engine.runtime.triton_repo import RepoOptions, model_config

    inputs, outputs = graph_specs(bundle, "anonymize")
    config = model_config(bundle, "anonymize", RepoOptions(name="ref", max_batch=64), "0" * 64)
    runner = TritonRunner(TritonTarget("gpu-host:8001", "ref"), "anonymize", inputs, outputs, weights_digest=bundle.weights_digest())
    runner._check_config(config)
    assert runner.max_batch == 64 and set(runner.wire_dtypes) == {"image", "noise", "output"}
    config.parameters["casemask_weights"].string_value = "0123456789abcdef"
    with pytest.raises(RunnerError, match="was made from weights 0123456789abcdef"):
        runner._check_config(config)


def test_triton_repo_tensorrt_accelerator_in_fp16(bundle, tmp_path):
    r = triton_repo("--model", str(bundle.path), "--out", str(tmp_path), "--name", "ref", "--accelerator", "tensorrt", "--fp16", "--trt-cache-path", "/models/.trt")
    assert r.returncode == 0, r.stderr
    from engine.graphs import NODE_GRAPHS

    for graph in NODE_GRAPHS:  # the node's graphs by default
        c = read_config(tmp_path / f"ref_{graph}" / "config.pbtxt")
        (acc,) = c.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
        assert acc.parameters["trt_engine_cache_enable"] == "1" and acc.parameters["trt_engine_cache_path"] == "/models/.trt"
        (warm,) = c.model_warmup  # engines are built at load, not on the first request
        assert warm.batch_size == 128 and set(warm.inputs) == {t.name for t in c.input}


def test_triton_repo_refuses_bad_options_with_what_to_write(bundle, tmp_path):
    r = triton_repo("--model", str(bundle.path), "--out", str(tmp_path), "--name", "ref", "--fp16", "--preferred", "256", "--version", "0")
    assert r.returncode != 0
    for hint in ("--fp16 needs --accelerator tensorrt", "--preferred 256: batch sizes from 1 to --max-batch 128", "--version 0"):
        assert hint in r.stderr
    assert not list(tmp_path.iterdir())


def test_triton_repo_plan_needs_tensorrt(bundle, tmp_path):
    from engine.runtime import unavailable

    if unavailable("tensorrt") is None:
        pytest.skip("TensorRT is available here: the plan is built (see test_runtime)")
    r = triton_repo("--model", str(bundle.path), "--out", str(tmp_path), "--name", "ref", "--format", "plan")
    assert r.returncode != 0 and "--format plan builds a TensorRT engine here" in r.stderr and "tensorrt is not installed" in r.stderr


# -- settings -------------------------------------------------------------------------------
def test_models_settings_for_triton():
    from node.config import ConfigError, parse

    base = {"destinations": [{"name": "a", "kind": "folder", "path": "out"}]}
    s = parse({**base, "models": [{"name": "ref", "backend": "triton", "url": "gpu-host:8001", "triton_model": "reference", "triton_version": 2}]}, base_dir=ROOT)
    t = s.model("ref").triton_target()
    assert t == TritonTarget("gpu-host:8001", "reference", version=2)
    assert parse({**base, "models": [{"name": "ref", "backend": "triton", "url": "gpu-host:8001"}]}).model("ref").triton_target().model == "ref"
    with pytest.raises(ConfigError) as info:
        parse({**base, "models": [{"name": "a", "backend": "triton"}, {"name": "b", "backend": "triton", "url": "http://gpu-host:8000"}, {"name": "c", "backend": "onnxruntime", "url": "gpu-host:8001"}]})
    text = str(info.value)
    assert "backend = \"triton\" needs url = \"host:port\"" in text
    assert "url = 'http://gpu-host:8000'" in text and "gRPC" in text
    assert "url is used by backend = \"triton\" only" in text
