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
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from runners.arch import Arch, arch_of, blocks_of, get_attr, hessian_groups, linears_of, set_module
from runners.checkpoint import block_status, load_block, save_block
from runners.files import BadFile, check_safetensors
from runners.memory import release_block
from vptq.hessian import HessianAccumulator, load_hessians, relative_proxy_loss, save_hessians
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
    hessian_dir: if set, per-block Hessians are read from / written to this folder.
    checkpoint_dir: if set, each finished block is saved there, and blocks already saved there are
        loaded instead of quantized again (a rerun resumes at the first unfinished block).
    only_blocks: quantize only these blocks (the others stay float); needs protocol="float" so
        that every block's inputs are those of the float model (layer-parallel quantization).
    block_finetune: an optional step after each block's linears are quantized (and after the
        method's own `finetune_block`), e.g. `finetune=layer`: (block, BlockContext) -> stats; it
        may read ctx.float_outputs.
    """
    if protocol not in ("quantized", "float"):
        raise ValueError(f"hessian.protocol={protocol!r}; valid choices: float, quantized")
    if only_blocks is not None and protocol != "float":
        raise ValueError("quantizing a subset of blocks needs hessian.protocol=float")
    arch = arch_of(model)
    blocks = blocks_of(model, arch)
    selected = set(range(len(blocks))) if only_blocks is None else set(only_blocks)
    plan = method.plan(quantized_shapes(model))  # every layer's settings, decided once (pure)
    stats = QuantStats(threads=thread_policy(device))
    t_start = time.perf_counter()
    needs_calib = method.needs_hessian
    # the float block's outputs are kept only where something reads them: the next block's inputs
    # (protocol float) or block finetuning; otherwise the quantized block's outputs overwrite its
    # inputs in place. Either way one activation tensor of the calibration set less.
    keep_float = protocol == "float" or method.uses_float_outputs or block_finetune is not None
    inputs = kwargs = None
    if needs_calib:
        if calib is None or calib.numel() == 0:
            raise ValueError("this method needs calibration data, and the calibration set is empty")
        inputs, kwargs = capture_block0_inputs(model, calib, device, arch)
        if str(device) == "cpu":  # embeddings and LM head: not read again until evaluation, never written;
            # their file pages fault back in from the unchanged file then
            emb = [model.get_input_embeddings(), model.get_output_embeddings()]
            release_block([m.weight.data for m in emb if m is not None and getattr(m, "weight", None) is not None])
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        # on an accelerator, the CPU (file-backed) float weights this block leaves behind
        host_weights = [l.weight.data for l in linears_of(block).values()] if str(device) != "cpu" else []
        block.to(device)
        if i not in selected:  # stays float; its float outputs feed the next block
            if needs_calib:
                inputs = run_block(block, inputs, kwargs)
            if str(device) != "cpu":
                block.to("cpu")
            continue
        why = block_status(checkpoint_dir, i) if checkpoint_dir else "missing"
        done = why is None
        if why not in (None, "missing"):
            log.warning("block %d: %s; quantizing it again", i + 1, why)
        if done:
            float_out = run_block(block, inputs, kwargs) if (needs_calib and protocol == "float") else None
            loaded, saved = load_block(checkpoint_dir, i, block, kernel=kernel, device=device)
            for q in loaded.values():
                stats.storage = stats.storage + q.storage()
            stats.layers.extend(saved.get("layers", []))
            brec = {**saved.get("block", {"block": i}), "resumed": True}
            stats.blocks.append(brec)
            if needs_calib:
                inputs = float_out if protocol == "float" else run_block(block, inputs, kwargs)
            if str(device) != "cpu":
                block.to("cpu")
            log.info("block %d/%d loaded from checkpoint %s", i + 1, len(blocks), checkpoint_dir)
            continue
        nlayers_before = len(stats.layers)
        linears = linears_of(block)
        hkeys = hessian_groups(linears, arch)
        hessians: Dict[str, torch.Tensor] = {}
        float_out = None
        if needs_calib:
            path = os.path.join(hessian_dir, f"block{i:03d}.safetensors") if hessian_dir else None
            cached = bool(path and os.path.isfile(path) and protocol == "float")
            if cached:
                try:
                    check_safetensors(path)
                except BadFile as e:
                    log.warning("%s; computing the Hessians again", e)
                    cached = False
            if cached:
                hessians = load_hessians(path, device)
                float_out = run_block(block, inputs, kwargs)
            else:
                hessians, float_out = collect_hessians(block, inputs, kwargs, hkeys, linears, keep_outputs=keep_float)
                if path:
                    save_hessians(path, hessians, {"block": str(i), "protocol": protocol})
        losses = []
        old_weights = []
        for name, lin in linears.items():
            tl = time.perf_counter()
            W = lin.weight.data.to(device=device, dtype=torch.float32)
            H = hessians.get(hkeys[name]) if needs_calib else None
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
            qlin = QuantLinear(q, lin.bias, kernel=kernel).to(device)
            set_module(block, name, qlin)
            old_weights.append(lin.weight.data)
            del W, What
        ft = {}
        if needs_calib:
            ctx = BlockContext(inputs, float_out, kwargs, device, i)
            ft = method.finetune_block(block, ctx) or {}
            if block_finetune is not None:
                ft.update(block_finetune(block, ctx) or {})
            del ctx
            if protocol == "quantized":
                inputs = run_block(block, inputs, kwargs, out=inputs)  # in place: inputs are not read again
            else:
                inputs = float_out
        del hessians, float_out
        release_block(old_weights + host_weights)  # the float weights' file pages and freed heap to the system
        del old_weights, host_weights
        if str(device) != "cpu":
            block.to("cpu")
        brec = {"block": i, "time_s": time.perf_counter() - t0,
                "mean_rel_proxy_loss": (sum(losses) / len(losses)) if losses else None, **ft}
        stats.blocks.append(brec)
        if checkpoint_dir:
            save_block(checkpoint_dir, i, block, {"block": brec, "layers": stats.layers[nlayers_before:]})
        log.info("block %d/%d quantized in %.1f s%s", i + 1, len(blocks), brec["time_s"],
                 f", mean rel. proxy loss {brec['mean_rel_proxy_loss']:.4g}" if losses else "")
        if on_block:
            on_block(brec)
    if str(device) != "cpu":
        torch.cuda.empty_cache()
    stats.quantize_s = time.perf_counter() - t_start
    return stats


def quantized_shapes(model: nn.Module):
    """(out, in) of every linear the driver would quantize."""
    arch = arch_of(model)
    return [tuple(l.weight.shape) for b in blocks_of(model, arch) for l in linears_of(b).values()]
