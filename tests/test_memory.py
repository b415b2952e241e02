"""runners.memory: dropping a quantized block's float weights from RSS is safe and effective."""
from __future__ import annotations

import platform
import sys

import pytest
import torch

from runners.memory import drop_file_pages, trim_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")


def _rss_mb() -> float:
    """Resident MB (VmRSS: file pages count as RssFile on a disk, RssShmem on a tmpfs tmp_path)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def test_file_backed_pages_are_released_and_read_back_identically(tmp_path):
    n = 4 << 20  # 16 MB of float32
    ref = torch.arange(n, dtype=torch.float32)
    path = tmp_path / "w.safetensors"  # the name is what marks a weight file
    ref.numpy().tofile(path)
    t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)  # a private file mapping
    assert torch.equal(t, ref)  # every page faulted in
    before = _rss_mb()
    dropped = drop_file_pages([t[1:]])  # a view: only whole pages inside it go
    assert 16 * 2**20 - 2 * 4096 <= dropped < 16 * 2**20
    assert before - _rss_mb() > 12  # MB left the resident set
    assert torch.equal(t, ref)  # a later read gets the same bytes from the file
    # another suffix: untouched
    assert drop_file_pages([t], suffix=".gguf") == 0


def test_anonymous_memory_is_never_touched():
    x = torch.arange(1 << 20, dtype=torch.float32)
    assert drop_file_pages([x, None, torch.empty(0)]) == 0
    assert torch.equal(x, torch.arange(1 << 20, dtype=torch.float32))
    assert trim_heap() == (platform.libc_ver()[0] == "glibc")  # malloc_trim exists exactly on glibc
