"""Keeping the layer-by-layer driver's resident memory at one model plus one block.

Two things make a CPU process's RSS grow block after block although every block's float weights
are dropped once it is quantized (measured on SmolLM2-135M, 2-bit VPTQ: 1.8 GB peak for a 0.5 GB
fp32 model, docs/LOG.md):

* Weights loaded from safetensors are views of a read-only file mapping. Reading a block's
  weights to quantize them faults its pages in, and they stay resident (counted in RSS) for as
  long as the mapping lives, i.e. as long as any tensor of the file does (the embeddings do).
  `drop_file_pages` tells the kernel we are done with a tensor's pages (madvise MADV_DONTNEED).
  This is safe for a private file-backed mapping whatever happens next: a later read of those
  addresses faults the same bytes in again from the file. It is applied only to whole pages
  inside the tensor, and only when /proc/self/maps shows that they belong to a file mapping of
  a `.safetensors` file (never to anonymous memory, where it would zero the data).
* glibc keeps freed heap memory (quantization temporaries, per-block activations) in its arenas;
  `trim_heap` (malloc_trim) returns it to the system.

Both are no-ops where unsupported (not Linux/glibc, CUDA tensors).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from typing import List, Tuple

_MADV_DONTNEED = 4
_libc = None


def _lib():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return _libc or None


def trim_heap() -> bool:
    """Return free heap memory to the system (glibc malloc_trim). False where unavailable."""
    lib = _lib()
    fn = getattr(lib, "malloc_trim", None) if lib else None
    if fn is None:
        return False
    fn(ctypes.c_size_t(0))
    return True


def _file_maps(suffix: str) -> List[Tuple[int, int]]:
    """(start, end) of this process's mappings of files whose name ends with `suffix`."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].rstrip("\n").endswith(suffix):
                    a, b = parts[0].split("-")
                    out.append((int(a, 16), int(b, 16)))
    except OSError:
        pass
    return out


def drop_file_pages(tensors, suffix: str = ".safetensors") -> int:
    """Release the resident pages of CPU tensors that are views of a `suffix` file mapping and that
    nothing will read again. -> bytes advised away (0 where unsupported)."""
    lib = _lib()
    if lib is None or not hasattr(lib, "madvise"):
        return 0
    maps = _file_maps(suffix)
    if not maps:
        return 0
    page = mmap.PAGESIZE
    done = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            continue
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        start = -(-lo // page) * page  # whole pages inside the tensor only
        end = (hi // page) * page
        if end <= start or not any(a <= start and end <= b for a, b in maps):
            continue
        if lib.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED)) == 0:
            done += end - start
    return done


def release_block(old_weights) -> None:
    """After a block's linears were replaced by quantized ones: drop the float weights' file pages
    and trim the heap."""
    drop_file_pages(old_weights)
    trim_heap()
