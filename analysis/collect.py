"""Gather every metrics.json below a folder into a pandas DataFrame (one row per run_key)."""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import List, Tuple

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


def to_frame(runs: List[dict]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """-> (finished runs, failed runs). Columns of the first: model, method, bits_target, settings,
    seed, calib ("data NxL"), kernel, eval_windows, config_key (equal for runs that differ only in
    the seed), bits_index, bits_total, quant_s, eval_s, peak_rss_gb, peak_gpu_gb, mem_gb (peak GPU memory
    on GPU runs, else peak process RSS), device, ppl::<ds>@<seqlen> (each dataset's own seqlen),
    qa::<task>::<metric> (and qa::mean::<metric>)."""
    ok, failed = [], []
    for m in dedupe(runs):
        b = m.get("bits") or {}
        row = {"model": m.get("model"), "method": m.get("method"), "bits_target": b.get("target"),
               "run_key": m["run_key"], "path": m["_path"]}
        if m.get("status") != "ok":
            row["error"] = m.get("error", "")
            failed.append(row)
            continue
        ev = m.get("eval") or {}
        seqlen, seqlens = ev.get("seqlen"), ev.get("seqlens") or {}
        mem = m.get("memory") or {}
        cal = m.get("calib") or {}
        row.update({"settings": settings_str(m.get("settings")), "seed": m.get("seed"),
                    "calib": f"{cal.get('data')} {cal.get('nsamples')}x{cal.get('seqlen')}" if cal else None,
                    "kernel": (m.get("kernel") or {}).get("name"),
                    "eval_windows": _windows_str(ev.get("windows")),
                    "bits_index": b.get("index"), "bits_total": b.get("total"),
                    "quant_s": (m.get("time") or {}).get("quantize_s"),
                    "eval_s": (m.get("time") or {}).get("eval_s"),
                    "peak_rss_gb": mem.get("peak_rss_gb"), "peak_gpu_gb": mem.get("peak_gpu_gb"),
                    "mem_gb": mem.get("peak_gpu_gb") if mem.get("peak_gpu_gb") is not None else mem.get("peak_rss_gb"),
                    "device": (m.get("env") or {}).get("device"),
                    "protocol": m.get("hessian_protocol")})
        row["config_key"] = m.get("config_key") or _config_key_of(m, row)
        for ds, v in (m.get("ppl") or {}).items():
            row[f"ppl::{ds}@{seqlens.get(ds, seqlen)}"] = v
        for task, vals in (m.get("qa") or {}).items():
            if isinstance(vals, dict):
                for metric, v in vals.items():
                    row[f"qa::{task}::{metric}"] = v
            else:
                row[f"qa::{task}"] = vals
        ok.append(row)
    return pd.DataFrame(ok), pd.DataFrame(failed)
