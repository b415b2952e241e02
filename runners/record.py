"""The metrics.json record: defined once, written by the job (runners/job.py) and read by the report
(analysis/collect.py) through the same dataclass.

Format versions: 1 = files written before this module (no `format_version` key), read as far as
they go; 2 = this layout. The contract of DESIGN.md holds for both (keys are added, never renamed):
run_key, model, method, bits {target, index, total}, ppl {<dataset>: float}, qa, time {quantize_s,
eval_s}, memory {peak_rss_gb, peak_gpu_gb}, kernel, env {torch, device, git}, status.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

FORMAT_VERSION = 2


@dataclass
class Bits:
    target: Optional[float] = None  # the requested budget (None: a method that ignores bits)
    index: Optional[float] = None  # per-weight code bits, counted from what is stored
    total: Optional[float] = None  # everything stored for the quantized linears / their weight count
    components: Dict[str, float] = field(default_factory=dict)  # bits/weight per stored component
    quantized_params: Optional[int] = None


@dataclass
class Timing:
    quantize_s: float = 0.0  # layer-by-layer quantization (calibration passes included)
    eval_s: float = 0.0  # perplexity (+ distribution metrics) + QA
    load_s: Optional[float] = None
    ppl_s: Optional[float] = None  # the quantized model's scoring pass(es)
    qa_s: Optional[float] = None
    reference_s: Optional[float] = None  # the float reference (computed, or read from the cache)
    finetune_s: Optional[float] = None
    audit_s: Optional[float] = None
    per_block_s: List[float] = field(default_factory=list)
    # CPU cores that OTHER processes kept busy, on average, while this job quantized (the machine's busy
    # time from /proc/stat less this process's own; Linux only, else None): about 0 for a quiet timing
    other_cpu_cores: Optional[float] = None


@dataclass
class Memory:
    peak_rss_gb: Optional[float] = None
    quantize_peak_rss_gb: Optional[float] = None
    base_rss_gb: Optional[float] = None
    peak_rss_scope: Optional[str] = None
    peak_gpu_gb: Optional[float] = None


@dataclass
class Comparison:
    """What decides whether two rows may be compared (DESIGN.md: the fair-comparison fields)."""

    calibration: Optional[Dict[str, Any]] = None  # {"data", "windows", "seqlen", "tokens"}; None: no data used
    hessian_protocol: Optional[str] = None  # quantized | float | None
    finetune: str = "none"  # none | layer | e2e
    variant: Optional[str] = None  # the method's variant (reference = the authors' algorithm)
    iters: Optional[str] = None  # iteration preset (cpu | paper)
    eval: Dict[str, Dict[str, int]] = field(default_factory=dict)  # {ds: {"windows", "seqlen", "tokens"}}


_NESTED = {"bits": Bits, "time": Timing, "memory": Memory, "comparison": Comparison}


@dataclass
class RunRecord:
    run_key: str
    model: str
    method: str
    status: str = "ok"  # ok | failed
    config_key: Optional[str] = None  # run_key without the seed: runs sharing it differ only in the seed
    bits: Bits = field(default_factory=Bits)
    settings: Dict[str, Any] = field(default_factory=dict)
    ppl: Dict[str, float] = field(default_factory=dict)
    ppl_ci: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # {ds: {low, high, level, point, method}}
    kld: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # {ds: runners.ppl.kld_summary + reference}
    qa: Dict[str, Any] = field(default_factory=dict)
    eval: Dict[str, Any] = field(default_factory=dict)
    calib: Optional[Dict[str, Any]] = None
    hessian_protocol: Optional[str] = None
    comparison: Comparison = field(default_factory=Comparison)
    time: Timing = field(default_factory=Timing)
    memory: Memory = field(default_factory=Memory)
    kernel: Dict[str, Any] = field(default_factory=dict)
    env: Dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = None
    codes_sha256: Optional[str] = None
    audit: Optional[Dict[str, Any]] = None
    parallel: Optional[Dict[str, Any]] = None
    # what quantization cost: block_forwards (passes of a block over the calibration set), hessian_bytes_
    # written/read (capture cache), stages_s {capture, quantize, assemble, evaluate} where they apply
    cost: Optional[Dict[str, Any]] = None
    finetune: Optional[Dict[str, Any]] = None  # end-to-end finetuning record, when it ran
    error: Optional[str] = None
    traceback: Optional[str] = None
    reused_from: Optional[str] = None
    format_version: int = FORMAT_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as they were

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        if self.status != "ok":  # a failed job: what it was and why, nothing measured
            keep = ("run_key", "config_key", "model", "method", "bits", "status", "error", "traceback",
                    "format_version", "seed")
            d = {k: v for k, v in d.items() if k in keep}
        return {**{k: v for k, v in d.items() if v is not None or k in ("codes_sha256",)}, **extra}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunRecord":
        """Any version's metrics.json -> a RunRecord (missing sections get their defaults; unknown
        keys are kept in `extra`)."""
        names = {f.name for f in fields(cls)}
        kw, extra = {}, {}
        for k, v in d.items():
            if k in _NESTED and isinstance(v, dict):
                sub = _NESTED[k]
                subnames = {f.name for f in fields(sub)}
                kw[k] = sub(**{a: b for a, b in v.items() if a in subnames})
            elif k in names and k != "extra":
                kw[k] = v
            else:
                extra[k] = v
        kw.setdefault("format_version", 1 if "format_version" not in d else d["format_version"])
        for req in ("run_key", "model", "method"):
            kw.setdefault(req, None)
        return cls(**kw, extra=extra)
