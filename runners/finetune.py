"""`finetune=none|layer|e2e`: finetuning of a quantized model's continuous parameters, for every method
(VPTQ, arXiv 2409.17066, §4 "layer-wise finetuning" / "end-to-end finetuning", Tables 9-10; AQLM's
global finetuning and QuIP#'s end-to-end finetuning are the same idea for other formats).

Indices and codes stay frozen; what trains is each quantized layer's codebooks / norms / scales (one
adapter per stored weight type, vptq/trainable.py) and the RMSNorm weights (`finetune.norms`).

layer  during quantization, after each block's linears are quantized (the driver's
       `block_finetune` hook, after the method's own block finetuning): Adam on the block-output
       MSE against the float block's outputs (vptq/finetune.py). The paper's recipe: 100 iterations,
       learning rate 1e-4 decaying to 5e-6 (cosine here), RMSNorm weights trained; with
       `hessian.protocol=float` the targets are the float model's own activations.
       AQLM's reference variant keeps its own block finetuning (their `finetune_groupwise`, part of
       the published algorithm); finetune=layer runs after it, on the block it left.
       `method.finetune=true` (VPTQ) is an alias of finetune=layer in the runner.
e2e    after every block is quantized: Adam on KL(fp || q) of the next-token distributions on the
       calibration windows, early-stopped on held-out calibration windows (their KL measured before
       training and after each epoch; the best state is kept, so the held-out KL never rises).

KL form: the float model's top-k log-probabilities per position (runners/kld.py, computed while the
model is still float and cached with the evaluation's references; k = `finetune.topk`, null = the
whole vocabulary) and one bucket for the tail:
    KL = Σ_{i∈top-k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
the form runners/ppl.py evaluates (exact when k >= vocabulary). Exact KL would need the float
logits of every calibration token (32 × 512 × 49152 × 4 bytes = 3.2 GB on SmolLM2; 128 × 2048 ×
128256 × 2 = 67 GB on Llama-3): the top-k form needs 8 bytes per kept entry (8 MB at k=64).

Memory (one window in flight): the model, each decoder block checkpointed (torch.utils.checkpoint:
its input is kept, its activations are recomputed in the backward pass; `finetune.checkpoint`, auto:
on CUDA always, on CPU only where memory asks for it: `use_checkpointing`), the logits CHUNK tokens at
a time (the decoder's hidden states are detached before the head, the head's gradient flows back
in one call), never tokens x vocabulary; Adam state for the trained tensors only. On CUDA the
forward runs under bfloat16 autocast, attention on the math kernel (its backward is deterministic).

Determinism: the window order comes from a CPU generator (`finetune.seed`, null = the run's seed);
gradients accumulate one window at a time in a fixed order; codebook lookups have deterministic
backwards. Same seed, same machine -> bitwise-identical finetuned tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from runners.errors import UserError

log = logging.getLogger("vq-bench")

MODES = ("none", "layer", "e2e")
# the modes' defaults for the fields a FinetuneConfig leaves null (defined here, once)
PRESETS: Dict[str, Dict[str, Any]] = {
    # VPTQ paper §4 / Table 9: 100 iterations, lr 1e-4 -> 5e-6; `batch` windows per iteration (ours)
    "layer": dict(steps=100, lr=1e-4, lr_min=5e-6, batch=4, epochs=None),
    # ours (the paper's end-to-end settings were not published): at most 4 epochs, early stopped. lr chosen
    # on the held-out calibration KL (docs/LOG.md 2026-12-07; VPTQ 3 bits, bundled model, seed 0): after 4
    # epochs 0.168 at 1e-4 (the earlier preset), 0.150 at 5e-4; 1e-3 over 8 epochs: 0.155 after 4, 0.148 after 8
    "e2e": dict(epochs=4, lr=5e-4, lr_min=5e-5, batch=2, steps=None),
}
# VPTQ.Config's own finetuning fields: with method.finetune=true in the runner, finetune.* replace them
_VPTQ_OWN = ("finetune_epochs", "finetune_lr", "finetune_batch")


@dataclass(frozen=True)
class Finetune:
    """A resolved `finetune` config (presets applied, checked)."""

    mode: str = "none"
    lr: Optional[float] = None
    lr_min: Optional[float] = None
    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch: Optional[int] = None
    norms: bool = True
    patience: int = 1
    heldout: float = 0.125
    nsamples: Optional[int] = None  # e2e: its own calibration windows (None: the quantization's)
    topk: Optional[int] = 64
    seed: int = 0
    checkpoint: Optional[bool] = None  # e2e: blocks under gradient checkpointing (None: `use_checkpointing`)
    via: str = "finetune"  # finetune=<mode> | method.finetune=true (the alias)

    def settings(self) -> Dict[str, Any]:
        keys = {"layer": ("steps", "lr", "lr_min", "batch", "norms", "seed"),
                "e2e": ("epochs", "lr", "lr_min", "batch", "norms", "patience", "heldout", "nsamples", "topk", "seed")}
        return {"mode": self.mode, "via": self.via, **{k: getattr(self, k) for k in keys.get(self.mode, ())}}


def with_presets(mode: str, values: Dict[str, Any]) -> Dict[str, Any]:
    """`values` (finetune fields) with each null field that mode's preset has taken from PRESETS."""
    pre = PRESETS.get(mode, {})
    return {k: (pre[k] if v is None and k in pre else v) for k, v in values.items()}


def configure(cfg, method, *, seed: int) -> Tuple[Finetune, Any]:
    """The `finetune` config group (runners.schema.FinetuneConfig) and the built method -> (resolved
    Finetune, the method to run). `method.finetune=true` (VPTQ) becomes finetune=layer, and the method
    is rebuilt with its own finetuning off (the layer recipe runs once, as the driver's hook)."""
    mode = cfg.mode
    if mode not in MODES:
        raise UserError(f"finetune.mode={mode!r}; valid choices: {', '.join(MODES)}")
    if mode != "none" and not method.quantizes:
        raise UserError(f"finetune={mode} trains a model's quantized layers; method={method.name} quantizes "
                        f"nothing (use finetune=none)")
    via = f"finetune={mode}"
    mc = getattr(method, "config", None)
    if getattr(mc, "finetune", None) is True and dataclasses.is_dataclass(mc):
        if mode == "e2e":
            raise UserError("method.finetune=true is finetune=layer (its alias); it cannot be combined with "
                            "finetune=e2e: choose one")
        defaults = {f.name: f.default for f in dataclasses.fields(mc)}
        changed = [f for f in _VPTQ_OWN if f in defaults and getattr(mc, f) != defaults[f]]
        if changed:
            raise UserError(f"method.{changed[0]} is not read by the runner: there method.finetune=true is "
                            f"finetune=layer; set finetune.lr / finetune.steps / finetune.batch instead")
        from vptq.methods import build_method

        mode, via = "layer", "method.finetune=true (alias of finetune=layer)"
        method = build_method(method.name, dataclasses.replace(mc, finetune=False), bits=method.bits, seed=method.seed)
    val = with_presets(mode, {k: getattr(cfg, k) for k in ("lr", "lr_min", "steps", "epochs", "batch")})
    ft = Finetune(mode=mode, norms=bool(cfg.norms), patience=int(cfg.patience), heldout=float(cfg.heldout),
                  nsamples=None if getattr(cfg, "nsamples", None) is None else int(cfg.nsamples),
                  topk=None if cfg.topk is None else int(cfg.topk), seed=int(seed if cfg.seed is None else cfg.seed),
                  checkpoint=getattr(cfg, "checkpoint", None), via=via, **val)
    if ft.nsamples is not None and mode != "e2e":  # none, or layer (which trains on calib.nsamples windows)
        raise UserError(f"finetune.nsamples={ft.nsamples} is read by finetune=e2e only (here finetune={mode}); "
                        f"leave it null")
    if mode != "none":
        _check(ft)
    return ft, method


def _check(ft: Finetune) -> None:
    count = ft.steps if ft.mode == "layer" else ft.epochs
    what = "steps" if ft.mode == "layer" else "epochs"
    bad = None
    if count is None or count < 0:
        bad = f"finetune.{what}={count} must be an integer >= 0"
    elif ft.lr is None or not ft.lr > 0:
        bad = f"finetune.lr={ft.lr} must be > 0"
    elif ft.lr_min is not None and not 0 <= ft.lr_min <= ft.lr:
        bad = f"finetune.lr_min={ft.lr_min} must be between 0 and finetune.lr={ft.lr} (or null: constant lr)"
    elif ft.batch is None or ft.batch < 1:
        bad = f"finetune.batch={ft.batch} must be >= 1 (windows per Adam step)"
    elif ft.mode == "e2e" and not 0 < ft.heldout < 1:
        bad = f"finetune.heldout={ft.heldout} must be a fraction of the calibration windows, 0 < heldout < 1"
    elif ft.mode == "e2e" and ft.nsamples is not None and ft.nsamples < 2:
        bad = f"finetune.nsamples={ft.nsamples} must be >= 2 (one window held out) or null (calib.nsamples)"
    elif ft.mode == "e2e" and ft.patience < 1:
        bad = f"finetune.patience={ft.patience} must be >= 1 (epochs without a lower held-out KL)"
    elif ft.mode == "e2e" and ft.topk is not None and ft.topk < 1:
        bad = f"finetune.topk={ft.topk} must be >= 1 (or null: the whole vocabulary)"
    if bad:
        raise UserError(bad)


def needs_calibration(ft: Finetune) -> bool:
    return ft.mode in ("layer", "e2e")


# ----------------------------------------------------------------------------- finetune=layer
class LayerHook:
    """The driver's `block_finetune` step for finetune=layer (every method); sums its own time."""

    def __init__(self, ft: Finetune):
        self.ft = ft
        self.time_s = 0.0
        self.blocks: List[Dict[str, float]] = []

    def fresh(self) -> "LayerHook":
        """The same recipe with an empty record (e.g. for the determinism audit's second run)."""
        return LayerHook(self.ft)

    def __call__(self, block, ctx) -> Dict[str, float]:
        from vptq.finetune import finetune_block

        t0 = time.perf_counter()
        ft = self.ft
        st = finetune_block(block, ctx, steps=ft.steps, lr=ft.lr, lr_min=ft.lr_min, batch=ft.batch,
                            seed=ft.seed * 7 + ctx.index, norms=ft.norms)
        dt = time.perf_counter() - t0
        self.time_s += dt
        st = {**{f"layer_{k}": v for k, v in st.items()}, "layer_ft_time_s": dt}
        self.blocks.append({"block": ctx.index, **st, "time_s": dt})
        return st

    def collect(self, blocks: List[Dict[str, Any]]) -> None:
        """The record of hooks that ran elsewhere (quantize.parallel's block jobs): from the blocks'
        stats as their checkpoints saved them (the keys `__call__` returns)."""
        for b in blocks:
            if "layer_ft_time_s" in b:
                st = {k: v for k, v in b.items() if k.startswith("layer_")}
                self.time_s += b["layer_ft_time_s"]
                self.blocks.append({"block": b.get("block"), **st, "time_s": b["layer_ft_time_s"]})

    def record(self) -> Dict[str, Any]:
        kept = [b for b in self.blocks if b.get("layer_ft_kept")]
        ratio = [b["layer_ft_mse_after"] / b["layer_ft_mse_before"] for b in self.blocks
                 if b.get("layer_ft_mse_before")]
        return {"blocks": len(self.blocks), "blocks_kept": len(kept),
                "mse_ratio_mean": sum(ratio) / len(ratio) if ratio else None,
                "trained_params": int(sum(b.get("layer_ft_params", 0) for b in self.blocks)),
                "time_s": self.time_s, "per_block": self.blocks}


# ----------------------------------------------------------------------------- finetune=e2e
def split_windows(N: int, heldout: float) -> Tuple[List[int], List[int]]:
    """(training windows, held-out windows): the last max(1, round(heldout·N)) windows are held out."""
    n_held = max(1, int(round(heldout * N)))
    if N - n_held < 1:
        raise UserError(f"finetune=e2e needs at least 2 calibration windows (one held out); got {N} "
                        f"(finetune.nsamples, or calib.nsamples where it is null)")
    return list(range(N - n_held)), list(range(N - n_held, N))


def topk_kl(logits: torch.Tensor, idx: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(fp || q) of logits (c, V) against the float top-k (idx (c, k) int64, log-probs lp
    (c, k) float32) with one tail bucket (exact when k >= V). -> (c,) float32, differentiable."""
    lq = F.log_softmax(logits.float(), dim=-1)  # (c, V)
    p = lp.exp()
    kl = (p * (lp - lq.gather(1, idx))).sum(1)
    if idx.shape[1] < lq.shape[1]:
        p_tail = (1.0 - p.sum(1)).clamp_min(0.0)
        lq_tail = lq.scatter(1, idx, float("-inf")).logsumexp(1)  # log of q's mass outside the float top-k
        kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - lq_tail), torch.zeros_like(kl))
    return kl


def window_kl(model, ids: torch.Tensor, ref, t0: int, *, weight: float = 0.0, backward: bool = False) -> float:
    """Σ KL over the predicted tokens of one window ids (1, L) whose reference rows start at t0;
    backward=True accumulates the gradient of weight·Σ KL into the trained tensors."""
    from runners.ppl import CHUNK, _decoder_and_head

    device = ids.device
    n = ids.shape[1] - 1
    split = _decoder_and_head(model)
    total = 0.0
    if split is not None:
        hidden = split[0](ids, use_cache=False).last_hidden_state[0]  # (L, D)
        h = hidden.detach().requires_grad_(backward)
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            kl = topk_kl(split[1](h[a:b]), ref.topk_idx[t0 + a:t0 + b].to(device).long(),
                         ref.topk_logp[t0 + a:t0 + b].to(device).float()).sum()
            if backward:
                (kl * weight).backward()  # the head's part; h.grad accumulates
            total += float(kl.detach())
        if backward:
            hidden.backward(h.grad)  # the decoder's part, in one call
        return total
    logits = model(ids, use_cache=False).logits[0]  # (L, V): architectures with more than a head
    kls = [topk_kl(logits[a:min(a + CHUNK, n)], ref.topk_idx[t0 + a:t0 + min(a + CHUNK, n)].to(device).long(),
                   ref.topk_logp[t0 + a:t0 + min(a + CHUNK, n)].to(device).float()).sum() for a in range(0, n, CHUNK)]
    kl = torch.stack(kls).sum()
    if backward:
        (kl * weight).backward()
    return float(kl.detach())


def _available_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def training_bytes(model, tokens: int) -> int:
    """What the backward pass keeps without checkpointing, estimated: every quantized linear's weight
    dequantized to float32 (autograd saves it for the input's gradient) and, per decoder block, about
    16 hidden-size and 6 intermediate-size float32 vectors per token (norms, projections, attention,
    MLP; SmolLM2-135M at 511 tokens: 0.4 GB of weights + 1.1 GB of activations)."""
    from runners.arch import arch_of, blocks_of
    from vptq.qlinear import QuantLinear

    weights = sum(m.qweight.out_features * m.qweight.in_features for m in model.modules()
                  if isinstance(m, QuantLinear))
    c = model.config
    hidden, inter = int(c.hidden_size), int(getattr(c, "intermediate_size", 4 * c.hidden_size))
    blocks = len(list(blocks_of(model, arch_of(model))))
    return 4 * (weights + tokens * blocks * (16 * hidden + 6 * inter))


def use_checkpointing(model, tokens: int, device, setting: Optional[bool] = None) -> bool:
    """finetune.checkpoint: the setting where given; auto (None): always on CUDA (7B-70B: the dense
    weights alone would not fit beside the model), on CPU only where `training_bytes` exceeds half of
    the available memory (or that is unknown). Off, a step costs one forward pass less (SmolLM2-135M
    on the CPU, one window of 512 tokens forward and backward: 11.5 s against 13.5-14.1 s
    checkpointed, one thread, beside two other jobs)."""
    if setting is not None:
        return bool(setting)
    if torch.device(device).type != "cpu":
        return True
    avail = _available_bytes()
    return avail is None or training_bytes(model, tokens) > avail // 2


@contextlib.contextmanager
def checkpointed_blocks(model, enabled: bool = True):
    """Each decoder block under torch.utils.checkpoint while gradients are on (non-reentrant); nothing
    when not enabled."""
    from torch.utils.checkpoint import checkpoint

    from runners.arch import arch_of, blocks_of

    if not enabled:
        yield
        return
    blocks = list(blocks_of(model, arch_of(model)))
    for b in blocks:
        def forward(*args, _orig=b.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)
        b.forward = forward
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


@contextlib.contextmanager
def _device_mode(model, device):
    """CUDA: bfloat16 autocast (a float32 model) and the math attention kernel (deterministic
    backward). CPU: as the model is."""
    if torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = next(model.parameters()).dtype
    with sdpa_kernel([SDPBackend.MATH]), torch.autocast("cuda", dtype=torch.bfloat16,
                                                        enabled=dtype == torch.float32):
        yield


def heldout_kl(model, windows: torch.Tensor, ref, held: List[int], device) -> float:
    """Mean per-token KL(fp || q) over the held-out windows (no gradients)."""
    n = windows.shape[1] - 1
    with torch.no_grad():
        tot = sum(window_kl(model, windows[i:i + 1].to(device), ref, i * n) for i in held)
    return tot / (len(held) * n)


def finetune_e2e(model, windows: torch.Tensor, ref, ft: Finetune, device,
                 on_epoch: Optional[Callable[[Dict[str, float]], None]] = None) -> Dict[str, Any]:
    """finetune=e2e on a quantized model (in place; see the module docstring).

    windows: (N, L) calibration windows; ref: the float model's runners.kld.FloatReference on them
    (computed before quantization). -> the metrics.json `finetune` record."""
    from vptq.finetune import cosine_lr, window_batches
    from vptq.trainable import Trainables

    t_start = time.perf_counter()
    ref.check(windows)
    N, n = windows.shape[0], windows.shape[1] - 1
    train, held = split_windows(N, ft.heldout)
    model.to(device)
    was_training = model.training
    model.train(False)
    tr = Trainables(model, norms=ft.norms)
    per_epoch = math.ceil(len(train) / ft.batch)
    total = ft.epochs * per_epoch
    opt = torch.optim.Adam(tr.parameters(), lr=ft.lr)
    gen = torch.Generator().manual_seed(ft.seed)
    batches = window_batches(len(train), ft.batch, total, gen)
    history, train_kl = [], []
    step = bad = 0
    ckpt = use_checkpointing(model, n, device, ft.checkpoint)
    try:
        with tr.active(), checkpointed_blocks(model, ckpt), _device_mode(model, device):
            history.append(heldout_kl(model, windows, ref, held, device))
            best = (history[0], 0, tr.snapshot())
            for epoch in range(1, ft.epochs + 1):
                tot = 0.0
                for _ in range(per_epoch):
                    chunk = [train[j] for j in next(batches)]
                    for g in opt.param_groups:
                        g["lr"] = cosine_lr(step, total, ft.lr, ft.lr_min)
                    opt.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        for i in chunk:  # one window at a time: the batch mean, by gradient accumulation
                            tot += window_kl(model, windows[i:i + 1].to(device), ref, i * n,
                                             weight=1.0 / (n * len(chunk)), backward=True)
                    opt.step()
                    step += 1
                train_kl.append(tot / (len(train) * n))
                history.append(heldout_kl(model, windows, ref, held, device))
                log.info("finetune=e2e epoch %d/%d: train KL %.5f, held-out KL %.5f (before %.5f)", epoch,
                         ft.epochs, train_kl[-1], history[-1], history[0])
                if on_epoch:
                    on_epoch({"finetune/epoch": epoch, "finetune/train_kl": train_kl[-1],
                              "finetune/heldout_kl": history[-1]})
                if history[-1] < best[0]:
                    best, bad = (history[-1], epoch, tr.snapshot()), 0
                else:
                    bad += 1
                    if bad >= ft.patience:
                        break
            tr.restore(best[2])
        tr.store()  # on the device, before the model (and its weights' tensors) moves back
    finally:
        model.train(was_training)
        if torch.device(device).type != "cpu":
            model.to("cpu")
    return {**ft.settings(), "train_windows": len(train), "heldout_windows": len(held), "tokens_per_window": n,
            "heldout_kl": history, "train_kl": train_kl, "best_epoch": best[1], "epochs_run": len(train_kl),
            "steps_run": step, "trained_params": tr.numel(), "norms_sha256": norms_sha256(tr.norms),
            "checkpointed": ckpt,
            "time_s": time.perf_counter() - t_start}


def norms_sha256(norms: Dict[str, Any]) -> Optional[str]:
    """sha256 of the RMSNorm weights (name, dtype, bytes): codes_sha256 covers the quantized layers only."""
    if not norms:
        return None
    import hashlib

    h = hashlib.sha256()
    for name in sorted(norms):
        w = norms[name].weight.detach().cpu().contiguous()
        h.update(f"{name}:{w.dtype}\0".encode() + w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_reference(model, windows: torch.Tensor, device, *, folder: str, topk: Optional[int]):
    """The float model's top-k distributions on the calibration windows (runners/kld.py; cached beside
    the evaluation's references). Call it while the model is float. -> (reference, info)."""
    from runners.fingerprint import weights_fingerprint
    from runners.kld import float_reference

    model.to(device)
    try:
        return float_reference(model, windows, device, weights=weights_fingerprint(model), folder=folder,
                               topk=topk if topk is not None else 1 << 30, name="calibration (finetune=e2e)")
    finally:
        if torch.device(device).type != "cpu":
            model.to("cpu")
            torch.cuda.empty_cache()
