"""Perplexity, pinned protocol (GPTQ-style, every method goes through it):
non-overlapping windows of `seqlen` tokens, each scored independently from its first token,
PPL = exp(mean next-token NLL over all predicted tokens), accumulated in float64.

Each token's NLL is computed in float32 from the model's logits (log-softmax per token) and
summed in float64; the log-softmax runs over CHUNK tokens at a time so that only one
(CHUNK, vocab) temporary exists beside the logits (a (seqlen, vocab) one is 100 MB at 512
tokens and a 49k vocabulary). Per-token values do not depend on the chunk size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 128  # tokens per log-softmax


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device) -> float:
    """windows: (N, seqlen) int64 token ids."""
    if windows.numel() == 0:
        raise ValueError("no evaluation windows")
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1].to(device)
        logits = model(ids, use_cache=False).logits  # (1, L, V)
        n = ids.shape[1] - 1
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            tok_nll = F.cross_entropy(logits[0, a:b].float(), ids[0, a + 1:b + 1], reduction="none")  # (b-a,)
            nll += tok_nll.double().sum().cpu()
        del logits
        count += n
    return math.exp(float(nll) / count)
