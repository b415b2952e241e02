"""What the distribution metrics cost: the default job's evaluation with and without KL to the float model.

The bundled model (SmolLM2-135M) quantized with RTN at 2 bits (any quantized model: the evaluation's
cost does not depend on the method), evaluated on the default job's windows (pydoc, 32 x 512 tokens)
exactly as the job does (`runners.ppl.score` inside `vptq.qlinear.dense_weights`): perplexity alone,
and perplexity + KL/top-1/Δp against the cached float reference, interleaved, `--reps` times each,
median. Also the one-time cost of computing the float reference (once per model and windows, shared
by every job of a sweep and later sweeps). Prints the overhead; goal <= 20%.

    .venv/bin/python benchmarks/kld_bench.py [--reps 3] [--windows 32] [--seqlen 512] [--topk 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--topk", type=int, default=64)
    a = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import torch

    from runners.data import eval_windows
    from runners.driver import quantize_model
    from runners.kld import compute_reference
    from runners.metrics import cpu_summary
    from runners.models import load_model
    from runners.ppl import kld_summary, score
    from runners.schema import ModelConfig
    from vptq.methods import build_method, method_class
    from vptq.qlinear import dense_weights

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {cpu_summary()}, {torch.get_num_threads()} "
          f"threads | bundled model, pydoc {a.windows} x {a.seqlen}, top-k {a.topk}", flush=True)
    model, tok = load_model(ModelConfig(name="smollm2_135m", source="smollm2_gguf"))
    w = eval_windows("pydoc", None, tok, a.seqlen, a.windows)
    t0 = time.perf_counter()
    ref = compute_reference(model, w, "cpu", a.topk)
    t_ref = time.perf_counter() - t0
    quantize_model(model, build_method("rtn", method_class("rtn").Config(), bits=2.0), calib=None, device="cpu")
    times = {"ppl": [], "ppl+kld": []}
    with dense_weights(model):
        score(model, w[:1], "cpu")  # warm-up: the dense weights, allocator
        for _ in range(a.reps):
            for name, r in (("ppl", None), ("ppl+kld", ref)):
                t0 = time.perf_counter()
                s = score(model, w, "cpu", reference=r)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    kl = kld_summary(s)
    print(f"evaluation, perplexity only:        {med['ppl']:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['ppl'])})")
    print(f"evaluation, perplexity + KL/top-1:  {med['ppl+kld']:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['ppl+kld'])})")
    print(f"float reference, computed once:     {t_ref:.2f} s (then read from the cache)")
    print(f"(RTN 2-bit: KL {kl['mean']:.3f} nats, top-1 {kl['top1_agree']:.1f}%, PPL {s.ppl:.4g})")
    print(f"KL evaluation overhead: {100 * (med['ppl+kld'] / med['ppl'] - 1):.1f}% of the evaluation time (goal <= 20%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
