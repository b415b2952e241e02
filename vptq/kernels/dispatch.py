"""Which kernel runs a `QuantLinear` forward under `kernel=triton`, and with which block sizes.

The dispatch table (`ROUTES`) picks by token count: up to `gemv.MAX_TOKENS` tokens (decode) the
fused dequantize-GEMV, above that (prefill) Triton dequantization + `F.linear`. Each weight type
says how the kernels read it (`layout.layout_of`: a `VQWeight` as it is, others through
`QuantizedWeight.kernel_layout`); a transposed layout (AQLM-style weights, the VPTQ layout of their
transpose) always takes the dequantization route (`dequant_matmul_t`), at any token count. Anything
the kernels do not take returns None, and `QuantLinear.forward` falls back to the torch path:
  * weights without a kernel layout (`Unsupported`: e.g. AQLM-style with M > 2 codebooks, GPTVQ,
    scalar grids), or whose index width is outside 1..32 merged bits,
  * calls that need autograd (a tensor that requires grad while grad is enabled: finetuning),
  * activations that are not float16 / bfloat16 / float32,
  * a device Triton cannot run on (CPU, unless TRITON_INTERPRET=1 was set before the import).

Autotuning: the first call for a (shape, format, tokens, dtype, device) key times each candidate
block configuration end to end (`triton.testing.do_bench`, median, L2 flushed) and keeps the
fastest in `TUNE_CACHE`; the candidates cover rows per program, columns per step, warps and a
column split (SPLIT > 1 adds an fp32 buffer, atomics and a cast: the timing includes them).
Under the interpreter a fixed small configuration is used.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import triton

from vptq.kernels import gemv as G
from vptq.kernels.dequant import DEQUANT_CONFIG, INTERPRET, INTERPRET_DEQUANT_CONFIG, dequantize
from vptq.kernels.layout import KernelWeight, Unsupported, from_layout, layout_of, same_stamp, weight_stamp

log = logging.getLogger("vq-bench")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TUNE = os.environ.get("VQ_KERNEL_TUNE", "1") != "0"  # 0: always the default configuration
TUNE_CACHE: Dict[Tuple, dict] = {}  # key -> the chosen launch configuration
TUNE_LOG: Dict[Tuple, Dict[str, float]] = {}  # key -> {candidate label: median us} (benchmarks, docs)
STATS: Counter = Counter()  # route name -> calls (tests check the kernels really ran)
_warned = set()


# ---------------------------------------------------------------------------------- tuning
def gemv_candidates(kw: KernelWeight, tokens: int, sm_count: int) -> List[dict]:
    """Block configurations worth timing for this weight and token count (a small list).

    (BLOCK_R, BLOCK_C, num_warps, DOT) tiles, for 1-4 tokens each elementwise tile both from the
    packed stream and from the bit planes (`gemv._vq_gemvp_kernel`, "PLANES"); each also with a
    column split when its row blocks alone would leave the GPU under-filled (< 4 programs per
    multiprocessor)."""
    one = [(1, 128, 4), (2, 64, 4), (4, 64, 4), (8, 32, 4), (8, 64, 4), (16, 32, 4), (16, 64, 8), (32, 32, 8)]
    elementwise = [(16, 32, 4), (8, 64, 4), (16, 64, 8), (32, 32, 8)]
    dot = [(4, 32, 4), (8, 32, 4), (8, 64, 4), (16, 32, 4), (16, 64, 8)]
    if tokens == 1:
        tiles = [(r, c, w, False) for r, c, w in one if r * c * kw.main.vp <= 16384]
    elif tokens <= G.MAX_ELEMENTWISE_TOKENS:
        tiles = [(r, c, w, False) for r, c, w in elementwise] + [(r, c, w, True) for r, c, w in dot[1:4]]
    else:
        tiles = [(r, c, w, True) for r, c, w in dot]
    if tokens <= G.MAX_ELEMENTWISE_TOKENS:  # elementwise tiles also from the bit planes, where a step fits
        tiles += [(r, c, w, "planes") for r, c, w, d in tiles if not d and G.plane_block_c(kw.main, c) is not None]
    out, seen = [], set()
    for R, C, w, d in tiles:
        base = {"BLOCK_R": R, "BLOCK_C": C, "num_warps": w, "num_stages": 2}
        if d == "planes":
            base["PLANES"] = True
        elif tokens > 1:
            base["DOT"] = d
        Rt, Ct = G.tile({**base, "SPLIT": 1}, tokens, kw.main.vp)[:2]
        if d == "planes":
            Ct = G.plane_block_c(kw.main, Ct) or Ct
        blocks = triton.cdiv(kw.main.rows, Rt)
        splits = {1}
        if blocks < 4 * sm_count:  # too few programs to fill the GPU: also try a column split
            s = 1
            while blocks * s < 4 * sm_count and kw.main.ncols // (s * 2) >= 4 * Ct:
                s *= 2
            splits.add(s)
            if s >= 4:
                splits.add(s // 2)
        for s in sorted(splits):
            key = (Rt, Ct, w, d, s)
            if key not in seen:  # tiles that shrink to the same launch are timed once
                seen.add(key)
                out.append({**base, "BLOCK_R": Rt, "BLOCK_C": Ct, "SPLIT": s})
    return out


def _key(kw: KernelWeight, x: torch.Tensor, has_bias: bool) -> Tuple:
    m = kw.main
    return ("gemv", kw.out_features, kw.in_features, m.v, m.k, m.k_res, m.groups, m.group_size,
            kw.outlier is not None, kw.perm is not None, kw.scale is not None, has_bias,
            x.shape[0], x.dtype, str(x.device))


def tune_gemv(kw: KernelWeight, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
              candidates: Optional[List[dict]] = None, warmup_ms: int = 5, rep_ms: int = 20) -> dict:
    """The fastest candidate for this call shape (cached). Fixed configs under the interpreter."""
    if INTERPRET or x.device.type != "cuda":
        return G.default_config(x.shape[0])
    key = _key(kw, x, bias is not None)
    if key in TUNE_CACHE:
        return TUNE_CACHE[key]
    if not TUNE and candidates is None:
        TUNE_CACHE[key] = dict(G.default_config(x.shape[0]))
        return TUNE_CACHE[key]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    cands = candidates or gemv_candidates(kw, x.shape[0], sms)
    best, best_t, times = None, float("inf"), []
    for cfg in cands:
        try:
            t = triton.testing.do_bench(lambda: G.gemv(kw, x, bias, cfg), warmup=warmup_ms, rep=rep_ms,
                                        return_mode="median")
        except Exception as e:  # a configuration that does not compile/fit (e.g. out of resources)
            log.debug("gemv config %s failed: %s", cfg, e)
            continue
        times.append((t, cfg))
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"no gemv configuration ran for key {key}")
    TUNE_CACHE[key] = dict(best)
    TUNE_LOG[key] = {config_label(c): t * 1e3 for t, c in times}
    log.debug("gemv tuned %s -> %s (%.2f us; %d candidates)", key, best, best_t * 1e3, len(times))
    return TUNE_CACHE[key]


def config_label(cfg: dict) -> str:
    return (f"R{cfg['BLOCK_R']} C{cfg['BLOCK_C']} S{cfg['SPLIT']} w{cfg['num_warps']}"
            + (" dot" if cfg.get("DOT") else "") + (" planes" if cfg.get("PLANES") else ""))


# ---------------------------------------------------------------------------------- routes
def _run_gemv(kw: KernelWeight, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    cfg = tune_gemv(kw, x, bias)
    if G.plan(kw.main, cfg, x.shape[0]).planes:
        STATS["gemv planes"] += 1  # of the "gemv" calls, those through the bit-plane kernel
    return G.gemv(kw, x, bias, cfg)


def _run_dequant_matmul(kw: KernelWeight, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    W = dequantize(kw, x.dtype, INTERPRET_DEQUANT_CONFIG if INTERPRET else DEQUANT_CONFIG)  # (out, in)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


@dataclass(frozen=True)
class Route:
    name: str
    max_tokens: Optional[int]  # None: any number of tokens
    run: Callable[[KernelWeight, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


ROUTES = (
    Route("gemv", G.MAX_TOKENS, _run_gemv),  # decode: fused, never writes the dense weight
    Route("dequant_matmul", None, _run_dequant_matmul),  # prefill: dequantize, then cuBLAS
)


def choose(tokens: int) -> Route:
    for r in ROUTES:
        if r.max_tokens is None or tokens <= r.max_tokens:
            return r
    raise AssertionError("the last route takes any token count")


# ---------------------------------------------------------------------------------- entry
def runnable(device: torch.device) -> bool:
    """Triton runs here: a CUDA device, or any tensor under the interpreter."""
    return device.type == "cuda" or INTERPRET


def _run_dequant_matmul_t(kw: KernelWeight, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """kw holds Wᵀ (a transposed `KernelLayout`, e.g. AQLM-style weights)."""
    Wt = dequantize(kw, x.dtype, INTERPRET_DEQUANT_CONFIG if INTERPRET else DEQUANT_CONFIG)  # (in, out)
    return F.linear(x, Wt.t(), None if bias is None else bias.to(x.dtype))


TRANSPOSED_ROUTE = Route("dequant_matmul_t", None, _run_dequant_matmul_t)


def kernel_weight(qlinear) -> Optional[KernelWeight]:
    """The cached kernel buffers of this layer (built on first use; rebuilt when the weight's tensors
    changed: moved, replaced or updated in place, `layout.weight_stamp`). For a transposed layout
    (AQLM-style weights) they describe Wᵀ (`kw.transposed`). None where the kernels do not fit."""
    q = qlinear.qweight
    cache = qlinear.kernel_cache
    hit = cache.get("triton")
    if hit is not None and hit[0] is q and same_stamp(hit[1], q):
        return hit[2]
    try:
        kw = from_layout(layout_of(q))
    except Unsupported as e:
        _warn_once(("unsupported", str(e)), f"kernel=triton: torch path for a weight: {e}")
        kw = None
    cache["triton"] = (q, weight_stamp(q), kw)
    return kw


def triton_linear(qlinear, x: torch.Tensor) -> Optional[torch.Tensor]:
    """`KERNELS["triton"]`: y = x W^T + b through the Triton kernels, or None (torch path)."""
    if x.dtype not in DTYPES or not runnable(x.device) or qlinear.needs_grad(x):
        if not runnable(x.device):
            _warn_once(("device", x.device.type), f"kernel=triton: Triton cannot run on {x.device.type} "
                       "(set TRITON_INTERPRET=1 before importing for the interpreter); using the torch path")
        STATS["torch"] += 1
        return None
    kw = kernel_weight(qlinear)
    if kw is None or kw.device != x.device:
        STATS["torch"] += 1
        return None
    transposed = kw.transposed
    in_f, out_f = (kw.out_features, kw.in_features) if transposed else (kw.in_features, kw.out_features)
    x2 = x.reshape(-1, in_f)  # (tokens, in)
    if x2.shape[0] == 0:
        return None
    route = TRANSPOSED_ROUTE if transposed else choose(x2.shape[0])
    y = route.run(kw, x2.contiguous(), qlinear.bias)
    if not STATS[route.name]:
        log.info("kernel=triton: first %s call (%d tokens, %s)", route.name, x2.shape[0], x.device.type)
    STATS[route.name] += 1
    return y.reshape(*x.shape[:-1], out_f)


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)
