"""CPU thread policy of quantization, chosen once and deliberately.

Per-layer quantization (every method's `quantize_layer`: the error-feedback column loop, k-means,
beam search) issues thousands of small ops. On them OpenMP's fork/join costs more than a second
thread gains, and when the cores are shared with another CPU-bound process it collapses: each
parallel region waits for a thread the OS has descheduled (GPTQ's quantization of the bundled
model took 2.9x its quiet time beside one busy process with 2 threads). So it runs on ONE thread
on CPU. The driver's block passes (calibration forwards, Hessian accumulation: large GEMMs) keep
torch's thread count, where a second core pays off. What kept them from collapsing beside a busy
neighbour is libgomp's spin-wait: an idle thread spins ~300k iterations on the core its late
partner needs; the `runners` package caps it (GOMP_SPINCOUNT=10000, set before torch loads): GPTQ
beside a busy process went from 1.82x to 1.34x its quiet time, the quiet time unchanged.

Thread count can change a BLAS result's summation order, so it is recorded with every run
(metrics.json `env.quantize_threads`): the same codes are expected only at the same counts.
"""
from __future__ import annotations

import contextlib

import torch

LAYER_THREADS = 1  # per-layer quantization on CPU


@contextlib.contextmanager
def single_thread(device):
    """Run the body on LAYER_THREADS CPU threads (no-op on an accelerator)."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(LAYER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def thread_policy(device) -> dict:
    """What `metrics.json` records: threads of the block passes and of per-layer quantization."""
    cpu = torch.device(device).type == "cpu"
    return {"block_passes": torch.get_num_threads(), "quantize_layer": LAYER_THREADS if cpu else torch.get_num_threads()}
