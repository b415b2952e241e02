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
import runners  # noqa: E402,F401  before torch: sets libgomp's spin limit (runners/__init__.py)

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
