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
    """Call the method's exporter with the run config as plain data (resolved): nothing below the
    runner reads a Hydra config. Exporter signature: fn(model, tokenizer, run_config: dict, result: dict,
    out_dir)."""
    from omegaconf import OmegaConf

    run_config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    module, fn = EXPORTERS[run_config["method"]["name"]].split(":")
    getattr(importlib.import_module(module), fn)(model, tokenizer, run_config, result, out_dir)
