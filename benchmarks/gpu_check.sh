#!/usr/bin/env bash
# One device call: (1) the kernel tests compiled on the GPU (not interpreted), (2) the kernel
# benchmark. Needs only python3 with torch + triton + pytest (no Hydra): PYTHONPATH=. from the
# repo root. Everything it writes lands in $OUT (tests.log, bench.log, kernel_bench.{json,md}).
#   bash benchmarks/gpu_check.sh [BENCH_DEADLINE_S] [BENCH_ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
DEADLINE=${1:-150}
shift || true
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
# the tests use each kernel's default blocks (no autotuning: that is the benchmark's job)
VQ_KERNEL_TUNE=0 timeout 170 python3 -m pytest tests/test_kernels.py tests/test_throughput.py -k "not harness" \
    -q -p no:cacheprovider $XDIST -rf 2>&1 | tee "$OUT/tests.log" | tail -25
echo "tests rc=${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
timeout $(( DEADLINE + 60 )) python3 benchmarks/kernel_bench.py --out "$OUT" --deadline "$DEADLINE" --workers 8 "$@" \
    2>&1 | grep -v -i "warn" | tee "$OUT/bench.log" | grep -v "^ *[23]b-" | tail -45
echo "bench rc=${PIPESTATUS[0]}; total $(( $(date +%s) - t0 )) s"
# if time is left: 16 tokens (the largest decode batch, tl.dot path) on the 7B shapes
if [ $(( $(date +%s) - t0 )) -lt 280 ]; then
    mkdir -p "$OUT/t16"
    timeout 90 python3 benchmarks/kernel_bench.py --out "$OUT/t16" --configs 2b-v6k4096,3b-v4k4096 --shapes 7b \
        --tokens 16 --deadline 50 --workers 4 2>&1 | grep "^| [23]b-"
fi
echo "done after $(( $(date +%s) - t0 )) s"
