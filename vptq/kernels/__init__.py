"""Fast kernels for quantized weights, each beside its plain-torch reference (the torch path):
Triton kernels (`kernel=triton`: dequantization and a fused dequantize-GEMV that read the packed
index stream) and a C++ gather-FMA GEMV for decode on the CPU (`kernel=cpu`).

Importing this package registers "triton" and "cpu" in `vptq.qlinear.KERNELS`; `dispatch.triton_linear`
and `cpu.cpu_linear` return None (-> the torch path) for whatever they do not take. Each weight type
says how the kernels read it (`layout.layout_of`, `QuantizedWeight.kernel_layout`). Set
TRITON_INTERPRET=1 before the first import to run the Triton kernels on CPU through Triton's
interpreter (tests). The C++ library is compiled on the first `kernel=cpu` call (seconds; cached).

    layout.py    `layout_of`; packed index streams and padded codebooks built from a VQWeight (cached)
    dequant.py   packed -> dense weight (prefill), `dequantize_reference`
    gemv.py      fused dequantize-GEMV for 1-16 tokens (decode), `gemv_reference`
    dispatch.py  route by token count, autotuning, fallback
    cpu.py       kernel=cpu: buffers, build and load of csrc/vq_cpu.cpp, fallback
"""
from vptq.kernels.cpu import cpu_linear
from vptq.kernels.dequant import dequantize, dequantize_reference
from vptq.kernels.dispatch import triton_linear
from vptq.kernels.gemv import gemv, gemv_reference
from vptq.kernels.layout import KernelWeight, Unsupported, from_layout, from_vqweight, layout_of
from vptq.qlinear import KERNELS

KERNELS["triton"] = triton_linear
KERNELS["cpu"] = cpu_linear

__all__ = ["KernelWeight", "Unsupported", "cpu_linear", "dequantize", "dequantize_reference", "from_layout",
           "from_vqweight", "gemv", "gemv_reference", "layout_of", "triton_linear"]
