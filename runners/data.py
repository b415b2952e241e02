"""Calibration and evaluation data.

Every dataset gives two texts (or token windows): a calibration part and an evaluation part.
- pydoc: CPython's `pydoc_data.topics` (always installed). Topics in sorted key order, joined
  by "\n\n"; the first half of the characters (cut at a topic boundary) calibrates, the rest
  evaluates. Deterministic, no download.
- text: a local folder (`data.path`): calibrate on valid.txt (or train.txt), evaluate on
  test.txt, each read verbatim.
- wikitext2: HF `wikitext-2-raw-v1`; rows joined by "\n\n" (GPTQ); train calibrates, test evaluates.
- c4: HF `allenai/c4` shards as in GPTQ: calibration from train shard 0 (random documents
  longer than the window), evaluation from validation shard 0 (256 windows, random.seed(0)).

The perplexity protocol (`runners/ppl.py`) cuts a token stream into non-overlapping windows
of `seqlen` tokens (tail dropped); c4 supplies its windows directly.
"""
from __future__ import annotations

import functools
import os
import random
from typing import Optional

import torch

from runners.errors import UserError, choices_error
from runners.hub import hub_reachable

DATASETS = ("pydoc", "text", "wikitext2", "c4")
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VAL = "en/c4-validation.00000-of-00008.json.gz"


@functools.lru_cache(maxsize=1)
def pydoc_parts():
    from pydoc_data.topics import topics

    keys = sorted(topics)
    total = sum(len(topics[k]) for k in keys)
    acc, cut = 0, len(keys)
    for i, k in enumerate(keys):
        acc += len(topics[k])
        if acc >= total / 2:
            cut = i + 1
            break
    calib = "\n\n".join(topics[k] for k in keys[:cut])
    evalt = "\n\n".join(topics[k] for k in keys[cut:])
    return calib, evalt


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _text_folder(path: Optional[str], part: str) -> str:
    if not path:
        raise UserError("data=text needs data.path=FOLDER (with valid.txt or train.txt, and test.txt)")
    if not os.path.isdir(path):
        raise UserError(f"data.path={path!r} is not a folder")
    names = ["valid.txt", "train.txt"] if part == "calib" else ["test.txt"]
    for n in names:
        p = os.path.join(path, n)
        if os.path.isfile(p):
            text = _read(p)
            if not text.strip():
                raise UserError(f"{p} is empty")
            return text
    raise UserError(f"data.path={path!r} has none of {', '.join(names)}")


def _hub_dataset(*args, **kwargs):
    import datasets

    if not hub_reachable():
        # the local HF cache may still have it: try offline, and fail at once if not
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            return datasets.load_dataset(*args, **kwargs)
        except Exception:
            files = kwargs.get("data_files")
            what = f"{args[0]!r} ({', '.join(files.values())})" if isinstance(files, dict) else repr(args[0])
            raise UserError(f"dataset {what} is not in the local Hugging Face cache and the hub cannot be "
                            f"reached; point at a local copy instead: data=text data.path=DIR (DIR/valid.txt "
                            f"calibrates, DIR/test.txt evaluates; also after +experiment=paper), "
                            f"e.g. data.path=../shared/data/wikitext-2") from None
    return datasets.load_dataset(*args, **kwargs)


def load_text(name: str, path: Optional[str], part: str) -> str:
    """The calibration (`part="calib"`) or evaluation (`part="eval"`) text of a dataset."""
    if name == "pydoc":
        calib, evalt = pydoc_parts()
        return calib if part == "calib" else evalt
    if name == "text":
        return _text_folder(path, part)
    if name == "wikitext2":
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split="train" if part == "calib" else "test")
        return "\n\n".join(ds["text"])
    raise choices_error("data", name, DATASETS)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once, no special tokens added: (T,) int64."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets (GPTQ's calibration sampling)."""
    if nsamples <= 0 or seqlen <= 0:
        raise UserError(f"calibration needs nsamples > 0 and seqlen > 0 (got {nsamples}, {seqlen})")
    if tokens.numel() <= seqlen:
        raise UserError(f"calibration text has {tokens.numel()} tokens, fewer than calib.seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def calibration_windows(name: str, path: Optional[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) int64 calibration token windows."""
    if name == "c4":
        ds = _hub_dataset("allenai/c4", data_files={"train": C4_TRAIN}, split="train")
        rng = random.Random(seed)
        out = []
        while len(out) < nsamples:
            doc = ds[rng.randint(0, len(ds) - 1)]["text"]
            ids = tokenize(tokenizer, doc)
            if ids.numel() <= seqlen:
                continue
            i = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[i:i + seqlen])
        return torch.stack(out)
    tokens = tokenize(tokenizer, load_text(name, path, "calib"))
    return random_windows(tokens, nsamples, seqlen, seed)


def eval_windows(name: str, path: Optional[str], tokenizer, seqlen: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """(N, seqlen) int64 evaluation windows: the pinned protocol (non-overlapping, tail dropped,
    first `max_windows` only)."""
    if seqlen is None or seqlen < 2:
        raise UserError(f"eval.seqlen={seqlen} must be an integer >= 2")
    if max_windows is not None and max_windows <= 0:
        raise UserError(f"eval.max_windows={max_windows} must be positive or null (all windows)")
    if name == "c4":
        ds = _hub_dataset("allenai/c4", data_files={"validation": C4_VAL}, split="validation")
        rng = random.Random(0)
        out = []
        while len(out) < 256:
            while True:
                ids = tokenize(tokenizer, ds[rng.randint(0, len(ds) - 1)]["text"])
                if ids.numel() >= seqlen:
                    break
            i = rng.randint(0, ids.numel() - seqlen - 1) if ids.numel() > seqlen else 0
            out.append(ids[i:i + seqlen])
        windows = torch.stack(out)
    else:
        tokens = tokenize(tokenizer, load_text(name, path, "eval"))
        n = tokens.numel() // seqlen
        if n == 0:
            raise UserError(f"evaluation text of {name!r} has {tokens.numel()} tokens, fewer than eval.seqlen={seqlen}")
        windows = tokens[: n * seqlen].view(n, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows


def check_data(name: str, path: Optional[str]) -> None:
    if name not in DATASETS:
        raise choices_error("data", name, DATASETS)
    if name == "text":
        _text_folder(path, "eval")
