"""The method registry and the one call shape every method has.

`METHODS` maps a registry name to "module:Class"; classes are imported lazily so heavy
optional dependencies load only when used. A method is constructed from its typed config
(`Class.Config`, a dataclass that is also its Hydra schema), the run's `bits` budget and seed,
and quantizes one linear at a time: `quantize_layer(W, H, name=...) -> QuantizedWeight`.
The per-layer choices the `bits` budget makes are a value: `plan(shapes) -> {shape: layer plan}`
(pure); `quantize_layer(..., plan=layer_plan)` follows the given layer plan and `settings(plan)`
reports it.
"""
from __future__ import annotations

import abc
import importlib
import zlib
from typing import Any, ClassVar, Dict, Iterable, Optional, Tuple

import torch

from vptq.qweight import QuantizedWeight

METHODS: Dict[str, str] = {
    "fp16": "baselines.fp16:FP16",
    "rtn": "baselines.rtn:RTN",
    "gptq": "baselines.gptq:GPTQ",
    "gptvq": "baselines.gptvq:GPTVQ",
    "aqlm": "baselines.aqlm:AQLM",
    "vptq": "vptq.quantizer:VPTQ",
    "released": "vptq.released:Released",  # a model quantized elsewhere (official VPTQ folder), evaluated as is
}


Plan = Dict[Tuple[int, int], Any]  # (out, in) -> a method's layer plan


class MethodError(ValueError):
    """A bad method name or setting: one line that names the bad value and the valid choices.
    Defined here so that `vptq/` and `baselines/` need nothing from `runners/`; the runner reports it
    as a user error (no traceback)."""


class BudgetError(MethodError):
    """No configuration of the method meets the requested bits budget."""


ITERS_PRESETS = ("cpu", "paper")  # `iters=`: CPU-sized counts | the reference's (paper) counts


def check_choice(field: str, value: Any, valid: Iterable[Any]) -> None:
    """One-line MethodError naming the bad value and the valid choices (e.g. method.variant)."""
    valid = tuple(valid)
    if value not in valid:
        raise MethodError(f"method.{field}={value!r}; valid: {', '.join(map(str, valid))}")


def method_class(name: str):
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; valid choices: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, config: Any, *, bits: Optional[float], seed: int = 0) -> "Method":
    return method_class(name)(config, bits=bits, seed=seed)


class Method(abc.ABC):
    """A quantization method: turns one linear weight (and its Hessian) into a QuantizedWeight.

    Subclasses set `name`, `Config` (a dataclass with a `name` field) and `needs_hessian`.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    needs_hessian: ClassVar[bool] = True
    quantizes: ClassVar[bool] = True  # False for the unquantized reference
    uses_bits: ClassVar[bool] = True  # False when `bits` does not change the result
    loads_quantized: ClassVar[bool] = False  # True: the model is read already quantized (method=released)

    def __init__(self, config: Any, *, bits: Optional[float], seed: int = 0):
        self.config = config
        self.bits = bits
        self.seed = seed

    # -- the plan: a value, computed from (config, bits) alone
    def layer_plan(self, out_f: int, in_f: int) -> Any:
        """The settings this method uses on an (out_f, in_f) layer (a method-specific frozen value,
        e.g. a dataclass), decided from the config and `bits` for this shape on its own. Pure: it
        changes nothing, so calling it (or `plan`) first never changes a result. Raises
        BudgetError when `bits` is impossible for the shape. None: no per-layer settings."""
        return None

    def plan(self, shapes: Iterable[Tuple[int, int]]) -> Plan:
        """{(out, in): layer plan} for every distinct shape, each decided on its own."""
        return {s: self.layer_plan(*s) for s in sorted({(int(o), int(i)) for o, i in shapes})}

    def check_budget(self, shapes: Iterable[Tuple[int, int]]) -> Plan:
        """Alias of `plan` (users' scripts call it): raises BudgetError before any heavy work if
        `bits` is impossible for these shapes; no side effects."""
        return self.plan(shapes)

    @abc.abstractmethod
    def quantize_layer(self, W: torch.Tensor, H: Optional[torch.Tensor], *, name: str,
                       plan: Any = None) -> QuantizedWeight:
        """W: (out_features, in_features) float; H: (in_features, in_features) = E[x xᵀ] or None.
        plan: this layer's plan (default: `self.layer_plan(*W.shape)`)."""

    def finetune_block(self, block: torch.nn.Module, ctx: "BlockContext") -> Dict[str, float]:
        """Optional block-level finetuning after a block's linears are quantized."""
        return {}

    @property
    def uses_float_outputs(self) -> bool:
        """Whether `finetune_block` reads `ctx.float_outputs` (the float block's outputs): the
        driver keeps them (one activation tensor of the calibration set) only then."""
        return False

    def settings(self, plan: Optional[Plan] = None) -> Dict[str, Any]:
        """What a results table shows about this run: the config's algorithm settings and, given
        a plan, the per-shape choices it holds."""
        return {}

    def layer_seed(self, name: str) -> int:
        """Deterministic per-layer seed (same config, same seed -> same codes)."""
        return (self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


class BlockContext:
    """What a block-level step (finetuning) sees: the block's calibration inputs, the float
    block's outputs on them, and the keyword arguments the block is called with."""

    def __init__(self, inputs, float_outputs, block_kwargs, device, index: int):
        self.inputs = inputs  # (N, L, D)
        self.float_outputs = float_outputs  # (N, L, D) or None
        self.block_kwargs = block_kwargs
        self.device = device
        self.index = index
