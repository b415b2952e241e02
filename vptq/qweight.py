"""The interface every quantized weight implements.

A `QuantizedWeight` stands for one (out_features, in_features) linear weight. It can
dequantize itself and reports its exact storage, component by component, in bits, counted
from the tensors it actually stores (indices, codebooks, residual codebooks, outliers, scales,
norms, permutations). Bits per weight in every table come from here, never from a formula of
the nominal budget.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

# storage components that count as "index" bits (per-weight codes); everything else
# (codebooks, scales, norms, permutations, ...) is overhead that only the total includes.
INDEX_COMPONENTS = ("indices", "res_indices", "outlier_indices", "codes")


@dataclass
class Storage:
    """Bits stored for one weight, by component (e.g. {"indices": 663552, "codebooks": 16384})."""

    numel: int
    bits: Dict[str, int] = field(default_factory=dict)

    @property
    def index_bits(self) -> int:
        return sum(v for k, v in self.bits.items() if k in INDEX_COMPONENTS)

    @property
    def total_bits(self) -> int:
        return sum(self.bits.values())

    def __add__(self, other: "Storage") -> "Storage":
        bits = dict(self.bits)
        for k, v in other.bits.items():
            bits[k] = bits.get(k, 0) + v
        return Storage(self.numel + other.numel, bits)

    def per_weight(self) -> Dict[str, float]:
        return {
            "index": self.index_bits / max(self.numel, 1),
            "total": self.total_bits / max(self.numel, 1),
        }


class Unsupported(ValueError):
    """A fast kernel cannot take this weight (or this call); the torch path does."""


@dataclass(frozen=True)
class KernelLayout:
    """How the fast kernels (vptq/kernels/: kernel=triton, kernel=cpu) read a weight.

    weight: a `vptq.vqweight.VQWeight` (the official VPTQ layout) equal to the weight itself, or,
    when `transposed`, to its transpose (e.g. an AQLM-style weight: vectors along the input
    dimension are the VPTQ layout of Wᵀ).
    codes: `transposed` only, optional: the weight's own stored codes viewed as (out, nj, M) uint8 or
    uint16, code m of output row o's input vector j equal to `weight`'s (res_)indices[0, j, o] (m = 0, 1)
    or extra[m - 2]'s; kernel=cpu reads them in place instead of keeping a copy (None: it copies them).
    extra: `transposed` only: more codebooks summed into each codeword like the residual, as
    (centroids (1, k, g), indices (1, nj, out)) pairs (AQLM's codebooks 2..M-1). kernel=cpu reads them;
    kernel=triton refuses such a layout (`Unsupported`)."""

    weight: "QuantizedWeight"
    transposed: bool = False
    codes: Optional[torch.Tensor] = None
    extra: Tuple = ()


class QuantizedWeight(abc.ABC):
    """A quantized (out_features, in_features) weight."""

    out_features: int
    in_features: int

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) weight the stored tensors describe."""

    @abc.abstractmethod
    def storage(self) -> Storage:
        """Exact storage of this weight, counted from the stored tensors."""

    @abc.abstractmethod
    def to(self, device) -> "QuantizedWeight":
        """Move the stored tensors (in place) and return self."""

    def settings(self) -> Dict[str, object]:
        """Human-readable parameters (vector length, codebook size, ...) for logs and tables."""
        return {}

    def kernel_layout(self) -> KernelLayout:
        """This weight as the fast kernels read it; raises `Unsupported` where no kernel fits (the
        default: such weights take the torch path). A `VQWeight` needs no hook: it is its own layout
        (`vptq.kernels.layout.layout_of`)."""
        raise Unsupported(f"{type(self).__name__} has no kernel layout")


def numel_bits(t: torch.Tensor, bits_per_element: int | None = None) -> int:
    """Bits of a stored tensor: its element size unless a packed width is given."""
    if t is None:
        return 0
    b = bits_per_element if bits_per_element is not None else t.element_size() * 8
    return int(t.numel()) * int(b)


# ---------------------------------------------------------------------------------------------
# Serialization without pickle: a QuantizedWeight is its tensors plus JSON metadata.

def weight_state(q: QuantizedWeight):
    """-> (tensors {name: Tensor}, meta {name: json-able}) for any QuantizedWeight whose
    attributes are tensors, None, or JSON-able scalars/lists/dicts (every weight in this repo)."""
    import json

    tensors, meta = {}, {}
    for k, v in vars(q).items():
        if k.startswith("_"):
            continue
        if isinstance(v, torch.Tensor):
            tensors[k] = v.detach().contiguous().cpu()
        else:
            json.dumps(v)  # raises for anything that is not plain data
            meta[k] = v
    meta["__class__"] = f"{type(q).__module__}:{type(q).__qualname__}"
    return tensors, meta


def weight_from_state(tensors, meta) -> QuantizedWeight:
    import importlib

    module, _, qual = meta["__class__"].partition(":")
    cls = importlib.import_module(module)
    for part in qual.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, QuantizedWeight)):
        raise ValueError(f"{meta['__class__']} is not a QuantizedWeight")
    obj = cls.__new__(cls)
    obj.__dict__.update({k: v for k, v in meta.items() if k != "__class__"})
    obj.__dict__.update(tensors)
    return obj


def weight_sha256(q: QuantizedWeight) -> str:
    """sha256 of everything a QuantizedWeight stores: each tensor's name, dtype, shape and bytes (in
    name order) and its JSON metadata. Equal hashes mean bitwise-equal codes, codebooks and scales:
    how two runs (two machines, two thread counts) are compared at the level of the codes."""
    import hashlib
    import json

    tensors, meta = weight_state(q)
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

