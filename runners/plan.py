"""Plan a run before spending it: what `runners/run.py` with the same overrides would quantize, at
which settings and bits, and what it would cost, without loading any weights.

    python runners/plan.py model=llama3_70b method=vptq bits=2 [calib.nsamples=...] [--json]

Owns: the architecture a config describes (`model.arch`, else `model.path`'s config.json, else
`model.tiny`), the per-block linears and Hessian inputs it implies (the table of runners/arch.py),
the exact storage of each layer plan (`layer_storage`: the methods' own formulas), the memory
model of one block job (the driver's phases, runners/driver.py), the Hessian cache's disk size,
and the evaluation of the cost model that benchmarks/cost_model.py measures and fits
(runners/cost_model.json: per-layer time and working set as non-negative combinations of
`time_features` / `memory_features`).

Exact: the settings (`method.plan(shapes)`, the same pure call the driver makes), realized bits
(integer bit counts per component, summed as `QuantStats.storage` sums them), sizes, Hessian
bytes. Estimated: the working set and the times (fitted on this machine's CPU, extrapolated to
the target's shapes; a GPU is not measured here): every printed estimate says so.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python runners/plan.py` from a checkout works without installing
    sys.path.insert(0, REPO)

from runners.errors import UserError  # noqa: E402
from vptq.hessian import QUAD_CHUNK_BYTES  # noqa: E402

COST_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_model.json")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
FP32 = 4
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# float parameters per block besides the quantized linears' weights (norm weights, biases), by model type
PLANNABLE = ("llama", "mistral", "qwen2", "qwen3")


# ------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Architecture:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    source: str = ""  # where the numbers came from

    def linears(self) -> List[Tuple[str, int, int]]:
        """(name, out, in) of every linear of one decoder block, in module order (as
        `runners.arch.linears_of` lists them): the linears the driver quantizes."""
        D, I, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        return [("self_attn.q_proj", q, D), ("self_attn.k_proj", kv, D), ("self_attn.v_proj", kv, D),
                ("self_attn.o_proj", D, q), ("mlp.gate_proj", I, D), ("mlp.up_proj", I, D), ("mlp.down_proj", D, I)]

    def hessian_inputs(self) -> Dict[str, int]:
        """{Hessian key: in_features}: linears that read the same input share one (runners/arch.py)."""
        from runners.arch import ARCHS, hessian_groups

        lin = {n: i for n, _, i in self.linears()}
        keys = hessian_groups(list(lin), ARCHS[self.model_type])
        return {k: lin[k] for k in dict.fromkeys(keys.values())}

    def block_float_params(self) -> int:
        """Parameters of a block that stay float: norm weights and biases."""
        n = 2 * self.hidden_size  # input_layernorm, post_attention_layernorm
        if self.model_type == "qwen2":  # q/k/v biases
            n += (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        if self.model_type == "qwen3":  # q_norm, k_norm
            n += 2 * self.head_dim
        return n

    def outer_params(self) -> Dict[str, int]:
        """Float parameters outside the blocks: embeddings, final norm, LM head (none when tied)."""
        emb = self.vocab_size * self.hidden_size
        return {"embeddings": emb, "final_norm": self.hidden_size, "lm_head": 0 if self.tie_word_embeddings else emb}

    def block_params(self) -> int:
        return sum(o * i for _, o, i in self.linears()) + self.block_float_params()


def _folder_config(path: str) -> Optional[Dict[str, Any]]:
    p = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is not a readable JSON file ({e})") from None


def _hub_cached_config(repo_id: str, revision: Optional[str]) -> Optional[Dict[str, Any]]:
    """config.json of a hub model from the local Hugging Face cache (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001  (not a valid repo id: treated as not cached)
        return None
    return _folder_config(os.path.dirname(p)) if isinstance(p, str) else None


def _tiny_arch(model_cfg) -> Dict[str, Any]:
    from runners.models import byte_tokenizer

    t = model_cfg.tiny
    return {"model_type": t.arch, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "vocab_size": len(byte_tokenizer()),
            "tie_word_embeddings": False}  # runners.models.tiny_model


def resolve_architecture(model_cfg) -> Architecture:
    """The architecture of `model_cfg` (a ModelConfig or its DictConfig): `model.arch`, whose null
    fields come from `model.path`'s config.json (a local folder, or a hub id already in the local
    Hugging Face cache) or from `model.tiny`. A local folder's config.json describes the weights a
    run would load, so it wins over `model.arch` where the two differ."""
    given = {f: _get(model_cfg, "arch", f) for f in ARCH_FIELDS}
    found: Optional[Dict[str, Any]] = None
    source = "conf/model (model.arch)"
    path = _get(model_cfg, "path")
    if _get(model_cfg, "source") == "tiny":
        found, source = _tiny_arch(model_cfg), "model.tiny"
    elif path and os.path.isdir(os.path.expanduser(path)):
        found = _folder_config(path)
        if found is None:
            raise UserError(f"model.path={path!r} has no config.json; give a folder with config.json")
        source = f"{path}/config.json"
    elif path and any(v is None for k, v in given.items() if k in REQUIRED):
        found = _hub_cached_config(path, _get(model_cfg, "revision"))
        if found is not None:
            source = f"{path} config.json (local Hugging Face cache)"
    vals = dict(given)
    if found:
        vals.update({k: found[k] for k in ARCH_FIELDS if found.get(k) is not None})
    missing = [k for k in REQUIRED if vals.get(k) is None]
    if missing:
        where = f" ({path})" if path else ""
        raise UserError(f"model {_get(model_cfg, 'name')!r}{where}: architecture unknown without weights "
                        f"(missing {', '.join(missing)}); give model.path=<local folder with config.json> or "
                        f"model.arch.{missing[0]}=...")
    mt = vals.get("model_type") or "llama"
    if mt not in PLANNABLE:
        raise UserError(f"model_type {mt!r} cannot be planned yet; valid: {', '.join(PLANNABLE)}")
    heads = int(vals["num_attention_heads"])
    return Architecture(model_type=mt, hidden_size=int(vals["hidden_size"]),
                        intermediate_size=int(vals["intermediate_size"]),
                        num_hidden_layers=int(vals["num_hidden_layers"]), num_attention_heads=heads,
                        num_key_value_heads=int(vals.get("num_key_value_heads") or heads),
                        head_dim=int(vals.get("head_dim") or vals["hidden_size"] // heads),
                        vocab_size=int(vals["vocab_size"]), tie_word_embeddings=bool(vals.get("tie_word_embeddings")),
                        source=source)


def _get(cfg, *path):
    for p in path:
        cfg = cfg.get(p) if isinstance(cfg, dict) else getattr(cfg, p, None)
        if cfg is None:
            return None
    return cfg


# ------------------------------------------------------------------------------------------- storage
def layer_storage(method, out_f: int, in_f: int, plan) -> Dict[str, int]:
    """Bits stored for one (out_f, in_f) layer quantized with `plan`, by component, exactly as the
    method's QuantizedWeight.storage() counts them. A method exposing `storage_bits(out, in, plan)`
    is asked; otherwise the formula of its format (the method's own, where one exists)."""
    own = getattr(method, "storage_bits", None)
    if callable(own):
        return dict(own(out_f, in_f, plan))
    name = method.name
    if name == "vptq":  # vptq.budget.storage_bits: the VQWeight layout
        from vptq.budget import storage_bits

        return storage_bits(out_f, in_f, plan)
    if name in ("rtn", "gptq"):  # baselines.scalar.ScalarWeight: codes, float16 scale, b-bit zero per group
        g = in_f if plan.group_size is None else plan.group_size
        groups = out_f * math.ceil(in_f / g)
        return {"codes": out_f * in_f * plan.wbits, "scales": groups * 16, "zeros": groups * plan.wbits}
    if name == "gptvq":  # baselines.gptvq.GPTVQWeight (Scheme.total_bits counts the same, per weight)
        return _gptvq_storage(out_f, in_f, plan)
    if name == "aqlm":  # baselines.aqlm.AQLMWeight: packed codes, fp16 codebooks, fp16 row scales
        from baselines.aqlm import VALUE_BITS, packed_code_bits

        M, B, g = plan
        return {"codes": packed_code_bits(out_f, in_f, M, B, g), "codebooks": M * (2 ** B) * g * VALUE_BITS,
                "scales": out_f * VALUE_BITS}
    raise UserError(f"method {name!r} has no storage formula in runners/plan.py; it should expose "
                    f"storage_bits(out_f, in_f, plan) -> {{component: bits}}")


def _gptvq_storage(out_f: int, in_f: int, s) -> Dict[str, int]:
    from baselines.gptvq import NORM_PARAM_BITS, SCALE_BITS

    n_cb = (out_f // s.rows_per_group) * (in_f // s.columns_per_group)
    bits = {"indices": math.ceil(out_f * (in_f // s.vq_dim) * s.index_bits / 8) * 8,
            "codebooks": n_cb * (s.rank if s.svd_rank else s.num_centroids * s.vq_dim) * s.codebook_bits}
    if s.codebook_bits == 8:
        bits["codebook_scales"] = n_cb * SCALE_BITS
    if s.svd_rank:
        bits["svd_basis"] = s.rank * s.num_centroids * 16
    if s.scaling_blocksize:
        nb = in_f // s.scaling_blocksize
        bits["norms"] = math.ceil(out_f * nb * s.scaling_bits / 8) * 8 + nb * 2 * NORM_PARAM_BITS
    return bits


def codebook_dims(method_name: str, plan) -> Tuple[int, int]:
    """(K, dim): codebook entries a layer plan searches per code and their length (K = 0 for scalar
    grids): the plan-dependent terms of the time and memory features."""
    if method_name == "vptq":
        return plan.num_centroids + plan.num_res_centroids + plan.outlier_num_centroids, plan.vector_len
    if method_name == "gptvq":
        return plan.num_centroids, plan.vq_dim
    if method_name == "aqlm":
        M, B, g = plan
        return M * 2 ** B, g
    return 0, 1


# ------------------------------------------------------------------------------------------- cost model
def time_features(out_f: int, in_f: int, K: int, dim: int = 1) -> Dict[str, float]:
    """Per-layer time terms: per-weight work, error feedback / proxy-loss products (out·in²), the
    Cholesky factorisations (in³), the per-column loop (in), codebook search (out·in·K), codebook
    training on a sample of at most 64 vectors per centroid (min(out·in, 64·K·dim)·K)."""
    n = out_f * in_f
    return {"n": n, "n_in": n * in_f, "in3": in_f ** 3, "in": in_f, "n_K": n * K,
            "train_K": min(n, 64 * K * dim) * K, "one": 1.0}


SEARCH_CHUNK = 1 << 22  # elements: the chunk nearest-centroid searches work in (vptq.kmeans.CHUNK_ELEMS)


def memory_features(out_f: int, in_f: int, K: int, dim: int = 1) -> Dict[str, float]:
    """Per-layer working-set terms (bytes): weight-sized buffers (out·in), Hessian-sized (in²),
    per-row and per-column vectors, codebooks (K), distance tables of the codebook search (vectors x
    K, computed in chunks: at most SEARCH_CHUNK elements), other fixed buffers (1)."""
    n = out_f * in_f
    return {"n": n, "in2": in_f * in_f, "out": out_f, "in": in_f, "K": K,
            "search": min(n // max(dim, 1) * K, SEARCH_CHUNK), "one": 1.0}


def pass_features(tokens: int, seqlen: int, arch: Architecture) -> Dict[str, float]:
    """Block-pass time terms: linear FLOPs (tokens × block params), attention (tokens × seqlen × q
    width), Hessian accumulation (tokens × Σ in²), per-window weight work (windows × block params)."""
    P = sum(o * i for _, o, i in arch.linears())
    h2 = sum(i * i for i in arch.hessian_inputs().values())
    return {"tok_P": tokens * P, "tok_L_q": tokens * seqlen * arch.num_attention_heads * arch.head_dim,
            "tok_H": tokens * h2, "win_P": tokens // seqlen * P, "one": 1.0}


def act_features(seqlen: int, arch: Architecture, n_max: int) -> Dict[str, float]:
    """A block pass's transient (bytes, fp32 on the measuring machine): one window's MLP and
    attention activations of `seqlen` tokens, the block's dequantized weights (the driver's
    run_block dequantizes a quantized block once per pass: `vptq.qlinear.dense_weights`) and the
    largest layer's dequantization temporaries."""
    P = sum(o * i for _, o, i in arch.linears())
    return {"L_I": seqlen * arch.intermediate_size, "L_D": seqlen * arch.hidden_size, "P": P, "n_max": n_max,
            "one": 1.0}


def evaluate(coef: Optional[Dict[str, float]], feats: Dict[str, float]) -> Optional[float]:
    if coef is None:
        return None
    return sum(c * feats[k] for k, c in coef.items())


def load_cost_model(path: str = COST_MODEL) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class LayerRow:
    """One linear of a block: its shape, the plan the budget picks, what it stores."""
    name: str
    out_features: int
    in_features: int
    settings: str
    bits: Dict[str, int]  # stored bits by component (exact)
    total_bits: float  # per weight
    index_bits: float  # per weight
    time_s: Optional[float] = None  # estimate (cost model)
    work_bytes: Optional[float] = None  # estimate: max(method working set, the driver's checks)
    kept_bytes: Optional[float] = None  # estimate: the quantized weight as held in memory


@dataclass
class RunPlan:
    model: str
    method: str
    bits_target: Optional[float]
    arch: Dict[str, Any]
    dtype: str
    protocol: str
    calib: Dict[str, int]
    finetune: str = "none"  # the finetune= mode
    layers: List[LayerRow] = field(default_factory=list)  # one block, module order
    realized: Dict[str, float] = field(default_factory=dict)  # {"index", "total"}: as metrics.json "bits"
    size: Dict[str, float] = field(default_factory=dict)
    memory: Dict[str, Any] = field(default_factory=dict)
    hessian_disk: Dict[str, float] = field(default_factory=dict)
    time: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def make_plan(cfg, cost_model: Optional[Dict[str, Any]] = None) -> RunPlan:
    """The plan of the composed config `cfg` (a DictConfig as runners/run.py receives it)."""
    from runners.finetune import configure
    from runners.setup import build_method
    from vptq.methods import BudgetError

    arch = resolve_architecture(cfg.model)
    if cfg.model.dtype not in DTYPE_BYTES:
        raise UserError(f"unknown model.dtype {cfg.model.dtype!r}; valid choices: {', '.join(DTYPE_BYTES)}")
    bits = float(cfg.bits)
    if not 0 < bits <= 16:  # as runners/job.py checks it
        raise UserError(f"bits={cfg.bits} must be a number of bits per weight in (0, 16], e.g. 2, 3, 4")
    if cfg.hessian.protocol not in ("quantized", "float"):
        raise UserError(f"hessian.protocol={cfg.hessian.protocol!r}; valid choices: float, quantized")
    try:  # the job's setup path (runners/job.py _check): the same method object a run builds
        method = build_method(cfg.method, bits, cfg.seed)
        finetune, method = configure(cfg.finetune, method, seed=int(cfg.seed))
    except ValueError as e:
        raise UserError(str(e)) from None
    if method.loads_quantized:
        raise UserError(f"method={method.name} evaluates a model quantized elsewhere: nothing to plan; "
                        f"valid: a method that quantizes (rtn, gptq, gptvq, aqlm, vptq)")
    p = RunPlan(model=cfg.model.name, method=method.name, bits_target=bits if method.uses_bits else None,
                arch=asdict(arch), dtype=cfg.model.dtype, protocol=cfg.hessian.protocol,
                calib={"nsamples": int(cfg.calib.nsamples), "seqlen": int(cfg.calib.seqlen)},
                finetune=finetune.mode)
    if finetune.mode != "none":
        via = "" if finetune.via == f"finetune={finetune.mode}" else f" ({finetune.via})"
        p.notes.append(f"finetune={finetune.mode}{via} is not in the cost model: its memory and time "
                       f"are not counted" + (" (it runs after quantization, on the whole model)"
                                             if finetune.mode == "e2e" else ""))
    cm = cost_model if cost_model is not None else load_cost_model()
    mcm = (cm or {}).get("methods", {}).get(method.name)
    if method.quantizes:
        try:
            plans = method.plan([(o, i) for _, o, i in arch.linears()])  # the driver's call, on the same shapes
        except BudgetError as e:
            raise UserError(str(e)) from None
        _layer_rows(p, method, arch, plans, mcm)
    _sizes(p, arch, method)
    if method.quantizes:
        _memory(p, arch, method, mcm)
        _hessian_disk(p, arch, method, cfg)
        _time(p, arch, method, cm, mcm)
    return p


def _layer_rows(p: RunPlan, method, arch: Architecture, plans, mcm) -> None:
    from vptq.qweight import Storage

    total = Storage(0, {})
    for name, o, i in arch.linears():
        lp = plans[(o, i)]
        bits = layer_storage(method, o, i, lp)
        st = Storage(o * i, bits)
        total = total + st
        K, dim = codebook_dims(method.name, lp)
        t = evaluate((mcm or {}).get("layer_time"), time_features(o, i, K, dim))
        ws = [evaluate((mcm or {}).get(k), memory_features(o, i, K, dim)) for k in ("layer_ws", "layer_check")]
        if ws[1] is not None:  # the check's float64 part runs a block of rows at a time (vptq.hessian._quadratic):
            # W and Ŵ in fp32, H in fp64, and at most three 64 MB row blocks; the fit saw only whole-layer blocks
            ws[1] = min(ws[1], 8.0 * o * i + 8.0 * i * i + 3.0 * QUAD_CHUNK_BYTES)
        work = None if None in ws else max(0.0, *ws)
        kept = evaluate((mcm or {}).get("layer_kept"), memory_features(o, i, K, dim))
        p.layers.append(LayerRow(name, o, i, _plan_str(lp), bits, st.total_bits / st.numel, st.index_bits / st.numel,
                                 None if t is None else max(t, 0.0), work,
                                 st.total_bits / 8 if kept is None else max(kept, 0.0)))
    p.realized = total.per_weight()  # every block has the same shapes: the whole model's ratio
    p.size["quantized_params"] = total.numel * arch.num_hidden_layers
    p.size["quantized_bytes"] = total.total_bits * arch.num_hidden_layers / 8


def _plan_str(plan) -> str:
    if isinstance(plan, tuple) and len(plan) == 3:  # AQLM (M, B, g)
        return f"{plan[0]}x{plan[1]}/g{plan[2]}"
    short = getattr(plan, "short", None)
    return short() if callable(short) else str(plan)


def _sizes(p: RunPlan, arch: Architecture, method) -> None:
    b = DTYPE_BYTES[p.dtype]
    lin = sum(o * i for _, o, i in arch.linears()) * arch.num_hidden_layers
    flt = sum(arch.outer_params().values()) + arch.block_float_params() * arch.num_hidden_layers
    s = p.size
    s["float_params"] = flt  # embeddings, LM head, norms (and biases): kept in model.dtype
    s["float_bytes"] = flt * b
    s["linear_params"] = lin
    s["original_bytes"] = (lin + flt) * b
    if not method.quantizes:
        s["quantized_params"], s["quantized_bytes"] = 0, lin * b
    s["model_bytes"] = s["quantized_bytes"] + s["float_bytes"]
    s["bits_per_param"] = 8 * s["model_bytes"] / (lin + flt)


def _memory(p: RunPlan, arch: Architecture, method, mcm) -> None:
    """Peak bytes of one block job, phase by phase as runners/driver.py runs it (the block, its
    calibration activations and Hessians on the compute device; the rest of the model elsewhere):
      capture       the block-0 inputs, once per window then concatenated (2 × activations), and
                    each window's rotary tables and position ids until then
      hessians      + block weights, float outputs where kept, accumulators: max(H + one window's
                    forward, 2 H while `finalize` copies them)
      layer j       + Hessians, the layers quantized so far, the fp32 copy of W (model dtype not fp32),
                    max(the method's working set, the driver's dequantize-and-check step) [measured]
      finetune      + the method's block finetuning [measured]
      next inputs   (protocol quantized) the quantized block's forward, written over its inputs [measured]
    """
    ab, N, L = DTYPE_BYTES[p.dtype], p.calib["nsamples"], p.calib["seqlen"]
    D, I = arch.hidden_size, arch.intermediate_size
    layer_ft = p.finetune == "layer"  # the driver's block_finetune hook: it reads inputs and float outputs
    calib = method.needs_hessian or layer_ft
    acts = N * L * D * ab if calib else 0
    keep_float = calib and (p.protocol == "float" or method.uses_float_outputs or layer_ft)
    fo = acts if keep_float else 0
    weights = arch.block_params() * ab
    hess = sum(i * i for i in arch.hessian_inputs().values()) * FP32 if method.needs_hessian else 0
    window = L * (3 * I + 2 * D) * ab  # one window's MLP activations (measured: exact on the tiny models)
    hook = L * max(i for _, _, i in arch.linears()) * FP32 if ab != FP32 else 0  # x.to(float32) per hook
    known = mcm is not None and all(r.work_bytes is not None for r in p.layers)
    # the capture keeps each window's hidden states and keyword arguments (rotary cos/sin in the model
    # dtype, int64 position ids) until it concatenates the hidden states
    per_window = 2 * L * arch.head_dim * ab + 8 * L
    phases = {"capture": 2 * acts + N * per_window if calib else 0}
    if calib:
        phases["hessians"] = acts + weights + fo + max(hess + window + hook, 2 * hess)
    done = 0.0
    for r in p.layers:
        n = r.out_features * r.in_features
        wcopy = n * FP32 if ab != FP32 else 0
        phases[f"quantize {r.name}"] = acts + weights + fo + hess + done + wcopy + (r.work_bytes or 0.0)
        done += r.kept_bytes
    nmax = max(r.out_features * r.in_features for r in p.layers)
    ft = evaluate((mcm or {}).get("ft_bytes"), act_features(L, arch, nmax)) if method.uses_float_outputs else None
    if ft:
        phases["finetune"] = acts + weights + done + fo + hess + ft
    fwd = evaluate((mcm or {}).get("fwd_bytes"), act_features(L, arch, nmax))
    if calib and p.protocol == "quantized":
        phases["next inputs"] = acts + weights + hess + done + (fwd if fwd is not None else window)
    at = max(phases, key=phases.get)
    outer = arch.outer_params()
    p.memory = {
        "components": {"block_weights": weights, "hessians": hess, "inputs": acts, "float_outputs": fo,
                       "window_forward": window if calib else 0, "quantized_block": done},
        "phases": phases, "peak_bytes": phases[at], "peak_phase": at, "working_set_measured": known,
        # the driver moves the modules outside the blocks (embeddings, final norm) to the device for
        # the capture and leaves them there: on a GPU they add to every block job
        "device_outer_bytes": (outer["embeddings"] + outer["final_norm"]) * ab if calib else 0,
    }
    if not known:
        p.notes.append(f"no measured working set for method {method.name} in {os.path.relpath(COST_MODEL, REPO)}: "
                       f"the peak counts weights, Hessians and activations only (a lower bound)")


def _hessian_disk(p: RunPlan, arch: Architecture, method, cfg) -> None:
    """The capture cache (runners/capture.py): one safetensors file per block holding its Hessians
    ("H/<key>", fp32) and, under quantize.parallel=true for a method that reads the float block
    outputs, the block's float inputs "X" (the last file also its outputs "Y"); tensor data only
    (each file's JSON header, under a few KB, not counted)."""
    if not method.needs_hessian:
        p.hessian_disk = {"files": 0, "bytes_per_file": 0, "bytes": 0}
        return
    parallel = bool(cfg.quantize.parallel)
    per = sum(i * i for i in arch.hessian_inputs().values()) * FP32
    acts = p.calib["nsamples"] * p.calib["seqlen"] * arch.hidden_size * DTYPE_BYTES[p.dtype]
    x = acts if parallel and method.uses_float_outputs else 0
    L = arch.num_hidden_layers
    written = bool(parallel or (cfg.hessian.cache_dir and p.protocol == "float"))
    p.hessian_disk = {"files": L, "bytes_per_file": per + x, "bytes": (per + x) * L + (acts if x else 0),
                      "hessian_bytes_per_file": per, "activation_bytes_per_file": x, "written": written,
                      "matrices": {f"H/{k}": [i, i] for k, i in arch.hessian_inputs().items()}}


def _time(p: RunPlan, arch: Architecture, method, cm, mcm) -> None:
    if mcm is None or any(r.time_s is None for r in p.layers):
        p.time = {"estimate": None}
        p.notes.append(f"no time model for method {method.name}: run benchmarks/cost_model.py")
        return
    N, L = p.calib["nsamples"], p.calib["seqlen"]
    feats = pass_features(N * L, L, arch)
    passes = {}
    if method.needs_hessian:
        passes["hessians"] = evaluate(mcm.get("hess_time"), feats)
        if p.protocol == "quantized":
            passes["next_inputs"] = evaluate(mcm.get("fwd_time"), feats)
        if method.uses_float_outputs and mcm.get("ft_time"):
            passes["finetune"] = evaluate(mcm.get("ft_time"), feats)
    passes = {k: max(v or 0.0, 0.0) for k, v in passes.items()}
    layers_s = sum(r.time_s for r in p.layers)
    block_s = layers_s + sum(passes.values())
    meas = cm.get("measured", {})
    p.time = {"estimate": True, "layers_per_block_s": layers_s, "passes_per_block_s": passes,
              "per_block_s": block_s, "total_s": block_s * arch.num_hidden_layers,
              "measured_on": meas.get("machine", {}), "measured_date": meas.get("date"),
              "load_avg_1min": [l[0] for r in cm.get("runs", [meas]) for l in (r.get("load_avg_before"),
                                                                               r.get("load_avg_after")) if l],
              "fitted_widths": sorted({s["block"][0] for s in cm.get("samples", [])})}
    mine = _settings_key(method)
    if mcm.get("settings") is not None and mcm["settings"] != mine:
        diff = sorted(k for k in set(mine) | set(mcm["settings"]) if mine.get(k) != mcm["settings"].get(k))
        p.notes.append(f"the cost model measured {method.name} with other settings ({', '.join(diff)}): "
                       f"its times for these settings are not measured")


def _settings_key(method) -> Dict[str, Any]:
    """The method's settings without per-shape choices (what the cost model was measured with)."""
    return json.loads(json.dumps(method.settings(None), default=str))


# ------------------------------------------------------------------------------------------- output
def _gib(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:,.2f} GiB"
    return f"{b / 2**20:,.1f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def _dur(s: float) -> str:
    return f"{s:,.1f} s" if s < 120 else (f"{s / 60:,.1f} min" if s < 7200 else f"{s / 3600:,.1f} h")


def _params(n: float) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def format_plan(p: RunPlan) -> str:
    a = p.arch
    out = [f"plan: model={p.model} method={p.method} bits={p.bits_target if p.bits_target is not None else '-'} "
           f"(no weights loaded)",
           f"architecture ({a['source']}): {a['model_type']}, {a['num_hidden_layers']} blocks, hidden "
           f"{a['hidden_size']}, MLP {a['intermediate_size']}, {a['num_attention_heads']} heads / "
           f"{a['num_key_value_heads']} KV heads (head_dim {a['head_dim']}), vocabulary {a['vocab_size']}, "
           f"{'tied' if a['tie_word_embeddings'] else 'untied'} embeddings, {p.dtype}"]
    if p.layers:
        out += _format_layers(p)
    s = p.size
    out.append("quantized model size:")
    if p.layers:
        out.append(f"  quantized linears: {_params(s['quantized_params'])} weights at {p.realized['total']:.4f} bits "
                   f"= {_gib(s['quantized_bytes'])}")
    else:
        out.append(f"  linears, not quantized ({p.method}): {_params(s['linear_params'])} weights = "
                   f"{_gib(s['quantized_bytes'])}")
    out.append(f"  embeddings, LM head, norms ({p.dtype}): {_params(s['float_params'])} = {_gib(s['float_bytes'])}")
    out.append(f"  total {_gib(s['model_bytes'])} = {s['bits_per_param']:.3f} bits per parameter "
               f"(the {p.dtype} model: {_gib(s['original_bytes'])})")
    if p.memory:
        out += _format_memory(p)
    if p.hessian_disk:
        out.append(_format_disk(p.hessian_disk, p.method))
    if p.time:
        out += _format_time(p)
    out += [f"note: {n}" for n in p.notes]
    return "\n".join(out)


def _format_layers(p: RunPlan) -> List[str]:
    out = [f"per layer shape (each of the {p.arch['num_hidden_layers']} blocks; settings from "
           f"method.plan, bits counted as stored):",
           f"  {'linear':<34} {'out x in':>13}  {'settings':<22} {'index':>7} {'total':>7}  {'time (est.)':>11}"]
    groups: Dict[Tuple, List[LayerRow]] = {}
    for r in p.layers:
        groups.setdefault((r.out_features, r.in_features), []).append(r)
    for (o, i), rows in groups.items():
        names = ", ".join(r.name.split(".")[-1] for r in rows)
        r = rows[0]
        t = f"{_dur(r.time_s)}" if r.time_s is not None else "-"
        out.append(f"  {names:<34} {f'{o} x {i}':>13}  {r.settings:<22} {r.index_bits:7.4f} {r.total_bits:7.4f}  "
                   f"{t:>11}")
    out.append(f"realized bits per weight over the quantized linears (as metrics.json records them): "
               f"index {p.realized['index']:.4f}, total {p.realized['total']:.4f}")
    return out


def _format_disk(h: Dict[str, Any], method: str) -> str:
    if not h["files"]:
        return f"Hessians on disk: none ({method} uses no Hessians)"
    what = "fp32 Hessians" + (" + float block inputs" if h["activation_bytes_per_file"] else "")
    when = "" if h["written"] else (" if written: with hessian.cache_dir= and hessian.protocol=float, "
                                    "or quantize.parallel=true")
    return (f"Hessians on disk (the capture cache, {what}): {h['files']} files x {_gib(h['bytes_per_file'])} = "
            f"{_gib(h['bytes'])}{when}")


def _format_memory(p: RunPlan) -> List[str]:
    m, c = p.memory, p.memory["components"]
    est = "" if m["working_set_measured"] else " (without the working set: a lower bound)"
    calib = (f"calibration {p.calib['nsamples']} x {p.calib['seqlen']} tokens, hessian.protocol={p.protocol}"
             if c["inputs"] else f"{p.method} uses no calibration")
    out = [f"peak memory of one block job{est} ({calib}):",
           f"  block weights ({p.dtype}) {_gib(c['block_weights'])}; Hessians (fp32) {_gib(c['hessians'])}; "
           f"calibration inputs {_gib(c['inputs'])}" +
           (f"; float outputs kept {_gib(c['float_outputs'])}" if c["float_outputs"] else "")]
    worst = max(p.layers, key=lambda r: r.work_bytes or 0)
    if worst.work_bytes is not None:
        out.append(f"  largest layer step (estimate: the method's working set and the driver's checks, measured "
                   f"model): {worst.name} {_gib(worst.work_bytes)}")
    out.append(f"  peak {_gib(m['peak_bytes'])} while: {m['peak_phase']}")
    if m["device_outer_bytes"]:
        out.append(f"  on a GPU add the embeddings the capture leaves on the device ({_gib(m['device_outer_bytes'])}):"
                   f" {_gib(m['peak_bytes'] + m['device_outer_bytes'])}, plus the CUDA context and allocator cache")
    return out


def _format_time(p: RunPlan) -> List[str]:
    t = p.time
    if not t.get("estimate"):
        return ["time: no estimate (no cost model for this method)"]
    mach = t["measured_on"]
    passes = ", ".join(f"{k} {_dur(v)}" for k, v in t["passes_per_block_s"].items()) or "none"
    load = t["load_avg_1min"]
    load = f"{min(load):.1f}-{max(load):.1f}" if load else "?"
    return [f"time estimate (a cost model measured on this project's CPU, not a GPU: {mach.get('cpu', '?')}, "
            f"{mach.get('cores', '?')} cores, torch {mach.get('torch', '?')}, one thread, "
            f"{str(t['measured_date'])[:10]}, load average {load} while measuring (other jobs ran); "
            f"fitted on hidden sizes {', '.join(map(str, t['fitted_widths']))} and extrapolated):",
            f"  per block: layers {_dur(t['layers_per_block_s'])}, block passes ({passes}); "
            f"{p.arch['num_hidden_layers']} blocks: {_dur(t['total_s'])} on that CPU"]


# ------------------------------------------------------------------------------------------- command line
def compose(overrides: List[str]):
    """The config runners/run.py would get for these overrides (Hydra compose, same schemas)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from runners.cli import CONF, register_resolvers
    from runners.schema import register_configs

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def main(argv: Optional[List[str]] = None) -> int:
    from runners.cli import check_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    overrides = [a for a in argv if a not in ("--json", "-m", "--multirun")]
    check_argv(overrides)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        p = make_plan(compose(overrides))
    except (UserError, HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0].rstrip(".")
        cause = str(e.__cause__ or "").strip().splitlines()  # Hydra's reason (an OmegaConf error), if any
        print(f"error: {first}" + (f": {cause[0]}" if cause else ""), file=sys.stderr)
        return 2
    print(json.dumps(asdict(p), indent=1) if as_json else format_plan(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
