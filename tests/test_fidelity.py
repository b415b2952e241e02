"""Fidelity to the authors' released code (issue 13), on the seeded synthetic layer.

tests/data/fidelity_reference.json holds the proxy losses tr((W−Ŵ) H (W−Ŵ)ᵀ) that THEIR code
(IST-DASLab/gptq, Qualcomm-AI-research/gptvq; repository and commit in the file) reached on the
layer of scripts/fidelity/layer.py, written by scripts/fidelity/run_reference.py. Here the same
settings go through our registry call shape with `variant=reference` and the reference's
iteration counts, and the stored weight's loss must be within 1% of theirs. Each improved variant
runs beside it (GPTQ `consistent`: within 1% too; GPTVQ `exact`: below the reference). The
losses are compared with a tolerance, not bitwise: their code and ours sum in other orders
(einsum vs index_add, BLAS kernels), which moves k-means ties and the last bits.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "fidelity_reference.json")
SLOW = {"gptvq_d4_w2_g32768", "gptvq_d2_w3_g8192"}  # 10-25 s each on a CPU core
pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fidelity_{name}", os.path.join(ROOT, "scripts", "fidelity",
                                                                                   f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


layer, compare = _load("layer"), _load("compare")
with open(DATA) as f:
    REF = json.load(f)
CASES = {c["name"]: c for c in REF["cases"]}


def _params(pred=lambda c: True):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n, c in CASES.items() if pred(c)]


@pytest.fixture(scope="module")
def fidelity_layer():
    W, H = layer.synthetic_layer(REF["layer"]["seed"])
    return W, H


def test_the_layer_is_the_one_they_ran_on(fidelity_layer):
    W, H = fidelity_layer
    assert list(W.shape) == REF["layer"]["shape"]
    # float64 Gram matrix, rounded once: equal up to the BLAS summation order
    assert layer.weight_energy(W, H) == pytest.approx(REF["layer"]["weight_energy"], rel=1e-6)
    for ref in REF["references"].values():
        assert len(ref["commit"]) == 40 and ref["repository"]


@pytest.mark.parametrize("case", _params())
def test_reference_variant_matches_the_authors_code(case, fidelity_layer):
    W, H = fidelity_layer
    c = CASES[case]
    q, loss, bits = compare.run_ours(c, "reference", W, H)
    assert loss / c["proxy_loss"] == pytest.approx(1.0, abs=0.01), (loss, c["proxy_loss"])
    st = q.storage()  # bits counted from what is stored: codes/indices, scales, codebooks, SVD factors, norms
    assert st.total_bits == sum(st.bits.values()) and bits > st.index_bits / st.numel
    assert math.isfinite(loss)


@pytest.mark.parametrize("case", _params(lambda c: not (c["method"] == "gptvq" and (
    c["settings"]["vq_scaling_blocksize"] > 0 or c["settings"]["svd_rank"]))))
def test_improved_variants_beside_the_reference(case, fidelity_layer):
    """GPTQ consistent (float16 scale in coding) changes the loss by well under 1%; GPTVQ exact
    (loss-consistent weights and updates) is far below the reference (0.30-0.86x when recorded)."""
    W, H = fidelity_layer
    c = CASES[case]
    from baselines.scalar import scalar_total_bits
    from vptq.methods import method_class

    for v in compare.IMPROVED[c["method"]]:
        q, loss, bits = compare.run_ours(c, v, W, H)
        ratio = loss / c["proxy_loss"]
        name, cfg = compare.our_config(c, v)
        plan = method_class(name)(cfg, bits=None).layer_plan(*W.shape)  # the same plan as the reference's
        if c["method"] == "gptq":
            assert ratio == pytest.approx(1.0, abs=0.01)
            assert bits == pytest.approx(scalar_total_bits(plan.wbits, plan.group_size, W.shape[1]))
        else:
            assert ratio < 0.95, ratio
            assert bits == pytest.approx(plan.total_bits(*W.shape))


def test_registry_call_shape_needs_no_bits(fidelity_layer):
    """method_class(name)(Config(...), bits=None, seed=0).quantize_layer(W, H, name=...) with
    explicit parameters, for every quantizing method."""
    from vptq.methods import METHODS, method_class

    W, H = fidelity_layer
    W, H = W[:64, :128].contiguous(), H[:128, :128].contiguous()
    explicit = {"rtn": dict(wbits=3), "gptq": dict(wbits=3, group_size=64),
                "gptvq": dict(vq_dim=2, num_centroids=16, group_size=2048, kmeans_iters=3),
                "vptq": dict(vector_len=4, num_centroids=16, num_res_centroids=0, kmeans_iters=3)}
    for name, kw in explicit.items():
        assert name in METHODS
        cls = method_class(name)
        q = cls(cls.Config(**kw), bits=None, seed=0).quantize_layer(W, H, name="0.q_proj")
        assert q.dequantize().shape == W.shape and torch.isfinite(q.dequantize()).all()
