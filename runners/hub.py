"""Fail fast without a network: decide before any hub call whether the hub can be reached.

Without this, a hub call on a machine with no network hangs ~25-50 s before failing.
"""
from __future__ import annotations

import functools
import os
import socket


def offline_flag() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    if offline_flag():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
