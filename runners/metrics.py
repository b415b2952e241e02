"""The `metrics.json` contract (see DESIGN.md), the run key, atomic writes and resume."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import tempfile
import time
import logging
from typing import Any, Dict, Optional, Tuple

from vptq.sysinfo import CACHE_SYSFS, cache_sizes

log = logging.getLogger("vq-bench")
METRICS_FILE = "metrics.json"


def write_json_atomic(path: str, obj: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def semantic_config(cfg: Dict[str, Any], uses_bits: bool = True) -> Dict[str, Any]:
    """The part of the resolved config that changes results (not loggers, folders, saving)."""
    data = dict(cfg["data"])
    if data.get("path"):
        data["path"] = os.path.abspath(os.path.expanduser(data["path"]))
    ev = dict(cfg["eval"])
    ev.pop("kld_cache", None)  # where the float reference is cached does not change results
    model = dict(cfg["model"])
    model.pop("arch", None)  # describes the weights, changes no result (the planner reads it)
    if model.get("source") != "tiny":
        model.pop("tiny", None)
    return {
        "model": model,
        "method": cfg["method"],
        "bits": cfg["bits"] if uses_bits else None,
        "data": data,
        "calib": cfg["calib"],
        "eval": ev,
        "kernel": cfg["kernel"],
        "hessian_protocol": cfg["hessian"]["protocol"],
        "seed": cfg["seed"],
        # finetuning changes results; absent (not "none") when off, so that earlier run keys still match
        **({"finetune": _finetune_semantic(cfg["finetune"], cfg["calib"])}
           if (cfg.get("finetune") or {}).get("mode", "none") != "none" else {}),
    }


# finetune fields that change memory and time but no result: left out of the run key
RESULT_NEUTRAL_FINETUNE = ("checkpoint",)


def _finetune_semantic(ft: Dict[str, Any], calib: Dict[str, Any]) -> Dict[str, Any]:
    """The finetune group as it runs: null fields take their mode's preset (runners.finetune.PRESETS),
    so that a run key names the learning rate etc. actually used, and a changed preset is a new key."""
    from runners.finetune import with_presets

    # nsamples null (the quantization's calibration windows, already in the key) is left out, so that the
    # keys of runs from before the field existed still match; equal to calib.nsamples it is those same windows
    same = (None, calib.get("nsamples"))
    return with_presets(ft.get("mode"), {k: v for k, v in ft.items() if k not in RESULT_NEUTRAL_FINETUNE
                                         and not (k == "nsamples" and v in same)})


def run_key(semantic: Dict[str, Any]) -> str:
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_key(semantic: Dict[str, Any]) -> str:
    """The run_key of the same config without its seed: runs that share it differ only in the seed
    (the report averages over them)."""
    return run_key({k: v for k, v in semantic.items() if k != "seed"})


def quantization_key(semantic: Dict[str, Any]) -> str:
    """The run_key of what decides the quantized codes only: without the evaluation settings and, under
    finetune=e2e (which trains after the last block is quantized), without the finetuning settings.
    Block checkpoints (runners/checkpoint.py) are kept under it, so jobs that differ only in how they
    evaluate or finetune end to end share their quantized blocks (quantize.keep_checkpoints=true)."""
    q = {k: v for k, v in semantic.items() if k != "eval"}
    if (q.get("finetune") or {}).get("mode") == "e2e":
        q.pop("finetune")
    return "q" + run_key(q)[:15]


def find_finished(root: str, key: str) -> Optional[str]:
    """Path of a metrics.json below `root` with this run_key and status ok, if any."""
    if not root or not os.path.isdir(root):
        return None
    from runners.files import BadFile, read_json

    for p in sorted(glob.glob(os.path.join(root, "**", METRICS_FILE), recursive=True)):
        try:
            m = read_json(p)
        except BadFile as e:
            log.warning("%s (not a finished run; ignored)", e)
            continue
        if not isinstance(m, dict):
            continue
        if m.get("run_key") == key and m.get("status") == "ok":
            return p
    return None


def git_version(repo_dir: str) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_dir, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux, the platform module elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# flags that decide which loops run (torch's dispatch, MKL's kernels, vptq/kernels/csrc/vq_cpu.cpp)
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "asimd", "sve")


CPUINFO = "/proc/cpuinfo"


def cpu_identity(cpuinfo: str = CPUINFO, sysfs: str = CACHE_SYSFS) -> Dict[str, Any]:
    """What tells two CPUs that share a marketing name apart (a cloud VM reports "AMD EPYC" for Zen 3
    and Zen 4 alike, whose L2 differ 2x and whose kernels differ): vendor, family/model/stepping,
    cache sizes, the instruction-set flags that choose loops. Fields are None where the OS does not say."""
    import platform

    info: Dict[str, Any] = {"model": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
                            "vendor": None, "family": None, "model_number": None, "stepping": None,
                            "caches": cache_sizes(sysfs), "flags": []}
    keys = {"vendor_id": "vendor", "cpu family": "family", "model": "model_number", "stepping": "stepping",
            "CPU implementer": "vendor", "CPU part": "model_number", "CPU variant": "stepping"}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k in keys and info[keys[k]] is None:
                    info[keys[k]] = v
                elif k in ("flags", "Features"):
                    have = set(v.split())
                    info["flags"] = [f for f in _ISA_FLAGS if f in have]
    except OSError:
        pass
    return info


def cpu_ident(c: Dict[str, Any], stepping: bool = True) -> str:
    """"family 25 model 17 stepping 1" from a `cpu_identity` dict (recorded ones too: fields it lacks
    are left out); "" when none is known."""
    fields = (("family", "family"), ("model", "model_number")) + ((("stepping", "stepping"),) if stepping else ())
    return " ".join(f"{name} {c[key]}" for name, key in fields if c.get(key) is not None)


def cpu_summary() -> str:
    """One line for a benchmark's header, e.g. "AMD EPYC, 2 logical CPUs (AuthenticAMD family 25 model 17
    stepping 1; L1d 32K, L2 1024K, L3 32768K per instance; avx2 fma f16c avx512f ...)"."""
    c = cpu_identity()
    ident = cpu_ident(c)
    caches = ", ".join(f"{k} {v}" for k, v in c["caches"].items())
    parts = [p for p in (" ".join(x for x in (c["vendor"] or "", ident) if x),
                         f"{caches} per instance" if caches else "", " ".join(c["flags"])) if p]
    return f"{c['model']}, {c['cores']} logical CPUs" + (f" ({'; '.join(parts)})" if parts else "")


def _blas() -> str:
    """The BLAS torch was built with, e.g. "mkl (Intel(R) oneAPI Math Kernel Library Version 2024.2 ...)"."""
    import re

    import torch

    cfg = torch.__config__.show()
    m = re.search(r"BLAS_INFO=([^,\s]+)", cfg)
    name = m.group(1) if m else "unknown"
    lib = next((ln.strip(" -") for ln in cfg.splitlines() if "Math Kernel Library" in ln or "OpenBLAS" in ln), "")
    return f"{name} ({lib})" if lib else name


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for pkg in ("torch", "transformers", "lm-eval", "datasets", "triton", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _gpu(device) -> Optional[Dict[str, Any]]:
    import torch

    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return None
    d = torch.device(device)
    props = torch.cuda.get_device_properties(d)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                                 str(d.index or 0)], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"name": torch.cuda.get_device_name(d), "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 1024**3, 1), "driver": driver, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def env_info(device) -> Dict[str, Any]:
    """What decides whether a result reproduces bit for bit: the device, CPU model and instruction set
    torch dispatches to, the BLAS, thread counts, GPU and driver, library versions, the TF32 and
    deterministic-algorithm flags, and the code version. `torch`, `device` and `git` are the keys
    older metrics.json files have."""
    import platform

    import torch

    dev = str(device)
    gpu = _gpu(device)
    if gpu:
        dev = f"{dev} ({gpu['name']})"
    else:
        dev = f"cpu ({_cpu_model()}, {os.cpu_count()} cores)"
    return {
        "torch": torch.__version__, "device": dev,
        "git": git_version(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "code": _code_version(),
        "cpu": {**cpu_identity(), "isa": torch.backends.cpu.get_cpu_capability()},
        "blas": _blas(),
        "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
                    **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
                       if os.environ.get(k) is not None}},
        "gpu": gpu,
        "flags": {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                  "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
                  "float32_matmul_precision": torch.get_float32_matmul_precision(),
                  "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
                  "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
                  "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)},
        "versions": _versions(),
        "python": platform.python_version(),
    }


def _code_version() -> str:
    from runners.checkpoint import code_version

    return code_version()


def cpu_sample() -> Optional[Tuple[float, float, float]]:
    """(wall s, the machine's busy CPU s, this process's CPU s, its reaped children's included), or
    None where /proc/stat is missing (not Linux)."""
    import resource

    try:
        with open("/proc/stat") as f:
            head = f.readline().split()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if not head or head[0] != "cpu" or len(head) < 8:
        return None
    # user nice system idle iowait irq softirq steal: busy = everything but idle and iowait
    vals = [int(v) for v in head[1:9]]
    busy = (sum(vals) - vals[3] - vals[4]) / tick
    own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for a in ("ru_utime", "ru_stime"))
    return time.perf_counter(), busy, own


def other_cpu_cores(a, b) -> Optional[float]:
    """Cores other processes kept busy on average between two `cpu_sample`s (None without both)."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return round(max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]), 3)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM).
    A Hydra sweep runs its jobs in one process: without this, each job's peak would be the
    largest of all jobs before it. False where unsupported (the peak is then the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident set size since the last `reset_peak_rss` (VmHWM), else since process start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def current_rss_gb() -> Optional[float]:
    """Resident set size of this process now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (OSError, ValueError, IndexError):
        return None


def codes_digest(model) -> Dict[str, Any]:
    """-> {"sha256": one hash over every quantized linear (in module order), "layers": {name: sha256}}.
    Two runs with the same "sha256" stored bitwise-identical quantized weights; where they differ,
    "layers" says which layer diverged first."""
    from vptq.qlinear import QuantLinear
    from vptq.qweight import weight_sha256

    layers = {name: weight_sha256(m.qweight) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    h = hashlib.sha256()
    for name, d in layers.items():
        h.update(f"{name}={d}\n".encode())
    return {"sha256": h.hexdigest() if layers else None, "layers": layers}

