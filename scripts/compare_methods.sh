#!/usr/bin/env bash
# The five-method comparison of docs/LOG.md (issue 13): every method's reference variant (the
# authors' algorithm) and each improved variant beside it, 2 and 3 bits, 3 seeds, on the bundled
# model, calibrated and evaluated on the WikiText-2 files (32 x 512 test windows), CPU-sized
# iterations (iters=cpu, the default).
#
#   scripts/compare_methods.sh [OUT]    (default OUT: outputs/compare13)
#
# Two lanes run side by side, each on ONE thread (per-layer quantization is single-threaded on CPU,
# so two lanes use a 2-core machine fully): the quantization times of these runs are not quiet
# timings (each metrics.json records time.other_cpu_cores; the report marks them ‡). A rerun skips
# finished jobs; do not start two copies on one OUT (a job being run is not finished yet).
# ~6 h on a 2-core AMD EPYC. Then: .venv/bin/python analysis/report.py OUT
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-outputs/compare13}
COMMON=(data=text data.path=../shared/data/wikitext-2 logger=none "hydra.sweep.dir=$OUT" quantize.checkpoint=false)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"

lane_a() {
  $PY runners/run.py -m method=fp16 "${COMMON[@]}"
  $PY runners/run.py -m method=vptq,gptvq,gptq,rtn bits=2,3 seed=0,1,2 "${COMMON[@]}"
  $PY runners/run.py -m method=gptvq method.variant=exact bits=2,3 seed=0,1,2 "${COMMON[@]}"
  $PY runners/run.py -m method=vptq method.variant=scaled bits=2,3 seed=0,1,2 "${COMMON[@]}"
}
lane_b() {  # AQLM is the slowest method: its own lane
  $PY runners/run.py -m method=aqlm bits=2,3 seed=0,1,2 "${COMMON[@]}"
  $PY runners/run.py -m method=aqlm method.variant=weighted bits=2,3 seed=0,1,2 "${COMMON[@]}"
}
lane_a > "$OUT/lane_a.log" 2>&1 &
lane_b > "$OUT/lane_b.log" 2>&1 &
wait
$PY analysis/report.py "$OUT"
