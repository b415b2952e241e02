"""Run the authors' AQLM code (Vahe1994/AQLM) on the seeded synthetic layer and record its proxy loss.

    python scripts/fidelity/run_reference_aqlm.py /path/to/AQLM-checkout --commit <sha> \
        [--seeds 0 1 2] [--configs 1x8/g4 2x8/g8 2x8/g8/b4] [--shape 128 256] \
        [--out tests/data/fidelity_reference_aqlm.json]

Nothing of theirs is copied here: the checkout (bring it with the `fetch` tool and `git archive`)
is put on sys.path and its `aq_engine.AQEngine` quantizes one `nn.Linear` whose XTX is our H,
with the hyperparameters of their main.py / README (recorded in the JSON). Shims for a CPU:
`AQ_USE_JIT=0` (their torch.jit.script wrappers off), `TQDM_DISABLE=1` (their progress bars),
one device `cpu`. Their randomness (torch's global RNG for k-means seeding, Python's `random` for
the beam search's shuffled order) is seeded by `torch.manual_seed(seed)` and `random.seed(seed)`.

Recorded per (config, seed): the proxy loss tr((W-Ŵ)H(W-Ŵ)ᵀ) of their result in float64
(Ŵ from their float32 codebooks and scales, as their engine returns it) and with codebooks and
scales rounded to fp16 (what a saved fp16 model holds), both also relative to tr(WHWᵀ); the loss
after their k-means initialisation and at the start of every epoch (after the previous beam search);
the number of beam-search epochs and Adam steps they ran.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

# Before torch: torch imports tqdm, which reads TQDM_DISABLE when it is first imported.
os.environ["AQ_USE_JIT"] = "0"
os.environ["TQDM_DISABLE"] = "1"

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the repo: the finetuning setup builds a tiny model with runners/
from aqlm_block import block_rel_mse, finetune_setup  # noqa: E402
from layer import proxy_loss, synthetic_layer, weight_energy  # noqa: E402

# Their main.py defaults, with relative_mse_tolerance as in their README's quantization command
# (main.py's default None would run all 1000 epochs).
THEIR_SETTINGS = dict(
    out_group_size=1, codebook_value_nbits=16, codebook_value_num_groups=1, scale_nbits=0,
    init_max_iter=100, init_max_points_per_centroid=None, use_faiss=False,
    lr=1e-4, beam_size=1, max_epochs=1000, steps_per_epoch=100, relative_mse_tolerance=0.01,
)
THEIR_FILES = ("aq_engine.py", "src/aq.py", "src/beam_search_xtx.py", "src/kmeans.py", "src/utils.py",
               "src/finetune.py")
# Block finetuning runs (their finetune_groupwise; Adam betas (0.9, 0.95) are their main.py defaults):
# full-batch (order-free: the same gradients as ours up to rounding) and their default batch of 1.
FINETUNE_RUNS = (dict(name="full_batch", epochs=20, lr=1e-3, batch=8, seeds=(0,)),
                 dict(name="batch1", epochs=3, lr=1e-4, batch=1, seeds=(0, 1, 2)))


class _ParamAQLinear(torch.nn.Module):
    """Glue (ours, not theirs): an AQLM weight whose codebooks and scales are nn.Parameters, the
    form their finetune_groupwise trains (every parameter with requires_grad)."""

    def __init__(self, qlin):
        super().__init__()
        from baselines.aqlm import decode

        q = qlin.qweight
        self.decode, self.shape = decode, (q.out_features, q.in_features)
        self.codebooks = torch.nn.Parameter(q.codebooks.float().clone())
        self.scales = torch.nn.Parameter(q.scales.float().clone())
        self.register_buffer("codes", q.codes())
        self.bias = qlin.bias

    def forward(self, x):
        W = self.scales[:, None] * self.decode(self.codebooks, self.codes).reshape(self.shape)
        return torch.nn.functional.linear(x, W.to(x.dtype), self.bias)


class _Tupled(torch.nn.Module):
    """Glue: their code unpacks `out, *_ = layer(x)` (older transformers layers returned tuples)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, **kw):
        y = self.block(x, **kw)
        return y if isinstance(y, (tuple, list)) else (y,)


def run_their_finetune(epochs, lr, batch, seed):
    from src.finetune import finetune_groupwise  # theirs
    from vptq.qlinear import QuantLinear

    block, X, Y, kwargs = finetune_setup()
    before = block_rel_mse(block, X, Y, kwargs)
    for name, mod in list(block.named_modules()):
        if isinstance(mod, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, _ParamAQLinear(mod))
    for p in block.parameters():
        p.requires_grad_(True)  # their main.py's model: every parameter trainable
    args = Namespace(devices=[torch.device("cpu")], offload_activations=False, finetune_lr=lr,
                     finetune_adam_beta1=0.9, finetune_adam_beta2=0.95, finetune_batch_size=batch,
                     local_batch_size=None, finetune_max_epochs=epochs, finetune_early_stop=3)
    torch.manual_seed(seed)  # their minibatch order: torch.randperm on the global RNG
    finetune_groupwise(layer=_Tupled(block), train_inps=[X], train_outs=[Y], args=args, verbose=False, **kwargs)
    after32 = block_rel_mse(block, X, Y, kwargs)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, _ParamAQLinear):  # as stored: fp16
                m.codebooks.copy_(m.codebooks.half().float())
                m.scales.copy_(m.scales.half().float())
    return {"rel_mse_before": before, "rel_mse_after": block_rel_mse(block, X, Y, kwargs), "rel_mse_after_fp32": after32}


def parse_config(text: str):
    """"MxB/gG" or "MxB/gG/bW" (beam width W, default theirs: 1) -> (M, B, G, W)."""
    parts = text.split("/")
    M, B = parts[0].split("x")
    g = parts[1].removeprefix("g")
    beam = parts[2].removeprefix("b") if len(parts) > 2 else THEIR_SETTINGS["beam_size"]
    return int(M), int(B), int(g), int(beam)


def run_theirs(W, H, M, B, g, beam, seed):
    from aq_engine import AQEngine  # their module, from the checkout on sys.path

    torch.manual_seed(seed)
    random.seed(seed)
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    engine = AQEngine(layer)  # XTX accumulates in float64, as in their main.py
    engine.XTX.copy_(H.double())
    engine.nsamples = 1
    args = Namespace(devices=[torch.device("cpu")], in_group_size=g, num_codebooks=M, nbits_per_codebook=B,
                     print_frequency=10**9, **dict(THEIR_SETTINGS, beam_size=beam))
    counts = {"beam_search": 0, "mse": 0, "init_loss": None, "epoch_losses": []}
    mse, search = engine._compute_mse, engine.beam_search_update_codes_

    def counting_mse(*a, **k):  # observe only: their loss, first call = after k-means init
        loss = mse(*a, **k)
        if counts["mse"] % args.steps_per_epoch == 0:  # an epoch's first Adam step: after the last search
            counts["epoch_losses"].append(float(loss) * W.shape[0])  # theirs divides by out_features
        if counts["init_loss"] is None:
            counts["init_loss"] = float(loss) * W.shape[0]
        counts["mse"] += 1
        return loss

    def counting_search(*a, **k):
        counts["beam_search"] += 1
        return search(*a, **k)

    engine._compute_mse, engine.beam_search_update_codes_ = counting_mse, counting_search
    t0 = time.time()
    qw = engine.quantize(args=args, verbose=False)
    seconds = time.time() - t0
    with torch.no_grad():
        What = qw().reshape(W.shape).float()
        cb, sc = qw.get_codebooks(), qw.get_scales()
        from src.utils import _dequantize_weight
        What16 = _dequantize_weight(qw.get_codes(), cb.half().float(), sc.half().float()).reshape(W.shape)
    # Adam steps run = loss evaluations minus the one that triggered early stopping (if it did)
    epochs = counts["beam_search"]
    stopped_early = counts["mse"] == epochs * args.steps_per_epoch + 1
    return {
        "proxy_loss": proxy_loss(W, What, H),
        "proxy_loss_fp16": proxy_loss(W, What16, H),
        "init_proxy_loss": counts["init_loss"],
        "epochs": epochs,
        "adam_steps": counts["mse"] - (1 if stopped_early else 0),
        "stopped_early": stopped_early,
        "epoch_start_losses": counts["epoch_losses"],
        "seconds": round(seconds, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkout", help="folder of a Vahe1994/AQLM checkout (aq_engine.py, src/)")
    ap.add_argument("--commit", default=None, help="their commit hash (read with git when the checkout has .git)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=["1x8/g4", "2x8/g8"],
                    help="MxB/gG[/bW]: M codebooks of 2^B entries, groups of G inputs, beam width W")
    ap.add_argument("--shape", type=int, nargs=2, default=[128, 256], metavar=("OUT", "IN"))
    ap.add_argument("--layer-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-finetune", action="store_true", help="skip the block-finetuning runs")
    ap.add_argument("--out", default=str(HERE.parents[1] / "tests" / "data" / "fidelity_reference_aqlm.json"))
    a = ap.parse_args()

    root = Path(a.checkout).resolve()
    if not (root / "aq_engine.py").is_file() or not (root / "src" / "aq.py").is_file():
        sys.exit(f"{root} is not an AQLM checkout: aq_engine.py and src/aq.py are missing")
    commit = a.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sys.exit("the checkout has no git metadata: pass --commit <sha> (e.g. from `git --git-dir=DIR rev-parse HEAD`)")
    sys.path.insert(0, str(root))
    torch.set_num_threads(a.threads)

    out_f, in_f = a.shape
    W, H = synthetic_layer(a.layer_seed, out_f, in_f)
    ref = weight_energy(W, H)  # tr(W H Wᵀ)
    runs = []
    for config in a.configs:
        M, B, g, beam = parse_config(config)
        for seed in a.seeds:
            r = run_theirs(W, H, M, B, g, beam, seed)
            r.update(config=config, num_codebooks=M, nbits_per_codebook=B, in_group_size=g, beam_size=beam,
                     seed=seed, relative=r["proxy_loss"] / ref,
                     relative_fp16=r["proxy_loss_fp16"] / ref)
            print(json.dumps(r), flush=True)
            runs.append(r)
    summary = {}
    for config in a.configs:
        ls = torch.tensor([r["proxy_loss"] for r in runs if r["config"] == config], dtype=torch.float64)
        summary[config] = {"mean": float(ls.mean()), "std": float(ls.std()) if len(ls) > 1 else 0.0,
                           "min": float(ls.min()), "max": float(ls.max()), "relative_mean": float(ls.mean()) / ref}
    finetune = []
    if not a.no_finetune:
        for spec in FINETUNE_RUNS:
            for seed in spec["seeds"]:
                r = dict(name=spec["name"], epochs=spec["epochs"], lr=spec["lr"], batch=spec["batch"], seed=seed,
                         **run_their_finetune(spec["epochs"], spec["lr"], spec["batch"], seed))
                print(json.dumps(r), flush=True)
                finetune.append(r)
    doc = {
        "reference": {"repository": "https://github.com/Vahe1994/AQLM", "commit": commit,
                      "files_sha256": {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in THEIR_FILES},
                      "entry": "aq_engine.AQEngine.quantize (their main.py's per-linear step; no block finetuning)"},
        "settings": dict(THEIR_SETTINGS, shims="AQ_USE_JIT=0, TQDM_DISABLE=1, devices=[cpu], XTX=H in float64",
                         rng="torch.manual_seed(seed); random.seed(seed)"),
        "layer": {"generator": "scripts/fidelity/layer.py:synthetic_layer", "out_features": out_f,
                  "in_features": in_f, "seed": a.layer_seed, "tr_WHWt": ref,
                  "W_sum": float(W.double().sum()), "H_trace": float(H.double().trace())},
        "loss": "tr((W - Ŵ) H (W - Ŵ)ᵀ), float64",
        "runs": runs,
        "summary": summary,
        "finetune": {"setup": "scripts/fidelity/aqlm_block.py:finetune_setup() (seed 0, 8 windows x 32 tokens, "
                              "1x6/g4 weights), their src/finetune.py:finetune_groupwise, no validation split",
                     "runs": finetune},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpu": _cpu_name(), "threads": a.threads},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
