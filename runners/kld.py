"""The float model's next-token distributions on the evaluation windows, computed once and cached.

What the distribution metrics (runners/ppl.py: KL(fp || q), top-1 agreement, Δp of the correct
token, PPL ratio) need of the float model, per predicted token t:
    topk_idx  (T, k) int32    its k most likely tokens
    topk_logp (T, k) float32  their log-probabilities (float32 log-softmax of the logits)
    target_logp (T,) float32  log-probability of the token that follows
    top1      (T,) int32      its most likely token (argmax)
T = windows x (seqlen - 1) in window order; k = `eval.kld_topk` (default 64; exact KL when k is at
least the vocabulary). 64 x 8 bytes per token: 8 MB for the default job's 16k tokens, 150 MB for
every 4096-token window of WikiText-2 on a Llama tokenizer. Never tokens x vocabulary.

The cache is a safetensors file per key under `eval.kld_cache` (default <VQB_CACHE>/float_reference,
shared by every job of a sweep and by later sweeps). The key holds what determines the file: the
float weights (`runners.fingerprint.weights_fingerprint`), the exact evaluation tokens (a hash of
the window ids: dataset, tokenizer, seqlen and window count in one), k, the model dtype, the device
type, and the format version; it is stored in the file and checked on load, so a file made for
anything else is recomputed, never read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from runners.files import BadFile, check_safetensors

log = logging.getLogger("vq-bench")
FORMAT = 1
DEFAULT_TOPK = 64


@dataclass
class FloatReference:
    topk_idx: torch.Tensor  # (T, k) int32
    topk_logp: torch.Tensor  # (T, k) float32
    target_logp: torch.Tensor  # (T,) float32
    top1: torch.Tensor  # (T,) int32
    vocab: int
    windows_sha256: str

    @property
    def topk(self) -> int:
        return int(self.topk_idx.shape[1])

    def check(self, windows: torch.Tensor) -> None:
        if windows_sha256(windows) != self.windows_sha256:
            raise ValueError("the float reference was computed on other evaluation windows")

    def chunk(self, t0: int, t1: int, device) -> Tuple[torch.Tensor, ...]:
        """Tokens [t0, t1) on `device`: (idx int64, logp f64, target logp f64, top1 int64)."""
        return (self.topk_idx[t0:t1].to(device).long(), self.topk_logp[t0:t1].to(device).double(),
                self.target_logp[t0:t1].to(device).double(), self.top1[t0:t1].to(device).long())

    def window_nll(self, N: int, n: int) -> torch.Tensor:
        """(N,) float64: the float model's Σ NLL per window (n predicted tokens each)."""
        return -self.target_logp.double().reshape(N, n).sum(1)


def windows_sha256(windows: torch.Tensor) -> str:
    w = windows.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(w.shape)}".encode() + w.numpy().tobytes()).hexdigest()


@torch.no_grad()
def compute_reference(model, windows: torch.Tensor, device, topk: int) -> FloatReference:
    """One pass of the (float) model over the windows, the same pass `runners.ppl.score` makes."""
    from runners.ppl import chunked_log_probs

    N, n = windows.shape[0], windows.shape[1] - 1
    T = N * n
    idx = logp = None
    tgt = torch.empty(T, dtype=torch.float32)
    top1 = torch.empty(T, dtype=torch.int32)
    vocab = None
    for i, a, lp, y in chunked_log_probs(model, windows, device):
        if idx is None:
            vocab = lp.shape[1]
            k = min(topk, vocab)  # k >= vocabulary: the whole distribution, exact KL
            idx = torch.empty(T, k, dtype=torch.int32)
            logp = torch.empty(T, k, dtype=torch.float32)
        t0, t1 = i * n + a, i * n + a + lp.shape[0]
        v, j = lp.topk(idx.shape[1], dim=1)  # (c, k), sorted descending
        idx[t0:t1], logp[t0:t1] = j.to("cpu", torch.int32), v.cpu()
        tgt[t0:t1] = lp.gather(1, y[:, None])[:, 0].cpu()
        top1[t0:t1] = lp.argmax(1).to("cpu", torch.int32)
    return FloatReference(idx, logp, tgt, top1, int(vocab), windows_sha256(windows))


def cache_key(*, weights: str, windows: torch.Tensor, topk: int, dtype, device) -> Dict[str, Any]:
    return {"format": FORMAT, "weights": weights, "windows_sha256": windows_sha256(windows),
            "windows": list(windows.shape), "topk": int(topk), "dtype": str(dtype),
            "device_type": torch.device(device).type}


def cache_path(folder: str, key: Dict[str, Any]) -> str:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(folder, f"ref-{name}.safetensors")


def save(path: str, ref: FloatReference, key: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"topk_idx": ref.topk_idx, "topk_logp": ref.topk_logp, "target_logp": ref.target_logp,
               "top1": ref.top1}, tmp, metadata={"key": json.dumps(key, sort_keys=True), "vocab": str(ref.vocab)})
    os.replace(tmp, path)


def load(path: str, key: Dict[str, Any]) -> Optional[FloatReference]:
    """The cached reference, or None (with one log line) when the file is missing, damaged, or was
    made for another key."""
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        check_safetensors(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            stored = json.loads(md.get("key", "{}"))
            if stored != key:
                diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
                log.warning("float reference %s was made for another %s; computing it again", path, ", ".join(diff))
                return None
            t = {k: f.get_tensor(k) for k in ("topk_idx", "topk_logp", "target_logp", "top1")}
        return FloatReference(t["topk_idx"], t["topk_logp"], t["target_logp"], t["top1"], int(md["vocab"]),
                              key["windows_sha256"])
    except (BadFile, KeyError, ValueError) as e:
        log.warning("%s; computing the float reference again", e)
        return None


def float_reference(model, windows: torch.Tensor, device, *, weights: str, folder: str,
                    topk: int = DEFAULT_TOPK, name: str = "") -> Tuple[FloatReference, Dict[str, Any]]:
    """The float model's reference on these windows: from the cache, or computed (model must still
    be the float model) and cached. -> (reference, info {"computed", "path", "time_s"})."""
    dtype = next(model.parameters()).dtype
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    topk = min(topk, vocab) if vocab else topk
    key = cache_key(weights=weights, windows=windows, topk=topk, dtype=dtype, device=device)
    path = cache_path(folder, key)
    t0 = time.perf_counter()
    ref = load(path, key)
    computed = ref is None
    if computed:
        ref = compute_reference(model, windows, device, topk)
        save(path, ref, key)
    info = {"computed": computed, "path": path, "time_s": time.perf_counter() - t0, "topk": ref.topk,
            "vocab": ref.vocab}
    log.info("float reference %s: %s in %.1f s (%s)", name, "computed" if computed else "read from the cache",
             info["time_s"], path)
    return ref, info
