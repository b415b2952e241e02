"""The identity of a model's float weights, for cache keys (float-model distributions, Hessians).

A cached result computed from one model must never be read for another. `weights_fingerprint`
hashes what identifies the weights without reading all of them:
  * a model loaded from a folder of safetensors files (a local folder, the Hugging Face cache, the
    converted bundled model): per file its name, size, the whole safetensors header (every tensor's
    name, dtype, shape and offsets) and 16 blocks of 64 KiB of data spread evenly over the file.
    Two checkpoints of one architecture (a base model and its finetune) share headers but differ
    in every block of data, so they get different fingerprints; the cost is a few MB read per file.
  * anything else (a tiny model built in code): a hash of every parameter's bytes.
The model's dtype as loaded is part of the key (the same files loaded in bf16 are other weights).
"""
from __future__ import annotations

import glob
import hashlib
import os
import struct
from typing import Optional

import torch

SAMPLES = 16
BLOCK = 1 << 16


def file_fingerprint(path: str) -> str:
    """sha256 (hex) of a safetensors file's name, size, header and sampled data blocks."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else 0
        h.update(f.read(min(n, max(size - 8, 0))))  # the JSON header
        start = 8 + n
        span = max(size - start - BLOCK, 0)
        for i in range(SAMPLES):
            f.seek(start + (span * i) // max(SAMPLES - 1, 1))
            h.update(f.read(BLOCK))
    return h.hexdigest()


def folder_fingerprint(folder: str) -> Optional[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(file_fingerprint(p).encode())
    return h.hexdigest()


def _model_folder(model) -> Optional[str]:
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    if os.path.isdir(path):
        return path
    try:  # a hub id: its snapshot in the local Hugging Face cache
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    except Exception:  # noqa: BLE001  (not cached: fall back to the parameters themselves)
        return None


def parameters_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(model) -> str:
    """A 32-hex-digit identity of the model's float weights (see the module docstring). Call it on
    the float model (before quantization)."""
    dtype = str(next(model.parameters()).dtype)
    folder = _model_folder(model)
    fp = folder_fingerprint(folder) if folder else None
    kind = "files"
    if fp is None:
        fp, kind = parameters_fingerprint(model), "params"
    return hashlib.sha256(f"{kind}:{fp}:{dtype}".encode()).hexdigest()[:32]
