"""Pareto plots of the results table: realized total bits/weight vs perplexity.

One PNG per (model, perplexity dataset @ seqlen): one line per method through its runs sorted by
realized bits, log-scale perplexity, the unquantized reference as a dashed horizontal line, and
the Pareto front over all quantized runs (lowest perplexity at no more bits) as a grey step line.
Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List

import pandas as pd

REFERENCE = ("fp16",)
MARKERS = "osD^v<>pP*Xh"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_")


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def pareto_front(points: List[tuple]) -> List[tuple]:
    """(bits, ppl) points -> the front: sorted by bits, each with a lower ppl than all before it."""
    front, best = [], math.inf
    for b, p in sorted(points):
        if p < best:
            front.append((b, p))
            best = p
    return front


def pareto_plots(table: pd.DataFrame, outdir: str, method_order: List[str] = (), cap: float = 30.0) -> Dict[str, str]:
    """Write the plots of an aggregated results table. -> {"<model>/<ds>@<seqlen>": png path}.
    Perplexities above `cap` x the lowest one are drawn at the top edge as an arrow with the value
    written beside it (an exploded 2-bit baseline would otherwise flatten every other line)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out: Dict[str, str] = {}
    if table.empty or "bits_total" not in table:
        return out
    ppl_cols = [c for c in table.columns if c.startswith("ppl::") and not c.endswith("::std")]
    order = {m: i for i, m in enumerate(method_order)}
    for model, sub in table.groupby("model", sort=False):
        for col in ppl_cols:
            ds = col[len("ppl::"):]
            rows = sub[sub[col].map(_finite) & sub["bits_total"].map(_finite)]
            quant = rows[~rows["method"].isin(REFERENCE)]
            if quant.empty:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
            methods = sorted(quant["method"].unique(), key=lambda m: (order.get(m, len(order)), m))
            top = float(rows[col].min()) * cap
            for i, m in enumerate(methods):
                pts = sorted(zip(quant.loc[quant["method"] == m, "bits_total"], quant.loc[quant["method"] == m, col]))
                ys = [min(p[1], top) for p in pts]
                ax.plot([p[0] for p in pts], ys, marker=MARKERS[i % len(MARKERS)], lw=1.6, ms=6, label=m,
                        color=f"C{i}")
                for b, v in pts:
                    if v > top:  # off the scale: an arrow at the top edge, the value beside it
                        ax.plot([b], [top], marker="^", ms=9, color=f"C{i}", clip_on=False)
                        ax.annotate(f"{v:.4g}", (b, top), xytext=(6, -12), textcoords="offset points",
                                    fontsize=8, color=f"C{i}")
            front = pareto_front(list(zip(quant["bits_total"], quant[col])))
            if len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.55", lw=1.0,
                        ls=":", label="Pareto front", zorder=0)
            for _, r in rows[rows["method"].isin(REFERENCE)].iterrows():
                ax.axhline(r[col], color="k", ls="--", lw=1.0, label=f"{r['method']} ({r[col]:.2f})")
            ax.set_yscale("log")
            if float(rows[col].max()) > top:
                ax.set_ylim(top=top * 1.05)
            ds_name, _, seqlen = ds.partition("@")
            ax.set_xlabel("realized bits/weight (total: indices + codebooks + scales + outliers)")
            ax.set_ylabel(f"perplexity, {ds_name} @{seqlen} tokens (log scale) ↓")
            ax.set_title(f"{model}: bits vs perplexity ({ds_name} @{seqlen})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
            fig.tight_layout()
            path = os.path.join(outdir, f"pareto_{_slug(model)}_{_slug(ds_name)}_{seqlen}.png")
            tmp = f"{path}.tmp-{os.getpid()}.png"
            fig.savefig(tmp)
            plt.close(fig)
            os.replace(tmp, path)
            out[f"{model}/{ds}"] = path
    return out
