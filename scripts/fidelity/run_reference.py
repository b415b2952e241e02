"""Run the authors' released code on the seeded synthetic layer and record its proxy losses.

    python scripts/fidelity/run_reference.py \
        --gptq  /path/to/IST-DASLab/gptq            --gptq-commit  <sha> \
        --gptvq /path/to/Qualcomm-AI-research/gptvq --gptvq-commit <sha> \
        --out tests/data/fidelity_reference.json [--only gptq|gptvq] [--case NAME ...]

Nothing of their code is copied here: each path is a checkout of their repository (e.g. from
`git archive <commit>`), their modules are imported from it, and their own `GPTQ.fasterquant`
runs on the layer of `scripts/fidelity/layer.py` (W, H from a seed). Shims, so that it runs on
a CPU without their GPU stack: a stub `transformers` module holding only `Conv1D` (their files
import it for GPT-2 layers), `torch.cuda.synchronize` as a no-op, stdout (their progress prints)
sent to stderr. Their Hessian accumulator (`add_batch`, 2/n·Σ x xᵀ) is bypassed: `H` is set
directly (every step they take is invariant to the scale of H: relative damping, Adam).

The JSON records their repository and commit, the layer (generator, seed, shape), each case's
exact settings (their command-line names), the proxy loss tr((W−Ŵ) H (W−Ŵ)ᵀ) of the weight
their code leaves in the layer, and that loss relative to tr(W H Wᵀ).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import types
from typing import Any, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer import IN_FEATURES, OUT_FEATURES, TOKENS, proxy_loss, synthetic_layer, weight_energy  # noqa: E402

SEED = 0
THEIR_MODULES = ("quant", "gptq", "vq_quant", "uniform_quantizers", "modelutils")

# IST-DASLab/gptq: llama.py's arguments (asymmetric min-max grid, `--wbits`, `--groupsize`,
# `--act-order`, `--static-groups`; blocksize 128 and percdamp 0.01 are their defaults).
GPTQ_CASES: List[Dict[str, Any]] = [
    {"name": f"gptq_w{b}_{'g128' if g > 0 else 'pc'}_act", "wbits": b, "groupsize": g, "act_order": True,
     "static_groups": g > 0, "sym": False, "blocksize": 128, "percdamp": 0.01}
    for b in (2, 3, 4) for g in (128, -1)
] + [{"name": f"gptq_w{b}_g{g}", "wbits": b, "groupsize": g, "act_order": False, "static_groups": False,
       "sym": False, "blocksize": 128, "percdamp": 0.01} for b, g in ((3, 128), (3, 192), (2, 64))]

# Qualcomm-AI-research/gptvq: the settings of their paper scripts (test_bigtable.sh):
# --columns-per-group 256 --use-vq --kmeans-iters 100 --kmeans-init-method mahalanobis
# --hessian-weighted-lookups --include-m-step [--codebook-bitwidth 8 --quantize-per-codebook]
# [--vq-scaling-blocksize 32|64] [--svd-rank 0.5]; --groupsize = rows x 256 columns per codebook.
_GPTVQ_BASE = {"columns_per_group": 256, "kmeans_iters": 100, "kmeans_init_method": "mahalanobis",
               "hessian_weighted_lookups": True, "include_m_step": True, "codebook_bitwidth": 8,
               "quantize_per_codebook": True, "vq_scaling_blocksize": -1, "vq_scaling_norm": "max",
               "vq_scaling_n_bits": 4, "vq_scaling_domain": "log", "svd_rank": None, "blocksize": 128,
               "percdamp": 0.01, "assignment_chunk_size": None, "quantize_during_kmeans": False}
GPTVQ_CASES: List[Dict[str, Any]] = [
    {**_GPTVQ_BASE, "name": "gptvq_d1_w2_g256", "vq_dim": 1, "wbits": 2, "groupsize": 256},
    {**_GPTVQ_BASE, "name": "gptvq_d2_w2_g2048", "vq_dim": 2, "wbits": 2, "groupsize": 2048},
    {**_GPTVQ_BASE, "name": "gptvq_d4_w2_g32768", "vq_dim": 4, "wbits": 2, "groupsize": 32768},
    {**_GPTVQ_BASE, "name": "gptvq_d2_w3_g8192", "vq_dim": 2, "wbits": 3, "groupsize": 8192},
    {**_GPTVQ_BASE, "name": "gptvq_d1_w2_g512_scale32", "vq_dim": 1, "wbits": 2, "groupsize": 512,
     "vq_scaling_blocksize": 32},
    {**_GPTVQ_BASE, "name": "gptvq_d2_w2_g2048_scale32", "vq_dim": 2, "wbits": 2, "groupsize": 2048,
     "vq_scaling_blocksize": 32},
    {**_GPTVQ_BASE, "name": "gptvq_d1_w2_g256_svd0.5", "vq_dim": 1, "wbits": 2, "groupsize": 256,
     "codebook_bitwidth": None, "quantize_per_codebook": False, "svd_rank": 0.5},
]


def _shims() -> None:
    if "transformers" not in sys.modules:  # their gptq.py only reads transformers.Conv1D
        stub = types.ModuleType("transformers")
        stub.Conv1D = type("Conv1D", (nn.Module,), {})
        sys.modules["transformers"] = stub
    torch.cuda.synchronize = lambda *a, **k: None


def _import_their(path: str) -> Dict[str, types.ModuleType]:
    """Their modules, imported from `path` (any earlier import of the same names dropped)."""
    for m in THEIR_MODULES:
        sys.modules.pop(m, None)
    sys.path.insert(0, os.path.abspath(path))
    try:
        import importlib

        mods = {m: importlib.import_module(m) for m in ("quant", "gptq")}
        if os.path.isfile(os.path.join(path, "vq_quant.py")):
            mods["vq_quant"] = importlib.import_module("vq_quant")
        return mods
    finally:
        sys.path.pop(0)


def _layer(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    return lin


def run_gptq(mods, W, H, case) -> torch.Tensor:
    lin = _layer(W)
    g = mods["gptq"].GPTQ(lin)
    g.H = H.clone()
    g.quantizer = mods["quant"].Quantizer()
    g.quantizer.configure(case["wbits"], perchannel=True, sym=case["sym"], mse=False)
    with contextlib.redirect_stdout(sys.stderr):
        g.fasterquant(blocksize=case["blocksize"], percdamp=case["percdamp"], groupsize=case["groupsize"],
                      actorder=case["act_order"], static_groups=case["static_groups"])
    return lin.weight.data.clone()


def run_gptvq(mods, W, H, case) -> torch.Tensor:
    lin = _layer(W)
    g = mods["gptq"].GPTQ(lin)
    g.H = H.clone()
    g.quantizer = mods["vq_quant"].VQQuantizer(
        vq_dim=case["vq_dim"], columns_per_group=case["columns_per_group"],
        vq_scaling_blocksize=case["vq_scaling_blocksize"], vq_scaling_norm=case["vq_scaling_norm"],
        vq_scaling_n_bits=case["vq_scaling_n_bits"], vq_scaling_domain=case["vq_scaling_domain"],
        kmeans_init_method=case["kmeans_init_method"], assignment_chunk_size=case["assignment_chunk_size"],
        kmeans_iters=case["kmeans_iters"], codebook_bitwidth=case["codebook_bitwidth"],
        quantize_per_codebook=case["quantize_per_codebook"], quantize_during_kmeans=case["quantize_during_kmeans"])
    g.quantizer.configure(case["wbits"], perchannel=True, sym=False, mse=False)
    with contextlib.redirect_stdout(sys.stderr):
        g.fasterquant(blocksize=case["blocksize"], percdamp=case["percdamp"], groupsize=case["groupsize"],
                      actorder=False, static_groups=False, include_m_step=case["include_m_step"], use_vq=True,
                      svd_rank=case["svd_rank"], hessian_weighted_lookups=case["hessian_weighted_lookups"],
                      only_init_kmeans=False)
    return lin.weight.data.clone()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gptq", help="checkout of IST-DASLab/gptq")
    ap.add_argument("--gptq-commit", default="unknown")
    ap.add_argument("--gptvq", help="checkout of Qualcomm-AI-research/gptvq")
    ap.add_argument("--gptvq-commit", default="unknown")
    ap.add_argument("--case", action="append", help="run only these cases (default: all)")
    ap.add_argument("--out", required=True, help="JSON to write (cases already there are kept unless rerun)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _shims()
    W, H = synthetic_layer(SEED)
    energy = weight_energy(W, H)
    old = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            old = json.load(f)
    refs = dict(old.get("references", {}))
    cases = {c["name"]: c for c in old.get("cases", [])}
    plan = []
    if args.gptq:
        refs["gptq"] = {"repository": "IST-DASLab/gptq", "commit": args.gptq_commit, "files": ["gptq.py", "quant.py"]}
        plan += [("gptq", args.gptq, c, run_gptq) for c in GPTQ_CASES]
    if args.gptvq:
        refs["gptvq"] = {"repository": "Qualcomm-AI-research/gptvq", "commit": args.gptvq_commit,
                         "files": ["gptq.py", "vq_quant.py", "quant.py", "uniform_quantizers.py"]}
        plan += [("gptvq", args.gptvq, c, run_gptvq) for c in GPTVQ_CASES]
    if args.case:
        plan = [p for p in plan if p[2]["name"] in args.case]
    mods_of: Dict[str, Any] = {}
    for method, path, case, fn in plan:
        if method not in mods_of:
            mods_of = {method: _import_their(path)}
        t0 = time.perf_counter()
        Q = fn(mods_of[method], W, H, case)
        dt = time.perf_counter() - t0
        loss = proxy_loss(W, Q, H)
        cases[case["name"]] = {"name": case["name"], "method": method,
                               "settings": {k: v for k, v in case.items() if k != "name"},
                               "proxy_loss": loss, "relative_proxy_loss": loss / energy, "time_s": round(dt, 2)}
        print(f"{case['name']}: proxy loss {loss:.6g} (relative {loss / energy:.6g}) in {dt:.1f} s", file=sys.stderr)
    out = {
        "about": "Proxy losses tr((W-Q) H (W-Q)^T) of the authors' released code on the synthetic layer of "
                 "scripts/fidelity/layer.py, produced by scripts/fidelity/run_reference.py (issue 13).",
        "layer": {"generator": "scripts/fidelity/layer.py:synthetic_layer", "seed": SEED,
                  "shape": [OUT_FEATURES, IN_FEATURES], "tokens": TOKENS, "weight_energy": energy},
        "references": refs,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpu": _cpu_name(), "threads": 1},
        "cases": [cases[k] for k in sorted(cases)],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
