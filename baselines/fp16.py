"""The unquantized reference: the model's weights as loaded (16 bits per weight counted).

For the bundled SmolLM2-135M these are its Q4_1 GGUF weights converted to float: the
"reference" perplexity is that of the Q4_1 model, not of the original bf16 checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from vptq.methods import Method


class FP16(Method):
    name = "fp16"
    needs_hessian = False
    quantizes = False
    uses_bits = False

    @dataclass
    class Config:
        name: str = "fp16"

    def quantize_layer(self, W, H, *, name):  # pragma: no cover - never called
        raise RuntimeError("fp16 does not quantize")
