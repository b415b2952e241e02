"""A whole quantized model decoding on the CPU: speed and the memory it holds, side by side in ONE run.

    PYTHONPATH=. python benchmarks/cpu_model_bench.py --model FOLDER [--float FOLDER|bundled]
        [--tiled] [--tokens 32] [--reps 3] [--threads N]

FOLDER is a VPTQ-format model folder: `save.quantized=true`'s export of one of our runs, or a
VPTQ-community download (read by `vptq.format.load_vptq`: safetensors only, no remote code). Routes,
each greedy decoding at batch 1 with its KV cache after a 16-token prompt (4 untimed steps, then
`--tokens` timed ones: `runners.throughput.decode_tokens_per_s`), repetitions interleaved across
routes, median:
    float   `--float`: the float model it came from, float32 (`bundled`: the bundled SmolLM2-135M)
    cpu     the quantized model, kernel=cpu (the C++ kernel reading the weights' own indices)
    tiled   `--tiled`: a second copy of it, kernel=cpu with the tiled index copies the kernel kept
            until 2026-12-07 (`vptq.kernels.cpu.DIRECT` off while its buffers are built)
Per route: ms per token, tokens/s, speedup over the float route, and the memory the model holds
(`runners.throughput.resident_bytes`: its tensors, and what its kernels added, each storage once).
The last line is `cpu decode speedup vs float: X.XX` (or `n/a` without --float).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def load_float(spec: str):
    from transformers import AutoModelForCausalLM

    from runners.models import smollm2_folder

    folder = smollm2_folder() if spec == "bundled" else spec
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    return model.eval()


def load_quantized(folder: str, direct: bool = True):
    """The quantized model with kernel=cpu and its kernel buffers built (one token through it)."""
    import vptq.kernels  # noqa: F401  (registers kernel=cpu)
    from benchmarks.cpu_decode_bench import cpu_switch
    from vptq.format import load_vptq

    model, _ = load_vptq(folder, device="cpu", kernel="cpu")
    model.eval()
    with cpu_switch("DIRECT", direct), torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), use_cache=False)
    return model


def main(argv=None) -> None:
    from benchmarks.cpu_decode_bench import load_average
    from runners.metrics import cpu_summary
    from runners.throughput import decode_tokens_per_s, resident_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a VPTQ-format model folder")
    ap.add_argument("--float", dest="float_model", default=None, help="the float model's folder, or 'bundled'")
    ap.add_argument("--tiled", action="store_true", help="also time the kernel on tiled copies of the indices")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.model):
        ap.error(f"--model {a.model!r} is not a folder")
    if a.tokens < 1 or a.reps < 1:
        ap.error(f"--tokens {a.tokens} and --reps {a.reps} must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)

    models = {}
    if a.float_model:
        models["float"] = load_float(a.float_model)
    models["cpu"] = load_quantized(a.model)
    if a.tiled:
        models["tiled"] = load_quantized(a.model, direct=False)
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
          f"load average at start: {load_average()}; model: {a.model}; median of {a.reps} interleaved "
          f"repetitions x {a.tokens} timed tokens")
    times = {n: [] for n in models}
    with torch.no_grad():
        for _ in range(a.reps):
            for n, m in models.items():
                r = decode_tokens_per_s(m, torch.device("cpu"), prompt_tokens=16, decode_tokens=a.tokens,
                                        warmup_tokens=4)
                times[n].append(r["decode_ms_per_token"])
    ms = {n: statistics.median(t) for n, t in times.items()}
    header = f"| {'route':<6} | {'ms/token':>8} | {'tok/s':>6} | {'vs float':>8} | {'model MiB':>9} | {'kernel MiB':>10} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for n, m in models.items():
        rb = resident_bytes(m)
        vs = f"{ms['float'] / ms[n]:7.2f}x" if "float" in ms else f"{'n/a':>8}"
        print(f"| {n:<6} | {ms[n]:8.2f} | {1e3 / ms[n]:6.1f} | {vs} | {rb['model_bytes'] / 2**20:9.1f} | "
              f"{rb['kernel_buffer_bytes'] / 2**20:10.2f} |")
    print(f"load average at end: {load_average()}")
    print("cpu decode speedup vs float: " + (f"{ms['float'] / ms['cpu']:.2f}" if "float" in ms else "n/a"))


if __name__ == "__main__":
    main()
