#!/usr/bin/env bash
# The finetuning table of docs/LOG.md (issue 15), beside the comparison of scripts/compare_methods.sh
# (same folder, same data, so the finetune=none rows are that comparison's and are not rerun):
# VPTQ with finetune=none | layer | e2e at 2 and 3 bits, every method with and without e2e at 2 bits,
# and a paper Table 8-style 3-bit configuration (outlier columns with their own codebook + a residual
# codebook: 3.113 bits/weight realized on the bundled model, runners/plan.py), 3 seeds each; and VPTQ's
# `scaled` variant with e2e at 2 and 3 bits, at 3 bits also on 64 e2e windows (finetune.nsamples=64:
# the 3-bit target's candidate, docs/LOG.md 2026-12-07).
#
#   scripts/finetune_table.sh [OUT]    (default OUT: outputs/compare13)
#
# Two lanes side by side, each on ONE thread (their quantization and finetuning times are not quiet
# timings: time.other_cpu_cores in each metrics.json; benchmarks/finetune_bench.py times e2e quietly).
# A rerun skips finished jobs, so the script can be stopped and resumed. ~13 h of lane time on a
# 2-core AMD EPYC (one e2e job ~15-25 min on one thread, twice that on 64 windows). Then: .venv/bin/python analysis/report.py OUT
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-outputs/compare13}
# results_root=OUT: a job counts as finished only if it is in OUT (trials elsewhere under outputs/ with the same
# run key are not taken for the table's rows; the kept blocks go to OUT/checkpoints)
COMMON=(data=text data.path=../shared/data/wikitext-2 logger=none "hydra.sweep.dir=$OUT" "results_root=$OUT")
# the Table 8-style jobs keep their blocks: its e2e jobs load the blocks its finetune=none jobs quantized
KEEP=(quantize.keep_checkpoints=true)
TABLE8=(method.vector_len=4 method.num_centroids=256 method.num_res_centroids=16 method.outlier_size=16
        method.outlier_vector_len=4 method.outlier_num_centroids=256)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"

lane_a() {
  # first the rows the issue's targets are read from (2-bit VPTQ + e2e), then the rest
  $PY runners/run.py -m method=vptq finetune=e2e bits=2,3 seed=0,1,2 "${COMMON[@]}"
  $PY runners/run.py -m method=vptq bits=3 seed=0,1,2 "${TABLE8[@]}" "${KEEP[@]}" "${COMMON[@]}"
  $PY runners/run.py -m method=vptq finetune=e2e bits=3 seed=0,1,2 "${TABLE8[@]}" "${KEEP[@]}" "${COMMON[@]}"
  $PY runners/run.py -m method=gptq,rtn finetune=e2e bits=2 seed=0,1,2 "${COMMON[@]}"
  $PY runners/run.py -m method=vptq method.variant=scaled finetune=e2e bits=2 seed=0,1,2 "${COMMON[@]}"
}
lane_b() {
  # blocks kept, so the scaled e2e jobs on 32 and on 64 windows load the same quantized blocks (same lane:
  # never two jobs writing one checkpoint folder); the 64-window rows first (the 3-bit target's)
  $PY runners/run.py -m method=vptq method.variant=scaled finetune=e2e finetune.nsamples=64 bits=3 seed=0,1,2 \
      "${KEEP[@]}" "${COMMON[@]}"
  $PY runners/run.py -m method=vptq finetune=layer bits=2,3 seed=0,1,2 "${COMMON[@]}"
  $PY runners/run.py -m method=gptvq,aqlm finetune=e2e bits=2 seed=0,1,2 "${COMMON[@]}"
  $PY runners/run.py -m method=vptq method.variant=scaled finetune=e2e bits=3 seed=0,1,2 "${KEEP[@]}" "${COMMON[@]}"
}
lane_a > "$OUT/finetune_lane_a.log" 2>&1 &
lane_b > "$OUT/finetune_lane_b.log" 2>&1 &
wait
$PY analysis/report.py "$OUT"
