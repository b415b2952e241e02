"""Where each architecture keeps its decoder blocks, and which linears share an input.

One table, no per-model forks: the layer-by-layer driver asks this table for the block list
and quantizes every nn.Linear inside a block (the embeddings and the LM head stay in float).
Linears that read the same tensor (q/k/v; gate/up) share one Hessian.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Tuple

from torch import nn

log = logging.getLogger(__name__)

LLAMA_SHARED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@dataclass(frozen=True)
class Arch:
    blocks: str = "model.layers"  # attribute path of the nn.ModuleList of decoder blocks
    shared_inputs: Tuple[Tuple[str, ...], ...] = LLAMA_SHARED


ARCHS: Dict[str, Arch] = {
    "llama": Arch(),
    "mistral": Arch(),
    "qwen2": Arch(),
    "qwen3": Arch(),
    "gemma2": Arch(),
    "gemma3_text": Arch(),
    "phi3": Arch(shared_inputs=()),  # fused qkv_proj / gate_up_proj: one linear each
}


def get_attr(obj, path: str):
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def arch_of(model: nn.Module) -> Arch:
    mt = getattr(model.config, "model_type", None)
    if mt in ARCHS:
        return ARCHS[mt]
    try:
        get_attr(model, Arch.blocks)
    except AttributeError:
        raise ValueError(f"architecture {mt!r} is not in the table runners/arch.py (known: "
                         f"{', '.join(sorted(ARCHS))}) and keeps no blocks at model.layers") from None
    log.warning("architecture %r not in the table: using model.layers, one Hessian per linear", mt)
    return Arch(shared_inputs=())


def blocks_of(model: nn.Module, arch: Arch) -> nn.ModuleList:
    return get_attr(model, arch.blocks)


def linears_of(block: nn.Module) -> Dict[str, nn.Linear]:
    """Every nn.Linear in a block, by qualified name, in module order."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def hessian_groups(names, arch: Arch) -> Dict[str, str]:
    """linear name -> the key of the Hessian it uses (shared inputs map to one key)."""
    key = {n: n for n in names}
    for group in arch.shared_inputs:
        present = [n for n in group if n in key]
        for n in present:
            key[n] = present[0]
    return key


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_attr(root, parent) if parent else root, child, new)
