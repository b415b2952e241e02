"""The on-disk format of a VPTQ-quantized model: the OFFICIAL VPTQ Hugging Face format (what
microsoft/VPTQ 0.0.5.post1's `VQuantLinear` and transformers' `VptqConfig` load), plus our own
self-description, and our own safetensors-only loader that reproduces the saved model bit-exactly.

A model folder (written to a temp dir, then renamed: never half-written):
    config.json              the model config + quantization_config:
        {"quant_method": "vptq",
         "config_for_layers": {<full module name>: <VQuantLinear kwargs, see `layer_config`>},
         "shared_layer_config": {}, "modules_to_not_convert": [<float linears, e.g. "lm_head">],
         "vq_bench": {"format": "vq-bench/vptq", "format_version": 1, "layers": {...true codebook
                      sizes, storage bits...}, "method": {...}, "run_config": {...}, ...}}
    model.safetensors        (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer files          when a tokenizer is given, loadable by transformers 4.x and 5.x
                             (`_legacy_tokenizer_class`)

Tensors of one quantized linear `<p>` (G = group_num, k = num_centroids, v = vector_len,
n = ceil(out/v), W = ceil(group_size * (log2 k + log2 k_res) / 32), see `vptq.pack`):
    <p>.centroids.weight          (G, k*v)          float (the VQWeight's dtype, normally fp16)
    <p>.indices                   (G, n, W)         int32, main + residual indices bit-packed
    <p>.res_centroids.weight      (G, k_res*v)      float            (residual only)
    <p>.outlier_centroids.weight  (1, k_o*v_o)      float            (outliers only)
    <p>.outlier_indices           (1, n_o, n_out)   int16 holding uint16 values (unpacked)
    <p>.perm                      (in,)             int16 holding uint16 values (a stored permutation only)
    <p>.weight_scale, .weight_bias (in,)            float            (norm only)
    <p>.bias                      (out,)            float            (linear bias only)
Everything else (embeddings, norms, lm_head) is stored as the model holds it; a tied lm_head is
stored as a copy too (the official loader does not re-tie it) and re-tied by our loader.

Differences from a `VQWeight` that the format forces, all exact:
  * codebook sizes are padded with zero rows up to a power of two (VQuantLinear sizes packed
    indices with int(log2 k) but unpacks with ceil(log2 k)); the true sizes are in "vq_bench" and
    `load_vptq` trims back, so the padding rows are never referenced and dequantization is unchanged;
  * refused (ValueError): k_res > k, outlier_vector_len == 1 (the official layer disables outliers
    for v_o <= 1), more than 65536 centroids / input features (uint16 storage), group sizes the
    official unpacker misreads (`vptq.pack.check_packable`), quantized weights that are not VQWeight.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from vptq.pack import (check_packable, from_uint16_view, index_bits_of, pack_indices, to_uint16_view,
                       unpack_indices)
from vptq.qlinear import QuantLinear
from vptq.vqweight import VQWeight

log = logging.getLogger(__name__)

FORMAT_NAME = "vq-bench/vptq"
FORMAT_VERSION = 1
MAX_SHARD_BYTES = 4 * 1024**3
LAYER_KEYS = ("in_features", "out_features", "vector_lens", "num_centroids", "num_res_centroids", "group_num",
              "group_size", "outlier_size", "indices_as_float", "enable_norm", "enable_perm", "is_indice_packed",
              "bias", "vector_quant_dim")


def _pow2(k: int) -> int:
    return 1 << index_bits_of(k)


def _pad_rows(c: torch.Tensor, k: int) -> torch.Tensor:
    """(G, k0, v) -> (G, k, v) with zero rows appended."""
    if c.shape[1] == k:
        return c
    return torch.cat([c, c.new_zeros(c.shape[0], k - c.shape[1], c.shape[2])], dim=1)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


# ---------------------------------------------------------------------------------- one layer
def layer_config(q: VQWeight, has_bias: bool) -> Dict[str, Any]:
    """The kwargs of the official `VQuantLinear(**kwargs)` for this weight (config_for_layers entry).
    Pairs are [outlier, main] (microsoft/VPTQ vqlinear.py): outliers are on iff vector_lens[0] > 1 and
    num_centroids[0] > 0; a residual codebook only on the main part (num_res_centroids[0] = -1: the one
    combination it refuses is a residual on the outliers), so outliers beside a main residual load;
    enable_perm only where a permutation is stored (an act order absorbed into the index order has none)."""
    k, kr = _pow2(q.num_centroids), (_pow2(q.num_res_centroids) if q.num_res_centroids else -1)
    return {
        "in_features": q.in_features,
        "out_features": q.out_features,
        "vector_lens": [q.outlier_vector_len if q.outlier_size else -1, q.vector_len],  # [outlier, main]
        "num_centroids": [q.outlier_num_centroids if q.outlier_size else -1, k],
        "num_res_centroids": [-1, kr],
        "group_num": q.group_num,
        "group_size": q.group_size,
        "outlier_size": q.outlier_size,
        "indices_as_float": False,
        "enable_norm": q.weight_scale is not None,
        "enable_perm": q.perm is not None,
        "is_indice_packed": True,
        "bias": bool(has_bias),
        "vector_quant_dim": "out",
    }


def check_exportable(q: VQWeight, name: str = "") -> None:
    """One-line ValueError when the official format cannot hold this weight exactly."""
    where = f"{name}: " if name else ""
    if q.num_centroids > 65536:
        raise ValueError(f"{where}num_centroids={q.num_centroids} > 65536 (indices are uint16 in the VPTQ format)")
    if q.num_res_centroids and _pow2(q.num_res_centroids) > _pow2(q.num_centroids):
        raise ValueError(f"{where}num_res_centroids={q.num_res_centroids} > num_centroids={q.num_centroids}: the "
                         f"official unpacker reads residual indices with the main index width; valid: "
                         f"num_res_centroids <= {_pow2(q.num_centroids)}")
    if q.outlier_size:
        if q.outlier_vector_len < 2:
            raise ValueError(f"{where}outlier_vector_len={q.outlier_vector_len}: the official VQuantLinear disables "
                             f"outliers for vector length <= 1; valid: >= 2")
        if q.outlier_num_centroids > 65536:
            raise ValueError(f"{where}outlier_num_centroids={q.outlier_num_centroids} > 65536 (uint16 indices)")
    if q.perm is not None and q.in_features > 65536:
        raise ValueError(f"{where}in_features={q.in_features} > 65536: the permutation is stored as uint16")
    try:
        check_packable(q.group_size, index_bits_of(_pow2(q.num_centroids)),
                       index_bits_of(_pow2(q.num_res_centroids)) if q.num_res_centroids else 0)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


def layer_tensors(q: VQWeight, bias: Optional[torch.Tensor] = None, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The official VQuantLinear state dict of this weight (names relative to `prefix`)."""
    check_exportable(q, prefix.rstrip("."))
    G, v = q.group_num, q.vector_len
    k = _pow2(q.num_centroids)
    out: Dict[str, torch.Tensor] = {}
    out["centroids.weight"] = _pad_rows(_cpu(q.centroids), k).reshape(G, k * v)  # (G, k*v)
    rb, kr = 0, 0
    res = None
    if q.num_res_centroids:
        kr = _pow2(q.num_res_centroids)
        rb = index_bits_of(kr)
        res = _cpu(q.res_indices)
        out["res_centroids.weight"] = _pad_rows(_cpu(q.res_centroids), kr).reshape(G, kr * v)  # (G, kr*v)
    out["indices"] = pack_indices(_cpu(q.indices), index_bits_of(k), res, rb)  # (G, n, W) int32
    if q.outlier_size:
        out["outlier_centroids.weight"] = _cpu(q.outlier_centroids).reshape(1, -1)  # (1, k_o*v_o)
        out["outlier_indices"] = to_uint16_view(_cpu(q.outlier_indices))  # (1, n_o, n_out) int16
    if q.perm is not None:
        out["perm"] = to_uint16_view(_cpu(q.perm))  # (in,) int16
    if q.weight_scale is not None:
        out["weight_scale"] = _cpu(q.weight_scale)  # (in,)
        out["weight_bias"] = _cpu(q.weight_bias)  # (in,)
    if bias is not None:
        out["bias"] = _cpu(bias)  # (out,)
    return {prefix + n: t for n, t in out.items()}


def vqweight_from_tensors(conf: Dict[str, Any], t: Dict[str, torch.Tensor], prefix: str = "",
                          true_sizes: Optional[Dict[str, int]] = None) -> Tuple[VQWeight, Optional[torch.Tensor]]:
    """Inverse of `layer_tensors`: an official layer config + its tensors -> (VQWeight, bias or None).
    `true_sizes` (from our "vq_bench" metadata) trims codebooks padded to a power of two."""
    missing = [k for k in ("in_features", "out_features", "vector_lens", "num_centroids", "num_res_centroids",
                           "group_num", "group_size", "outlier_size") if k not in conf]
    if missing:
        raise ValueError(f"{prefix}: layer config lacks {missing}")
    if conf.get("vector_quant_dim", "out") != "out":
        raise ValueError(f"{prefix}: vector_quant_dim={conf['vector_quant_dim']!r} not supported; valid: 'out'")
    if conf.get("indices_as_float", False):
        raise ValueError(f"{prefix}: indices_as_float=true not supported; valid: false")
    if not conf.get("is_indice_packed", True):
        raise ValueError(f"{prefix}: is_indice_packed=false not supported; valid: true")
    sizes = true_sizes or {}
    G, gs = int(conf["group_num"]), int(conf["group_size"])
    v_o, v = (int(x) for x in conf["vector_lens"])
    k_o, k = (int(x) for x in conf["num_centroids"])
    kr = int(conf["num_res_centroids"][1])
    n_out = int(conf["outlier_size"])
    kr = kr if kr > 0 else 0
    has_outliers = v_o > 1 and k_o > 0  # the official rule
    if n_out and not has_outliers:
        raise ValueError(f"{prefix}: outlier_size={n_out} but vector_lens[0]={v_o}, num_centroids[0]={k_o}")

    def get(name):
        if prefix + name not in t:
            raise ValueError(f"missing tensor {prefix + name}")
        return t[prefix + name]

    ib, rb = index_bits_of(k), (index_bits_of(kr) if kr else 0)
    idx, res = unpack_indices(get("indices"), ib, gs, rb)  # (G, n, gs) int64 each
    k_true, kr_true = int(sizes.get("num_centroids", k)), int(sizes.get("num_res_centroids", kr))
    centroids = get("centroids.weight").reshape(G, k, v)[:, :k_true].contiguous()  # (G, k, v)
    kw: Dict[str, Any] = dict(out_features=int(conf["out_features"]), in_features=int(conf["in_features"]),
                              vector_len=v, num_centroids=k_true, group_num=G, group_size=gs,
                              centroids=centroids, indices=idx)
    if kr:
        kw.update(num_res_centroids=kr_true, res_indices=res,
                  res_centroids=get("res_centroids.weight").reshape(G, kr, v)[:, :kr_true].contiguous())
    if has_outliers and n_out:
        kw.update(outlier_size=n_out, outlier_vector_len=v_o, outlier_num_centroids=k_o,
                  outlier_centroids=get("outlier_centroids.weight").reshape(1, k_o, v_o),
                  outlier_indices=from_uint16_view(get("outlier_indices")))
    if conf.get("enable_perm", False):
        kw["perm"] = from_uint16_view(get("perm"))
    if conf.get("enable_norm", False):
        kw.update(weight_scale=get("weight_scale"), weight_bias=get("weight_bias"))
    bias = t.get(prefix + "bias") if conf.get("bias", False) else None
    if conf.get("bias", False) and bias is None:
        raise ValueError(f"missing tensor {prefix}bias")
    return VQWeight(**kw), bias


# ---------------------------------------------------------------------------------- whole model
def quantized_layers(model: nn.Module) -> Dict[str, QuantLinear]:
    """Every QuantLinear in the model, by full module name; refuses non-VPTQ quantized weights."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if not isinstance(m.qweight, VQWeight):
                raise ValueError(f"{name} holds a {type(m.qweight).__name__}, not a VQWeight: the VPTQ format "
                                 f"stores VQWeight layers only")
            out[name] = m
    return out


def _float_tensors(model: nn.Module, skip: List[str]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The non-quantized state (embeddings, norms, lm_head...). -> (tensors, alias names).

    A tensor that shares its storage with an earlier one (a tied lm_head) is written again as a
    copy: transformers' loaders re-tie it, but the official vptq 0.0.5.post1 loader does not and
    leaves a missing lm_head.weight on the meta device (measured: "Cannot copy out of meta tensor").
    safetensors refuses shared storage, hence the copy."""
    prefixes = tuple(s + "." for s in skip)
    out: Dict[str, torch.Tensor] = {}
    seen = set()  # (device, storage pointer) already written
    aliases = []
    for name, t in model.state_dict(keep_vars=False).items():
        if name.startswith(prefixes):
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:  # tied (or any tensor sharing memory with an earlier one): write a copy
            aliases.append(name)
            out[name] = _cpu(t).clone()
            continue
        seen.add(key)
        out[name] = _cpu(t)
    return out, aliases


def _add_legacy_keys(path: str) -> None:
    """transformers 4.x (the official vptq loader needs 4.57) ignores 5.x's `rope_parameters` and would
    silently fall back to rope_theta=10000: also write the 4.x keys `rope_theta` / `rope_scaling`
    (5.x reads them too and agrees)."""
    with open(path) as f:
        d = json.load(f)
    for c in (d, d.get("text_config")):
        rp = (c or {}).get("rope_parameters")
        if not isinstance(rp, dict) or "rope_theta" not in rp:
            continue  # absent, or per-layer-type parameters (no single 4.x equivalent)
        c.setdefault("rope_theta", rp["rope_theta"])
        if rp.get("rope_type", "default") != "default":
            c.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


# tokenizer classes transformers 5.x writes that 4.x (the official vptq package's environment) lacks, and the
# 4.x class that reads the same tokenizer.json verbatim (5.x reads that name too: an alias of the same class)
LEGACY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")  # how the source was loaded, not what it is


def _legacy_tokenizer_class(folder: str) -> None:
    """Make a saved tokenizer loadable by transformers 4.x too: 5.x writes `tokenizer_class:
    TokenizersBackend` (4.57: "Tokenizer class TokenizersBackend does not exist"); with a tokenizer.json
    beside it, `PreTrainedTokenizerFast` reads that file verbatim in both versions (measured on SmolLM2's
    and the byte tokenizer: the same ids, special tokens and chat template in 4.57.6 and 5.24). The keys
    that record how the source was loaded (`local_files_only`, `is_local`) are dropped. Other classes
    (model-specific names both versions know) are left as written."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        d = json.load(f)
    cls = d.get("tokenizer_class")
    if cls in LEGACY_TOKENIZER_CLASSES and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        d["tokenizer_class"] = LEGACY_TOKENIZER_CLASSES[cls]
    for k in LOAD_TIME_TOKENIZER_KEYS:
        d.pop(k, None)
    with open(path, "w") as f:
        json.dump(d, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _shards(tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        b = t.numel() * t.element_size()
        if shards[-1] and size + b > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += b
    return shards


def export_vptq(model: nn.Module, tokenizer, out_dir: str, *, method: Optional[Dict[str, Any]] = None,
                run_config: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None,
                overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Write `model` (a HF causal LM whose quantized linears are QuantLinear(VQWeight)) as an official
    VPTQ model folder at `out_dir`. Returns out_dir."""
    import safetensors.torch
    import transformers

    import vptq

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True or choose another folder")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear(VQWeight) layers: nothing to export in the VPTQ format")

    config_for_layers: Dict[str, Any] = {}
    meta_layers: Dict[str, Any] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        q = m.qweight
        tensors.update(layer_tensors(q, m.bias, prefix=name + "."))
        config_for_layers[name] = layer_config(q, m.bias is not None)
        st = q.storage()
        meta_layers[name] = {"num_centroids": q.num_centroids, "num_res_centroids": q.num_res_centroids,
                             "outlier_num_centroids": q.outlier_num_centroids, "settings": q.settings(),
                             "storage_bits": dict(st.bits), "numel": st.numel}
    floats, aliases = _float_tensors(model, list(layers))
    clash = set(floats) & set(tensors)
    if clash:
        raise ValueError(f"tensor names used twice: {sorted(clash)[:4]}")
    tensors.update(floats)
    float_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))

    total = sum(s.numel for s in (m.qweight.storage() for m in layers.values()))
    tbits = sum(m.qweight.storage().total_bits for m in layers.values())
    ibits = sum(m.qweight.storage().index_bits for m in layers.values())
    desc = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vq_bench_version": vptq.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bits": {"index": ibits / total, "total": tbits / total, "quantized_params": total},
        "tied_aliases": aliases, "layers": meta_layers,
        "method": method or {}, "run_config": run_config or {}, **(extra or {}),
    }
    qc = {"quant_method": "vptq", "config_for_layers": config_for_layers, "shared_layer_config": {},
          "modules_to_not_convert": float_linears, "vq_bench": desc}

    conf = copy.deepcopy(model.config)
    conf.quantization_config = qc
    conf.use_cache = True  # the harness turns it off for evaluation; a saved model generates

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        conf.save_pretrained(tmp)
        _add_legacy_keys(os.path.join(tmp, "config.json"))
        shards = _shards(tensors, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            safetensors.torch.save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, sh in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                safetensors.torch.save_file(sh, os.path.join(tmp, fname), metadata=meta)
                weight_map.update({n: fname for n in sh})
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _legacy_tokenizer_class(tmp)
        old = None
        if os.path.exists(out_dir):
            old = f"{out_dir}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d VPTQ layers (%.3f total bits/weight) to %s", len(layers), desc["bits"]["total"], out_dir)
    return out_dir


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (e.g. "model.layers.0.mlp.up_proj") by `new`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _read_tensors(folder: str) -> Dict[str, torch.Tensor]:
    import safetensors.torch

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors (or index): only safetensors checkpoints load")
    out: Dict[str, torch.Tensor] = {}
    for fn in files:
        out.update(safetensors.torch.load_file(os.path.join(folder, fn)))
    return out


def read_quantization_config(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    with open(path) as f:
        cfg = json.load(f)
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not qc or qc.get("quant_method") != "vptq":
        raise ValueError(f"{path}: quantization_config.quant_method is "
                         f"{(qc or {}).get('quant_method')!r}; valid: 'vptq'")
    return qc


def load_vptq(folder: str, device="cpu", kernel: str = "torch") -> Tuple[nn.Module, Any]:
    """Our loader for a VPTQ model folder (ours or the official format): safetensors only, no remote
    code. -> (model in eval mode with QuantLinear(VQWeight) layers, tokenizer or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = read_quantization_config(folder)
    layers = dict(qc.get("config_for_layers") or {})
    shared = qc.get("shared_layer_config") or {}
    sizes = (qc.get("vq_bench") or {}).get("layers", {})
    conf = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config  # we build the quantized layers ourselves
    with init_empty_weights(include_buffers=False):  # parameters on meta: nothing allocated twice
        model = AutoModelForCausalLM.from_config(conf, trust_remote_code=False, dtype=getattr(conf, "dtype", None))
    if shared:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name not in layers and name.rsplit(".", 1)[-1] in shared:
                layers[name] = {**shared[name.rsplit(".", 1)[-1]], "in_features": m.in_features,
                                "out_features": m.out_features}
    tensors = _read_tensors(folder)
    used = set()
    for name, lc in layers.items():
        q, bias = vqweight_from_tensors(lc, tensors, prefix=name + ".", true_sizes=sizes.get(name))
        used.update(k for k in tensors if k.startswith(name + "."))
        _set_module(model, name, QuantLinear(q, bias=bias, kernel=kernel))
    rest = {k: t for k, t in tensors.items() if k not in used}
    res = model.load_state_dict(rest, strict=False, assign=True)
    if res.unexpected_keys:
        raise ValueError(f"{folder}: tensors the model does not have: {res.unexpected_keys[:5]}")
    if getattr(conf, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if meta:
        raise ValueError(f"{folder}: no stored tensor for {meta[:5]}{' ...' if len(meta) > 5 else ''}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    tok = None
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tok


def export_run(model, tokenizer, run_config: Dict[str, Any], result: Dict[str, Any], out_dir: str) -> None:
    """`save.quantized=true` for method=vptq (runners/save.py EXPORTERS). `run_config`: the run's resolved
    configuration as plain data (the runner converts its Hydra config once); `result`: the run record."""
    export_vptq(model, tokenizer, out_dir, overwrite=True,
                method={"name": (run_config.get("method") or {}).get("name"), "settings": result.get("settings", {})},
                run_config=run_config,
                extra={"run": {k: result.get(k) for k in ("bits", "ppl", "eval", "calib", "seed", "env")
                               if k in result}})
