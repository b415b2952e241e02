"""Round-to-nearest: per-output-channel (or group-wise) asymmetric min-max scalar quantization.

No calibration data. The budget rule: the widest code b such that b plus the scale/zero
overhead stays within `bits + tolerance` on every layer shape (e.g. bits=2 on a 576-wide
layer: 2 + (16+2)/576 = 2.031 bits/weight, realized and reported).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from baselines.scalar import ScalarGrid, ScalarPlan, ScalarWeight, scalar_plan
from vptq.methods import Method


class RTN(Method):
    name = "rtn"
    needs_hessian = False

    @dataclass
    class Config:
        name: str = "rtn"
        wbits: Optional[int] = None  # explicit code width; overrides the bits budget
        group_size: Optional[int] = None  # input columns per scale; null = per output channel
        tolerance: float = 0.1  # realized total may exceed the target by at most this

    def layer_plan(self, out_f, in_f) -> ScalarPlan:
        c = self.config
        return scalar_plan(self.bits, out_f, in_f, wbits=c.wbits, group_size=c.group_size, tolerance=c.tolerance)

    def settings(self, plan=None):
        s = {"wbits": self.config.wbits, "group_size": self.config.group_size}
        if plan:
            s.update({f"{o}x{i}": p.short() for (o, i), p in sorted(plan.items())})
        return s

    @torch.no_grad()
    def quantize_layer(self, W, H, *, name, plan=None):
        if not torch.isfinite(W).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
        plan = self.layer_plan(*W.shape) if plan is None else plan
        wbits = plan.wbits
        W = W.float()
        out_f, in_f = W.shape
        g = plan.group_size or in_f
        grid = ScalarGrid(wbits)
        codes = torch.empty(out_f, in_f, dtype=torch.int64, device=W.device)
        scales, zeros = [], []
        for c0 in range(0, in_f, g):
            Wg = W[:, c0:c0 + g]
            s, z = grid.fit(Wg)
            codes[:, c0:c0 + g] = grid.quantize(Wg, s, z)
            scales.append(s)
            zeros.append(z)
        return ScalarWeight(codes, torch.stack(scales, 1), torch.stack(zeros, 1), wbits, plan.group_size)
