"""Command-line checks that run before Hydra: a bad group choice or a bad `bits` ends with one
line naming the bad value and the valid choices (not Hydra's multi-line report)."""
from __future__ import annotations

import math
import os
import re
import sys
from typing import List

from omegaconf import OmegaConf

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
GROUPS = ("model", "method", "kernel", "data", "eval", "logger", "experiment", "finetune")


def group_choices(group: str) -> List[str]:
    d = os.path.join(CONF, group)
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))


def launcher_choices() -> List[str]:
    """hydra/launcher=...: ours (conf/hydra/launcher) + every launcher Hydra's plugins register."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # plugin discovery registers the plugins' launcher configs
    names = {n[:-5] if n.endswith(".yaml") else n for n in ConfigStore.instance().list("hydra/launcher")}
    return sorted(names | set(group_choices(os.path.join("hydra", "launcher"))))


def _values(v: str) -> List[str]:
    if "(" in v or "[" in v:  # Hydra sweep functions (range(), choice()) and lists: leave to Hydra
        return []
    return [x.strip() for x in v.split(",")]


def argv_errors(argv: List[str]) -> List[str]:
    errors = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, val = arg.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS:
            choices = group_choices(key)
            for v in _values(val):
                if v not in choices:
                    errors.append(f"unknown {key} {v!r}; valid choices: {', '.join(choices)}")
        elif key == "hydra/launcher":  # passes through to Hydra; a typo fails here in one line
            choices = launcher_choices()
            for v in _values(val):
                if v not in choices:
                    errors.append(f"unknown hydra/launcher {v!r}; valid choices: {', '.join(choices)}")
        elif key == "bits":
            for v in _values(val):
                try:
                    b = float(v)
                except ValueError:
                    errors.append(f"bits={v!r} is not a number; give the target bits per weight, e.g. bits=2")
                    continue
                if not b > 0 or math.isinf(b):
                    errors.append(f"bits={v} must be a positive number of bits per weight (e.g. 2, 3, 4)")
        elif key == "seed":
            for v in _values(val):
                if not re.fullmatch(r"-?\d+", v):
                    errors.append(f"seed={v!r} is not an integer")
    return errors


def check_argv(argv: List[str]) -> None:
    errs = argv_errors(argv)
    if errs:
        print(f"error: {errs[0]}", file=sys.stderr)
        raise SystemExit(2)


SLUG_MAX = 120


def _slug(s: str) -> str:
    """A job folder name from Hydra's override_dirname. Longer than SLUG_MAX: a prefix and a hash
    of the whole (cutting it alone would give two sweep jobs that differ only past the cut, e.g.
    in `method=`, the same folder, and the second would overwrite the first's metrics.json)."""
    import hashlib

    full = str(s)
    s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", full).strip("_")
    if len(s) > SLUG_MAX:
        s = s[:SLUG_MAX - 11] + "~" + hashlib.sha256(full.encode()).hexdigest()[:10]
    return s or "default"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("slug"):
        OmegaConf.register_new_resolver("slug", _slug)
