"""The unquantized reference: the model's weights as loaded (16 bits per weight counted).

For the bundled SmolLM2-135M these are its Q4_1 GGUF weights converted to float: the
"reference" perplexity is that of the Q4_1 model, not of the original bf16 checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from vptq.methods import ITERS_PRESETS, Method, check_choice


class FP16(Method):
    name = "fp16"
    needs_hessian = False
    quantizes = False
    uses_bits = False

    @dataclass
    class Config:
        name: str = "fp16"
        variant: str = "reference"  # the weights as loaded: nothing else exists
        iters: str = "cpu"  # no iteration counts (accepted so +experiment=paper composes)

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        check_choice("variant", config.variant, ("reference",))
        check_choice("iters", config.iters, ITERS_PRESETS)

    def settings(self, plan=None):
        return {"variant": self.config.variant, "iters": self.config.iters}

    def quantize_layer(self, W, H, *, name, plan=None):  # pragma: no cover - never called
        raise RuntimeError("fp16 does not quantize")
