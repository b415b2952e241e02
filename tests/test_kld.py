"""Distribution metrics against the float model: KL(fp||q), top-1 agreement, Δp of the correct token,
PPL ratio and intervals, measured against independently written plain-torch computations; the float
reference cached once per (weights, windows, k, dtype, device) and never read for anything else."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from runners.kld import cache_key, cache_path, compute_reference, float_reference, load
from runners.ppl import kld_summary, ppl_interval, score
from tests.helpers import metrics_under, run_cli


def _tiny(seed=0, layers=2):
    from runners.models import tiny_model
    from runners.schema import ModelConfig, TinyModelConfig

    m, _ = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=layers,
                                                                                init_seed=seed)))
    return m.eval()


def _perturbed(model, scale=0.05, seed=1):
    """A stand-in for a quantized model: every linear weight plus noise."""
    import copy

    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in q.named_parameters():
            if n.endswith("proj.weight"):
                p += scale * p.abs().mean() * torch.randn(p.shape, generator=g)
    return q


def _windows(n=3, L=40, seed=2):
    return torch.randint(0, 250, (n, L), generator=torch.Generator().manual_seed(seed))


def _plain(fp, q, windows):
    """Independent: full-vocabulary log-softmax of both models on each whole window (no chunks)."""
    kl, agree, dp2, nq, nf = [], 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for w in windows:
            lp = F.log_softmax(fp(w[None]).logits[0, :-1].double(), -1)
            lq = F.log_softmax(q(w[None]).logits[0, :-1].double(), -1)
            y = w[1:]
            kl.append((lp.exp() * (lp - lq)).sum(-1))
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            pt, qt = lp.gather(1, y[:, None])[:, 0], lq.gather(1, y[:, None])[:, 0]
            dp2 += float(((qt.exp() - pt.exp()) ** 2).sum())
            nq -= float(qt.sum())
            nf -= float(pt.sum())
    kl = torch.cat(kl)
    T = kl.numel()
    return {"mean": float(kl.mean()), "max": float(kl.max()), "median": float(kl.median()),
            "top1_agree": 100.0 * agree / T, "rms_dp": math.sqrt(dp2 / T), "ppl_ratio": math.exp((nq - nf) / T)}


def test_kl_and_top1_equal_a_plain_torch_computation():
    fp, windows = _tiny(), _windows()
    q = _perturbed(fp, scale=0.5)
    ref = compute_reference(fp, windows, "cpu", topk=10**9)  # k >= vocabulary: exact KL
    assert ref.topk == ref.vocab == fp.config.vocab_size
    s = score(q, windows, "cpu", reference=ref)
    got, want = kld_summary(s), _plain(fp, q, windows)
    # fp32 log-softmax (per 128-token chunk) against fp64 on whole windows: each fp32 log-prob (|log p| ~ 5.5)
    # carries ~3e-7 of rounding, so per-token KL agrees to ~1e-6 absolute, not bitwise
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-3, abs=2e-6)
    assert got["max"] == pytest.approx(want["max"], rel=1e-3, abs=2e-6)
    assert got["rms_dp"] == pytest.approx(want["rms_dp"], rel=1e-3, abs=1e-8)
    assert got["ppl_ratio"] == pytest.approx(want["ppl_ratio"], rel=1e-5)
    assert abs(got["top1_agree"] - want["top1_agree"]) <= 100.0 / got["tokens"]  # one near-tie at most
    assert got["fp_tail_mass"] == 0.0 and 0 < got["mean"] and got["top1_agree"] < 100.0


def test_top_k_bucket_is_a_lower_bound_that_tightens_with_k():
    fp, windows = _tiny(), _windows()
    q = _perturbed(fp, scale=0.2)
    exact = kld_summary(score(q, windows, "cpu", reference=compute_reference(fp, windows, "cpu", 10**9)))["mean"]
    prev = 0.0
    for k in (4, 32, 128):
        s = kld_summary(score(q, windows, "cpu", reference=compute_reference(fp, windows, "cpu", k)))
        assert prev - 1e-7 <= s["mean"] <= exact + 1e-7 and s["fp_tail_mass"] > 0  # grouping never adds KL
        prev = s["mean"]
    assert prev > 0.5 * exact


def test_same_model_is_kl_zero_and_full_agreement(tmp_path):
    fp, windows = _tiny(), _windows()
    ref, info = float_reference(fp, windows, "cpu", weights="w0", folder=str(tmp_path), topk=64)
    assert info["computed"]
    ref2, info2 = float_reference(fp, windows, "cpu", weights="w0", folder=str(tmp_path), topk=64)
    assert not info2["computed"] and torch.equal(ref2.topk_logp, ref.topk_logp)
    s = kld_summary(score(fp, windows, "cpu", reference=ref2))
    assert abs(s["mean"]) <= 1e-6 and s["max"] <= 1e-6 and s["top1_agree"] == 100.0 and s["rms_dp"] == 0.0
    assert s["ppl_ratio"] == pytest.approx(1.0, abs=1e-12)


def test_cache_key_misses_for_other_weights_windows_or_k(tmp_path, caplog):
    fp, windows = _tiny(), _windows()
    _, info = float_reference(fp, windows, "cpu", weights="A", folder=str(tmp_path), topk=16)
    key = cache_key(weights="A", windows=windows, topk=16, dtype=torch.float32, device="cpu")
    assert info["path"] == cache_path(str(tmp_path), key) and load(info["path"], key) is not None
    for other in (dict(weights="B"), dict(windows=_windows(seed=9)), dict(topk=8)):
        k2 = cache_key(**{**dict(weights="A", windows=windows, topk=16, dtype=torch.float32, device="cpu"), **other})
        assert cache_path(str(tmp_path), k2) != info["path"]
        assert float_reference(fp, other.get("windows", windows), "cpu", weights=other.get("weights", "A"),
                               folder=str(tmp_path), topk=other.get("topk", 16))[1]["computed"]
    # a file renamed into another key's place is detected by the key stored inside it, not trusted
    k3 = cache_key(weights="C", windows=windows, topk=16, dtype=torch.float32, device="cpu")
    import shutil

    shutil.copy(info["path"], cache_path(str(tmp_path), k3))
    with caplog.at_level(logging.WARNING):
        assert load(cache_path(str(tmp_path), k3), k3) is None
    assert "made for another weights" in caplog.text


def test_weights_fingerprint_tells_models_apart(tmp_path):
    from runners.fingerprint import weights_fingerprint

    a, b = _tiny(seed=0), _tiny(seed=1)
    assert weights_fingerprint(a) == weights_fingerprint(_tiny(seed=0)) != weights_fingerprint(b)
    a.save_pretrained(tmp_path / "a")  # from a folder: the files' headers and sampled data blocks
    from transformers import AutoModelForCausalLM

    fa = weights_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "a"))
    b.save_pretrained(tmp_path / "b")
    fb = weights_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "b"))
    assert fa != fb and len(fa) == 32


def test_ppl_interval_contains_the_point_and_narrows_with_windows():
    fp = _tiny()
    widths = []
    for n in (4, 16, 48):
        s = score(fp, _windows(n=n, L=32, seed=3), "cpu")
        ci = ppl_interval(s)
        assert ci["low"] <= s.ppl <= ci["high"] and ci["point"] == s.ppl
        widths.append((ci["high"] - ci["low"]) / s.ppl)
    assert widths[0] > widths[1] > widths[2]
    assert ppl_interval(s)["low"] == ppl_interval(s)["low"]  # seeded: the same interval every time


@pytest.mark.slow
def test_sweep_computes_the_float_reference_once_and_fp16_is_kl_zero(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "model=tiny_llama", "eval.seqlen=64", "eval.max_windows=4", "method=fp16,rtn", "bits=3,4",
                 "logger=none", f"hydra.sweep.dir={sweep}", f"results_root={tmp_path}",
                 f"eval.kld_cache={tmp_path / 'ref'}", "hydra.job.chdir=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    ms = [m for m in metrics_under(sweep) if m["status"] == "ok" and "reused_from" not in m]
    assert len(ms) == 3  # fp16 (bits ignored: one run), rtn 3 and 4 bits
    computed = [m["kld"]["pydoc"]["reference"]["computed"] for m in ms]
    assert computed.count(True) == 1 and len(list((tmp_path / "ref").glob("*.safetensors"))) == 1
    log = r.stdout + r.stderr
    assert log.count("float reference pydoc: computed") == 1 and log.count("read from the cache") == 2
    fp16 = next(m for m in ms if m["method"] == "fp16")
    assert abs(fp16["kld"]["pydoc"]["mean"]) <= 1e-6 and fp16["kld"]["pydoc"]["top1_agree"] == 100.0
    by = {m["bits"]["target"]: m["kld"]["pydoc"] for m in ms if m["method"] == "rtn"}
    assert by[3.0]["mean"] > by[4.0]["mean"] > 0  # fewer bits, further from the float model
    for m in ms:
        ci = m["ppl_ci"]["pydoc"]
        assert ci["low"] <= m["ppl"]["pydoc"] <= ci["high"]
        assert m["comparison"]["finetune"] == "none" and m["comparison"]["eval"]["pydoc"]["tokens"] == 4 * 63
    from analysis.report import write_report

    write_report(str(sweep))
    md = (sweep / "results.md").read_text()
    assert "KLD pydoc @64 ↓" in md and "top-1 agree pydoc (%) ↑" in md
    assert (sweep / "pareto_kld_tiny_llama_pydoc_64.png").is_file()


@pytest.mark.slow
def test_rtn_bits_order_the_kl_and_ppl_on_the_bundled_model(tmp_path):
    """RTN at 2, 3, 4 bits on SmolLM2-135M: fewer bits, larger KL to the float model, lower top-1 and
    higher perplexity (fp16 < 4 < 3 < 2 bits; one quantization per width serves all three)."""
    from runners.data import eval_windows
    from runners.driver import quantize_model
    from runners.models import load_model
    from runners.schema import ModelConfig
    from vptq.methods import build_method, method_class

    cfg = ModelConfig(name="smollm2_135m", source="smollm2_gguf")
    model, tok = load_model(cfg)
    w = eval_windows("pydoc", None, tok, 128, 4)
    ref = compute_reference(model, w, "cpu", 64)
    ppl = {"fp16": score(model, w, "cpu").ppl}
    res = {}
    for b in (4.0, 3.0, 2.0):
        m, _ = load_model(cfg)
        quantize_model(m, build_method("rtn", method_class("rtn").Config(), bits=b), calib=None, device="cpu")
        s = score(m, w, "cpu", reference=ref)
        res[b], ppl[b] = kld_summary(s), s.ppl
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["fp16"] < ppl[4.0] < ppl[3.0] < ppl[2.0], ppl
    assert res[4.0]["mean"] < res[3.0]["mean"] < res[2.0]["mean"]
    assert res[4.0]["top1_agree"] > res[3.0]["top1_agree"] > res[2.0]["top1_agree"]


def test_metrics_record_roundtrips_and_reads_version_1():
    from runners.record import FORMAT_VERSION, RunRecord

    old = {"run_key": "k", "model": "m", "method": "rtn", "status": "ok", "bits": {"target": 2.0, "index": 2.0,
           "total": 2.03}, "ppl": {"pydoc": 9.0}, "time": {"quantize_s": 1.0, "eval_s": 2.0}, "mystery": 1}
    r = RunRecord.from_dict(old)
    assert r.format_version == 1 and r.bits.total == 2.03 and r.time.eval_s == 2.0 and r.extra == {"mystery": 1}
    r2 = RunRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert r2.to_dict() == r.to_dict() and r2.extra["mystery"] == 1
    assert RunRecord(run_key="x", model="m", method="v").to_dict()["format_version"] == FORMAT_VERSION
    failed = RunRecord(run_key="x", model="m", method="v", status="failed", error="boom").to_dict()
    assert set(failed) <= {"run_key", "config_key", "model", "method", "bits", "status", "error", "traceback",
                           "format_version", "seed"}
