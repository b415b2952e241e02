"""Decode throughput and per-layer GEMV timing of a quantized model (metrics.json "kernel").

Called by `runners/job.py` after perplexity when `kernel.throughput` is on (default: on for a
CUDA device, off on CPU). What it measures (gpt-fast habits: warm-up excluded, device
synchronized, medians):
  * decode tokens/s at batch 1: a seeded random prompt is prefilled, `warmup_tokens` greedy
    decode steps run untimed (compilation, autotuning), then `decode_tokens` steps are timed;
  * per linear of the first decoder block, one token through the layer as the run's kernel
    executes it: time (us), achieved GB/s for the bytes the layer must read (its stored
    quantized weight, `QuantizedWeight.storage()`, plus x and y), the fraction of the device's
    memory-bandwidth roofline (`PEAK_GBPS`; null on CPU or an unknown device), and the same
    shape through a dense `F.linear` in the model's dtype for comparison;
  * the memory the decoding model holds (`resident_bytes`): its parameters, buffers and quantized
    weights' tensors, and what the kernels built from them and keep (`kernel_buffer_bytes`: e.g.
    kernel=cpu's float32 small codebooks, Triton's packed indices), each storage counted once.
"""
from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

# Vendor peak memory bandwidth (GB/s) by device-name substring; the first match wins.
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (HBM3), e.g. "NVIDIA H100 80GB HBM3"
    ("H800", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("L4", 300.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from runners.metrics import _cpu_model

    return _cpu_model() or "cpu"


def peak_gbps(device: torch.device) -> Optional[float]:
    """The roofline's bandwidth for this device, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    return peak_gbps_for(device_name(device))


def peak_gbps_for(name: str) -> Optional[float]:
    """The first PEAK_GBPS entry whose key is in the device name (so a more specific key, e.g.
    "H100 PCIe", must come before a key it contains, "H100"), or None."""
    for key, bw in PEAK_GBPS:
        if key in name:
            return bw
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], Any], device: torch.device, reps: int = 20) -> float:
    """Median time of fn() in microseconds (CUDA: triton's do_bench, events, L2 flushed)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")) * 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def decode_tokens_per_s(model, device: torch.device, *, prompt_tokens: int, decode_tokens: int,
                        warmup_tokens: int, seed: int = 0) -> Dict[str, Any]:
    """Greedy decode at batch 1 with the KV cache; only the last `decode_tokens` steps are timed."""
    if decode_tokens < 1 or prompt_tokens < 1 or warmup_tokens < 0:
        raise ValueError(f"decode_tokens={decode_tokens}, prompt_tokens={prompt_tokens} must be >= 1, "
                         f"warmup_tokens={warmup_tokens} >= 0")
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=g).to(device)  # (1, P)
    # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` deprecated)
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(ids, use_cache=True)
    cache = _cache_of(out)
    nxt = out.logits[:, -1:].argmax(-1)  # (1, 1)
    t0 = None
    for step in range(warmup_tokens + decode_tokens):
        if step == warmup_tokens:
            _sync(device)
            t0 = time.perf_counter()
        out = model(nxt, use_cache=True, **{arg: cache})
        cache = _cache_of(out)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"decode_tok_s": decode_tokens / dt, "decode_ms_per_token": dt / decode_tokens * 1e3,
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "warmup_tokens": warmup_tokens}


def _route(lin, x) -> str:
    """Which path a QuantLinear takes for x: 'triton:<route>', 'cpu' (the C++ kernel) or 'torch'."""
    if lin.kernel == "triton":
        from vptq.kernels import dispatch

        if dispatch.triton_linear(lin, x) is not None:
            return "triton:" + dispatch.choose(x.reshape(-1, lin.in_features).shape[0]).name
    elif lin.kernel == "cpu":
        from vptq.kernels import cpu

        if cpu.takes(lin, x) is not None:
            return "cpu"
    return "torch"


@torch.no_grad()
def layer_timings(model, device: torch.device, reps: int = 20) -> Dict[str, Dict[str, Any]]:
    """One token through each quantized linear of the first decoder block."""
    from runners.arch import arch_of, blocks_of
    from vptq.qlinear import QuantLinear

    dtype = next(model.parameters()).dtype
    block = blocks_of(model, arch_of(model))[0]
    peak = peak_gbps(device)
    out: Dict[str, Dict[str, Any]] = {}
    for name, lin in block.named_modules():
        if not isinstance(lin, QuantLinear):
            continue
        x = torch.randn(1, lin.in_features, dtype=dtype, device=device)  # (1, in)
        us = time_us(lambda: lin(x), device, reps)
        st = lin.qweight.storage()
        nbytes = st.total_bits / 8 + (lin.in_features + lin.out_features) * x.element_size()
        gbps = nbytes / (us * 1e-6) / 1e9
        Wd = torch.randn(lin.out_features, lin.in_features, dtype=dtype, device=device)
        dense_us = time_us(lambda: F.linear(x, Wd), device, reps)
        del Wd
        out[name] = {"shape": [lin.out_features, lin.in_features], "path": _route(lin, x), "time_us": us,
                     "bytes": int(nbytes), "gbps": gbps, "roofline": (gbps / peak) if peak else None,
                     "dense_us": dense_us, "speedup_vs_dense": dense_us / us}
    return out


def _tensors(obj, depth: int = 0):
    """Every tensor in obj: a tensor, or nested in tuples, lists, dicts and dataclass-like objects."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 8 and isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif depth < 8 and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth + 1)
    elif depth < 8 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        for o in vars(obj).values():
            yield from _tensors(o, depth + 1)


def resident_bytes(model) -> Dict[str, int]:
    """Bytes of the tensors the model holds, each storage once: `model_bytes` (parameters, buffers,
    quantized weights' tensors) and `kernel_buffer_bytes` (storages only the QuantLinears' kernel caches
    reach: what a kernel added to the model's memory)."""
    from vptq.qlinear import QuantLinear

    seen: set = set()

    def add(ts) -> int:
        n = 0
        for t in ts:
            st = t.untyped_storage()
            key = (t.device, st.data_ptr())
            if st.nbytes() and key not in seen:
                seen.add(key)
                n += st.nbytes()
        return n

    model_b = add(t for m in model.modules() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    qlins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    model_b += add(t for m in qlins for t in _tensors(vars(m.qweight)))
    kernel_b = add(t for m in qlins for t in _tensors(m.kernel_cache))
    return {"model_bytes": model_b, "kernel_buffer_bytes": kernel_b}


def measure(model, device, *, prompt_tokens: int = 16, decode_tokens: int = 32, warmup_tokens: int = 4,
            seed: int = 0, layer_reps: int = 20) -> Dict[str, Any]:
    """The `kernel` entries of metrics.json: device, roofline bandwidth, decode tok/s, layers."""
    device = torch.device(device)
    model.eval()
    res: Dict[str, Any] = {"device": device_name(device), "peak_gbps": peak_gbps(device),
                           "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    res.update(decode_tokens_per_s(model, device, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                                   warmup_tokens=warmup_tokens, seed=seed))
    res["layers"] = layer_timings(model, device, layer_reps)
    res["resident_bytes"] = resident_bytes(model)  # after decode: the kernels' buffers are built
    return res
