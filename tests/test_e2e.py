"""The tiny random model end to end through Hydra: sweeps, resume, failures, bad input, W&B."""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.helpers import metrics_under, run_cli

TINY = ["model=tiny_llama", "eval.seqlen=64", "eval.max_windows=4", "calib.nsamples=4", "calib.seqlen=64"]


@pytest.mark.slow
def test_sweep_report_resume_and_failure(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=fp16,rtn", "bits=0.5,4", "logger=none", f"hydra.sweep.dir={sweep}",
            f"results_root={tmp_path}"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-2000:]
    ms = metrics_under(sweep)
    by = {(m["method"], m["bits"]["target"]): m for m in ms}
    # rtn at 0.5 bits is impossible: recorded as failed, the sweep went on
    failed = [m for m in ms if m["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["method"] == "rtn" and "bits=0.5" in failed[0]["error"]
    ok = by[("rtn", 4.0)]
    assert ok["status"] == "ok" and math.isfinite(ok["ppl"]["pydoc"])
    assert 3.0 <= ok["bits"]["total"] <= 4.1
    plans = {v for k, v in ok["settings"].items() if "x" in k}  # per layer shape, e.g. "w3g32"
    assert plans and all(p.startswith(f"w{int(ok['bits']['index'])}") for p in plans)  # index bits = code width
    mem = ok["memory"]  # RSS before loading <= peak to the end of quantization <= peak of the job
    assert 0 < mem["base_rss_gb"] <= mem["quantize_peak_rss_gb"] <= mem["peak_rss_gb"]
    assert mem["peak_rss_scope"] == "job"  # Linux: each job of the one-process sweep has its own peak
    other = ok["time"]["other_cpu_cores"]  # Linux: what other processes used while it quantized
    assert other is not None and 0.0 <= other <= os.cpu_count()
    fp16 = [m for m in ms if m["method"] == "fp16" and m["status"] == "ok"]
    assert fp16 and fp16[0]["bits"]["total"] == 16.0 and fp16[0]["bits"]["target"] is None
    for m in ms:
        assert {"run_key", "model", "method", "bits", "status"} <= set(m)
    # fp16 ignores bits: its second job has the same run_key and is skipped
    assert len({m["run_key"] for m in ms if m["method"] == "fp16"}) == 1
    # rerun: finished jobs are skipped, the failed one is retried (and fails again)
    r2 = run_cli(args)
    assert r2.returncode == 0
    out = r2.stdout + r2.stderr
    assert out.count("already finished") == 3, out[-3000:]
    # the report: one row per (model, method, bits) that finished
    from analysis.report import write_report

    table = write_report(str(sweep))
    assert sorted(table["method"]) == ["fp16", "rtn"]
    md = (sweep / "results.md").read_text()
    assert "PPL pydoc @64 ↓" in md and "bits/weight (total) ↓" in md and "Failed jobs" in md
    assert (sweep / "results.tex").read_text().count(r"\\") >= 3


@pytest.mark.slow
def test_fp16_ppl_equals_plain_loop(tmp_path, wikitext2_dir):
    """The harness's perplexity == an independently written transformers loop over the same windows."""
    import torch

    from runners.models import tiny_model
    from runners.schema import ModelConfig, TinyModelConfig

    seqlen, nwin = 128, 6
    r = run_cli(["model=tiny_llama", "method=fp16", "data=text", f"data.path={wikitext2_dir}",
                 f"eval.seqlen={seqlen}", f"eval.max_windows={nwin}", "logger=none", f"hydra.run.dir={tmp_path}",
                 f"results_root={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    ppl = json.loads((tmp_path / "metrics.json").read_text())["ppl"]["text"]

    model, tok = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig()))
    model.eval()
    text = open(os.path.join(wikitext2_dir, "test.txt"), encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for i in range(nwin):
            x = ids[i * seqlen:(i + 1) * seqlen][None]
            losses.append(model(x, labels=x).loss.item())  # HF's own shifted mean NLL
    ref = math.exp(sum(losses) / len(losses))
    assert ppl == pytest.approx(ref, rel=1e-5)


@pytest.mark.slow
def test_seed_sweep_shares_config_key_and_reports_one_row(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", *TINY, "method=rtn", "bits=4", "seed=0,1", "logger=none", f"hydra.sweep.dir={sweep}",
                 f"results_root={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    ms = metrics_under(sweep)
    assert len(ms) == 2 and {m["seed"] for m in ms} == {0, 1}
    assert len({m["run_key"] for m in ms}) == 2 and len({m["config_key"] for m in ms}) == 1
    from analysis.report import write_report

    table = write_report(str(sweep))
    assert len(table) == 1 and table["n_seeds"].iloc[0] == 2
    assert "| seeds |" in (sweep / "results.md").read_text()


@pytest.mark.slow
def test_same_config_bitwise_identical_codes_and_ppl_and_audit(tmp_path):
    """Same config, seed and machine (same thread counts): the same codes (hash of every stored tensor)
    and bitwise the same perplexity; `audit=true` quantizes twice in one job and finds them equal;
    metrics.json records what decides reproducibility."""
    ms = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        r = run_cli([*TINY, "method=gptq", "bits=4", "logger=none", f"hydra.run.dir={d}", "resume=false",
                     f"audit={'true' if i == 0 else 'false'}"])
        assert r.returncode == 0, r.stderr[-2000:]
        ms.append(json.loads((d / "metrics.json").read_text()))
    a, b = ms
    assert a["ppl"]["pydoc"] == b["ppl"]["pydoc"]  # bitwise: the same kernels on the same inputs
    assert a["codes_sha256"] == b["codes_sha256"] and len(a["codes_sha256"]) == 64
    assert a["audit"]["codes_equal"] is True and a["audit"]["mismatched_layers"] == 0
    assert a["audit"]["sha256"] == [a["codes_sha256"]] * 2 and "audit" not in b
    layers = json.loads((tmp_path / "r0" / "layers.json").read_text())["layers"]
    assert len(layers) == 14 and all(len(l["sha256"]) == 64 for l in layers)  # 2 blocks x 7 linears
    env = a["env"]
    assert env["cpu"]["model"] and env["cpu"]["isa"] and env["blas"] and env["threads"]["intra_op"] >= 1
    assert env["quantize_threads"] == {"block_passes": env["threads"]["intra_op"], "quantize_layer": 1}
    assert set(env["versions"]) >= {"torch", "transformers", "lm-eval", "datasets", "triton"}
    assert {"tf32_matmul", "deterministic_algorithms"} <= set(env["flags"]) and env["gpu"] is None


@pytest.mark.parametrize("args,env,needle", [
    (["method=rtn", "bits=0.5"], {}, "bits=0.5 is impossible for a scalar grid"),
    (["data=text"], {}, "data=text needs data.path="),
    (["data=text", "data.path=/nonexistent/dir"], {}, "data.path='/nonexistent/dir' is not a folder"),
    (["model=llama2_7b", "method=rtn"], {}, "is not in the local Hugging Face cache and the hub cannot be reached"),
    (["data=wikitext2"], {}, "is not in the local Hugging Face cache and the hub cannot be reached"),
])
@pytest.mark.slow
def test_bad_input_one_line(tmp_path, args, env, needle):
    base = TINY if not any(a.startswith("model=") for a in args) else TINY[1:]
    r = run_cli([*base, *args, "logger=none", f"hydra.run.dir={tmp_path}"], env=env)
    assert r.returncode != 0
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert err and err[-1].startswith("error: ") and needle in err[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    # nothing half-written: at most a metrics.json that says failed
    for m in metrics_under(tmp_path):
        assert m["status"] == "failed" and needle in m["error"]


@pytest.mark.slow
def test_wandb_offline_and_no_key_written(tmp_path):
    secret = "wandbkey-0123456789abcdef0123456789abcdef01234567"
    r = run_cli([*TINY, "method=rtn", "bits=4", "logger=wandb", f"hydra.run.dir={tmp_path}"],
                env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
