"""A real sweep killed half way and run again finishes only what is missing: finished jobs are
skipped, the interrupted and unstarted ones run, and the report has one row per job (none lost,
none duplicated)."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, RUN, metrics_under, run_cli

TINY = ["model=tiny_llama", "eval.seqlen=64", "eval.max_windows=4", "calib.nsamples=4", "calib.seqlen=64"]


@pytest.mark.slow
def test_killed_sweep_resumes_without_lost_or_duplicated_rows(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=rtn", "bits=3,4,8", "logger=none", f"hydra.sweep.dir={sweep}",
            f"results_root={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    p = subprocess.Popen([sys.executable, RUN, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not glob.glob(str(sweep / "**" / "metrics.json"), recursive=True):
            assert p.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGKILL)  # the whole sweep, half way: job 1 done, job 2 running
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    done = metrics_under(sweep)
    assert 1 <= len(done) < 3 and all(m["status"] == "ok" for m in done)  # atomic writes: nothing half-written

    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("already finished") == len(done)  # finished jobs skipped, not re-run
    assert out.count("[tiny_llama rtn") == 3 - len(done)  # only the missing ones ran
    ms = metrics_under(sweep)
    assert len(ms) == 3 and all(m["status"] == "ok" for m in ms)
    assert len({m["run_key"] for m in ms}) == 3
    from analysis.report import write_report

    table = write_report(str(sweep))
    assert sorted(table["bits_target"]) == [3.0, 4.0, 8.0] and len(table) == 3
    rows = [l for l in (sweep / "results.md").read_text().splitlines() if l.startswith("| tiny_llama")]
    assert len(rows) == 3
    assert json.loads(json.dumps(ms))  # plain JSON all the way
