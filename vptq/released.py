"""`method=released`: a model someone already quantized, evaluated as one more row of the table.

`model.path=` names a folder in the official VPTQ format (microsoft/VPTQ's `VQuantLinear` layers in a
Hugging Face folder, e.g. a VPTQ-community download such as Meta-Llama-3.1-8B-Instruct-v8-k65536-256-woft,
or one of our own exports). It is read by `vptq.format.load_vptq` (safetensors only, nothing unpickled, no
remote code) into QuantLinear(VQWeight) layers and evaluated through the same protocol as a run's own
quantization. Nothing is quantized here:

  * bits: counted from the loaded layers' stored tensors (`VQWeight.storage()`, component by component,
    codebooks padded to a power of two by the format included as stored), so `bits.index/total/
    components` in metrics.json mean what they mean for our own runs; `bits=` does not apply;
  * settings: each layer shape's configuration as stored (e.g. {"4096x4096": "v8k65536r256"});
  * KL to the float model (eval.kld): only when `method.float_model=` names the float model it was
    quantized from (hub id or folder, loaded like model=hf): its distributions are cached like any
    float reference. Without it the row has perplexity and no KL (the quantized model is no reference
    for itself), and the job says so in its log.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from vptq.methods import ITERS_PRESETS, Method, MethodError, check_choice
from vptq.qlinear import QuantLinear
from vptq.qweight import Storage

FORMATS = ("vptq",)  # folder formats that load (vptq.format.load_vptq)


class Released(Method):
    name = "released"
    needs_hessian = False
    quantizes = False  # nothing to quantize: the model is read quantized
    uses_bits = False
    loads_quantized = True  # the runner reads model.path with `load` instead of loading a float model

    @dataclass
    class Config:
        name: str = "released"
        format: str = "vptq"  # the folder's format: the official VPTQ one (microsoft/VPTQ VQuantLinear)
        float_model: Optional[str] = None  # the float model it came from (hub id or folder): KL to it; null: no KL
        variant: str = "reference"  # the weights as released: nothing else exists
        iters: str = "cpu"  # no iteration counts (accepted so +experiment=paper composes)

    def __init__(self, config, *, bits, seed=0):
        super().__init__(config, bits=bits, seed=seed)
        check_choice("format", config.format, FORMATS)
        check_choice("variant", config.variant, ("reference",))
        check_choice("iters", config.iters, ITERS_PRESETS)

    def load(self, folder: str, *, dtype: Optional[torch.dtype] = None, kernel: str = "torch"):
        """The released model (eval mode, CPU, no grad) and its tokenizer; float parameters (embeddings,
        norms, head, biases) cast to `dtype` if given (the codebooks stay as stored)."""
        from vptq.format import load_vptq

        model, tok = load_vptq(folder, device="cpu", kernel=kernel)
        if tok is None:
            raise MethodError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json): "
                              f"method=released evaluates a whole model folder")
        if dtype is not None:
            for p in model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
        model.config.use_cache = False
        return model, tok

    @staticmethod
    def layers(model: nn.Module) -> Dict[str, QuantLinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    def plan_of(self, model: nn.Module) -> Dict[tuple, str]:
        """{(out, in): the stored configuration} of the loaded layers; a shape stored several ways
        lists each (most frequent first)."""
        by_shape: Dict[tuple, Counter] = {}
        for m in self.layers(model).values():
            q = m.qweight
            by_shape.setdefault((q.out_features, q.in_features), Counter())[q.short()] += 1
        return {shape: "|".join(c for c, _ in cnt.most_common()) for shape, cnt in sorted(by_shape.items())}

    def storage(self, model: nn.Module) -> Storage:
        """Bits of every loaded quantized layer, summed, as stored."""
        layers = self.layers(model)
        if not layers:
            raise MethodError("the released model has no quantized layers (QuantLinear): nothing to count")
        total = Storage(0, {})
        for m in layers.values():
            total = total + m.qweight.storage()
        return total

    def settings(self, plan: Optional[Dict[tuple, Any]] = None) -> Dict[str, Any]:
        s: Dict[str, Any] = {"variant": self.config.variant, "iters": self.config.iters,
                             "format": self.config.format, "float_model": self.config.float_model}
        s.update({f"{o}x{i}": c for (o, i), c in sorted((plan or {}).items())})
        return s

    def quantize_layer(self, W, H, *, name, plan=None):  # pragma: no cover - never called
        raise RuntimeError("method=released does not quantize: it loads model.path as released")
