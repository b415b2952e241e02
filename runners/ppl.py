"""Perplexity, pinned protocol (GPTQ-style, every method goes through it):
non-overlapping windows of `seqlen` tokens, each scored independently from its first token,
PPL = exp(mean next-token NLL over all predicted tokens), accumulated in float64.

Each token's NLL is computed in float32 from the model's logits (log-softmax per token) and
summed in float64, CHUNK tokens at a time: for the architectures whose causal-LM head is exactly
`lm_head(final hidden state)` (LM_HEAD_ONLY) the logits themselves are computed per chunk from the
decoder's hidden states, otherwise from the model's full logits; either way no (seqlen, vocab)
log-softmax temporary (100 MB at 512 tokens and a 49k vocabulary).
"""
from __future__ import annotations

import math

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


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device) -> float:
    """windows: (N, seqlen) int64 token ids."""
    if windows.numel() == 0:
        raise ValueError("no evaluation windows")
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    split = _decoder_and_head(model)
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1].to(device)
        if split is not None:
            hidden = split[0](ids, use_cache=False).last_hidden_state[0]  # (L, D)
        else:
            logits = model(ids, use_cache=False).logits[0]  # (L, V)
        n = ids.shape[1] - 1
        win = torch.zeros((), dtype=torch.float64, device=ids.device)  # on the device: one transfer per window
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            lg = split[1](hidden[a:b]) if split is not None else logits[a:b]  # (b-a, V)
            tok_nll = F.cross_entropy(lg.float(), ids[0, a + 1:b + 1], reduction="none")  # (b-a,)
            win += tok_nll.double().sum()
        nll += win.cpu()
        count += n
    return math.exp(float(nll) / count)
