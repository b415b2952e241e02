"""One job: load -> quantize -> evaluate -> metrics.json. Called by the thin `runners/run.py`.

Every job ends with a metrics.json in its Hydra job folder, written atomically: `"status": "ok"`
with the results, or `"status": "failed"` with the error (the sweep goes on). A job whose
run_key already finished under `results_root` (or its own folder) is skipped.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
import traceback
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from runners import metrics as M
from runners.errors import UserError

log = logging.getLogger("vq-bench")

USER_ERRORS = (UserError,)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA device is available; valid here: auto, cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device {name!r}; valid choices: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def _hydra_info():
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        group = os.path.basename(os.path.normpath(hc.sweep.dir)) if multirun else None
        return hc.runtime.output_dir, multirun, group, (hc.sweep.dir if multirun else None)
    except Exception:  # called outside Hydra (tests, scripts)
        return os.getcwd(), False, None, None


def run_job(cfg: DictConfig, job_dir: Optional[str] = None) -> float:
    """Run one configured job. Returns the headline metric (perplexity on the first dataset)."""
    from vptq.methods import METHODS, method_class

    hdir, multirun, group, sweep_dir = _hydra_info()
    job_dir = job_dir or hdir
    os.makedirs(job_dir, exist_ok=True)
    out_path = os.path.join(job_dir, M.METRICS_FILE)
    container = _abspaths(OmegaConf.to_container(cfg, resolve=True))
    mname = cfg.method.name
    uses_bits = method_class(mname).uses_bits if mname in METHODS else True
    semantic = M.semantic_config(container, uses_bits=uses_bits)
    key = M.run_key(semantic)

    if cfg.resume:
        for root in (job_dir, sweep_dir, cfg.results_root):
            found = M.find_finished(root, key) if root else None
            if found:
                log.info("run_key %s already finished: %s (skipped)", key, found)
                if os.path.abspath(found) != os.path.abspath(out_path):
                    import json

                    with open(found) as f:
                        prev = json.load(f)
                    prev["reused_from"] = os.path.abspath(found)
                    M.write_json_atomic(out_path, prev)
                return _headline(_load(out_path))

    base: Dict[str, Any] = {
        "run_key": key, "config_key": M.config_key(semantic), "model": cfg.model.name, "method": mname,
        "bits": {"target": float(cfg.bits) if uses_bits else None, "index": None, "total": None},
    }
    tracker = None
    failed = False
    try:
        from runners.tracking import make_tracker

        tags = [f"model:{cfg.model.name}", f"method:{mname}", f"bits:{cfg.bits}"]
        tracker = make_tracker(cfg.logger, name=os.path.basename(job_dir), group=group, tags=tags,
                               config=container, job_dir=job_dir)
        result = _pipeline(cfg, container, job_dir, tracker, key)
        result = {**base, **result, "bits": {**base["bits"], **result["bits"]}, "status": "ok"}
        M.write_json_atomic(out_path, result)
        ckpt = os.path.join(cfg.results_root, "checkpoints", key)
        if os.path.isdir(ckpt) and not cfg.quantize.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
        tracker.summary(result)
        _print_summary(result)
        return _headline(result)
    except BaseException as e:  # record the failure, never leave a half-written result
        failed = True
        if isinstance(e, KeyboardInterrupt):
            raise
        from vptq.methods import BudgetError

        user = isinstance(e, USER_ERRORS + (BudgetError,))
        msg = str(e) if user else f"{type(e).__name__}: {e}"
        rec = {**base, "status": "failed", "error": msg}
        if not user:
            rec["traceback"] = traceback.format_exc()
            log.error("job failed:\n%s", rec["traceback"])
        M.write_json_atomic(out_path, rec)
        if tracker is not None:
            tracker.summary({"status": "failed", "error": msg})
        print(f"error: {msg}", file=sys.stderr)
        if multirun:
            return float("nan")
        raise SystemExit(1)
    finally:
        if tracker is not None:
            tracker.finish(failed=failed)


def _abspaths(container: Dict[str, Any]) -> Dict[str, Any]:
    """Local data folders as absolute paths (the run key must not depend on the cwd)."""
    ev = container.get("eval") or {}
    for k in ("paths", "qa_data"):
        if ev.get(k):
            ev[k] = {n: os.path.abspath(os.path.expanduser(p)) if p else p for n, p in ev[k].items()}
    return container


def ppl_datasets(cfg: DictConfig):
    """-> [(name shown in tables, built-in dataset, folder or None, seqlen)] for `eval.datasets`
    (empty = [data.name]). A name that is not a built-in dataset is a local text folder given in
    `eval.paths`; `eval.seqlens` overrides `eval.seqlen` per dataset."""
    from runners.data import DATASETS, check_data

    names = list(cfg.eval.datasets) or [cfg.data.name]
    paths = dict(cfg.eval.paths or {})
    seqlens = dict(cfg.eval.seqlens or {})
    if len(set(names)) != len(names):
        raise UserError(f"eval.datasets={names} lists a dataset twice")
    for what, d in (("seqlens", seqlens), ("paths", paths)):
        extra = sorted(set(d) - set(names))
        if extra:
            raise UserError(f"eval.{what} has {extra[0]!r}, which is not in eval.datasets={names}")
    out = []
    for ds in names:
        if ds in DATASETS:
            kind = ds
            path = paths.get(ds) or (cfg.data.path if ds == cfg.data.name else None)
            if ds in paths and ds != "text":
                raise UserError(f"eval.paths.{ds}: {ds!r} is a built-in dataset; give a local folder another "
                                f"name, e.g. eval.datasets=[{ds}_local] eval.paths.{ds}_local=FOLDER")
        elif ds in paths:
            kind, path = "text", paths[ds]
        else:
            raise UserError(f"unknown evaluation dataset {ds!r}; valid choices: {', '.join(DATASETS)}, "
                            f"or a local folder: eval.paths.{ds}=FOLDER (with test.txt)")
        seqlen = seqlens.get(ds, cfg.eval.seqlen)
        if seqlen is None or int(seqlen) < 2:
            raise UserError(f"eval.seqlens.{ds}={seqlen} must be an integer >= 2")
        check_data(kind, path)
        out.append((ds, kind, path, int(seqlen)))
    return out


def _load(path):
    import json

    with open(path) as f:
        return json.load(f)


def _headline(result) -> float:
    if not result:
        return float("nan")
    ppl = result.get("ppl") or {}
    return float(next(iter(ppl.values()))) if ppl else float("nan")


def _print_summary(r: Dict[str, Any]) -> None:
    ppl = ", ".join(f"{k} {v:.3f}" for k, v in r.get("ppl", {}).items())
    b = r["bits"]
    bits = f"{b['total']:.3f} bits/weight" if b.get("total") is not None else "unquantized"
    qa = (r.get("qa") or {}).get("mean") or {}
    qa = f" | QA mean acc {qa['acc']:.3f}" if "acc" in qa else ""
    print(f"[{r['model']} {r['method']} {bits}] ppl: {ppl}{qa} | quantize {r['time']['quantize_s']:.1f} s")


def _module_name(model, layer_name: str) -> str:
    """The driver's layer name ("<block>.<linear>") -> the module path codes_digest uses."""
    from runners.arch import arch_of

    i, _, lin = layer_name.partition(".")
    return f"{arch_of(model).blocks}.{i}.{lin}"


def _audit(cfg: DictConfig, method, calib, device, codes) -> Dict[str, Any]:
    """Quantize a fresh copy of the model again (no checkpoints, no Hessian cache) and compare every
    stored tensor's hash with the run's: the determinism audit (`audit=true`)."""
    from runners.driver import quantize_model
    from runners.models import load_model

    t0 = time.perf_counter()
    model2, _ = load_model(cfg.model)
    quantize_model(model2, method, calib=calib, device=device, kernel=cfg.kernel.name,
                   protocol=cfg.hessian.protocol, hessian_dir=None, checkpoint_dir=None)
    again = M.codes_digest(model2)
    del model2
    diff = [n for n, d in codes["layers"].items() if again["layers"].get(n) != d]
    rec = {"codes_equal": again["sha256"] == codes["sha256"], "sha256": [codes["sha256"], again["sha256"]],
           "mismatched_layers": len(diff), "first_mismatch": diff[0] if diff else None,
           "time_s": time.perf_counter() - t0}
    (log.info if rec["codes_equal"] else log.warning)(
        "determinism audit: the second quantization's codes are %s", "identical" if rec["codes_equal"] else
        f"DIFFERENT in {len(diff)} layers (first: {rec['first_mismatch']})")
    return rec


def _pipeline(cfg: DictConfig, container: Dict[str, Any], job_dir: str, tracker, key: str) -> Dict[str, Any]:
    from runners.data import calibration_windows, check_data, eval_windows
    from runners.driver import quantize_model, quantized_shapes
    from runners.models import load_model
    from runners.ppl import perplexity
    from vptq.methods import BudgetError, build_method

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)
    bits = float(cfg.bits)
    if not (bits > 0) or math.isnan(bits):
        raise UserError(f"bits={cfg.bits} must be a positive number of bits per weight")
    if bits > 16:
        raise UserError(f"bits={cfg.bits} is above 16: nothing to quantize; valid: 0 < bits <= 16")
    device = resolve_device(cfg.device)
    if cfg.kernel.name in ("triton", "cpu"):
        import vptq.kernels  # noqa: F401  (registers "triton" and "cpu" in vptq.qlinear.KERNELS)
    from vptq.qlinear import KERNELS

    if cfg.kernel.name != "torch" and cfg.kernel.name not in KERNELS:
        raise UserError(f"kernel={cfg.kernel.name!r} is not registered; valid choices: torch, triton, cpu")
    check_data(cfg.data.name, cfg.data.path)
    ppl_sets = ppl_datasets(cfg)
    from runners.parallel import check_parallel

    check_parallel(cfg)
    from runners.qa import check_qa_args, prepare_qa

    qa_data = {t: p for t, p in (cfg.eval.qa_data or {}).items() if p}
    qa_args = dict(limit=cfg.eval.qa_limit, batch_size=cfg.eval.qa_batch_size, data=qa_data)
    check_qa_args(list(cfg.eval.qa_tasks), **qa_args)
    method_cfg = OmegaConf.to_object(cfg.method)
    method = build_method(cfg.method.name, method_cfg, bits=bits, seed=cfg.seed)
    if cfg.save.quantized:
        from runners.save import check_exportable

        check_exportable(method)

    rss_scope = "job" if M.reset_peak_rss() else "process"  # sweeps run their jobs in one process
    base_rss = M.current_rss_gb()  # interpreter + libraries, before the model is loaded
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model)
    load_s = time.perf_counter() - t0
    plan = None
    if method.quantizes:
        try:
            plan = method.plan(quantized_shapes(model))
        except BudgetError as e:
            raise UserError(str(e)) from None

    # evaluation data first: a missing dataset or QA task fails before hours of quantization
    windows = {ds: eval_windows(kind, path, tok, seqlen, cfg.eval.max_windows) for ds, kind, path, seqlen in ppl_sets}
    qa_suite = prepare_qa(list(cfg.eval.qa_tasks), **qa_args)
    calib = None
    if method.quantizes and method.needs_hessian:
        calib = calibration_windows(cfg.data.name, cfg.data.path, tok, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = None
    parallel_info = None
    hdir = cfg.hessian.cache_dir
    if method.quantizes:
        def on_block(rec):
            tracker.log({f"quant/{k}": v for k, v in rec.items() if isinstance(v, (int, float)) and v is not None})

        ckpt = os.path.join(cfg.results_root, "checkpoints", key) if cfg.quantize.checkpoint else None
        if cfg.quantize.parallel:  # blocks quantized by separate jobs, assembled here
            from runners.parallel import quantize_parallel

            stats, parallel_info = quantize_parallel(cfg, model, method, calib=calib, device=device,
                                                     checkpoint_dir=ckpt or os.path.join(cfg.results_root,
                                                                                         "checkpoints", key))
            for rec in stats.blocks:
                on_block(rec)
        else:
            stats = quantize_model(model, method, calib=calib, device=device, kernel=cfg.kernel.name,
                                   protocol=cfg.hessian.protocol, hessian_dir=hdir, checkpoint_dir=ckpt,
                                   on_block=on_block)
    quant_peak_rss = M.peak_rss_gb()  # the process's peak up to the end of quantization (evaluation excluded)
    codes = M.codes_digest(model) if method.quantizes else None
    if stats is not None:
        for rec in stats.layers:  # per-layer hashes: where two runs' codes first diverge
            rec["sha256"] = codes["layers"].get(_module_name(model, rec["name"]))
        M.write_json_atomic(os.path.join(job_dir, "layers.json"), {"layers": stats.layers, "blocks": stats.blocks})
    audit = _audit(cfg, method, calib, device, codes) if (cfg.audit and method.quantizes) else None

    t1 = time.perf_counter()
    model.to(device)
    ppl = {ds: perplexity(model, w, device) for ds, w in windows.items()}
    ppl_s = time.perf_counter() - t1
    qa, qa_info = ({}, None)
    if qa_suite is not None:
        from runners.qa import evaluate_qa

        qa, qa_info = evaluate_qa(qa_suite, model, tok)
    eval_s = time.perf_counter() - t1

    bits_rec: Dict[str, Any] = {"index": None, "total": None}
    if stats is not None:
        bits_rec.update(stats.storage.per_weight())
        bits_rec["components"] = {k: v / stats.storage.numel for k, v in stats.storage.bits.items()}
        bits_rec["quantized_params"] = stats.storage.numel
    else:
        bits_rec.update({"index": 16.0, "total": 16.0})
    res = {
        "bits": bits_rec,
        "settings": method.settings(plan),
        "ppl": ppl,
        "eval": {"seqlen": int(cfg.eval.seqlen), "seqlens": {ds: sl for ds, _, _, sl in ppl_sets},
                 "windows": {ds: int(w.shape[0]) for ds, w in windows.items()},
                 "paths": {ds: os.path.abspath(p) for ds, _, p, _ in ppl_sets if p}, "qa": qa_info},
        "calib": {"data": cfg.data.name, "nsamples": int(cfg.calib.nsamples), "seqlen": int(cfg.calib.seqlen)}
        if calib is not None else None,
        "hessian_protocol": cfg.hessian.protocol if calib is not None else None,
        "qa": qa,
        "time": {"quantize_s": stats.quantize_s if stats else 0.0, "eval_s": eval_s, "load_s": load_s,
                 "ppl_s": ppl_s, "qa_s": qa_info["time_s"] if qa_info else 0.0,
                 "per_block_s": [b["time_s"] for b in stats.blocks] if stats else []},
        "memory": {"peak_rss_gb": M.peak_rss_gb(), "quantize_peak_rss_gb": quant_peak_rss, "base_rss_gb": base_rss,
                   "peak_rss_scope": rss_scope,
                   "peak_gpu_gb": (torch.cuda.max_memory_allocated(device) / 1024**3) if device.type == "cuda" else None},
        "kernel": {"name": cfg.kernel.name},
        "env": {**M.env_info(device), "quantize_threads": stats.threads if stats is not None else None},
        "codes_sha256": codes["sha256"] if codes else None,
        "seed": int(cfg.seed),
    }
    if audit is not None:
        res["audit"] = audit
    if parallel_info is not None:  # the block jobs' own cost: memory is the largest over jobs and this one
        res["parallel"] = parallel_info
        for k in ("peak_rss_gb", "peak_gpu_gb"):
            vals = [v for v in [res["memory"][k]] + [j.get(k) for j in parallel_info["jobs"]] if v is not None]
            res["memory"][k] = max(vals) if vals else None
    if cfg.kernel.throughput or (cfg.kernel.throughput is None and device.type == "cuda"):
        from runners.throughput import measure

        res["kernel"].update(measure(model, device, prompt_tokens=int(cfg.kernel.prompt_tokens),
                                     decode_tokens=int(cfg.kernel.decode_tokens),
                                     warmup_tokens=int(cfg.kernel.warmup_tokens), seed=int(cfg.seed)))
    if cfg.save.quantized:
        from runners.save import save_quantized

        save_quantized(model, tok, cfg, res, cfg.save.dir or os.path.join(job_dir, "quantized_model"))
    return res
