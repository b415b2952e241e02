"""python analysis/report.py [DIR] [--wandb] [--project NAME] [--qa-metric acc|acc_norm]

Gathers every metrics.json below DIR (default: outputs) and writes
- DIR/results.md, results.tex, results.csv: one row per (model, method, bits, settings), realized
  bits counted from what is stored, units in the headers, the best value of every metric column
  in bold and the second best underlined (within each model; the unquantized reference is shown,
  not ranked);
- DIR/results_paper.tex: the papers' layout (rows: method x bits; columns: W2, C4 (and any other
  perplexity corpus), each QA task, AvgQA, bits, time (h), mem (GB)), best bold, second underlined;
- DIR/pareto_<model>_<dataset>_<seqlen>.png: realized total bits vs perplexity (analysis/plots.py).
--wandb logs the table (wandb.Table) and the plots (wandb.Image) as one W&B run of job_type
"report" in the sweep's group (offline unless --mode online).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pandas as pd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from analysis.collect import REFERENCE_METHODS, load_runs, to_frame  # noqa: E402

METHOD_ORDER = ["fp16", "rtn", "gptq", "gptvq", "aqlm", "vptq"]


@dataclass
class Column:
    key: str  # column of the frame
    header: str  # with unit and direction
    better: Optional[str]  # "lower" | "higher" | None (not ranked)
    fmt: str = "{:.2f}"


# what else tells two configurations apart: shown as a column only where the table's rows differ in it
VARIANT_COLUMNS = [("calib", "calibration"), ("protocol", "Hessian protocol"), ("finetune", "finetuning"),
                   ("finetune_settings", "finetuning settings"), ("iters", "iterations"), ("kernel", "kernel"),
                   ("eval_windows", "eval windows")]


def variant_columns(df: pd.DataFrame) -> List[Column]:
    out = []
    for key, header in VARIANT_COLUMNS:
        if key in df and df[key].dropna().astype(str).nunique() > 1:
            out.append(Column(key, header, None, "{}"))
    if "n_seeds" in df and (df["n_seeds"] > 1).any():
        out.append(Column("n_seeds", "seeds", None, "{:g}"))
    return out


BUSY_CORES = 0.25  # other processes' average CPU use (cores) above which a quantization time is not quiet


def _busy(v) -> bool:
    return not _missing(v) and v >= BUSY_CORES


def _reused(v) -> bool:
    return not _missing(v) and v > 0


def time_marks(r, style: str) -> str:
    """What follows a row's quantization time: ‡ measured beside other work, ↺ blocks it loaded from
    another run's checkpoints (time_comparable's notes explain both)."""
    marks = []
    if _busy(r.get("other_cpu")):
        marks.append(" ‡" if style == "md" else r"$^\ddagger$")
    if _reused(r.get("reused_blocks")):
        marks.append(" ↺" if style == "md" else r"\textsuperscript{reused}")
    return "".join(marks)


def time_comparable(df: pd.DataFrame) -> Tuple[bool, List[str]]:
    """Whether the quantization times of the ranked rows were measured alike (same threads, quiet), and
    why not: (ok, reasons). Times measured in unlike conditions are shown but not ranked."""
    sub = df[~df["method"].isin(REFERENCE_METHODS)] if "method" in df else df
    why = []
    machines = _machines(sub)
    if len(machines) > 1:
        why.append(f"the rows ran on {len(machines)} different machines (the machine column)")
    if "threads" in sub and sub["threads"].dropna().nunique() > 1:
        why.append("the rows ran on different thread counts (" +
                   ", ".join(f"{t:g}" for t in sorted(sub["threads"].dropna().unique())) + "; the threads column)")
    if "other_cpu" in sub:
        busy = int(sub["other_cpu"].map(_busy).sum())
        unknown = int(sub["other_cpu"].map(_missing).sum())
        if busy:
            why.append(f"{busy} row(s) were quantized beside other work (‡: other processes kept "
                       f">= {BUSY_CORES:g} cores busy on average)")
        if unknown and unknown < len(sub):
            why.append(f"{unknown} row(s) carry no record of other work on the machine (older runs)")
    reused = int(sub["reused_blocks"].map(_reused).sum()) if "reused_blocks" in sub else 0
    if reused:
        why.append(f"{reused} row(s) loaded quantized blocks from checkpoints of an earlier run (↺: their time "
                   "counts only the rest)")
    return not why, why


def _machines(df: pd.DataFrame) -> List[str]:
    """The distinct machines the rows ran on (collect.machine_of; a row over seeds may name several)."""
    if "machine" not in df:
        return []
    return sorted({m for v in df["machine"].dropna() for m in str(v).split("; ") if m})


def method_label(method: str, variant) -> str:
    """The method column: the method's name, and any variant other than the authors' ("reference")
    beside it, so a row of an improved variant is never read as the published method."""
    if variant is None or (isinstance(variant, float) and math.isnan(variant)) or variant == "reference":
        return method
    return f"{method} ({variant})"


def _metric_columns(df: pd.DataFrame, prefix: str) -> List[str]:
    return [c for c in df.columns if c.startswith(prefix) and not c.endswith("::std")]


def columns_for(df: pd.DataFrame) -> List[Column]:
    cols = [Column("model", "model", None, "{}"), Column("method_label", "method", None, "{}"),
            Column("bits_target", "bits (target)", None, "{:g}"), Column("settings", "settings", None, "{}")]
    cols += variant_columns(df)
    cols += [Column("bits_index", "bits/weight (index) ↓", "lower", "{:.3f}"),
            Column("bits_total", "bits/weight (total) ↓", "lower", "{:.3f}")]
    for c in _metric_columns(df, "ppl::"):
        ds, seqlen = c[5:].split("@")
        cols.append(Column(c, f"PPL {ds} @{seqlen} ↓", "lower", "{:.2f}"))
        if f"ratio::{c[5:]}" in df and df[f"ratio::{c[5:]}"].notna().any():
            # the PPL column's order (one float model per table's model): shown, not ranked twice
            cols.append(Column(f"ratio::{c[5:]}", f"PPL ÷ float {ds}", None, "{:.3f}"))
        if f"paper::{c[5:]}" in df and df[f"paper::{c[5:]}"].notna().any():
            cols.append(Column(f"paper::{c[5:]}", f"paper PPL {ds} @{seqlen}", None, "{:.2f}"))
            cols.append(Column(f"vs_paper::{c[5:]}", "Δ vs paper", None, "{:+.2f}"))
    for c in _metric_columns(df, "kld::"):
        ds, seqlen = c[5:].split("@")
        cols.append(Column(c, f"KLD {ds} @{seqlen} ↓", "lower", "{:.4f}"))
        if f"top1::{c[5:]}" in df:
            cols.append(Column(f"top1::{c[5:]}", f"top-1 agree {ds} (%) ↑", "higher", "{:.1f}"))
    for c in df.columns:
        if c.startswith("qa::") and not c.endswith("::std"):
            parts = c.split("::")[1:]
            if parts[0] == "mean":
                parts[0] = "AvgQA"
            cols.append(Column(c, f"{' '.join(parts)} (%) ↑", "higher", "{:.1f}"))
    if len(_machines(df)) > 1:
        cols.append(Column("machine", "machine", None, "{}"))
    if "threads" in df and df["threads"].dropna().nunique() > 1:
        cols.append(Column("threads", "threads", None, "{:g}"))
    cols.append(Column("quant_s", "quant time (s) ↓", "lower" if time_comparable(df)[0] else None, "{:.1f}"))
    if "decode_tok_s" in df and df["decode_tok_s"].notna().any():  # one timing per run: shown, not ranked
        cols.append(Column("decode_tok_s", "decode tok/s ↑", None, "{:.1f}"))
    if "decode_mib" in df and df["decode_mib"].notna().any():  # what the decoding model holds
        cols.append(Column("decode_mib", "decode MiB ↓", None, "{:.1f}"))
    if "mem_gb" in df and df["mem_gb"].notna().any():
        cols.append(Column("mem_gb", "mem (GB) ↓", "lower", "{:.2f}"))
    return cols


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (`config_key`: runs that differ only in their seed): the mean over
    its seeds, `n_seeds`, and for every perplexity and QA column the sample standard deviation
    over the seeds (`<column>::std`, NaN for one seed)."""
    if df.empty:
        return df
    keys = ["model", "method", "bits_target", "settings"]
    df = df.copy()
    if "config_key" not in df:
        df["config_key"] = None
    df["bits_target"] = df["bits_target"].astype(object).where(df["bits_target"].notna(), None)
    shown = [k for k, _ in VARIANT_COLUMNS + [("variant", "")] if k in df]  # constant within a configuration
    for k in shown:
        df[k] = df[k].astype(object).where(df[k].notna(), None)
    num = [c for c in df.columns if c not in keys + shown + ["seed", "config_key"]
           and pd.api.types.is_numeric_dtype(df[c])]
    g = df.groupby(keys + ["config_key"], dropna=False, sort=False)
    out = g[num].mean().reset_index()
    for k in shown:
        out[k] = g[k].first().values
    spread = [c for c in num if c.startswith(("ppl::", "qa::", "kld::", "top1::", "ratio::"))]
    if spread:
        std = g[spread].std(ddof=1).reset_index(drop=True)
        for c in spread:
            out[f"{c}::std"] = std[c].values
    if "machine" in df:  # the machines a row's seeds ran on
        out["machine"] = g["machine"].agg(lambda v: "; ".join(sorted(set(v.dropna())))).values
    out["n_seeds"] = g.size().values
    out["method_label"] = [method_label(m, v) for m, v in zip(out["method"], out.get("variant", [None] * len(out)))]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out["_m"] = out["method"].map(lambda m: order.get(m, len(order)))
    out["_b"] = out["bits_target"].map(lambda b: -1 if b is None or (isinstance(b, float) and math.isnan(b)) else b)
    out = out.sort_values(["model", "_m", "_b", "settings"]).drop(columns=["_m", "_b"]).reset_index(drop=True)
    return out


def _noise_interval(r, key: str):
    """(low, high) of a row's value from its noise: mean ± std over seeds where there are several,
    else the 95% interval over the evaluation windows (perplexity; KL: mean ± 1.96 SE); None where
    nothing is known (a single run's accuracy, bits, time: ranked on the value alone)."""
    v = r.get(key)
    std = r.get(f"{key}::std")
    if r.get("n_seeds", 1) and r.get("n_seeds", 1) > 1 and not _missing(std):
        return v - std, v + std
    suffix = key.split("::", 1)[1] if "::" in key else None
    if key.startswith("ppl::") and not _missing(r.get(f"ppl_lo::{suffix}")) and not _missing(r.get(f"ppl_hi::{suffix}")):
        return r[f"ppl_lo::{suffix}"], r[f"ppl_hi::{suffix}"]
    if key.startswith("kld::") and not _missing(r.get(f"kld_se::{suffix}")):
        return v - 1.96 * r[f"kld_se::{suffix}"], v + 1.96 * r[f"kld_se::{suffix}"]
    return None


TIE = "tie"


def ranks(df: pd.DataFrame, col: Column, by=("model",)) -> Dict[int, object]:
    """row index -> 1 (best), 2 (second best) or TIE, per group (model; or model and bits), on the
    displayed (rounded) values. Where the rows' noise is known (seed spread, or the interval over
    the evaluation windows: `_noise_interval`), the best is bold only when its interval and the
    runner-up's do not overlap (it beats it by more than their combined spread); otherwise the best
    and every row within its noise are marked TIE and nothing is bold."""
    out: Dict[int, object] = {}
    if col.better is None or col.key not in df:
        return out
    lower = col.better == "lower"
    for _, sub in df.groupby(list(by), sort=False):
        sub = sub[~sub["method"].isin(REFERENCE_METHODS)]
        vals, noise = {}, {}
        for i, r in sub.iterrows():
            v = r.get(col.key)
            if _missing(v):
                continue
            vals[i] = float(col.fmt.format(v * 100 if col.key.startswith("qa::") else v))
            noise[i] = _noise_interval(r, col.key)
        if not vals:
            continue
        distinct = sorted(set(vals.values()), reverse=not lower)
        best = [i for i, v in vals.items() if v == distinct[0]]
        rest = [i for i in vals if i not in best]
        if rest and any(noise[i] is not None for i in vals):
            raw = sub[col.key]
            lo_b, hi_b = noise[best[0]] or (raw[best[0]], raw[best[0]])
            tied = [i for i in rest if (noise[i] or (raw[i], raw[i]))[0] <= hi_b
                    and lo_b <= (noise[i] or (raw[i], raw[i]))[1]]
            if tied:  # the best is within the noise of another row: no winner
                for i in best + tied:
                    out[i] = TIE
                continue
        for i, v in vals.items():
            if v == distinct[0]:
                out[i] = 1
            elif len(distinct) > 1 and v == distinct[1]:
                out[i] = 2
    return out


def _mark(s: str, k, style: str) -> str:
    if k == 1:
        return f"**{s}**" if style == "md" else rf"\textbf{{{s}}}"
    if k == 2:
        return f"<u>{s}</u>" if style == "md" else rf"\underline{{{s}}}"
    if k == TIE:
        return f"{s} ≈" if style == "md" else rf"{s}$^{{\approx}}$"
    return s


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell(v, col: Column, std=None, pm: str = " ± ") -> str:
    """The value as displayed; with `std` (several seeds) "mean ± std" in the same format."""
    if _missing(v):
        return "—"
    scale = 100 if col.key.startswith("qa::") else 1
    s = col.fmt.format(v * scale)
    if not _missing(std):
        s += pm + col.fmt.format(std * scale)
    return s


def render(df: pd.DataFrame, style: str) -> str:
    cols = columns_for(df)
    rk = {c.key: ranks(df, c) for c in cols}
    rows = []
    for i, r in df.iterrows():
        cells = []
        for c in cols:
            s = cell(r.get(c.key), c, r.get(f"{c.key}::std"), " ± " if style == "md" else r" $\pm$ ")
            if style == "tex":
                s = s.replace("_", r"\_").replace("%", r"\%").replace("—", "--")
            if c.key == "quant_s":
                s += time_marks(r, style)
            cells.append(_mark(s, rk[c.key].get(i), style))
        rows.append(cells)
    if style == "md":
        head = "| " + " | ".join(c.header for c in cols) + " |"
        sep = "|" + "|".join("---" if c.better is None else "---:" for c in cols) + "|"
        return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows])

    def tex_head(h):
        return (h.replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$").replace("_", r"\_")
                .replace("%", r"\%").replace("@", r"@"))

    spec = "".join("l" if c.better is None else "r" for c in cols)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(tex_head(c.header) for c in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def notes(raw: pd.DataFrame, table: Optional[pd.DataFrame] = None) -> List[str]:
    out = ["Bits/weight are realized totals over the quantized linears, counted from the stored tensors "
           "(indices, codebooks, scales, outliers, norms, permutations); embeddings and LM head stay in float.",
           "Best of each column in bold, second underlined, per model; the unquantized reference (fp16) is "
           "shown but not ranked."]
    if "protocol" in raw and raw["protocol"].notna().any():
        protos = ", ".join(sorted(raw["protocol"].dropna().unique()))
        out.append(f"Hessian protocol: {protos}.")
    out.append("Where the noise of a column is known (the spread over seeds; without seeds the 95% interval over "
               "the evaluation windows for perplexity, ±1.96 standard errors for KLD), the best is bold only when "
               "it beats the runner-up by more than their combined noise; otherwise it and every row within its "
               "noise are marked ≈ (tied) and nothing is bold.")
    if "variant" in raw and raw["variant"].dropna().ne("reference").any():
        out.append("A method name followed by a variant in parentheses is NOT the published algorithm but our "
                   "variant of it (e.g. gptvq (exact)); the bare name is the authors' released algorithm.")
    if any(c.startswith("kld::") for c in raw.columns):
        out.append("KLD: mean per-token KL(float ‖ quantized) of the next-token distributions on the evaluation "
                   "windows (nats), over the float model's top-k tokens and one bucket for the rest; top-1 agree: "
                   "% of positions where both models' most likely token is the same.")
    if raw.filter(regex="^ratio::").notna().any().any():
        out.append("PPL ÷ float: each run's perplexity divided by the float model's on the same evaluation windows "
                   "(recorded with its KLD), then averaged over seeds; not ranked (it orders rows as the PPL column).")
    machines = _machines(raw)
    if len(machines) > 1:
        out.append(f"The runs come from {len(machines)} machines ({'; '.join(machines)}; the machine column): the "
                   "same configuration and seed reproduces codes and perplexity bit for bit only on the same machine "
                   "(other CPUs and BLAS libraries sum in other orders, and quantization carries the difference on: "
                   "1.1% of perplexity for VPTQ 2-bit between a Zen 3 and a Zen 4, docs/LOG.md 2026-12-07).")
    if "decode_tok_s" in raw and raw["decode_tok_s"].notna().any():
        out.append("decode tok/s: greedy decode at batch 1 with the KV cache (`kernel.throughput=true`; the kernel "
                   "column or the run's settings say which kernel), the float reference's on the same machine for "
                   "scale; one timing per run, so shown but never ranked, and comparable only within one machine "
                   "and thread count.")
    if "decode_mib" in raw and raw["decode_mib"].notna().any():
        out.append("decode MiB: the memory the decoding model held, each tensor storage once: its parameters, "
                   "quantized weights and the buffers its kernels built (`kernel.resident_bytes`); not the "
                   "process's RSS; not ranked: it depends on the kernel as much as on the method.")
    ok, why = time_comparable(table if table is not None else raw)
    if not ok:
        out.append("Quantization times are shown but not ranked: " + "; ".join(why) + ".")
    if table is not None and "n_seeds" in table and (table["n_seeds"] > 1).any():
        out.append("A row over several seeds (the seeds column) shows the mean ± the sample standard deviation "
                   "over them; ranks are on the means. Runs are averaged only when their configurations differ in "
                   "nothing but the seed.")
    return out


# ---------------------------------------------------------------- the papers' layout

QA_SHORT = {"arc_easy": "ArcE", "arc_challenge": "ArcC", "hellaswag": "HellaS", "piqa": "PiQA",
            "winogrande": "WinoG"}
QA_ORDER = list(QA_SHORT)


def _ppl_label(ds: str) -> str:
    name = ds.split("@")[0]
    if name.startswith("wikitext2"):
        return "W2"
    if name == "c4":
        return "C4"
    return name


def paper_columns(df: pd.DataFrame, qa_metric: str = "acc") -> List[Column]:
    """Method, W bits | PPL: W2, C4, other corpora | QA tasks (qa_metric, %), AvgQA | bits, time, mem."""
    cols = [Column("method", "Method", None, "{}"), Column("bits_target", "W bits", None, "{:g}")]
    ppl = [c for c in df.columns if c.startswith("ppl::") and not c.endswith("::std")]
    rank = {"W2": 0, "C4": 1}
    ppl.sort(key=lambda c: (rank.get(_ppl_label(c[5:]), 2), c))
    for c in ppl:
        ds, seqlen = c[5:].split("@")
        cols.append(Column(c, f"{_ppl_label(ds)} @{seqlen}", "lower", "{:.2f}"))
    tasks = [c.split("::")[1] for c in df.columns if c.startswith("qa::") and c.endswith(f"::{qa_metric}")]
    tasks = [t for t in tasks if t != "mean"]
    tasks.sort(key=lambda t: (QA_ORDER.index(t) if t in QA_ORDER else len(QA_ORDER), t))
    for t in tasks:
        cols.append(Column(f"qa::{t}::{qa_metric}", QA_SHORT.get(t, t), "higher", "{:.2f}"))
    if tasks:
        cols.append(Column(f"qa::mean::{qa_metric}", "AvgQA", "higher", "{:.2f}"))
    cols.append(Column("bits_total", "bits", "lower", "{:.3f}"))
    cols.append(Column("quant_h", "time (h)", "lower" if time_comparable(df)[0] else None, "{:.3f}"))
    if "mem_gb" in df and df["mem_gb"].notna().any():
        cols.append(Column("mem_gb", "mem (GB)", "lower", "{:.2f}"))
    return cols


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def render_paper(df: pd.DataFrame, qa_metric: str = "acc") -> str:
    """The papers' LaTeX table (booktabs): one block per model, the unquantized reference first
    (shown, not ranked), then one group of rows per target bits; best and second best are
    marked within each (model, bits) group, as in the papers."""
    df = df.copy()
    df["quant_h"] = df["quant_s"] / 3600.0 if "quant_s" in df else float("nan")
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    df["_ref"] = ~df["method"].isin(REFERENCE_METHODS)
    df["_b"] = df["bits_target"].map(lambda b: -1.0 if b is None or (isinstance(b, float) and math.isnan(b)) else b)
    df["_m"] = df["method"].map(lambda m: order.get(m, len(order)))
    models = list(dict.fromkeys(df["model"]))
    df["_model"] = df["model"].map(models.index)
    df = df.sort_values(["_model", "_ref", "_b", "_m"], kind="stable")
    cols = paper_columns(df, qa_metric)
    rk = {c.key: ranks(df, c, by=("model", "bits_target")) for c in cols}
    nppl = sum(c.key.startswith("ppl::") for c in cols)
    nqa = sum(c.key.startswith("qa::") for c in cols)
    ncost = len(cols) - 2 - nppl - nqa
    spec = "ll" + "r" * (len(cols) - 2)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule"]
    groups = [("", 2), (r"PPL $\downarrow$", nppl),
              (rf"Zero-shot {_tex(qa_metric)} (\%) $\uparrow$", nqa), ("Cost", ncost)]
    head, rules, start = [], [], 1
    for title, n in groups:
        if n == 0:
            continue
        head.append(rf"\multicolumn{{{n}}}{{c}}{{{title}}}" if title else " & ".join([""] * n))
        if title:
            rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" & ".join(head) + r" \\")
    lines.append("".join(rules))
    lines.append(" & ".join(_tex(c.header) for c in cols) + r" \\")
    for model, sub in df.groupby("model", sort=False):
        lines.append(r"\midrule")
        lines.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\textit{{{_tex(str(model))}}}}} \\")
        prev = None
        for i, r in sub.iterrows():
            if prev is not None and r["_b"] != prev:
                lines.append(rf"\cmidrule(lr){{1-{len(cols)}}}")
            prev = r["_b"]
            cells = []
            for c in cols:
                v = r.get(c.key)
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    s = "--" if not (c.key == "bits_target" and r["method"] in REFERENCE_METHODS) else "16"
                else:
                    s = _tex(cell(v, c))
                    std = r.get(f"{c.key}::std")
                    if not _missing(std):
                        s += rf"\,{{\scriptsize$\pm${_tex(cell(std, c))}}}"
                if c.key == "quant_h":
                    s += time_marks(r, "tex")
                cells.append(_mark(s, rk[c.key].get(i), "tex"))
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def write_report(root: str, qa_metric: str = "acc", papers: Optional[str] = None) -> pd.DataFrame:
    """papers: a CSV of published numbers (default analysis/papers.csv) shown beside matching rows."""
    from analysis.papers import attach_papers, load_papers

    ok, failed = to_frame(load_runs(root))
    table = attach_papers(aggregate(ok), load_papers(papers))
    md = [f"# Results ({root})", ""]
    if table.empty:
        md.append("No finished runs.")
    else:
        md.append(render(table, "md"))
        md.append("")
        md += [f"- {n}" for n in notes(ok, table)]
        srcs = sorted({v for c in table.columns if c.startswith("paper_src::") for v in table[c].dropna()})
        if srcs:
            md.append("- Published values (paper PPL, their own protocol; Δ = ours − theirs) from: " + "; ".join(srcs)
                      + ". A row matches a published one only for the same model, method (reference variant), bits "
                        "(±0.1), dataset, seqlen and finetuning (analysis/papers.csv).")
    if not failed.empty:
        md += ["", "## Failed jobs", ""]
        md += [f"- {r.model} {r.method} bits={r.bits_target}: {r.error} ({r.path})" for r in failed.itertuples()]
    from runners.metrics import write_json_atomic  # noqa: F401  (atomic text writes below)

    _write(os.path.join(root, "results.md"), "\n".join(md) + "\n")
    _write(os.path.join(root, "results.tex"), (render(table, "tex") if not table.empty else "% no finished runs") + "\n")
    if not table.empty:
        _write(os.path.join(root, "results.csv"), table.to_csv(index=False))
        _write(os.path.join(root, "results_paper.tex"), render_paper(table, qa_metric) + "\n")
        from analysis.plots import pareto_plots

        plots = pareto_plots(table, root, METHOD_ORDER)
        if plots:
            md = ["", "## Pareto plots", ""] + [f"![{k}]({os.path.basename(p)})" for k, p in plots.items()]
            with open(os.path.join(root, "results.md"), "a") as f:
                f.write("\n".join(md) + "\n")
        table.attrs["plots"] = plots
    return table


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="analysis/report.py", description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="outputs", help="folder searched for metrics.json (default: outputs)")
    ap.add_argument("--qa-metric", default="acc", choices=["acc", "acc_norm"], help="QA metric in results_paper.tex")
    ap.add_argument("--wandb", action="store_true", help="also log the table and plots as a W&B report run")
    ap.add_argument("--project", default="vq-bench", help="W&B project (with --wandb)")
    ap.add_argument("--entity", default=None, help="W&B entity (with --wandb)")
    ap.add_argument("--mode", default="offline", choices=["offline", "online"], help="W&B mode (with --wandb)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    root = args.root
    if not os.path.isdir(root):
        print(f"error: results folder {root!r} does not exist", file=sys.stderr)
        return 2
    table = write_report(root, qa_metric=args.qa_metric)
    plots = table.attrs.get("plots", {})
    print(f"{len(table)} rows -> {os.path.join(root, 'results.md')}, results.tex, results_paper.tex, "
          f"{len(plots)} plot(s)")
    if args.wandb:
        from runners.tracking import log_report

        where = log_report(table, plots, project=args.project, entity=args.entity, mode=args.mode,
                           group=os.path.basename(os.path.normpath(os.path.abspath(root))), run_dir=root)
        print(f"W&B report run -> {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
