"""Published numbers beside ours: `analysis/papers.csv` holds results from the papers (VPTQ, GPTVQ,
AQLM, QuIP#, GPTQ), one row per number with its paper, arXiv id and table; `attach_papers` puts the
matching published value and our difference to it beside a results table's perplexity columns.

A published row matches one of ours only when all of these agree: model (our config name), method
(only our `reference` variant stands for the published algorithm; an improved variant never
matches), bits (the paper's stated bits within `BITS_MATCH` of our target), dataset, evaluation
seqlen, and finetuning (none / layer / e2e: the VPTQ paper's non-finetuned rows are kept apart
from its finetuned headline). Where several papers print a number for the key, the method's own
paper wins (its latest version); where distinct values still remain (GPTVQ's 2D and 4D rows at
the same bits), nothing is shown. Everything else (calibration, protocol details) may still
differ: the paper's own protocol holds for its number.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import pandas as pd

PAPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "papers.csv")
COLUMNS = ["model", "method", "bits", "dataset", "seqlen", "finetuned", "value", "metric", "paper", "arxiv",
           "table", "note"]
BITS_MATCH = 0.1


# a method's own paper: where several papers print a number for the same key, the method's own wins
OWN_PAPER = {"vptq": "VPTQ", "aqlm": "AQLM", "gptvq": "GPTVQ", "quip#": "QuIP#", "gptq": "GPTQ"}


def load_papers(path: Optional[str] = None) -> pd.DataFrame:
    path = path or PAPERS
    if not os.path.isfile(path):
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df["bits"] = pd.to_numeric(df["bits"], errors="coerce")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["seqlen"] = pd.to_numeric(df["seqlen"], errors="coerce")  # empty: not stated (never matches)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {', '.join(COLUMNS)}")
    return df


def _match(papers: pd.DataFrame, model, method, bits, dataset, seqlen, finetune) -> Optional[pd.Series]:
    if bits is None or (isinstance(bits, float) and math.isnan(bits)):
        return None
    m = papers[(papers["model"] == model) & (papers["method"] == method) & (papers["dataset"] == dataset)
               & (papers["metric"] == "ppl") & (papers["finetuned"] == (finetune or "none"))
               & ((papers["bits"] - float(bits)).abs() <= BITS_MATCH + 1e-9)]
    m = m[m["seqlen"] == float(seqlen)]
    own = OWN_PAPER.get(method)
    if own is not None:
        mine = m[m["paper"].str.startswith(own) & ~m["paper"].str.contains("early")]
        m = mine if not mine.empty else m
    if m.empty:
        return None
    d = (m["bits"] - float(bits)).abs()
    m = m[d == d.min()]
    if m["value"].nunique() > 1:  # e.g. GPTVQ 2D and 4D at the same bits: no single published number
        return None
    return m.iloc[0]


def attach_papers(table: pd.DataFrame, papers: pd.DataFrame) -> pd.DataFrame:
    """Adds, for every perplexity column ppl::<ds>@<seqlen> with a match, paper::<ds>@<seqlen> (the
    published value), vs_paper::<ds>@<seqlen> (ours minus theirs) and paper_src::<ds>@<seqlen>."""
    if table.empty or papers.empty:
        return table
    table = table.copy()
    for col in [c for c in table.columns if c.startswith("ppl::") and not c.endswith("::std")]:
        ds, _, seqlen = col[5:].partition("@")
        vals, srcs = [], []
        for _, r in table.iterrows():
            variant = r.get("variant")
            ours = r["method"] if variant in (None, "reference") or (isinstance(variant, float) and math.isnan(variant)) \
                else None
            bits = 16.0 if r["method"] == "fp16" else r.get("bits_target")  # the unquantized reference
            hit = _match(papers, r["model"], ours, bits, ds, seqlen, r.get("finetune")) if ours else None
            vals.append(None if hit is None else float(hit["value"]))
            srcs.append(None if hit is None else f"{hit['paper']}, {hit['table']} ({hit['bits']:g} b)")
        if any(v is not None for v in vals):
            table[f"paper::{col[5:]}"] = vals
            table[f"vs_paper::{col[5:]}"] = [None if p is None else float(o) - p for o, p in zip(table[col], vals)]
            table[f"paper_src::{col[5:]}"] = srcs
    return table
