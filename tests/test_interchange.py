"""Interchange with Microsoft's `vptq` 0.0.5.post1: our exported folders load in the official
package (its own loader and transformers' VptqConfig path) with the logits of our model, and our
packer writes the same words as theirs. The folder loads whole there: its tokenizer (written by
transformers 5) loads in their transformers 4.57, gives our token ids, and their model scores the
windows it tokenized with our perplexity. Layers from our quantizer are among the exports: outliers
beside a residual codebook (the paper's Table 8 shape) and an act order absorbed into the index order.

Their package shares our import name, so it runs in a separate venv (scripts/interchange_env.py:
transformers 4.57 + vptq 0.0.5.post1 --no-deps + a stub sentence_transformers, CPU torch), in a
subprocess. The venv is built once and cached (~45-60 s with a reachable package index, ~1.2 GB);
without one the test skips and says why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vptq.format import export_vptq, load_vptq
from vptq.pack import pack_indices, to_uint16_view, unpack_indices
from vptq.qlinear import QuantLinear
from tests.test_format import TABLE8_TINY, input_ids, logits, vq_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "interchange_env.py")
ATOL = 1e-5  # logits are O(1); measured max abs diff is 0.0 on this machine
# perplexity of the windows their tokenizer cut, scored by their model (float64 sum of float32 token NLLs
# of the whole window's logits), against ours (runners.ppl: the LM head per chunk of 128 tokens, another
# matmul shape, so other last bits; transformers 4.57 and 5.24 may also sum attention in another order):
# measured relative differences 9e-8 to 3e-7 here (the issue measured 7e-8 on SmolLM2), bound 1e-5
PPL_RTOL = 1e-5
SEQLEN, WINDOWS = 64, 4

# runs in the OTHER venv (their `vptq`); reads and writes safetensors only
WORKER = r'''
import json, math, sys, torch
import torch.nn.functional as F
import safetensors.torch as st
import transformers, vptq
from vptq.utils.pack import pack_index, unpack_index_tensor

job = json.load(open(sys.argv[1]))
out, info = {}, {"vptq": vptq.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                 "vptq_file": vptq.__file__, "layers": {}, "tokenizers": {}, "ppl": {}}
cases = st.load_file(job["pack_file"])
for i, (ib, rb, gs) in enumerate(job["pack_cases"]):
    idx, res = cases[f"idx{i}"], (cases[f"res{i}"] if rb else None)
    out[f"packed{i}"] = pack_index(idx, ib, res, rb, index_dtype=torch.uint16)
    a, b = unpack_index_tensor(cases[f"ours{i}"], ib, gs, rb, gs if rb else 0)
    out[f"unpacked{i}"] = a
    if rb:
        out[f"unpacked_res{i}"] = b
ids = st.load_file(job["ids_file"])["ids"]
for name, folder in job["folders"].items():
    ids_tok = None
    if name in job["scored"]:  # the folder's own tokenizer, loaded by transformers 4.57
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        info["tokenizers"][name] = type(tok).__name__
        text = open(job["text_file"], encoding="utf-8").read()
        ids_tok = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        out[f"{name}/token_ids"] = ids_tok
    loaders = {
        "vptq": lambda: vptq.AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}, dtype=torch.float32),
        "hf": lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}),
    }
    for lname, load in loaders.items():
        m = load()
        vq = {n: l for n, l in m.named_modules() if isinstance(l, vptq.VQuantLinear)}
        info["layers"][f"{name}/{lname}"] = sorted(vq)
        with torch.no_grad():
            out[f"{name}/{lname}/logits"] = m(ids).logits.float().contiguous()
            for n, l in vq.items():  # dense weight (+ bias) through the official layer
                out[f"{name}/{lname}/{n}"] = l(torch.eye(l.in_features)).contiguous()
            if ids_tok is not None:  # the pinned protocol: non-overlapping windows, exp(mean token NLL)
                L = job["seqlen"]
                w = ids_tok[: job["windows"] * L].view(-1, L)
                nll, count = torch.zeros((), dtype=torch.float64), 0
                for i in range(w.shape[0]):
                    lg = m(w[i:i + 1]).logits[0, :-1].float()
                    nll += F.cross_entropy(lg, w[i, 1:], reduction="sum").double()
                    count += L - 1
                info["ppl"][f"{name}/{lname}"] = math.exp(float(nll) / count)
st.save_file(out, job["out_file"])
json.dump(info, open(job["info_file"], "w"))
'''

PACK_CASES = [(12, 8, 7), (16, 16, 3), (13, 0, 11), (4, 4, 63), (15, 7, 100), (16, 0, 257), (10, 10, 33)]

MODELS = {
    # tied embeddings, q/k/v/o biases, rope_theta != 10000 (needs the 4.x legacy key), every VQ part:
    # residual, outliers, perm, norm, 2 groups, padding rows (160 % 6), non-power-of-two k and k_res
    "tied_bias_theta": dict(tied=True, bias=True, rope={"rope_type": "default", "rope_theta": 100000.0}, seed=5),
    # llama3 rope scaling (4.x rope_scaling), power-of-two codebooks, 4 groups, 4-long outlier vectors
    "llama3_rope": dict(tied=False, rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64},
                        seed=6, v=4, k=256, k_res=16, groups=4, outliers=16, v_out=4, k_out=16),
}


# text the tokenizers cut: English prose (CPython's pydoc topics, always installed) and a few non-ASCII
# characters, so byte-level pieces and merges are exercised
def _text() -> str:
    from runners.data import pydoc_parts

    return pydoc_parts()[1][:12000] + "\n\nnaïve café — 東京 😀\n"


TEXT = _text()


def _smollm2_tokenizer():
    """SmolLM2's own tokenizer (the issue's case: transformers 5 saves it as TokenizersBackend), from the
    bundled model's converted folder; None where the bundled model is not installed."""
    from runners.errors import UserError
    from runners.models import smollm2_folder

    try:
        folder = smollm2_folder()
    except UserError:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def scored_models():
    """Models exported WITH a tokenizer and scored in their environment: name -> (vq_tiny_llama kwargs,
    tokenizer factory). Two are quantized by our quantizer (not random codes)."""
    from runners.models import byte_tokenizer
    from vptq.budget import LayerConfig

    return {
        # outliers (v_o=4) beside a residual pair, 2 groups: the paper's Table 8 shape (perm stored)
        "table8": (dict(quantize=LayerConfig(**TABLE8_TINY), seed=4), byte_tokenizer),
        # one group, no outliers: the act order absorbed into the index order (no perm in the folder)
        "absorbed": (dict(quantize=LayerConfig(vector_len=4, num_centroids=16, num_res_centroids=4), seed=5),
                     byte_tokenizer),
        "smollm2_tokenizer": (dict(seed=8, k=16, k_res=4, groups=1, outliers=0, v=4), _smollm2_tokenizer),
    }


@pytest.fixture(scope="module")
def their_python():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    check = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True, env=env)
    if check.returncode == 0:
        return check.stdout.strip()
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        pytest.skip(f"cannot build the interchange venv for Microsoft's vptq 0.0.5.post1 (needs the package "
                    f"index; python scripts/interchange_env.py): {tail}")
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_official_vptq_loads_our_export(tmp_path, their_python):
    ids = input_ids(batch=2, length=23, seed=7)
    import safetensors.torch as st

    st.save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    g = torch.Generator().manual_seed(11)
    cases, ours = {}, {}
    for i, (ib, rb, gs) in enumerate(PACK_CASES):
        idx = torch.randint(0, 2**ib, (2, 3, gs), generator=g)
        res = torch.randint(0, 2**rb, (2, 3, gs), generator=g) if rb else None
        cases[f"idx{i}"] = to_uint16_view(idx)  # their packer views indices as uint16
        if rb:
            cases[f"res{i}"] = to_uint16_view(res)
        cases[f"ours{i}"] = ours[i] = pack_indices(idx, ib, res, rb)
        ours[i] = (idx, res, ours[i])
    st.save_file(cases, str(tmp_path / "pack.safetensors"))

    models, folders, scored = {}, {}, []
    for name, opts in MODELS.items():
        models[name] = vq_tiny_llama(**opts)[0]
        folders[name] = export_vptq(models[name], None, str(tmp_path / name))
    for name, (opts, make_tok) in scored_models().items():  # exported with their tokenizer
        tok = make_tok()
        if tok is None:
            continue
        models[name], tok = vq_tiny_llama(tokenizer=tok, **opts)
        folders[name] = export_vptq(models[name], tok, str(tmp_path / name))
        scored.append(name)
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    job = {"pack_file": str(tmp_path / "pack.safetensors"), "pack_cases": PACK_CASES,
           "ids_file": str(tmp_path / "ids.safetensors"), "folders": folders,
           "out_file": str(tmp_path / "out.safetensors"), "info_file": str(tmp_path / "info.json"),
           "scored": scored, "text_file": str(text_file), "seqlen": SEQLEN, "windows": WINDOWS}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    # -I and cwd outside the repo: their `vptq` must not be shadowed by ours
    r = subprocess.run([their_python, "-I", str(tmp_path / "worker.py"), str(tmp_path / "job.json")],
                       cwd=str(tmp_path), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["vptq"] == "0.0.5.post1" and info["transformers"].startswith("4.57"), info
    got = st.load_file(str(tmp_path / "out.safetensors"))

    # packing: their packer == ours, word for word; their unpacker reads ours back
    for i, (ib, rb, gs) in enumerate(PACK_CASES):
        idx, res, packed = ours[i]
        assert torch.equal(got[f"packed{i}"], packed), (ib, rb, gs)
        assert torch.equal(got[f"unpacked{i}"], idx), (ib, rb, gs)
        if rb:
            assert torch.equal(got[f"unpacked_res{i}"], res), (ib, rb, gs)
        a, b = unpack_indices(got[f"packed{i}"], ib, gs, rb)
        assert torch.equal(a, idx)

    report = {}
    for name, model in models.items():
        ref = logits(model, ids)
        mine = logits(load_vptq(folders[name])[0], ids)
        assert torch.equal(mine, ref)
        qnames = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
        for lname in ("vptq", "hf"):
            assert info["layers"][f"{name}/{lname}"] == qnames  # every quantized linear became a VQuantLinear
            for n in qnames:
                lin = model.get_submodule(n)
                with torch.no_grad():
                    dense = lin(torch.eye(lin.in_features))
                assert torch.equal(got[f"{name}/{lname}/{n}"], dense), (name, lname, n)
            theirs = got[f"{name}/{lname}/logits"]
            diff = float((theirs - ref).abs().max())
            report[f"{name}/{lname}"] = diff
            assert diff <= ATOL, (name, lname, diff)
    print("max abs logit diff, official loaders vs ours:", report)

    # the whole folder in their environment: tokenizer (4.57) -> our ids -> their model -> our perplexity
    from runners.data import tokenize
    from runners.ppl import perplexity

    assert scored, "no model was exported with a tokenizer"
    ppl_report = {}
    for name in scored:
        m2, tok2 = load_vptq(folders[name])
        ours = tokenize(tok2, TEXT)
        assert info["tokenizers"][name] == "PreTrainedTokenizerFast"
        assert torch.equal(got[f"{name}/token_ids"], ours), name  # their tokenizer == ours, id for id
        windows = ours[: WINDOWS * SEQLEN].view(-1, SEQLEN)
        assert windows.shape[0] == WINDOWS
        mine = perplexity(m2, windows, torch.device("cpu"))
        for lname in ("vptq", "hf"):
            theirs = info["ppl"][f"{name}/{lname}"]
            ppl_report[f"{name}/{lname}"] = (theirs, mine)
            assert theirs == pytest.approx(mine, rel=PPL_RTOL), (name, lname, theirs, mine)
    print("perplexity, their tokenizer + their loaders vs ours:", ppl_report)
