"""Full state dict <-> Hugging Face LlamaForCausalLM state dict, and the HF config files.

A *full state dict* maps our global parameter names (``layers.3.attention.qkv.weight``) to full
TP1 tensors with the vocabulary padded for some tensor-parallel size (see ``full_state.py``).
Name and layout mapping, with n heads, g kv heads, d head dim, h hidden, f ffn, V vocab:

    embedding.weight [V_pad, h]                        -> model.embed_tokens.weight [V, h] (padding trimmed)
    layers.i.input_norm.weight [h]                     -> model.layers.i.input_layernorm.weight
    layers.i.attention.qkv.weight [(n + 2g) d, h]      -> model.layers.i.self_attn.{q,k,v}_proj.weight
        rows grouped by kv group j: the n/g query heads of group j, then k_j, then v_j (d rows each);
        HF query head k uses kv head k // (n/g), the same grouping, so the split is a reshape.
    layers.i.attention.dense.weight [h, n d]           -> model.layers.i.self_attn.o_proj.weight
    layers.i.post_attention_norm.weight [h]            -> model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.gate_up.weight [2, f, h]              -> model.layers.i.mlp.{gate,up}_proj.weight
    layers.i.mlp.down.weight [h, f]                    -> model.layers.i.mlp.down_proj.weight
    final_norm.weight [h]                              -> model.norm.weight
    output_layer.weight [V_pad, h]                     -> lm_head.weight [V, h] (untied)

HF Llama rotates halves (pairs i, i + d/2), like our default, so q/k rows are copied as they are.
A model trained with ``rope_interleaved`` (pairs 2i, 2i + 1) is exported with the rows of every
q and k head permuted to [0, 2, 4, ..., 1, 3, 5, ...]: that turns interleaved pairs into halves
and leaves q.k unchanged. Imports always give rotate-half (``rope_interleaved`` false).

Importing pads the vocabulary to ``ModelConfig.padded_vocab_size(tp)`` with zero rows: padded
ids are never inputs, and the model leaves their logits out of the loss's softmax and masks them in
the logits it returns (``parallel/cross_entropy.py``), so the imported model starts at the HF model's
loss and its padded rows get zero grads.

RoPE scaling (``model.rope_scaling``, maths in ``model/rope.py``) is written as transformers 5.x
reads it, ``rope_parameters`` = {rope_type, rope_theta, factor, ...}, and again as ``rope_scaling``
(the same dict less rope_theta, None when unscaled) beside a top-level ``rope_theta`` for
transformers 4.x; 5.x takes a non-empty ``rope_scaling`` over ``rope_parameters``, and so does the
import. Keys: ``factor``; ``original_max_position_embeddings`` (yarn, llama3); yarn ``beta_fast``,
``beta_slow``, ``truncate``, ``attention_factor`` or ``mscale`` + ``mscale_all_dim`` when set;
llama3 ``low_freq_factor``, ``high_freq_factor``. Dynamic NTK in transformers takes its original
length from ``max_position_embeddings``, so a dynamic export writes rope_original_max_positions
there, and its import sets seq_length to it (seq_length comes back unchanged only when the two
were equal). Imports read yarn's ``beta_fast``/``beta_slow`` and drop an ``mscale`` pair as
transformers does (a 0 or missing beta is the default; ``mscale`` counts only when both it and
``mscale_all_dim`` are nonzero and no ``attention_factor`` is given).

Model type ``aquila`` writes BAAI's own config (``AquilaForCausalLM``, ``auto_map`` to
``configuration_aquila.py`` / ``modeling_aquila.py``). transformers has no built-in ``aquila``
type, so such a directory loads only with BAAI's remote-code files copied into it and
``trust_remote_code=True``; the weights are the same as the ``llama`` export, which
``AutoModelForCausalLM`` loads with no remote code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from megatron_aquila.config import TORCH_DTYPES, ModelConfig

# Aquila2 tokenizer ids (docs/design.md section 7), used when no tokenizer directory is given.
AQUILA_BOS_ID, AQUILA_EOS_ID, AQUILA_PAD_ID = 100006, 100007, 0

MODEL_TYPES = ("llama", "aquila")
HF_DTYPES = TORCH_DTYPES  # the same names as precision.dtype
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Buffers some HF checkpoints carry that are recomputed at load time.
_IGNORED_HF_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


class ConversionError(ValueError):
    """A tensor, file or config field that does not fit the conversion; the message names it."""


@dataclass(frozen=True)
class TokenIds:
    """Special token ids written to config.json and generation_config.json."""

    bos: int = AQUILA_BOS_ID
    eos: int = AQUILA_EOS_ID
    pad: int = AQUILA_PAD_ID


def token_ids_from_tokenizer(tokenizer_dir: str | Path | None, vocab_size: int) -> TokenIds:
    """bos/eos/pad from the tokenizer files in ``tokenizer_dir``, else Aquila's 100006/100007/0.

    A directory with ``tokenizer.model`` is read as SentencePiece, else as Aquila's byte-level
    BPE (vocab.json + merges.txt + special_tokens.txt, or tokenizer.json).
    """
    from megatron_aquila.data.tokenizer import build_tokenizer

    if tokenizer_dir is None:
        ids = TokenIds()
        where = "the Aquila defaults"
    else:
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise ConversionError(f"tokenizer directory {tokenizer_dir} does not exist")
        if (tokenizer_dir / "tokenizer.model").is_file():
            tokenizer = build_tokenizer("sentencepiece", tokenizer_dir / "tokenizer.model")
        else:
            tokenizer = build_tokenizer("aquila-bbpe", tokenizer_dir)
        ids = TokenIds(bos=tokenizer.bos, eos=tokenizer.eod, pad=tokenizer.pad)
        where = f"the tokenizer in {tokenizer_dir}"
    for field_name, value in (("bos", ids.bos), ("eos", ids.eos), ("pad", ids.pad)):
        if value is not None and not 0 <= value < vocab_size:
            raise ConversionError(f"{field_name} token id {value} from {where} is outside the model vocabulary "
                                  f"[0, {vocab_size}); pass the model's own tokenizer directory (--tokenizer-dir)")
    return ids


def expected_full_shapes(config: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the whole model and its full TP1 shape (vocab padded to ``padded_vocab``)."""
    n, g, d, h, f = (config.num_attention_heads, config.kv_heads, config.head_dim, config.hidden_size,
                     config.ffn_size)
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (padded_vocab, h)}
    for i in range(config.num_layers):
        shapes.update({
            f"layers.{i}.input_norm.weight": (h,),
            f"layers.{i}.attention.qkv.weight": ((n + 2 * g) * d, h),
            f"layers.{i}.attention.dense.weight": (h, n * d),
            f"layers.{i}.post_attention_norm.weight": (h,),
            f"layers.{i}.mlp.gate_up.weight": (2, f, h),
            f"layers.{i}.mlp.down.weight": (h, f),
        })
    shapes["final_norm.weight"] = (h,)
    shapes["output_layer.weight"] = (padded_vocab, h)
    return shapes


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every LlamaForCausalLM weight name and shape (unpadded vocab)."""
    n, g, d, h, f, v = (config.num_attention_heads, config.kv_heads, config.head_dim, config.hidden_size,
                        config.ffn_size, config.vocab_size)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (n * d, h),
            p + "self_attn.k_proj.weight": (g * d, h),
            p + "self_attn.v_proj.weight": (g * d, h),
            p + "self_attn.o_proj.weight": (h, n * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape; lazy mappings (checkpoint and file readers, with ``shape_of``) read no data.

    Callers check names against this dict, never with ``name in tensors``: a plain ``Mapping``
    answers ``in`` by reading the tensor.
    """
    shape_of = getattr(tensors, "shape_of", None)
    return {name: tuple(shape_of(name)) if shape_of is not None else tuple(tensors[name].shape) for name in tensors}


def check_names_and_shapes(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                           source: str, hint: str) -> None:
    """Raise ConversionError listing missing, unexpected and mis-shaped tensors of ``source``."""
    missing = [name for name in expected if name not in shapes]
    unexpected = [name for name in shapes if name not in expected]
    wrong = [f"{name}: expected {tuple(expected[name])}, got {shapes[name]}"
             for name in expected if name in shapes and tuple(shapes[name]) != tuple(expected[name])]
    problems = []
    if missing:
        more = " ..." if len(missing) > 8 else ""
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{more}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    if problems:
        raise ConversionError(f"{source} does not match the model config: " + " | ".join(problems) + f". {hint}")


def full_vocab_rows(shapes: Mapping[str, tuple[int, ...]], config: ModelConfig, source: str) -> int:
    """The padded vocabulary size of a full state dict (rows of its embedding; ``shapes``: tensor_shapes), checked."""
    if "embedding.weight" not in shapes:
        raise ConversionError(f"{source} has no embedding.weight")
    rows = shapes["embedding.weight"][0]
    if rows < config.vocab_size:
        raise ConversionError(f"{source}: embedding.weight has {rows} rows, fewer than model.vocab_size "
                              f"{config.vocab_size}; the weights belong to another model config")
    return rows


def _permute_heads(weight: torch.Tensor, heads: int, to_halves: bool) -> torch.Tensor:
    """Reorder the d rows of every head: interleaved pairs (2i, 2i+1) <-> halves (i, i + d/2)."""
    rows, h = weight.shape
    d = rows // heads
    if to_halves:
        return weight.view(heads, d // 2, 2, h).transpose(1, 2).reshape(rows, h)
    return weight.view(heads, 2, d // 2, h).transpose(1, 2).reshape(rows, h)


def _owned(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A contiguous copy in ``dtype``: safetensors refuses views sharing storage, and a copy lets the source go."""
    return tensor.to(dtype or tensor.dtype, copy=True, memory_format=torch.contiguous_format)


def full_to_hf(full: Mapping[str, torch.Tensor], config: ModelConfig,
               dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict (vocab padding trimmed) of a full state dict; every tensor owns its storage."""
    return dict(iter_hf_tensors(full, config, dtype))


def iter_hf_tensors(full: Mapping[str, torch.Tensor], config: ModelConfig,
                    dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs in ``expected_hf_shapes`` order, reading ``full`` one tensor at a time.

    Names and shapes are checked now, before anything is read. Each fused source (qkv, gate_up) is
    released once its pieces are copied, so with a lazy ``full`` (a checkpoint or file reader) the
    iterator holds at most one layer.
    """
    shapes = tensor_shapes(full)
    padded = full_vocab_rows(shapes, config, "the full state dict")
    check_names_and_shapes(shapes, expected_full_shapes(config, padded), "the full state dict",
                           "Check that --config describes the model these weights were trained with.")
    return _hf_tensors(full, config, dtype)


def _split_qkv(qkv: torch.Tensor, config: ModelConfig, dtype: Optional[torch.dtype]) -> list[torch.Tensor]:
    """Owned q [n d, h], k [g d, h], v [g d, h] of a fused qkv [(n + 2g) d, h] (layout: module docstring)."""
    n, g, d, h = config.num_attention_heads, config.kv_heads, config.head_dim, config.hidden_size
    grouped = qkv.view(g, n // g + 2, d, h)
    q = grouped[:, : n // g].reshape(n * d, h)
    k = grouped[:, n // g].reshape(g * d, h)
    if config.rope_interleaved:
        q, k = _permute_heads(q, n, to_halves=True), _permute_heads(k, g, to_halves=True)
    return [_owned(q, dtype), _owned(k, dtype), _owned(grouped[:, n // g + 1].reshape(g * d, h), dtype)]


def _hf_tensors(full: Mapping[str, torch.Tensor], config: ModelConfig,
                dtype: Optional[torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    # Every source tensor is a temporary of one expression, so nothing read stays alive across a yield.
    v = config.vocab_size
    yield "model.embed_tokens.weight", _owned(full["embedding.weight"][:v], dtype)
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        yield dst + "input_layernorm.weight", _owned(full[src + "input_norm.weight"], dtype)
        yield from zip([dst + f"self_attn.{p}_proj.weight" for p in "qkv"],
                       _split_qkv(full[src + "attention.qkv.weight"], config, dtype))
        yield dst + "self_attn.o_proj.weight", _owned(full[src + "attention.dense.weight"], dtype)
        yield dst + "post_attention_layernorm.weight", _owned(full[src + "post_attention_norm.weight"], dtype)
        yield from zip([dst + "mlp.gate_proj.weight", dst + "mlp.up_proj.weight"],  # [2, f, h] -> 2 x [f, h]
                       [_owned(part, dtype) for part in full[src + "mlp.gate_up.weight"]])
        yield dst + "mlp.down_proj.weight", _owned(full[src + "mlp.down.weight"], dtype)
    yield "model.norm.weight", _owned(full["final_norm.weight"], dtype)
    yield "lm_head.weight", _owned(full["output_layer.weight"][:v], dtype)


def resize_vocab(weight: torch.Tensor, vocab_size: int, padded_vocab: int) -> torch.Tensor:
    """Keep the first ``vocab_size`` rows and append zero rows up to ``padded_vocab`` (always a new tensor)."""
    rows = weight[:vocab_size]
    if padded_vocab == vocab_size:
        return rows.clone()
    return torch.cat([rows, rows.new_zeros(padded_vocab - vocab_size, *weight.shape[1:])])


def hf_to_full(hf: Mapping[str, torch.Tensor], config: ModelConfig, tp_size: int,
               dtype: Optional[torch.dtype] = None, source: str = "the HF checkpoint") -> dict[str, torch.Tensor]:
    """Full state dict (vocab padded for ``tp_size``) of a LlamaForCausalLM state dict; see iter_full_tensors."""
    return dict(iter_full_tensors(hf, config, tp_size, dtype, source))


def iter_full_tensors(hf: Mapping[str, torch.Tensor], config: ModelConfig, tp_size: int,
                      dtype: Optional[torch.dtype] = None, source: str = "the HF checkpoint"
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the full state dict (vocab padded for ``tp_size``) in ``expected_full_shapes`` order.

    Names and shapes are checked now, before anything is read. ``hf`` is then read one tensor at a
    time (q, k, v together and gate, up together, to fuse them) and nothing read outlives the
    tensor built from it, so with a lazy ``hf`` (safetensors shards) the iterator holds at most one
    layer. A tied checkpoint (no ``lm_head.weight``) gets a copy of the embedding as output layer.
    """
    if config.rope_interleaved:
        raise ConversionError("HF Llama weights are rotate-half; import them with model.rope_interleaved false")
    shapes = {name: shape for name, shape in tensor_shapes(hf).items() if not _IGNORED_HF_KEYS.match(name)}
    tied = "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes
    if tied:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    check_names_and_shapes(shapes, expected_hf_shapes(config), source,
                           "Check config.json against the weight files (vocab_size, intermediate_size, heads).")
    return _full_tensors(hf, config, config.padded_vocab_size(tp_size), dtype,
                         "model.embed_tokens.weight" if tied else "lm_head.weight")


def _cast(built: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A tensor built here (cat, stack, resize_vocab: it owns its storage) in ``dtype``, copied only to cast."""
    return built if dtype is None else built.to(dtype)


def _full_tensors(hf: Mapping[str, torch.Tensor], config: ModelConfig, padded: int, dtype: Optional[torch.dtype],
                  lm_head: str) -> Iterator[tuple[str, torch.Tensor]]:
    # Every source tensor is a temporary of one expression, so nothing read stays alive across a yield.
    n, g, d, h, v = (config.num_attention_heads, config.kv_heads, config.head_dim, config.hidden_size,
                     config.vocab_size)
    yield "embedding.weight", _cast(resize_vocab(hf["model.embed_tokens.weight"], v, padded), dtype)
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        yield dst + "input_norm.weight", _owned(hf[src + "input_layernorm.weight"], dtype)
        # q [n d, h], k and v [g d, h] -> [g, n/g + 2, d, h]: kv group j holds its n/g query heads, k_j, v_j
        yield dst + "attention.qkv.weight", _cast(torch.cat(
            [hf[src + f"self_attn.{p}_proj.weight"].view(g, -1, d, h) for p in "qkv"], dim=1
        ).view((n + 2 * g) * d, h), dtype)
        yield dst + "attention.dense.weight", _owned(hf[src + "self_attn.o_proj.weight"], dtype)
        yield dst + "post_attention_norm.weight", _owned(hf[src + "post_attention_layernorm.weight"], dtype)
        yield dst + "mlp.gate_up.weight", _cast(torch.stack(  # 2 x [f, h] -> [2, f, h]
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]), dtype)
        yield dst + "mlp.down.weight", _owned(hf[src + "mlp.down_proj.weight"], dtype)
    yield "final_norm.weight", _owned(hf["model.norm.weight"], dtype)
    yield "output_layer.weight", _cast(resize_vocab(hf[lm_head], v, padded), dtype)


def hf_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters`` of our RoPE (module docstring): rope_type, rope_theta and the scaling keys."""
    rope: dict[str, Any] = {"rope_type": "default" if config.rope_scaling == "none" else config.rope_scaling,
                            "rope_theta": config.rope_base}
    if config.rope_scaling == "none":
        return rope
    rope["factor"] = config.rope_scaling_factor
    if config.rope_scaling in ("yarn", "llama3"):
        rope["original_max_position_embeddings"] = config.rope_original_max_positions
    if config.rope_scaling == "yarn":
        rope.update(beta_fast=config.rope_yarn_beta_fast, beta_slow=config.rope_yarn_beta_slow,
                    truncate=config.rope_yarn_truncate)
        if config.rope_yarn_attention_factor is not None:
            rope["attention_factor"] = config.rope_yarn_attention_factor
        if config.rope_yarn_mscale is not None:
            rope.update(mscale=config.rope_yarn_mscale, mscale_all_dim=config.rope_yarn_mscale_all_dim)
    if config.rope_scaling == "llama3":
        rope.update(low_freq_factor=config.rope_llama3_low_freq_factor,
                    high_freq_factor=config.rope_llama3_high_freq_factor)
    return rope


def hf_config_dict(config: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, model_type: str = "llama",
                   token_ids: TokenIds = TokenIds()) -> dict[str, Any]:
    """config.json of the export: LlamaConfig fields, or BAAI's ``aquila`` config (module docstring)."""
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"model type {model_type!r} must be one of {MODEL_TYPES}")
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ConversionError(f"dtype {dtype} must be one of {sorted(_TORCH_DTYPE_NAMES.values())}")
    rope = hf_rope_parameters(config)
    scaled = config.rope_scaling != "none"
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if model_type == "llama" else "AquilaForCausalLM"],
        "model_type": model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "num_hidden_layers": config.num_layers,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": rope,
        "rope_scaling": {key: value for key, value in rope.items() if key != "rope_theta"} if scaled else None,
        "max_position_embeddings": (config.rope_original_max_positions if config.rope_scaling == "dynamic"
                                    else config.seq_length),
        "vocab_size": config.vocab_size,
        "bos_token_id": token_ids.bos,
        "eos_token_id": token_ids.eos,
        "pad_token_id": token_ids.pad,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": _TORCH_DTYPE_NAMES[dtype],
    }
    if model_type == "aquila":
        hf["auto_map"] = {"AutoConfig": "configuration_aquila.AquilaConfig",
                          "AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM"}
    return hf


def generation_config_dict(token_ids: TokenIds) -> dict[str, Any]:
    """generation_config.json: the special ids (greedy decoding is HF's default)."""
    return {"bos_token_id": token_ids.bos, "eos_token_id": token_ids.eos, "pad_token_id": token_ids.pad}


def _field(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise ConversionError(f"{source}: missing key {key!r}; is this a LLaMA/Aquila config.json?")
    return hf[key]


def model_config_from_hf(hf: Mapping[str, Any], *, make_vocab_size_divisible_by: int = 128,
                         source: str = "config.json") -> ModelConfig:
    """ModelConfig of a LLaMA or Aquila config.json; architectures we cannot represent raise."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{source}: model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
    checks = [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]
    for key, supported in checks:
        if hf.get(key, supported) != supported:
            raise ConversionError(f"{source}: {key} = {hf[key]!r} is not supported (Aquila uses {supported!r})")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    heads = _field(hf, "num_attention_heads", source)
    hidden = _field(hf, "hidden_size", source)
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(f"{source}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size "
                              f"{hidden}; our attention needs head_dim = hidden_size / heads")
    return ModelConfig(
        num_layers=_field(hf, "num_hidden_layers", source),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=_field(hf, "intermediate_size", source),
        vocab_size=_field(hf, "vocab_size", source),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        seq_length=hf.get("max_position_embeddings", 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        init_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        **_rope_scaling_from_hf(rope, hf.get("max_position_embeddings", 2048), source),
    )


def _rope_key(rope: Mapping[str, Any], key: str, source: str) -> Any:
    if rope.get(key) is None:
        raise ConversionError(f"{source}: rope_parameters of type {rope.get('rope_type', rope.get('type'))!r} has "
                              f"no {key!r}; transformers needs it too")
    return rope[key]


def _rope_scaling_from_hf(rope: Mapping[str, Any], max_positions: int, source: str) -> dict[str, Any]:
    """ModelConfig rope_* fields of transformers' rope_parameters (module docstring); unsupported types raise."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported; "
                              "our rotary covers the whole head")
    if rope_type == "default":
        return {}
    supported = ("linear", "dynamic", "yarn", "llama3")
    if rope_type not in supported:
        raise ConversionError(f"{source}: rope type {rope_type!r} is not supported; expected default or one of "
                              f"{supported}")
    fields: dict[str, Any] = {"rope_scaling": rope_type,
                              "rope_scaling_factor": float(_rope_key(rope, "factor", source))}
    if rope_type == "dynamic":
        fields["rope_original_max_positions"] = max_positions
    if rope_type in ("yarn", "llama3"):
        fields["rope_original_max_positions"] = rope.get("original_max_position_embeddings") or max_positions
    if rope_type == "yarn":
        attention, mscale, mscale_all_dim = rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim")
        counted = attention is None and bool(mscale) and bool(mscale_all_dim)
        fields.update(rope_yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                      rope_yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                      rope_yarn_truncate=bool(rope.get("truncate", True)),
                      rope_yarn_attention_factor=None if attention is None else float(attention),
                      rope_yarn_mscale=float(mscale) if counted else None,
                      rope_yarn_mscale_all_dim=float(mscale_all_dim) if counted else None)
    if rope_type == "llama3":
        fields.update(rope_llama3_low_freq_factor=float(_rope_key(rope, "low_freq_factor", source)),
                      rope_llama3_high_freq_factor=float(_rope_key(rope, "high_freq_factor", source)))
    return fields


# RoPE scaling is not compared: exporting weights trained without it under a scaled recipe is how a
# model's context is extended with no fine-tuning (dynamic NTK, yarn); the recipe's scaling is written.
_EXPORT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "kv_heads", "ffn_size", "vocab_size",
                  "norm_eps", "rope_base", "rope_interleaved")


def check_same_model(stored: ModelConfig, config: ModelConfig, weights: str, recipe: str) -> None:
    """The weights file's own model config must agree with the recipe on everything the export uses."""
    diffs = [f"{name}: weights {getattr(stored, name)!r} vs recipe {getattr(config, name)!r}"
             for name in _EXPORT_FIELDS if getattr(stored, name) != getattr(config, name)]
    if diffs:
        raise ConversionError(f"{weights} was saved for another model than {recipe} describes ({'; '.join(diffs)}); "
                              "pass the recipe the weights were trained with")
