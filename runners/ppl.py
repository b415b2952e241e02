"""Perplexity, pinned protocol (GPTQ-style, every method goes through it):
non-overlapping windows of `seqlen` tokens, each scored independently from its first token,
PPL = exp(mean next-token NLL over all predicted tokens), accumulated in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        nll += loss.double().cpu()
        count += ids.shape[1] - 1
    return math.exp(float(nll) / count)
