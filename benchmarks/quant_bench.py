"""Quantization-speed benchmark of `method=vptq`: runs the default job on the bundled model
(SmolLM2-135M, bits=2, 32 calibration windows of 512 tokens) in a fresh process and prints

    quantization wall time (metrics.json time.quantize_s: capture, Hessians, k-means, error
    feedback, quantized forward passes; model loading and evaluation excluded),
    peak RSS relative to the fp32 size of the model's parameters (whole job; up to the end of
    quantization; and that peak less the process's RSS before the model was loaded),
    time per decoder block (layers.json blocks[*].time_s: mean, median, max),
    realized bits and the perplexity the job measured.

    .venv/bin/python benchmarks/quant_bench.py [extra overrides, e.g. bits=3 method.finetune=true]

Every run starts from scratch (its own results_root, no block checkpoints, resume off). The
numbers depend on the machine's load: the 2-core CPU box is shared by other jobs, so compare
only numbers measured back to back on a quiet machine.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["method=vptq", "bits=2", "logger=none"]


def fp32_model_gb(model_name: str) -> float:
    """fp32 size of the model's parameters, from the converted safetensors folder's tensors."""
    sys.path.insert(0, REPO)
    from safetensors import safe_open

    from runners.models import smollm2_folder

    if model_name != "smollm2_135m":
        return float("nan")
    n = 0
    with safe_open(os.path.join(smollm2_folder(), "model.safetensors"), "pt") as f:
        for k in f.keys():
            n += _prod(f.get_slice(k).get_shape())
    return n * 4 / 1024**3


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


def main(argv) -> int:
    root = tempfile.mkdtemp(prefix="vptq_bench_")
    args = DEFAULT + list(argv) + [f"results_root={root}", f"hydra.run.dir={root}/run", "resume=false",
                                   "quantize.checkpoint=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    print("running:", " ".join(["runners/run.py", *args]), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.join(REPO, "runners", "run.py"), *args], cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    mpath = os.path.join(root, "run", "metrics.json")
    if p.returncode != 0 or not os.path.isfile(mpath):
        print(f"job failed (exit {p.returncode}); see {root}/run", file=sys.stderr)
        return 1
    with open(mpath) as f:
        m = json.load(f)
    with open(os.path.join(root, "run", "layers.json")) as f:
        blocks = json.load(f)["blocks"]
    bt = [b["time_s"] for b in blocks]
    size = fp32_model_gb(m["model"])
    rss = m["memory"]["peak_rss_gb"]
    print(f"model {m['model']}  method {m['method']}  bits target {m['bits']['target']} "
          f"realized total {m['bits']['total']:.4f} (index {m['bits']['index']:.4f})")
    print(f"quantize wall time     {m['time']['quantize_s']:.1f} s   (whole job {wall:.1f} s)")
    print(f"peak RSS               {rss:.2f} GB = {rss / size:.2f} x the fp32 model ({size:.3f} GB), whole job")
    mem = m["memory"]
    qrss, base = mem.get("quantize_peak_rss_gb"), mem.get("base_rss_gb")
    if qrss is not None:
        print(f"peak RSS to end of quantization {qrss:.2f} GB = {qrss / size:.2f} x the fp32 model")
    if qrss is not None and base is not None:
        print(f"  of which the process before loading the model (interpreter, torch, transformers) {base:.2f} GB; "
              f"above it {qrss - base:.2f} GB = {(qrss - base) / size:.2f} x the fp32 model")
    print(f"time per block         mean {statistics.mean(bt):.2f} s  median {statistics.median(bt):.2f} s  "
          f"max {max(bt):.2f} s  ({len(bt)} blocks)")
    print("perplexity             " + ", ".join(f"{k} {v:.3f}" for k, v in m["ppl"].items()))
    print(f"results in {root}/run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
