"""Whole-block CPU decode benchmark: one Llama-2-7B decoder block (transformers' LlamaModel, 1 layer)
decoding token by token with its KV cache, float32 against the same block with its seven linears
quantized and run by `kernel=cpu`, side by side in ONE run.

    PYTHONPATH=. python benchmarks/cpu_block_bench.py [--formats 2b-v6k4096,...] [--config 7b|tiny]
        [--threads 1,2] [--prompt 32] [--steps 16] [--reps 3] [--torch]

Where benchmarks/cpu_decode_bench.py times one linear, this times what a token costs: the seven
linears (808 MB of float32 weights at 7B shapes), RMSNorms, rotary embeddings, attention over the
cache and the Python between them. Both models compute the same function: the float block's weights
ARE the quantized weights dequantized (random indices and codebooks, as in cpu_decode_bench; decode
time does not depend on their values), so each step's hidden states must agree within float
tolerance (`rel err`, checked). Per repetition both caches are filled with the same `--prompt` random
tokens (the quantized block's prefill runs the kernel: <= 64 tokens), then `--steps` tokens are decoded
alternately, float step, quantized step, ...: every step starts with the caches streamed out by the
other model's step (a block's weights and indices exceed the L3), as in a real model's decode. A row
reports the median step. `--torch` adds the torch route (dequantize every linear on every call: what
`kernel=torch` costs at decode), timed on 2 steps per repetition.

The last line is `min speedup vs fp32 per token (one block, batch 1): X.XX`.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.cpu_decode_bench import FORMATS, load_average, make_weight, parse_formats  # noqa: E402

CONFIGS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4),
}
DEFAULT_FORMATS = "2b-v6k4096,3b-v4k4096,3b-v8k65536r256"


def build_block(config: str, seed: int = 0):
    """A one-layer LlamaModel (vocabulary of 256: no embedding cost) in float32, random weights."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096, **CONFIGS[config])
    return LlamaModel(cfg).float().eval()


def quantize_block(model, fmt: dict, kernel: str):
    """(float model, quantized model): every linear of the block replaced by a random VQ weight of `fmt`
    (QuantLinear, `kernel`) and, in the float copy, by that weight dequantized."""
    from runners.arch import set_module
    from vptq.qlinear import QuantLinear

    fp, qm = copy.deepcopy(model), copy.deepcopy(model)
    names = [n for n, m in model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, n in enumerate(names):
        lin = model.layers.get_submodule(n)
        q = make_weight(fmt, lin.out_features, lin.in_features, seed=i)
        with torch.no_grad():
            fp.layers.get_submodule(n).weight.copy_(q.dequantize(torch.float32))
        set_module(qm.layers, n, QuantLinear(q, kernel=kernel))
    return fp, qm


def _step(model, cache, ids):
    # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` deprecated)
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(input_ids=ids, use_cache=True, **{arg: cache}).last_hidden_state


def time_decode(models: Dict[str, torch.nn.Module], prompt: int, steps: Dict[str, int], reps: int,
                seed: int = 0):
    """Median seconds per decoded token of each model, steps interleaved across models; and the largest
    relative error of each model's hidden states against the first model's, step for step."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    times: Dict[str, List[float]] = {n: [] for n in models}
    err: Dict[str, float] = {n: 0.0 for n in models}
    first = next(iter(models))
    nsteps = max(steps.values())
    for _ in range(reps):
        ids = torch.randint(0, 256, (1, prompt + nsteps), generator=g)
        caches = {n: DynamicCache() for n in models}
        with torch.no_grad():
            for n, m in models.items():
                _step(m, caches[n], ids[:, :prompt])
            for s in range(nsteps):
                tok = ids[:, prompt + s:prompt + s + 1]
                ref = None
                for n, m in models.items():
                    if s >= steps[n]:
                        continue
                    t0 = time.perf_counter()
                    h = _step(m, caches[n], tok)
                    times[n].append(time.perf_counter() - t0)
                    if n == first:
                        ref = h
                    elif ref is not None:
                        err[n] = max(err[n], float((h - ref).norm() / ref.norm()))
    return {n: statistics.median(t) for n, t in times.items()}, err


def run(formats: List[str], config: str, threads: List[int], prompt: int, steps: int, reps: int,
        with_torch: bool) -> float:
    import vptq.kernels  # noqa: F401  (registers kernel=cpu)
    from runners.metrics import cpu_summary
    from vptq.kernels import cpu

    if cpu.isa() == "unavailable":
        raise SystemExit("kernel=cpu is unavailable here (no C++ compiler?): nothing to compare")
    n0 = torch.get_num_threads()
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; kernel=cpu loop: {cpu.isa()}")
    print(f"date: {datetime.date.today().isoformat()}; load average at start: {load_average()}; "
          f"block: {config} {CONFIGS[config]}; prompt {prompt}, "
          f"{steps} decode steps x {reps} repetitions, median step")
    header = (f"| {'format':<16} | {'bits':>5} | {'threads':>7} | {'fp32 ms/tok':>11} | {'cpu ms/tok':>10} | "
              f"{'speedup':>7} | {'rel err':>7} |" + (f" {'torch ms/tok':>12} |" if with_torch else ""))
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    base = build_block(config)
    worst = float("inf")
    for name in formats:
        fp, qm = quantize_block(base, FORMATS[name], "cpu")
        qws = [m.qweight for m in qm.modules() if hasattr(m, "qweight")]
        bits = sum(q.storage().per_weight()["total"] * q.in_features * q.out_features for q in qws) / sum(
            q.in_features * q.out_features for q in qws)
        tm = None
        if with_torch:
            tm = copy.deepcopy(qm)
            for m in tm.modules():
                if hasattr(m, "qweight"):
                    m.kernel = "torch"
        for nt in threads:
            torch.set_num_threads(nt)
            models = {"fp32": fp, "cpu": qm, **({"torch": tm} if tm is not None else {})}
            nsteps = {"fp32": steps, "cpu": steps, "torch": min(2, steps)}
            time_decode(models, min(prompt, 4), {n: 1 for n in models}, 1)  # warm-up: kernel buffers, first touch
            before = cpu.STATS["cpu"]
            t, err = time_decode(models, prompt, nsteps, reps)
            if cpu.STATS["cpu"] == before:
                raise SystemExit(f"kernel=cpu never ran on {name}")
            if max(err.values()) > 1e-3:
                raise SystemExit(f"{name}: hidden states differ from the float block's: {err}")
            sp = t["fp32"] / t["cpu"]
            worst = min(worst, sp)
            print(f"| {name:<16} | {bits:5.2f} | {nt:7d} | {t['fp32'] * 1e3:11.2f} | {t['cpu'] * 1e3:10.2f} | "
                  f"{sp:6.2f}x | {max(err.values()):7.1e} |"
                  + (f" {t['torch'] * 1e3:12.1f} |" if with_torch else ""), flush=True)
        del fp, qm, tm
    torch.set_num_threads(n0)
    print(f"load average at end: {load_average()}")
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma list of {', '.join(FORMATS)}")
    ap.add_argument("--config", default="7b", choices=sorted(CONFIGS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=32, help="tokens in the cache before decoding (<= 64)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="also time kernel=torch (dequantize on every call)")
    a = ap.parse_args(argv)
    formats = parse_formats(ap, a.formats)
    if not 1 <= a.prompt <= 64:
        ap.error(f"--prompt {a.prompt}: between 1 and 64 (the kernel's prefill limit, vptq.kernels.cpu.MAX_TOKENS)")
    if a.steps < 1 or a.reps < 1:
        ap.error(f"--steps {a.steps} / --reps {a.reps}: at least 1")
    threads = [int(t) for t in a.threads.split(",")]
    worst = run(formats, a.config, threads, a.prompt, a.steps, a.reps, a.torch)
    print(f"min speedup vs fp32 per token (one block, batch 1): {worst:.2f}")


if __name__ == "__main__":
    main()
