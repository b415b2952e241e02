#!/usr/bin/env python3
"""Build (once, cached) the separate Python environment that runs Microsoft's `vptq` package.

Microsoft's inference package `vptq` 0.0.5.post1 uses the import name of our own package, so it
can never share an environment with vq-bench: the interchange test (tests/test_interchange.py)
runs it in this venv, in a subprocess. What works on a CPU machine (DESIGN.md, "Facts about the
stack"): transformers 4.57.x (5.x removed `modeling_utils.no_init_weights`, which its loader
calls), `vptq==0.0.5.post1` installed with --no-deps (its prebuilt wheel; its declared deps pull
gradio, sentence-transformers, ...), a stub `sentence_transformers` module (vptq.utils.pack imports
it at load time), torch==2.13.0 pinned (the CPU wheel; an unpinned torch pulls CUDA), accelerate.

    python scripts/interchange_env.py            # build if missing, print the venv's python
    python scripts/interchange_env.py --check    # print it if built, exit 1 otherwise (no network)
    python scripts/interchange_env.py --rebuild  # wipe and build again

The venv lives in $VQB_CACHE/interchange-venv (default ~/.cache/vq-bench/interchange-venv). It is
built under a lock and marked ready only at the very end, so an interrupted build is redone.
Takes ~1-3 min with a reachable package index (the torch wheel dominates), ~1.3 GB on disk.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time

PINS = [
    "torch==2.13.0",
    "transformers>=4.57,<4.58",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "numpy",
    "tqdm",
]
VPTQ_PIN = "vptq==0.0.5.post1"
STAMP = "vq-bench interchange venv v1: " + " ".join(PINS + [VPTQ_PIN])

STUB = '''"""Stub of sentence_transformers for Microsoft's vptq (its pack module imports it at load time;
the loaders never use it). Written by vq-bench scripts/interchange_env.py."""
'''
STUB_ST = '''class SentenceTransformer:  # only isinstance() checks reach it
    pass
'''


def cache_root() -> str:
    return os.environ.get("VQB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vq-bench"))


def venv_dir() -> str:
    return os.path.join(cache_root(), "interchange-venv")


def venv_python(root: str | None = None) -> str:
    return os.path.join(root or venv_dir(), "bin", "python")


def _marker(root: str) -> str:
    return os.path.join(root, ".vq-bench-ready")


def is_ready(root: str | None = None) -> bool:
    root = root or venv_dir()
    try:
        with open(_marker(root)) as f:
            return f.read().strip() == STAMP and os.path.exists(venv_python(root))
    except OSError:
        return False


class BuildError(RuntimeError):
    pass


def _run(cmd, log) -> None:
    print("+", " ".join(cmd), file=log, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(r.stdout)
    if r.returncode != 0:
        lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        raise BuildError(f"`{' '.join(cmd[1:])[:150]}` failed (exit {r.returncode}): "
                         f"{lines[-1].strip() if lines else 'no output'}")


def _site_packages(py: str) -> str:
    return subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def build(rebuild: bool = False, log=sys.stderr) -> str:
    """Build the venv if it is not ready; return its python. Raises BuildError (one line) on failure
    and removes the partial venv."""
    root = venv_dir()
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds it ready
        if is_ready(root) and not rebuild:
            return venv_python(root)
        t0 = time.time()
        shutil.rmtree(root, ignore_errors=True)
        try:
            _build(root, log)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        print(f"interchange venv built in {time.time() - t0:.0f} s: {root}", file=log, flush=True)
        return venv_python(root)


def _build(root: str, log) -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", root], log)
    py = venv_python(root)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--retries", "2", "--timeout", "30"]
    _run(pip + PINS, log)
    _run(pip + ["--no-deps", VPTQ_PIN], log)
    st = os.path.join(_site_packages(py), "sentence_transformers")
    os.makedirs(st, exist_ok=True)
    with open(os.path.join(st, "__init__.py"), "w") as f:
        f.write(STUB)
    with open(os.path.join(st, "SentenceTransformer.py"), "w") as f:
        f.write(STUB_ST)
    # -I: isolated, so the working directory (maybe our repo, whose `vptq` would shadow theirs)
    # is not on sys.path
    _run([py, "-I", "-c", "import vptq, transformers, torch; "
                          "assert vptq.__version__ == '0.0.5.post1', vptq.__file__; "
                          "print('vptq', vptq.__version__, 'transformers', transformers.__version__, "
                          "'torch', torch.__version__)"], log)
    with open(_marker(root), "w") as f:
        f.write(STAMP + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report whether it is built")
    ap.add_argument("--rebuild", action="store_true", help="wipe and build again")
    a = ap.parse_args()
    if a.check:
        if is_ready():
            print(venv_python())
            return 0
        print(f"not built: {venv_dir()}", file=sys.stderr)
        return 1
    try:
        print(build(rebuild=a.rebuild))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
