"""Layer-parallel quantization: a model's decoder blocks quantized by separate jobs.

With Hessians of the float model (`hessian.protocol=float`, as in VPTQ and QuIP#) block i's
calibration inputs are the FLOAT outputs of blocks 0..i-1, so every block is independent:

    main job:  groups of `quantize.blocks_per_job` blocks that have no checkpoint yet
               -> one submitit job each (a Slurm job array under hydra/launcher=slurm|submitit_slurm,
                  local processes otherwise), all writing into the run's checkpoint folder
    each job:  load the model, run the float blocks up to its own, quantize only its blocks
               (`runners.driver.quantize_model(only_blocks=..., checkpoint_dir=...)`)
    main job:  `quantize_model(checkpoint_dir=...)` again: every block is loaded from its
               checkpoint instead of quantized -> one assembled model, bit-identical to a
               single-process run with the same config (same inputs, same seeds per layer name)

A rerun submits only the groups whose checkpoints are missing (an interrupted array resumes).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from runners.checkpoint import block_done
from runners.errors import UserError, choices_error

log = logging.getLogger(__name__)
EXECUTORS = ("auto", "local", "slurm", "debug")  # debug: in this process (submitit.DebugExecutor)
LOCAL_PARALLEL = 2  # local block jobs running at once (each holds a copy of the model)


def check_parallel(cfg: DictConfig) -> None:
    """The cheap checks, before any model is loaded."""
    q = cfg.quantize
    if q.executor not in EXECUTORS:
        raise choices_error("quantize.executor", q.executor, EXECUTORS)
    if not q.parallel:
        return
    if cfg.hessian.protocol != "float":
        raise UserError("quantize.parallel=true needs hessian.protocol=float (every block's Hessian from the "
                        f"float model), got hessian.protocol={cfg.hessian.protocol}")
    if int(q.blocks_per_job) < 1:
        raise UserError(f"quantize.blocks_per_job={q.blocks_per_job} must be >= 1")


def block_groups(n: int, per_job: int) -> List[List[int]]:
    return [list(range(i, min(i + per_job, n))) for i in range(0, n, per_job)]


def _launcher_config() -> Optional[Dict[str, Any]]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return OmegaConf.to_container(HydraConfig.get().launcher, resolve=False)
    except Exception:  # noqa: BLE001  (outside Hydra: tests, scripts)
        return None


def resolve_executor(kind: str, launcher: Optional[Dict[str, Any]]) -> str:
    if kind != "auto":
        return kind
    return "slurm" if "SlurmLauncher" in str((launcher or {}).get("_target_", "")) else "local"


BASE_KEYS = ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
             "stderr_to_stdout")  # submitit's generic parameters; the launcher's other keys are Slurm's


def make_executor(kind: str, folder: str, *, launcher: Optional[Dict[str, Any]] = None, gpus: int = 0,
                  name: str = "vqb-blocks"):
    """A submitit executor for the block jobs. On Slurm it takes the sweep launcher's settings
    (partition, GPUs, time, memory, account, ...; the same mapping as hydra-submitit-launcher)
    so block jobs land where the sweep's jobs do."""
    import submitit

    kind = resolve_executor(kind, launcher)
    lc = {k: v for k, v in (launcher or {}).items()
          if v is not None and v != {} and not str(k).startswith("_") and k not in ("submitit_folder", "name")}
    if kind == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                   slurm_max_num_timeout=int(lc.pop("max_num_timeout", 0)))
        params: Dict[str, Any] = {"name": name, "timeout_min": 1440, "nodes": 1, "tasks_per_node": 1,
                                  "gpus_per_node": max(gpus, 1)}
        params.update({k if k in BASE_KEYS else f"slurm_{k}": v for k, v in lc.items()})
        ex.update_parameters(**params)
        return ex
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int(lc.get("timeout_min", 1440)), gpus_per_node=gpus)
        return ex
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    raise choices_error("quantize.executor", kind, EXECUTORS)


def quantize_blocks_job(config: Dict[str, Any], blocks: Sequence[int], checkpoint_dir: str, calib) -> Dict[str, Any]:
    """One block job (runs in its own process): quantize `blocks` of the configured model into
    `checkpoint_dir`. config: the job's resolved config (a plain dict).
    -> {"blocks": [...], "time_s", "peak_rss_gb", "peak_gpu_gb"} of this job."""
    import torch

    from runners.driver import quantize_model
    from runners.job import resolve_device
    from runners.models import load_model
    from vptq.methods import build_method, method_class

    if not logging.getLogger().handlers:  # a fresh process: block progress into the job's log
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from runners.metrics import peak_rss_gb

    t0 = time.perf_counter()
    cfg = OmegaConf.create(config)
    torch.manual_seed(cfg.seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.kernel.name in ("triton", "cpu"):
        import vptq.kernels  # noqa: F401  (registers the kernel)
    cls = method_class(cfg.method.name)
    method_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), cfg.method))
    method = build_method(cfg.method.name, method_cfg, bits=float(cfg.bits), seed=int(cfg.seed))
    model, _ = load_model(cfg.model)
    from runners.driver import quantized_shapes

    method.plan(quantized_shapes(model))  # a BudgetError before any work (the driver plans again: pure)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = quantize_model(model, method, calib=calib, device=device, kernel=cfg.kernel.name,
                           protocol="float", hessian_dir=cfg.hessian.cache_dir, checkpoint_dir=checkpoint_dir,
                           only_blocks=list(blocks))
    return {"blocks": list(blocks), "time_s": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb(),
            "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None}


def _wait(jobs, groups, folder: str) -> List[Dict[str, Any]]:
    errors, out = [], []
    for job, g in zip(jobs, groups):
        try:
            out.append({**job.result(), "job_id": str(job.job_id)})
        except Exception as e:  # noqa: BLE001  (submitit re-raises the job's error with its log)
            first = str(e).strip().splitlines()
            errors.append(f"blocks {g} (job {job.job_id}): {first[-1] if first else type(e).__name__}")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} block jobs failed; first: {errors[0]}; logs in {folder}")
    return out


def quantize_parallel(cfg: DictConfig, model, method, *, calib, device, checkpoint_dir: str,
                      executor=None):
    """Quantize `model` in place through block jobs, then assemble it from their checkpoints.
    -> (QuantStats, info). QuantStats.quantize_s: wall time from the first submission to the
    assembled model; per-block times are the jobs' own. info: {"executor", "groups", "jobs": [{"blocks",
    "job_id", "time_s", "peak_rss_gb", "peak_gpu_gb"}, ...]} of the jobs this call ran."""
    from runners.arch import arch_of, blocks_of
    from runners.driver import quantize_model

    check_parallel(cfg)
    t0 = time.perf_counter()
    n = len(blocks_of(model, arch_of(model)))
    groups = block_groups(n, int(cfg.quantize.blocks_per_job))
    todo = [g for g in groups if not all(block_done(checkpoint_dir, i) for i in g)]
    os.makedirs(checkpoint_dir, exist_ok=True)
    folder = os.path.join(checkpoint_dir, "jobs")
    info: Dict[str, Any] = {"executor": None, "groups": len(groups), "submitted": len(todo), "jobs": []}
    if todo:
        launcher = _launcher_config()
        kind = resolve_executor(cfg.quantize.executor, launcher)
        info["executor"] = kind
        ex = executor or make_executor(kind, folder, launcher=launcher, gpus=1 if str(device).startswith("cuda") else 0)
        config = OmegaConf.to_container(cfg, resolve=True)
        calib_cpu = calib.cpu() if calib is not None else None
        log.info("layer-parallel: %d of %d block groups to quantize as %s jobs (logs in %s)",
                 len(todo), len(groups), kind, folder)
        if kind == "local" and executor is None:  # waves: each local job holds a model copy
            for i in range(0, len(todo), LOCAL_PARALLEL):
                wave = todo[i:i + LOCAL_PARALLEL]
                info["jobs"] += _wait([ex.submit(quantize_blocks_job, config, g, checkpoint_dir, calib_cpu)
                                       for g in wave], wave, folder)
        else:
            with ex.batch():  # one job array on Slurm
                jobs = [ex.submit(quantize_blocks_job, config, g, checkpoint_dir, calib_cpu) for g in todo]
            info["jobs"] += _wait(jobs, todo, folder)
    else:
        log.info("layer-parallel: every block already has a checkpoint in %s", checkpoint_dir)
    stats = quantize_model(model, method, calib=calib, device=device, kernel=cfg.kernel.name, protocol="float",
                           hessian_dir=cfg.hessian.cache_dir, checkpoint_dir=checkpoint_dir)
    missing = [b["block"] for b in stats.blocks if not b.get("resumed")]
    if missing:  # cannot happen unless a job wrote nothing: the main job quantized them itself
        log.warning("layer-parallel: blocks %s had no checkpoint after the jobs; quantized here", missing)
    stats.quantize_s = time.perf_counter() - t0
    return stats, info
