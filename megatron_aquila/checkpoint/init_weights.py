"""Start a run from full-state weights (continued pretraining from a Hugging Face model).

``tools/convert_checkpoint.py from-hf`` turns a Llama/Aquila2 HF directory into a full state
directory (``full_state-0000k-of-0000N.safetensors`` shards and their index); a recipe names that
directory (or its index, or a single ``full_state.safetensors`` of the earlier format) in
``checkpoint.init_weights``. Each rank reads only the tensors its pipeline chunks hold, one at a
time from the memory-mapped shards (docs/design.md section 10), re-pads the vocabulary rows for
this run's tensor-parallel size (make_vocab_size_divisible_by x TP), keeps its TP slice of each,
and the optimizer's fp32 masters are refreshed from the loaded weights. Optimizer moments start at zero. Resuming a checkpoint
takes precedence: init_weights is used only when ``checkpoint.load`` finds nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from megatron_aquila.checkpoint.full_state import load_full_state_dict, open_full_state
from megatron_aquila.checkpoint.hf_mapping import ConversionError, check_same_model, resize_vocab
from megatron_aquila.checkpoint.state import refresh_masters
from megatron_aquila.config import ModelConfig
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
