"""vq-bench entry point.

    python runners/run.py model=NAME method=NAME bits=FLOAT [kernel=torch|triton] \
        [data=pydoc|text|wikitext2|c4] [data.path=DIR] [logger=wandb|none] [seed=INT] [-m]

Thin on purpose: compose the config (Hydra), run one job (`runners.job.run_job`), return the
headline metric (perplexity) so sweepers can optimise it.
"""
from __future__ import annotations

import os
import sys

# OpenMP's idle threads spin-wait ~300k iterations (libgomp's default) before they sleep. On a
# shared CPU the spinning thread takes the core the thread it waits for needs: GPTQ's 2-bit
# quantization of the bundled model took 1.82x its quiet time beside one busy process (spin
# default), 1.34x with 10k spins, and the quiet time did not move (81-83 s); OMP_WAIT_POLICY=
# PASSIVE gave 1.14x but 20% slower when quiet (docs/benchmarks.md). Set before torch loads
# libgomp; a value the user set wins. Thread counts do not change, so neither do the codes.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python runners/run.py` from a checkout works without installing
    sys.path.insert(0, REPO)

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
