"""Layer-parallel quantization: capture once, then a model's decoder blocks quantized by separate jobs.

With Hessians of the float model (`hessian.protocol=float`, as in VPTQ and QuIP#) block i's
calibration inputs are the FLOAT outputs of blocks 0..i-1, so every block is independent:

    main job:   capture (runners/capture.py): ONE pass of the float model over the calibration
                windows writes every block's Hessians (and its float inputs/outputs where block
                finetuning reads them) to the capture cache: L block forwards (L jobs that each
                rebuilt their own inputs needed L(L+1)/2); resumable block by block
    block jobs: groups of `quantize.blocks_per_job` blocks that have no checkpoint yet, one submitit
                job each (a Slurm job array under hydra/launcher=slurm|submitit_slurm, local processes
                otherwise); each reads only its blocks' float weights from the safetensors shards
                (`runners.models.load_blocks`: no model per job) and their cache entries, quantizes
                them exactly as the serial driver does (`runners.driver.quantize_linears`,
                `finetune_block`) and writes a block checkpoint
    main job:   assemble: every block installed from its checkpoint (no forwards) -> one model,
                bit-identical to the single-process float-protocol run (same Hessians, same weights,
                the same per-layer seeds)

A rerun submits only the groups whose checkpoints are missing (an interrupted array resumes); a
killed capture resumes at its first missing block. The capture cache lives in `hessian.cache_dir`
(shared storage on a cluster) or under `<results_root>/capture/<key>`.

Why the sequential protocol (`hessian.protocol=quantized`) is not parallelised: block i's
Hessians depend on the quantized blocks before it, so blocks cannot start before their
predecessors finish; only the 4-7 linears inside one block are independent. On CPU each of them
is quantized on one thread while the block passes use every core. Measured on the bundled model
(2-bit, 8 x 512 calibration windows, quiet 2-core AMD EPYC, 2026-12-06: layers.json `time_s` over
metrics.json `time.per_block_s`), per-layer quantization is 88% of a block's time for VPTQ, 91%
for GPTVQ, 83% for AQLM, 60% for GPTQ; so on a CPU two worker processes could approach ~1.7x for
the VQ methods, at the cost of shipping each layer's weight and Hessian to a worker and a second
per-layer working set. On a GPU, the target of a 70B run, the linears of a block already run back
to back on the device and a second process would only share it. Not done (docs/LOG.md).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from runners.checkpoint import block_done
from runners.errors import UserError, choices_error
from runners.setup import build_method, model_config, plain, register_kernel, resolve_device

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


def quantize_blocks_job(config: Dict[str, Any], blocks: Sequence[int], checkpoint_dir: str, cache_dir: str,
                        key_json: str) -> Dict[str, Any]:
    """One block job (its own process): quantize `blocks` of the configured model from the capture
    cache into `checkpoint_dir`, each followed by the method's own block finetuning and finetune=layer
    (its targets: the float block's outputs, as the serial driver's under hessian.protocol=float).
    config: the run's resolved config as plain data.
    -> {"blocks", "time_s", "peak_rss_gb", "peak_gpu_gb", "bytes_read"} of this job."""
    import torch

    from runners.arch import hessian_groups, linears_of
    from runners.capture import CacheCost, CaptureKey, load_kwargs, read_block
    from runners.checkpoint import save_block
    from runners.driver import QuantStats, finetune_block, quantize_linears
    from runners.memory import release_block
    from runners.metrics import peak_rss_gb
    from runners.models import load_blocks
    from vptq.methods import BlockContext
    from vptq.threads import thread_policy

    if not logging.getLogger().handlers:  # a fresh process: block progress into the job's log
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    t0 = time.perf_counter()
    torch.manual_seed(int(config["seed"]))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    kernel = config["kernel"]["name"]
    register_kernel(kernel)
    method = build_method(config["method"], config["bits"], config["seed"])
    hook = None
    if (config.get("finetune") or {}).get("mode", "none") != "none":
        from omegaconf import OmegaConf

        from runners.finetune import LayerHook, configure

        ft, method = configure(OmegaConf.create(config["finetune"]), method, seed=int(config["seed"]))
        hook = LayerHook(ft) if ft.mode == "layer" else None
    device = resolve_device(config["device"])
    k = json.loads(key_json)
    key = CaptureKey(**{**k, "calib_shape": tuple(k["calib_shape"])})
    mods, arch = load_blocks(model_config(config["model"]), list(blocks))
    plan = method.plan([tuple(l.weight.shape) for b in mods.values() for l in linears_of(b).values()])
    keep = method.uses_float_outputs or hook is not None
    need = ("H", "X", "Y") if keep else ("H",)
    kwargs = load_kwargs(cache_dir, key, device) if keep else None
    cost = CacheCost()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in blocks:
        tb = time.perf_counter()
        data = read_block(cache_dir, i, key, device, cost, need=need)
        if data is None or (keep and kwargs is None):
            raise RuntimeError(f"block {i}: no capture for this run in {cache_dir} (the main job captures first)")
        block = mods[i].to(device)
        stats = QuantStats(threads=thread_policy(device))
        hkeys = hessian_groups(linears_of(block), arch)
        losses, old = quantize_linears(block, i, method, plan, data["H"], hkeys, device, kernel, stats)
        ft = finetune_block(block, BlockContext(data["X"], data["Y"], kwargs, device, i), method, hook) if keep else {}
        release_block(old)
        brec = {"block": i, "time_s": time.perf_counter() - tb,
                "mean_rel_proxy_loss": (sum(losses) / len(losses)) if losses else None, **ft}
        save_block(checkpoint_dir, i, block.to("cpu"), {"block": brec, "layers": stats.layers})
        log.info("block %d quantized in %.1f s (job)", i + 1, brec["time_s"])
        del data, block
    return {"blocks": list(blocks), "time_s": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb(),
            "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None,
            "bytes_read": cost.bytes_read}


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


def quantize_parallel(cfg: DictConfig, model, method, *, calib, device, checkpoint_dir: str, executor=None,
                      layer_finetune: bool = False):
    """Capture once, quantize the blocks in jobs, assemble `model` in place from their checkpoints.
    -> (QuantStats, info). QuantStats.quantize_s: wall time from the capture's start to the assembled
    model; QuantStats.cost: block forwards, cache bytes, and the stages' wall times. info: {"executor",
    "groups", "submitted", "cache", "jobs": [{"blocks", "job_id", "time_s", "peak_rss_gb", ...}]}."""
    from runners.arch import arch_of, blocks_of
    from runners.capture import capture, capture_dir, make_key

    check_parallel(cfg)
    if not method.needs_hessian:
        raise UserError(f"quantize.parallel=true is for methods that calibrate; method={method.name} needs no "
                        f"calibration pass (run it without quantize.parallel)")
    t0 = time.perf_counter()
    key = make_key(model, calib, "float")
    cache = cfg.hessian.cache_dir or capture_dir(os.path.join(cfg.results_root, "capture"), key)
    cap = capture(model, calib, device, cache, key, keep_activations=method.uses_float_outputs or layer_finetune)
    t_cap = time.perf_counter()
    n = len(blocks_of(model, arch_of(model)))
    groups = block_groups(n, int(cfg.quantize.blocks_per_job))
    todo = [g for g in groups if not all(block_done(checkpoint_dir, i) for i in g)]
    os.makedirs(checkpoint_dir, exist_ok=True)
    folder = os.path.join(checkpoint_dir, "jobs")
    info: Dict[str, Any] = {"executor": None, "groups": len(groups), "submitted": len(todo), "cache": cache,
                            "jobs": []}
    if todo:
        launcher = _launcher_config()
        kind = resolve_executor(cfg.quantize.executor, launcher)
        info["executor"] = kind
        ex = executor or make_executor(kind, folder, launcher=launcher, gpus=1 if str(device).startswith("cuda") else 0)
        args = (plain(cfg), checkpoint_dir, cache, key.to_json())
        log.info("layer-parallel: %d of %d block groups to quantize as %s jobs (logs in %s)",
                 len(todo), len(groups), kind, folder)
        if kind == "local" and executor is None:  # waves of LOCAL_PARALLEL processes
            for i in range(0, len(todo), LOCAL_PARALLEL):
                wave = todo[i:i + LOCAL_PARALLEL]
                info["jobs"] += _wait([ex.submit(quantize_blocks_job, args[0], g, *args[1:]) for g in wave],
                                      wave, folder)
        else:
            with ex.batch():  # one job array on Slurm
                jobs = [ex.submit(quantize_blocks_job, args[0], g, *args[1:]) for g in todo]
            info["jobs"] += _wait(jobs, todo, folder)
    else:
        log.info("layer-parallel: every block already has a checkpoint in %s", checkpoint_dir)
    t_q = time.perf_counter()
    stats = assemble(model, checkpoint_dir, kernel=cfg.kernel.name, device=device)
    t_a = time.perf_counter()
    stats.quantize_s = t_a - t0
    stats.cost = {"block_forwards": cap.cost.block_forwards, "hessian_bytes_written": cap.cost.bytes_written,
                  "hessian_bytes_read": cap.cost.bytes_read + sum(j.get("bytes_read", 0) for j in info["jobs"]),
                  "blocks_captured": cap.cost.blocks_captured, "blocks_cached": cap.cost.blocks_cached,
                  "stages_s": {"capture": t_cap - t0, "quantize": t_q - t_cap, "assemble": t_a - t_q}}
    return stats, info


def assemble(model, checkpoint_dir: str, *, kernel: str, device):
    """Install every block of `model` from its checkpoint (no forward pass). -> QuantStats."""
    from runners.arch import arch_of, blocks_of
    from runners.checkpoint import block_status, load_block
    from runners.driver import QuantStats
    from vptq.threads import thread_policy

    stats = QuantStats(threads=thread_policy(device))
    blocks = blocks_of(model, arch_of(model))
    missing = [i for i in range(len(blocks)) if block_status(checkpoint_dir, i) is not None]
    if missing:
        raise RuntimeError(f"blocks {missing} have no usable checkpoint in {checkpoint_dir} after the block jobs "
                           f"(first: {block_status(checkpoint_dir, missing[0])})")
    for i, block in enumerate(blocks):
        loaded, saved = load_block(checkpoint_dir, i, block, kernel=kernel, device="cpu")
        for q in loaded.values():
            stats.storage = stats.storage + q.storage()
        stats.layers.extend(saved.get("layers", []))
        stats.blocks.append({**saved.get("block", {"block": i}), "resumed": True})
    return stats
