"""The one layer-by-layer driver, for every method and every architecture.

    inputs of block 0  <- the model's embedding path on the calibration windows
    for each decoder block i (the only block on the compute device):
        one pass: accumulate H = E[x xᵀ] for every linear input (q/k/v share one, gate/up share
                  one) and record the float block's outputs
        quantize each linear: method.quantize_layer(W, H) -> QuantizedWeight -> QuantLinear
        optional block finetuning (method.finetune_block)
        inputs of block i+1 <- the quantized block's outputs   (hessian.protocol=quantized)
                            <- the float block's outputs       (hessian.protocol=float)

Memory: the calibration activations (N, L, D) plus one block live on the device; the rest of
the model stays where it was loaded (CPU).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from runners.arch import Arch, arch_of, blocks_of, get_attr, hessian_groups, linears_of, set_module
from runners.checkpoint import block_status, load_block, save_block
from runners.memory import release_block
from vptq.hessian import HessianAccumulator, relative_proxy_loss
from vptq.methods import BlockContext, Method
from vptq.qlinear import QuantLinear, dense_weights
from vptq.qweight import Storage
from vptq.threads import single_thread, thread_policy

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records its inputs and stops the forward pass."""

    def __init__(self, module: nn.Module, store: list):
        super().__init__()
        self.module = module
        self.store = store

    def __getattr__(self, name):  # models read attributes of their layers (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.store.append((hidden, {k: v for k, v in kwargs.items()}))
        raise _StopForward


@dataclass
class QuantStats:
    storage: Storage = field(default_factory=lambda: Storage(0, {}))
    layers: List[Dict] = field(default_factory=list)  # per linear: name, shape, rel proxy loss, time
    blocks: List[Dict] = field(default_factory=list)  # per block: index, time, mean rel proxy loss
    quantize_s: float = 0.0
    threads: Dict = field(default_factory=dict)  # vptq.threads.thread_policy of the run
    # what the run cost: block_forwards (passes of one block over the calibration set), hessian_bytes_
    # written/read (the Hessian cache), and per-stage wall times where stages apply
    cost: Dict = field(default_factory=dict)


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _outer_modules(model: nn.Module, arch: Arch):
    """The modules outside the decoder blocks that the forward pass up to block 0 needs."""
    inner_path = arch.blocks.rpartition(".")[0]
    inner = get_attr(model, inner_path) if inner_path else model
    return [m for n, m in inner.named_children() if m is not blocks_of(model, arch)]


@torch.no_grad()
def capture_block0_inputs(model: nn.Module, windows: torch.Tensor, device, arch: Arch):
    """-> (inputs (N, L, D) on device, block kwargs) for the calibration windows (N, L)."""
    blocks = blocks_of(model, arch)
    outer = _outer_modules(model, arch)
    for m in outer:
        m.to(device)
    store: list = []
    first = blocks[0]
    blocks[0] = _Catcher(first, store)
    try:
        for i in range(windows.shape[0]):
            try:
                model(windows[i:i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = first
    inputs = torch.cat([h for h, _ in store], dim=0)
    kwargs = store[0][1]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return inputs, kwargs


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs, *, out: Optional[torch.Tensor] = None,
              keep: bool = True) -> Optional[torch.Tensor]:
    """The block on each calibration window (one at a time) -> outputs (N, L, D).
    out=inputs writes each window's output over its input (a window's output depends on that
    window only): no second activation tensor. keep=False runs the block and keeps nothing
    (a pass for its forward hooks)."""
    if keep and out is None:
        out = torch.empty_like(inputs)
    with dense_weights(block, kernels=("torch", "cpu")):  # a quantized layer dequantized once per pass
        for i in range(inputs.shape[0]):
            y = _block_out(block(inputs[i:i + 1], **kwargs))
            if keep:
                out[i:i + 1] = y
    return out if keep else None


@torch.no_grad()
def collect_hessians(block: nn.Module, inputs: torch.Tensor, kwargs, hkeys: Dict[str, str],
                     linears: Dict[str, nn.Linear], keep_outputs: bool = True):
    """One pass of the float block: -> ({hessian key: H}, float outputs (N, L, D), or None when
    not keep_outputs)."""
    accs: Dict[str, HessianAccumulator] = {}
    hooks = []
    for name, lin in linears.items():
        key = hkeys[name]
        if key != name:
            continue  # shares the input of `key`

        def hook(mod, args, _out, key=key):
            x = args[0]
            if key not in accs:
                accs[key] = HessianAccumulator(x.shape[-1], x.device)
            accs[key].add_batch(x)

        hooks.append(lin.register_forward_hook(hook))
    try:
        outputs = run_block(block, inputs, kwargs, keep=keep_outputs)
    finally:
        for h in hooks:
            h.remove()
    return {k: a.finalize() for k, a in accs.items()}, outputs


@dataclass
class _Run:
    """What one `quantize_model` call holds while it walks the blocks."""

    method: Method
    plan: Dict
    device: object
    kernel: str
    protocol: str
    arch: Arch
    stats: QuantStats
    keep_float: bool
    checkpoint_dir: Optional[str]
    hessian_dir: Optional[str]
    cache_key: object  # runners.capture.CaptureKey for hessian_dir, or None
    block_finetune: Optional[Callable]
    on_block: Optional[Callable]
    n_blocks: int = 0


def quantize_model(
    model: nn.Module,
    method: Method,
    *,
    calib: Optional[torch.Tensor],
    device,
    kernel: str = "torch",
    protocol: str = "quantized",
    hessian_dir: Optional[str] = None,
    checkpoint_dir: Optional[str] = None,
    only_blocks: Optional[Sequence[int]] = None,
    on_block: Optional[Callable[[Dict], None]] = None,
    block_finetune: Optional[Callable[[nn.Module, BlockContext], Dict]] = None,
) -> QuantStats:
    """Quantize every linear inside the model's decoder blocks, in place.

    calib: (N, L) calibration token windows (required when the method needs Hessians).
    hessian_dir: with protocol="float", per-block Hessians are read from / written to this folder
        (`runners.capture` files, keyed by the float weights and the calibration tokens).
    checkpoint_dir: if set, each finished block is saved there, and blocks already saved there are
        loaded instead of quantized again (a rerun resumes at the first unfinished block).
    only_blocks: quantize only these blocks (the others stay float); needs protocol="float" so
        that every block's inputs are those of the float model.
    block_finetune: an optional step after each block's linears are quantized (and after the
        method's own `finetune_block`), e.g. `finetune=layer`: (block, BlockContext) -> stats; it
        may read ctx.float_outputs.
    Steps per block: `_pass_float` (not selected), `_resume_block` (checkpoint), `_quantize_block`.
    """
    if protocol not in ("quantized", "float"):
        raise ValueError(f"hessian.protocol={protocol!r}; valid choices: float, quantized")
    if only_blocks is not None and protocol != "float":
        raise ValueError("quantizing a subset of blocks needs hessian.protocol=float")
    t_start = time.perf_counter()
    arch = arch_of(model)
    blocks = blocks_of(model, arch)
    selected = set(range(len(blocks))) if only_blocks is None else set(only_blocks)
    run = _Run(method=method, plan=method.plan(quantized_shapes(model)), device=device, kernel=kernel,
               protocol=protocol, arch=arch, stats=QuantStats(threads=thread_policy(device)),
               # the float block's outputs are kept only where something reads them: the next block's
               # inputs (protocol float) or block finetuning; otherwise the quantized block's outputs
               # overwrite its inputs in place: one activation tensor of the calibration set less
               keep_float=protocol == "float" or method.uses_float_outputs or block_finetune is not None,
               checkpoint_dir=checkpoint_dir, hessian_dir=hessian_dir if protocol == "float" else None,
               cache_key=None, block_finetune=block_finetune, on_block=on_block, n_blocks=len(blocks))
    if hessian_dir and protocol != "float":
        log.info("hessian.cache_dir is read only with hessian.protocol=float (quantized-protocol Hessians "
                 "depend on the quantized blocks before): not used")
    inputs = kwargs = None
    if method.needs_hessian or block_finetune is not None:  # block finetuning reads the inputs too (RTN)
        inputs, kwargs = _calibration_inputs(model, calib, device, arch)
        if run.hessian_dir and method.needs_hessian:
            from runners.capture import make_key

            run.cache_key = make_key(model, calib, protocol)
    for i, block in enumerate(blocks):
        if i not in selected:
            inputs = _pass_float(run, block, inputs, kwargs)
            continue
        why = block_status(checkpoint_dir, i) if checkpoint_dir else "missing"
        if why not in (None, "missing"):
            log.warning("block %d: %s; quantizing it again", i + 1, why)
        if why is None:
            inputs = _resume_block(run, i, block, inputs, kwargs)
            log.info("block %d/%d loaded from checkpoint %s", i + 1, len(blocks), checkpoint_dir)
        else:
            inputs = _quantize_block(run, i, block, inputs, kwargs)
    if str(device) != "cpu":
        torch.cuda.empty_cache()
    run.stats.quantize_s = time.perf_counter() - t_start
    return run.stats


def _calibration_inputs(model, calib, device, arch):
    """Block 0's inputs on the calibration windows; then the embeddings' file pages are dropped."""
    if calib is None or calib.numel() == 0:
        raise ValueError("this method needs calibration data, and the calibration set is empty")
    inputs, kwargs = capture_block0_inputs(model, calib, device, arch)
    if str(device) == "cpu":  # embeddings and LM head: not read again until evaluation, never written;
        # their file pages fault back in from the unchanged file then
        emb = [model.get_input_embeddings(), model.get_output_embeddings()]
        release_block([m.weight.data for m in emb if m is not None and getattr(m, "weight", None) is not None])
    return inputs, kwargs


def _forward(run: _Run, block, inputs, kwargs, **kw):
    """run_block, counted (QuantStats.cost["block_forwards"]: passes of a block over the calibration set)."""
    run.stats.cost["block_forwards"] = run.stats.cost.get("block_forwards", 0) + 1
    return run_block(block, inputs, kwargs, **kw)


def _pass_float(run: _Run, block, inputs, kwargs):
    """A block that stays float: its float outputs feed the next block."""
    block.to(run.device)
    if inputs is not None:
        inputs = _forward(run, block, inputs, kwargs)
    if str(run.device) != "cpu":
        block.to("cpu")
    return inputs


def _resume_block(run: _Run, i: int, block, inputs, kwargs):
    """Install block i from its checkpoint; -> the next block's inputs."""
    block.to(run.device)
    float_out = _forward(run, block, inputs, kwargs) if (inputs is not None and run.protocol == "float") else None
    loaded, saved = load_block(run.checkpoint_dir, i, block, kernel=run.kernel, device=run.device)
    for q in loaded.values():
        run.stats.storage = run.stats.storage + q.storage()
    run.stats.layers.extend(saved.get("layers", []))
    run.stats.blocks.append({**saved.get("block", {"block": i}), "resumed": True})
    if inputs is not None:
        inputs = float_out if run.protocol == "float" else _forward(run, block, inputs, kwargs)
    if str(run.device) != "cpu":
        block.to("cpu")
    return inputs


def _block_hessians(run: _Run, i: int, block, inputs, kwargs, hkeys, linears):
    """-> ({hessian key: H}, the float block's outputs or None): from the Hessian cache (float
    protocol) or one float pass, written to the cache when there is one."""
    from runners.capture import CacheCost, read_block, write_block

    if not run.method.needs_hessian:  # a method without Hessians whose block is finetuned: outputs only
        return {}, _forward(run, block, inputs, kwargs) if run.keep_float else None
    cost = CacheCost()
    cached = read_block(run.hessian_dir, i, run.cache_key, run.device, cost) if run.hessian_dir else None
    if cached is not None:
        float_out = _forward(run, block, inputs, kwargs)
        hessians = cached["H"]
    else:
        run.stats.cost["block_forwards"] = run.stats.cost.get("block_forwards", 0) + 1
        hessians, float_out = collect_hessians(block, inputs, kwargs, hkeys, linears, keep_outputs=run.keep_float)
        if run.hessian_dir:
            write_block(run.hessian_dir, i, run.cache_key, hessians, cost)
    for k in ("bytes_written", "bytes_read"):
        run.stats.cost[f"hessian_{k}"] = run.stats.cost.get(f"hessian_{k}", 0) + getattr(cost, k)
    return hessians, float_out


def quantize_linears(block, i: int, method: Method, plan: Dict, hessians: Dict[str, torch.Tensor],
                     hkeys: Dict[str, str], device, kernel: str, stats: QuantStats) -> Tuple[List[float], List]:
    """Quantize every linear of block i with its Hessian (None for methods without calibration) and
    put QuantLinears in their place; per-layer records into `stats`. -> (relative proxy losses, the
    float weights replaced). Shared by the serial driver and the block jobs (runners/parallel.py)."""
    losses, old_weights = [], []
    for name, lin in linears_of(block).items():
        tl = time.perf_counter()
        W = lin.weight.data.to(device=device, dtype=torch.float32)
        H = hessians.get(hkeys[name]) if hessians else None
        qname = f"{i}.{name}"
        lp = plan.get(tuple(W.shape))  # None: a method without per-layer settings, called as before
        with single_thread(device):  # small ops: one thread on CPU (vptq.threads)
            q = method.quantize_layer(W, H, name=qname, **({} if lp is None else {"plan": lp}))
        What = q.dequantize(torch.float32)
        if What.shape != W.shape or not torch.isfinite(What).all():
            raise RuntimeError(f"{method.name} produced an invalid weight for {qname}")
        rec = {"name": qname, "shape": list(W.shape), "time_s": time.perf_counter() - tl,
               "rel_weight_err": float(((W - What).norm() / W.norm().clamp_min(1e-30)) ** 2)}
        if H is not None:
            rec["rel_proxy_loss"] = relative_proxy_loss(W, What, H)
            losses.append(rec["rel_proxy_loss"])
        rec.update({k: v for k, v in q.settings().items()})
        st = q.storage()
        rec["bits_total"] = st.total_bits / st.numel
        stats.storage = stats.storage + st
        stats.layers.append(rec)
        set_module(block, name, QuantLinear(q, lin.bias, kernel=kernel).to(device))
        old_weights.append(lin.weight.data)
        del W, What
    return losses, old_weights


def finetune_block(block, ctx: BlockContext, method: Method, block_finetune: Optional[Callable]) -> Dict:
    """The method's own block finetuning, then the configured one (finetune=layer)."""
    ft = method.finetune_block(block, ctx) or {}
    if block_finetune is not None:
        ft.update(block_finetune(block, ctx) or {})
    return ft


def _quantize_block(run: _Run, i: int, block, inputs, kwargs):
    """Hessians, every linear, block finetuning, checkpoint; -> the next block's inputs."""
    t0 = time.perf_counter()
    stats = run.stats
    # on an accelerator, the CPU (file-backed) float weights this block leaves behind
    host_weights = [l.weight.data for l in linears_of(block).values()] if str(run.device) != "cpu" else []
    block.to(run.device)
    nlayers_before = len(stats.layers)
    linears = linears_of(block)
    hkeys = hessian_groups(linears, run.arch)
    hessians, float_out = ({}, None)
    if inputs is not None:
        hessians, float_out = _block_hessians(run, i, block, inputs, kwargs, hkeys, linears)
    losses, old_weights = quantize_linears(block, i, run.method, run.plan, hessians, hkeys, run.device,
                                           run.kernel, stats)
    ft = {}
    if inputs is not None:
        ft = finetune_block(block, BlockContext(inputs, float_out, kwargs, run.device, i), run.method,
                            run.block_finetune)
        if run.protocol == "quantized":
            inputs = _forward(run, block, inputs, kwargs, out=inputs)  # in place: inputs are not read again
        else:
            inputs = float_out
    del hessians, float_out
    release_block(old_weights + host_weights)  # the float weights' file pages and freed heap to the system
    del old_weights, host_weights
    if str(run.device) != "cpu":
        block.to("cpu")
    brec = {"block": i, "time_s": time.perf_counter() - t0,
            "mean_rel_proxy_loss": (sum(losses) / len(losses)) if losses else None, **ft}
    stats.blocks.append(brec)
    if run.checkpoint_dir:
        save_block(run.checkpoint_dir, i, block, {"block": brec, "layers": stats.layers[nlayers_before:]})
    log.info("block %d/%d quantized in %.1f s%s", i + 1, run.n_blocks, brec["time_s"],
             f", mean rel. proxy loss {brec['mean_rel_proxy_loss']:.4g}" if losses else "")
    if run.on_block:
        run.on_block(brec)
    return inputs


def quantized_shapes(model: nn.Module):
    """(out, in) of every linear the driver would quantize."""
    arch = arch_of(model)
    return [tuple(l.weight.shape) for b in blocks_of(model, arch) for l in linears_of(b).values()]
