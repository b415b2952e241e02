"""Round-to-nearest: per-output-channel (or group-wise) asymmetric min-max scalar quantization.

No calibration data. The grid is `baselines.scalar.ScalarGrid`; `variant=reference` codes with
the float32 scale as IST-DASLab/gptq's `quant.py` does (its RTN baseline, `--nearest`), and stores
the scale as float16; `variant=consistent` codes against the float16 scale that is stored.

Budget (`scalar_plan`, per layer shape): the widest code b, then the smallest group (a multiple
of 32 columns, or per channel) with b plus the scale/zero overhead within `bits + tolerance`
(e.g. bits=2 on a 576-wide layer: b=2, groups of 192: 2 + 3·(16+2)/576 = 2.094 bits/weight,
realized and reported). Explicit `wbits` / `group_size` fix those choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from baselines.scalar import ScalarGrid, ScalarPlan, ScalarWeight, scalar_plan
from vptq.methods import ITERS_PRESETS, Method, check_choice

VARIANTS = ("reference", "consistent")


class RTN(Method):
    name = "rtn"
    needs_hessian = False

    @dataclass
    class Config:
        name: str = "rtn"
        variant: str = "reference"  # reference: float32 scale in coding (gptq's quant.py) | consistent: float16
        iters: str = "cpu"  # no iteration counts: both presets are the same
        wbits: Optional[int] = None  # explicit code width; overrides the bits budget
        group_size: Optional[int] = None  # input columns per scale; null = chosen by the budget
        tolerance: float = 0.1  # realized total may exceed the target by at most this

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        check_choice("variant", config.variant, VARIANTS)
        check_choice("iters", config.iters, ITERS_PRESETS)

    def layer_plan(self, out_f, in_f) -> ScalarPlan:
        c = self.config
        return scalar_plan(self.bits, out_f, in_f, wbits=c.wbits, group_size=c.group_size, tolerance=c.tolerance)

    def settings(self, plan=None):
        s = {"variant": self.config.variant, "iters": self.config.iters, "wbits": self.config.wbits,
             "group_size": self.config.group_size}
        if plan:
            s.update({f"{o}x{i}": p.short() for (o, i), p in sorted(plan.items())})
        return s

    @torch.no_grad()
    def quantize_layer(self, W, H, *, name, plan=None):
        if not torch.isfinite(W).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
        plan = self.layer_plan(*W.shape) if plan is None else plan
        return rtn_quantize(W, wbits=plan.wbits, group_size=plan.group_size,
                            fp16_scale=self.config.variant == "consistent")


def rtn_quantize(W: torch.Tensor, *, wbits: int, group_size: Optional[int], fp16_scale: bool) -> ScalarWeight:
    """W (out, in) -> ScalarWeight: one grid per row and group of `group_size` columns."""
    W = W.float()
    out_f, in_f = W.shape
    g = group_size or in_f
    grid = ScalarGrid(wbits)
    codes = torch.empty(out_f, in_f, dtype=torch.int64, device=W.device)
    scales, zeros = [], []
    for c0 in range(0, in_f, g):
        Wg = W[:, c0:c0 + g]
        s, z = grid.fit(Wg, fp16_scale=fp16_scale)
        codes[:, c0:c0 + g] = grid.quantize(Wg, s, z)
        scales.append(s)
        zeros.append(z)
    return ScalarWeight(codes, torch.stack(scales, 1), torch.stack(zeros, 1), wbits, group_size)
