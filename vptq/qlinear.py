"""`QuantLinear`: the drop-in replacement of an nn.Linear by a quantized weight, and `dense_weights`,
the evaluation mode that dequantizes each quantized layer once instead of on every forward.

kernel="torch" is the reference path: dequantize the stored tensors, then `F.linear`.
Faster kernels register themselves in `KERNELS` under a name ("triton": vptq/kernels/dispatch.py,
"cpu": vptq/kernels/cpu.py; importing `vptq.kernels` registers both) and return None, i.e. fall back
to the torch path, for weights or calls they do not take (the dispatch lives in `forward`).

Inside `with dense_weights(model):` a layer's first forward dequantizes its weight exactly as the
torch path does (same call, same dtype) and keeps it; every later forward is `F.linear` with it, so
outputs are bitwise those of kernel="torch" and evaluating a quantized model costs what evaluating
the float one does (plus one dequantization per layer). The dense weights are freed on exit.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vptq.qweight import QuantizedWeight

# kernel name -> fn(qlinear, x) -> y, or None when that kernel does not support the weight or call
KERNELS: Dict[str, Callable[["QuantLinear", torch.Tensor], Optional[torch.Tensor]]] = {}
STATS: Counter = Counter()  # "dequantize": full dequantizations by QuantLinear (tests, logs)


class QuantLinear(nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, kernel: str = "torch"):
        super().__init__()
        self.qweight = qweight
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = kernel
        self._dense: Optional[Dict[tuple, torch.Tensor]] = None  # (dtype, device) -> W, inside dense_weights

    @property
    def kernel_cache(self) -> Dict[str, object]:
        """Buffers kernels build from the weight (name -> anything), dropped when the module moves."""
        if "_kernel_cache" not in self.__dict__:
            self.__dict__["_kernel_cache"] = {}
        return self.__dict__["_kernel_cache"]

    def needs_grad(self, x: torch.Tensor) -> bool:
        """Autograd must see this call (kernels have no backward): grad is enabled and x, the bias or a
        stored tensor of the weight requires grad (e.g. codebooks being finetuned)."""
        if not torch.is_grad_enabled():
            return False
        ts = [x, self.bias] + [t for t in vars(self.qweight).values() if isinstance(t, torch.Tensor)]
        return any(t is not None and t.requires_grad for t in ts)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (the torch path's; counted in STATS)."""
        STATS["dequantize"] += 1
        return self.qweight.dequantize(dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        dense = self.__dict__.get("_dense")
        if dense is not None:  # inside dense_weights: dequantized once, kept
            key = (x.dtype, x.device)
            W = dense.get(key)
            if W is None:
                W = dense[key] = self.dequantize(x.dtype)
            return F.linear(x, W, b)
        fn = KERNELS.get(self.kernel)
        if fn is not None:
            y = fn(self, x)
            if y is not None:
                return y
        return F.linear(x, self.dequantize(x.dtype), b)

    def _apply(self, fn, recurse=True):
        # keep the stored tensors on the module's device (block.to(device) moves them too)
        super()._apply(fn, recurse)
        probe = fn(torch.zeros(()))
        self.qweight.to(probe.device)
        self.kernel_cache.clear()
        if self.__dict__.get("_dense") is not None:
            self._dense = {}
        return self

    def extra_repr(self) -> str:
        s = ", ".join(f"{k}={v}" for k, v in self.qweight.settings().items())
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, {s}"


@contextlib.contextmanager
def dense_weights(model: nn.Module, enabled: bool = True,
                  kernels: Optional[Sequence[str]] = None) -> Iterator[int]:
    """Evaluate `model` with each QuantLinear dequantized once (on its first forward, in that call's
    dtype) instead of on every forward; the dense weights are freed on exit. Outputs are bitwise those
    of kernel="torch". Holds every layer's dense weight until exit: the float model's memory.

    enabled: False makes it a no-op (e.g. `enabled=device.type == "cpu"`).
    kernels: only layers whose kernel is one of these (None: every layer). Pass ("torch", "cpu") to
    leave kernel=triton layers on their kernel route.
    Yields the number of layers it covers. Nested uses leave layers an outer one covers to it."""
    layers = []
    if enabled:
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)
                  and (kernels is None or m.kernel in kernels) and m.__dict__.get("_dense") is None]
    for m in layers:
        m._dense = {}
    try:
        yield len(layers)
    finally:
        for m in layers:
            m._dense = None
