"""Zero-shot QA through the real lm-eval harness (0.4.13), on the in-memory (quantized) model.

    prepare_qa(tasks, limit, batch_size, data)  -> QASuite   (before quantizing: every check,
                                                              every dataset loaded)
    evaluate_qa(suite, model, tokenizer)        -> ({task: {acc, acc_norm}, "mean": {...}}, info)

Scoring is lm-eval's own: `simple_evaluate(HFLM(pretrained=<model object>, tokenizer=tok), tasks)`,
log-likelihood of each choice after the task's prompt; `acc` picks the highest total
log-likelihood, `acc_norm` the highest per byte of the choice. The papers' five tasks are
arc_easy, arc_challenge, hellaswag, piqa, winogrande; `mean` is their plain (unweighted) mean
over the tasks that report the metric (winogrande has no acc_norm).

Offline: a task listed in `data` (task -> folder) is scored from a local copy in its published
format through a task YAML in `runners/tasks/` whose prompt and metrics are those of lm-eval's
task of the same name (e.g. `piqa_local.yaml` == lm-eval's `piqa` but for where the data come
from); its results are reported under the lm-eval name. A hub task with no network and nothing
in the Hugging Face cache fails at once with one line.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from runners.errors import UserError

log = logging.getLogger(__name__)

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
# lm-eval task name -> its folder in lm_eval/tasks: indexing only these avoids the ~13 s index
# of every built-in task
HUB_TASK_DIRS = {"arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag", "piqa": "piqa",
                 "winogrande": "winogrande"}
METRICS = ("acc", "acc_norm")


# ---------------------------------------------------------------- local copies

def _read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def join_piqa(folder: str) -> List[Dict[str, Any]]:
    """PIQA's published split (valid.jsonl: {"goal","sol1","sol2"} a line; valid-labels.lst: 0/1 a
    line, aligned) -> rows in the layout of the hub dataset lm-eval's `piqa` reads (+ `label`)."""
    qpath, lpath = os.path.join(folder, "valid.jsonl"), os.path.join(folder, "valid-labels.lst")
    qs, labels = _read_lines(qpath), _read_lines(lpath)
    rows = []
    for n, line in enumerate(qs, 1):
        if not line.strip():
            raise UserError(f"{qpath}:{n}: empty line (expected one JSON object with goal, sol1, sol2)")
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{qpath}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("goal", "sol1", "sol2")):
            raise UserError(f"{qpath}:{n}: expected a JSON object with string fields goal, sol1, sol2")
        rows.append({"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"]})
    for n, lab in enumerate(labels, 1):
        if lab.strip() not in ("0", "1"):
            raise UserError(f"{lpath}:{n}: label {lab.strip()!r} is not 0 or 1")
    if len(labels) != len(rows):
        raise UserError(f"{lpath} has {len(labels)} labels but {qpath} has {len(rows)} questions")
    if not rows:
        raise UserError(f"{qpath} has no questions")
    for r, lab in zip(rows, labels):
        r["label"] = int(lab)
    return rows


@dataclass(frozen=True)
class LocalFormat:
    yaml: str  # task YAML in runners/tasks (same prompt and metrics as the lm-eval task)
    files: Tuple[str, ...]  # the published files, inside the folder given in eval.qa_data
    join: Callable[[str], List[Dict[str, Any]]]  # folder -> rows with the fields the YAML reads
    split: str = "validation"


LOCAL_FORMATS: Dict[str, LocalFormat] = {
    "piqa": LocalFormat("piqa_local.yaml", ("valid.jsonl", "valid-labels.lst"), join_piqa),
}


def _cache_dir() -> str:
    from runners.models import cache_root

    return os.path.join(cache_root(), "qa")


def local_data_file(task: str, folder: str) -> str:
    """Check the local copy line by line and write it once as one JSON-lines file (keyed by the
    sources' hash) that the task YAML's `dataset_path: json` reads. -> its path."""
    fmt = LOCAL_FORMATS[task]
    if not os.path.isdir(folder):
        raise UserError(f"eval.qa_data.{task}={folder!r} is not a folder (expected {', '.join(fmt.files)})")
    h = hashlib.sha256(task.encode())
    for name in fmt.files:
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            raise UserError(f"eval.qa_data.{task}={folder!r} has no {name} (expected {', '.join(fmt.files)})")
        with open(p, "rb") as f:
            h.update(f.read())
    rows = fmt.join(folder)  # validates every line, even when the joined file exists
    out = os.path.join(_cache_dir(), f"{task}-{h.hexdigest()[:16]}.jsonl")
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    return out


def local_task_config(task: str, folder: str) -> Dict[str, Any]:
    """The lm-eval task config (a dict) that scores `task` from the local copy in `folder`."""
    import yaml

    fmt = LOCAL_FORMATS[task]
    with open(os.path.join(TASKS_DIR, fmt.yaml), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg["dataset_kwargs"] = {"data_files": {fmt.split: local_data_file(task, folder)}}
    return cfg


# ---------------------------------------------------------------- checks and loading

@dataclass
class QASuite:
    names: Dict[str, str]  # lm-eval task name (as in results) -> reported name
    tasks: List[Any]  # lm-eval Task objects, datasets loaded
    limit: Optional[int]
    batch_size: int
    sources: Dict[str, str] = field(default_factory=dict)  # reported name -> "hub" | local folder
    prepare_s: float = 0.0


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "lm_eval.models.huggingface", "lm_eval.evaluator", "lm_eval.api.task"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _task_manager(include: Sequence[str], defaults: bool = False):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _unknown_task_error(name: str, known: Sequence[str]) -> UserError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"close valid choices: {', '.join(close)}" if close else \
        f"e.g. {', '.join(PAPER_TASKS)} (lm-eval's task names; `lm-eval ls tasks` lists all)"
    return UserError(f"unknown QA task {name!r}; {hint}")


def _hub_offline_error(name: str, err: Exception) -> UserError:
    if name in LOCAL_FORMATS:
        hint = f"score a local copy instead: eval.qa_data.{name}=FOLDER"
    else:
        hint = (f"fill the HF cache or drop it from eval.qa_tasks (local copies are supported for: "
                f"{', '.join(sorted(LOCAL_FORMATS))})")
    return UserError(f"QA task {name!r} needs its dataset from the Hugging Face hub, which cannot be reached, "
                     f"and it is not in the local cache; {hint} [{type(err).__name__}]")


def _lm_eval_tasks_root() -> str:
    import lm_eval.tasks as tasks_pkg

    return os.path.dirname(tasks_pkg.__file__)


_NAME_RX = re.compile(r"^(?:task|group|tag):[ \t]*['\"]?([A-Za-z0-9_.\-]+)", re.M)


def _scan_task_dirs() -> Dict[str, List[str]]:
    """Task/group/tag names written literally in lm-eval's YAMLs -> their folders (~1 s; names
    generated by templates are missing: `known_task_names` has them all)."""
    out: Dict[str, List[str]] = {}
    for dp, _, files in os.walk(_lm_eval_tasks_root()):
        for fn in files:
            if fn.endswith((".yaml", ".yml")):
                try:
                    with open(os.path.join(dp, fn), encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue
                for m in _NAME_RX.finditer(text):
                    dirs = out.setdefault(m.group(1), [])
                    if dp not in dirs:
                        dirs.append(dp)
    return out


def known_task_names() -> List[str]:
    """Every name lm-eval knows (its full index, ~13 s), cached on disk per lm-eval version."""
    path = os.path.join(_cache_dir(), f"{_lm_eval_version().replace(' ', '-')}-task-names.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    names = sorted(_task_manager([], defaults=True).all_tasks)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(names, f)
    os.replace(tmp, path)
    return names


def _hub_task_manager(hub: Sequence[str]):
    """A TaskManager that knows `hub` (lm-eval names), indexing as few folders as possible."""
    root = _lm_eval_tasks_root()
    dirs: List[str] = []
    scan: Optional[Dict[str, List[str]]] = None
    for t in hub:
        if t in HUB_TASK_DIRS:
            found = [os.path.join(root, HUB_TASK_DIRS[t])]
        else:
            scan = _scan_task_dirs() if scan is None else scan
            found = scan.get(t, [])
        if not found:  # not written literally in any YAML: ask the full index
            known = known_task_names()
            if t not in known:
                raise _unknown_task_error(t, known)
            return _task_manager([], defaults=True)
        dirs += [d for d in found if d not in dirs]
    tm = _task_manager(dirs)
    missing = [t for t in hub if t not in tm.all_tasks]
    if missing:  # e.g. a YAML that includes files from other folders
        tm = _task_manager([], defaults=True)
        for t in missing:
            if t not in tm.all_tasks:
                raise _unknown_task_error(t, tm.all_tasks)
    return tm


def check_qa_args(tasks: Sequence[str], limit: Optional[int], batch_size: int, data: Mapping[str, str]) -> None:
    """The cheap checks (no lm-eval import): limits, duplicates, local formats."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise UserError(f"eval.qa_limit={limit} must be a positive number of questions per task, or null (all)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"eval.qa_batch_size={batch_size} must be a positive integer")
    seen = set()
    for t in tasks:
        if not isinstance(t, str) or not t:
            raise UserError(f"eval.qa_tasks has {t!r}; give lm-eval task names, e.g. {', '.join(PAPER_TASKS)}")
        if t in seen:
            raise UserError(f"eval.qa_tasks lists {t!r} twice")
        seen.add(t)
    for t in data:
        if t not in LOCAL_FORMATS:
            raise UserError(f"eval.qa_data.{t}: no local format for QA task {t!r}; "
                            f"local copies are supported for: {', '.join(sorted(LOCAL_FORMATS))}")


def prepare_qa(tasks: Sequence[str], *, limit: Optional[int] = None, batch_size: int = 16,
               data: Optional[Mapping[str, str]] = None) -> Optional[QASuite]:
    """Check every task and load its data BEFORE any quantization. None when `tasks` is empty."""
    data = dict(data or {})
    check_qa_args(tasks, limit, batch_size, data)
    unused = sorted(set(data) - set(tasks))
    if unused:
        log.warning("eval.qa_data has %s, which is not in eval.qa_tasks (ignored)", ", ".join(unused))
    if not tasks:
        return None
    t0 = time.perf_counter()
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager  # noqa: F401  (import errors surface here, not later)

    local = [t for t in tasks if t in data]
    hub = [t for t in tasks if t not in data]
    names: Dict[str, str] = {}
    specs: List[Any] = []
    sources: Dict[str, str] = {}
    for t in local:
        cfg = local_task_config(t, data[t])
        names[cfg["task"]] = t
        specs.append(cfg)
        sources[t] = os.path.abspath(data[t])
    built = []
    if local:
        tm = _task_manager([TASKS_DIR])
        built += list(tm.load(specs)["tasks"].values())
    if hub:
        tm = _hub_task_manager(hub)
        from runners.hub import hub_reachable

        if not hub_reachable():  # the HF cache may have it: try offline, fail at once otherwise
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            os.environ["HF_HUB_OFFLINE"] = "1"
        for t in hub:
            try:
                loaded = tm.load([t])["tasks"]
            except Exception as e:  # noqa: BLE001  (datasets raises many types when offline)
                if not hub_reachable():
                    raise _hub_offline_error(t, e) from None
                raise UserError(f"QA task {t!r} could not be loaded: {type(e).__name__}: {e}") from None
            for name, task in loaded.items():
                names[name] = t if len(loaded) == 1 else name
                built.append(task)
            sources[t] = "hub"
    return QASuite(names=names, tasks=built, limit=limit, batch_size=batch_size, sources=sources,
                   prepare_s=time.perf_counter() - t0)


# ---------------------------------------------------------------- scoring

def evaluate_qa(suite: QASuite, model, tokenizer) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Any]]:
    """Score the in-memory model. -> ({task: {"acc", "acc_norm"}, ..., "mean": {...}}, info)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):  # simple_evaluate seeds the global RNGs
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=suite.batch_size)
        out = simple_evaluate(model=lm, tasks=list(suite.tasks), limit=suite.limit, bootstrap_iters=0,
                              log_samples=False, task_manager=_task_manager([]))
    model.train(was_training)
    results = out["results"]
    qa: Dict[str, Dict[str, float]] = {}
    n: Dict[str, int] = {}
    for name, reported in suite.names.items():
        r = results[name]
        qa[reported] = {m: float(r[f"{m},none"]) for m in METRICS if f"{m},none" in r}
        n[reported] = int(r.get("sample_len") or out.get("n-samples", {}).get(name, {}).get("effective", 0))
    mean = {}
    for m in METRICS:
        vals = [v[m] for v in qa.values() if m in v]
        if vals:
            mean[m] = sum(vals) / len(vals)
    qa["mean"] = mean
    info = {"tasks": list(qa)[:-1], "limit": suite.limit, "n": n, "batch_size": suite.batch_size,
            "data": dict(suite.sources), "num_fewshot": 0, "harness": _lm_eval_version(),
            "time_s": time.perf_counter() - t0}
    return qa, info


def _lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return f"lm-eval {version('lm_eval')}"
    except Exception:  # noqa: BLE001
        return "lm-eval"
