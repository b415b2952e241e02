"""Plain helpers the tests import as `from tests.helpers import ...` (one module name, never
`conftest`/`helpers` beside `tests.conftest`): run the CLI in a subprocess, read results, test
signals. Fixtures live in conftest.py."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import torch

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


def snr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """20·log10(‖x‖/‖x−y‖)."""
    return float(20 * torch.log10(x.norm() / (x - y).norm().clamp_min(1e-30)))


def correlated_hessian(n: int, tokens: int = 4096, seed: int = 0, decay: float = 0.9) -> torch.Tensor:
    """A realistic (correlated, anisotropic) Hessian E[x xᵀ]: activations with an AR(1)-like
    covariance across features plus a few heavy outlier channels."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n, dtype=torch.float64)
    cov = decay ** (idx[:, None] - idx[None, :]).abs()
    scale = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 0.7)
    scale[torch.randperm(n, generator=g)[: max(1, n // 32)]] *= 6.0  # outlier channels
    L = torch.linalg.cholesky(cov)
    x = (torch.randn(tokens, n, generator=g, dtype=torch.float64) @ L.T) * scale
    return (x.T @ x / tokens).float()
