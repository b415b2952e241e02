"""Measure the per-layer cost model the planner (runners/plan.py) scales to a target model.

Owns: the measurement of what one decoder block's quantization costs on THIS machine, through the
real driver (`runners.driver.quantize_model` on one-block Llama-shaped models built in code), the
least-squares fit of that cost as a function of the layer shape and the method's layer plan, and
the JSON the planner reads (runners/cost_model.json: coefficients, raw samples, machine, date, load).

What is measured, per method, at the planner's default bits (2) on Llama-shaped blocks of several
widths (hidden 64 ... 1024):
  * time of each linear as the driver records it (`QuantStats.layers[*].time_s`: the per-layer
    quantization on one CPU thread, vptq/threads.py, plus the driver's dequantize-and-check step),
    the minimum over `--repeats` runs;
  * time of the block passes (the Hessian pass, the quantized block's forward pass, block
    finetuning where the method does it), each timed around the driver's own function; the whole
    process runs on one thread here (torch's threads collapse on this shared 2-core machine, see
    vptq/threads.py), where a run gives the block passes every thread;
  * memory, from the CPU allocator's own allocation events (torch.profiler, profile_memory): every
    byte torch allocates and frees, in order, C++ temporaries included; the same quantity as a
    GPU's `max_memory_allocated` (tensor bytes, no allocator caching). Phases are delimited by
    marker allocations of unique sizes around the driver's steps (collect_hessians, run_block,
    quantize_layer, finetune_block), so each transient is read where the driver incurs it:
      ws     peak inside quantize_layer above the level at its start (the method's working set),
      check  peak between quantize_layer's return and the next step, above the level at the return
             (the driver's dequantize, relative error and proxy-loss checks),
      fwd    peak inside a block pass above its start (one window's forward),
      ft     peak inside finetune_block above its start.

Fit: every quantity is a non-negative combination of the features runners/plan.py defines
(`time_features`, `memory_features`: products of out, in and the plan's codebook sizes); the
planner evaluates the same features on the target's shapes. Extrapolating from hidden <= 1024 to
hidden 8192-16384 is an estimate, and a CPU is not a GPU: the planner says both.

    .venv/bin/python benchmarks/cost_model.py [--methods rtn,gptq,gptvq,aqlm,vptq] [--repeats 2]
        [--widths 64,128,256,576,1024] [--out runners/cost_model.json]

Timings are only comparable on a quiet machine: the load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from runners.plan import (Architecture, _plan_str, act_features, codebook_dims, memory_features,  # noqa: E402
                          pass_features, time_features)

# Llama-shaped blocks (hidden, intermediate, heads, KV heads): the shapes the fit sees
SHAPES = {64: (64, 160, 4, 2), 128: (128, 352, 4, 2), 256: (256, 704, 4, 2), 384: (384, 1024, 6, 2),
          576: (576, 1536, 9, 3), 768: (768, 2048, 12, 4), 1024: (1024, 2816, 8, 2)}
MARK = 7_340_033  # marker allocations are MARK + code bytes (code < 4096): no real tensor has these sizes
_PHASES = ("hess", "fwd", "layer", "ft")


# ------------------------------------------------------------------------------------- allocations
@contextlib.contextmanager
def allocation_trace():
    """Record every CPU allocation and free torch makes inside the block: yields a list that holds,
    on exit, (time_ns, bytes) events in order (frees negative). Frees of memory allocated before the
    block are not reported (the profiler does not know their size)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    events: List[Tuple[int, int]] = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield events
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    seq = 0
    out = []
    while stack:
        n = stack.pop()
        if n.tag == _EventType.Allocation:
            out.append((n.start_time_ns, seq, int(n.extra_fields.alloc_size)))
            seq += 1
        stack.extend(n.children)
    out.sort()
    events.extend((t, b) for t, _, b in out)


def peak_live_bytes(events) -> int:
    """Largest sum of bytes allocated and not yet freed, over the events."""
    cur = peak = 0
    for _, b in events:
        if _is_marker(b):
            continue
        cur += b
        peak = max(peak, cur)
    return peak


def _is_marker(b: int) -> bool:
    return MARK <= abs(b) < MARK + 4096


def _mark(code: int) -> None:
    t = torch.empty(MARK + code, dtype=torch.uint8)
    del t


@contextlib.contextmanager
def driver_steps(method, mode: str, times: Optional[Dict[str, float]] = None):
    """Wrap the driver's steps (collect_hessians, run_block, quantize_layer, finetune_block) in this
    process only, for measuring. mode="mark": a marker allocation at each step's start and end
    (code = 8 * index + 2 * phase + 0|1); mode="time": add each step's wall time to times[phase]."""
    import runners.driver as D

    depth = {"n": 0}
    count = {p: 0 for p in _PHASES}

    def wrap(fn, phase):
        pi = _PHASES.index(phase)

        def inner(*a, **k):
            if depth["n"]:  # run_block inside collect_hessians belongs to the Hessian step
                return fn(*a, **k)
            i = count[phase] % 512
            count[phase] += 1
            depth["n"] += 1
            t0 = time.perf_counter()
            if mode == "mark":
                _mark(8 * i + 2 * pi)
            try:
                return fn(*a, **k)
            finally:
                if mode == "mark":
                    _mark(8 * i + 2 * pi + 1)
                else:
                    times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0
                depth["n"] -= 1
        return inner

    saved = (D.collect_hessians, D.run_block)
    D.collect_hessians = wrap(D.collect_hessians, "hess")
    D.run_block = wrap(D.run_block, "fwd")
    method.quantize_layer = wrap(method.quantize_layer, "layer")
    method.finetune_block = wrap(method.finetune_block, "ft")
    try:
        yield
    finally:
        D.collect_hessians, D.run_block = saved
        del method.quantize_layer, method.finetune_block


def phases(events) -> List[Dict]:
    """Marker-delimited phases: [{phase, start_level, peak, end_level, gap_peak}] in order; gap_peak is
    the peak between this phase's end and the next phase's start (the driver's code in between)."""
    cur = 0
    out: List[Dict] = []
    open_ = None
    for _, b in events:
        if _is_marker(b):
            if b < 0:
                continue
            code = b - MARK
            phase, end = _PHASES[(code % 8) // 2], code % 2
            if not end:
                open_ = {"phase": phase, "start_level": cur, "peak": cur}
            else:
                open_["end_level"] = cur
                open_["gap_peak"] = cur
                out.append(open_)
                open_ = None
            continue
        cur += b
        if open_ is not None:
            open_["peak"] = max(open_["peak"], cur)
        elif out:
            out[-1]["gap_peak"] = max(out[-1]["gap_peak"], cur)
    return out


# ------------------------------------------------------------------------------------- the block
def first_block_job(model, method, *, calib, protocol: str, device="cpu") -> Dict:
    """Quantize `model` with the real driver and measure its first block job: the calibration
    capture and block 0 (Hessians, every linear, finetuning, the next inputs), up to the end of
    block 0. -> {"stats", "peak_bytes": the peak of torch's live allocations in that span plus the
    block's float weights (allocated before, resident throughout), "block_weight_bytes"}. That is
    the quantity runners/plan.py predicts for a block job (on a GPU: max_memory_allocated)."""
    from runners.arch import arch_of, blocks_of
    from runners.driver import quantize_model

    block = blocks_of(model, arch_of(model))[0]
    wbytes = sum(t.numel() * t.element_size() for t in block.parameters())
    ends = {"n": 0}

    def on_block(_rec):
        if ends["n"] == 0:
            _mark(4095)
        ends["n"] += 1

    with allocation_trace() as ev:
        stats = quantize_model(model, method, calib=calib, device=device, protocol=protocol, checkpoint_dir=None,
                               on_block=on_block)
    first = next((i for i, (_, b) in enumerate(ev) if b == MARK + 4095), len(ev))
    return {"stats": stats, "peak_bytes": peak_live_bytes(ev[:first]) + wbytes, "block_weight_bytes": wbytes}


def one_block_model(hidden: int, inter: int, heads: int, kv: int, seed: int = 0):
    from runners.models import tiny_model
    from runners.schema import ModelConfig, TinyModelConfig

    t = TinyModelConfig(arch="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                        num_attention_heads=heads, num_key_value_heads=kv, init_seed=seed)
    model, _ = tiny_model(ModelConfig(name="cost", source="tiny", tiny=t))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure_block(method_name: str, hidden: int, inter: int, heads: int, kv: int, *, bits: float,
                  nsamples: int, seqlen: int, repeats: int, memory: bool = True) -> Dict:
    """Quantize one Llama-shaped block with the real driver: per-layer times and block-pass times
    (minimum over repeats), and (memory=True) each step's transient bytes."""
    from runners.driver import quantize_model
    from vptq.methods import build_method, method_class

    calib = torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))

    def method():
        return build_method(method_name, method_class(method_name).Config(), bits=bits, seed=0)

    layers: Dict[int, Dict] = {}
    passes: Dict[str, float] = {}
    settings = None
    for _ in range(repeats):
        m, times = method(), {}
        model = one_block_model(hidden, inter, heads, kv)
        with driver_steps(m, "time", times):
            st = quantize_model(model, m, calib=calib, device="cpu", protocol="quantized", checkpoint_dir=None)
        settings = m.settings(None)
        for j, rec in enumerate(st.layers):
            shape = tuple(rec["shape"])
            if j not in layers or rec["time_s"] < layers[j]["time_s"]:
                layers[j] = {"name": rec["name"].split(".", 1)[1], "shape": list(shape), "time_s": rec["time_s"],
                             "plan": _plan_str(m.layer_plan(*shape))}
                layers[j]["K"], layers[j]["dim"] = codebook_dims(m.name, m.layer_plan(*shape))
        for k in ("hess", "fwd", "ft"):
            if k in times and (k != "ft" or m.uses_float_outputs):
                passes[k] = min(passes.get(k, math.inf), times[k])
    out = {"method": method_name, "bits": bits, "block": [hidden, inter, heads, kv], "nsamples": nsamples,
           "seqlen": seqlen,
           "settings": json.loads(json.dumps(settings, default=str)),
           "layers": [layers[j] for j in sorted(layers)], "passes_s": passes}
    if memory:
        m = method()
        model = one_block_model(hidden, inter, heads, kv)
        with driver_steps(m, "mark"), allocation_trace() as ev:
            quantize_model(model, m, calib=calib, device="cpu", protocol="quantized", checkpoint_dir=None)
        ph = phases(ev)
        for rec, p in zip(out["layers"], [p for p in ph if p["phase"] == "layer"]):
            rec["ws_bytes"] = p["peak"] - p["start_level"]
            rec["check_bytes"] = p["gap_peak"] - p["end_level"]
            rec["kept_bytes"] = p["end_level"] - p["start_level"]  # the quantized weight as held in memory
        for name in ("hess", "fwd", "ft"):
            got = [p["peak"] - p["start_level"] for p in ph if p["phase"] == name]
            if got:
                out[f"{name}_bytes"] = max(got)
        out["peak_bytes"] = peak_live_bytes(ev)
    return out


# ------------------------------------------------------------------------------------- fit
TIME_FEATURES = list(time_features(1, 1, 1, 1))
MEMORY_FEATURES = list(memory_features(1, 1, 1, 1))
HESS_TIME = ["tok_P", "tok_H", "tok_L_q", "one"]
PASS_TIME = ["tok_P", "win_P", "tok_L_q", "one"]
ACT_BYTES = list(act_features(1, Architecture("llama", 1, 1, 1, 1, 1, 1, 1, False), 1))


def nnls_relative(rows: List[Dict[str, float]], y: List[float], names: List[str]) -> Optional[Dict]:
    """Non-negative least squares on relative errors: min Σ ((A c - y) / y)², c >= 0.
    -> {"coef": {feature: c}, "max_rel_err", "median_rel_err", "n"} or None without samples."""
    import numpy as np
    from scipy.optimize import nnls

    keep = [(r, v) for r, v in zip(rows, y) if v > 0]
    if not keep:
        return None
    A = np.array([[r[k] for k in names] for r, _ in keep], dtype=float)
    yv = np.array([v for _, v in keep], dtype=float)
    Aw = A / yv[:, None]
    scale = np.abs(Aw).max(0)
    scale[scale == 0] = 1.0
    x, _ = nnls(Aw / scale, np.ones(len(yv)), maxiter=50 * len(names))
    coef = x / scale
    rel = np.abs(A @ coef - yv) / yv
    return {"coef": {k: float(c) for k, c in zip(names, coef) if c > 0}, "max_rel_err": float(rel.max()),
            "median_rel_err": float(np.median(rel)), "n": len(yv)}


def _arch(block) -> Architecture:
    h, i, heads, kv = block
    return Architecture("llama", h, i, 1, heads, kv, h // heads, 260, False)


def fit(raw: Dict) -> Dict:
    """Raw samples -> the cost model runners/plan.py evaluates (one fit per method and quantity)."""
    methods: Dict[str, Dict] = {}
    for name in dict.fromkeys(s["method"] for s in raw["samples"]):
        S = [s for s in raw["samples"] if s["method"] == name]
        lay = [(l, s) for s in S for l in s["layers"]]
        tf = [time_features(*l["shape"], l["K"], l["dim"]) for l, _ in lay]
        mf = [memory_features(*l["shape"], l["K"], l["dim"]) for l, _ in lay]
        pf = [pass_features(s["nsamples"] * s["seqlen"], s["seqlen"], _arch(s["block"])) for s in S]
        af = [act_features(s["seqlen"], _arch(s["block"]), max(l["shape"][0] * l["shape"][1] for l in s["layers"]))
              for s in S]
        m = {"settings": S[0]["settings"],
             "layer_time": nnls_relative(tf, [l["time_s"] for l, _ in lay], TIME_FEATURES),
             "layer_ws": nnls_relative(mf, [l.get("ws_bytes", 0) for l, _ in lay], MEMORY_FEATURES),
             "layer_check": nnls_relative(mf, [l.get("check_bytes", 0) for l, _ in lay], MEMORY_FEATURES),
             "layer_kept": nnls_relative(mf, [l.get("kept_bytes", 0) for l, _ in lay], MEMORY_FEATURES),
             "hess_time": nnls_relative(pf, [s["passes_s"].get("hess", 0) for s in S], HESS_TIME),
             "fwd_time": nnls_relative(pf, [s["passes_s"].get("fwd", 0) for s in S], PASS_TIME),
             "ft_time": nnls_relative(pf, [s["passes_s"].get("ft", 0) for s in S], PASS_TIME),
             "fwd_bytes": nnls_relative(af, [s.get("fwd_bytes", 0) for s in S], ACT_BYTES),
             "ft_bytes": nnls_relative(af, [s.get("ft_bytes", 0) for s in S], ACT_BYTES)}
        quality = {k: {q: v[q] for q in ("max_rel_err", "median_rel_err", "n")} for k, v in m.items()
                   if isinstance(v, dict) and "coef" in v}
        methods[name] = {k: (v["coef"] if isinstance(v, dict) and "coef" in v else v) for k, v in m.items()}
        methods[name]["fit_quality"] = quality
    return {"format": 1, "about": "per-layer cost model of quantization on one CPU thread, measured by "
            "benchmarks/cost_model.py through runners/driver.py; evaluated by runners/plan.py (estimates)",
            "measured": raw["measured"], "runs": raw.get("runs", [raw["measured"]]),
            "features": {"layer_time": TIME_FEATURES, "layer_ws": MEMORY_FEATURES, "layer_check": MEMORY_FEATURES,
                         "hess_time": HESS_TIME, "fwd_time": PASS_TIME, "ft_time": PASS_TIME,
                         "fwd_bytes": ACT_BYTES, "ft_bytes": ACT_BYTES},
            "methods": methods, "samples": raw["samples"]}


# ------------------------------------------------------------------------------------- main
def machine() -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": {"quantize_layer": 1, "block_passes": torch.get_num_threads()}}


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="rtn,gptq,gptvq,aqlm,vptq")
    ap.add_argument("--widths", default="64,128,256,576,1024", help=f"hidden sizes, of {sorted(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bits", default="2", help="bits budgets to measure at, e.g. 2,3 (larger codebooks at 3)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--raw", default=None, help="also write the raw samples here")
    ap.add_argument("--out", default=os.path.join(REPO, "runners", "cost_model.json"))
    ap.add_argument("--samples", default=None, help="fit these raw samples (a --raw file) instead of measuring")
    ap.add_argument("--append", default=None, help="measure, then fit together with the samples of this --raw file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # block passes too: on a shared 2-core machine threads collapse (vptq/threads.py)
    if a.samples:
        with open(a.samples) as f:
            raw = json.load(f)
    else:
        command = " ".join(["benchmarks/cost_model.py", *(sys.argv[1:] if argv is None else argv)])
        run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "git": git_commit(), "load_avg_before": list(os.getloadavg()),
               "bits": [float(b) for b in a.bits.split(",")], "calib": {"nsamples": a.nsamples, "seqlen": a.seqlen},
               "repeats": a.repeats, "command": command}
        raw = {"measured": run, "runs": [run], "samples": []}
        if a.append:
            with open(a.append) as f:
                old = json.load(f)
            raw["runs"] = old.get("runs", [old["measured"]]) + [run]
            raw["measured"] = raw["runs"][0]
            raw["samples"] = old["samples"]
        t0 = time.perf_counter()
        todo = [(float(b), n, int(x)) for b in a.bits.split(",") for n in a.methods.split(",")
                for x in a.widths.split(",")]
        for bits, name, w in todo:
            t1 = time.perf_counter()
            rec = measure_block(name, *SHAPES[w], bits=bits, nsamples=a.nsamples, seqlen=a.seqlen, repeats=a.repeats)
            raw["samples"].append(rec)
            print(f"{name} {bits:g} bits, hidden {w}: layers " + ", ".join(
                f"{tuple(r['shape'])} {r['plan']} {r['time_s']:.3f}s" for r in rec["layers"]) + "; passes " +
                ", ".join(f"{k} {v:.3f}s" for k, v in rec["passes_s"].items()) +
                f"; peak {rec['peak_bytes'] / 2**20:.1f} MiB [{time.perf_counter() - t1:.0f} s]", flush=True)
        run["load_avg_after"] = list(os.getloadavg())
        run["wall_s"] = round(time.perf_counter() - t0, 1)
        if a.raw:
            with open(a.raw, "w") as f:
                json.dump(raw, f, indent=1)
    model = fit(raw)
    with open(a.out, "w") as f:
        json.dump(model, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
