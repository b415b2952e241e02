"""finetune=layer|e2e for every method (runners/finetune.py, vptq/finetune.py, vptq/trainable.py):
the adapters' differentiable dequantization equals each weight's own `dequantize()` bitwise and
stores exactly what the forward pass saw; layer finetuning lowers the block-output MSE; end-to-end
finetuning lowers KL(fp || q) on evaluation windows for every method with trainable parameters; the
same seed gives bitwise-identical finetuned tensors; a finetuned VPTQ model exports and reloads
bit-exactly; the `finetune=` group, its record, the `method.finetune=true` alias and one-line errors."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from tests.helpers import correlated_hessian, run_cli

from runners.arch import arch_of, blocks_of
from runners.driver import quantize_model
from runners.finetune import Finetune, LayerHook, finetune_e2e, split_windows, topk_kl
from runners.kld import compute_reference
from runners.metrics import codes_digest
from runners.models import tiny_model
from runners.ppl import kld_summary, score
from runners.schema import ModelConfig, TinyModelConfig
from vptq.methods import build_method, method_class
from vptq.qlinear import QuantLinear
from vptq.qweight import weight_sha256
from vptq.trainable import REGISTRY, Trainables, trainable

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

# (method, config fields, bits): every stored weight type and its optional parts
WEIGHTS = [
    ("vptq", {}, 2.0),
    ("vptq", dict(vector_len=4, num_centroids=16, num_res_centroids=8, outlier_size=8, outlier_vector_len=2,
                  outlier_num_centroids=16, enable_norm=True, enable_perm=True), 4.0),
    ("gptvq", {}, 3.0),  # int8 codebooks + float16 scales
    ("gptvq", dict(codebook_bits=16), 3.0),
    ("gptvq", dict(vq_dim=1, svd_rank=0.5), 4.0),  # SVD factors
    ("gptvq", dict(vq_scaling_blocksize=32), 4.0),  # blockwise normalisation
    ("aqlm", {}, 3.0),
    ("aqlm", dict(scheme="2x4", in_group_size=4), 3.0),
    ("gptq", {}, 2.0),
    ("rtn", {}, 3.0),
]


def _wid(w):
    return f"{w[0]}-" + ("-".join(f"{k}={v}" for k, v in w[1].items()) or "default")


def _quantized_weight(name, kw, bits):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g) * 0.05
    m = build_method(name, method_class(name).Config(**kw), bits=bits, seed=0)
    return m.quantize_layer(W, correlated_hessian(128), name="0.q_proj")


@pytest.mark.parametrize("w", WEIGHTS, ids=_wid)
def test_adapter_equals_dequantize_and_stores_what_it_computes(w):
    q = _quantized_weight(*w)
    h0 = weight_sha256(q)
    t = trainable(q)
    Wd = t.weight()
    assert torch.equal(Wd.detach(), q.dequantize())  # bitwise, before any update
    g = torch.Generator().manual_seed(1)
    (Wd * torch.randn(Wd.shape, generator=g)).sum().backward()
    for name, p in t.params.items():  # gradients reach every trainable tensor
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    t.store()  # nothing trained: the stored tensors are bitwise the original ones
    assert weight_sha256(q) == h0
    with torch.no_grad():  # an update: what the forward pass sees is exactly what is stored
        for p in t.params.values():
            p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
    Wt = t.weight().detach()
    t.store()
    assert torch.equal(Wt, q.dequantize()) and weight_sha256(q) != h0


def test_every_quantized_weight_type_has_an_adapter():
    seen = {f"{type(_quantized_weight(*w)).__module__}:{type(_quantized_weight(*w)).__qualname__}"
            for w in WEIGHTS[::2]}
    assert seen <= set(REGISTRY) and len(set(REGISTRY)) == 4


def test_topk_kl_with_the_whole_vocabulary_is_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=g) * 3, torch.randn(5, 40, generator=g) * 3
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    exact = (lp.exp() * (lp - lq)).sum(1)
    idx = torch.arange(40).expand(5, 40)
    torch.testing.assert_close(topk_kl(b, idx, lp), exact)
    top = lp.topk(8, dim=1)  # top-8 + tail bucket: a lower bound (the log-sum inequality)
    assert (topk_kl(b, top.indices, top.values) <= exact + 1e-6).all()


# ----------------------------------------------------------------------------- tiny models
def _model(layers=2, scale=5.0):
    """A tiny random Llama whose weights are scaled up: peaked next-token distributions, so that
    quantization moves them measurably."""
    model, tok = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=layers)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval(), tok


def _windows(n, seed, L=64):
    return torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed))


def _quantize(name, kw, bits, model, calib, hook=None):
    m = build_method(name, method_class(name).Config(**kw), bits=bits, seed=0)
    if hook is not None:
        m.needs_hessian = True  # as the job does: the driver captures block inputs for the hook (RTN)
    return quantize_model(model, m, calib=calib, device="cpu", block_finetune=hook)


# RTN/GPTQ: scales; VPTQ, GPTVQ, AQLM: codebooks (+ scales)
METHODS = [("vptq", {}, 2.0), ("gptvq", {}, 2.5), ("aqlm", {}, 2.0), ("gptq", {}, 2.5), ("rtn", {}, 2.5)]


@pytest.mark.parametrize("w", METHODS, ids=lambda w: w[0])
def test_layer_finetuning_lowers_block_output_mse(w):
    model, _ = _model(layers=1)
    p0 = blocks_of(model, arch_of(model))[0].input_layernorm.weight
    norm0 = p0.detach().clone()
    hook = LayerHook(Finetune(mode="layer", steps=12, lr=1e-3, lr_min=1e-4, batch=2, seed=0))
    stats = _quantize(*w, model, _windows(8, 1), hook=hook)
    b = stats.blocks[0]
    assert b["layer_ft_steps"] == 12 and b["layer_ft_kept"] == 1.0
    assert b["layer_ft_mse_after"] < 0.97 * b["layer_ft_mse_before"], b
    block = blocks_of(model, arch_of(model))[0]
    assert not torch.equal(block.input_layernorm.weight, norm0)  # the RMSNorm weights trained too
    assert block.input_layernorm.weight is p0  # the model's own parameter, written in place
    rec = hook.record()
    assert rec["blocks"] == 1 and rec["blocks_kept"] == 1 and rec["trained_params"] > 0


def _e2e(w, seed=0, epochs=4, lr=1e-3, checkpoint=None):
    model, _ = _model()
    calib, ev = _windows(8, 1), _windows(4, 2)
    ref_c, ref_e = compute_reference(model, calib, "cpu", 1 << 30), compute_reference(model, ev, "cpu", 1 << 30)
    _quantize(*w, model, calib)
    before = kld_summary(score(model, ev, "cpu", ref_e))["mean"]
    ft = Finetune(mode="e2e", epochs=epochs, lr=lr, lr_min=None, batch=2, topk=None, seed=seed, checkpoint=checkpoint)
    rec = finetune_e2e(model, calib, ref_c, ft, "cpu")
    after = kld_summary(score(model, ev, "cpu", ref_e))["mean"]
    return model, rec, before, after


@pytest.mark.parametrize("w", METHODS, ids=lambda w: w[0])
def test_e2e_lowers_kl_to_the_float_model(w):
    lr = 3e-4 if w[0] == "gptvq" else 1e-3  # int8 codebooks on their grid: a smaller step
    model, rec, before, after = _e2e(w, lr=lr)
    h = rec["heldout_kl"]
    assert rec["best_epoch"] >= 1 and h[rec["best_epoch"]] < h[0]  # held-out calibration windows
    assert after < 0.995 * before, (before, after)  # unseen evaluation windows (measured 0.4-8% lower)
    assert rec["trained_params"] > 0 and rec["steps_run"] == rec["epochs_run"] * 4
    for m in model.modules():  # still a normal quantized model: stored dtypes, nothing left requiring grad
        if isinstance(m, QuantLinear):
            assert all(not t.requires_grad for t in vars(m.qweight).values() if isinstance(t, torch.Tensor))
    from torch.nn.utils import parametrize

    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # RMSNorm weights plain again


def test_e2e_same_seed_same_tensors():
    w = ("vptq", {}, 2.0)
    m1, r1, _, _ = _e2e(w, epochs=2)
    m2, r2, _, _ = _e2e(w, epochs=2)
    assert codes_digest(m1)["sha256"] == codes_digest(m2)["sha256"]
    assert r1["heldout_kl"] == r2["heldout_kl"] and r1["norms_sha256"] == r2["norms_sha256"]
    n1, n2 = (dict(m.named_parameters()) for m in (m1, m2))
    assert all(torch.equal(n1[k], n2[k]) for k in n1 if k.endswith("norm.weight"))
    m3, _, _, _ = _e2e(w, epochs=2, seed=1)  # another window order: other tensors
    assert codes_digest(m3)["sha256"] != codes_digest(m1)["sha256"]


def test_e2e_checkpointing_changes_memory_not_results():
    """finetune.checkpoint on or off: the same operations compute the same values (the checkpointed
    forward is recomputed by the same kernels), so the finetuned tensors are bitwise the same; auto
    is on for CUDA and, on CPU, follows the memory estimate."""
    from runners.finetune import training_bytes, use_checkpointing

    w = ("vptq", {}, 2.0)
    m1, r1, _, _ = _e2e(w, epochs=2, checkpoint=True)
    m2, r2, _, _ = _e2e(w, epochs=2, checkpoint=False)
    assert r1["checkpointed"] is True and r2["checkpointed"] is False
    assert codes_digest(m1)["sha256"] == codes_digest(m2)["sha256"]
    assert r1["heldout_kl"] == r2["heldout_kl"] and r1["norms_sha256"] == r2["norms_sha256"]
    need = training_bytes(m1, 63)
    assert need > 0 and use_checkpointing(m1, 63, "cuda") and not use_checkpointing(m1, 63, "cpu", False)
    assert use_checkpointing(m1, 63, "cpu") is False  # a tiny model: a few MB, far below half the memory
    assert use_checkpointing(m1, 10**9, "cpu") is True  # a billion tokens per window would not fit


def test_e2e_keeps_the_best_state_and_never_raises_the_heldout_kl():
    model, _ = _model()
    calib = _windows(8, 1)
    ref = compute_reference(model, calib, "cpu", 1 << 30)
    _quantize("vptq", {}, 2.0, model, calib)
    d0 = codes_digest(model)["sha256"]
    # a learning rate far too large: every epoch is worse than the start, so the start is kept
    rec = finetune_e2e(model, calib, ref, Finetune(mode="e2e", epochs=3, lr=1.0, lr_min=None, batch=2, topk=None,
                                                   patience=2), "cpu")
    assert rec["best_epoch"] == 0 and rec["epochs_run"] == 2 and min(rec["heldout_kl"][1:]) > rec["heldout_kl"][0]
    assert codes_digest(model)["sha256"] == d0


def test_more_e2e_windows_start_with_the_quantizations():
    """finetune.nsamples > calib.nsamples draws from the same sampler and seed: its first calib.nsamples windows
    are the quantization's, so the held-out ones (the last 1/8) are windows quantization never saw."""
    from runners.data import random_windows

    tokens = torch.arange(5000)
    assert torch.equal(random_windows(tokens, 64, 32, seed=3)[:32], random_windows(tokens, 32, 32, seed=3))


def test_split_windows():
    assert split_windows(32, 0.125) == (list(range(28)), [28, 29, 30, 31])
    assert split_windows(2, 0.01) == ([0], [1])
    with pytest.raises(Exception, match="at least 2 calibration windows"):
        split_windows(1, 0.5)


def test_finetuned_vptq_model_exports_and_reloads_bit_exactly(tmp_path):
    from vptq.format import export_vptq, load_vptq

    model, rec, _, _ = _e2e(("vptq", {}, 2.0), epochs=1)
    _, tok = _model()
    export_vptq(model, tok, str(tmp_path / "m"))
    back, _ = load_vptq(str(tmp_path / "m"))
    mine = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in back.named_modules() if isinstance(m, QuantLinear)}
    assert mine.keys() == theirs.keys()
    for n in mine:
        assert torch.equal(mine[n].qweight.dequantize(), theirs[n].qweight.dequantize()), n
    for (n, p), (n2, p2) in zip(model.named_parameters(), back.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n  # the finetuned RMSNorm weights too
    ids = _windows(1, 3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_trainables_leave_the_model_as_it_was_outside_training():
    model, _ = _model()
    _quantize("rtn", {}, 3.0, model, None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rg = {n: p.requires_grad for n, p in model.named_parameters()}
    tr = Trainables(model)
    with tr.active():
        assert all("forward" in m.__dict__ for m in tr.linears.values())
        y = model(_windows(1, 0)).logits.sum()
        y.backward()
        assert all(p.grad is not None for p in tr.parameters())
    assert all("forward" not in m.__dict__ for m in tr.linears.values())
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) and after[n].requires_grad == rg[n] for n in before)


# ----------------------------------------------------------------------------- the runner
TINY = ["model=tiny_llama", "eval.seqlen=64", "eval.max_windows=2", "calib.nsamples=8", "calib.seqlen=64",
        "logger=none"]


def _run(tmp_path, *args):
    d = tmp_path / "run"
    r = run_cli([*TINY, *args, f"results_root={tmp_path}", f"hydra.run.dir={d}", f"eval.kld_cache={tmp_path / 'ref'}"])
    m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else None
    return r, m


@pytest.mark.slow
def test_runner_e2e_record_and_codes_hash(tmp_path):
    r, m = _run(tmp_path, "method=vptq", "bits=2", "finetune=e2e", "finetune.epochs=2", "finetune.lr=1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    ft = m["finetune"]
    assert m["comparison"]["finetune"] == "e2e" and ft["mode"] == "e2e" and ft["via"] == "finetune=e2e"
    assert ft["epochs"] == 2 and ft["lr"] == 1e-3 and ft["lr_min"] == 5e-5 and ft["batch"] == 2  # presets fill nulls
    assert len(ft["heldout_kl"]) == ft["epochs_run"] + 1 and ft["trained_params"] > 0
    assert m["time"]["finetune_s"] == ft["time_s"] and ft["peak_rss_gb"] > 0 and ft["peak_gpu_gb"] is None
    assert ft["reference"]["computed"] and ft["reference"]["topk"] == 64  # the calibration windows' float top-k
    if sys.platform.startswith("linux"):  # /proc/stat: the other processes' load while e2e trained
        assert ft["other_cpu_cores"] is not None and ft["other_cpu_cores"] >= 0
    # codes_sha256 covers the finetuned tensors (computed again after the finetuning step)
    assert m["codes_sha256"] != ft["codes_sha256_before"] or ft["best_epoch"] == 0
    layers = json.loads((tmp_path / "run" / "layers.json").read_text())["layers"]
    assert all(lay["sha256"] for lay in layers)


def test_e2e_runs_share_the_quantized_blocks_of_their_quantization_key(tmp_path):
    """finetune=none and finetune=e2e at any e2e setting quantize the same codes: with
    quantize.keep_checkpoints=true the e2e jobs load the blocks the first job checkpointed (recorded
    as cost.blocks_reused, the report marks their time) and start from the very same codes."""
    keep = ["method=vptq", "bits=2", "quantize.keep_checkpoints=true", "seed=3"]
    r0, m0 = _run(tmp_path, *keep)
    assert r0.returncode == 0, r0.stderr[-3000:]
    assert "blocks_reused" not in (m0.get("cost") or {})
    r1, m1 = _run(tmp_path, *keep, "finetune=e2e", "finetune.epochs=1", "finetune.lr=1e-3")
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert m1["cost"]["blocks_reused"] == 2 and m1["run_key"] != m0["run_key"]  # the tiny model's 2 blocks
    assert m1["finetune"]["codes_sha256_before"] == m0["codes_sha256"]
    # finetune.nsamples: e2e trains on its own, larger window set (the quantization's 8 first, then more;
    # the held-out ones last), from the very same quantized blocks; null stays out of the run key
    r3, m3 = _run(tmp_path, *keep, "finetune=e2e", "finetune.epochs=1", "finetune.lr=1e-3", "finetune.nsamples=16")
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert m3["cost"]["blocks_reused"] == 2 and m3["finetune"]["codes_sha256_before"] == m0["codes_sha256"]
    ft1, ft3 = m1["finetune"], m3["finetune"]
    assert (ft1["train_windows"], ft1["heldout_windows"], ft1["nsamples"]) == (7, 1, None)
    assert (ft3["train_windows"], ft3["heldout_windows"], ft3["nsamples"]) == (14, 2, 16)
    assert m3["calib"]["nsamples"] == 8 and m3["run_key"] != m1["run_key"]
    # layer finetuning changes the codes it quantizes: its own key, nothing reused
    r2, m2 = _run(tmp_path, *keep, "finetune=layer", "finetune.steps=2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "blocks_reused" not in (m2.get("cost") or {})


@pytest.mark.slow
def test_runner_layer_alias_and_errors(tmp_path):
    r, m = _run(tmp_path, "method=vptq", "bits=2", "method.finetune=true", "finetune.steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert m["comparison"]["finetune"] == "layer" and m["finetune"]["via"].startswith("method.finetune=true")
    assert m["finetune"]["steps"] == 4 and m["finetune"]["blocks"] == 2
    r, m = _run(tmp_path / "b", "method=rtn", "bits=3", "finetune=layer", "finetune.steps=2")  # RTN: no Hessians
    assert r.returncode == 0 and m["comparison"]["finetune"] == "layer" and m["finetune"]["blocks"] == 2
    r, _ = _run(tmp_path / "c", "method=vptq", "bits=2", "finetune=e2e", "finetune.lr=-1")
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error")]
    assert r.returncode != 0 and err == ["error: finetune.lr=-1.0 must be > 0"], r.stderr[-2000:]


@pytest.mark.parametrize("over, msg", [
    (dict(mode="e2e", lr=-1.0), "finetune.lr=-1.0 must be > 0"),
    (dict(mode="layer", steps=-2), "finetune.steps=-2 must be an integer >= 0"),
    (dict(mode="e2e", heldout=1.5), "finetune.heldout=1.5 must be a fraction"),
    (dict(mode="e2e", lr_min=1.0), "finetune.lr_min=1.0 must be between 0 and finetune.lr=0.0005"),
    (dict(mode="e2e", batch=0), "finetune.batch=0 must be >= 1"),
    (dict(mode="bogus"), "finetune.mode='bogus'; valid choices: none, layer, e2e"),
    (dict(mode="layer", nsamples=64), "finetune.nsamples=64 is read by finetune=e2e only"),
    (dict(nsamples=64), "finetune.nsamples=64 is read by finetune=e2e only (here finetune=none)"),
    (dict(mode="e2e", nsamples=1), "finetune.nsamples=1 must be >= 2"),
    (dict(mode="e2e", vptq=dict(finetune=True)), "cannot be combined with finetune=e2e"),
    (dict(vptq=dict(finetune=True, finetune_lr=0.01)), "method.finetune_lr is not read by the runner"),
    (dict(mode="e2e", method="fp16"), "finetune=e2e trains a model's quantized layers; method=fp16 quantizes nothing"),
])
def test_bad_finetune_settings_fail_in_one_line(over, msg):
    from runners.cli import argv_errors
    from runners.errors import UserError
    from runners.finetune import configure
    from runners.schema import FinetuneConfig

    over = dict(over)
    name = over.pop("method", "vptq")
    method = build_method(name, method_class(name).Config(**over.pop("vptq", {})), bits=2.0)
    with pytest.raises(UserError) as e:
        configure(FinetuneConfig(**over), method, seed=0)
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert argv_errors(["finetune=typo"]) == ["unknown finetune 'typo'; valid choices: e2e, layer, none"]


def test_method_finetune_true_is_finetune_layer():
    from runners.finetune import configure
    from runners.schema import FinetuneConfig

    method = build_method("vptq", method_class("vptq").Config(finetune=True), bits=2.0, seed=3)
    ft, m = configure(FinetuneConfig(), method, seed=3)
    assert ft.mode == "layer" and ft.via.startswith("method.finetune=true") and (ft.steps, ft.lr) == (100, 1e-4)
    assert not m.config.finetune and not m.uses_float_outputs and m.seed == 3  # the hook runs it, once
    ft, m = configure(FinetuneConfig(mode="layer", steps=7), method, seed=3)
    assert ft.mode == "layer" and ft.steps == 7 and not m.config.finetune


@pytest.mark.slow
def test_finetune_bench_runs(capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "finetune_bench.py")
    spec = importlib.util.spec_from_file_location("finetune_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--", "model=tiny_llama", "eval.seqlen=64", "eval.max_windows=2", "calib.nsamples=8",
                       "calib.seqlen=64", "finetune.epochs=1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "finetune=none" in out[1] and "finetune=e2e" in out[1] and out[-1].startswith("finetune=e2e: ")
    assert "while finetuning" in out[-1]


def test_finetune_group_composes():
    from hydra import compose, initialize_config_dir

    from runners.schema import register_configs

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        assert compose("config").finetune.mode == "none"
        c = compose("config", overrides=["finetune=e2e", "finetune.topk=null"])
        assert c.finetune.mode == "e2e" and c.finetune.topk is None and c.finetune.lr is None
        assert compose("config", overrides=["finetune=layer"]).finetune.mode == "layer"
        with pytest.raises(Exception):
            compose("config", overrides=["finetune.lrr=1"])  # typed: a typo fails at compose time
        # finetune.checkpoint changes memory and time, no result: not in the run key; other fields are
        from omegaconf import OmegaConf

        import runners.metrics as M

        def key(*over):
            return M.run_key(M.semantic_config(OmegaConf.to_container(compose("config", overrides=list(over)),
                                                                      resolve=True)))
        base = key("finetune=e2e")
        assert key("finetune=e2e", "finetune.checkpoint=true") == base == key("finetune=e2e", "finetune.checkpoint=false")
        assert key("finetune=e2e", "finetune.epochs=2") != base
        # null fields are keyed as their preset: the explicit preset value is the same run
        from runners.finetune import PRESETS

        assert key("finetune=e2e", f"finetune.lr={PRESETS['e2e']['lr']}") == base != key("finetune=e2e", "finetune.lr=1e-4")
        # finetune.nsamples null (the quantization's windows) is keyed by its absence: run keys from before
        # the field existed still match; a window count of its own is a new key
        sem = M.semantic_config(OmegaConf.to_container(compose("config", overrides=["finetune=e2e"]), resolve=True))
        assert "nsamples" not in sem["finetune"] and "lr" in sem["finetune"]
        assert key("finetune=e2e", "finetune.nsamples=64") != base
        assert key("finetune=e2e", "finetune.nsamples=32", "calib.nsamples=32") == base  # the same windows
