"""vptq.format: official-format export and our safetensors loader reproduce the model bit-exactly.

Models here are tiny Llamas whose linears are random VQWeights (no algorithm needed): residual,
outliers, permutation, norm, several groups, padding rows, codebook sizes that are not powers of two.
The helpers `random_vqweight` / `vq_tiny_llama` are reused by tests/test_interchange.py.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch

from vptq.format import (FORMAT_NAME, FORMAT_VERSION, LAYER_KEYS, export_vptq, layer_config, layer_tensors,
                         load_vptq, read_quantization_config, vqweight_from_tensors)
from vptq.methods import Method
from vptq.qlinear import QuantLinear
from vptq.vqweight import VQWeight


def random_vqweight(out_features, in_features, *, v=6, k=12, groups=2, k_res=5, outliers=8, v_out=2, k_out=4,
                    perm=True, norm=True, seed=0, dtype=torch.float16) -> VQWeight:
    """A VQWeight with random codebooks and indices (every optional part switchable)."""
    g = torch.Generator().manual_seed(seed)
    gs = (in_features - outliers) // groups
    assert outliers + groups * gs == in_features, "in_features - outliers must split into groups"
    n = math.ceil(out_features / v)
    kw = dict(out_features=out_features, in_features=in_features, vector_len=v, num_centroids=k, group_num=groups,
              group_size=gs, centroids=(torch.randn(groups, k, v, generator=g) * 0.05).to(dtype),
              indices=torch.randint(0, k, (groups, n, gs), generator=g))
    if k_res:
        kw.update(num_res_centroids=k_res, res_centroids=(torch.randn(groups, k_res, v, generator=g) * 0.01).to(dtype),
                  res_indices=torch.randint(0, k_res, (groups, n, gs), generator=g))
    if outliers:
        kw.update(outlier_size=outliers, outlier_vector_len=v_out, outlier_num_centroids=k_out,
                  outlier_centroids=(torch.randn(1, k_out, v_out, generator=g) * 0.1).to(dtype),
                  outlier_indices=torch.randint(0, k_out, (1, math.ceil(out_features / v_out), outliers), generator=g))
    if perm:
        kw["perm"] = torch.randperm(in_features, generator=g)
    if norm:
        kw.update(weight_scale=(torch.rand(in_features, generator=g) + 0.5).to(dtype),
                  weight_bias=(torch.randn(in_features, generator=g) * 0.01).to(dtype))
    return VQWeight(**kw)


def vq_tiny_llama(*, tied=False, rope=None, bias=False, seed=0, quantize=None, tokenizer=None, float_copy=None,
                  **vq):
    """A tiny random Llama (the shapes of model=tiny_llama) whose decoder linears are random VQWeights, or,
    given `quantize` (a vptq.budget.LayerConfig), the linears' own random weights quantized by our
    quantizer under a correlated random Hessian. rope: None (default, theta 10000) | a 5.x
    rope_parameters dict. bias: q/k/v/o biases (random). tokenizer: the model's (default: the byte
    tokenizer of model=tiny_llama); the vocabulary follows it. float_copy: a list that receives a copy of
    the float model (before its linears are replaced; without biases)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from runners.arch import linears_of, set_module
    from runners.models import byte_tokenizer
    from runners.schema import TinyModelConfig

    t = TinyModelConfig()
    tok = tokenizer if tokenizer is not None else byte_tokenizer()
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=tied, attention_bias=bias, rope_parameters=rope)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        model.eval()
        if float_copy is not None:
            import copy

            float_copy.append(copy.deepcopy(model))
        for bi, block in enumerate(model.model.layers):
            for j, (name, lin) in enumerate(linears_of(block).items()):
                b = torch.randn(lin.out_features) * 0.02 if lin.bias is not None else None
                if quantize is not None:
                    from tests.helpers import correlated_hessian
                    from vptq.quantizer import quantize_weight

                    H = correlated_hessian(lin.in_features, tokens=512, seed=seed * 1000 + bi * 10 + j)
                    q, _ = quantize_weight(lin.weight.detach(), H, quantize, seed=seed * 1000 + bi * 10 + j)
                else:
                    q = random_vqweight(lin.out_features, lin.in_features, seed=seed * 1000 + bi * 10 + j, **vq)
                set_module(block, name, QuantLinear(q, bias=b))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def input_ids(batch=2, length=19, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def same_vqweight(a: VQWeight, b: VQWeight) -> None:
    for f in ("out_features", "in_features", "vector_len", "num_centroids", "group_num", "group_size",
              "num_res_centroids", "outlier_size", "outlier_vector_len", "outlier_num_centroids"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("centroids", "indices", "res_centroids", "res_indices", "outlier_centroids", "outlier_indices",
              "perm", "weight_scale", "weight_bias"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype or f.endswith(("indices", "perm")), f
            assert torch.equal(x.to(y.dtype), y), f


# ------------------------------------------------------------------------------------ one layer
LAYER_CASES = {
    "full": dict(),
    "plain_pow2": dict(k=16, k_res=0, outliers=0, perm=False, norm=False, groups=1),
    "residual_only": dict(k=256, k_res=256, outliers=0, perm=False, norm=False, groups=1, v=4),
    "outliers_perm": dict(k=8, k_res=0, outliers=16, v_out=4, k_out=7, groups=4),
    "norm_groups": dict(k=5, k_res=3, outliers=0, perm=True, norm=True, groups=8, v=3),
    "fp32_codebooks": dict(dtype=torch.float32, k=4096, k_res=0, outliers=0, v=2),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
@pytest.mark.parametrize("out_features", [48, 50])  # 50: padding rows for v in (3, 4, 6)
def test_layer_round_trip_exact(case, out_features):
    q = random_vqweight(out_features, 64, seed=len(case) + out_features, **LAYER_CASES[case])
    bias = torch.randn(out_features)
    t = layer_tensors(q, bias, prefix="x.")
    conf = layer_config(q, True)
    assert set(conf) == set(LAYER_KEYS)
    assert t["x.indices"].dtype == torch.int32
    assert t["x.centroids.weight"].shape == (q.group_num, conf["num_centroids"][1] * q.vector_len)
    sizes = {"num_centroids": q.num_centroids, "num_res_centroids": q.num_res_centroids}
    r, b = vqweight_from_tensors(conf, t, prefix="x.", true_sizes=sizes)
    same_vqweight(q, r)
    assert torch.equal(b, bias)
    assert torch.equal(q.dequantize(), r.dequantize())
    # without our metadata (a reader that only knows the official format) the padded codebook
    # still dequantizes to the same weight
    r2, _ = vqweight_from_tensors(conf, t, prefix="x.")
    assert torch.equal(q.dequantize(), r2.dequantize())


@pytest.mark.parametrize("case", ["full", "plain_pow2", "residual_only", "outliers_perm"])
def test_stored_bytes_equal_reported_storage(case):
    """Bits are counted from what is stored: the file's tensors == VQWeight.storage() (pow2 k, fp16)."""
    opts = {"k": 16, "k_res": 8, **LAYER_CASES[case]}  # powers of two: no codebook padding
    q = random_vqweight(50, 64, seed=3, **opts)
    t = layer_tensors(q)
    stored = sum(x.numel() * x.element_size() * 8 for x in t.values())
    assert stored == q.storage().total_bits
    assert t["indices"].numel() * 32 == q.storage().bits["indices"]


@pytest.mark.parametrize("opts,needle", [
    (dict(k=16, k_res=32), "num_res_centroids=32 > num_centroids=16"),
    (dict(v_out=1), "outlier_vector_len=1"),
    (dict(k=70000, k_res=0, outliers=0, groups=1, v=1), "num_centroids=70000 > 65536"),
])
def test_unexportable_layer_one_line_error(opts, needle):
    if opts.get("k") == 70000:  # build without allocating a huge random codebook
        q = random_vqweight(4, 8, k=4, k_res=0, outliers=0, groups=1, v=1)
        q.num_centroids = 70000
    else:
        q = random_vqweight(48, 64, **opts)
    with pytest.raises(ValueError, match=needle) as e:
        layer_tensors(q, prefix="model.layers.0.mlp.up_proj.")
    assert "\n" not in str(e.value) and "model.layers.0.mlp.up_proj" in str(e.value)


# ------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_model_save_load_bit_exact(tmp_path, tied, bias):
    rope = {"rope_type": "default", "rope_theta": 100000.0}
    model, tok = vq_tiny_llama(tied=tied, bias=bias, rope=rope, seed=1)
    ids = input_ids()
    ref = logits(model, ids)
    out = export_vptq(model, tok, str(tmp_path / "m"), method={"name": "test"}, run_config={"seed": 0})
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp dir left beside it
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)

    m2, tok2 = load_vptq(out)
    assert torch.equal(logits(m2, ids), ref)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            other = m2.get_submodule(name)
            assert isinstance(other, QuantLinear)
            same_vqweight(mod.qweight, other.qweight)
            assert (mod.bias is None) == (other.bias is None)
            if mod.bias is not None:
                assert torch.equal(mod.bias, other.bias)
    sd, sd2 = model.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    if tied:
        assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert tok2.encode("vq-bench") == tok.encode("vq-bench")
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tc = json.load(f)
    # transformers 5 saves "TokenizersBackend", a class 4.x (the official package's environment) lacks
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "local_files_only" not in tc

    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["rope_theta"] == 100000.0  # legacy key for transformers 4.x readers
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "vptq" and qc["modules_to_not_convert"] == ["lm_head"]
    # transformers 5.x replaces EVERY nn.Linear not in modules_to_not_convert and needs its config
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        arch = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    linears = {n for n, m in arch.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(qc["config_for_layers"]) | set(qc["modules_to_not_convert"]) == linears
    assert len(qc["config_for_layers"]) == 2 * 7
    me = qc["vq_bench"]
    assert me["format"] == FORMAT_NAME and me["format_version"] == FORMAT_VERSION
    assert me["method"] == {"name": "test"} and me["run_config"] == {"seed": 0}
    assert me["layers"]["model.layers.0.mlp.down_proj"]["num_centroids"] == 12
    assert 0 < me["bits"]["index"] < me["bits"]["total"]


def test_config_accepted_by_transformers_vptq_config(tmp_path):
    """transformers' VptqConfig (5.x here) validates every layer entry (VptqLayerConfig) and reads the
    keys its replace_with_vptq_linear indexes."""
    from transformers.utils.quantization_config import VptqConfig

    model, tok = vq_tiny_llama()
    export_vptq(model, None, str(tmp_path / "m"))
    qc = read_quantization_config(str(tmp_path / "m"))
    vc = VptqConfig.from_dict(qc)
    for name, lp in vc.config_for_layers.items():
        for key in ("vector_lens", "num_centroids", "num_res_centroids", "group_num", "group_size",
                    "outlier_size", "indices_as_float", "enable_norm", "enable_perm"):
            assert key in lp, (name, key)
        assert lp["is_indice_packed"] is True
    assert not os.path.exists(tmp_path / "m" / "tokenizer.json")


def test_sharded_checkpoint_loads_identically(tmp_path):
    model, tok = vq_tiny_llama(seed=2)
    ids = input_ids(seed=2)
    out = export_vptq(model, tok, str(tmp_path / "m"), max_shard_bytes=20_000)
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    m2, _ = load_vptq(out)
    assert torch.equal(logits(m2, ids), logits(model, ids))


def test_export_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    model, tok = vq_tiny_llama()
    out = str(tmp_path / "m")
    export_vptq(model, tok, out)
    before = sorted(os.listdir(out))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_vptq(model, tok, out)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="simulated"):
        export_vptq(model, tok, out, overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        export_vptq(model, tok, str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no half-written folder, no temp dir
    assert sorted(os.listdir(out)) == before  # the previous export untouched
    monkeypatch.undo()
    m2, _ = load_vptq(out)
    assert torch.equal(logits(m2, input_ids()), logits(model, input_ids()))


def test_refusals(tmp_path):
    from transformers import LlamaConfig

    from vptq.qweight import QuantizedWeight

    model, tok = vq_tiny_llama()
    with pytest.raises(ValueError, match="no QuantLinear"):
        export_vptq(torch.nn.Sequential(torch.nn.Linear(2, 2)), None, str(tmp_path / "a"))

    class Other(QuantizedWeight):  # a quantized weight that is not a VQWeight
        out_features, in_features = 4, 4

        def dequantize(self, dtype=torch.float32):
            return torch.zeros(4, 4, dtype=dtype)

        def storage(self):
            raise NotImplementedError

        def to(self, device):
            return self

    model.model.layers[0].mlp.up_proj = QuantLinear(Other())
    with pytest.raises(ValueError, match="up_proj holds a Other, not a VQWeight"):
        export_vptq(model, tok, str(tmp_path / "b"))

    plain = tmp_path / "plain"
    LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(plain)
    with pytest.raises(ValueError, match="quant_method is None; valid: 'vptq'"):
        load_vptq(str(plain))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vptq(str(tmp_path))


def test_pickle_checkpoints_are_not_loaded(tmp_path):
    model, tok = vq_tiny_llama()
    out = export_vptq(model, tok, str(tmp_path / "m"))
    os.rename(os.path.join(out, "model.safetensors"), os.path.join(out, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_vptq(out)


# ------------------------------------------------------------------------------------ the harness
def test_only_methods_with_an_exporter_may_save():
    """save.quantized=true: a method with an exporter passes the check, one without is refused before any
    work, in one line naming the methods that can be saved; every registered exporter imports."""
    import importlib

    from runners.errors import UserError
    from runners.save import EXPORTERS, check_exportable
    from vptq.methods import build_method, method_class

    for name, target in EXPORTERS.items():
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), target
        check_exportable(build_method(name, method_class(name).Config(), bits=2.0))
    with pytest.raises(UserError, match=r"save.quantized=true is not supported for method=rtn; .*vptq"):
        check_exportable(build_method("rtn", method_class("rtn").Config(), bits=2.0))


def test_export_run_writes_self_description(tmp_path):
    """save_quantized -> export_run (what save.quantized=true calls) on a hand-built model and a composed
    run config: the runner resolves the config once and hands the exporter plain data."""
    from omegaconf import OmegaConf

    from runners.save import save_quantized

    model, tok = vq_tiny_llama(seed=3)
    cfg = OmegaConf.create({"method": {"name": "vptq", "vector_len": 6}, "bits": 2.0, "seed": 0,
                            "model": {"name": "tiny_llama"}, "run_dir": "${model.name}-${bits}"})
    result = {"settings": {"v": 6}, "bits": {"index": 2.1, "total": 2.5}, "ppl": {"pydoc": 300.0}}
    out = str(tmp_path / "quantized_model")
    save_quantized(model, tok, cfg, result, out)
    me = read_quantization_config(out)["vq_bench"]
    assert me["method"] == {"name": "vptq", "settings": {"v": 6}}
    assert me["run_config"]["run_dir"] == "tiny_llama-2.0"  # resolved
    assert me["run"]["ppl"] == {"pydoc": 300.0}
    m2, _ = load_vptq(out)
    assert torch.equal(logits(m2, input_ids()), logits(model, input_ids()))


class NearestVQ(Method):
    """A stand-in VQ method for the harness test (no algorithm): codebook = k of the layer's own
    column vectors, nearest-centroid indices, VQWeight layout with padding rows (64 % 6). Registered
    under the name "vptq" only inside the test."""

    name = "vptq"
    needs_hessian = False

    @dataclass
    class Config:
        name: str = "vptq"
        vector_len: int = 6
        num_centroids: int = 16

    def quantize_layer(self, W, H, *, name):
        v, k = self.config.vector_len, self.config.num_centroids
        out_f, in_f = W.shape
        n = math.ceil(out_f / v)
        Wp = torch.nn.functional.pad(W.float(), (0, 0, 0, n * v - out_f))  # (n*v, in)
        vec = Wp.T.reshape(in_f, n, v).permute(1, 0, 2).reshape(-1, v)  # (n*in, v): vector row r, column c
        g = torch.Generator().manual_seed(self.layer_seed(name))
        cb = vec[torch.randperm(vec.shape[0], generator=g)[:k]].half()  # (k, v)
        idx = torch.cdist(vec, cb.float()).argmin(1).reshape(n, in_f)  # (n, in)
        return VQWeight(out_features=out_f, in_features=in_f, vector_len=v, num_centroids=k, group_num=1,
                        group_size=in_f, centroids=cb[None], indices=idx[None])


@pytest.mark.slow
def test_harness_save_quantized_in_process(tmp_path, monkeypatch):
    """save.quantized=true through runners.job.run_job (check_exportable, driver, EXPORTERS, export_run)
    with a stand-in VQ method; the reloaded folder reproduces the job's perplexity exactly."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from runners.cli import register_resolvers
    from runners.data import eval_windows
    from runners.job import run_job
    from runners.ppl import perplexity
    from runners.schema import register_configs
    from vptq import methods

    register_configs()
    register_resolvers()
    # this module as pytest imported it (its NearestVQ.Config is the class the config node holds)
    monkeypatch.setitem(methods.METHODS, "vptq", f"{__name__}:NearestVQ")
    ov = ["model=tiny_llama", "method=rtn", "bits=4", "logger=none", "save.quantized=true", "eval.seqlen=64",
          "eval.max_windows=2", f"results_root={tmp_path}", "resume=false", "device=cpu"]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf"),
                               version_base="1.3"):
        cfg = compose(config_name="config", overrides=ov)
    OmegaConf.set_struct(cfg, False)
    cfg.method = OmegaConf.structured(NearestVQ.Config())
    job = tmp_path / "job"
    ppl = run_job(cfg, job_dir=str(job))
    with open(job / "metrics.json") as f:
        met = json.load(f)
    assert met["status"] == "ok" and met["method"] == "vptq"
    m2, tok2 = load_vptq(str(job / "quantized_model"))
    me = read_quantization_config(str(job / "quantized_model"))["vq_bench"]
    assert me["run_config"]["method"]["name"] == "vptq" and me["run_config"]["model"]["name"] == "tiny_llama"
    assert me["bits"]["total"] == pytest.approx(met["bits"]["total"], rel=1e-12)
    w = eval_windows(cfg.data.name, None, tok2, 64, 2)
    assert perplexity(m2, w, torch.device("cpu")) == ppl


@pytest.mark.slow
def test_harness_save_quantized_reloads_to_same_ppl(tmp_path):
    """`save.quantized=true method=vptq` through the CLI; the reloaded folder gives the job's perplexity."""
    from vptq.methods import METHODS

    if "vptq" not in METHODS:
        pytest.skip("method=vptq is not registered yet (vptq/methods.py METHODS)")
    from runners.data import eval_windows
    from runners.ppl import perplexity
    from tests.helpers import run_cli

    job = tmp_path / "job"
    r = run_cli(["model=tiny_llama", "method=vptq", "bits=4", "logger=none", "save.quantized=true",
                 "calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=4",
                 f"hydra.run.dir={job}", f"results_root={tmp_path}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(job / "metrics.json") as f:
        met = json.load(f)
    assert met["status"] == "ok"
    m2, tok2 = load_vptq(str(job / "quantized_model"))
    qc = read_quantization_config(str(job / "quantized_model"))
    assert qc["vq_bench"]["run_config"]["method"]["name"] == "vptq"
    ds = next(iter(met["ppl"]))
    w = eval_windows(ds, None, tok2, 64, 4)
    assert perplexity(m2, w, torch.device("cpu")) == pytest.approx(met["ppl"][ds], rel=1e-6)


def test_library_packages_import_nothing_from_the_runner():
    """vptq/ and baselines/ are the library: they import neither runners/ nor OmegaConf (the runner converts
    its Hydra config once, at the entry, and passes plain values down; STYLE.md)."""
    import ast

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad = []
    for pkg in ("vptq", "baselines"):
        for root, _, files in os.walk(os.path.join(repo, pkg)):
            for fn in files:
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(root, fn)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    bad += [f"{os.path.relpath(path, repo)}:{node.lineno} imports {n}" for n in names
                            if n.split(".")[0] in ("runners", "omegaconf", "hydra")]
    assert not bad, bad


# the paper's Table 8 shape, scaled to the tiny model: outlier columns with their own codebook (v_o=4)
# beside a residual pair on the other columns (v=6: padding rows on 32/64/160 rows), 2 groups
TABLE8_TINY = dict(vector_len=6, num_centroids=32, num_res_centroids=16, group_num=2, outlier_size=4,
                   outlier_vector_len=4, outlier_num_centroids=32)


def test_table8_style_config_quantizes_exports_and_reloads_exactly(tmp_path):
    """Outliers + residual (Table 8 style) through the whole path: our quantizer, the official-format
    export (each layer's VQuantLinear kwargs as Microsoft's package reads them), our loader (bit-exact),
    and the realized bits counted from what is stored (== the budget's count, == the file's bytes)."""
    from vptq.budget import LayerConfig, storage_bits

    cfg = LayerConfig(**TABLE8_TINY)
    model, tok = vq_tiny_llama(quantize=cfg, seed=4)
    ids = input_ids(seed=4)
    out = export_vptq(model, tok, str(tmp_path / "m"))
    m2, _ = load_vptq(out)
    assert torch.equal(logits(m2, ids), logits(model, ids))
    qc = read_quantization_config(out)
    total, numel = 0, 0
    for name, lc in qc["config_for_layers"].items():
        q = model.get_submodule(name).qweight
        same_vqweight(q, m2.get_submodule(name).qweight)
        # what microsoft/VPTQ's VQuantLinear(**lc) reads: [outlier, main] pairs; a residual only on the main
        # part (num_res_centroids[0] must be -1, its one refusal); outliers enabled by v_o > 1 and k_o > 0
        assert lc["vector_lens"] == [4, 6] and lc["num_centroids"] == [32, 32]
        assert lc["num_res_centroids"] == [-1, 16] and lc["outlier_size"] == 4 and lc["group_num"] == 2
        assert lc["group_size"] == (lc["in_features"] - 4) // 2 and lc["enable_perm"] is True
        assert q.storage().bits == storage_bits(q.out_features, q.in_features, cfg)
        stored = sum(t.numel() * t.element_size() * 8 for t in layer_tensors(q).values())
        assert stored == q.storage().total_bits  # counted from the stored tensors
        total += q.storage().total_bits
        numel += q.storage().numel
    realized = qc["vq_bench"]["bits"]["total"]
    assert realized == total / numel
    print(f"Table 8-style {cfg.short()} on the tiny Llama: {realized:.4f} total bits/weight "
          f"(index {qc['vq_bench']['bits']['index']:.4f})")


def test_absorbed_act_order_exports_without_a_permutation(tmp_path):
    """One group, no outliers: the export carries no perm (enable_perm false) and reloads bit-exactly."""
    from vptq.budget import LayerConfig

    model, tok = vq_tiny_llama(quantize=LayerConfig(vector_len=4, num_centroids=16, num_res_centroids=4), seed=5)
    out = export_vptq(model, tok, str(tmp_path / "m"))
    qc = read_quantization_config(out)
    assert all(lc["enable_perm"] is False for lc in qc["config_for_layers"].values())
    import safetensors.torch

    assert not [k for k in safetensors.torch.load_file(os.path.join(out, "model.safetensors")) if k.endswith(".perm")]
    m2, _ = load_vptq(out)
    assert torch.equal(logits(m2, input_ids()), logits(model, input_ids()))


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from runners.cli import register_resolvers
    from runners.schema import register_configs

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf"),
                               version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.slow
def test_released_model_is_a_row(tmp_path):
    """method=released model=hf model.path=<official-format folder>: our own export stands in for a
    VPTQ-community download. The job evaluates it through the same protocol (perplexity == the folder
    scored directly), counts its bits from the loaded layers' stored tensors (== the export's own count),
    and gives KL only when the float model it came from is named (method.float_model)."""
    from runners.data import eval_windows
    from runners.job import run_job
    from runners.ppl import perplexity
    from vptq.budget import LayerConfig

    floats = []
    model, tok = vq_tiny_llama(quantize=LayerConfig(vector_len=4, num_centroids=16, num_res_centroids=4), seed=9,
                               float_copy=floats)
    release = export_vptq(model, tok, str(tmp_path / "tiny-v4-k16-4-woft"))
    floats[0].save_pretrained(str(tmp_path / "float"))
    tok.save_pretrained(str(tmp_path / "float"))
    me = read_quantization_config(release)["vq_bench"]

    base = ["model=hf", f"model.path={release}", "model.name=tiny_release", "model.dtype=float32", "method=released",
            "eval.seqlen=64", "eval.max_windows=2", "logger=none", f"results_root={tmp_path}", "resume=false",
            "device=cpu"]
    run_job(_compose(base), job_dir=str(tmp_path / "job"))
    with open(tmp_path / "job" / "metrics.json") as f:
        met = json.load(f)
    assert met["status"] == "ok" and met["method"] == "released", met.get("error")
    assert met["bits"]["total"] == pytest.approx(me["bits"]["total"], rel=1e-12)
    assert met["bits"]["index"] == pytest.approx(me["bits"]["index"], rel=1e-12)
    assert met["bits"]["target"] is None and set(met["bits"]["components"]) == {"indices", "codebooks", "res_codebooks"}
    assert met["settings"]["64x64"] == "v4k16r4" and met["settings"]["float_model"] is None
    assert met["kld"] == {}  # no float model named: no KL
    m2, tok2 = load_vptq(release)
    w = eval_windows("pydoc", None, tok2, 64, 2)
    assert met["ppl"]["pydoc"] == perplexity(m2, w, torch.device("cpu"))

    run_job(_compose(base + [f"method.float_model={tmp_path / 'float'}", f"eval.kld_cache={tmp_path / 'refs'}"]),
            job_dir=str(tmp_path / "job_kl"))
    with open(tmp_path / "job_kl" / "metrics.json") as f:
        met2 = json.load(f)
    assert met2["status"] == "ok", met2.get("error")
    assert met2["ppl"] == met["ppl"] and met2["bits"] == met["bits"]
    kl = met2["kld"]["pydoc"]
    assert 0 < kl["mean"] < 10 and 0 <= kl["top1_agree"] <= 100  # percent


def test_released_refusals(tmp_path):
    """One line each: no model.path, a folder that is not in the VPTQ format, a folder without tokenizer."""
    from runners.errors import UserError
    from runners.models import load_released
    from vptq.methods import build_method
    from vptq.released import Released

    m = build_method("released", Released.Config(), bits=None)
    cfg = _compose(["model=hf", "method=released"]).model
    with pytest.raises(UserError, match="method=released needs model.path=FOLDER"):
        load_released(cfg, m)
    model, tok = vq_tiny_llama(seed=1)
    export_vptq(model, None, str(tmp_path / "notok"))
    cfg.path = str(tmp_path / "notok")
    with pytest.raises(UserError, match="has no tokenizer files") as e:
        load_released(cfg, m)
    assert "\n" not in str(e.value)
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(tmp_path / "plain")
    cfg.path = str(tmp_path / "plain")
    with pytest.raises(UserError, match="quant_method is None; valid: 'vptq'"):
        load_released(cfg, m)
    from vptq.methods import MethodError

    with pytest.raises(MethodError, match="method.format='aqlm'; valid: vptq"):
        build_method("released", Released.Config(format="aqlm"), bits=None)


def test_paper_experiment_composes_and_fails_offline_in_one_line(tmp_path, monkeypatch):
    """+experiment=paper: C4 calibration, 128 x 2048 tokens, float-model Hessians, the authors' iteration
    counts; the command line still picks a local copy (data=text data.path=...). Offline, C4 fails at once
    with one line saying how to point at a local copy."""
    cfg = _compose(["+experiment=paper", "method=vptq"])
    assert (cfg.data.name, cfg.calib.nsamples, cfg.calib.seqlen) == ("c4", 128, 2048)
    assert (cfg.hessian.protocol, cfg.method.iters, cfg.eval.seqlen) == ("float", "paper", 2048)
    local = _compose(["+experiment=paper", "data=text", "data.path=/some/dir"])
    assert (local.data.name, local.data.path, local.calib.nsamples) == ("text", "/some/dir", 128)

    from runners import hub
    from runners.job import run_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr("runners.data.hub_reachable", lambda *a, **k: False)
    cfg = _compose(["+experiment=paper", "model=tiny_llama", "method=rtn", "bits=4", "logger=none",
                    f"results_root={tmp_path}", "resume=false", "device=cpu",
                    f"hydra.run.dir={tmp_path / 'job'}"])
    with pytest.raises(SystemExit):
        run_job(cfg, job_dir=str(tmp_path / "job"))
    with open(tmp_path / "job" / "metrics.json") as f:
        met = json.load(f)
    assert met["status"] == "failed" and "\n" not in met["error"]
    assert "allenai/c4" in met["error"] and "data=text data.path=DIR" in met["error"]
