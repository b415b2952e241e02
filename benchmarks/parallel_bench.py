"""Serial vs layer-parallel quantization of the bundled model (float-model Hessians), side by side.

Runs the same job twice in fresh processes (`runners/run.py`, hessian.protocol=float, no resume):
once serially, once with `quantize.parallel=true` under local submitit processes (capture once, then
block jobs of `--blocks-per-job` blocks, at most 2 at a time, then assembly). Prints each run's wall
time (whole job and quantization), block forwards over the calibration set, cache bytes, the stage
times, and whether the two runs stored bitwise-identical codes (metrics.json codes_sha256) and
perplexity. Also prints L(L+1)/2, the block forwards of the earlier design, where every block job
rebuilt its inputs by running the float blocks before its own.

    .venv/bin/python benchmarks/parallel_bench.py [--method vptq] [--bits 2] [--nsamples 8]
        [--blocks-per-job 15] [extra overrides ...]

Run it on an otherwise quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, root):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(REPO, "runners", "run.py"), *args,
                        f"results_root={root}", f"hydra.run.dir={root}/run"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"job failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(root, "run", "metrics.json")) as f:
        return json.load(f), wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="vptq")
    ap.add_argument("--bits", default="2")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--blocks-per-job", type=int, default=15)
    a, extra = ap.parse_known_args(argv)
    sys.path.insert(0, REPO)
    from runners.metrics import cpu_summary

    base = [f"method={a.method}", f"bits={a.bits}", "logger=none", f"calib.nsamples={a.nsamples}",
            "eval.max_windows=8", "hessian.protocol=float", "resume=false", "eval.kld=false", *extra]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {cpu_summary()} | bundled model, "
          f"{a.method} {a.bits} b, {a.nsamples} x 512 calibration tokens, hessian.protocol=float", flush=True)
    res = {}
    for mode in ("serial", "parallel"):
        extra_mode = ["quantize.parallel=true", f"quantize.blocks_per_job={a.blocks_per_job}",
                      "quantize.executor=local"] if mode == "parallel" else []
        m, wall = run(base + extra_mode, tempfile.mkdtemp(prefix=f"par_bench_{mode}_"))
        res[mode] = (m, wall)
        c = m.get("cost") or {}
        print(f"{mode:8s} wall {wall:7.1f} s | quantize {m['time']['quantize_s']:7.1f} s | block forwards "
              f"{c.get('block_forwards')} | cache written {c.get('hessian_bytes_written', 0) / 1e6:.1f} MB, read "
              f"{c.get('hessian_bytes_read', 0) / 1e6:.1f} MB | stages {json.dumps({k: round(v, 1) for k, v in (c.get('stages_s') or {}).items()})}",
              flush=True)
    (ms, ws), (mp, wp) = res["serial"], res["parallel"]
    L = len(ms["time"]["per_block_s"])
    print(f"blocks L = {L}; the earlier design's block forwards L(L+1)/2 = {L * (L + 1) // 2}")
    print(f"codes identical: {ms['codes_sha256'] == mp['codes_sha256']} | perplexity identical: {ms['ppl'] == mp['ppl']}")
    print(f"parallel / serial wall time: {wp / ws:.2f} (quantization {mp['time']['quantize_s'] / ms['time']['quantize_s']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
