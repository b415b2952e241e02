"""Experiment tracking. Local metrics.json files are the source of truth; W&B mirrors them.

logger=wandb runs offline by default (no key, no network; `wandb sync <dir>` uploads later):
one W&B run per job, the sweep as its group, the full resolved config, tags for
model/method/bits, per-block quantization curves as history (quant/time_s,
quant/mean_rel_proxy_loss, ... against quant/block) and the metrics as summary.
`log_report` logs a results table (wandb.Table) and its plots (wandb.Image) as one run of
job_type "report" (analysis/report.py --wandb).
An API key is read by wandb from its own environment/netrc; we never write it anywhere.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

from runners.errors import choices_error

log = logging.getLogger(__name__)
LOGGERS = ("wandb", "none")


class Tracker:
    def log(self, data: Dict[str, Any]) -> None:
        pass

    def summary(self, data: Dict[str, Any]) -> None:
        pass

    def histogram(self, name: str, values) -> None:
        """A distribution (e.g. the per-token KL of an evaluation set)."""

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, *, project: str, entity: Optional[str], mode: str, name: str, group: Optional[str],
                 tags: List[str], config: Dict[str, Any], job_dir: str):
        import wandb

        if mode not in ("offline", "online", "disabled"):
            raise choices_error("logger.mode", mode, ["offline", "online", "disabled"])
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity, mode=mode, name=name, group=group, tags=tags,
                              config=config, dir=job_dir, reinit="finish_previous",
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        # per-block curves: x axis = block index
        self.run.define_metric("quant/block")
        self.run.define_metric("quant/*", step_metric="quant/block")

    def log(self, data):
        self.run.log(data)

    def summary(self, data):
        for k, v in _flatten(data).items():
            self.run.summary[k] = v

    def histogram(self, name, values):
        import numpy as np

        v = np.asarray(values.cpu() if hasattr(values, "cpu") else values, dtype=np.float64)
        self.run.log({name: self.wandb.Histogram(np_histogram=np.histogram(v, bins=64))})

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def make_tracker(cfg, *, name: str, group: Optional[str], tags: List[str], config: Dict[str, Any],
                 job_dir: str) -> Tracker:
    if cfg.name == "none":
        return Tracker()
    if cfg.name == "wandb":
        return WandbTracker(project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=name, group=group,
                            tags=list(cfg.tags) + tags, config=config, job_dir=job_dir)
    raise choices_error("logger", cfg.name, LOGGERS)


def log_report(table, images: Dict[str, str], *, project: str = "vq-bench", entity: Optional[str] = None,
               mode: str = "offline", group: Optional[str] = None, run_dir: Optional[str] = None,
               name: str = "report") -> str:
    """One W&B run with the results table and the plots. -> the run's local folder."""
    import wandb

    if mode not in ("offline", "online"):
        raise choices_error("W&B mode", mode, ["offline", "online"])
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, entity=entity, mode=mode, name=name, group=group, job_type="report",
                     dir=run_dir, reinit="finish_previous", tags=["report"],
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    try:
        df = table.copy()
        for c in df.columns:  # wandb.Table wants plain columns: objects as text, NaN as None
            if df[c].dtype == object:
                df[c] = df[c].map(lambda v: None if v is None else str(v))
        data = {"results": wandb.Table(dataframe=df)}
        for key, path in images.items():
            data[f"pareto/{key}"] = wandb.Image(path, caption=os.path.basename(path))
        run.log(data)
        return run.dir
    finally:
        run.finish()
