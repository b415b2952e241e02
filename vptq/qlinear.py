"""`QuantLinear`: the drop-in replacement of an nn.Linear by a quantized weight.

kernel="torch" is the reference path: dequantize the stored tensors, then `F.linear`.
Faster kernels register themselves in `KERNELS` under a name and fall back to the torch path
for weights they do not support (the dispatch lives in `forward`).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vptq.qweight import QuantizedWeight

# kernel name -> fn(qlinear, x) -> y, or None when that kernel does not support the weight
KERNELS: Dict[str, Callable[["QuantLinear", torch.Tensor], Optional[torch.Tensor]]] = {}


class QuantLinear(nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, kernel: str = "torch"):
        super().__init__()
        self.qweight = qweight
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = KERNELS.get(self.kernel)
        if fn is not None:
            y = fn(self, x)
            if y is not None:
                return y
        W = self.qweight.dequantize(dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, W, b)

    def _apply(self, fn, recurse=True):
        # keep the stored tensors on the module's device (block.to(device) moves them too)
        super()._apply(fn, recurse)
        probe = fn(torch.zeros(()))
        self.qweight.to(probe.device)
        return self

    def extra_repr(self) -> str:
        s = ", ".join(f"{k}={v}" for k, v in self.qweight.settings().items())
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, {s}"
