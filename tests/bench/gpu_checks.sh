#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call (run from the repository root):
#
#     OUT=gpu-out PY=python3 bash tests/bench/gpu_checks.sh
#
# 1. versions: the GPU, its driver, torch and its CUDA, ONNX Runtime and its providers,
#    TensorRT if any;
# 2. tests/test_runtime.py: the CUDA parity tests (torch CUDA fp32 with TF32 off and fp16,
#    ONNX Runtime CUDA, TensorRT: each runs where the machine has it, else skips with the
#    reason) and the rest of the runtime tests. --noconftest: the node's fixtures (pydicom,
#    pynetdicom) are not needed here and may not be installed on a GPU image;
# 3. what TF32 does to float32 on this GPU: torch CUDA against the CPU in float32, with
#    TF32 allowed (cuDNN's default) and not (what TorchRunner and TensorRTRunner do);
# 4. tests/bench/bench_engine.py on every backend available there.
# Everything goes to $OUT (env.txt, pytest.txt, tf32.txt, bench_engine.txt); each step is bounded.
set -u
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" - <<'PYEOF'
import numpy, onnx, onnxruntime as ort, torch
print("python numpy", numpy.__version__, "onnx", onnx.__version__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
print("onnxruntime", ort.__version__, ort.get_available_providers())
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except ImportError as exc:
    print("tensorrt: not installed:", exc)
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${PYTEST_S:-240}" "$PY" -m pytest --noconftest -q -rs tests/test_runtime.py 2>&1 | tee "$OUT/pytest.txt"
timeout 90 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/tf32.txt"
import numpy as np
import torch

from engine import bundle as bundles
from engine.export import graph_specs, random_feed
from engine.model import GRAPHS

b = bundles.load("builtin:reference")
inputs, _ = graph_specs(b, "anonymize")
feed = random_feed(inputs, 64, seed=3)
module = GRAPHS["anonymize"](b.load_torch()).eval()
with torch.no_grad():
    ref = module(*(torch.from_numpy(v) for v in feed.values())).numpy()
gpu = module.cuda()
for tf32 in (True, False, True):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    with torch.no_grad():
        out = gpu(*(torch.from_numpy(v).cuda() for v in feed.values())).cpu().numpy()
    print(f"anonymize, 64 images, torch CUDA float32, TF32 {'allowed' if tf32 else 'off    '}: max |GPU - CPU float32| = {np.abs(out - ref).max():.2e}")
PYEOF
timeout "${BENCH_S:-240}" "$PY" tests/bench/bench_engine.py --seconds "${SECONDS_PER:-3}" --rounds 3 \
  --backends "${BACKENDS:-torch,onnxruntime,torch-cuda,onnxruntime-cuda,tensorrt}" --batches "${BATCHES:-1,8,32,128,512}" 2>&1 | tee "$OUT/bench_engine.txt"
