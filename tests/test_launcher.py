"""Launchers: hydra/launcher=submitit_slurm|submitit_local (our settings merged onto hydra-submitit-launcher's
schemas; slurm|local are aliases) compose and pass the CLI's checks; a two-job sweep runs as two
separate processes through submitit locally and reports like any sweep."""
from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir

from runners.cli import argv_errors, register_resolvers
from runners.schema import register_configs
from tests.helpers import REPO, metrics_under, run_cli

CONF = os.path.join(REPO, "conf")
register_configs()
register_resolvers()
TINY = ["model=tiny_llama", "eval.seqlen=64", "eval.max_windows=4", "calib.nsamples=4", "calib.seqlen=64"]


@pytest.mark.parametrize("launcher,target,expect", [
    ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "timeout_min": 1440, "mem_gb": 64, "cpus_per_task": 8,
                                "partition": None, "array_parallelism": 32}),
    ("local", "LocalLauncher", {"gpus_per_node": 0, "timeout_min": 1440}),
    ("submitit_slurm", "SlurmLauncher", {"gpus_per_node": 1, "timeout_min": 1440, "mem_gb": 64,
                                         "cpus_per_task": 8, "partition": None, "qos": None}),
    ("submitit_local", "LocalLauncher", {"gpus_per_node": 0, "timeout_min": 1440}),
])
def test_launcher_configs_compose(launcher, target, expect):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hydra/launcher={launcher}"])
    lc = cfg.hydra.launcher
    assert lc._target_.endswith(target)
    for k, v in expect.items():
        assert lc[k] == v, k
    assert not argv_errors([f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu", "model=tiny_llama"])


def test_unknown_launcher_is_one_line():
    errs = argv_errors(["hydra/launcher=slurmm", "hydra/launcher=local,slurm"])
    assert errs == ["unknown hydra/launcher 'slurmm'; valid choices: basic, local, slurm, submitit_local, "
                    "submitit_slurm"]


def test_slurm_settings_override_on_the_command_line():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=a100", "hydra.launcher.gpus_per_node=4",
                                 "hydra.launcher.timeout_min=120", "hydra.launcher.mem_gb=256"])
    lc = cfg.hydra.launcher
    assert (lc.partition, lc.gpus_per_node, lc.timeout_min, lc.mem_gb) == ("a100", 4, 120, 256)


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "hydra/launcher=submitit_local", *TINY, "method=fp16,rtn", "bits=4", "logger=none",
                 f"hydra.sweep.dir={sweep}", f"results_root={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in r.stdout + r.stderr
    ms = metrics_under(sweep)
    assert sorted((m["method"], m["status"]) for m in ms) == [("fp16", "ok"), ("rtn", "ok")]
    # two separate processes: one submitit job folder (named by its process id) each, each with its log
    jobs = sorted(p for p in os.listdir(sweep / ".submitit") if p.isdigit())
    assert len(jobs) == 2 and os.getpid() not in map(int, jobs)
    for j in jobs:
        assert "Job completed successfully" in (sweep / ".submitit" / j / f"{j}_0_log.out").read_text()
    from analysis.report import write_report

    assert sorted(write_report(str(sweep))["method"]) == ["fp16", "rtn"]


def test_long_override_sets_get_distinct_job_folders():
    """Sweep job folders are named from the overrides; past 120 characters a hash of the whole keeps
    jobs that differ only at the end (sorted keys: `method=`, `model=`) apart."""
    from runners.cli import SLUG_MAX, _slug

    common = "+eval.paths.wikitext2_v1=/work/shared/data/wikitext-2,+eval.seqlens.wikitext2_v1=1024,bits=3," \
             "calib.nsamples=16,eval.datasets=[pydoc,wikitext2_v1],eval.qa_limit=50,eval=qa"
    a, b = _slug(common + ",method=fp16"), _slug(common + ",method=rtn")
    assert a != b and len(a) == len(b) == SLUG_MAX and a == _slug(common + ",method=fp16")
    assert a.startswith("+eval.paths.wikitext2_v1=_work_shared_data_wikitext-2,")
    assert _slug("bits=4,method=rtn") == "bits=4,method=rtn"  # short names unchanged
