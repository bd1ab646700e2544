"""Runtimes: ONNX export, one Runner interface, parity between backends."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engine import bundle as bundles
from engine.export import export_graph, graph_specs, random_feed
from engine.model import GRAPHS
from engine.runtime import RunnerError, choose, make_runner, unavailable
from engine.runtime.backends import OnnxRuntimeRunner, TorchRunner

# Tolerances against PyTorch float32 on the same inputs (images are in [-1, 1]).
FP32_ATOL = 1e-4
FP16_ATOL = 2e-2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A private copy of the reference bundle, so exports do not touch the shipped one."""
    dst = tmp_path_factory.mktemp("bundle") / "reference"
    shutil.copytree(bundles.resolve("builtin:reference"), dst, ignore=shutil.ignore_patterns("onnx", "plans"))
    return bundles.load(dst)


def torch_reference(bundle, graph, feed):
    module = GRAPHS[graph](bundle.load_torch()).eval()
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feed.values()))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_export_is_checked_and_onnxruntime_matches_torch_fp32(bundle, graph):
    path = export_graph(bundle, graph)
    assert path.exists()
    inputs, outputs = graph_specs(bundle, graph)
    feed = random_feed(inputs, 7, seed=99)  # fresh inputs, not the export's own
    ref = torch_reference(bundle, graph, feed)
    with OnnxRuntimeRunner(path, inputs, outputs) as r:
        got = r.infer(feed)
    for spec, want in zip(outputs, ref):
        assert np.abs(got[spec.name] - want).max() <= FP32_ATOL


def test_an_export_never_outlives_the_weights_it_was_made_from(tmp_path):
    from engine.model import DisentanglementModel, ModelConfig

    cfg = ModelConfig(image_size=32, width=8, other_dim=8, n_identities=4)
    torch.manual_seed(0)
    first = bundles.save(DisentanglementModel(cfg).eval(), tmp_path / "b", {"name": "b"})
    r, _ = make_runner(first, "reconstruct", "onnxruntime")  # exported on first use
    old = first.export_path("reconstruct")
    assert old.exists() and old.parent == tmp_path / "b" / "onnx" and first.weights_digest() in old.name
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32)
    with r:
        before = r.infer({"image": x})["output"]
    # New weights arrive beside the old export (as an update of a checkout would bring
    # them, where exports are not tracked): they get their own export, never the old one.
    torch.manual_seed(1)
    other = bundles.save(DisentanglementModel(cfg).eval(), tmp_path / "c", {"name": "b"})
    for name in ("weights.pt", "model.json"):
        shutil.copy(other.path / name, tmp_path / "b" / name)
    second = bundles.load(tmp_path / "b")
    assert old.exists() and second.export_path("reconstruct") != old
    r, _ = make_runner(second, "reconstruct", "onnxruntime")
    with r:
        after = r.infer({"image": x})["output"]
    want = torch_reference(second, "reconstruct", {"image": x})[0]
    assert np.abs(after - want).max() <= FP32_ATOL and not np.allclose(after, before, atol=1e-3)


def test_torch_runner_passes_a_failing_model_s_own_error_on(bundle):
    inputs, outputs = graph_specs(bundle, "anonymize")

    class Broken(torch.nn.Module):
        def forward(self, image, noise):
            raise RuntimeError("the model itself failed")

    with TorchRunner(Broken(), inputs, outputs) as r, pytest.raises(RuntimeError, match="the model itself failed"):
        r.infer(random_feed(inputs, 2, seed=1))


def test_runner_checks_inputs(bundle):
    r, _ = make_runner(bundle, "reconstruct", "torch")
    with pytest.raises(RunnerError, match="not active"):
        r.infer({"image": np.zeros((1, 1, 64, 64), np.float32)})
    with r:
        with pytest.raises(RunnerError, match="dtype"):
            r.infer({"image": np.zeros((1, 1, 64, 64), np.float64)})
        with pytest.raises(RunnerError, match="shape"):
            r.infer({"image": np.zeros((1, 1, 32, 32), np.float32)})
        with pytest.raises(RunnerError, match="inputs"):
            r.infer({"img": np.zeros((1, 1, 64, 64), np.float32)})


def test_infer_splits_any_batch_into_the_built_batch_size(bundle):
    inputs, outputs = graph_specs(bundle, "anonymize")
    feed = random_feed(inputs, 37, seed=3)
    onnx = export_graph(bundle, "anonymize")
    with OnnxRuntimeRunner(onnx, inputs, outputs, max_batch=8) as small, OnnxRuntimeRunner(onnx, inputs, outputs, max_batch=64) as big:
        a, b = small.infer(feed)["output"], big.infer(feed)["output"]
    assert a.shape == (37, 1, 64, 64)
    assert np.abs(a - b).max() <= FP32_ATOL


def spinning(runner):
    """The session's allow_spinning entry, or None where the runner left the default."""
    try:
        return runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:
        return None


def test_spin_false_lets_onnxruntime_workers_sleep_and_changes_no_output(bundle):
    inputs, outputs = graph_specs(bundle, "reconstruct")
    feed = random_feed(inputs, 5, seed=11)
    onnx = export_graph(bundle, "reconstruct")
    with OnnxRuntimeRunner(onnx, inputs, outputs, spin=False) as quiet, OnnxRuntimeRunner(onnx, inputs, outputs) as busy:
        assert spinning(quiet) == "0"
        assert spinning(busy) is None  # ONNX Runtime's default: workers spin
        a, b = quiet.infer(feed)["output"], busy.infer(feed)["output"]
    assert np.array_equal(a, b)


def test_auto_takes_the_fastest_available_and_says_why_it_skipped_the_others(monkeypatch):
    import engine.runtime as runtime

    def only(*available):
        monkeypatch.setattr(runtime, "unavailable", lambda b: None if b in available else f"no {b} here")

    only("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime", "torch")
    assert choose("auto") == runtime.Choice("tensorrt", "fastest available")
    only("torch-cuda", "onnxruntime", "torch")
    c = choose("auto")
    assert c.backend == "torch-cuda" and c.why == "tensorrt: no tensorrt here; onnxruntime-cuda: no onnxruntime-cuda here"
    only("onnxruntime", "torch")
    assert choose("auto").backend == "onnxruntime"
    only("torch")
    c = choose("auto")
    assert c.backend == "torch" and c.why.count("no ") == 4
    only()
    with pytest.raises(RunnerError, match="no backend is available"):
        choose("auto")


def test_auto_on_a_machine_without_a_gpu_is_onnxruntime_on_the_cpu():
    if not unavailable("tensorrt") or not unavailable("onnxruntime-cuda") or torch.cuda.is_available():
        pytest.skip("this machine has a GPU backend; auto rightly prefers it")
    c = choose("auto")
    assert c.backend == "onnxruntime"
    assert all(f"{b}:" in c.why for b in ("tensorrt", "onnxruntime-cuda", "torch-cuda"))


def test_asking_for_a_missing_backend_is_a_clear_error():
    why = unavailable("tensorrt")
    if why is None:
        pytest.skip("tensorrt is available here")
    with pytest.raises(RunnerError, match="tensorrt is not available"):
        choose("tensorrt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_torch_cuda_fp32_and_fp16_parity(bundle):
    inputs, outputs = graph_specs(bundle, "anonymize")
    feed = random_feed(inputs, 16, seed=5)
    ref = torch_reference(bundle, "anonymize", feed)[0]
    module = GRAPHS["anonymize"](bundle.load_torch())
    with TorchRunner(module, inputs, outputs, device="cuda") as r:
        assert np.abs(r.infer(feed)["output"] - ref).max() <= 1e-3
    module = GRAPHS["anonymize"](bundle.load_torch())
    with TorchRunner(module, inputs, outputs, device="cuda", half=True) as r:
        assert np.abs(r.infer(feed)["output"] - ref).max() <= FP16_ATOL


@pytest.mark.skipif(unavailable("onnxruntime-cuda") is not None, reason=f"onnxruntime CUDA not available: {unavailable('onnxruntime-cuda')}")
def test_onnxruntime_cuda_parity(bundle):
    inputs, outputs = graph_specs(bundle, "anonymize")
    feed = random_feed(inputs, 16, seed=6)
    ref = torch_reference(bundle, "anonymize", feed)[0]
    r, _ = make_runner(bundle, "anonymize", "onnxruntime-cuda")
    with r:
        assert np.abs(r.infer(feed)["output"] - ref).max() <= 1e-3


@pytest.mark.skipif(unavailable("tensorrt") is not None, reason=f"TensorRT not available: {unavailable('tensorrt')}")
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_parity_and_a_second_build_reuses_the_plan(bundle, fp16):
    inputs, outputs = graph_specs(bundle, "anonymize")
    feed = random_feed(inputs, 16, seed=7)
    ref = torch_reference(bundle, "anonymize", feed)[0]
    first, _ = make_runner(bundle, "anonymize", "tensorrt")
    first.fp16 = fp16
    plan = first.build()
    built = plan.stat().st_mtime_ns
    with first:
        got = first.infer(feed)["output"]
    assert first.builds <= 1  # 0 when an earlier run of this test left the plan
    # fp32 (TF32 off) is held to the same bound as torch on CUDA in float32.
    assert np.abs(got - ref).max() <= (FP16_ATOL if fp16 else 1e-3)
    second, _ = make_runner(bundle, "anonymize", "tensorrt")
    second.fp16 = fp16
    with second:
        again = second.infer(feed)["output"]
    assert second.builds == 0 and second.build() == plan and plan.stat().st_mtime_ns == built
    assert np.array_equal(again, got)
    assert not [p for p in plan.parent.iterdir() if p.name.endswith(".tmp")]


# -- the plan cache, without TensorRT ----------------------------------------------------
def test_plan_key_names_everything_a_plan_depends_on():
    from engine.runtime.plans import GpuInfo, plan_key

    h100, h200 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 132), GpuInfo("NVIDIA H200", "9.0", 132)
    base = dict(onnx_sha256="a" * 16, trt_version="10.9.0", gpu=h100, fp16=False, profile=(1, 32, 128))
    key = plan_key(**base)
    assert plan_key(**base) == key and len(key) == 20
    variants = [
        {"onnx_sha256": "b" * 16}, {"trt_version": "10.9.1"}, {"gpu": h200}, {"gpu": GpuInfo(h100.name, "8.0", 132)},
        {"gpu": GpuInfo(h100.name, "9.0", 114)}, {"fp16": True}, {"profile": (1, 16, 128)},
    ]
    keys = {plan_key(**{**base, **v}) for v in variants}
    assert key not in keys and len(keys) == len(variants)


BUILD_SCRIPT = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from engine.runtime.plans import PlanCache
folder, go = Path(sys.argv[2]), Path(sys.argv[3])
for _ in range(600):
    if go.exists():
        break
    time.sleep(0.01)

def build():
    with open(folder / "builds.log", "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)
    return b"plan-bytes" * 1000

cache = PlanCache(folder)
path = cache.get("graph-key.plan", build)
print(path.name, cache.builds, path.read_bytes() == b"plan-bytes" * 1000)
"""


def test_plan_cache_builds_once_across_processes_and_a_second_build_reuses_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from engine.runtime.plans import PlanCache

    root = str(Path(__file__).resolve().parent.parent)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, root, str(tmp_path), str(go)], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    go.touch()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[1] for o in outs) == ["0", "0", "1"]  # one process built, two waited and reused
    assert all(o[0] == "graph-key.plan" and o[2] == "True" for o in outs)
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    plan = tmp_path / "graph-key.plan"
    built = plan.stat().st_mtime_ns
    later = PlanCache(tmp_path)
    assert later.get("graph-key.plan", lambda: pytest.fail("built again")) == plan
    assert later.builds == 0 and plan.stat().st_mtime_ns == built
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_build_leaves_no_plan_and_the_next_one_builds(tmp_path):
    from engine.runtime.plans import PlanCache

    cache = PlanCache(tmp_path)

    def broken() -> bytes:
        raise RunnerError("TensorRT failed to build the engine")

    with pytest.raises(RunnerError):
        cache.get("g.plan", broken)
    assert not (tmp_path / "g.plan").exists() and cache.builds == 0
    assert cache.get("g.plan", lambda: b"ok").read_bytes() == b"ok" and cache.builds == 1


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    """Plans and timing caches are replaced while other processes may write them too."""
    import threading

    from engine.runtime.plans import write_atomic

    target = tmp_path / "timing-abc.cache"
    payloads = [bytes([k]) * 200_000 for k in range(4)]
    errors = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(50):
                write_atomic(target, data)
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert target.read_bytes() in payloads  # one writer's whole file, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_fp16_export_for_strongly_typed_tensorrt_matches_torch_fp32(bundle):
    """The float16 graph TensorRT 11 builds strongly typed; ONNX Runtime runs it on CPU."""
    import onnx
    import onnxruntime as ort

    path = export_graph(bundle, "anonymize", half=True)
    proto = onnx.load(str(path))
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in proto.graph.input)
    inputs, _ = graph_specs(bundle, "anonymize")
    feed = random_feed(inputs, 9, seed=21)
    ref = torch_reference(bundle, "anonymize", feed)[0]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.astype(np.float16) for k, v in feed.items()})[0].astype(np.float32)
    assert np.abs(got - ref).max() <= FP16_ATOL
