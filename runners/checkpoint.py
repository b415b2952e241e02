"""Per-block checkpoints of quantized linears (safetensors + JSON metadata, never pickle).

Used to resume a run at the first unfinished block, and to assemble a model whose blocks were
quantized by separate jobs. One file per block: `block{i:03d}.safetensors`, tensors named
`<linear name>/<tensor>`, metadata `{"layers": {<linear name>: meta}, "stats": {...}}`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from runners.arch import set_module
from vptq.qlinear import QuantLinear
from vptq.qweight import weight_from_state, weight_state


def block_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"block{i:03d}.safetensors")


def save_block(folder: str, i: int, block: nn.Module, stats: Optional[Dict] = None) -> str:
    """Atomically write every QuantLinear of `block` (its weight and bias)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors, layers = {}, {}
    for name, mod in block.named_modules():
        if isinstance(mod, QuantLinear):
            t, meta = weight_state(mod.qweight)
            for k, v in t.items():
                tensors[f"{name}/{k}"] = v
            if mod.bias is not None:
                tensors[f"{name}/__bias__"] = mod.bias.detach().contiguous().cpu()
            layers[name] = meta
    path = block_path(folder, i)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={"layers": json.dumps(layers), "stats": json.dumps(stats or {}, default=str)})
    os.replace(tmp, path)
    return path


def load_block(folder: str, i: int, block: nn.Module, kernel: str = "torch", device="cpu") -> Tuple[Dict, Dict]:
    """Install the saved QuantLinears into `block` (replacing its nn.Linears).
    -> ({linear name: QuantizedWeight}, stats)."""
    from safetensors import safe_open

    path = block_path(folder, i)
    with safe_open(path, framework="pt", device="cpu") as f:
        md = f.metadata()
        layers = json.loads(md["layers"])
        stats = json.loads(md.get("stats", "{}"))
        grouped: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in layers}
        for key in f.keys():
            name, _, t = key.rpartition("/")
            grouped[name][t] = f.get_tensor(key)
    out = {}
    for name, meta in layers.items():
        ts = grouped[name]
        bias = ts.pop("__bias__", None)
        q = weight_from_state(ts, meta).to(device)
        set_module(block, name, QuantLinear(q, bias, kernel=kernel).to(device))
        out[name] = q
    return out, stats


def finished_blocks(folder: Optional[str], n: int) -> int:
    """Number of leading blocks with a checkpoint (resume point)."""
    if not folder:
        return 0
    i = 0
    while i < n and os.path.isfile(block_path(folder, i)):
        i += 1
    return i
