"""What end-to-end finetuning costs: the default 2-bit job with `finetune=e2e` beside the same job
without finetuning, side by side in one run.

Two jobs of the runner (runners/run.py), each in its own process so that each reports its own peak
memory: the bundled model (SmolLM2-135M), method=vptq bits=2, the default calibration (pydoc,
32 x 512 tokens) and evaluation, `finetune=none` then `finetune=e2e` (its defaults:
runners.finetune.PRESETS). Both read their numbers from the job's metrics.json: the time of each
step (quantization, the e2e finetuning, evaluation), peak RSS up to the end of quantization, up to
the end of finetuning and for the whole job, peak GPU memory on a GPU, PPL and KL to the float model.
The float references (evaluation and calibration windows) go to a fresh cache folder: the first job
computes the evaluation's, the e2e job its calibration one (both listed, not in the step times).
Run it on a quiet machine (nothing else CPU-bound; docs/LOG.md measured 4.5x slower quantization
beside one other busy process).

    .venv/bin/python benchmarks/finetune_bench.py [--method vptq] [--bits 2] [-- extra overrides ...]
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


def _job(args, folder, mode, extra):
    d = os.path.join(folder, mode)
    cmd = [sys.executable, os.path.join(REPO, "runners", "run.py"), f"method={args.method}", f"bits={args.bits}",
           f"finetune={mode}", "logger=none", "resume=false", f"results_root={folder}", f"hydra.run.dir={d}",
           f"eval.kld_cache={os.path.join(folder, 'ref')}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    path = os.path.join(d, "metrics.json")
    if r.returncode != 0 or not os.path.isfile(path):
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"the finetune={mode} job failed (exit {r.returncode})")
    with open(path) as f:
        m = json.load(f)
    m["_wall_s"] = wall
    return m


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="vptq")
    ap.add_argument("--bits", default="2")
    ap.add_argument("--keep", default=None, help="folder for the two jobs' outputs (default: a temporary one)")
    ap.add_argument("extra", nargs="*", help="more overrides for both jobs (after --)")
    a = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import torch

    from runners.metrics import cpu_summary

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    model = "model from the overrides" if any(x.startswith("model=") for x in a.extra) else "bundled model"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {cpu_summary()}, {torch.get_num_threads()} "
          f"threads | {dev} | {model}, "
          f"method={a.method} bits={a.bits}, default calibration and evaluation"
          f"{' | ' + ' '.join(a.extra) if a.extra else ''} | load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.keep or tmp
        runs = {mode: _job(a, folder, mode, a.extra) for mode in ("none", "e2e")}
    n, e = runs["none"], runs["e2e"]
    ft = e.get("finetune") or {}
    ds = next(iter(e["ppl"]))
    rows = [
        ("quantize (s)", lambda m: m["time"]["quantize_s"], ".1f"),
        ("finetune (s)", lambda m: m["time"].get("finetune_s"), ".1f"),
        ("evaluate (s)", lambda m: m["time"]["eval_s"], ".1f"),
        ("job, wall clock (s)", lambda m: m["_wall_s"], ".1f"),
        ("peak RSS to end of quantization (GB)", lambda m: m["memory"].get("quantize_peak_rss_gb"), ".2f"),
        ("peak RSS to end of finetuning (GB)", lambda m: (m.get("finetune") or {}).get("peak_rss_gb"), ".2f"),
        ("peak RSS, whole job (GB)", lambda m: m["memory"].get("peak_rss_gb"), ".2f"),
        ("peak GPU memory (GB)", lambda m: m["memory"].get("peak_gpu_gb"), ".2f"),
        (f"PPL {ds}", lambda m: m["ppl"][ds], ".3f"),
        (f"KL to fp {ds} (nats/token)", lambda m: m["kld"].get(ds, {}).get("mean"), ".4g"),
        ("total bits/weight", lambda m: m["bits"]["total"], ".3f"),
    ]
    print(f"{'':40s} {'finetune=none':>14s} {'finetune=e2e':>14s}")
    for name, get, spec in rows:
        print(f"{name:40s} {_fmt(get(n), spec):>14s} {_fmt(get(e), spec):>14s}")
    ref = ft.get("reference") or {}
    h = ft.get("heldout_kl") or []
    print(f"e2e: {ft.get('epochs_run')} epochs ({ft.get('steps_run')} Adam steps, batch {ft.get('batch')}, lr "
          f"{ft.get('lr')} -> {ft.get('lr_min')}), {ft.get('train_windows')} training + {ft.get('heldout_windows')} "
          f"held-out windows, {ft.get('trained_params')} trained parameters; held-out KL "
          f"{' -> '.join(f'{x:.4g}' for x in h)} (best epoch {ft.get('best_epoch')}); calibration reference "
          f"{'computed' if ref.get('computed') else 'read'} in {_fmt(ref.get('time_s'), '.1f')} s")
    dt = (e["time"].get("finetune_s") or 0.0)
    print(f"finetune=e2e: {dt:.1f} s = {dt / max(n['time']['quantize_s'], 1e-9):.2f} x the quantization time; peak RSS "
          f"{_fmt(e['memory'].get('peak_rss_gb'), '.2f')} GB vs {_fmt(n['memory'].get('peak_rss_gb'), '.2f')} GB; "
          f"cores kept busy by other processes while quantizing {_fmt(n['time'].get('other_cpu_cores'), '.2f')} / "
          f"{_fmt(e['time'].get('other_cpu_cores'), '.2f')}, while finetuning {_fmt(ft.get('other_cpu_cores'), '.2f')} "
          f"(about 0: quiet timings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
