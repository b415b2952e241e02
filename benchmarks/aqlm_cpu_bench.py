"""AQLM-style 2x8 weights on the CPU: fp32 `F.linear`, our `kernel=cpu`, and AQLM's own CPU kernel (the
`aqlm` package's numba LUT GEMV, what its users run on a CPU), side by side in ONE run, on Llama-2-7B
linear shapes at batch 1.

    PYTHONPATH=.:$AQLM_SITE python benchmarks/aqlm_cpu_bench.py [--shapes 7b] [--reps 31]

The `aqlm` package is not a dependency of this project; install it (and numba) beside it, e.g.
    .venv/bin/python -m pip install --no-deps --target /tmp/aqlm_site aqlm==1.1.7 numba llvmlite
    PYTHONPATH=.:/tmp/aqlm_site .venv/bin/python benchmarks/aqlm_cpu_bench.py

One random 2x8 weight per shape (codes, float16-exact codebooks, per-row scales) loaded into both
`baselines.aqlm.AQLMWeight` (ours) and `aqlm.inference.QuantizedLinear` (theirs, float32, its CPU rule:
codes permuted to (in groups, out, M) on first use, numba-compiled per shape and excluded from timing).
Calls are interleaved (fp32, ours, theirs, ...), one call per repetition, each after an untimed fp32
call that evicts the caches (no route finds x warm from the one before it), median; each route's output
is checked against `F.linear` with the dequantized weight (`err`: relative error).

One thread only (torch's and numba's), for two measured reasons (docs/LOG.md, 2026-12-07): with two
threads AQLM's kernel returns wrong outputs (relative error 7e-3 to 2.6e-2: its `prange` loop over
input groups adds into shared output elements without synchronisation), and numba's thread pool and
torch's OpenMP pool compete inside one process (our kernel's 1.1 ms became 4.1-14 ms with numba's
pool alive), so no multi-thread row of such a run means anything.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.cpu_decode_bench import SHAPES, load_average, time_interleaved  # noqa: E402

M, NBITS, G = 2, 8, 8  # AQLM 2x8, in_group_size 8: 2 bits per weight


def make_pair(out: int, inn: int, seed: int = 0):
    """(ours: AQLMWeight, theirs: aqlm.inference.QuantizedLinear) holding the same weight."""
    from aqlm.inference import QuantizedLinear as TheirLinear

    from baselines.aqlm import AQLMWeight

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** NBITS, (out, inn // G, M), generator=g)
    codebooks = (torch.randn(M, 2 ** NBITS, G, generator=g) * 0.02).half()  # float16-exact for both
    scales = (torch.rand(out, generator=g) + 0.5).half()
    ours = AQLMWeight(codes, codebooks, scales, NBITS)
    theirs = TheirLinear(inn, out, in_group_size=G, out_group_size=1, num_codebooks=M, nbits_per_codebook=NBITS,
                         bias=False, dtype=torch.float32)
    with torch.no_grad():
        theirs.codebooks.copy_(codebooks.float()[:, :, None, :])
        theirs.codes.copy_(codes.to(torch.uint8).view(torch.int8))
        theirs.scales.copy_(scales.float()[:, None, None, None])
    return ours, theirs.eval()


def run(shapes: List[Tuple[int, int]], reps: int) -> Dict[str, float]:
    # one worker in numba's pool from its start (a second one, even unused, disturbed the timings) and
    # one torch thread before any parallel region
    os.environ["NUMBA_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        import aqlm  # noqa: F401
        import numba
    except ImportError as e:
        raise SystemExit(f"needs the aqlm package and numba ({e}); see this script's docstring for how to install "
                         "them beside the project")
    from importlib import metadata

    import vptq.kernels  # noqa: F401  (registers kernel=cpu)
    from runners.metrics import cpu_summary
    from vptq.kernels import cpu
    from vptq.qlinear import QuantLinear

    if cpu.isa() == "unavailable":
        raise SystemExit("kernel=cpu is unavailable here (no C++ compiler?)")
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; aqlm {metadata.version('aqlm')}; "
          f"numba {numba.__version__}; kernel=cpu loop: {cpu.isa()}")
    print(f"date: {datetime.date.today().isoformat()}; load average at start: {load_average()}; "
          f"AQLM 2x8 g8, batch 1, one thread, median of {reps} "
          "interleaved repetitions, one call each, after an untimed fp32 call")
    header = (f"| {'shape (out x in)':>16} | {'fp32 ms':>8} | {'ours ms':>8} | {'aqlm ms':>8} | "
              f"{'ours/fp32':>9} | {'aqlm/fp32':>9} | {'ours err':>8} | {'aqlm err':>8} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    worst = {"ours": float("inf"), "aqlm": float("inf")}
    for out, inn in shapes:
        ours_q, theirs = make_pair(out, inn)
        lin = QuantLinear(ours_q, kernel="cpu")
        W = ours_q.dequantize(torch.float32)
        x = torch.randn(1, inn)
        with torch.no_grad():
            yr = F.linear(x, W)
            fns = {"fp32": lambda: F.linear(x, W), "ours": lambda: lin(x), "aqlm": lambda: theirs(x)}
            err = {n: float((fns[n]() - yr).norm() / yr.norm()) for n in ("ours", "aqlm")}  # + compile
            for f in fns.values():
                f()
            med = time_interleaved(fns, reps, 1, time.perf_counter, fns["fp32"])  # each call after an untimed fp32 one
        sp = {n: med["fp32"] / med[n] for n in ("ours", "aqlm")}
        for n in sp:
            worst[n] = min(worst[n], sp[n])
        print(f"| {f'{out} x {inn}':>16} | {med['fp32'] * 1e3:8.3f} | {med['ours'] * 1e3:8.3f} | "
              f"{med['aqlm'] * 1e3:8.3f} | {sp['ours']:8.2f}x | {sp['aqlm']:8.2f}x | {err['ours']:8.1e} | "
              f"{err['aqlm']:8.1e} |", flush=True)
        del ours_q, theirs, lin, W
    print(f"load average at end: {load_average()}")
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=31)
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error(f"--reps {a.reps}: at least 1")
    worst = run(SHAPES[a.shapes], a.reps)
    print(f"min speedup vs fp32 at batch 1, one thread: ours {worst['ours']:.2f}, aqlm {worst['aqlm']:.2f}")


if __name__ == "__main__":
    main()
