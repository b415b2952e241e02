"""Shared test fixtures. Hub access is off for every test (a hub call would hang ~25-50 s)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
WIKITEXT2 = os.path.join(SHARED, "wikitext-2")
PIQA = os.path.join(SHARED, "piqa")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture
def one_thread():
    """Run the test on one CPU thread: on small tensors OpenMP fork/join dominates, and collapses
    on a shared 2-core machine. Modules opt in: pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture
def wikitext2_dir():
    if not os.path.isdir(WIKITEXT2):
        pytest.skip("../shared/data/wikitext-2 is not on this machine")
    return WIKITEXT2


@pytest.fixture
def piqa_dir():
    if not os.path.isdir(PIQA):
        pytest.skip("../shared/data/piqa is not on this machine")
    return PIQA
