"""Reading the files a run depends on, with one clear line when one is bad.

Every file the harness reads back (a model's safetensors shards, block checkpoints, Hessian cache
files, metrics.json) goes through here, so a truncated or corrupt file ends in one line that names
the file and says what is wrong, instead of a library traceback that names neither.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, List

from runners.errors import UserError


class BadFile(UserError):
    """A file that exists but cannot be read: truncated, corrupt, or of another format."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path}: {what}")
        self.path = path
        self.what = what


def check_safetensors(path: str) -> None:
    """Raise BadFile unless `path` is a complete safetensors file. safetensors validates the header
    and that the data region covers every tensor (a truncated file fails here), without reading
    the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            f.keys()
    except SafetensorError as e:
        raise BadFile(path, f"not a valid safetensors file ({_short(e)}): truncated or corrupt") from None
    except OSError as e:
        raise BadFile(path, f"cannot be read ({e.strerror or e})") from None


def check_model_folder(folder: str) -> List[str]:
    """Check every safetensors shard of a model folder (and that an index's shards exist).
    -> the shard paths. Raises BadFile naming the first bad file."""
    index = os.path.join(folder, "model.safetensors.index.json")
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if os.path.isfile(index):
        idx = read_json(index)
        names = sorted(set((idx.get("weight_map") or {}).values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise BadFile(index, f"lists shard {missing[0]!r}, which is not in the folder "
                                 f"({len(missing)} of {len(names)} shards missing)")
    for p in shards:
        check_safetensors(p)
    return shards


def read_json(path: str) -> Any:
    """json.load with one clear line for a truncated or corrupt file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        what = "empty" if e.doc == "" else f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise BadFile(path, f"{what}: truncated or corrupt") from None
    except UnicodeDecodeError:
        raise BadFile(path, "not UTF-8 text: corrupt") from None
    except OSError as e:
        raise BadFile(path, f"cannot be read ({e.strerror or e})") from None


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else type(e).__name__
    return s.removeprefix("Error while deserializing header: ")
