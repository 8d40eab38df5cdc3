"""Start a run from given weights: continued pretraining from a Hugging Face model or a finished run.

``tools/convert_checkpoint.py from-hf`` turns a Llama/Aquila2 HF directory into a full state
directory (``full_state-0000k-of-0000N.safetensors`` shards and their index); a recipe names that
directory (or its index, or a single ``full_state.safetensors`` of the earlier format) in
``checkpoint.init_weights``. Each rank reads only the tensors its pipeline chunks hold, one at a
time from the memory-mapped shards (docs/design.md section 10), re-pads the vocabulary rows for
this run's tensor-parallel size (make_vocab_size_divisible_by x TP), keeps its TP slice of each,
and the optimizer's fp32 masters are refreshed from the loaded weights. Optimizer moments start at zero. Resuming a checkpoint
takes precedence: init_weights is used only when ``checkpoint.load`` finds nothing.

``checkpoint.init_weights`` may also name one of our own checkpoints (a save directory with
``latest``, or an ``iter_*`` directory), the usual start of a context extension: only its model
weights are read, resharded to this run's layout by the DCP overlap load, and the iteration, the
consumed samples, the learning-rate schedule and the optimizer state start afresh. The model may
differ from the saved one only in ``seq_length`` and the ``rope_*`` settings (logged).
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from megatron_aquila.checkpoint.full_state import load_full_state_dict, open_full_state
from megatron_aquila.checkpoint.hf_mapping import ConversionError, check_same_model, resize_vocab
from megatron_aquila.checkpoint.manager import (
    CheckpointError,
    check_model_change,
    load_checkpoint_into,
    read_dcp_metadata,
    read_meta,
    resolve_checkpoint,
)
from megatron_aquila.checkpoint.state import refresh_masters
from megatron_aquila.config import Config, ModelConfig
from megatron_aquila.parallel.context import ParallelContext

logger = logging.getLogger("megatron_aquila")

VOCAB_ROWS = ("embedding.weight", "output_layer.weight")


def initialize_from_full_state(path: str, config: ModelConfig, model_chunks: list[nn.Module], optimizer,
                               ctx: ParallelContext) -> None:
    if not Path(path).exists():
        raise ConversionError(f"checkpoint.init_weights {path} does not exist; write it with "
                              "tools/convert_checkpoint.py from-hf --hf-dir DIR --output OUT and set "
                              "checkpoint.init_weights=OUT")
    padded = config.padded_vocab_size(ctx.tp_size)
    repad = {name: (lambda tensor: resize_vocab(tensor, config.vocab_size, padded)) for name in VOCAB_ROWS}
    full, stored = open_full_state(path, repad)  # read lazily: this rank's tensors only, one at a time
    if stored is not None:
        check_same_model(stored, config, path, "the recipe's model section")
    load_full_state_dict(model_chunks, full, ctx, config)
    refresh_masters(optimizer)
    logger.info(f"initialised weights from {path} (vocab padded to {padded} rows for tensor_parallel {ctx.tp_size})")


def initialize_from_checkpoint(resolved: Path, config: Config, model_chunks: list[nn.Module], optimizer,
                               ctx: ParallelContext) -> None:
    """Read only the model weights of the checkpoint directory ``resolved`` into this rank's chunks
    (module docstring)."""
    if any(hasattr(param, "quantized_loader") for chunk in model_chunks for param in chunk.parameters()):
        raise CheckpointError(
            f"checkpoint.init_weights {resolved} is one of our checkpoints, but finetune.qlora quantizes its base "
            "weights while streaming a from-hf directory: export it with tools/convert_checkpoint.py to-hf, convert "
            "that with from-hf, and set checkpoint.init_weights to the from-hf output")
    changed = check_model_change(resolved, read_meta(resolved), config)
    saved_rows = read_dcp_metadata(resolved).state_dict_metadata["model.embedding.weight"].size[0]
    padded = config.model.padded_vocab_size(ctx.tp_size)
    if saved_rows != padded:
        raise CheckpointError(
            f"checkpoint.init_weights {resolved} has the vocabulary padded to {saved_rows} rows, this run pads "
            f"{config.model.vocab_size} to {padded} (make_vocab_size_divisible_by "
            f"{config.model.make_vocab_size_divisible_by} x tensor_parallel {ctx.tp_size}): choose "
            "make_vocab_size_divisible_by so that both agree, or export with to-hf and start from that")
    load_checkpoint_into(model_chunks, resolved, ctx)
    refresh_masters(optimizer)
    logger.info(f"initialised weights from checkpoint {resolved}; iteration, samples, lr schedule and optimizer "
                f"start afresh" + (f"; model changes: {', '.join(changed)}" if changed else ""))


def initialize_weights(path: str, config: Config, model_chunks: list[nn.Module], optimizer,
                       ctx: ParallelContext) -> None:
    """``checkpoint.init_weights``: one of our checkpoints or a full-state (from-hf) directory or file."""
    resolved = resolve_checkpoint(path)  # None: not a save or iter_* directory of ours
    if resolved is not None:
        initialize_from_checkpoint(resolved, config, model_chunks, optimizer, ctx)
    else:
        initialize_from_full_state(path, config.model, model_chunks, optimizer, ctx)
