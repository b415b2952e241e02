"""`save.quantized=true`: write the quantized model as a Hugging Face folder.

Exporters are registered per method in `EXPORTERS` (method name -> "module:function"); a method
with no exporter is refused before any work starts.
"""
from __future__ import annotations

import importlib
from typing import Dict

from runners.errors import UserError

EXPORTERS: Dict[str, str] = {
    "vptq": "vptq.format:export_run",
}


def check_exportable(method) -> None:
    if method.name not in EXPORTERS:
        valid = ", ".join(sorted(EXPORTERS)) or "none yet"
        raise UserError(f"save.quantized=true is not supported for method={method.name}; "
                        f"methods with an exporter: {valid}")


def save_quantized(model, tokenizer, cfg, result, out_dir: str) -> None:
    module, fn = EXPORTERS[cfg.method.name].split(":")
    getattr(importlib.import_module(module), fn)(model, tokenizer, cfg, result, out_dir)
