"""CPU decode benchmark: fp32 `F.linear` against `kernel=cpu` (vptq/kernels/cpu.py), side by side in
ONE run, on Llama-2-7B linear shapes.

    PYTHONPATH=. python benchmarks/cpu_decode_bench.py [--formats 2b-v6k4096,...] [--shapes 7b]
        [--batches 1,4] [--threads 1,2] [--reps 31] [--inner 1] [--clock wall|thread]

Per (shape (out x in), format, batch, threads) it times, interleaved (fp32, cpu, fp32, cpu, ...),
after warm-up calls that are not timed (library build, buffer layout, first-touch):
    fp32   F.linear(x, W) with the dense float32 W (MKL; bound by memory bandwidth at batch 1)
    cpu    QuantLinear(q, kernel="cpu")(x): the gather-FMA kernel from the indices, through the
           module's forward (x's layout, norms/perm, the ctypes call and the output cast included)
Each repetition times `--inner` back-to-back calls; a row reports the median repetition. With the
default `--inner 1` every kernel call starts as it does in decode, its codebook and indices out of the
caches (the fp32 call before it streamed 64-180 MB through them); `--inner 3` (the default until
2026-12-07) lets the 2nd and 3rd calls find the 4-6 MB of indices in L3, which the fp32 weight never
fits: 0-20 % (mostly 2-4 %) faster kernel times on the v8 k65536 rows (docs/LOG.md). Indices
and codebooks are random (decode time does not depend on their values). Each row also checks that
the two outputs agree (relative error, float32). `--clock thread` measures the calling thread's CPU
time instead of wall time (steadier beside other processes; meaningful with --threads 1 only).
`--plain` adds a timed route, interleaved with the others: the same kernel with small codebooks left
in float16 and indices as codeword numbers (`vptq.kernels.cpu.COMPACT` off), and the ratio plain / cpu.
`--tiled` adds one with the weight's own indices (VPTQ's, AQLM's 8-bit codes) copied into the kernel's
tiled uint16 layout (`vptq.kernels.cpu.DIRECT` off: the route before 2026-12-07, which doubled the
indices' memory), and the ratio tiled / cpu. With any of these, every timed call follows an untimed fp32
one: timed right after the default route, an alternative found the codebook they share (or x) warm, a
bias in its favour in the tables before 2026-12-07 23:43 UTC (docs/LOG.md). `--unfused` adds one with AQLM-style M = 2 weights as two passes over x
(`vptq.kernels.cpu.FUSE_IN` off: the route before 2026-12-07, 22:55 UTC).

Formats (index bits per weight = bits per index / v; + codebook bits on these shapes):
    2b-v6k4096        v=6, k=4096             12 / 6 = 2.0   VPTQ paper's 2-bit setting
    3b-v4k4096        v=4, k=4096             12 / 4 = 3.0
    3b-v8k65536r256   v=8, k=65536 + res 256  24 / 8 = 3.0   released VPTQ 3-bit models
    2b-v8k65536       v=8, k=65536            16 / 8 = 2.0   (optional: released 2-bit models)
    2b-aqlm1x16       AQLM-style, M=1, 16-bit codes, g=8   16 / 8 = 2.0   AQLM's 1x16 (transposed layout:
    2b-aqlm2x8        AQLM-style, M=2, 8-bit codes, g=8    16 / 8 = 2.0   AQLM's 2x8   vectors along the input)
    2b-aqlm1x8g4      AQLM-style, M=1, 8-bit codes, g=4     8 / 4 = 2.0   `method=aqlm`'s own choices
    2b-aqlm3x11g16    AQLM-style, M=3, 11-bit codes, g=16  33 / 16 = 2.06  (baselines.aqlm.choose_scheme):
    3b-aqlm7x7g16     AQLM-style, M=7, 7-bit codes, g=16   49 / 16 = 3.06  2 bits on 4096 x 4096 / on
                                                                          4096 x 11008 and larger; 3 bits

The last line is `min speedup vs fp32 at batch 1: X.XX` (over every batch-1 row: all shapes,
formats and thread counts).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FORMATS: Dict[str, dict] = {
    "2b-v6k4096": dict(v=6, k=4096, k_res=0),
    "3b-v4k4096": dict(v=4, k=4096, k_res=0),
    "3b-v8k65536r256": dict(v=8, k=65536, k_res=256),
    "2b-v8k65536": dict(v=8, k=65536, k_res=0),
    "2b-aqlm1x16": dict(aqlm=True, M=1, nbits=16, g=8),
    "2b-aqlm2x8": dict(aqlm=True, M=2, nbits=8, g=8),
    "2b-aqlm1x8g4": dict(aqlm=True, M=1, nbits=8, g=4),
    "2b-aqlm3x11g16": dict(aqlm=True, M=3, nbits=11, g=16),
    "3b-aqlm7x7g16": dict(aqlm=True, M=7, nbits=7, g=16),
}
DEFAULT_FORMATS = "2b-v6k4096,3b-v4k4096,3b-v8k65536r256"
ALTS = {"plain": "COMPACT", "tiled": "DIRECT", "unfused": "FUSE_IN"}  # extra timed routes: the vptq.kernels.cpu switch they turn off
SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "tiny": [(64, 96), (40, 64)],  # smoke run of this script
}


def make_weight(fmt: dict, out: int, inn: int, seed: int = 0):
    """A random VQWeight (one group, official layout, float16 codebooks), or AQLMWeight (`aqlm`)."""
    from vptq.vqweight import VQWeight

    g = torch.Generator().manual_seed(seed)
    if fmt.get("aqlm"):
        from baselines.aqlm import AQLMWeight

        M, nbits, gs = fmt["M"], fmt["nbits"], fmt["g"]
        if inn % gs:
            raise SystemExit(f"{out}x{inn}: AQLM-style formats need in_features divisible by g={gs}")
        codes = torch.randint(0, 2 ** nbits, (out, inn // gs, M), generator=g)
        codebooks = torch.randn(M, 2 ** nbits, gs, generator=g) * 0.02
        return AQLMWeight(codes, codebooks, torch.rand(out, generator=g) + 0.5, nbits)
    v, k, kr = fmt["v"], fmt["k"], fmt["k_res"]
    n = -(-out // v)
    kw = dict(out_features=out, in_features=inn, vector_len=v, num_centroids=k, group_num=1, group_size=inn,
              centroids=(torch.randn(1, k, v, generator=g) * 0.02).half(),
              indices=torch.randint(0, k, (1, n, inn), generator=g, dtype=torch.int32))
    if kr:
        kw.update(num_res_centroids=kr, res_centroids=(torch.randn(1, kr, v, generator=g) * 0.005).half(),
                  res_indices=torch.randint(0, kr, (1, n, inn), generator=g, dtype=torch.int32))
    return VQWeight(**kw)


def load_average() -> str:
    """The 1/5/15-minute load averages, for a benchmark's header and footer."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_formats(ap: argparse.ArgumentParser, text: str) -> List[str]:
    """--formats "a,b" -> ["a", "b"], or the parser's one-line error naming the unknown ones and the valid."""
    formats = [f for f in text.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {bad}; valid: {', '.join(FORMATS)}")
    return formats


@contextlib.contextmanager
def cpu_switch(flag: str, value: bool):
    """`vptq.kernels.cpu.<flag>` (COMPACT, DIRECT, FUSE_IN) set to `value` for the body, then restored: the
    kernel buffers a layer builds inside keep that route (they are cached on the layer)."""
    from vptq.kernels import cpu

    old = getattr(cpu, flag)
    setattr(cpu, flag, value)
    try:
        yield
    finally:
        setattr(cpu, flag, old)


def time_interleaved(fns: Dict[str, Callable[[], object]], reps: int, inner: int, clock,
                     between: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """Median seconds per call of each fn, repetitions interleaved across fns (drift hits all alike).
    `between` (untimed) runs before each fn's calls: e.g. an fp32 GEMV that evicts the caches, so that no
    route finds the data of the one timed before it warm (two routes sharing a codebook, or x)."""
    times: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            if between is not None:
                between()
            t0 = clock()
            for _ in range(inner):
                f()
            times[n].append((clock() - t0) / inner)
    return {n: statistics.median(t) for n, t in times.items()}


def run(formats: List[str], shapes: List[Tuple[int, int]], batches: List[int], threads: List[int], reps: int,
        inner: int, clock_name: str, alts: Tuple[str, ...] = ()) -> float:
    import vptq.kernels  # noqa: F401  (registers kernel=cpu)
    from runners.metrics import cpu_summary
    from vptq.kernels import cpu
    from vptq.qlinear import QuantLinear

    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    t_build = time.perf_counter()
    isa = cpu.isa()
    t_build = time.perf_counter() - t_build
    n0 = torch.get_num_threads()
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; "
          f"kernel=cpu loop: {isa} (library ready in {t_build:.1f} s)")
    print(f"date: {datetime.date.today().isoformat()}; load average at start: {load_average()}; clock: {clock_name}; "
          f"median of {reps} interleaved repetitions x {inner} calls, warm-up excluded"
          + ("; each route's calls after an untimed fp32 call" if alts else ""))
    if isa == "unavailable":
        raise SystemExit("kernel=cpu is unavailable here (no C++ compiler?): nothing to compare")
    header = (f"| {'shape (out x in)':>16} | {'format':<16} | {'bits':>7} | {'batch':>5} | {'threads':>7} | "
              f"{'fp32 ms':>8} | {'cpu ms':>8} | {'speedup':>7} | {'rel err':>7} |"
              + "".join(f" {a + ' ms':>9} | {a + '/cpu':>9} |" for a in alts))
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    worst = float("inf")
    for out, inn in shapes:
        for name in formats:
            q = make_weight(FORMATS[name], out, inn)
            bits = q.storage().per_weight()["total"]
            lin = QuantLinear(q, kernel="cpu")
            lin_alt = {a: QuantLinear(q, kernel="cpu") for a in alts}
            W = q.dequantize(torch.float32)  # (out, in) the fp32 baseline's weight (the same numbers)
            for nt in threads:
                torch.set_num_threads(nt)
                for b in batches:
                    x = torch.randn(b, inn)
                    with torch.no_grad():
                        before = cpu.STATS["cpu"]
                        y, yr = lin(x), F.linear(x, W)
                        if cpu.STATS["cpu"] != before + 1:
                            raise SystemExit(f"kernel=cpu did not take {out}x{inn} {name} batch {b}")
                        err = float((y - yr).norm() / yr.norm())
                        fns = {"fp32": lambda: F.linear(x, W), "cpu": lambda: lin(x)}
                        for a, la in lin_alt.items():
                            with cpu_switch(ALTS[a], False):  # its buffers are built (and cached) on this call
                                err_a = float((la(x) - yr).norm() / yr.norm())
                            if err_a > 1e-4:
                                raise SystemExit(f"{a} route wrong on {out}x{inn} {name}: rel err {err_a:.1e}")
                            fns[a] = (lambda la: lambda: la(x))(la)
                        for f in fns.values():  # warm-up
                            f()
                            f()
                        # with alternative routes, every call follows an untimed fp32 one (caches evicted): the
                        # route timed after another would find a codebook they share, or x, warm
                        t = time_interleaved(fns, reps, inner, clock, fns["fp32"] if alts else None)
                    sp = t["fp32"] / t["cpu"]
                    if b == 1:
                        worst = min(worst, sp)
                    print(f"| {f'{out} x {inn}':>16} | {name:<16} | {bits:7.2f} | {b:5d} | {nt:7d} | "
                          f"{t['fp32'] * 1e3:8.3f} | {t['cpu'] * 1e3:8.3f} | {sp:6.2f}x | {err:7.1e} |"
                          + "".join(f" {t[a] * 1e3:9.3f} | {t[a] / t['cpu']:8.2f}x |" for a in alts), flush=True)
            del W, lin, lin_alt, q
    torch.set_num_threads(n0)
    print(f"load average at end: {load_average()}")
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma list of {', '.join(FORMATS)}")
    ap.add_argument("--shapes", default="7b", help=f"one of {', '.join(SHAPES)}, or OUTxIN[,OUTxIN...]")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--inner", type=int, default=1, help="calls per timed repetition (1: each call cold)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    ap.add_argument("--plain", action="store_true", help="also time the kernel without its compact small codebooks")
    ap.add_argument("--tiled", action="store_true", help="also time the kernel on a tiled copy of the indices")
    ap.add_argument("--unfused", action="store_true", help="also time AQLM-style M=2 weights as two passes")
    a = ap.parse_args(argv)
    formats = parse_formats(ap, a.formats)
    if a.shapes in SHAPES:
        shapes = SHAPES[a.shapes]
    else:
        try:
            shapes = [tuple(int(d) for d in s.lower().split("x")) for s in a.shapes.split(",")]
            assert all(len(s) == 2 and min(s) > 0 for s in shapes)
        except (ValueError, AssertionError):
            ap.error(f"--shapes {a.shapes!r}: one of {', '.join(SHAPES)} or OUTxIN[,OUTxIN...]")
    batches = [int(b) for b in a.batches.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    if a.clock == "thread" and threads != [1]:
        ap.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    worst = run(formats, shapes, batches, threads, a.reps, a.inner, a.clock,
                tuple(n for n in ALTS if getattr(a, n)))
    if worst == float("inf"):
        print("min speedup vs fp32 at batch 1: n/a (no batch-1 rows)")
    else:
        print(f"min speedup vs fp32 at batch 1: {worst:.2f}")


if __name__ == "__main__":
    main()
