"""The one setup path from a run's config to the objects that do the work, used by the job
(runners/job.py) and by every block job of a layer-parallel run (runners/parallel.py) alike, so
both build the same method, device and kernel from the same values. Below this module nothing
reads a DictConfig: `vptq/` and `baselines/` get typed dataclasses and keyword arguments.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf

from runners.errors import UserError

KERNEL_NAMES = ("torch", "triton", "cpu")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA device is available; valid here: auto, cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device {name!r}; valid choices: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def register_kernel(name: str) -> None:
    """Import what registers a kernel in vptq.qlinear.KERNELS; one line naming the valid ones if unknown."""
    if name in ("triton", "cpu"):
        import vptq.kernels  # noqa: F401  (registers "triton" and "cpu")
    from vptq.qlinear import KERNELS

    if name != "torch" and name not in KERNELS:
        raise UserError(f"kernel={name!r} is not registered; valid choices: {', '.join(KERNEL_NAMES)}")


def build_method(method: Any, bits: float, seed: int):
    """The method from its config node (a DictConfig of the job, or the plain dict a block job gets),
    merged onto its typed schema: the same object either way."""
    from vptq.methods import build_method as build, method_class

    node = method if isinstance(method, DictConfig) else OmegaConf.create(method)
    cls = method_class(node.name)
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), node))
    return build(node.name, config, bits=float(bits), seed=int(seed))


def model_config(model: Any):
    """The typed ModelConfig of a config node or plain dict (what runners.models.load_model takes)."""
    from runners.schema import ModelConfig

    node = model if isinstance(model, DictConfig) else OmegaConf.create(model)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


def plain(cfg: DictConfig) -> Dict[str, Any]:
    """The resolved config as plain data (what block jobs receive)."""
    return OmegaConf.to_container(cfg, resolve=True)
