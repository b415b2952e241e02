"""Static instruction count of the one-token GEMV kernels, compiled for a GPU on any machine.

    PYTHONPATH=. python benchmarks/kernel_sass.py [--arch 90] [--configs 2b-v6k4096,...] [--tiles 8x64x4,...]
        [--out DIR] [--dump]

Needs no GPU: Triton compiles each kernel ahead of time for the target architecture (sm_90 =
H100/H200 by default) with the ptxas it ships, and its cuobjdump disassembles the cubin. For
both one-token kernels, side by side for the same formats and tiles,
    packed   `gemv._vq_gemv1_kernel`: two int32 word loads and a variable funnel shift per index
    planes   `gemv._vq_gemv1p_kernel`: vector loads of the bit planes, constant shifts
it finds the main loop (the innermost backward branch) and counts its SASS instructions per
merged index (loop instructions / indices each thread handles per iteration), split into
classes. Measured on an H200 (docs/benchmarks.md) the packed kernel is bound by instruction issue
and gathers, not by DRAM: fewer instructions per index is the lever, and this is its measure.
It is NOT a throughput measurement: latency, L1 gather bandwidth and occupancy decide the rest
(the tuner in `dispatch.py` times both kernels on the device and keeps the faster one).

The kernels are compiled as the launcher specializes them: pointer arguments 16-byte aligned,
one group, float16 activations and output, no bias, no split.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a GPU launch uses (Triton 3.9 default)

TILES = [(2, 64, 4), (4, 64, 4), (8, 32, 4), (8, 64, 4), (16, 32, 4), (16, 64, 8), (32, 32, 8)]
CLASSES = [  # (label, opcode regex), first match wins
    ("FFMA", r"^FFMA"),
    ("cvt f16->f32", r"^(HADD2\.F32|F2F)"),
    ("global load", r"^LDG"),
    ("shared/barrier", r"^(LDS|STS|LDSM|BAR)"),
    ("int/address/other", r"."),
]


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_cubin(fn, types: Dict[str, str], constexprs: Dict, arch: int, num_warps: int, num_stages: int = 2):
    """Ahead-of-time compile `fn` for sm_<arch>; pointers carry the launcher's 16-byte hint."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**types, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sass_of(cubin: bytes) -> Tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    return sass, res


def main_loop(sass: str) -> List[str]:
    """The instructions of the innermost loop: the shortest [target, branch] span of a backward BRA."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    best = None
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|)(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if best is None or len(body) < len(best):
                best = body
    return best or []


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def classify(body: List[str]) -> Dict[str, int]:
    out = collections.Counter()
    for t in body:
        op = opcode(t)
        for label, rx in CLASSES:
            if re.match(rx, op):
                out[label] += 1
                break
    return out


def measure(kind: str, fmt: dict, tile: Tuple[int, int, int], arch: int, dump: bool = False, tokens: int = 1) -> dict:
    import importlib

    from vptq.kernels.layout import bits_for, next_pow2

    G = importlib.import_module("vptq.kernels.gemv")  # the package re-exports a function named gemv

    v, k, kr = fmt["v"], fmt["k"], fmt["k_res"]
    R, C, w = tile
    if tokens > 1:  # the tile the launcher runs: shrunk to fit one accumulator per token
        R, C = G.tile({"BLOCK_R": R, "BLOCK_C": C, "num_warps": w}, tokens, next_pow2(v))[:2]
    ib, rb = bits_for(k), bits_for(kr) if kr else 0
    ce = dict(V=v, VP=next_pow2(v), TB=ib + rb, IB=ib, RB=rb, ONE_GROUP=True, BLOCK_R=R, BLOCK_C=C,
              ATOMIC=False, HAS_BIAS=False, HAS_C=False, BF16_BITS=False)
    ptrs = {"x_ptr": "*fp16", "y_ptr": "*fp16", "cb_ptr": "*fp16", "rcb_ptr": "*fp16", "bias_ptr": "*fp16",
            "c_ptr": "*fp32"}
    if kind == "packed" and tokens == 1:
        fn = G._vq_gemv1_kernel
        ptrs["packed_ptr"] = "*i32"
    elif kind == "packed":  # 2-4 tokens: the elementwise path of the 2-16-token kernel
        fn = G._vq_gemvn_kernel
        ptrs["packed_ptr"] = "*i32"
        ce.update(BP=tokens, USE_DOT=False, DOT_PRECISION="tf32")
    else:
        fn = G._vq_gemvp_kernel
        ptrs["planes_ptr"] = "*u8"
        ce.update(BP=tokens)
    types = {n: ptrs[n] if n in ptrs else "i32" for n in fn.arg_names if n not in ce}
    c = compile_cubin(fn, types, ce, arch, w)
    sass, res = sass_of(c.asm["cubin"])
    body = main_loop(sass)
    per_thread = R * C / (32 * w)  # merged indices each thread handles per loop iteration
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", res)
    row = {"kernel": kind, "tokens": tokens, "tile": f"R{R} C{C} w{w}", "loop": len(body), "idx_per_thread": per_thread,
           "per_index": len(body) / per_thread if per_thread else float("nan"),
           "regs": int(m.group(1)) if m else None, "spill": int(m.group(2)) + int(m.group(3)) if m else None,
           "classes": {k2: v2 / per_thread for k2, v2 in classify(body).items()}}
    if dump:
        row["sass"] = body
    return row


def main(argv=None) -> int:
    from benchmarks.kernel_bench import FORMATS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100/H200)")
    ap.add_argument("--configs", default=",".join(FORMATS))
    ap.add_argument("--tiles", default=",".join(f"{r}x{c}x{w}" for r, c, w in TILES), help="RxCxWARPS,...")
    ap.add_argument("--tokens", default="1", help="1-4 (2-4: the elementwise multi-token kernels)")
    ap.add_argument("--out", default=None, help="write kernel_sass.json / .md here")
    ap.add_argument("--dump", action="store_true", help="also keep the loop's SASS in the json")
    a = ap.parse_args(argv)
    tiles = [tuple(int(x) for x in t.split("x")) for t in a.tiles.split(",")]
    import triton

    rows = []
    head = (f"| format | tokens | tile | packed: instr/index | planes: instr/index | packed / planes | "
            f"planes: FFMA, cvt, global loads, shared+bar, int/other per index | regs packed/planes |")
    lines = [f"sm_{a.arch}, Triton {triton.__version__}, one group, fp16 x, no bias, no split", "", head,
             "|---|---|---|---:|---:|---:|---|---|"]
    print("\n".join(lines), flush=True)
    seen = set()
    for name, T, tile in [(n, int(t), ti) for n in a.configs.split(",") for t in a.tokens.split(",") for ti in tiles]:
        pk = measure("packed", FORMATS[name], tile, a.arch, a.dump, T)
        if (name, T, pk["tile"]) in seen:  # several tiles shrink to the same launch for 2-4 tokens
            continue
        seen.add((name, T, pk["tile"]))
        pl = measure("planes", FORMATS[name], tile, a.arch, a.dump, T)
        rows += [{"format": name, **pk}, {"format": name, **pl}]
        cl = pl["classes"]
        parts = ", ".join(f"{cl.get(k, 0):.1f}" for k, _ in CLASSES)
        spill = "" if not (pk["spill"] or pl["spill"]) else f" (spill {pk['spill']}/{pl['spill']} B)"
        line = (f"| {name} | {T} | {pk['tile']} | {pk['per_index']:.1f} | {pl['per_index']:.1f} | "
                f"{pk['per_index'] / pl['per_index']:.2f}x | {parts} | {pk['regs']}/{pl['regs']}{spill} |")
        lines.append(line)
        print(line, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "kernel_sass.json"), "w") as f:
            json.dump({"arch": a.arch, "triton": triton.__version__, "rows": rows}, f, indent=1)
        with open(os.path.join(a.out, "kernel_sass.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
