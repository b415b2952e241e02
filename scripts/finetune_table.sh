#!/usr/bin/env bash
# The finetuning table of docs/LOG.md (issue 15), beside the comparison of scripts/compare_methods.sh
# (same folder, same data, so the finetune=none rows are that comparison's and are not rerun):
# VPTQ with finetune=none | layer | e2e at 2 and 3 bits, every method with and without e2e at 2 bits,
# and a paper Table 8-style 3-bit configuration (outlier columns with their own codebook + a residual
# codebook: 3.113 bits/weight realized on the bundled model, runners/plan.py), 3 seeds each; and VPTQ's
# `scaled` variant with e2e at 2 and 3 bits, at 3 bits also on 64 e2e windows (finetune.nsamples=64:
# the 3-bit target's candidate, docs/LOG.md 2026-12-07).
#
#   [WORKERS=2] [ONLY="0 3 7:1"] [SEEDS="0 1 2"] scripts/finetune_table.sh [OUT]   (default OUT: outputs/compare13)
#
# The table is a queue of units (item, seed): every item of ITEMS (in priority order: the rows the issue's
# targets are read from first) at the first seed, then every item at the next seed, so a run cut short
# (a session's end kills its jobs) leaves one seed of every row rather than three of a few. WORKERS
# one-thread workers take the next unclaimed unit each, so the lanes stay balanced (a finetune=layer job
# takes ~45 min on one thread, an e2e job 15-40 min). ONLY: just these units, in this order ("7": item 7
# at every seed of SEEDS; "7:1": item 7 at seed 1).
# Their quantization and finetuning times are not quiet timings (time.other_cpu_cores and
# finetune.other_cpu_cores in each metrics.json; benchmarks/finetune_bench.py times e2e quietly).
# A rerun skips finished jobs and a job cut off resumes from its quantized blocks (quantize.checkpoint), so
# the script can be stopped and resumed. ~17 h of worker time on a 2-core AMD EPYC in all.
# Then: .venv/bin/python analysis/report.py OUT
set -u -f
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-outputs/compare13}
WORKERS=${WORKERS:-2}
# results_root=OUT: a job counts as finished only if it is in OUT (trials elsewhere under outputs/ with the same
# run key are not taken for the table's rows; the kept blocks go to OUT/checkpoints)
COMMON="data=text data.path=../shared/data/wikitext-2 logger=none hydra.sweep.dir=$OUT results_root=$OUT"
# jobs that keep their blocks (quantize.keep_checkpoints) share them with the later jobs of the same item
# (the same quantization key); they sit in one item so that two workers never write one checkpoint folder
KEEP="quantize.keep_checkpoints=true"
TABLE8="method.vector_len=4 method.num_centroids=256 method.num_res_centroids=16 method.outlier_size=16
        method.outlier_vector_len=4 method.outlier_num_centroids=256"
# one item: sweeps separated by ';;' (newlines are spaces), run in order by one worker at one seed
ITEMS=(
  "method=vptq finetune=e2e bits=2"                                                                # 0
  "method=vptq method.variant=scaled finetune=e2e finetune.nsamples=64 bits=3 $KEEP ;;
   method=vptq method.variant=scaled finetune=e2e bits=3 $KEEP"                                    # 1
  "method=vptq finetune=e2e bits=3"                                                                # 2
  "method=vptq finetune=layer bits=2"                                                              # 3
  "method=vptq finetune=layer bits=3"                                                              # 4
  "method=gptvq finetune=e2e bits=2"                                                               # 5
  "method=aqlm finetune=e2e bits=2"                                                                # 6
  "method=gptq finetune=e2e bits=2"                                                                # 7
  "method=rtn finetune=e2e bits=2"                                                                 # 8
  "method=vptq bits=3 $TABLE8 $KEEP ;; method=vptq finetune=e2e bits=3 $TABLE8 $KEEP"              # 9
  "method=vptq method.variant=scaled finetune=e2e bits=2"                                          # 10
)
SEEDS=${SEEDS:-0 1 2}
if [ -z "${ONLY:-}" ]; then  # seed-major: every item at seed 0, then at seed 1, ...
  ONLY=$(for s in $SEEDS; do for i in "${!ITEMS[@]}"; do printf '%s:%s ' "$i" "$s"; done; done)
fi
UNITS=$(for u in $ONLY; do  # checked once here, not by every worker
  i=${u%%:*}
  [[ $i =~ ^[0-9]+$ && -n "${ITEMS[$i]+x}" ]] || { echo "no item $i (items 0-$((${#ITEMS[@]} - 1)))" >&2; continue; }
  if [[ $u == *:* ]]; then seeds=${u#*:}; else seeds=$SEEDS; fi
  for s in $seeds; do
    [[ $s =~ ^[0-9]+$ ]] || { echo "bad seed '$s' in '$u' (ONLY entries: ITEM or ITEM:SEED)" >&2; continue; }
    echo "$i:$s"
  done
done)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
CLAIMS=$(mktemp -d)  # this invocation's claims: mkdir is atomic, so each unit goes to one worker
trap 'rm -rf "$CLAIMS"' EXIT

worker() {
  local u i s sweep
  for u in $UNITS; do
    i=${u%%:*} s=${u#*:}
    mkdir "$CLAIMS/$i-$s" 2>/dev/null || continue
    echo "== $(date -u '+%F %T') worker $1 of process $$ takes item $i seed $s (log: $OUT/finetune_item_$i.log)"
    while read -r sweep; do
      # shellcheck disable=SC2086  # word splitting wanted: the items are override lists
      [ -n "$sweep" ] && $PY runners/run.py -m $sweep seed=$s $COMMON < /dev/null >> "$OUT/finetune_item_$i.log" 2>&1
    done < <(printf '%s' "${ITEMS[$i]}" | tr '\n' ' ' | sed 's/;;/\n/g'; echo)
  done
}
for w in $(seq 1 "$WORKERS"); do
  worker "$w" &
done
wait
$PY analysis/report.py "$OUT"
