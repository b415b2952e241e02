"""python analysis/report.py [DIR]

Gathers every metrics.json below DIR (default: outputs) and writes DIR/results.md,
DIR/results.tex and DIR/results.csv: one row per (model, method, bits), realized bits counted
from what is stored, units in the headers, the best value of every metric column in bold and
the second best underlined (within each model; the unquantized reference is shown, not ranked).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

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


def columns_for(df: pd.DataFrame) -> List[Column]:
    cols = [Column("model", "model", None, "{}"), Column("method", "method", None, "{}"),
            Column("bits_target", "bits (target)", None, "{:g}"), Column("settings", "settings", None, "{}"),
            Column("bits_index", "bits/weight (index) ↓", "lower", "{:.3f}"),
            Column("bits_total", "bits/weight (total) ↓", "lower", "{:.3f}")]
    for c in df.columns:
        if c.startswith("ppl::"):
            ds, seqlen = c[5:].split("@")
            cols.append(Column(c, f"PPL {ds} @{seqlen} ↓", "lower", "{:.2f}"))
    for c in df.columns:
        if c.startswith("qa::"):
            parts = c.split("::")[1:]
            cols.append(Column(c, f"{' '.join(parts)} (%) ↑", "higher", "{:.1f}"))
    cols.append(Column("quant_s", "quant time (s) ↓", "lower", "{:.1f}"))
    return cols


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of the same (model, method, bits, settings)."""
    if df.empty:
        return df
    keys = ["model", "method", "bits_target", "settings"]
    df = df.copy()
    df["bits_target"] = df["bits_target"].astype(object).where(df["bits_target"].notna(), None)
    num = [c for c in df.columns if c not in keys and pd.api.types.is_numeric_dtype(df[c])]
    g = df.groupby(keys, dropna=False, sort=False)
    out = g[num].mean().reset_index()
    out["n_seeds"] = g.size().values
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out["_m"] = out["method"].map(lambda m: order.get(m, len(order)))
    out["_b"] = out["bits_target"].map(lambda b: -1 if b is None or (isinstance(b, float) and math.isnan(b)) else b)
    out = out.sort_values(["model", "_m", "_b", "settings"]).drop(columns=["_m", "_b"]).reset_index(drop=True)
    return out


def ranks(df: pd.DataFrame, col: Column) -> Dict[int, int]:
    """row index -> 1 (best) or 2 (second best), per model, on the displayed (rounded) values."""
    out: Dict[int, int] = {}
    if col.better is None or col.key not in df:
        return out
    for _, sub in df.groupby("model", sort=False):
        sub = sub[~sub["method"].isin(REFERENCE_METHODS)]
        vals = {}
        for i, v in sub[col.key].items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            vals[i] = float(col.fmt.format(v * 100 if col.key.startswith("qa::") else v))
        distinct = sorted(set(vals.values()), reverse=(col.better == "higher"))
        for i, v in vals.items():
            if distinct and v == distinct[0]:
                out[i] = 1
            elif len(distinct) > 1 and v == distinct[1]:
                out[i] = 2
    return out


def cell(v, col: Column) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if col.key.startswith("qa::"):
        v = v * 100
    return col.fmt.format(v)


def render(df: pd.DataFrame, style: str) -> str:
    cols = columns_for(df)
    rk = {c.key: ranks(df, c) for c in cols}
    rows = []
    for i, r in df.iterrows():
        cells = []
        for c in cols:
            s = cell(r.get(c.key), c)
            if style == "tex":
                s = s.replace("_", r"\_").replace("%", r"\%").replace("—", "--")
            k = rk[c.key].get(i)
            if k == 1:
                s = f"**{s}**" if style == "md" else rf"\textbf{{{s}}}"
            elif k == 2:
                s = f"<u>{s}</u>" if style == "md" else rf"\underline{{{s}}}"
            cells.append(s)
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


def notes(raw: pd.DataFrame) -> List[str]:
    out = ["Bits/weight are realized totals over the quantized linears, counted from the stored tensors "
           "(indices, codebooks, scales, outliers, norms, permutations); embeddings and LM head stay in float.",
           "Best of each column in bold, second underlined, per model; the unquantized reference (fp16) is "
           "shown but not ranked."]
    if "protocol" in raw and raw["protocol"].notna().any():
        protos = ", ".join(sorted(raw["protocol"].dropna().unique()))
        out.append(f"Hessian protocol: {protos}.")
    return out


def write_report(root: str) -> pd.DataFrame:
    ok, failed = to_frame(load_runs(root))
    table = aggregate(ok)
    md = [f"# Results ({root})", ""]
    if table.empty:
        md.append("No finished runs.")
    else:
        md.append(render(table, "md"))
        md.append("")
        md += [f"- {n}" for n in notes(ok)]
    if not failed.empty:
        md += ["", "## Failed jobs", ""]
        md += [f"- {r.model} {r.method} bits={r.bits_target}: {r.error} ({r.path})" for r in failed.itertuples()]
    from runners.metrics import write_json_atomic  # noqa: F401  (atomic text writes below)

    _write(os.path.join(root, "results.md"), "\n".join(md) + "\n")
    _write(os.path.join(root, "results.tex"), (render(table, "tex") if not table.empty else "% no finished runs") + "\n")
    if not table.empty:
        _write(os.path.join(root, "results.csv"), table.to_csv(index=False))
    return table


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = argv[0] if argv else "outputs"
    if not os.path.isdir(root):
        print(f"error: results folder {root!r} does not exist", file=sys.stderr)
        return 2
    table = write_report(root)
    print(f"{len(table)} rows -> {os.path.join(root, 'results.md')}, results.tex")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
