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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from runners import metrics as M
from runners.errors import UserError
from runners.files import read_json
from runners.record import Bits, Comparison, RunRecord
from runners.setup import build_method, register_kernel, resolve_device

log = logging.getLogger("vq-bench")

USER_ERRORS = (UserError,)


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
    qkey = M.quantization_key(semantic)  # the block checkpoints' folder

    if cfg.resume:
        for root in (job_dir, sweep_dir, cfg.results_root):
            found = M.find_finished(root, key) if root else None
            if found:
                log.info("run_key %s already finished: %s (skipped)", key, found)
                if os.path.abspath(found) != os.path.abspath(out_path):
                    prev = read_json(found)
                    prev["reused_from"] = os.path.abspath(found)
                    M.write_json_atomic(out_path, prev)
                return _headline(RunRecord.from_dict(read_json(out_path)))

    rec = RunRecord(run_key=key, config_key=M.config_key(semantic), model=cfg.model.name, method=mname,
                    bits=Bits(target=float(cfg.bits) if uses_bits else None), seed=int(cfg.seed))
    tracker = None
    failed = False
    try:
        from runners.tracking import make_tracker

        tags = [f"model:{cfg.model.name}", f"method:{mname}", f"bits:{cfg.bits}"]
        tracker = make_tracker(cfg.logger, name=os.path.basename(job_dir), group=group, tags=tags,
                               config=container, job_dir=job_dir)
        job = Job(cfg=cfg, job_dir=job_dir, key=key, tracker=tracker, rec=rec, qkey=qkey)
        _pipeline(job)
        result = rec.to_dict()
        M.write_json_atomic(out_path, result)
        ckpt = os.path.join(cfg.results_root, "checkpoints", qkey)
        if os.path.isdir(ckpt) and not cfg.quantize.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
        tracker.summary(result)
        _print_summary(rec)
        return _headline(rec)
    except BaseException as e:  # record the failure, never leave a half-written result
        failed = True
        if isinstance(e, KeyboardInterrupt):
            raise
        from vptq.methods import MethodError

        user = isinstance(e, USER_ERRORS + (MethodError,))  # MethodError: a bad method setting, BudgetError
        msg = str(e) if user else f"{type(e).__name__}: {e}"
        rec.status, rec.error = "failed", msg
        if not user:
            rec.traceback = traceback.format_exc()
            log.error("job failed:\n%s", rec.traceback)
        M.write_json_atomic(out_path, rec.to_dict())
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


def _headline(rec: RunRecord) -> float:
    return float(next(iter(rec.ppl.values()))) if rec.ppl else float("nan")


def _print_summary(r: RunRecord) -> None:
    ppl = ", ".join(f"{k} {v:.3f}" for k, v in r.ppl.items())
    kl = ", ".join(f"{k} {v['mean']:.4f}" for k, v in r.kld.items())
    bits = f"{r.bits.total:.3f} bits/weight" if r.bits.total is not None else "unquantized"
    qa = (r.qa or {}).get("mean") or {}
    qa = f" | QA mean acc {qa['acc']:.3f}" if "acc" in qa else ""
    print(f"[{r.model} {r.method} {bits}] ppl: {ppl}{f' | KL to fp: {kl}' if kl else ''}{qa} | "
          f"quantize {r.time.quantize_s:.1f} s")


def _module_name(model, layer_name: str) -> str:
    """The driver's layer name ("<block>.<linear>") -> the module path codes_digest uses."""
    from runners.arch import arch_of

    i, _, lin = layer_name.partition(".")
    return f"{arch_of(model).blocks}.{i}.{lin}"


def _audit(cfg: DictConfig, method, calib, device, codes, block_finetune=None) -> Dict[str, Any]:
    """Quantize a fresh copy of the model again (no checkpoints, no Hessian cache) and compare every
    stored tensor's hash with the run's: the determinism audit (`audit=true`)."""
    from runners.driver import quantize_model
    from runners.models import load_model

    t0 = time.perf_counter()
    model2, _ = load_model(cfg.model)
    quantize_model(model2, method, calib=calib, device=device, kernel=cfg.kernel.name,
                   protocol=cfg.hessian.protocol, hessian_dir=None, checkpoint_dir=None, block_finetune=block_finetune)
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


# ------------------------------------------------------------------------------------ the pipeline
@dataclass
class Job:
    """One job's state as its steps fill it in (the config is read here, once; below it, plain values)."""

    cfg: DictConfig
    job_dir: str
    key: str
    tracker: Any
    rec: RunRecord
    qkey: str  # metrics.quantization_key: the block checkpoints' folder under results_root/checkpoints
    device: Optional[torch.device] = None
    method: Any = None
    ppl_sets: List[Tuple[str, str, Optional[str], int]] = field(default_factory=list)
    qa_args: Dict[str, Any] = field(default_factory=dict)
    model: Any = None
    tok: Any = None
    plan: Any = None
    windows: Dict[str, torch.Tensor] = field(default_factory=dict)
    qa_suite: Any = None
    calib: Optional[torch.Tensor] = None
    refs: Dict[str, Any] = field(default_factory=dict)  # dataset -> runners.kld.FloatReference
    stats: Any = None
    codes: Optional[Dict[str, Any]] = None
    finetune: Any = None  # runners.finetune.Finetune (the resolved `finetune` group)
    layer_hook: Any = None  # runners.finetune.LayerHook under finetune=layer
    calib_ref: Any = None  # the float model's reference on the calibration windows (finetune=e2e)
    ft_calib: Optional[torch.Tensor] = None  # finetune=e2e's windows: `calib`, or finetune.nsamples of its own


def _pipeline(job: Job) -> None:
    """check -> load -> float references -> quantize -> finetune -> evaluate -> extras; each step fills
    `job.rec`."""
    _check(job)
    _load_model_and_data(job)
    _float_references(job)
    _quantize(job)
    _finetune(job)
    _evaluate(job)
    _extras(job)


def _check(job: Job) -> None:
    """Every cheap check, before anything is loaded: bits, device, kernel, data, parallel, QA, method."""
    from runners.data import check_data
    from runners.parallel import check_parallel
    from runners.qa import check_qa_args

    cfg = job.cfg
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)
    bits = float(cfg.bits)
    if not (bits > 0) or math.isnan(bits):
        raise UserError(f"bits={cfg.bits} must be a positive number of bits per weight")
    if bits > 16:
        raise UserError(f"bits={cfg.bits} is above 16: nothing to quantize; valid: 0 < bits <= 16")
    job.device = resolve_device(cfg.device)
    register_kernel(cfg.kernel.name)
    check_data(cfg.data.name, cfg.data.path)
    job.ppl_sets = ppl_datasets(cfg)
    check_parallel(cfg)
    qa_data = {t: p for t, p in (cfg.eval.qa_data or {}).items() if p}
    job.qa_args = dict(limit=cfg.eval.qa_limit, batch_size=cfg.eval.qa_batch_size, data=qa_data)
    check_qa_args(list(cfg.eval.qa_tasks), **job.qa_args)
    if cfg.eval.kld_topk is not None and int(cfg.eval.kld_topk) < 1:
        raise UserError(f"eval.kld_topk={cfg.eval.kld_topk} must be >= 1 (or null: the whole vocabulary)")
    job.method = build_method(cfg.method, bits, cfg.seed)
    from runners.finetune import LayerHook, configure

    job.finetune, job.method = configure(cfg.finetune, job.method, seed=int(cfg.seed))
    if job.finetune.mode == "layer" and job.method.quantizes:
        job.layer_hook = LayerHook(job.finetune)  # quantize.parallel: each block job runs its own
    if cfg.save.quantized:
        from runners.save import check_exportable

        check_exportable(job.method)


def _load_model_and_data(job: Job) -> None:
    """The model and its plan, then every dataset: a missing one fails before hours of quantization."""
    from runners.data import calibration_windows, eval_windows
    from runners.driver import quantized_shapes
    from runners.models import load_model
    from runners.qa import prepare_qa
    from vptq.methods import BudgetError

    cfg, rec, method = job.cfg, job.rec, job.method
    rec.memory.peak_rss_scope = "job" if M.reset_peak_rss() else "process"  # sweeps run jobs in one process
    rec.memory.base_rss_gb = M.current_rss_gb()  # interpreter + libraries, before the model is loaded
    t0 = time.perf_counter()
    if method.loads_quantized:  # method=released: the quantized model is read from model.path as it is
        from runners.models import load_released

        job.model, job.tok = load_released(cfg.model, method, kernel=cfg.kernel.name)
        job.plan = method.plan_of(job.model)
    else:
        job.model, job.tok = load_model(cfg.model)
    rec.time.load_s = time.perf_counter() - t0
    if method.quantizes:
        try:
            job.plan = method.plan(quantized_shapes(job.model))
        except BudgetError as e:
            raise UserError(str(e)) from None
    job.windows = {ds: eval_windows(kind, path, job.tok, seqlen, cfg.eval.max_windows)
                   for ds, kind, path, seqlen in job.ppl_sets}
    job.qa_suite = prepare_qa(list(cfg.eval.qa_tasks), **job.qa_args)
    e2e = method.quantizes and job.finetune.mode == "e2e"
    if method.quantizes and (method.needs_hessian or e2e or job.layer_hook is not None):
        job.calib = calibration_windows(cfg.data.name, cfg.data.path, job.tok, cfg.calib.nsamples,
                                        cfg.calib.seqlen, cfg.seed)
    if e2e:  # the float model's distributions on the calibration windows, while it is float
        from runners.finetune import calibration_reference, split_windows
        from runners.models import cache_root

        n = job.finetune.nsamples
        job.ft_calib = job.calib if n is None or n == job.calib.shape[0] else calibration_windows(
            cfg.data.name, cfg.data.path, job.tok, n, cfg.calib.seqlen, cfg.seed)
        split_windows(int(job.ft_calib.shape[0]), job.finetune.heldout)  # too few windows: fail before quantizing
        folder = cfg.eval.kld_cache or os.path.join(cache_root(), "float_reference")
        job.calib_ref, info = calibration_reference(job.model, job.ft_calib, job.device, topk=job.finetune.topk,
                                                    folder=folder)
        job.rec.finetune = {"reference": info}


def _float_references(job: Job) -> None:
    """The float model's distributions on every evaluation set (eval.kld): from the cache, or computed
    now, while the model is still float."""
    cfg = job.cfg
    if not cfg.eval.kld:
        return
    from runners.fingerprint import weights_fingerprint
    from runners.kld import float_reference
    from runners.models import cache_root

    t0 = time.perf_counter()
    model = job.model
    if job.method.loads_quantized:  # method=released: the float model only if given (method.float_model)
        model = _released_reference_model(job)
        if model is None:
            return
    weights = weights_fingerprint(model)
    folder = cfg.eval.kld_cache or os.path.join(cache_root(), "float_reference")
    topk = int(cfg.eval.kld_topk) if cfg.eval.kld_topk is not None else 1 << 30  # null: the whole vocabulary
    model.to(job.device)
    for ds, w in job.windows.items():
        job.refs[ds], info = float_reference(model, w, job.device, weights=weights, folder=folder,
                                             topk=topk, name=ds)
        job.rec.kld[ds] = {"reference": info}
    if job.device.type != "cpu":
        model.to("cpu")  # the driver moves one block at a time to the device
        torch.cuda.empty_cache()
    job.rec.time.reference_s = time.perf_counter() - t0


def _released_reference_model(job: Job):
    """method=released: the float model named by method.float_model (same vocabulary), or None (no KL)."""
    path = job.method.config.float_model
    if not path:
        log.info("method=released without method.float_model: no float reference, so no KL metrics")
        return None
    from runners.models import load_float_model

    model, _ = load_float_model(job.cfg.model, path)
    vocab, ours = model.get_input_embeddings().num_embeddings, job.model.get_input_embeddings().num_embeddings
    if vocab != ours:
        raise UserError(f"method.float_model={path} has a vocabulary of {vocab} tokens, the released model "
                        f"{ours}: not the float model it was quantized from")
    return model


def _quantize(job: Job) -> None:
    """Every block, serially or as block jobs; then the codes' hashes, layers.json, the audit."""
    from runners.driver import quantize_model

    cfg, rec, method, model, device = job.cfg, job.rec, job.method, job.model, job.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu0 = M.cpu_sample()
    if method.quantizes:
        def on_block(b):
            job.tracker.log({f"quant/{k}": v for k, v in b.items() if isinstance(v, (int, float)) and v is not None})

        ckpt = os.path.join(cfg.results_root, "checkpoints", job.qkey)
        if cfg.quantize.parallel:  # blocks quantized by separate jobs, assembled here
            from runners.parallel import quantize_parallel

            job.stats, rec.parallel = quantize_parallel(cfg, model, method, calib=job.calib, device=device,
                                                        checkpoint_dir=ckpt, layer_finetune=job.layer_hook is not None)
            if job.layer_hook is not None:  # the block jobs' finetune=layer records, from their checkpoints
                job.layer_hook.collect(job.stats.blocks)
            for b in job.stats.blocks:
                on_block(b)
        else:
            job.stats = quantize_model(model, method, calib=job.calib, device=device, kernel=cfg.kernel.name,
                                       protocol=cfg.hessian.protocol, hessian_dir=cfg.hessian.cache_dir,
                                       checkpoint_dir=ckpt if cfg.quantize.checkpoint else None, on_block=on_block,
                                       block_finetune=job.layer_hook)
    rec.memory.quantize_peak_rss_gb = M.peak_rss_gb()  # up to the end of quantization (evaluation excluded)
    if method.quantizes:
        rec.time.other_cpu_cores = M.other_cpu_cores(cpu0, M.cpu_sample())
    stats = job.stats
    if stats is not None:
        job.codes = M.codes_digest(model)
        rec.codes_sha256 = job.codes["sha256"]
        for lay in stats.layers:  # per-layer hashes: where two runs' codes first diverge
            lay["sha256"] = job.codes["layers"].get(_module_name(model, lay["name"]))
        M.write_json_atomic(os.path.join(job.job_dir, "layers.json"), {"layers": stats.layers, "blocks": stats.blocks})
        rec.bits.index, rec.bits.total = (stats.storage.per_weight()[k] for k in ("index", "total"))
        rec.bits.components = {k: v / stats.storage.numel for k, v in stats.storage.bits.items()}
        rec.bits.quantized_params = stats.storage.numel
        rec.time.quantize_s = stats.quantize_s
        rec.time.per_block_s = [b["time_s"] for b in stats.blocks]
        rec.cost = dict(stats.cost)
        rec.cost.setdefault("stages_s", {"quantize": stats.quantize_s})
        reused = 0 if cfg.quantize.parallel else sum(1 for b in stats.blocks if b.get("resumed"))
        if reused:  # loaded from block checkpoints (a resumed run, or one sharing its quantization_key)
            rec.cost["blocks_reused"] = reused
            log.info("%d of %d blocks loaded from checkpoints (%s): quantize_s counts only the rest", reused,
                     len(stats.blocks), ckpt)
        if cfg.audit:
            rec.audit = _audit(cfg, method, job.calib, device, job.codes, block_finetune=job.layer_hook and job.layer_hook.fresh())
            rec.time.audit_s = rec.audit["time_s"]
    elif method.loads_quantized:  # method=released: bits counted from the loaded layers' stored tensors
        st = method.storage(model)
        rec.bits.index, rec.bits.total = (st.per_weight()[k] for k in ("index", "total"))
        rec.bits.components = {k: v / st.numel for k, v in st.bits.items()}
        rec.bits.quantized_params = st.numel
        job.codes = M.codes_digest(model)
        rec.codes_sha256 = job.codes["sha256"]
    else:
        rec.bits.index = rec.bits.total = 16.0


def _evaluate(job: Job) -> None:
    """Perplexity with its interval, the distribution metrics against the float reference, QA."""
    from runners.ppl import kld_summary, ppl_interval, score

    from vptq.qlinear import dense_weights

    cfg, rec, model, device = job.cfg, job.rec, job.model, job.device
    t1 = time.perf_counter()
    model.to(device)
    qa_info = None
    # on CPU every quantized layer is dequantized once for the whole evaluation (freed after), not on
    # every forward: evaluating costs what evaluating the float model does; kernel=triton keeps its kernels
    with dense_weights(model, enabled=device.type == "cpu", kernels=("torch", "cpu")):
        for ds, w in job.windows.items():
            s = score(model, w, device, reference=job.refs.get(ds))
            rec.ppl[ds] = s.ppl
            rec.ppl_ci[ds] = ppl_interval(s)
            if ds in job.refs:
                rec.kld[ds] = {**kld_summary(s), **rec.kld[ds]}
                job.tracker.histogram(f"kld/{ds}/per_token", s.kl)
        rec.time.ppl_s = time.perf_counter() - t1
        if job.qa_suite is not None:
            from runners.qa import evaluate_qa

            rec.qa, qa_info = evaluate_qa(job.qa_suite, model, job.tok)
            rec.time.qa_s = qa_info["time_s"]
    rec.time.eval_s = time.perf_counter() - t1
    if rec.cost is not None:
        rec.cost.setdefault("stages_s", {})["evaluate"] = rec.time.eval_s
    rec.eval = {"seqlen": int(cfg.eval.seqlen), "seqlens": {ds: sl for ds, _, _, sl in job.ppl_sets},
                "windows": {ds: int(w.shape[0]) for ds, w in job.windows.items()},
                "tokens": {ds: int(w.shape[0]) * (int(w.shape[1]) - 1) for ds, w in job.windows.items()},
                "paths": {ds: os.path.abspath(p) for ds, _, p, _ in job.ppl_sets if p}, "qa": qa_info}


def _extras(job: Job) -> None:
    """What is left of the record (settings, comparison fields, memory, environment), then throughput
    and the export."""
    cfg, rec, method, device, stats = job.cfg, job.rec, job.method, job.device, job.stats
    rec.settings = method.settings(job.plan)
    if job.calib is not None:
        rec.calib = {"data": cfg.data.name, "nsamples": int(cfg.calib.nsamples), "seqlen": int(cfg.calib.seqlen)}
        rec.hessian_protocol = cfg.hessian.protocol
    rec.comparison = Comparison(
        calibration={"data": cfg.data.name, "windows": int(job.calib.shape[0]), "seqlen": int(job.calib.shape[1]),
                     "tokens": int(job.calib.numel())} if job.calib is not None else None,
        hessian_protocol=rec.hessian_protocol, finetune=_finetune_mode(job),
        variant=rec.settings.get("variant"), iters=rec.settings.get("iters"),
        eval={ds: {"windows": int(w.shape[0]), "seqlen": int(w.shape[1]), "tokens": int(w.shape[0]) * (int(w.shape[1]) - 1)}
              for ds, w in job.windows.items()})
    rec.memory.peak_rss_gb = M.peak_rss_gb()
    rec.memory.peak_gpu_gb = (torch.cuda.max_memory_allocated(device) / 1024**3) if device.type == "cuda" else None
    rec.kernel = {"name": cfg.kernel.name}
    rec.env = {**M.env_info(device), "quantize_threads": stats.threads if stats is not None else None}
    if rec.parallel is not None:  # the block jobs' own cost: memory is the largest over jobs and this one
        for k in ("peak_rss_gb", "peak_gpu_gb"):
            vals = [v for v in [getattr(rec.memory, k)] + [j.get(k) for j in rec.parallel["jobs"]] if v is not None]
            setattr(rec.memory, k, max(vals) if vals else None)
    if cfg.kernel.throughput or (cfg.kernel.throughput is None and device.type == "cuda"):
        from runners.throughput import measure

        rec.kernel.update(measure(job.model, device, prompt_tokens=int(cfg.kernel.prompt_tokens),
                                  decode_tokens=int(cfg.kernel.decode_tokens),
                                  warmup_tokens=int(cfg.kernel.warmup_tokens), seed=int(cfg.seed)))
    if cfg.save.quantized:
        from runners.save import save_quantized

        save_quantized(job.model, job.tok, cfg, rec.to_dict(), cfg.save.dir or os.path.join(job.job_dir, "quantized_model"))


def _finetune_mode(job: Job) -> str:
    """The finetuning that ran: e2e | layer (finetune=layer, its alias method.finetune=true, or the
    method's own block finetuning, e.g. AQLM's Phase 3) | none."""
    method = job.method
    if not method.quantizes:
        return "none"
    if job.rec.finetune and job.rec.finetune.get("mode") == "e2e":
        return "e2e"
    return "layer" if job.layer_hook is not None or method.uses_float_outputs else "none"


def _finetune(job: Job) -> None:
    """finetune=e2e on the quantized model (runners/finetune.py); the record of finetune=layer. Then
    the codes' hashes again: codes_sha256 and layers.json cover the finetuned tensors."""
    from runners.finetune import finetune_e2e

    rec, ft = job.rec, job.finetune
    if job.layer_hook is not None:
        rec.finetune = {**ft.settings(), **job.layer_hook.record()}
        rec.time.finetune_s = job.layer_hook.time_s
    if ft.mode != "e2e" or job.stats is None:
        return
    before, ref_info = rec.codes_sha256, (rec.finetune or {}).get("reference")
    cpu0 = M.cpu_sample()
    rec.finetune = finetune_e2e(job.model, job.ft_calib, job.calib_ref, ft, job.device,
                                on_epoch=lambda d: job.tracker.log(d))
    # other_cpu_cores, as time.other_cpu_cores for the quantization: whether time_s is a quiet timing
    rec.finetune.update(other_cpu_cores=M.other_cpu_cores(cpu0, M.cpu_sample()),
                        codes_sha256_before=before, reference=ref_info, peak_rss_gb=M.peak_rss_gb(),  # up to here
                        peak_gpu_gb=torch.cuda.max_memory_allocated(job.device) / 1024**3
                        if job.device.type == "cuda" else None)
    rec.time.finetune_s = rec.finetune["time_s"]
    job.codes = M.codes_digest(job.model)
    rec.codes_sha256 = job.codes["sha256"]
    for lay in job.stats.layers:
        lay["sha256"] = job.codes["layers"].get(_module_name(job.model, lay["name"]))
    M.write_json_atomic(os.path.join(job.job_dir, "layers.json"),
                        {"layers": job.stats.layers, "blocks": job.stats.blocks})
