#!/usr/bin/env bash
# One H100/H200, under 10 minutes: (1) a smoke test of the plugin's own code on CUDA
# (benchmarks/gpu_smoke.py: simulated ranks of the phantom op against float64, bf16 and autocast,
# from_dense on the device, two gloo ranks with CUDA tensors, one >= 5 s energy window); (2) per-rank
# compute time, NVML energy and GEMM efficiency of one phantom layer rank (the real op, resident
# exchange) against one TP layer rank (n = 8192..32768, p = 8..64, bf16, fwd + bwd), with the
# labelled multi-GPU extrapolation; (3) when megatron-core is installed, megatron's own inference
# engine driving a small phantom GPT (benchmarks/gpu_inference_check.py, TP = min(2, GPUs), at most 2 minutes).
# Usage: benchmarks/gpu_check.sh [OUT_DIR] [extra args for gpu_layer_check.py]
# Writes OUT_DIR/gpu_smoke.json and OUT_DIR/gpu_layer_check.{json,md} (default benchmarks/results/gpu),
# each rewritten after every check / shape, so a timeout keeps what was measured. Needs CUDA torch
# and nvidia-ml-py (pip install nvidia-ml-py); commit the results under benchmarks/results/ with the card named.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT_DIR=${1:-benchmarks/results/gpu}
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PYEOF' || exit 1
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
try:
    import pynvml  # noqa: F401
except ImportError:
    print("WARNING: nvidia-ml-py not installed: energy will be reported as n/a")
PYEOF
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv || true
timeout 120 "$PY" benchmarks/gpu_smoke.py --out "$OUT_DIR"
smoke=$?
timeout 330 "$PY" benchmarks/gpu_layer_check.py --out "$OUT_DIR" --budget-s 270 "$@"
layer=$?
# Where one phantom rank's step spends its time (host vs device): a profiler table per shape.
timeout 60 "$PY" benchmarks/gpu_profile.py --out "$OUT_DIR" || layer=$?
# Forward only across GPUs (NCCL): phantom-bench --inference needs 2 GPUs; on one GPU the
# forward-only per-rank table of gpu_layer_check.md stands in for it.
bench=0
if [ "$("$PY" -c "import torch; print(torch.cuda.device_count())")" -ge 2 ]; then
    timeout 90 "$PY" -m phantom_plugin.cli.bench --inference --width 8192 --depth 4 --ranks 2 --ghosts 64 \
        --batch 4096 --dtype bf16 --steps 30 --no-progress --out "$OUT_DIR/inference" || bench=$?
else
    echo "SKIPPED: phantom-bench --inference across GPUs (needs 2 GPUs); forward-only per rank is in gpu_layer_check.md"
fi
# Megatron-core's inference engines (KV cache, dynamic batching) with phantom MLPs: CUDA only, so
# never run in CI. Runs after the layer check so its results are written whatever happens here.
engine=0
if "$PY" -c "import megatron.core" >/dev/null 2>&1; then
    NGPU=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
    timeout 120 "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" benchmarks/gpu_inference_check.py || engine=$?
    [ "$engine" -eq 0 ] || echo "gpu_inference_check: FAILED (exit $engine)"
else
    echo "SKIPPED: megatron inference check (megatron-core not installed: pip install -e '.[megatron]')"
fi
echo "gpu_smoke exit $smoke, gpu_layer_check exit $layer, phantom-bench --inference exit $bench, gpu_inference_check exit $engine (results in $OUT_DIR)"
exit $(( smoke != 0 || layer != 0 || bench != 0 || engine != 0 ))
