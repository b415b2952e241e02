"""Perplexity, pinned protocol (GPTQ-style, every method goes through it), and the distribution
metrics against the float model (runners/kld.py holds the float reference).

Non-overlapping windows of `seqlen` tokens, each scored independently from its first token,
PPL = exp(mean next-token NLL over all predicted tokens), accumulated in float64.

Each token's log-probabilities are the float32 log-softmax of the model's logits, computed CHUNK
tokens at a time: for the architectures whose causal-LM head is exactly `lm_head(final hidden
state)` (LM_HEAD_ONLY) the logits themselves are computed per chunk from the decoder's hidden
states, otherwise from the model's full logits; either way no (seqlen, vocab) temporary (100 MB at
512 tokens and a 49k vocabulary) and nothing of size tokens x vocab is ever kept. The NLL of a token
is minus its target's log-probability (what F.cross_entropy computes), summed per window in float64.

Given a `FloatReference` (the float model's top-k log-probabilities, target log-probability and
top-1 token on the same windows), the same pass also measures per token
    KL(fp || q)  = sum_{i in top-k(fp)} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)
                   (the float distribution's k most likely tokens and one bucket for the rest:
                   exact when k >= vocabulary, otherwise a lower bound whose gap is bounded by the
                   float tail mass p_tail, which is reported),
    top-1 agreement (argmax q == argmax p), and q(target) - p(target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

CHUNK = 128  # tokens per log-softmax
# model_type -> its *ForCausalLM computes logits = lm_head(decoder(ids).last_hidden_state), nothing else
# (no logit scaling or soft-capping), so the head can run per chunk of tokens
LM_HEAD_ONLY = ("llama", "mistral", "qwen2", "qwen3")


def _decoder_and_head(model):
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in LM_HEAD_ONLY and isinstance(getattr(model, "lm_head", None), torch.nn.Module) \
            and isinstance(getattr(model, "model", None), torch.nn.Module):
        return model.model, model.lm_head
    return None


def chunked_log_probs(model, windows: torch.Tensor, device):
    """Yield (window index, first predicted position a, log-probs (b-a, V) float32 of positions
    a+1..b, targets (b-a,) int64) over every window and chunk: the one pass every metric reads."""
    split = _decoder_and_head(model)
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1].to(device)
        if split is not None:
            hidden = split[0](ids, use_cache=False).last_hidden_state[0]  # (L, D)
        else:
            logits = model(ids, use_cache=False).logits[0]  # (L, V)
        n = ids.shape[1] - 1
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            lg = split[1](hidden[a:b]) if split is not None else logits[a:b]  # (b-a, V)
            yield i, a, F.log_softmax(lg.float(), dim=-1), ids[0, a + 1:b + 1]


@dataclass
class WindowScores:
    """Per-window sums (float64, on the CPU) of one evaluation pass; per-token KL kept for quantiles."""

    nll: torch.Tensor  # (N,) Σ NLL per window
    tokens: torch.Tensor  # (N,) predicted tokens per window
    kl: Optional[torch.Tensor] = None  # (T,) float32 per-token KL(fp || q), in window order
    kl_sum: Optional[torch.Tensor] = None  # (N,) Σ KL per window
    top1: Optional[torch.Tensor] = None  # (N,) tokens whose argmax agrees with the float model's
    dp2: Optional[torch.Tensor] = None  # (N,) Σ (q(target) - p(target))²
    ref_nll: Optional[torch.Tensor] = None  # (N,) the float model's Σ NLL
    p_tail: Optional[torch.Tensor] = None  # (N,) Σ float tail mass outside its top-k
    extra: Dict = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.sum()) / int(self.tokens.sum()))


@torch.no_grad()
def score(model, windows: torch.Tensor, device, reference=None) -> WindowScores:
    """One pass over windows (N, seqlen) int64: the NLL sums for perplexity and, given a
    `runners.kld.FloatReference` for the same windows, the distribution metrics."""
    if windows.numel() == 0:
        raise ValueError("no evaluation windows")
    N, n = windows.shape[0], windows.shape[1] - 1
    nll = torch.zeros(N, dtype=torch.float64)
    tokens = torch.full((N,), n, dtype=torch.int64)
    if reference is not None:
        reference.check(windows)
        T = N * n
        kl = torch.empty(T, dtype=torch.float32)
        sums = {k: torch.zeros(N, dtype=torch.float64) for k in ("kl", "top1", "dp2", "p_tail")}
        exact = reference.topk >= reference.vocab
    win = None
    cur = -1
    for i, a, lq, tgt in chunked_log_probs(model, windows, device):
        if i != cur:  # one device -> host transfer per window
            if win is not None:
                _flush(win, cur, nll, sums if reference is not None else None)
            win = {k: torch.zeros((), dtype=torch.float64, device=lq.device) for k in ("nll", "kl", "top1", "dp2", "p_tail")}
            cur = i
        lt = lq.gather(1, tgt[:, None])[:, 0]  # (c,) log q(target)
        win["nll"] -= lt.double().sum()
        if reference is None:
            continue
        t0 = i * n + a
        t1 = t0 + lq.shape[0]
        idx, lp, lpt, top = reference.chunk(t0, t1, lq.device)  # (c, k) int64, (c, k) f64, (c,) f64, (c,) int64
        lqk = lq.gather(1, idx).double()  # (c, k)
        p, q = lp.exp(), lqk.exp()
        tok_kl = (p * (lp - lqk)).sum(1)  # (c,)
        if not exact:
            p_tail = (1.0 - p.sum(1)).clamp_min(0.0)
            q_tail = (1.0 - q.sum(1)).clamp_min(1e-30)
            tok_kl = tok_kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()),
                                          torch.zeros_like(p_tail))
            win["p_tail"] += p_tail.sum()
        kl[t0:t1] = tok_kl.float().cpu()
        win["kl"] += tok_kl.sum()
        win["top1"] += (lq.argmax(1) == top).sum().double()
        win["dp2"] += ((lt.double().exp() - lpt.exp()) ** 2).sum()
    _flush(win, cur, nll, sums if reference is not None else None)
    out = WindowScores(nll=nll, tokens=tokens)
    if reference is not None:
        out.kl, out.kl_sum, out.top1, out.dp2, out.p_tail = kl, sums["kl"], sums["top1"], sums["dp2"], sums["p_tail"]
        out.ref_nll = reference.window_nll(N, n)
    return out


def _flush(win, i, nll, sums) -> None:
    vals = torch.stack([win[k] for k in ("nll", "kl", "top1", "dp2", "p_tail")]).cpu()
    nll[i] = vals[0]
    if sums is not None:
        for j, k in enumerate(("kl", "top1", "dp2", "p_tail"), start=1):
            sums[k][i] = vals[j]


def perplexity(model, windows: torch.Tensor, device) -> float:
    """windows: (N, seqlen) int64."""
    return score(model, windows, device).ppl


# ----------------------------------------------------------------------------- uncertainty
BOOTSTRAP = 1000  # resamples of windows
BOOTSTRAP_SEED = 0


def bootstrap_indices(n_windows: int, resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> torch.Tensor:
    """(resamples, n_windows) window indices drawn with replacement (seeded: the same on every run)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_windows, (resamples, n_windows), generator=g)


def ppl_interval(s: WindowScores, level: float = 0.95, resamples: int = BOOTSTRAP) -> Dict[str, float]:
    """Percentile interval of the perplexity over a seeded bootstrap of the WINDOWS (tokens within a
    window are correlated, windows are the independent units): PPL = exp(Σ nll / Σ tokens) of each
    resample. With one window the interval is that window's PPL."""
    idx = bootstrap_indices(s.nll.numel(), resamples)
    ppl = torch.exp(s.nll[idx].sum(1) / s.tokens[idx].sum(1).double())  # (resamples,)
    lo, hi = torch.quantile(ppl, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"low": lo, "high": hi, "level": level, "point": s.ppl,
            "method": f"percentile bootstrap over {s.nll.numel()} windows ({resamples} resamples, seed {BOOTSTRAP_SEED})"}


def kld_summary(s: WindowScores, resamples: int = BOOTSTRAP) -> Dict[str, float]:
    """The distribution metrics of a scored pass against the float reference (see the module docstring)."""
    kl = s.kl.double()
    T = int(s.tokens.sum())
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    idx = bootstrap_indices(s.nll.numel(), resamples)
    means = s.kl_sum[idx].sum(1) / s.tokens[idx].sum(1).double()  # (resamples,) KL mean per resample
    ppl_q = math.exp(float(s.nll.sum()) / T)
    ppl_fp = math.exp(float(s.ref_nll.sum()) / T)
    return {"mean": float(kl.mean()), "mean_se": float(means.std(unbiased=True)) if s.nll.numel() > 1 else 0.0,
            "median": q[0], "p90": q[1], "p99": q[2], "max": float(kl.max()),
            "top1_agree": 100.0 * float(s.top1.sum()) / T, "rms_dp": math.sqrt(float(s.dp2.sum()) / T),
            "ppl_ratio": ppl_q / ppl_fp, "ppl_fp": ppl_fp, "fp_tail_mass": float(s.p_tail.sum()) / T,
            "tokens": T, "se_method": f"bootstrap over {s.nll.numel()} windows ({resamples} resamples)"}


def token_list(s: WindowScores) -> List[float]:
    return s.kl.tolist() if s.kl is not None else []
