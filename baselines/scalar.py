"""Scalar (uniform, asymmetric min-max) grids and the weight they produce.

Shared by RTN and GPTQ. Per output channel, or per group of `group_size` input columns, a
weight is stored as an integer code q in [0, 2^b - 1] with a float16 scale s and an integer
zero point z in [0, 2^b - 1]:  ŵ = s · (q - z).
Stored per weight: b bits. Per (row, group): 16 bits of scale + b bits of zero point.

The grid (IST-DASLab/gptq `quant.py` `Quantizer.find_params`, asymmetric, per channel):
xmin = min(min W, 0), xmax = max(max W, 0) (both ±1 where the row is all zero), s = (xmax -
xmin) / (2^b - 1), z = round(-xmin / s). Their code takes the codes q = clamp(round(w / s) + z)
with the float32 s (`fp16_scale=False`, variant=reference); what is stored is s rounded to
float16 (16 bits, as the GPTQ paper counts a group's scale), so the stored weight dequantizes
to s16 · (q - z), within 2^-12 relative of what their loop used. Our variant=consistent rounds s
to float16 first and codes against it (`fp16_scale=True`): the loop sees exactly what is stored.

Budget (`scalar_plan`, per layer shape): the widest code b, then the smallest group (most
scales; a multiple of 32 columns, or per channel) whose realized total b + (16 + b)·groups / in
stays within bits + tolerance (e.g. 576-wide rows at bits=2: b=2, groups of 192, 2.094 bits).
Explicit `wbits` / `group_size` fix those choices (an explicit wbits the budget cannot meet is
used per channel, as given).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from vptq.methods import BudgetError
from vptq.numerics import round_fp16
from vptq.qweight import QuantizedWeight, Storage

SCALE_BITS = 16
GROUP_STEP = 32  # the budget's group sizes are multiples of this many columns


def scalar_total_bits(wbits: int, group_size: Optional[int], in_features: int) -> float:
    """Total bits/weight of a scalar grid (codes + fp16 scale + b-bit zero per group)."""
    g = in_features if group_size is None else group_size
    ngroups = math.ceil(in_features / g)
    return wbits + ngroups * (SCALE_BITS + wbits) / in_features


def scalar_budget(bits: float, shapes, group_size: Optional[int], tolerance: float, wbits: Optional[int] = None) -> int:
    """Largest code width b whose realized total bits stay within bits + tolerance on every
    shape. `wbits` given explicitly overrides the budget (but must be 1..8)."""
    if wbits is not None:
        if not 1 <= wbits <= 8:
            raise BudgetError(f"method.wbits={wbits} is not a valid code width; valid: 1..8")
        return int(wbits)
    best = None
    for b in range(1, 9):
        if all(scalar_total_bits(b, group_size, in_f) <= bits + tolerance for (_, in_f) in shapes):
            best = b
    if best is None:
        lowest = max(scalar_total_bits(1, group_size, in_f) for (_, in_f) in shapes)
        raise BudgetError(
            f"bits={bits:g} is impossible for a scalar grid: the smallest (1-bit codes, "
            f"group_size={group_size}) needs {lowest:.3f} bits/weight; valid: bits >= {lowest - tolerance:.3f}"
        )
    return best


@dataclass(frozen=True)
class ScalarPlan:
    """One layer's scalar-grid settings: code width and input columns per (scale, zero)."""

    wbits: int
    group_size: Optional[int]  # None = one grid per output channel

    def short(self) -> str:
        return f"w{self.wbits}" + (f"g{self.group_size}" if self.group_size else "")


def scalar_plan(bits: Optional[float], out_f: int, in_f: int, *, wbits: Optional[int], group_size: Optional[int],
                tolerance: float, choose_group: bool = True) -> ScalarPlan:
    """The layer plan of RTN/GPTQ for one (out, in) shape (see the module docstring);
    choose_group=False: per channel unless group_size is given."""
    if group_size is not None and group_size < 1:
        raise BudgetError(f"method.group_size={group_size} must be a positive number of columns or null")
    if bits is None:
        if wbits is None:
            raise BudgetError("a scalar grid needs bits= (a total bits/weight budget) or method.wbits")
        return ScalarPlan(scalar_budget(0, [], group_size, 0, wbits), group_size)
    b = scalar_budget(bits, [(out_f, in_f)], group_size if group_size is not None else None, tolerance, wbits)
    if group_size is not None or not choose_group:
        return ScalarPlan(b, group_size)
    limit = bits + tolerance + 1e-12
    for g in range(GROUP_STEP, in_f, GROUP_STEP):  # smallest group first
        if scalar_total_bits(b, g, in_f) <= limit:
            return ScalarPlan(b, g)
    return ScalarPlan(b, None)


class ScalarGrid:
    """Asymmetric min-max grid for a set of rows: scale (rows,), zero (rows,) from W (rows, cols)."""

    def __init__(self, wbits: int):
        self.wbits = wbits
        self.maxq = 2**wbits - 1

    def fit(self, W: torch.Tensor, fp16_scale: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """W: (rows, cols) -> scale (rows,) float32, zero (rows,) int64. fp16_scale: the scale
        rounded to float16 first (ours); False: their float32 scale (`Quantizer.find_params`)."""
        xmin = torch.clamp(W.min(dim=1).values, max=0)
        xmax = torch.clamp(W.max(dim=1).values, min=0)
        same = (xmax - xmin) == 0
        xmin = torch.where(same, xmin - 1, xmin)
        xmax = torch.where(same, xmax + 1, xmax)
        if not fp16_scale:
            scale = (xmax - xmin) / self.maxq
            return scale, torch.round(-xmin / scale).to(torch.int64)
        scale = stored_scale((xmax - xmin) / self.maxq).float()  # float16 values: what is stored is used
        zero = torch.clamp(torch.round(-xmin / scale), 0, self.maxq).to(torch.int64)
        return scale, zero

    def quantize(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes (rows, cols) int64 for W with per-row scale/zero."""
        q = torch.round(W / scale[:, None]) + zero[:, None]
        return torch.clamp(q, 0, self.maxq).to(torch.int64)

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return scale[:, None] * (q - zero[:, None]).float()


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The float16 a scale is stored as (beyond ±65504: saturated; a positive scale that would
    round to 0 keeps the smallest float16 normal, 6.1e-5)."""
    if scale.dtype == torch.float16:
        return scale
    s = round_fp16(scale, overflow="clamp")
    return torch.where((s == 0) & (scale > 0), torch.full_like(s, 6.1e-5), s).half()


class ScalarWeight(QuantizedWeight):
    """codes: (out, in) uint8; scale: (out, ngroups) float16; zero: (out, ngroups) uint8."""

    def __init__(self, codes, scale, zero, wbits: int, group_size: Optional[int]):
        self.codes = codes.to(torch.uint8)
        self.scale = stored_scale(scale)
        self.zero = zero.to(torch.uint8)
        self.wbits = int(wbits)
        self.out_features, self.in_features = self.codes.shape
        self.group_size = self.in_features if group_size is None else int(group_size)

    def dequantize(self, dtype=torch.float32):
        g = self.group_size
        col_group = torch.arange(self.in_features, device=self.codes.device) // g  # (in,)
        s = self.scale.float()[:, col_group]  # (out, in)
        z = self.zero.float()[:, col_group]
        return (s * (self.codes.float() - z)).to(dtype)

    def storage(self) -> Storage:
        n = self.codes.numel()
        groups = self.scale.numel()
        return Storage(n, {"codes": n * self.wbits, "scales": groups * 16, "zeros": groups * self.wbits})

    def to(self, device):
        self.codes, self.scale, self.zero = (t.to(device) for t in (self.codes, self.scale, self.zero))
        return self

    def settings(self) -> Dict[str, object]:
        return {"wbits": self.wbits, "group_size": self.group_size}
