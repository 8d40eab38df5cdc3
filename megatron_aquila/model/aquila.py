"""AquilaModel: vocab-parallel embedding -> decoder blocks -> final RMSNorm -> vocab-parallel head.

Stage-aware: a pipeline stage (or virtual chunk) builds only the global layer ids it runs, the
embedding when ``pre_process`` and the final norm + output head when ``post_process``. Layers
live in ``layers`` keyed by their GLOBAL id, so parameter names (``layers.7.mlp.down.weight``)
are the same under every TP/PP layout; checkpoints and the HF conversion rely on them.

Initialisation (``init_weights``): every parameter is drawn from its own CPU ``torch.Generator``
seeded from (seed, global parameter name), over its full TP1 shape, and this rank keeps its TP
slice. So any TP x PP layout starts from exactly the TP1PP1 model. Cost: each rank draws the
full tensor of every parameter it holds (tp times the RNG work of its shard, serial on CPU) and
briefly holds one full fp32 weight (the largest is the output layer: padded vocab x hidden, 2.5 GB
for Aquila2-34B). Linear and embedding weights ~ N(0, init_std); the residual-branch output
projections (``attention.dense``, ``mlp.down``) ~ N(0, init_std / sqrt(2 * num_layers)) as in
Megatron-LM (``scaled_init_method_normal``, GPT-2's scheme); norm weights = ``norm_init``. Padded
vocabulary rows are drawn like the others: they are never targets, their logits are left out of the
loss's softmax and masked in returned logits, so they never matter and their grads are 0. Skipped on
the meta device and with ``initialize=False`` (resume, ``init_weights``): the parameters are then
allocated, not drawn.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from torch import nn

from megatron_aquila.config import ModelConfig
from megatron_aquila.model.kernels import KernelChoice, build_attention, build_rms_norm, choose_kernels
from megatron_aquila.model.packed_attention import DocumentMask, PackedDocuments
from megatron_aquila.model.rope import RotaryEmbedding
from megatron_aquila.model.transformer import (
    RECOMPUTE_MODES,
    RMSNorm,
    TransformerBlock,
    hidden_dropout,
    scaled_init_std,
)
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.context_parallel import gather_positions, local_token_indices
from megatron_aquila.parallel.cross_entropy import real_vocab_columns, vocab_parallel_cross_entropy
from megatron_aquila.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, full_shape
from megatron_aquila.parallel.random import RNGStatesTracker

_SCALED_INIT_SUFFIXES = ("attention.dense.weight", "mlp.down.weight")


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed derived from the run seed and a global parameter name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class AquilaModel(nn.Module):
    """One pipeline chunk of the Aquila decoder (the whole model with the defaults).

    forward(input_ids [b, s] | None, position_ids [b, s] | None, labels [b, s] | None,
            hidden_states [s, b, h] | None, documents: PackedDocuments | None) returns
      - post_process and labels given: per-token loss [b, s] fp32;
      - post_process, no labels: this rank's vocabulary-shard logits [b, s, V/tp] (a transposed view),
        the padded vocabulary columns (ids >= vocab_size) set to the dtype's lowest value;
      - otherwise: hidden states [s, b, h] ([s/tp, b, h] under sequence parallelism).
    The first stage (pre_process) embeds ``input_ids``; later stages take ``hidden_states``.
    ``documents`` (per-document attention): the documents of the whole sequence's rows [b, S], found on the
    host by the loader, so the varlen kernel's layout needs no device read; None derives them on the device
    (``model/packed_attention.py``, "Host syncs").

    ``pipeline_stage`` is this chunk's global virtual stage, chunk * pp_size + pp_rank (0 for the
    whole model): it offsets the dropout RNG seeds (``parallel/random.py``) so no two chunks draw
    the same masks. ``seed`` seeds both the weights (independent of the stage) and the dropout streams.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, *, sequence_parallel: bool = False,
                 recompute: str = "none", layer_ids: Sequence[int] | None = None, pre_process: bool = True,
                 post_process: bool = True, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, seed: int = 1234, kernels: KernelChoice | None = None,
                 initialize: bool = True, pipeline_stage: int = 0, document_attention: bool = False,
                 tp_comm_overlap: bool = True, block_hook: Callable[[str, nn.Module], None] | None = None):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {recompute!r} must be one of {RECOMPUTE_MODES}")
        layer_ids = list(range(config.num_layers)) if layer_ids is None else list(layer_ids)
        bad = [i for i in layer_ids if not 0 <= i < config.num_layers]
        if bad or len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layer_ids {layer_ids} must be distinct ids in [0, num_layers={config.num_layers})")
        self.config = config
        self.ctx = ctx
        self.tp_group = ctx.tp_group
        self.tp_size = ctx.tp_size
        self.sequence_parallel = sequence_parallel and ctx.tp_size > 1
        local_seq_length = config.seq_length // ctx.cp_size
        if ctx.cp_size > 1 and config.seq_length % (2 * ctx.cp_size) != 0:
            raise ValueError(f"seq_length {config.seq_length} is not divisible by 2 x context_parallel {ctx.cp_size}")
        if self.sequence_parallel and local_seq_length % ctx.tp_size != 0:
            raise ValueError(f"seq_length {config.seq_length} / context_parallel {ctx.cp_size} = {local_seq_length} "
                             f"is not divisible by tensor_parallel {ctx.tp_size} (sequence parallel)")
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = config.padded_vocab_size(ctx.tp_size)
        device = torch.device(device) if device is not None else ctx.device
        self.document_attention = document_attention
        self.kernels = kernels or choose_kernels(config.kernels, device, params_dtype, ctx.cp_size > 1,
                                                 document_attention, config.attention_dropout)
        self.rng = RNGStatesTracker(seed, ctx.tp_rank, pipeline_stage, device)
        self.rotary = RotaryEmbedding(config, ctx.cp_group if ctx.cp_size > 1 else None)
        norm_fn = build_rms_norm(self.kernels.norm)
        common = dict(sequence_parallel=self.sequence_parallel, params_dtype=params_dtype, device=device)

        if pre_process:
            self.embedding = VocabParallelEmbedding(self.padded_vocab_size, config.hidden_size, ctx.tp_group, **common)
        self.layers = nn.ModuleDict()
        for i in layer_ids:
            self.layers[str(i)] = TransformerBlock(
                config, ctx.tp_group, self.rng, recompute=recompute, norm_fn=norm_fn,
                attention_fn=build_attention(self.kernels.attention, config.num_attention_heads // ctx.tp_size,
                                             config.kv_heads // ctx.tp_size, config.head_dim,
                                             config.attention_dropout),
                cp_group=ctx.cp_group, tp_comm_overlap=tp_comm_overlap, **common)
            if block_hook is not None:  # e.g. Q-LoRA quantizes this block's weights before the next exists
                block_hook(f"layers.{i}", self.layers[str(i)])
        if post_process:
            self.final_norm = RMSNorm(config.hidden_size, config.norm_eps, norm_fn, **common)
            self.output_layer = ColumnParallelLinear(config.hidden_size, self.padded_vocab_size, ctx.tp_group,
                                                     tp_comm_overlap=tp_comm_overlap, **common)
        if initialize and device.type != "meta":  # initialize=False: a checkpoint will overwrite every parameter
            self.init_weights(seed)

    def kernel_description(self) -> str:
        """One line naming the chosen kernels, for the start-up log."""
        return self.kernels.describe()

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter as the matching slice of its seeded full-shape draw (module docstring)."""
        scaled_std = scaled_init_std(self.config.init_std, self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(self.config.norm_init)
                continue
            std = scaled_std if name.endswith(_SCALED_INIT_SUFFIXES) else self.config.init_std
            generator = torch.Generator().manual_seed(parameter_seed(seed, name))
            full = torch.empty(full_shape(param, self.tp_size), dtype=torch.float32).normal_(0.0, std,
                                                                                              generator=generator)
            if param.tensor_model_parallel:
                local = param.shape[param.partition_dim]
                full = full.narrow(param.partition_dim, self.ctx.tp_rank * local, local)
            param.copy_(full)

    def _documents(self, position_ids: torch.Tensor | None, documents: PackedDocuments | None) -> DocumentMask:
        """The micro-batch's document mask: a document starts wherever the position id is 0
        (data/sft_dataset.py); under context parallelism the keys are the whole sequence's, from the
        CP group's position ids, and the queries this rank's chunks. ``documents``: their host form over
        the whole sequence [b, S], or None (``forward``)."""
        if position_ids is None:
            raise ValueError("per-document attention (data.sft) needs position_ids [b, s]: they mark the documents")
        if self.ctx.cp_size == 1:
            key_documents = (position_ids == 0).cumsum(dim=1)  # [b, s]
            positions = torch.arange(key_documents.shape[1], device=key_documents.device)  # [s]
            return DocumentMask(key_documents, key_documents, positions, documents)
        full = gather_positions(position_ids, self.ctx.cp_group)  # [b, S]
        key_documents = (full == 0).cumsum(dim=1)
        local = local_token_indices(full.shape[1], self.ctx.cp_rank, self.ctx.cp_size).to(full.device)
        return DocumentMask(key_documents.index_select(1, local), key_documents, local, documents)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, hidden_states: torch.Tensor | None = None,
                documents: PackedDocuments | None = None) -> torch.Tensor:
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage (pre_process=True) needs input_ids [b, s]")
            seq_len = input_ids.shape[1]
            x = hidden_dropout(self.embedding(input_ids.t()), self.config.hidden_dropout, self.training, self.rng,
                               self.sequence_parallel)  # [s, b, h] ([s/tp, b, h] under SP)
        else:
            if hidden_states is None:
                raise ValueError("a non-first pipeline stage (pre_process=False) needs hidden_states [s, b, h]")
            x = hidden_states
            seq_len = x.shape[0] * (self.tp_size if self.sequence_parallel else 1)
        cos, sin = self.rotary(seq_len, position_ids, x.device)  # [s, 1|b, 1, d/2] fp32
        segments = self._documents(position_ids, documents) if self.document_attention else None
        for layer in self.layers.values():
            x = layer(x, cos, sin, segments)
        if not self.post_process:
            return x
        logits = self.output_layer(self.final_norm(x))  # [s, b, V/tp]
        if labels is None:
            return self._mask_padded_vocab(logits).transpose(0, 1)  # [b, s, V/tp]
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group, self.config.vocab_size)  # [s, b] fp32
        return loss.t()  # [b, s]

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of the padded vocabulary columns (ids >= vocab_size) to the dtype's lowest value,
        in place; returns ``logits``.

        exp(lowest - max) is exactly 0 in every dtype, so softmax, argmax and sampling over the returned
        logits see only the real vocabulary, as the loss does; a finite value (not -inf) keeps differences
        of two models' logits at 0 there, and their grads are 0.
        """
        real = real_vocab_columns(self.config.vocab_size, logits.shape[-1], self.ctx.tp_rank)
        logits[..., real:] = torch.finfo(logits.dtype).min
        return logits
