"""Every quantizing method end to end through the CLI on the tiny model: one parametrized test (one
copy of the checks, not one per method): the job finishes, the realized bits stay within the budget
(counted from what is stored, with the components the format stores), perplexity is finite, the
quantized model is measurably away from the float one (KL > 0, top-1 < 100%), and the record says
which variant and iteration preset ran (the authors' `reference` by default)."""
from __future__ import annotations

import math

import pytest

from tests.helpers import metrics_under, run_cli

# method -> (bits, components the format stores, extra overrides)
CASES = {
    "rtn": (4, {"codes", "scales", "zeros"}, []),
    "gptq": (4, {"codes", "scales", "zeros"}, []),
    "gptvq": (2, {"indices", "codebooks", "codebook_scales"}, []),
    "aqlm": (2, {"codes", "codebooks", "scales"}, []),
    "vptq": (2, {"indices", "codebooks"}, []),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_method_end_to_end_tiny(tmp_path, method):
    bits, components, extra = CASES[method]
    r = run_cli(["model=tiny_llama", f"method={method}", f"bits={bits}", "logger=none", "eval.seqlen=64",
                 "eval.max_windows=4", "calib.nsamples=4", "calib.seqlen=64", f"hydra.run.dir={tmp_path / 'run'}",
                 f"results_root={tmp_path}", f"eval.kld_cache={tmp_path / 'ref'}", *extra])
    assert r.returncode == 0, r.stderr[-2000:]
    (m,) = metrics_under(tmp_path / "run")
    assert m["status"] == "ok" and m["method"] == method and m["format_version"] == 2
    b = m["bits"]
    assert 0 < b["index"] <= b["total"] <= bits + 0.1  # the budget's tolerance, counted from storage
    assert components <= set(b["components"]), b["components"]
    assert math.isclose(sum(b["components"].values()), b["total"], rel_tol=1e-9)
    assert all(math.isfinite(v) for v in m["ppl"].values())
    kl = m["kld"]["pydoc"]
    assert kl["mean"] > 0 and kl["top1_agree"] < 100.0
    assert m["settings"]["variant"] == "reference" and m["settings"]["iters"] == "cpu"
    assert m["comparison"]["variant"] == "reference" and len(m["codes_sha256"]) == 64
