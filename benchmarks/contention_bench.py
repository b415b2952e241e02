"""Quantization beside a busy process: does a shared CPU slow a job down, or collapse it?

For each method, the 2-bit quantization of the bundled model (SmolLM2-135M, 8 calibration windows of
512 tokens by default) runs twice, back to back, each in a fresh process (`runners/run.py`): once on
a quiet machine, once beside one CPU-bound process (a Python `while True: pass`, the worst ordinary
neighbour: it never sleeps). Printed per method: the quantization wall time of both (metrics.json
time.quantize_s), their ratio, and whether the codes are identical (metrics.json codes_sha256: a busy
neighbour must change the time, never the result). Goal: every ratio <= 1.5.

    .venv/bin/python benchmarks/contention_bench.py [--methods rtn,gptq,gptvq,aqlm,vptq] [--nsamples 8]
        [--order quiet-first|busy-first] [extra overrides ...]

Run it on an otherwise quiet machine: anything else running changes both numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL = 1.5


def run_job(method: str, nsamples: int, extra, root: str) -> dict:
    args = [f"method={method}", "bits=2", "logger=none", f"calib.nsamples={nsamples}", "eval.max_windows=1",
            f"results_root={root}", f"hydra.run.dir={root}/run", "resume=false", "quantize.checkpoint=false", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    r = subprocess.run([sys.executable, os.path.join(REPO, "runners", "run.py"), *args], cwd=REPO, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{method}: the job failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(root, "run", "metrics.json")) as f:
        return json.load(f)


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(method: str, nsamples: int, extra, busy: bool) -> dict:
    root = tempfile.mkdtemp(prefix=f"contention_{method}_")
    hog = busy_process() if busy else None
    try:
        if hog:
            time.sleep(1.0)  # let it reach full speed
        m = run_job(method, nsamples, extra, root)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    return {"quantize_s": m["time"]["quantize_s"], "codes": m.get("codes_sha256"),
            "threads": m["env"].get("quantize_threads")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="rtn,gptq,gptvq,aqlm,vptq")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--order", choices=("quiet-first", "busy-first"), default="quiet-first")
    args, extra = ap.parse_known_args(argv)
    sys.path.insert(0, REPO)
    from runners.metrics import cpu_summary

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {cpu_summary()} | python "
          f"{platform.python_version()} | bundled model, bits=2, {args.nsamples} x 512 calibration tokens", flush=True)
    print("| method | quiet (s) | beside a busy process (s) | ratio | codes identical | threads (block passes / layers) |")
    print("|---|---:|---:|---:|---|---|")
    worst = 0.0
    for method in args.methods.split(","):
        order = (False, True) if args.order == "quiet-first" else (True, False)
        res = {busy: measure(method, args.nsamples, extra, busy) for busy in order}
        q, b = res[False], res[True]
        ratio = b["quantize_s"] / max(q["quantize_s"], 1e-9)
        worst = max(worst, ratio)
        th = q["threads"] or {}
        print(f"| {method} | {q['quantize_s']:.1f} | {b['quantize_s']:.1f} | {ratio:.2f} | "
              f"{'yes' if q['codes'] == b['codes'] else 'NO'} | {th.get('block_passes')} / {th.get('quantize_layer')} |",
              flush=True)
    print(f"worst ratio busy/quiet: {worst:.2f} (goal <= {GOAL})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
