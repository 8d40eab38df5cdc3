"""Build the components of a run from a validated Config and this rank's ParallelContext."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_aquila.batch_schedule import BatchSchedule
from megatron_aquila.checkpoint.init_weights import initialize_weights
from megatron_aquila.checkpoint.manager import load_checkpoint, will_resume
from megatron_aquila.config import Config
from megatron_aquila.data.loader import build_streams
from megatron_aquila.metrics import MetricsWriter
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.compile import compile_model_chunks
from megatron_aquila.model.flops import flops_per_iteration
from megatron_aquila.model.lora import LoraSettings, adapter_parameters, apply_lora
from megatron_aquila.model.qlora import QLoraSettings, apply_qlora, quantizing_block_hook
from megatron_aquila.optim.build import build_optimizer
from megatron_aquila.optim.optimizer import MixedPrecisionOptimizer
from megatron_aquila.optim.lr_schedule import LRScheduler
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer
from megatron_aquila.parallel.pipeline.partition import chunk_has_embedding, chunk_has_head, chunk_layer_ids
from megatron_aquila.peak_flops import shared_peak_tflops
from megatron_aquila.training_state import TrainerParts, TrainingState

logger = logging.getLogger("megatron_aquila")


def build_model_chunks(config: Config, ctx: ParallelContext, device: Optional[torch.device] = None,
                       initialize: bool = True) -> list[AquilaModel]:
    """This rank's model chunks: one per virtual pipeline stage, layers assigned by partition.py.

    ``initialize=False`` allocates the parameters without drawing them (a checkpoint or
    ``init_weights`` is about to overwrite every one).
    """
    p, vpp = config.parallel, config.parallel.virtual_pipeline_stages
    qlora = config.finetune.qlora
    block_hook = None if qlora is None else quantizing_block_hook(  # 4-bit as each block is built (model/qlora.py)
        LoraSettings.from_config(config.finetune.lora), QLoraSettings.from_config(qlora))
    chunks = [
        AquilaModel(
            config.model, ctx, sequence_parallel=p.sequence_parallel, recompute=config.training.recompute,
            layer_ids=chunk_layer_ids(config.model.num_layers, ctx.pp_size, vpp, ctx.pp_rank, chunk, p.pipeline_layers),
            pre_process=chunk_has_embedding(ctx.pp_rank, chunk),
            post_process=chunk_has_head(ctx.pp_rank, chunk, ctx.pp_size, vpp),
            params_dtype=config.precision.torch_dtype, device=device or ctx.device, seed=config.training.seed,
            pipeline_stage=chunk * ctx.pp_size + ctx.pp_rank, initialize=initialize,
            document_attention=config.data.sft, tp_comm_overlap=p.tp_comm_overlap, block_hook=block_hook,
        )
        for chunk in range(vpp)
    ]
    compile_model_chunks(config, chunks, torch.device(device or ctx.device))  # model.compile: blocks compiled
    return chunks


def build_model_and_optimizer(config: Config, ctx: ParallelContext, initialize: bool = True,
                              fused_adam: Optional[bool] = None,
                              ) -> tuple[list[AquilaModel], list[DataParallelGradBuffer], MixedPrecisionOptimizer]:
    """This rank's model chunks (with LoRA adapters when configured), grad buffers and optimizer.

    The training run and the dry run (``megatron_aquila.dryrun``) both build through here;
    ``fused_adam`` is the optimizer's ``fused`` (None: fused on CUDA).
    """
    p, t = config.parallel, config.training
    lora = config.finetune.lora
    chunks = build_model_chunks(config, ctx, initialize=initialize)
    if lora is not None:  # before the grad buffers: only the adapters train (model/lora.py)
        for chunk in chunks:
            apply_lora(chunk, LoraSettings.from_config(lora), t.seed)
            if config.finetune.qlora is not None:
                apply_qlora(chunk)
    buffers = [DataParallelGradBuffer(chunk, ctx, p.grad_bucket_size_mb, p.overlap_grad_reduce, p.distributed_optimizer)
               for chunk in chunks]
    optimizer = build_optimizer(chunks, buffers, config.optimizer, config.precision, ctx, p.distributed_optimizer,
                                fused=fused_adam, overlap_param_gather=p.overlap_param_gather)
    return chunks, buffers, optimizer


def build_trainer_parts(config: Config, ctx: ParallelContext) -> tuple[TrainerParts, TrainingState]:
    t = config.training
    torch.manual_seed(t.seed)
    lora = config.finetune.lora
    overwritten = will_resume(config) or config.checkpoint.init_weights is not None
    chunks, buffers, optimizer = build_model_and_optimizer(config, ctx, initialize=not overwritten)
    local_params = sum(param.numel() for chunk in chunks for param in chunk.parameters())
    logger.info(f"{ctx.describe()} | {local_params:,} parameters on this rank | {chunks[0].kernel_description()}")
    schedule = BatchSchedule(t.global_batch_size, t.micro_batch_size, ctx.dp_size,
                             tuple(t.rampup_batch_size) if t.rampup_batch_size else None)
    iterations = schedule.iterations_for(t.train_samples) if t.train_samples is not None else t.train_iters
    train_samples = schedule.samples_consumed_by(iterations)  # the last batch may overshoot train_samples
    train_stream, valid_stream, describe_samples = build_streams(config, ctx, train_samples)
    padded_vocab = config.model.padded_vocab_size(ctx.tp_size)
    parts = TrainerParts(
        model_chunks=chunks, grad_buffers=buffers, optimizer=optimizer,
        lr_scheduler=LRScheduler.from_config(config.optimizer, t), batch_schedule=schedule,
        train_stream=train_stream, valid_stream=valid_stream, describe_samples=describe_samples,
        flops_per_sample=flops_per_iteration(
            config.model, 1, padded_vocab,
            None if lora is None else adapter_parameters(config.model, LoraSettings.from_config(lora))),
        peak_tflops=shared_peak_tflops(config, ctx),
    )
    if lora is not None:  # the base weights, always: a LoRA checkpoint holds only the adapters
        initialize_weights(config.checkpoint.init_weights, config, chunks, optimizer, ctx)
    state = load_checkpoint(config, ctx, parts) if config.checkpoint.load is not None else None
    if state is None and lora is None and config.checkpoint.init_weights is not None:
        initialize_weights(config.checkpoint.init_weights, config, chunks, optimizer, ctx)
    return parts, state or TrainingState()


def build_metrics(config: Config, ctx: ParallelContext) -> Optional[MetricsWriter]:
    """TensorBoard / wandb sinks on rank 0 when configured; None otherwise (log line only)."""
    logging_config = config.logging
    if ctx.rank != 0 or not (logging_config.tensorboard_dir or logging_config.wandb_project):
        return None
    return MetricsWriter(logging_config.tensorboard_dir, logging_config.wandb_project, logging_config.wandb_mode,
                         config.to_dict(), logging_config.output_dir)
