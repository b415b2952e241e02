"""Pareto plots of the results table: realized total bits/weight vs perplexity, and vs KL
divergence to the float model where the runs measured it.

One PNG per (model, metric, dataset @ seqlen): one line per method through its runs sorted by
realized bits, log-scale y, the unquantized reference as a dashed horizontal line (perplexity
only: its KL is 0), and the Pareto front over all quantized runs (lowest value at no more bits) as
a grey step line. Values above `cap` x the lowest are drawn as arrows at the top edge and listed,
one line each, in a box in the upper left (labels beside the arrows overlapped where two methods
exploded at the same bits). Matplotlib's Agg backend: no display needed.
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


METRICS = {"ppl::": ("perplexity", "pareto"), "kld::": ("KL(float ‖ quantized), nats/token", "pareto_kld")}


def pareto_plots(table: pd.DataFrame, outdir: str, method_order: List[str] = (), cap: float = 30.0) -> Dict[str, str]:
    """Write the plots of an aggregated results table. -> {"<model>/<ds>@<seqlen>" (perplexity) or
    "<model>/kld/<ds>@<seqlen>": png path}."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out: Dict[str, str] = {}
    if table.empty or "bits_total" not in table:
        return out
    order = {m: i for i, m in enumerate(method_order)}
    label_col = "method_label" if "method_label" in table else "method"
    for prefix, (what, stem) in METRICS.items():
        cols = [c for c in table.columns if c.startswith(prefix) and not c.endswith("::std")]
        for model, sub in table.groupby("model", sort=False):
            for col in cols:
                ds = col[len(prefix):]
                rows = sub[sub[col].map(_finite) & sub["bits_total"].map(_finite)]
                quant = rows[~rows["method"].isin(REFERENCE)]
                quant = quant[quant[col] > 0] if prefix == "kld::" else quant  # log scale
                if quant.empty:
                    continue
                fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
                methods = sorted(quant[label_col].unique(), key=lambda m: (order.get(m.split(" ")[0], len(order)), m))
                top = float(quant[col].min()) * cap
                off = []  # (method, bits, value) above the cap
                for i, m in enumerate(methods):
                    mrows = quant[quant[label_col] == m]
                    pts = sorted(zip(mrows["bits_total"], mrows[col]))
                    ax.plot([p[0] for p in pts], [min(p[1], top) for p in pts], marker=MARKERS[i % len(MARKERS)],
                            lw=1.6, ms=6, label=m, color=f"C{i}")
                    for b, v in pts:
                        if v > top:  # off the scale: an arrow at the top edge; the value goes in the box
                            ax.plot([b], [top], marker="^", ms=9, color=f"C{i}", clip_on=False)
                            off.append((m, b, v))
                if off:
                    ax.text(0.02, 0.98, "off scale:\n" + "\n".join(f"{m} @ {b:.2f} b: {v:.3g}" for m, b, v in off),
                            transform=ax.transAxes, va="top", ha="left", fontsize=7,
                            bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
                front = pareto_front(list(zip(quant["bits_total"], quant[col])))
                if len(front) > 1:
                    ax.step([p[0] for p in front], [min(p[1], top) for p in front], where="post", color="0.55",
                            lw=1.0, ls=":", label="Pareto front", zorder=0)
                if prefix == "ppl::":
                    for _, r in rows[rows["method"].isin(REFERENCE)].iterrows():
                        ax.axhline(r[col], color="k", ls="--", lw=1.0, label=f"{r['method']} ({r[col]:.2f})")
                ax.set_yscale("log")
                if float(rows[col].max()) > top:
                    ax.set_ylim(top=top * 1.05)
                ds_name, _, seqlen = ds.partition("@")
                ax.set_xlabel("realized bits/weight (total: indices + codebooks + scales + outliers)")
                ax.set_ylabel(f"{what}, {ds_name} @{seqlen} tokens (log scale) ↓")
                ax.set_title(f"{model}: bits vs {what.split(',')[0].split(' (')[0]} ({ds_name} @{seqlen})")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8, loc="upper right")
                fig.tight_layout()
                path = os.path.join(outdir, f"{stem}_{_slug(model)}_{_slug(ds_name)}_{seqlen}.png")
                tmp = f"{path}.tmp-{os.getpid()}.png"
                fig.savefig(tmp)
                plt.close(fig)
                os.replace(tmp, path)
                out[f"{model}/{ds}" if prefix == "ppl::" else f"{model}/kld/{ds}"] = path
    return out
