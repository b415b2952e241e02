"""Small helpers shared by the spine tests (run the CLI in a subprocess, read results)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "runners", "run.py")


def run_cli(args, cwd=None, timeout=600, env=None):
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
              "HYDRA_FULL_ERROR": "0", "PYTHONHASHSEED": "0"})
    if env:
        e.update(env)
    return subprocess.run([sys.executable, RUN, *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)


def metrics_under(root):
    out = []
    for p in sorted(glob.glob(os.path.join(root, "**", "metrics.json"), recursive=True)):
        with open(p) as f:
            out.append(json.load(f))
    return out
