"""vq-bench entry point.

    python runners/run.py model=NAME method=NAME bits=FLOAT [kernel=torch|triton] \
        [data=pydoc|text|wikitext2|c4] [data.path=DIR] [logger=wandb|none] [seed=INT] [-m]

Thin on purpose: compose the config (Hydra), run one job (`runners.job.run_job`), return the
headline metric (perplexity) so sweepers can optimise it.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python runners/run.py` from a checkout works without installing
    sys.path.insert(0, REPO)

import runners  # noqa: E402,F401  first, before anything loads torch: it caps libgomp's spin (runners/__init__.py)
import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from runners.cli import check_argv, register_resolvers  # noqa: E402
from runners.schema import register_configs  # noqa: E402

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from runners.job import run_job

    return run_job(cfg)


if __name__ == "__main__":
    check_argv(sys.argv[1:])
    main()
