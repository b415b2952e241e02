"""Triton kernels for VPTQ weights (`kernel=triton`): dequantization and a fused
dequantize-GEMV that read the packed index stream, each beside its plain-torch reference.

Importing this package registers "triton" in `vptq.qlinear.KERNELS`; `dispatch.triton_linear`
returns None (-> the torch path) for whatever the kernels do not take. Set TRITON_INTERPRET=1
before the first import to run the kernels on CPU through Triton's interpreter (tests).

    layout.py    packed index streams and padded codebooks built from a VQWeight (cached)
    dequant.py   packed -> dense weight (prefill), `dequantize_reference`
    gemv.py      fused dequantize-GEMV for 1-16 tokens (decode), `gemv_reference`
    dispatch.py  route by token count, autotuning, fallback
"""
from vptq.kernels.dequant import dequantize, dequantize_reference
from vptq.kernels.dispatch import triton_linear
from vptq.kernels.gemv import gemv, gemv_reference
from vptq.kernels.layout import KernelWeight, Unsupported, from_vqweight
from vptq.qlinear import KERNELS

KERNELS["triton"] = triton_linear

__all__ = ["KernelWeight", "Unsupported", "from_vqweight", "dequantize", "dequantize_reference", "gemv",
           "gemv_reference", "triton_linear"]
