"""Capture once: one pass of the float model over the calibration windows writes, per decoder block,
what quantizing that block needs, so that blocks can then be quantized anywhere, in any order.

    <cache_dir>/block{i:03d}.safetensors    the Hessians of block i's linear inputs ("H/<key>"), and,
                                            only where the method or finetuning reads them, the
                                            block's float inputs "X" (N, L, D) and outputs "Y"
    <cache_dir>/kwargs.safetensors          the keyword arguments every block is called with (rotary
                                            position embeddings, masks: tensors + JSON for the rest)
    <cache_dir>/frontier.safetensors        the float activations entering the first block not yet
                                            captured: a killed capture resumes there

With Hessians of the float model (`hessian.protocol=float`, VPTQ and QuIP#'s protocol) block i's
inputs are the float outputs of blocks 0..i-1, so one pass gives every block its inputs: L block
forwards, where L jobs that each rebuild their inputs need L(L+1)/2.

Every file carries the key of what determines it (`CaptureKey`: the float weights' fingerprint, the
exact calibration tokens, the protocol, the format version; checked on every read): a file written
for another model, other calibration data or an older format is recomputed with a log line, never
silently reused. The serial driver's `hessian.cache_dir` uses the same files and keys.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from runners.files import BadFile, check_safetensors

log = logging.getLogger(__name__)
FORMAT = 1


@dataclass(frozen=True)
class CaptureKey:
    weights: str  # runners.fingerprint.weights_fingerprint of the float model
    calib_sha256: str  # the calibration token windows (corpus, seed, count and length in one)
    calib_shape: Tuple[int, int]
    protocol: str = "float"
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "calib_shape": list(self.calib_shape)}, sort_keys=True)


def make_key(model, calib: torch.Tensor, protocol: str = "float") -> CaptureKey:
    from runners.fingerprint import weights_fingerprint
    from runners.kld import windows_sha256

    return CaptureKey(weights=weights_fingerprint(model), calib_sha256=windows_sha256(calib),
                      calib_shape=(int(calib.shape[0]), int(calib.shape[1])), protocol=protocol)


@dataclass
class CacheCost:
    """What the cache cost this process: bytes written and read, block forwards run."""

    block_forwards: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    blocks_captured: int = 0
    blocks_cached: int = 0
    capture_s: float = 0.0

    def add(self, other: "CacheCost") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def block_file(cache_dir: str, i: int) -> str:
    return os.path.join(cache_dir, f"block{i:03d}.safetensors")


def _write(path: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, str], cost: CacheCost) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)
    cost.bytes_written += os.path.getsize(path)


def _read_meta(path: str, key: CaptureKey) -> Optional[Dict[str, str]]:
    """The file's metadata if it is whole and was written for `key`; else None with one log line."""
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        check_safetensors(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except BadFile as e:
        log.warning("%s; computing it again", e)
        return None
    if meta.get("key") != key.to_json():
        try:
            stored = json.loads(meta.get("key", "{}"))
        except json.JSONDecodeError:
            stored = {}
        want = json.loads(key.to_json())
        diff = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k)) or ["key"]
        log.warning("%s was written for another %s; computing it again", path, ", ".join(diff))
        return None
    return meta


def read_block(cache_dir: str, i: int, key: CaptureKey, device="cpu", cost: Optional[CacheCost] = None,
               need: Tuple[str, ...] = ("H",)) -> Optional[Dict[str, Any]]:
    """Block i's cached entries ({"H": {hessian key: H}, "X": inputs, "Y": outputs}) if the file
    exists, is whole, matches `key` and holds every part in `need`; else None."""
    path = block_file(cache_dir, i)
    meta = _read_meta(path, key)
    if meta is None:
        return None
    if not _has_parts(meta, need, path):
        return None
    from safetensors import safe_open

    out: Dict[str, Any] = {"H": {}}
    with safe_open(path, framework="pt", device=str(device)) as f:
        for name in f.keys():
            if name.startswith("H/") or (name in ("X", "Y") and name in need):
                t = f.get_tensor(name)
                if cost is not None:
                    cost.bytes_read += t.numel() * t.element_size()
                if name.startswith("H/"):
                    out["H"][name[2:]] = t
                else:
                    out[name] = t
    if "Y" in need and "Y" not in out:  # block i's float outputs are block i+1's inputs, stored once
        nxt = read_block(cache_dir, i + 1, key, device, cost, need=("X",))
        if nxt is None:
            return None
        out["Y"] = nxt["X"]
    return out


def _has_parts(meta: Dict[str, str], need: Tuple[str, ...], path: str) -> bool:
    """The file holds what is needed ("Y" of a block that is not the last lives in the next file)."""
    parts = set(json.loads(meta.get("parts", "[]"))) | ({"Y"} if meta.get("next_holds_outputs") == "1" else set())
    missing = sorted(set(need) - parts)
    if missing:
        log.info("%s lacks %s (captured without them); computing it again", path, missing)
    return not missing


def has_block(cache_dir: str, i: int, key: CaptureKey, need: Tuple[str, ...] = ("H",)) -> bool:
    meta = _read_meta(block_file(cache_dir, i), key)
    return meta is not None and _has_parts(meta, need, block_file(cache_dir, i))


def write_block(cache_dir: str, i: int, key: CaptureKey, hessians: Dict[str, torch.Tensor], cost: CacheCost,
                inputs: Optional[torch.Tensor] = None, outputs: Optional[torch.Tensor] = None,
                next_holds_outputs: bool = False) -> None:
    """next_holds_outputs: block i's outputs are stored as block i+1's inputs (not again here)."""
    tensors = {f"H/{k}": v for k, v in hessians.items()}
    parts = ["H"]
    if inputs is not None:
        tensors["X"], parts = inputs, parts + ["X"]
    if outputs is not None:
        tensors["Y"], parts = outputs, parts + ["Y"]
    _write(block_file(cache_dir, i), tensors, {"key": key.to_json(), "block": str(i), "parts": json.dumps(parts),
                                               "next_holds_outputs": "1" if next_holds_outputs else "0"}, cost)


# ---------------------------------------------------------------------------- block kwargs
def save_kwargs(cache_dir: str, key: CaptureKey, kwargs: Dict[str, Any], cost: CacheCost) -> None:
    """The keyword arguments the blocks are called with: tensors (a tuple of tensors, e.g. rotary
    (cos, sin), as "<name>/<j>") and JSON-able values; anything else is refused."""
    tensors, plain = {}, {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v
        elif isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
            for j, t in enumerate(v):
                tensors[f"{k}/{j}"] = t
            plain[f"__tuple__{k}"] = len(v)
        else:
            json.dumps(v)  # raises for what cannot be stored as plain data
            plain[k] = v
    _write(os.path.join(cache_dir, "kwargs.safetensors"), tensors,
           {"key": key.to_json(), "plain": json.dumps(plain)}, cost)


def load_kwargs(cache_dir: str, key: CaptureKey, device="cpu") -> Optional[Dict[str, Any]]:
    path = os.path.join(cache_dir, "kwargs.safetensors")
    meta = _read_meta(path, key)
    if meta is None:
        return None
    from safetensors import safe_open

    plain = json.loads(meta["plain"])
    out = {k: v for k, v in plain.items() if not k.startswith("__tuple__")}
    with safe_open(path, framework="pt", device=str(device)) as f:
        names = list(f.keys())
        for k in names:
            if "/" not in k:
                out[k] = f.get_tensor(k)
        for k, n in plain.items():
            if k.startswith("__tuple__"):
                name = k[len("__tuple__"):]
                out[name] = tuple(f.get_tensor(f"{name}/{j}") for j in range(n))
    return out


# ---------------------------------------------------------------------------- the capture pass
@dataclass
class CaptureResult:
    cost: CacheCost = field(default_factory=CacheCost)
    blocks: int = 0


@torch.no_grad()
def capture(model: nn.Module, calib: torch.Tensor, device, cache_dir: str, key: CaptureKey, *,
            keep_activations: bool = False) -> CaptureResult:
    """Run the float model over `calib` once and write every block's cache file (resumable: blocks
    whose file exists for this key are skipped; a killed run restarts at its first missing block
    from `frontier.safetensors`). keep_activations: also store each block's float inputs and
    outputs (block finetuning reads them)."""
    from runners.arch import arch_of, blocks_of, hessian_groups, linears_of
    from runners.driver import capture_block0_inputs, collect_hessians, run_block

    if key.protocol != "float":
        raise ValueError("capture-once needs hessian.protocol=float (every block's Hessians from the float model)")
    t0 = time.perf_counter()
    res = CaptureResult()
    cost = res.cost
    arch = arch_of(model)
    blocks = blocks_of(model, arch)
    res.blocks = len(blocks)
    need = ("H", "X", "Y") if keep_activations else ("H",)
    have = [has_block(cache_dir, i, key, need) for i in range(len(blocks))]
    kw_ok = load_kwargs(cache_dir, key) is not None
    if all(have) and kw_ok:
        res.cost.blocks_cached = len(blocks)
        log.info("capture: every block of %s is cached (%s)", cache_dir, key.weights[:12])
        return res
    first = have.index(False) if not all(have) else len(blocks)
    inputs, kwargs = capture_block0_inputs(model, calib, device, arch)
    if not kw_ok:
        save_kwargs(cache_dir, key, kwargs, cost)
    start = 0
    if first > 0:  # resume: the activations entering block `first`, if the killed run left them
        fr = os.path.join(cache_dir, "frontier.safetensors")
        meta = _read_meta(fr, key)
        if meta is not None and int(meta.get("block", -1)) == first:
            from safetensors.torch import load_file

            inputs = load_file(fr, device=str(device))["X"]
            cost.bytes_read += inputs.numel() * inputs.element_size()
            start = first
            log.info("capture: resuming at block %d/%d from %s", first + 1, len(blocks), fr)
    for i in range(start, len(blocks)):
        block = blocks[i]
        block.to(device)
        if have[i]:  # cached: only its float outputs are needed, as the next block's inputs
            out = run_block(block, inputs, kwargs)
            cost.blocks_cached += 1
        else:
            lin = linears_of(block)
            hkeys = hessian_groups(lin, arch)
            hessians, out = collect_hessians(block, inputs, kwargs, hkeys, lin, keep_outputs=True)
            last = i == len(blocks) - 1
            write_block(cache_dir, i, key, hessians, cost, inputs=inputs if keep_activations else None,
                        outputs=out if (keep_activations and last) else None,
                        next_holds_outputs=keep_activations and not last)
            cost.blocks_captured += 1
        cost.block_forwards += 1
        if str(device) != "cpu":
            block.to("cpu")
        inputs = out
        if i + 1 < len(blocks) and not all(have[i + 1:]):
            _write(os.path.join(cache_dir, "frontier.safetensors"), {"X": inputs},
                   {"key": key.to_json(), "block": str(i + 1)}, cost)
        log.info("capture: block %d/%d %s", i + 1, len(blocks), "cached" if have[i] else "captured")
    fr = os.path.join(cache_dir, "frontier.safetensors")
    if os.path.isfile(fr):
        os.unlink(fr)
    cost.capture_s = time.perf_counter() - t0
    return res


def capture_dir(cache_root: str, key: CaptureKey) -> str:
    """A cache folder per key under a shared root: two models or calibration sets never share one."""
    return os.path.join(cache_root, hashlib.sha256(key.to_json().encode()).hexdigest()[:16])
