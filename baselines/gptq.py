"""GPTQ (Frantar et al., arXiv 2210.17323): scalar grids placed by second-order error feedback.

The loop is `vptq.solver.error_feedback` (GPTQ Alg. 1: lazy block updates, Cholesky form of
H⁻¹, damping `percdamp`); this module owns only the grid it hands that loop, which is the same
asymmetric min-max grid RTN uses (`baselines.scalar`), so both store the same `ScalarWeight`:
    ŵ = s · (q - z),   q in [0, 2^b - 1],  s float16, z b-bit, one (s, z) per row and group.

Grids, as in IST-DASLab/gptq (`gptq.py` `GPTQ.fasterquant`, `quant.py`):
  * per channel (group_size=null): one grid per row, fitted on the original W before the pass;
  * groups, natural order: the grid of columns [c0, c0+g) is fitted when the pass reaches c0,
    on the weights as the error feedback has updated them by then;
  * act-order (columns in descending diag(H)) needs static groups: every group's grid is fitted
    on the original W before the permuted pass, so group k still covers original columns
    [k·g, (k+1)·g) and the stored group->scale mapping is the plain one (`static_groups`).
    (Their act-order with dynamic groups forms groups in the permuted order and stores a
    per-column group index; that layout is not offered here.)

Variants (`variant=`):
  * `reference` (default): their code step for step: codes taken against the float32 scale;
    the per-channel grid fitted on W before dead columns are zeroed; a dynamic group's grid
    fitted on their `W`, the weight as the lazy block updates left it (columns the current
    block has already quantized have not yet passed their errors on to it when g is not a
    multiple of the block size). Stored: the scale rounded to float16 (16 bits counted, as their
    paper counts it), so the stored weight dequantizes to s16 · (q - z): within 2^-12 relative
    of the weight their loop produced (proxy loss within 0.1% on the fidelity layer).
  * `consistent` (ours): the scale rounded to float16 before coding (the loop sees exactly what
    is stored: the solver's Q is bitwise the stored weight), dynamic groups fitted on the
    exactly updated weights (`RunningWeight`).

Budget rule (like RTN, `scalar_plan`, per layer shape): the widest code b, then the smallest
group (a multiple of 32 columns, or per channel) with b + (16 + b)·groups/in_features <=
bits + tolerance; `wbits` / `group_size` given explicitly fix those choices. GPTQ has no
iteration counts (`iters` is accepted and changes nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from baselines.scalar import ScalarGrid, ScalarPlan, ScalarWeight, scalar_plan
from vptq.methods import ITERS_PRESETS, Method, check_choice
from vptq.solver import SolverResult, error_feedback, inverse_cholesky, prepare_hessian

VARIANTS = ("reference", "consistent")


class RunningWeight:
    """The weight as the error-feedback loop holds it, rebuilt from what was quantized so far.

    With U the upper Cholesky factor of H⁻¹ (in the solver's column order), GPTQ's sequential
    updates give, for the already quantized prefix P of columns and the rest F,
        E_P U_PP = W_P - Q_P          (E: the scaled errors the loop propagates)
        W_F(now) = W_F - E_P U_PF     (W: the ORIGINAL weight)
    exactly (up to float rounding), whatever Q_P was. A grid or codebook fitted "on the updated
    weights" (GPTQ's groups, GPTVQ's codebooks) reads them here, since the loop only hands its
    `quantize_cols` callback the columns being quantized.
    """

    def __init__(self, W: torch.Tensor, U: torch.Tensor):
        self.W = W  # (out, in) original weight, solver column order
        self.U = U  # (in, in) upper Cholesky factor of (damped H)⁻¹, solver order
        self.Q = torch.zeros_like(W)  # (out, in) quantized values recorded so far

    def record(self, col: int, q: torch.Tensor) -> None:
        """q: (out, step) dequantized values of columns col .. col+step-1."""
        self.Q[:, col:col + q.shape[1]] = q

    def columns(self, c0: int, c1: int) -> torch.Tensor:
        """(out, c1-c0): columns [c0, c1) as updated by the errors of columns [0, c0)."""
        if c0 == 0:
            return self.W[:, c0:c1].clone()
        R = self.W[:, :c0] - self.Q[:, :c0]  # (out, c0)
        E = torch.linalg.solve_triangular(self.U[:c0, :c0], R, upper=True, left=False)  # (out, c0)
        return self.W[:, c0:c1] - E @ self.U[:c0, c0:c1]


def solver_inverse_cholesky(H: torch.Tensor, percdamp: float, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """The very U that `error_feedback(W, H, ..., percdamp=percdamp, perm=perm)` will use."""
    Hp = H.float() if perm is None else H.float()[perm][:, perm]
    return inverse_cholesky(Hp, percdamp)


def check_layer(W: torch.Tensor, H: Optional[torch.Tensor], name: str, method: str) -> None:
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: weight contains NaN or Inf")
    if H is None:
        raise ValueError(f"{name}: {method} needs the layer's Hessian (calibration data); got None")
    if tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match in_features={W.shape[1]}")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: Hessian contains NaN or Inf")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, wbits: int, group_size: Optional[int] = None,
                  act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                  percdamp: float = 0.01, variant: str = "reference"):
    """-> (ScalarWeight, SolverResult). W: (out, in); H: (in, in) = E[x xᵀ].

    variant=consistent: the solver's Q (the weights the error feedback saw) is bitwise the
    ScalarWeight's dequantize. variant=reference: Q is their loop's weight (float32 scales); the
    stored weight holds the float16 scales (see the module docstring)."""
    check_choice("variant", variant, VARIANTS)
    ref = variant == "reference"
    W_raw = W.detach().float()
    W, H, _dead = prepare_hessian(W, H)
    out_f, in_f = W.shape
    g = in_f if group_size is None else int(group_size)
    ngroups = math.ceil(in_f / g)
    grid = ScalarGrid(wbits)
    dev = W.device
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    order = perm if perm is not None else torch.arange(in_f, device=dev)  # solver col -> original col
    order_l = order.tolist()
    scale = torch.zeros(out_f, ngroups, device=dev)  # (out, ngroups) float32 (float16 values if consistent)
    zero = torch.zeros(out_f, ngroups, dtype=torch.int64, device=dev)  # (out, ngroups)
    codes = torch.zeros(out_f, in_f, dtype=torch.int64, device=dev)  # (out, in), original order
    dynamic = group_size is not None and not static_groups
    if group_size is None:  # per channel (theirs: fitted before the dead columns are zeroed)
        scale[:, 0], zero[:, 0] = grid.fit(W_raw if ref else W, fp16_scale=not ref)
    elif not dynamic:  # static groups: every grid from the original W
        for k in range(ngroups):
            scale[:, k], zero[:, k] = grid.fit(W[:, k * g:(k + 1) * g], fp16_scale=not ref)
    state = {}
    running = RunningWeight(W, solver_inverse_cholesky(H, percdamp, None)) if dynamic and not ref else None

    def expose(Wl, U):  # their `W`: lazily updated, block by block
        state["W"] = Wl

    def quantize_cols(col: int, Wc: torch.Tensor) -> torch.Tensor:  # Wc: (out, 1)
        j = order_l[col]
        k = j // g
        if dynamic and col % g == 0:  # natural order here: solver col == original col
            Wg = state["W"][:, col:col + g] if ref else running.columns(col, min(col + g, in_f))
            scale[:, k], zero[:, k] = grid.fit(Wg, fp16_scale=not ref)
        q = grid.quantize(Wc, scale[:, k], zero[:, k])  # (out, 1) int64
        codes[:, j] = q[:, 0]
        Qc = grid.dequantize(q, scale[:, k], zero[:, k])  # (out, 1)
        if running is not None:
            running.record(col, Qc)
        return Qc

    res: SolverResult = error_feedback(W, H, quantize_cols, block_size=block_size, step=1,
                                       percdamp=percdamp, perm=perm, expose=expose if dynamic and ref else None)
    return ScalarWeight(codes, scale, zero, wbits, group_size), res


class GPTQ(Method):
    name = "gptq"

    @dataclass
    class Config:
        name: str = "gptq"
        variant: str = "reference"  # reference: IST-DASLab/gptq as released | consistent: float16 scale in coding
        iters: str = "cpu"  # GPTQ has no iteration counts: both presets are the same
        wbits: Optional[int] = None  # explicit code width; overrides the bits budget
        group_size: Optional[int] = None  # input columns per (scale, zero); null = chosen by the budget
        act_order: bool = True  # quantize columns in descending diag(H) order
        static_groups: Optional[bool] = None  # grids fitted before the pass; null = same as act_order
        block_size: int = 128  # lazy-update block (columns)
        percdamp: float = 0.01  # damping: percdamp * mean(diag H) added to diag H
        tolerance: float = 0.1  # realized total may exceed the target by at most this

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        c = config
        check_choice("variant", c.variant, VARIANTS)
        check_choice("iters", c.iters, ITERS_PRESETS)
        if c.group_size is not None and c.group_size < 1:
            raise ValueError(f"method.group_size={c.group_size} must be a positive number of columns or null")
        if c.block_size < 1:
            raise ValueError(f"method.block_size={c.block_size} must be >= 1")
        if not c.percdamp >= 0:
            raise ValueError(f"method.percdamp={c.percdamp} must be >= 0")
        static = c.act_order if c.static_groups is None else bool(c.static_groups)
        if c.act_order and c.group_size is not None and not static:
            raise ValueError("method.act_order=true with method.group_size needs method.static_groups=true "
                             "(or null): the stored layout maps group k to original columns [k*g, (k+1)*g); "
                             "valid: static_groups=true, or act_order=false")
        self._static = static

    def layer_plan(self, out_f, in_f) -> ScalarPlan:
        c = self.config
        # act-order with dynamic groups has no stored layout here: the budget stays per channel then
        groups = not (c.act_order and not self._static)
        return scalar_plan(self.bits, out_f, in_f, wbits=c.wbits, group_size=c.group_size, tolerance=c.tolerance,
                           choose_group=groups)

    def settings(self, plan=None):
        s = {"variant": self.config.variant, "iters": self.config.iters, "wbits": self.config.wbits,
             "group_size": self.config.group_size,
             "act_order": self.config.act_order, "static_groups": self._static,
             "percdamp": self.config.percdamp, "block_size": self.config.block_size}
        if plan:
            s.update({f"{o}x{i}": p.short() for (o, i), p in sorted(plan.items())})
        return s

    @torch.no_grad()
    def quantize_layer(self, W, H, *, name, plan=None):
        check_layer(W, H, name, self.name)
        plan = self.layer_plan(*W.shape) if plan is None else plan
        c = self.config
        qw, _ = gptq_quantize(W, H, wbits=plan.wbits, group_size=plan.group_size, act_order=c.act_order,
                              static_groups=self._static, block_size=c.block_size, percdamp=c.percdamp,
                              variant=c.variant)
        return qw
