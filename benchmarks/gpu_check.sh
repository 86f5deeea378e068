#!/usr/bin/env bash
# One H100/H200, under 10 minutes: per-rank compute time, NVML energy and GEMM efficiency of one
# phantom layer rank against one TP layer rank (n = 8192..32768, p = 8..64, bf16, fwd + bwd); then,
# when megatron-core is installed, megatron's own inference engine driving a small phantom GPT
# (benchmarks/gpu_inference_check.py, TP = min(2, GPUs), at most 2 minutes).
# Usage: benchmarks/gpu_check.sh [OUT_DIR] [extra args for gpu_layer_check.py]
# Writes OUT_DIR/gpu_layer_check.{json,md} (default benchmarks/results/gpu). Needs CUDA torch and
# nvidia-ml-py (pip install nvidia-ml-py); commit the results under benchmarks/results/ with the card named.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT_DIR=${1:-benchmarks/results/gpu}
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
try:
    import pynvml  # noqa: F401
except ImportError:
    print("WARNING: nvidia-ml-py not installed: energy will be reported as n/a")
PYEOF
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv || true
timeout 460 "$PY" benchmarks/gpu_layer_check.py --out "$OUT_DIR" "$@"
# Megatron-core's inference engines (KV cache, dynamic batching) with phantom MLPs: CUDA only, so
# never run in CI. Runs after the layer check so its results are written whatever happens here.
if "$PY" -c "import megatron.core" >/dev/null 2>&1; then
    NGPU=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
    rc=0
    timeout 120 "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" benchmarks/gpu_inference_check.py || rc=$?
    [ "$rc" -eq 0 ] || echo "gpu_inference_check: FAILED (exit $rc)"
    exit "$rc"
else
    echo "SKIPPED: megatron inference check (megatron-core not installed: pip install -e '.[megatron]')"
fi
