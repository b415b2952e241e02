"""Interchange with Microsoft's `vptq` 0.0.5.post1: our exported folders load in the official
package (its own loader and transformers' VptqConfig path) with the logits of our model, and our
packer writes the same words as theirs.

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
from tests.test_format import input_ids, logits, vq_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "interchange_env.py")
ATOL = 1e-5  # logits are O(1); measured max abs diff is 0.0 on this machine

# runs in the OTHER venv (their `vptq`); reads and writes safetensors only
WORKER = r'''
import json, sys, torch
import safetensors.torch as st
import transformers, vptq
from vptq.utils.pack import pack_index, unpack_index_tensor

job = json.load(open(sys.argv[1]))
out, info = {}, {"vptq": vptq.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                 "vptq_file": vptq.__file__, "layers": {}}
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

    models, folders = {}, {}
    for name, opts in MODELS.items():
        models[name] = vq_tiny_llama(**opts)[0]
        folders[name] = export_vptq(models[name], None, str(tmp_path / name))
    job = {"pack_file": str(tmp_path / "pack.safetensors"), "pack_cases": PACK_CASES,
           "ids_file": str(tmp_path / "ids.safetensors"), "folders": folders,
           "out_file": str(tmp_path / "out.safetensors"), "info_file": str(tmp_path / "info.json")}
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
