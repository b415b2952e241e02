"""The `metrics.json` contract (see DESIGN.md), the run key, atomic writes and resume."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import tempfile
from typing import Any, Dict, Optional

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
    model = dict(cfg["model"])
    if model.get("source") != "tiny":
        model.pop("tiny", None)
    return {
        "model": model,
        "method": cfg["method"],
        "bits": cfg["bits"] if uses_bits else None,
        "data": data,
        "calib": cfg["calib"],
        "eval": cfg["eval"],
        "kernel": cfg["kernel"],
        "hessian_protocol": cfg["hessian"]["protocol"],
        "seed": cfg["seed"],
    }


def run_key(semantic: Dict[str, Any]) -> str:
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_key(semantic: Dict[str, Any]) -> str:
    """The run_key of the same config without its seed: runs that share it differ only in the seed
    (the report averages over them)."""
    return run_key({k: v for k, v in semantic.items() if k != "seed"})


def find_finished(root: str, key: str) -> Optional[str]:
    """Path of a metrics.json below `root` with this run_key and status ok, if any."""
    if not root or not os.path.isdir(root):
        return None
    for p in sorted(glob.glob(os.path.join(root, "**", METRICS_FILE), recursive=True)):
        try:
            with open(p) as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError):
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


def env_info(device) -> Dict[str, str]:
    import platform

    import torch

    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"torch": torch.__version__, "device": dev,
            "git": git_version(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}


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
