"""Typed config schemas, registered in Hydra's ConfigStore.

Every default is defined here exactly once; the YAML files in `conf/` only pick and override.
A typo in an override (`model.pathh=...`) fails at compose time because the nodes are typed.
Method schemas live with their methods (`<Method>.Config`) and are registered from the method
registry, so adding a method needs no edit here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TinyModelConfig:
    """A randomly initialised model built in code (tests, CI)."""
    arch: str = "llama"  # llama | mistral
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    init_seed: int = 0


@dataclass
class ArchConfig:
    """The architecture as the planner (runners/plan.py) reads it, without loading weights: the
    linears a decoder block holds and the float parts around them. null = unknown: read from
    `model.path`'s config.json when that is a local folder, from `model.tiny` for tiny models.
    Descriptive only: the loaded weights decide what a run quantizes."""
    model_type: Optional[str] = None  # a runners/arch.py ARCHS key (llama, mistral, ...); null = llama
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None  # null = num_attention_heads (no grouped-query attention)
    head_dim: Optional[int] = None  # null = hidden_size // num_attention_heads
    vocab_size: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None


@dataclass
class ModelConfig:
    name: str = MISSING  # short name shown in tables
    source: str = MISSING  # smollm2_gguf | pretrained | tiny
    path: Optional[str] = None  # hub id or local folder (source=pretrained)
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | float16 | bfloat16
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)  # for planning (runners/plan.py)


@dataclass
class DataConfig:
    name: str = MISSING  # pydoc | text | wikitext2 | c4
    path: Optional[str] = None  # folder with valid.txt/train.txt and test.txt (name=text)


@dataclass
class CalibConfig:
    nsamples: int = 32
    seqlen: int = 512


@dataclass
class QADataConfig:
    """Local copies of QA tasks in their published format (a task left null comes from the hub).
    One field per format that runners/qa.py LOCAL_FORMATS can read."""
    piqa: Optional[str] = None  # folder with valid.jsonl + valid-labels.lst, e.g. ../shared/data/piqa


@dataclass
class EvalConfig:
    name: str = "ppl"
    seqlen: int = MISSING  # tokens per perplexity window; printed in every table header
    max_windows: Optional[int] = None  # first N windows only (CPU runs); null = all
    datasets: List[str] = field(default_factory=list)  # perplexity datasets; empty = [data.name]
    # per-dataset window length (tokens), e.g. {pydoc: 512, wikitext2: 2048}; others use `seqlen`
    seqlens: Dict[str, int] = field(default_factory=dict)
    # local text folders (test.txt) by dataset name: a name in `datasets` that is not a built-in
    # dataset is read from here, e.g. datasets=[pydoc,wikitext2_v1] paths.wikitext2_v1=DIR
    paths: Dict[str, str] = field(default_factory=dict)
    # zero-shot QA through lm-eval (runners/qa.py) on the in-memory quantized model; [] = none
    qa_tasks: List[str] = field(default_factory=list)
    qa_limit: Optional[int] = None  # first N questions per task (CPU runs); null = all
    qa_batch_size: int = 16
    qa_data: "QADataConfig" = field(default_factory=lambda: QADataConfig())
    # distribution metrics against the float model (runners/kld.py, runners/ppl.py): KL(fp||q), top-1
    # agreement, Δp of the correct token, PPL ratio; the float model's top-k log-probs are cached once
    kld: bool = True
    kld_topk: Optional[int] = 64  # float tokens kept per position; null = the whole vocabulary (exact KL)
    kld_cache: Optional[str] = None  # folder of the float references; null = <VQB_CACHE>/float_reference


@dataclass
class KernelConfig:
    name: str = "torch"  # torch | triton | cpu
    # decode tok/s + per-layer GEMV timing into metrics.json "kernel" (runners/throughput.py);
    # null = on for a CUDA device, off on CPU (keeps CPU runs fast)
    throughput: Optional[bool] = None
    prompt_tokens: int = 16  # prefilled before the timed decode
    decode_tokens: int = 32  # timed greedy decode steps, batch 1
    warmup_tokens: int = 4  # untimed decode steps first (compilation, autotuning)


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = "vq-bench"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online (online needs WANDB_API_KEY in the environment)
    tags: List[str] = field(default_factory=list)


@dataclass
class HessianConfig:
    # quantized: block i's inputs come from the already-quantized blocks (GPTQ "sequential")
    # float: Hessians of the float model (VPTQ, QuIP#): every layer independent
    protocol: str = "quantized"
    cache_dir: Optional[str] = None


@dataclass
class QuantizeConfig:
    # save each finished block under <results_root>/checkpoints/<quantization key>/ so that a rerun of an
    # interrupted job resumes at the first unfinished block; removed when the job finishes unless kept.
    # The key (runners.metrics.quantization_key) leaves out the evaluation and finetune=e2e settings:
    # with keep_checkpoints=true, e2e jobs (any lr, epochs, ...) start from the blocks another job quantized
    checkpoint: bool = True
    keep_checkpoints: bool = False
    # layer-parallel quantization (needs hessian.protocol=float): blocks are quantized by separate
    # jobs (a submitit job array on Slurm, local processes otherwise) into the checkpoint folder,
    # then this job assembles the model from the checkpoints (runners/parallel.py)
    parallel: bool = False
    blocks_per_job: int = 1
    executor: str = "auto"  # auto (Slurm under hydra/launcher=slurm|submitit_slurm, else local) | local | slurm


@dataclass
class SaveConfig:
    quantized: bool = False  # write a Hugging Face model folder of the quantized model
    dir: Optional[str] = None  # default: <job dir>/quantized_model


@dataclass
class FinetuneConfig:
    """`finetune=none|layer|e2e` (runners/finetune.py): training the quantized model's continuous
    parameters (codebooks, norms, scales, RMSNorm weights; indices and codes frozen), every method.
    A null field takes its mode's preset (runners.finetune.PRESETS; layer: the VPTQ paper's 100
    steps, lr 1e-4 -> 5e-6)."""
    mode: str = "none"  # none | layer (each block, during quantization) | e2e (the whole model, after)
    lr: Optional[float] = None  # Adam learning rate at the start
    lr_min: Optional[float] = None  # at the end of a cosine decay (null in both: the preset's)
    steps: Optional[int] = None  # layer: Adam steps per block (the paper's iterations)
    epochs: Optional[int] = None  # e2e: most passes over the training windows (early stopped)
    batch: Optional[int] = None  # calibration windows per Adam step (gradients accumulated one at a time)
    norms: bool = True  # train the RMSNorm weights too
    patience: int = 1  # e2e: stop after this many epochs without a lower held-out KL
    heldout: float = 0.125  # e2e: fraction of the calibration windows held out for early stopping (>= 1)
    # e2e: calibration windows (of calib.seqlen tokens, the calibration data, the run's seed) it trains and
    # early-stops on; null = the quantization's own (calib.nsamples). Larger: the first calib.nsamples are the
    # quantization's windows (same sampler, same seed), the held-out ones come last (unseen by quantization
    # from nsamples >= 8/7 x calib.nsamples on); equal to calib.nsamples: keyed as null (the same windows)
    nsamples: Optional[int] = None
    topk: Optional[int] = 64  # e2e: float tokens kept per position for the KL; null = the whole vocabulary
    seed: Optional[int] = None  # window order; null = the run's seed
    # e2e: each decoder block under gradient checkpointing (recomputed in the backward pass). null =
    # auto: on for CUDA; on CPU only where the model's weights dequantized to float32 plus one window's
    # activations would take over half the available memory. Changes memory and time, not results
    # (the same operations recompute the same values: tests/test_finetune.py), so not in the run key.
    checkpoint: Optional[bool] = None


@dataclass
class Config:
    model: ModelConfig = MISSING
    method: Any = MISSING
    kernel: KernelConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    bits: float = 2.0  # target average TOTAL bits per weight over the quantized linears
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    results_root: str = "outputs"  # where finished runs are looked up (resume) and written
    resume: bool = True  # skip a job whose run_key already finished under results_root
    # determinism audit: quantize a second time in this job (fresh model, no checkpoints, no Hessian
    # cache) and record in metrics.json whether every stored tensor's hash agrees (`audit`)
    audit: bool = False


def register_configs() -> None:
    # conf/hydra/launcher/submitit_{slurm,local}.yaml are merged onto the submitit plugin's schemas of
    # the same name on purpose (our defaults, the plugin's fields): silence Hydra's notice about it.
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="kernel", name="kernel_schema", node=KernelConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="finetune", name="finetune_schema", node=FinetuneConfig)
    from vptq.methods import METHODS, method_class

    for name in METHODS:
        cs.store(group="method", name=f"{name}_schema", node=method_class(name).Config)
