"""Kernel benchmark, all paths side by side in ONE run, on real LLM linear shapes.

    PYTHONPATH=. python benchmarks/kernel_bench.py [--out DIR] [--configs 2b-v6k4096,...]
        [--shapes 7b,70b] [--tokens 1,4] [--workers 8] [--deadline SECONDS]

Per (format, shape (out x in), tokens) it times, with triton.testing.do_bench (CUDA events,
L2 flushed before every repetition, median):
    fp16      F.linear(x, W) with a dense float16 W                        (cuBLAS)
    torch     VQWeight.dequantize(float16) + F.linear                      (our reference path)
    tri-dq    Triton dequantization from the packed stream + F.linear      (prefill route)
    gemv      the fused dequantize-GEMV (autotuned; never writes W)        (decode route)
GB/s counts the bytes each path MUST read: fp16 the dense weight; the three quantized paths the
packed indices + codebooks (`KernelWeight.nbytes`); plus x and y. "% roof" is that over the
device's vendor peak (runners/throughput.py PEAK_GBPS). Indices and codebooks are random:
decode throughput does not depend on their values, so no model is downloaded.

Formats (index bits per weight = bits per index / v; codebooks add ~0.01-0.3 bit on these shapes):
    2b-v6k4096      v=6, k=4096            12 bits / 6  = 2.0   VPTQ paper's 2-bit setting
    2b-v8k65536     v=8, k=65536           16 bits / 8  = 2.0   released VPTQ 2-bit models
    3b-v4k4096      v=4, k=4096            12 bits / 4  = 3.0
    3b-v8k65536r256 v=8, k=65536, res 256  24 bits / 8  = 3.0   released VPTQ 3-bit models
Shapes: Llama-2-7B (4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down) and 70B
(8192x8192, 28672x8192, 8192x28672), as (out, in).

Kernel compilation is done first by a pool of worker processes (Triton's disk cache is shared),
so the timed process only loads binaries. Results go to DIR/kernel_bench.{json,md} after every
row; a --deadline stops starting new rows in time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FORMATS: Dict[str, dict] = {
    "2b-v6k4096": dict(v=6, k=4096, k_res=0),
    "2b-v8k65536": dict(v=8, k=65536, k_res=0),
    "3b-v4k4096": dict(v=4, k=4096, k_res=0),
    "3b-v8k65536r256": dict(v=8, k=65536, k_res=256),
}
SHAPES = {
    "tiny": [(24, 64), (16, 96)],  # CPU smoke run of this script (TRITON_INTERPRET=1)
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}


def make_weight(fmt: dict, out: int, inn: int, device, seed: int = 0):
    """A random VQWeight (one group, official layout) and its kernel buffers."""
    from vptq.kernels.layout import from_vqweight
    from vptq.vqweight import VQWeight

    g = torch.Generator(device=device).manual_seed(seed)
    v, k, kr = fmt["v"], fmt["k"], fmt["k_res"]
    n = -(-out // v)
    kw = dict(out_features=out, in_features=inn, vector_len=v, num_centroids=k, group_num=1, group_size=inn,
              centroids=(0.02 * torch.randn(1, k, v, generator=g, device=device)).half(),
              indices=torch.randint(0, k, (1, n, inn), generator=g, device=device))
    if kr:
        kw.update(num_res_centroids=kr, res_centroids=(0.005 * torch.randn(1, kr, v, generator=g, device=device)).half(),
                  res_indices=torch.randint(0, kr, (1, n, inn), generator=g, device=device))
    q = VQWeight(**kw)
    return q, from_vqweight(q)


def _precompile(job: Tuple[str, List[Tuple[int, int]], List[int]]) -> Tuple[str, float, int]:
    """Worker: run every gemv candidate and the dequantization once for one format (compiles)."""
    from vptq.kernels.dequant import dequantize
    from vptq.kernels.dispatch import gemv_candidates
    from vptq.kernels.gemv import gemv

    name, shapes, tokens = job
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    n = 0
    for out, inn in shapes:
        _, kw = make_weight(FORMATS[name], out, inn, dev)
        dequantize(kw, torch.float16)
        for T in tokens:
            x = torch.randn(T, inn, device=dev, dtype=torch.float16)
            for cfg in gemv_candidates(kw, T, sms):
                try:
                    gemv(kw, x, None, cfg)
                    n += 1
                except Exception:  # the tuner skips what does not run, too
                    pass
        del kw
        torch.cuda.synchronize()
    return name, time.perf_counter() - t0, n


def bench_ms(fn, rep: int = 100) -> float:
    if not torch.cuda.is_available():  # CPU smoke run (interpreter): wall clock, a few calls
        from runners.throughput import time_us

        return time_us(fn, torch.device("cpu"), reps=2) / 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def copy_bandwidth_gbps(dev) -> float:
    """Measured ceiling: a 1 GiB device-to-device copy (bytes read + written)."""
    a = torch.empty(1 << 29, dtype=torch.float16, device=dev)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), rep=200)
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--configs", default=",".join(FORMATS))
    ap.add_argument("--shapes", default="7b,70b")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after start: start no new row after it")
    ap.add_argument("--torch-path-max-numel", type=int, default=300_000_000,
                    help="skip the (slow, memory-hungry) torch dequantize path above this many weights")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernel_bench needs a CUDA device, or TRITON_INTERPRET=1 for a CPU smoke run (--shapes tiny)")
        return 2
    import torch.nn.functional as F

    from runners.throughput import peak_gbps
    from vptq.kernels import dispatch
    from vptq.kernels.dequant import dequantize
    from vptq.kernels.gemv import gemv

    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [c for c in a.configs.split(",") if c]
    shapes = [s for grp in a.shapes.split(",") for s in SHAPES[grp]]
    tokens = [int(t) for t in a.tokens.split(",")]
    peak = peak_gbps(dev)
    on_gpu = dev.type == "cuda"
    meta = {"device": torch.cuda.get_device_name(dev) if on_gpu else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "peak_gbps": peak,
            "sms": torch.cuda.get_device_properties(dev).multi_processor_count if on_gpu else None}

    # 1. compile everything in parallel (workers fill Triton's on-disk cache)
    if a.workers > 0 and on_gpu:
        import multiprocessing as mp

        t0 = time.perf_counter()
        jobs = [(nm, shapes, [T]) for nm in names for T in tokens]
        with mp.get_context("spawn").Pool(min(a.workers, len(jobs))) as pool:
            for nm, sec, n in pool.imap_unordered(_precompile, jobs):
                print(f"precompiled {nm}: {n} launches in {sec:.1f} s", flush=True)
        meta["precompile_s"] = time.perf_counter() - t0
    meta["copy_gbps"] = copy_bandwidth_gbps(dev) if on_gpu else None
    print(json.dumps(meta), flush=True)

    rows = []
    for nm in names:
        fmt = FORMATS[nm]
        for out, inn in shapes:
            if time.perf_counter() - t_start > a.deadline:
                rows.append({"format": nm, "shape": [out, inn], "skipped": "deadline"})
                continue
            q, kw = make_weight(fmt, out, inn, dev)
            qbytes = kw.nbytes()
            W16 = torch.randn(out, inn, device=dev, dtype=torch.float16)
            # correctness at scale: Triton dequantization is exact, the GEMV close to fp32
            Wq = dequantize(kw, torch.float16)
            exact = bool(torch.equal(Wq, q.dequantize(torch.float16)))
            del Wq
            for T in tokens:
                x = torch.randn(T, inn, device=dev, dtype=torch.float16)
                io = (T * inn + T * out) * 2
                run_cfg = dispatch.tune_gemv(kw, x)
                cands = dispatch.TUNE_LOG.get(dispatch._key(kw, x, False), {})
                y = gemv(kw, x, None, run_cfg)
                yr = x.float() @ q.dequantize(torch.float32).T
                err = float((y.float() - yr).norm() / yr.norm())
                t = {"fp16": bench_ms(lambda: F.linear(x, W16)),
                     "tri_dq": bench_ms(lambda: F.linear(x, dequantize(kw, torch.float16))),
                     "gemv": bench_ms(lambda: gemv(kw, x, None, run_cfg))}
                if out * inn <= a.torch_path_max_numel:
                    t["torch"] = bench_ms(lambda: F.linear(x, q.dequantize(torch.float16)), rep=50)
                gb = {"fp16": (out * inn * 2 + io), **{k: qbytes + io for k in ("torch", "tri_dq", "gemv")}}
                row = {"format": nm, "shape": [out, inn], "tokens": T, "bits_index": kw.main.total_bits / fmt["v"],
                       "bytes_quant": qbytes, "bytes_fp16": out * inn * 2, "us": {k: v * 1e3 for k, v in t.items()},
                       "gbps": {k: gb[k] / (t[k] * 1e-3) / 1e9 for k in t},
                       "speedup_vs_fp16": {k: t["fp16"] / t[k] for k in t if k != "fp16"},
                       "gemv_config": run_cfg, "gemv_candidates_us": cands, "gemv_rel_err": err,
                       "gemv_best_us": best_by_kernel(cands),
                       "dequant_exact": exact}
                row["roofline"] = {k: (v / peak if peak else None) for k, v in row["gbps"].items()}
                rows.append(row)
                print(fmt_row(row), flush=True)
                del x, yr, y
            del q, kw, W16
            torch.cuda.empty_cache()
            write(a.out, meta, rows)
    write(a.out, meta, rows)
    print(markdown(meta, rows))
    return 0


def best_by_kernel(cands: Dict[str, float]) -> Dict[str, float]:
    """Fastest tuning time (us) of each one-token kernel: 'packed' stream vs bit 'planes'."""
    out = {}
    for label, us in cands.items():
        kind = "planes" if label.endswith(" planes") else ("dot" if label.endswith(" dot") else "packed")
        out[kind] = min(us, out.get(kind, float("inf")))
    return out


def fmt_row(r) -> str:
    us, sp, rf = r["us"], r["speedup_vs_fp16"], r["roofline"]
    return (f"{r['format']:>16} {r['shape'][0]:>5}x{r['shape'][1]:<5} T={r['tokens']:<2} fp16 {us['fp16']:8.1f}us  "
            f"torch {us.get('torch', math.nan):9.1f}us  tri-dq {us['tri_dq']:8.1f}us  gemv {us['gemv']:7.1f}us  "
            f"x{sp['gemv']:.2f}  gemv {r['gbps']['gemv']:.0f} GB/s ({(rf['gemv'] or 0) * 100:.0f}%)  "
            f"err {r['gemv_rel_err']:.1e} exact={r['dequant_exact']}")


def markdown(meta, rows) -> str:
    from vptq.kernels.dispatch import config_label

    peak = meta.get("peak_gbps")
    pct = (lambda v: f"{v * 100:.0f}%" if v is not None else "n/a")
    lines = [f"Device: {meta['device']} (vendor peak {peak} GB/s; measured copy {meta.get('copy_gbps') or 0:.0f} GB/s); "
             f"torch {meta['torch']}, triton {meta['triton']}; {meta['date']}", "",
             "| format | out x in | tokens | fp16 us | torch deq+mm us | triton deq+mm us | fused GEMV us | "
             "GEMV speedup vs fp16 | GEMV GB/s | GEMV % roof | fp16 % roof | GEMV config | "
             "tuning: best packed / best planes us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if "skipped" in r:
            lines.append(f"| {r['format']} | {shape} | - | skipped ({r['skipped']}) | | | | | | | | | |")
            continue
        us, rf, c = r["us"], r["roofline"], r["gemv_config"]
        torch_us = f"{us['torch']:.0f}" if "torch" in us else "skipped"
        b = r.get("gemv_best_us", {})
        best = " / ".join(f"{b[k]:.1f}" if k in b else "-" for k in ("packed", "planes"))
        lines.append(f"| {r['format']} | {shape} | {r['tokens']} | {us['fp16']:.1f} | {torch_us} | {us['tri_dq']:.1f} | "
                     f"{us['gemv']:.1f} | {r['speedup_vs_fp16']['gemv']:.2f}x | {r['gbps']['gemv']:.0f} | "
                     f"{pct(rf['gemv'])} | {pct(rf['fp16'])} | "
                     f"{config_label(c)} | {best} |")
    return "\n".join(lines)


def write(out_dir, meta, rows) -> None:
    with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "kernel_bench.md"), "w") as f:
        f.write(markdown(meta, rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
