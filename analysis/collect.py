"""Gather every metrics.json below a folder into a pandas DataFrame (one row per run_key)."""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import List, Optional, Tuple

import pandas as pd

REFERENCE_METHODS = ("fp16",)  # unquantized references: shown, never ranked


def load_runs(root: str) -> List[dict]:
    """Every readable metrics.json below `root`; an unreadable one is reported on stderr (one line
    naming it and what is wrong) and skipped."""
    from runners.files import BadFile, read_json

    runs = []
    for p in sorted(glob.glob(os.path.join(root, "**", "metrics.json"), recursive=True)):
        try:
            m = read_json(p)
        except BadFile as e:
            print(f"warning: skipped {e}", file=sys.stderr)
            continue
        if not isinstance(m, dict) or "run_key" not in m:
            print(f"warning: skipped {p}: not a vq-bench metrics.json (no run_key)", file=sys.stderr)
            continue
        m["_path"] = p
        m["_mtime"] = os.path.getmtime(p)
        runs.append(m)
    return runs


def dedupe(runs: List[dict]) -> List[dict]:
    """One record per run_key: a finished one wins over a failed one, then the newest."""
    best = {}
    for m in runs:
        k = m["run_key"]
        rank = (m.get("status") == "ok", m["_mtime"])
        if k not in best or rank > best[k][0]:
            best[k] = (rank, m)
    return [m for _, m in best.values()]


def settings_str(s) -> str:
    if not s:
        return ""
    return ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)


def finetune_str(ft) -> Optional[str]:
    """What a finetuning record's settings were, compactly (the `finetune` record of runners/finetune.py):
    runs whose mode is the same but whose learning rate, length or windows differ must not look alike
    in a table. None where the record is absent (no finetuning, a method's own block finetuning, older
    records). The per-run seed is left out (it follows the run's)."""
    if not isinstance(ft, dict) or ft.get("mode") not in ("layer", "e2e"):
        return None
    lr = f"lr {ft.get('lr'):g}" + (f"→{ft['lr_min']:g}" if ft.get("lr_min") is not None else "") \
        if ft.get("lr") is not None else "lr ?"
    if ft["mode"] == "layer":
        parts = [f"{ft.get('steps')} steps", lr, f"batch {ft.get('batch')}"]
    else:
        n = (ft.get("train_windows") or 0) + (ft.get("heldout_windows") or 0)
        parts = [f"≤{ft.get('epochs')} epochs", lr, f"batch {ft.get('batch')}", f"{n or '?'} windows"]
        if ft.get("patience", 1) != 1:
            parts.append(f"patience {ft['patience']}")
        if ft.get("topk", 64) != 64:
            parts.append("whole vocabulary" if ft.get("topk") is None else f"top-{ft['topk']}")
    if ft.get("norms") is False:
        parts.append("norms frozen")
    return f"{ft['mode']}: " + ", ".join(parts)


def _windows_str(w) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(w.items())) if isinstance(w, dict) and w else ""


def _config_key_of(m: dict, row: dict) -> str:
    """For metrics.json files written before `config_key` existed: a key from what they record
    that changes results, the seed left out."""
    import hashlib

    ev = dict(m.get("eval") or {})
    ev.pop("qa", None)
    blob = json.dumps([row["model"], row["method"], row["bits_target"], m.get("settings"), m.get("calib"),
                       m.get("hessian_protocol"), (m.get("kernel") or {}).get("name"), ev],
                      sort_keys=True, default=str)
    return "m" + hashlib.sha256(blob.encode()).hexdigest()[:15]


def machine_of(env) -> Optional[str]:
    """What a run's numbers depend on beyond its configuration: the GPU's name, or the CPU's name with
    its family and model where recorded ("AMD EPYC (family 25 model 17)": a VM's "AMD EPYC" alone was a
    Zen 3 one day and a Zen 4 the next); the recorded device string for older records; None without."""
    env = env or {}
    gpu = env.get("gpu")
    if gpu and gpu.get("name"):
        return gpu["name"]
    from runners.metrics import cpu_ident

    c = env.get("cpu") or {}
    ident = cpu_ident(c, stepping=False)
    if c.get("model"):
        return f"{c['model']} ({ident})" if ident else c["model"]
    return env.get("device")


def _resident_mib(kernel) -> "float | None":
    """MiB of kernel.resident_bytes (model tensors + kernel buffers), None where it was not measured."""
    rb = (kernel or {}).get("resident_bytes")
    if not rb:
        return None
    return (rb.get("model_bytes", 0) + rb.get("kernel_buffer_bytes", 0)) / 2 ** 20


def to_frame(runs: List[dict]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """-> (finished runs, failed runs). Columns of the first: model, method, bits_target, settings,
    seed, calib ("data NxL"), kernel, eval_windows, config_key (equal for runs that differ only in
    the seed), bits_index, bits_total, quant_s, eval_s, threads (the job's torch threads), other_cpu
    (cores other processes used while it quantized; None in older records), reused_blocks (blocks loaded
    from checkpoints, not quantized by the run), peak_rss_gb, peak_gpu_gb, mem_gb (peak GPU memory
    on GPU runs, else peak process RSS), device, machine (`machine_of`), decode_tok_s (greedy decode at
    batch 1 where `kernel.throughput` measured it, else None), decode_mib (MiB the decoding model held,
    its kernels' buffers included: `kernel.resident_bytes`, else None), the fair-comparison fields (protocol, finetune,
    variant, iters), finetune_settings (collect.finetune_str), ppl::<ds>@<seqlen> (each dataset's own seqlen) with ppl_lo::/ppl_hi:: (95%
    interval), kld::<ds>@<seqlen> (mean KL to the float model) with kld_se::, top1::<ds>@<seqlen> (%),
    ratio::<ds>@<seqlen> (PPL / the float model's PPL on the same windows, where the KL was scored),
    qa::<task>::<metric> (and qa::mean::<metric>)."""
    from runners.record import RunRecord

    ok, failed = [], []
    for m in dedupe(runs):
        r = RunRecord.from_dict({k: v for k, v in m.items() if not k.startswith("_")})
        row = {"model": r.model, "method": r.method, "bits_target": r.bits.target, "run_key": r.run_key,
               "path": m["_path"]}
        if r.status != "ok":
            row["error"] = r.error or ""
            failed.append(row)
            continue
        ev = r.eval or {}
        seqlen, seqlens = ev.get("seqlen"), ev.get("seqlens") or {}
        cal, cmp = r.calib or {}, r.comparison
        row.update({"settings": settings_str(r.settings), "seed": r.seed,
                    "calib": f"{cal.get('data')} {cal.get('nsamples')}x{cal.get('seqlen')}" if cal else None,
                    "kernel": (r.kernel or {}).get("name"),
                    "decode_tok_s": (r.kernel or {}).get("decode_tok_s"),
                    "decode_mib": _resident_mib(r.kernel),
                    "eval_windows": _windows_str(ev.get("windows")),
                    "bits_index": r.bits.index, "bits_total": r.bits.total,
                    "quant_s": r.time.quantize_s, "eval_s": r.time.eval_s,
                    "threads": ((r.env or {}).get("threads") or {}).get("intra_op"),
                    "other_cpu": r.time.other_cpu_cores,
                    "reused_blocks": (r.cost or {}).get("blocks_reused"),
                    "peak_rss_gb": r.memory.peak_rss_gb, "peak_gpu_gb": r.memory.peak_gpu_gb,
                    "mem_gb": r.memory.peak_gpu_gb if r.memory.peak_gpu_gb is not None else r.memory.peak_rss_gb,
                    "device": (r.env or {}).get("device"),
                    "machine": machine_of(r.env),
                    "protocol": r.hessian_protocol,
                    "finetune": cmp.finetune if r.format_version >= 2 else None,
                    "finetune_settings": finetune_str(r.finetune),
                    "variant": cmp.variant or (r.settings or {}).get("variant"),
                    "iters": cmp.iters or (r.settings or {}).get("iters")})
        row["config_key"] = r.config_key or _config_key_of(m, row)
        for ds, v in r.ppl.items():
            col = f"{ds}@{seqlens.get(ds, seqlen)}"
            row[f"ppl::{col}"] = v
            ci = r.ppl_ci.get(ds) or {}
            row[f"ppl_lo::{col}"], row[f"ppl_hi::{col}"] = ci.get("low"), ci.get("high")
            kl = r.kld.get(ds) or {}
            if "mean" in kl:
                row[f"kld::{col}"], row[f"kld_se::{col}"] = kl["mean"], kl.get("mean_se")
                row[f"top1::{col}"] = kl.get("top1_agree")
                row[f"ratio::{col}"] = kl.get("ppl_ratio")  # PPL / the float model's on the same windows
        for task, vals in (r.qa or {}).items():
            if isinstance(vals, dict):
                for metric, v in vals.items():
                    row[f"qa::{task}::{metric}"] = v
            else:
                row[f"qa::{task}"] = vals
        ok.append(row)
    return pd.DataFrame(ok), pd.DataFrame(failed)
