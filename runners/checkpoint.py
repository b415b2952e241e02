"""Per-block checkpoints of quantized linears (safetensors + JSON metadata, never pickle).

Used to resume a run at the first unfinished block, and to assemble a model whose blocks were
quantized by separate jobs. One file per block: `block{i:03d}.safetensors`, tensors named
`<linear name>/<tensor>`, metadata `{"layers": {<linear name>: meta}, "stats": {...}, "code": ...}`.

The checkpoint folder is keyed by the run's config (run_key); `code` is a hash of the quantization
code (`code_version`), so a block written by other code (an update, a local edit) is quantized
again instead of being mixed with blocks of the current code. Inference kernels and the export
format are not part of the hash: changing them does not invalidate hours of quantization.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from runners.arch import set_module
from runners.files import BadFile, check_safetensors
from vptq.qlinear import QuantLinear
from vptq.qweight import weight_from_state, weight_state


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what decides the stored codes: every method, the shared solver/k-means/budget, the driver
CODE_PATHS = ("vptq", "baselines", "runners/driver.py", "runners/arch.py", "runners/checkpoint.py")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (16 hex) of the quantization code's source files (vptq/*.py without kernels/, baselines/*.py,
    the driver)."""
    files = []
    for rel in CODE_PATHS:  # folders: their top-level .py files (vptq/kernels/ is not included)
        path = os.path.join(REPO, rel)
        if os.path.isdir(path):
            files += sorted(os.path.join(rel, f) for f in os.listdir(path) if f.endswith(".py"))
        elif os.path.isfile(path):
            files.append(rel)
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(REPO, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


FLOAT_PREFIX = "__float__/"  # the block's float parameters outside its quantized linears


def block_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"block{i:03d}.safetensors")


def block_status(folder: Optional[str], i: int) -> Optional[str]:
    """None when block i has a usable checkpoint (written by the current quantization code), else
    why not: "missing", or one line naming the file and what is wrong with it."""
    path = block_path(folder, i) if folder else None
    if not path or not os.path.isfile(path):
        return "missing"
    from safetensors import safe_open

    try:
        check_safetensors(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            md = f.metadata() or {}
    except BadFile as e:
        return str(e)
    if "layers" not in md:
        return f"{path}: not a block checkpoint (no 'layers' metadata)"
    if md.get("code") != code_version():
        return f"{path}: written by other quantization code ({md.get('code')} != {code_version()})"
    return None


def block_done(folder: Optional[str], i: int) -> bool:
    """Block i has a checkpoint written by the current quantization code."""
    return block_status(folder, i) is None


def save_block(folder: str, i: int, block: nn.Module, stats: Optional[Dict] = None) -> str:
    """Atomically write every QuantLinear of `block` (its weight and bias)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors, layers = {}, {}
    quant = set()
    for name, mod in block.named_modules():
        if isinstance(mod, QuantLinear):
            quant.add(name)
            t, meta = weight_state(mod.qweight)
            for k, v in t.items():
                tensors[f"{name}/{k}"] = v
            if mod.bias is not None:
                tensors[f"{name}/__bias__"] = mod.bias.detach().contiguous().cpu()
            layers[name] = meta
    # the block's other float parameters (RMSNorm weights): block finetuning may have trained them
    for pname, p in block.named_parameters():
        if pname.rpartition(".")[0] not in quant:
            tensors[f"{FLOAT_PREFIX}{pname}"] = p.detach().contiguous().cpu()
    path = block_path(folder, i)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={"layers": json.dumps(layers), "stats": json.dumps(stats or {}, default=str),
                                      "code": code_version()})
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
        floats: Dict[str, torch.Tensor] = {}
        for key in f.keys():
            if key.startswith(FLOAT_PREFIX):
                floats[key[len(FLOAT_PREFIX):]] = f.get_tensor(key)
                continue
            name, _, t = key.rpartition("/")
            grouped[name][t] = f.get_tensor(key)
    params = dict(block.named_parameters())
    with torch.no_grad():
        for pname, t in floats.items():
            params[pname].copy_(t.to(params[pname].dtype))
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
    while i < n and block_done(folder, i):
        i += 1
    return i
