"""AQLM fidelity: `variant=reference` with the reference's iteration counts (`iters=paper`) against
the authors' code (Vahe1994/AQLM, run by scripts/fidelity/run_reference_aqlm.py on the same seeded
synthetic layer; numbers, commit and settings in tests/data/fidelity_reference_aqlm.json).

The search is random (k-means seeding, shuffled beam-search order), so we compare means over
seeds: ours over 3 seeds against theirs over the seeds recorded, within 5% (issue 13).
Block finetuning: ours against their finetune_groupwise from the same seeded start
(`finetune_setup`): with the whole calibration set in one batch the two compute the same
gradients, so the block MSE after finetuning must agree to rounding; with their default batch of
1 the window order is random (theirs: torch's global RNG), so we compare means over seeds."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from baselines.aqlm import AQLM
from vptq.methods import BlockContext

ROOT = Path(__file__).resolve().parents[1]
REF = json.loads((ROOT / "tests" / "data" / "fidelity_reference_aqlm.json").read_text())
SEEDS = (0, 1, 2)
pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "fidelity" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer():
    lay = REF["layer"]
    mod = _script("layer")
    W, H = mod.synthetic_layer(lay["seed"], lay["out_features"], lay["in_features"])
    # the same layer as theirs (float64 sums: a different BLAS moves the last bits only)
    assert mod.weight_energy(W, H) == pytest.approx(lay["tr_WHWt"], rel=1e-5)
    return W, H, mod.proxy_loss


def test_reference_record_is_complete():
    assert REF["reference"]["repository"] == "https://github.com/Vahe1994/AQLM"
    assert len(REF["reference"]["commit"]) == 40
    st = REF["settings"]
    assert (st["lr"], st["max_epochs"], st["steps_per_epoch"], st["relative_mse_tolerance"]) == (1e-4, 1000, 100, 0.01)
    assert {"1x8/g4", "2x8/g8"} <= set(REF["summary"])


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(REF["summary"]))
def test_reference_variant_matches_their_proxy_loss(config):
    """Mean proxy loss of ours over 3 seeds within 5% of theirs over their seeds."""
    W, H, proxy_loss = _layer()
    runs = [r for r in REF["runs"] if r["config"] == config]
    M, B, g, beam = (runs[0][k] for k in ("num_codebooks", "nbits_per_codebook", "in_group_size", "beam_size"))
    theirs = sum(r["proxy_loss"] for r in runs) / len(runs)
    ours = []
    for seed in SEEDS:
        m = AQLM(AQLM.Config(scheme=f"{M}x{B}", in_group_size=g, iters="paper", beam_width=beam), bits=None, seed=seed)
        q = m.quantize_layer(W, H, name="layer")
        ours.append(proxy_loss(W, q.dequantize(), H))
        assert q.history[-1] == pytest.approx(ours[-1], rel=1e-4)  # the history's last entry is the stored weight
        assert len(q.history) - 1 <= 40  # stopped by rel_tol (theirs: 10-14 epochs), not by the 1000 cap
    mean = sum(ours) / len(ours)
    assert math.isfinite(mean) and abs(mean / theirs - 1) < 0.05, (config, ours, theirs)


def _our_finetune(run, seed):
    mod = _script("aqlm_block")
    block, X, Y, kwargs = mod.finetune_setup()
    m = AQLM(AQLM.Config(finetune_epochs=run["epochs"], finetune_lr=run["lr"], finetune_batch=run["batch"]),
             bits=None, seed=seed)
    st = m.finetune_block(block, BlockContext(X, Y, kwargs, "cpu", 0))
    assert st["ft_steps"] == run["epochs"] * (X.shape[0] // run["batch"])
    return mod.block_rel_mse(block, X, Y, kwargs)


@pytest.mark.parametrize("name", ["full_batch", "batch1"])
def test_reference_finetune_matches_theirs(name):
    runs = [r for r in REF["finetune"]["runs"] if r["name"] == name]
    before = runs[0]["rel_mse_before"]
    theirs = sum(r["rel_mse_after"] for r in runs) / len(runs)
    ours = [_our_finetune(runs[0], seed) for seed in range(len(runs))]
    mean = sum(ours) / len(ours)
    gain = before - theirs  # what their finetuning achieved
    assert gain > 0
    # full batch: the same gradients, summed in another order (1e-3 of the gain; measured ~1e-7);
    # batch of 1: random window orders on both sides (5% of the gain; measured ~1%)
    tol = 1e-3 if name == "full_batch" else 0.05
    assert abs(mean - theirs) <= tol * gain, (name, ours, theirs, before)
