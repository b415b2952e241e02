"""The CPU's caches as Linux sysfs reports them, read in one place: by the CPU kernel (whether a codebook
nearly fills the L2: `vptq.kernels.cpu.l2_bytes`) and into every run's record (`runners.metrics.
cpu_identity`). Standard library only."""
from __future__ import annotations

import glob
import os
from typing import Dict

CACHE_SYSFS = "/sys/devices/system/cpu/cpu0/cache"


def cache_sizes(sysfs: str = CACHE_SYSFS) -> Dict[str, str]:
    """cpu0's data/unified caches from sysfs: {"L1d": "32K", "L2": "1024K", "L3": "32768K"} (per
    instance; {} where sysfs does not say)."""
    out: Dict[str, str] = {}
    for d in sorted(glob.glob(os.path.join(sysfs, "index[0-9]*"))):
        try:
            with open(os.path.join(d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        out[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return out


def size_bytes(text: str) -> int:
    """A sysfs cache size ("1024K", "2M") in bytes; 0 for an empty or unreadable one."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(text.rstrip("KMG")) * mult
    except ValueError:
        return 0
