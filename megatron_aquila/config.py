"""Typed run configuration: dataclass sections, YAML recipes, dotted overrides, validation.

A recipe is a YAML mapping of sections (``model``, ``parallel``, ``training``, ``optimizer``,
``precision``, ``data``, ``checkpoint``, ``logging``, ``distributed``) to fields of the dataclasses below.
Command-line overrides are ``section.field=value`` with the value parsed as YAML. Unknown
sections or fields and invalid combinations raise ``ConfigError`` before any process group work.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from megatron_aquila.model.kernels import KERNEL_BACKENDS
from megatron_aquila.model.presets import MODEL_PRESETS


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# model.rope_scaling values; the maths of each is in model/rope.py
ROPE_SCALING_TYPES = ("none", "linear", "dynamic", "yarn", "llama3")


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message says which key and how to fix it."""


@dataclass
class ModelConfig:
    """Shape and numerics of the Aquila (LLaMA-architecture) decoder."""

    preset: Optional[str] = None            # fill unset fields from model/presets.py (explicit keys win)
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_kv_heads: Optional[int] = None      # grouped-query attention; None means multi-head (= heads)
    ffn_hidden_size: Optional[int] = None   # None: LLaMA rule from ffn_multiple_of / ffn_multiplier
    ffn_multiple_of: int = 256
    ffn_multiplier: Optional[float] = None  # Aquila2-34B uses 1.3
    vocab_size: int = 8192                  # tokenizer vocabulary, before padding
    make_vocab_size_divisible_by: int = 128  # the padded vocab is a multiple of this x TP
    seq_length: int = 256
    norm_eps: float = 1e-5
    norm_init: float = 1.0                  # RMSNorm weight init (Aquila2-34B: 0.3)
    rope_base: float = 10000.0
    rope_interleaved: bool = False          # pairs (2i, 2i+1) instead of rotate-half (i, i + d/2)
    # RoPE scaling for long context, maths in model/rope.py; keys map to transformers' rope_parameters.
    rope_scaling: str = "none"              # none | linear (position interpolation) | dynamic (NTK) | yarn | llama3
    rope_scaling_factor: float = 1.0        # s >= 1: context extension ratio (4 for 4096 -> 16384); 1 with none
    rope_original_max_positions: Optional[int] = None  # L: pretraining length; dynamic, yarn and llama3 only
    rope_yarn_beta_fast: float = 32.0       # yarn: pairs turning >= this many times in L positions keep theta
    rope_yarn_beta_slow: float = 1.0        # yarn: pairs turning <= this many times get theta / s
    rope_yarn_attention_factor: Optional[float] = None  # yarn: m multiplying cos, sin; None: from s (and mscale)
    rope_yarn_mscale: Optional[float] = None            # yarn, with mscale_all_dim: m = mscale(s, this) /
    rope_yarn_mscale_all_dim: Optional[float] = None    # mscale(s, mscale_all_dim); both or neither
    rope_yarn_truncate: bool = True         # yarn: round the ramp ends to whole pairs
    rope_llama3_low_freq_factor: float = 1.0   # llama3: wavelengths above L / this get theta / s
    rope_llama3_high_freq_factor: float = 4.0  # llama3: wavelengths below L / this keep theta
    init_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    kernels: str = "auto"                   # auto | torch | flash-attn | transformer-engine | apex (model/kernels.py)
    compile: bool = False                   # torch.compile each transformer block (regional compilation)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """FFN width: explicit, or int(8h/3) [x multiplier] rounded up to ffn_multiple_of."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        width = int(2 * 4 * self.hidden_size / 3)
        if self.ffn_multiplier is not None:
            width = int(self.ffn_multiplier * width)
        return self.ffn_multiple_of * math.ceil(width / self.ffn_multiple_of)

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by x TP (Megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class ParallelConfig:
    """Layout of the TP x CP x DP x PP grid (DP is whatever the world size leaves)."""

    tensor_parallel: int = 1
    context_parallel: int = 1               # ranks splitting each sequence (2 x CP load-balanced chunks)
    pipeline_parallel: int = 1
    virtual_pipeline_stages: int = 1        # model chunks per pipeline rank (interleaved 1F1B when > 1)
    pipeline_layers: Optional[list[int]] = None  # explicit layers per stage, e.g. [3, 5]; None = even split
    sequence_parallel: bool = False
    distributed_optimizer: bool = False     # ZeRO-1: shard fp32 master params and Adam state over DP
    overlap_grad_reduce: bool = True        # reduce each bucket as soon as its grads are ready
    grad_bucket_size_mb: float = 40.0
    tp_comm_overlap: bool = True            # backward: TP grad-input reduce runs while the weight-grad GEMM does
    overlap_param_gather: bool = True       # ZeRO-1: updated params gathered per bucket during the next forward


@dataclass
class TrainingConfig:
    """Batching, run length, recompute and seeds."""

    micro_batch_size: int = 1
    global_batch_size: int = 8
    rampup_batch_size: Optional[list[int]] = None  # [start, increment, ramp samples], Megatron semantics
    train_iters: Optional[int] = None       # exactly one of train_iters / train_samples
    train_samples: Optional[int] = None
    eval_interval: int = 0                  # 0 disables validation
    eval_iters: int = 10
    recompute: str = "none"                 # none | selective (attention core) | full (whole block)
    seed: int = 1234
    exit_interval: Optional[int] = None     # stop (after saving) at an iteration multiple of this
    exit_duration_minutes: Optional[float] = None
    max_skipped_in_a_row: int = 10          # stop after this many consecutive skipped steps (inf/nan grads)
    loss_average: str = "per_microbatch"    # per_microbatch (mean of micro-batch means) | per_token (Megatron's
                                            # calculate_per_token_loss: token-loss sum / loss-token count);
                                            # per_token is the default when data.sft is true


@dataclass
class OptimizerConfig:
    """AdamW with global-norm clipping and a warmup + decay learning-rate schedule."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1               # not applied to norm weights
    clip_grad: float = 1.0                  # 0 disables clipping
    lr_decay_style: str = "cosine"          # cosine | linear | constant
    lr_warmup_samples: int = 0              # schedules count samples when train_samples is set,
    lr_decay_samples: Optional[int] = None  # else the *_iters fields; None decays over the run
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None


@dataclass
class PrecisionConfig:
    """Parameter dtype, fp32 master weights and grads, and the fp16 dynamic loss scaler."""

    dtype: str = "fp32"                     # fp32 | bf16 | fp16
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000           # steps without overflow before the scale doubles
    hysteresis: int = 2                     # overflows tolerated before the scale halves

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model parameters' (and pipeline activations') dtype."""
        return TORCH_DTYPES[self.dtype]


@dataclass
class DataConfig:
    """Where tokens come from."""

    data_path: list[Any] = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    split: str = "949,50,1"
    cache_dir: Optional[str] = None         # index cache; default: beside the first data prefix
    num_workers: int = 1
    mock: bool = False                      # random tokens instead of data_path (benchmarks, planning)
    sft: bool = False                       # data_path names preprocess_data.py --sft prefixes: packed
                                            # conversations, per-document attention (docs/design.md section 12)


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (torch.distributed.checkpoint) and initialisation."""

    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    init_weights: Optional[str] = None      # when not resuming: a from-hf output directory (or its index, or a
                                            # full_state.safetensors), or one of our checkpoints (weights only)
    async_save: bool = False                # stage to host memory, write in the background while training goes on
    keep_last: Optional[int] = None         # keep the N newest complete checkpoints (None keeps all)


@dataclass
class LoggingConfig:
    """The per-iteration log line and metric sinks."""

    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"             # offline works with no network; online needs a login
    peak_tflops: Optional[float] = None     # per device; None: table by device name, CPU measured
    output_dir: Optional[str] = None        # resolved config and logs; default: checkpoint.save
    straggler_interval: int = 100           # every N iterations rank 0 names the slowest and fastest ranks
                                            # (stragglers.py: one all_gather over the world); >= 1


@dataclass
class DistributedConfig:
    """Time limits that turn a stuck job into a failed one (docs/design.md, "Failure handling")."""

    nccl_timeout_minutes: float = 30.0      # init_process_group timeout: a collective of the world group waiting
                                            # this long fails (NCCL then dumps its flight recorder, launch_torchrun.sh)
    hang_timeout_minutes: float = 30.0      # watchdog.py: a rank that reports no progress (a new iteration,
                                            # micro-batch, save, evaluation) for this long dumps every thread's
                                            # stack and exits. Above the longest legitimate phase: a synchronous
                                            # Aquila2-34B save writes ~470 GB (docs/design.md section 10), minutes
                                            # on a shared filesystem; fractions allowed (0.1 = 6 s, for tests)


LORA_TARGET_NAMES = ("qkv", "q", "k", "v", "dense", "o", "gate_up", "gate", "up", "down")


@dataclass
class LoraConfig:
    """LoRA on the decoder's linear layers (model/lora.py): W x + (alpha / rank) B A x, base weights frozen."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0                    # on the LoRA branch input, in training
    targets: list[str] = field(default_factory=lambda: ["qkv", "dense", "gate_up", "down"])  # of LORA_TARGET_NAMES


@dataclass
class QLoraConfig:
    """Q-LoRA (model/qlora.py): the frozen base weights of the LoRA-targeted layers stored 4-bit (bitsandbytes)."""

    bits: int = 4                           # only 4 (NF4 / FP4 blocks of 64 weights)
    quant_type: str = "nf4"                 # nf4 (normal-float, the Q-LoRA paper's) | fp4
    double_quant: bool = True               # quantize the per-block absmax scales to 8 bits as well
    compute_dtype: str = "bf16"             # dtype the weights are dequantized to for each matmul; = precision.dtype


@dataclass
class FinetuneConfig:
    """Fine-tuning options; with ``lora`` unset every parameter trains (full fine-tuning)."""

    lora: Optional[LoraConfig] = None
    qlora: Optional[QLoraConfig] = None     # with lora: the targeted layers' base weights 4-bit


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor_parallel * p.context_parallel * p.pipeline_parallel)

    def validate(self, world_size: int) -> None:
        """Check every divisibility and choice; raise ConfigError carrying the numbers."""
        validate_config(self, world_size)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = get_origin(annotation)
    if origin is Union:
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = get_args(annotation) or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {annotation.__name__} keys, got {value!r}")
        return _section_from_dict(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-5" as a string
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _section_from_dict(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(section + '.' + k for k in unknown)}; "
                          f"valid keys of '{section}': {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not section.key=value (example: training.train_iters=100)")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must be section.key (example: model.num_layers=8)")
    section, key = parts
    tree.setdefault(section, {})[key] = yaml.safe_load(raw) if raw.strip() else None


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build a Config from nested mappings; model.preset fills the model fields not given, and
    ``training.loss_average`` defaults to per_token for SFT (``data.sft``) when not given."""
    section_types = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    unknown = sorted(set(tree) - set(section_types))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(section_types)}")
    sections: dict[str, Any] = {}
    for name, cls in section_types.items():
        values = dict(tree.get(name) or {})
        if not isinstance(values, dict):
            raise ConfigError(f"section '{name}' must be a mapping, got {values!r}")
        if name == "model" and values.get("preset") is not None:
            preset = values["preset"]
            if preset not in MODEL_PRESETS:
                raise ConfigError(f"model.preset {preset!r} is unknown; choose one of {sorted(MODEL_PRESETS)}")
            values = {**MODEL_PRESETS[preset], **values}
        if name == "training" and "loss_average" not in values and (tree.get("data") or {}).get("sft") is True:
            values["loss_average"] = "per_token"  # every loss token of the global batch weighs the same
        sections[name] = _section_from_dict(cls, values, name)
    return Config(**sections)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for override in overrides:
        _apply_override(tree, override)
    return config_from_dict(tree)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_rope_scaling(m: ModelConfig) -> None:
    """The RoPE scaling fields (maths: model/rope.py); transformers requires factor >= 1 for every type."""
    kind, factor, original = m.rope_scaling, m.rope_scaling_factor, m.rope_original_max_positions
    _require(kind in ROPE_SCALING_TYPES,
             f"model.rope_scaling {kind!r} must be one of {', '.join(ROPE_SCALING_TYPES)}")
    if kind == "none":
        _require(factor == 1.0, f"model.rope_scaling_factor {factor} has no effect with model.rope_scaling 'none'; "
                                "set model.rope_scaling (linear, dynamic, yarn or llama3) or leave the factor at 1")
    else:
        _require(factor >= 1.0, f"model.rope_scaling_factor {factor} must be >= 1 for model.rope_scaling {kind!r}: "
                                "it is the context extension ratio, e.g. 4 for 4096 -> 16384 positions")
    if kind in ("none", "linear"):
        _require(original is None, f"model.rope_original_max_positions {original} is not used by model.rope_scaling "
                                   f"{kind!r}; unset it (dynamic, yarn and llama3 read it)")
        return
    _require(original is not None and original >= 1,
             f"model.rope_scaling {kind!r} needs model.rope_original_max_positions >= 1, the pretraining sequence "
             f"length (e.g. 4096); got {original}")
    if kind == "dynamic":
        _require(m.head_dim > 2, f"model.rope_scaling 'dynamic' needs a head dim > 2 (its base exponent is "
                                 f"d / (d - 2)); head dim is {m.head_dim}")
    if kind == "yarn":
        fast, slow = m.rope_yarn_beta_fast, m.rope_yarn_beta_slow
        _require(fast >= slow > 0, f"model.rope_yarn_beta_fast {fast} and model.rope_yarn_beta_slow {slow} must "
                                   "satisfy beta_fast >= beta_slow > 0 (transformers' defaults: 32 and 1)")
        attention, mscale, mscale_all_dim = (m.rope_yarn_attention_factor, m.rope_yarn_mscale,
                                             m.rope_yarn_mscale_all_dim)
        _require(attention is None or attention > 0,
                 f"model.rope_yarn_attention_factor {attention} must be > 0 (or unset to derive it from the factor)")
        _require((mscale is None) == (mscale_all_dim is None),
                 f"model.rope_yarn_mscale {mscale} and model.rope_yarn_mscale_all_dim {mscale_all_dim} are used "
                 "together: set both or neither")
        _require(mscale is None or (mscale > 0 and mscale_all_dim > 0),
                 f"model.rope_yarn_mscale {mscale} and model.rope_yarn_mscale_all_dim {mscale_all_dim} must be > 0")
        _require(attention is None or mscale is None,
                 f"model.rope_yarn_attention_factor {attention} and model.rope_yarn_mscale {mscale} are both set; "
                 "the attention factor would win: set one of them")
    if kind == "llama3":
        low, high = m.rope_llama3_low_freq_factor, m.rope_llama3_high_freq_factor
        _require(0 < low < high, f"model.rope_llama3_low_freq_factor {low} and model.rope_llama3_high_freq_factor "
                                 f"{high} must satisfy 0 < low < high (Llama 3.1: 1 and 4)")


def _validate_qlora(config: Config) -> None:
    q = config.finetune.qlora
    _require(config.finetune.lora is not None,
             "finetune.qlora quantizes the frozen base weights under LoRA adapters: add a finetune.lora section "
             "(e.g. rank 64, alpha 16) or remove finetune.qlora")
    _require(q.bits == 4, f"finetune.qlora.bits {q.bits} is not supported: only 4-bit (NF4/FP4) weights; set bits: 4")
    _require(q.quant_type in ("nf4", "fp4"), f"finetune.qlora.quant_type {q.quant_type!r} must be nf4 or fp4")
    _require(q.compute_dtype == config.precision.dtype,
             f"finetune.qlora.compute_dtype {q.compute_dtype!r} must equal precision.dtype "
             f"{config.precision.dtype!r} (the dequantized weights meet activations of that dtype); set both to bf16")
    if q.compute_dtype == "bf16" and torch.cuda.is_available():
        _require(torch.cuda.is_bf16_supported(),
                 f"finetune.qlora.compute_dtype bf16 on {torch.cuda.get_device_name()}, which has no bf16: set "
                 "precision.dtype and finetune.qlora.compute_dtype to fp32")
    _require(importlib.util.find_spec("bitsandbytes") is not None,
             "finetune.qlora needs bitsandbytes (the 4-bit kernels), which is not installed: "
             "pip install -e '.[qlora]' (or pip install 'bitsandbytes>=0.45')")


def validate_config(config: Config, world_size: int) -> None:
    m, p, t, o, pr = config.model, config.parallel, config.training, config.optimizer, config.precision
    tp, cp, pp, vpp = p.tensor_parallel, p.context_parallel, p.pipeline_parallel, p.virtual_pipeline_stages
    _require(tp >= 1 and cp >= 1 and pp >= 1 and vpp >= 1,
             f"parallel sizes must be >= 1: tp {tp}, cp {cp}, pp {pp}, vpp {vpp}")
    _require(world_size % (tp * cp * pp) == 0,
             f"world size {world_size} is not divisible by tensor_parallel {tp} x context_parallel {cp} x "
             f"pipeline_parallel {pp} = {tp * cp * pp}; launch a multiple of {tp * cp * pp} processes or change "
             "the layout")
    dp = world_size // (tp * cp * pp)
    if cp > 1:
        _require(m.seq_length % (2 * cp) == 0,
                 f"model.seq_length {m.seq_length} is not divisible by 2 x context_parallel {cp} = {2 * cp} (each "
                 f"rank holds 2 of 2 x {cp} load-balanced chunks); use a multiple of {2 * cp}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size {m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}")
    _require(m.num_attention_heads % m.kv_heads == 0,
             f"num_attention_heads {m.num_attention_heads} is not divisible by num_kv_heads {m.kv_heads}")
    _require(m.num_attention_heads % tp == 0,
             f"num_attention_heads {m.num_attention_heads} is not divisible by tensor_parallel {tp}")
    _require(m.kv_heads % tp == 0,
             f"num_kv_heads {m.kv_heads} is not divisible by tensor_parallel {tp}: GQA keeps whole query "
             f"groups on one rank; use a tensor_parallel that divides {m.kv_heads}")
    _require(m.head_dim % 2 == 0, f"head dim {m.head_dim} must be even for rotary embeddings")
    _validate_rope_scaling(m)
    _require(m.ffn_size % tp == 0, f"ffn hidden size {m.ffn_size} is not divisible by tensor_parallel {tp}")
    _require(m.padded_vocab_size(tp) % tp == 0, f"padded vocab {m.padded_vocab_size(tp)} % tp {tp} != 0")
    if p.sequence_parallel:
        _require(tp > 1, "parallel.sequence_parallel needs tensor_parallel > 1")
        _require((m.seq_length // cp) % tp == 0,
                 f"seq_length {m.seq_length} / context_parallel {cp} = {m.seq_length // cp} is not divisible by "
                 f"tensor_parallel {tp} (sequence parallel splits each rank's tokens over TP)")
    if p.pipeline_layers is not None:
        _require(len(p.pipeline_layers) == pp * vpp and sum(p.pipeline_layers) == m.num_layers,
                 f"parallel.pipeline_layers {p.pipeline_layers} must list {pp * vpp} stages (pp {pp} x vpp "
                 f"{vpp}) summing to num_layers {m.num_layers}")
    else:
        _require(m.num_layers % (pp * vpp) == 0,
                 f"num_layers {m.num_layers} is not divisible by pipeline_parallel {pp} x virtual stages {vpp} = "
                 f"{pp * vpp}; change the layout or give parallel.pipeline_layers")
    if vpp > 1:
        _require(pp > 1, f"virtual_pipeline_stages {vpp} needs pipeline_parallel > 1")
    _require(m.kernels in KERNEL_BACKENDS, f"model.kernels {m.kernels!r} must be one of {', '.join(KERNEL_BACKENDS)}")
    _require(t.micro_batch_size >= 1, f"micro_batch_size {t.micro_batch_size} must be >= 1")
    step = t.micro_batch_size * dp
    _require(t.global_batch_size % step == 0,
             f"global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
             f"{t.micro_batch_size} x data_parallel {dp} = {step}")
    if vpp > 1:
        micro_batches = t.global_batch_size // step
        _require(micro_batches % pp == 0,
                 f"interleaved pipelining needs micro-batches per step ({micro_batches} = global "
                 f"{t.global_batch_size} / (micro {t.micro_batch_size} x dp {dp})) divisible by pipeline_parallel {pp}")
    if t.rampup_batch_size is not None:
        _require(len(t.rampup_batch_size) == 3,
                 f"training.rampup_batch_size {t.rampup_batch_size} must be [start, increment, ramp_samples]")
        start, increment, _ = t.rampup_batch_size
        _require(1 <= start <= t.global_batch_size and increment >= 1,
                 f"rampup start {start} must be in [1, global_batch_size {t.global_batch_size}] and increment "
                 f"{increment} >= 1")
        _require(start % step == 0 and increment % step == 0,
                 f"rampup start {start} and increment {increment} must be multiples of micro x dp = {step}")
        _require((t.global_batch_size - start) % increment == 0,
                 f"global_batch_size {t.global_batch_size} - rampup start {start} is not a multiple of "
                 f"increment {increment}")
        if vpp > 1:  # every ramp-up stage's batch runs through the interleaved schedule
            for stage, batch in enumerate(range(start, t.global_batch_size + 1, increment)):
                _require((batch // step) % pp == 0,
                         f"interleaved pipelining needs micro-batches per step divisible by pipeline_parallel "
                         f"{pp}, but ramp-up stage {stage} (global batch {batch} of rampup_batch_size "
                         f"{t.rampup_batch_size}) gives {batch // step} = {batch} / (micro {t.micro_batch_size} x "
                         f"dp {dp}); make rampup start and increment multiples of micro x dp x pp = {step * pp}")
    _require((t.train_iters is None) != (t.train_samples is None),
             "set exactly one of training.train_iters and training.train_samples "
             f"(got train_iters={t.train_iters}, train_samples={t.train_samples})")
    if t.rampup_batch_size is not None:
        _require(t.train_samples is not None, "batch-size ramp-up needs training.train_samples, not train_iters")
    _require(t.recompute in ("none", "selective", "full"),
             f"training.recompute {t.recompute!r} must be none, selective or full")
    _require(o.lr_decay_style in ("cosine", "linear", "constant"),
             f"optimizer.lr_decay_style {o.lr_decay_style!r} must be cosine, linear or constant")
    _require(0 <= o.min_lr <= o.lr, f"optimizer.min_lr {o.min_lr} must be in [0, lr {o.lr}]")
    _require(pr.dtype != "fp8", "precision.dtype 'fp8' is not implemented: FP8 training has not been run on a "
                                "GPU by this project, so it is not offered (docs/gpu.md); use precision.dtype=bf16")
    _require(pr.dtype in ("fp32", "bf16", "fp16"), f"precision.dtype {pr.dtype!r} must be fp32, bf16 or fp16")
    _require(config.data.mock or bool(config.data.data_path),
             "data.data_path is empty: give dataset prefixes (or data.mock=true for random tokens)")
    lora = config.finetune.lora
    if lora is not None:
        _require(lora.rank >= 1 and lora.alpha > 0 and 0.0 <= lora.dropout < 1.0,
                 f"finetune.lora rank {lora.rank} must be >= 1, alpha {lora.alpha} > 0 and dropout {lora.dropout} "
                 "in [0, 1) (rank 8-64 with alpha 2 x rank is usual)")
        unknown = [name for name in lora.targets if name not in LORA_TARGET_NAMES]
        _require(bool(lora.targets) and not unknown,
                 f"finetune.lora.targets {lora.targets} must be a non-empty list of {', '.join(LORA_TARGET_NAMES)}")
        _require(config.checkpoint.init_weights is not None,
                 "finetune.lora trains adapters on a base model: set checkpoint.init_weights to its weights (a "
                 "from-hf directory or one of our checkpoints); LoRA checkpoints refer to it instead of copying it")
    if config.finetune.qlora is not None:
        _validate_qlora(config)
    if config.data.sft:
        _require(not config.data.mock, "data.sft and data.mock are exclusive: SFT reads preprocessed conversations")
        _require(all(isinstance(entry, str) for entry in config.data.data_path),
                 f"data.sft takes a list of preprocess_data.py --sft output prefixes without blend weights, got "
                 f"{config.data.data_path}")
    _require(config.logging.log_interval >= 1, f"logging.log_interval {config.logging.log_interval} must be >= 1")
    _require(config.logging.straggler_interval >= 1,
             f"logging.straggler_interval {config.logging.straggler_interval} must be >= 1 (iterations between two "
             "straggler reports; e.g. 100)")
    for key in ("nccl_timeout_minutes", "hang_timeout_minutes"):
        minutes = getattr(config.distributed, key)
        _require(minutes > 0, f"distributed.{key} {minutes} must be > 0 (minutes; fractions allowed, default 30)")
    if config.checkpoint.save_interval is not None:
        _require(config.checkpoint.save is not None, "checkpoint.save_interval is set but checkpoint.save is not")
    if config.checkpoint.keep_last is not None:
        _require(config.checkpoint.keep_last >= 1,
                 f"checkpoint.keep_last {config.checkpoint.keep_last} must be >= 1 (or unset to keep every checkpoint)")
    _require(t.max_skipped_in_a_row >= 1,
             f"training.max_skipped_in_a_row {t.max_skipped_in_a_row} must be >= 1")
    _require(t.loss_average in ("per_microbatch", "per_token"),
             f"training.loss_average {t.loss_average!r} must be per_microbatch or per_token")
