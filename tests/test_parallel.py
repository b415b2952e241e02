"""Layer-parallel quantization: blocks quantized by separate submitit jobs into the checkpoint
folder and assembled by the main job == the single-process result, bit for bit; a rerun submits only
the missing blocks; Slurm jobs take the sweep launcher's settings."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from runners.cli import register_resolvers
from runners.errors import UserError
from runners.schema import register_configs
from tests.helpers import REPO, run_cli

CONF = os.path.join(REPO, "conf")
register_configs()
register_resolvers()
BASE = ["model=tiny_llama", "model.tiny.num_hidden_layers=3", "method=gptq", "bits=4", "calib.nsamples=4",
        "calib.seqlen=32", "hessian.protocol=float", "quantize.parallel=true", "device=cpu", "logger=none"]


def _cfg(*extra):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[*BASE, *extra])


def _setup(cfg):
    from runners.data import calibration_windows
    from runners.models import load_model
    from vptq.methods import build_method

    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    calib = calibration_windows(cfg.data.name, cfg.data.path, tok, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
    method = build_method(cfg.method.name, OmegaConf.to_object(cfg.method), bits=float(cfg.bits), seed=cfg.seed)
    return model.eval(), calib, method


def _weights(model):
    from vptq.qlinear import QuantLinear

    return {n: m.qweight.dequantize() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _assert_identical(a, b):
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == 3 * 7 and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    x = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


@pytest.mark.slow
def test_assembled_blocks_bit_identical_and_rerun_does_only_missing(tmp_path):
    """Block groups [0, 1] and [2] quantized by two jobs (submitit's DebugExecutor: the same job
    function, in this process; test_cli_parallel_equals_serial runs them as separate processes)."""
    import submitit

    from runners.checkpoint import block_path
    from runners.driver import quantize_model
    from runners.parallel import quantize_parallel

    cfg = _cfg("quantize.blocks_per_job=2")
    model, calib, method = _setup(cfg)
    ref = copy.deepcopy(model)
    quantize_model(ref, method, calib=calib, device="cpu", protocol="float")

    ck = str(tmp_path / "ck")
    jobs = os.path.join(ck, "jobs")
    par = copy.deepcopy(model)
    st, info = quantize_parallel(cfg, par, method, calib=calib, device="cpu", checkpoint_dir=ck,
                                 executor=submitit.DebugExecutor(folder=jobs))
    assert [b["block"] for b in st.blocks] == [0, 1, 2] and all(b["resumed"] for b in st.blocks)
    assert all(b["time_s"] > 0 for b in st.blocks)  # the jobs' own per-block times
    assert sorted(j["blocks"] for j in info["jobs"]) == [[0, 1], [2]] and info["submitted"] == 2
    _assert_identical(ref, par)

    # an interrupted array: block 2's checkpoint is missing -> only block 2 is quantized again
    mtimes = {i: os.path.getmtime(block_path(ck, i)) for i in range(3)}
    os.remove(block_path(ck, 2))
    again = copy.deepcopy(model)
    _, info = quantize_parallel(cfg, again, method, calib=calib, device="cpu", checkpoint_dir=ck,
                                executor=submitit.DebugExecutor(folder=jobs))
    assert info["submitted"] == 1 and [j["blocks"] for j in info["jobs"]] == [[2]]
    assert [os.path.getmtime(block_path(ck, i)) == mtimes[i] for i in range(3)] == [True, True, False]
    _assert_identical(ref, again)


@pytest.mark.parametrize("extra,needle", [
    (["hessian.protocol=quantized"], "quantize.parallel=true needs hessian.protocol=float"),
    (["quantize.executor=sge"], "unknown quantize.executor 'sge'; valid choices: auto, debug, local, slurm"),
    (["quantize.blocks_per_job=0"], "quantize.blocks_per_job=0 must be >= 1"),
])
def test_bad_parallel_config(extra, needle):
    from runners.parallel import check_parallel

    with pytest.raises(UserError, match=needle):
        check_parallel(_cfg(*extra))


def test_slurm_block_jobs_take_the_launcher_settings(tmp_path, monkeypatch):
    from submitit.slurm.slurm import SlurmExecutor

    from runners.parallel import make_executor, resolve_executor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                                       "hydra.launcher.account=proj1", "hydra.launcher.timeout_min=600"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert resolve_executor("auto", launcher) == "slurm" and resolve_executor("auto", None) == "local"
    ex = make_executor("auto", str(tmp_path), launcher=launcher)
    text = ex._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --time=600",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --mem=64GB", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --job-name=vqb-blocks"):
        assert line in text, text
    assert ex._executor.parameters["array_parallelism"] == 32


@pytest.mark.slow
def test_cli_parallel_equals_serial(tmp_path):
    """Through the CLI: quantize.parallel=true with two block jobs as separate local processes
    == the serial float-protocol run, bit for bit (checkpoints, per-layer losses, perplexity)."""
    out = {}
    for mode in ("serial", "parallel"):
        d = tmp_path / mode
        args = [a for a in BASE if a != "quantize.parallel=true"] + [
            "eval.seqlen=64", "eval.max_windows=4", "quantize.keep_checkpoints=true", "quantize.blocks_per_job=2",
            f"quantize.parallel={mode == 'parallel'}", f"hydra.run.dir={d}", f"results_root={d}"]
        r = run_cli(args)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mode] = (json.loads((d / "metrics.json").read_text()), json.loads((d / "layers.json").read_text()))
    (ms, ls), (mp, lp) = out["serial"], out["parallel"]
    assert ms["ppl"] == mp["ppl"] and ms["bits"] == mp["bits"]
    # L = 3 block forwards either way: the serial float pass, and the parallel run's one capture
    assert ms["cost"]["block_forwards"] == mp["cost"]["block_forwards"] == 3
    assert mp["cost"]["blocks_captured"] == 3 and mp["cost"]["hessian_bytes_written"] > 0
    # the jobs read exactly their blocks' Hessians: q/k/v, o, gate/up (64x64) and down (160x160), fp32, 3 blocks
    assert mp["cost"]["hessian_bytes_read"] == 3 * (3 * 64 * 64 + 160 * 160) * 4 < mp["cost"]["hessian_bytes_written"]
    assert set(mp["cost"]["stages_s"]) == {"capture", "quantize", "assemble", "evaluate"}
    par = mp["parallel"]
    assert "parallel" not in ms and par["executor"] == "local" and par["submitted"] == 2
    assert sorted(j["blocks"] for j in par["jobs"]) == [[0, 1], [2]]
    assert len({j["job_id"] for j in par["jobs"]}) == 2  # two processes (local job ids are their pids)
    assert mp["memory"]["peak_rss_gb"] >= max(j["peak_rss_gb"] for j in par["jobs"]) > 0
    key = lambda l: [(x["name"], x["rel_proxy_loss"], x["rel_weight_err"]) for x in l["layers"]]  # noqa: E731
    assert key(ls) == key(lp)
    from safetensors.torch import load_file

    for i in range(3):
        a, b = (load_file(str(next((tmp_path / side / "checkpoints").iterdir()) / f"block{i:03d}.safetensors"))
                for side in ("serial", "parallel"))  # one folder each: the run's quantization key
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ the capture cache
def _capture_setup(tmp_path, seed=0, init_seed=0):
    from runners.capture import make_key
    from runners.data import calibration_windows
    from runners.models import tiny_model
    from runners.schema import ModelConfig, TinyModelConfig

    model, tok = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=3,
                                                                                      init_seed=init_seed)))
    calib = calibration_windows("pydoc", None, tok, 4, 32, seed)
    return model.eval(), calib, make_key(model, calib)


def test_capture_is_keyed_and_misses_for_other_seed_model_or_format(tmp_path, caplog, monkeypatch):
    import logging

    import runners.capture as C

    model, calib, key = _capture_setup(tmp_path)
    d = str(tmp_path / "cache")
    first = C.capture(model, calib, "cpu", d, key)
    assert first.cost.block_forwards == 3 and first.cost.blocks_captured == 3
    again = C.capture(model, calib, "cpu", d, key)
    assert again.cost.block_forwards == 0 and again.cost.blocks_cached == 3  # all there: nothing runs
    for other in (_capture_setup(tmp_path, seed=1), _capture_setup(tmp_path, init_seed=1)):
        m2, c2, k2 = other
        assert k2 != key
        with caplog.at_level(logging.WARNING):
            res = C.capture(m2, c2, "cpu", d, k2)
        assert res.cost.blocks_captured == 3 and "was written for another" in caplog.text
        caplog.clear()
    monkeypatch.setattr(C, "FORMAT", C.FORMAT + 1)  # a new cache format: old files are not read
    k3 = C.make_key(model, calib)
    with caplog.at_level(logging.WARNING):
        assert C.read_block(d, 0, k3) is None
    assert "another format" in caplog.text or "another" in caplog.text


def test_killed_capture_resumes_at_its_first_missing_block(tmp_path, monkeypatch):
    import os

    import runners.capture as C

    model, calib, key = _capture_setup(tmp_path)
    d = str(tmp_path / "cache")
    real = C.write_block
    calls = []

    def die_at_block_2(cache_dir, i, *a, **k):
        if i == 2:
            raise KeyboardInterrupt
        calls.append(i)
        return real(cache_dir, i, *a, **k)

    monkeypatch.setattr(C, "write_block", die_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        C.capture(model, calib, "cpu", d, key, keep_activations=True)
    monkeypatch.setattr(C, "write_block", real)
    assert calls == [0, 1] and os.path.isfile(os.path.join(d, "frontier.safetensors"))
    mt = {i: os.path.getmtime(C.block_file(d, i)) for i in (0, 1)}
    res = C.capture(model, calib, "cpu", d, key, keep_activations=True)
    assert res.cost.block_forwards == 1 and res.cost.blocks_captured == 1  # only block 2, from the frontier
    assert {i: os.path.getmtime(C.block_file(d, i)) for i in (0, 1)} == mt
    assert not os.path.isfile(os.path.join(d, "frontier.safetensors"))
    # the resumed cache equals an uninterrupted one, tensor for tensor
    full = str(tmp_path / "full")
    C.capture(model, calib, "cpu", full, key, keep_activations=True)
    for i in range(3):
        a, b = C.read_block(d, i, key, need=("H", "X", "Y")), C.read_block(full, i, key, need=("H", "X", "Y"))
        assert all(torch.equal(a["H"][k], b["H"][k]) for k in a["H"]) and torch.equal(a["X"], b["X"])
        assert torch.equal(a["Y"], b["Y"])


@pytest.mark.slow
def test_block_finetuning_in_jobs_equals_serial(tmp_path):
    """A method whose block finetuning reads the float block's inputs and outputs (VPTQ, method.finetune=true):
    the block jobs read them from the capture and end bit-identical to the serial float-protocol run."""
    import submitit

    from runners.driver import quantize_model
    from runners.parallel import quantize_parallel

    cfg = _cfg("method=vptq", "bits=3", "method.finetune=true", "method.finetune_epochs=1", "quantize.blocks_per_job=2")
    model, calib, method = _setup(cfg)
    assert method.uses_float_outputs
    ref = copy.deepcopy(model)
    quantize_model(ref, method, calib=calib, device="cpu", protocol="float")
    par = copy.deepcopy(model)
    ck = str(tmp_path / "ck")
    quantize_parallel(cfg, par, method, calib=calib, device="cpu", checkpoint_dir=ck,
                      executor=submitit.DebugExecutor(folder=os.path.join(ck, "jobs")))
    _assert_identical(ref, par)


@pytest.mark.slow
def test_cli_parallel_layer_finetuning_equals_serial(tmp_path):
    """finetune=layer inside the block jobs (their targets: the captured float outputs) == the serial
    float-protocol run's, bit for bit: the same finetuned codes, the same per-block record."""
    out = {}
    for mode in ("serial", "parallel"):
        d = tmp_path / mode
        args = [a for a in BASE if a != "quantize.parallel=true"] + [
            "eval.seqlen=64", "eval.max_windows=2", "quantize.blocks_per_job=2", "finetune=layer",
            "finetune.steps=3", f"quantize.parallel={mode == 'parallel'}", f"hydra.run.dir={d}", f"results_root={d}"]
        r = run_cli(args)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mode] = json.loads((d / "metrics.json").read_text())
    ms, mp = out["serial"], out["parallel"]
    assert mp["parallel"]["submitted"] == 2 and ms["codes_sha256"] == mp["codes_sha256"]
    fs, fp = ms["finetune"], mp["finetune"]
    assert fs["mode"] == fp["mode"] == "layer" and fs["blocks"] == fp["blocks"] == 3
    drop = ("time_s", "layer_ft_time_s")
    strip = lambda r: [{k: v for k, v in b.items() if k not in drop} for b in r["per_block"]]  # noqa: E731
    assert strip(fs) == strip(fp) and fs["mse_ratio_mean"] == fp["mse_ratio_mean"] < 1.0
    assert fp["time_s"] > 0 and mp["time"]["finetune_s"] == fp["time_s"]
    assert ms["ppl"] == mp["ppl"]
