"""The training loop: iterations of micro-batches, optimizer steps, validation, logging, stopping.

One iteration: zero the grad buffers; run the layout's forward-backward schedule over this
iteration's micro-batches (their number follows the batch-size ramp-up); finish the data-parallel
grad reduction; step the optimizer (which unscales, checks inf/nan on every rank, clips by the
global norm and may skip); advance the learning rate by the samples consumed; reduce the loss
over pipeline stages and data-parallel ranks for the log line.

Checkpoints (``megatron_aquila.checkpoint``): saved every ``checkpoint.save_interval`` iterations
and whenever the loop stops (end of training, exit_interval, exit_duration_minutes, or a
SIGTERM/SIGUSR1 that any rank received: the flag is agreed over the world after each iteration).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_aquila.batch_schedule import BatchSchedule
from megatron_aquila.checkpoint.manager import save_checkpoint
from megatron_aquila.checkpoint.signals import StopSignalHandler
from megatron_aquila.config import Config
from megatron_aquila.metrics import IterationStats, MetricsWriter
from megatron_aquila.parallel.context import ParallelContext, group_size
from megatron_aquila.parallel.pipeline.schedules import Microbatch, ScheduleSpec, get_forward_backward_func

logger = logging.getLogger("megatron_aquila")

MicrobatchStreamFactory = Callable[[int], Iterator[Microbatch]]  # consumed samples -> micro-batches


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf (not an fp16 overflow, which the loss scaler handles)."""


@dataclass
class TrainingState:
    """Progress counters; what a checkpoint must restore to resume exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    history: list[float] = field(default_factory=list)  # every iteration's reduced loss (this process's run)


@dataclass
class TrainerParts:
    """The built components the loop drives (see ``megatron_aquila.build``)."""

    model_chunks: list[torch.nn.Module]
    grad_buffers: list
    optimizer: object          # MixedPrecisionOptimizer / DistributedOptimizer
    lr_scheduler: object       # LRScheduler
    batch_schedule: BatchSchedule
    train_stream: MicrobatchStreamFactory
    valid_stream: Optional[MicrobatchStreamFactory]
    flops_per_sample: float    # model FLOPs per sample (section 6 formula with B = 1)
    peak_tflops: float


class Trainer:
    def __init__(self, config: Config, ctx: ParallelContext, parts: TrainerParts,
                 metrics: Optional[MetricsWriter] = None, state: Optional[TrainingState] = None):
        self.config, self.ctx, self.parts, self.metrics = config, ctx, parts, metrics
        self.state = state or TrainingState()
        self.schedule = get_forward_backward_func(ctx.pp_size, config.parallel.virtual_pipeline_stages)
        self.use_samples = config.training.train_samples is not None
        self.train_iters = (parts.batch_schedule.iterations_for(config.training.train_samples)
                            if self.use_samples else config.training.train_iters)
        self.last_saved_iteration = self.state.iteration  # a fresh run or the checkpoint just loaded

    def save_checkpoint(self) -> None:
        """Save at the current iteration when ``checkpoint.save`` is set (once per iteration)."""
        if self.config.checkpoint.save is None or self.state.iteration == self.last_saved_iteration:
            return
        save_checkpoint(self.config, self.ctx, self.parts, self.state)
        self.last_saved_iteration = self.state.iteration

    # ----------------------------------------------------------------- one iteration
    def _spec(self, num_microbatches: int, forward_only: bool) -> ScheduleSpec:
        model = self.config.model
        return ScheduleSpec(
            model_chunks=self.parts.model_chunks, grad_buffers=self.parts.grad_buffers, ctx=self.ctx,
            num_microbatches=num_microbatches, micro_batch_size=self.config.training.micro_batch_size,
            seq_length=model.seq_length, hidden_size=model.hidden_size,
            sequence_parallel=self.config.parallel.sequence_parallel, activation_dtype=self.config.precision.torch_dtype,
            loss_scale=1.0 if forward_only else self.parts.optimizer.loss_scale, forward_only=forward_only,
        )

    def _reduce_loss(self, microbatch_losses: list[torch.Tensor]) -> float:
        """Mean over micro-batches (last stage), summed over stages, averaged over data parallel."""
        local = torch.stack(microbatch_losses).mean() if microbatch_losses else torch.zeros(())
        local = local.to(device=self.ctx.device, dtype=torch.float32).reshape(1)
        if group_size(self.ctx.pp_group) > 1:
            dist.all_reduce(local, group=self.ctx.pp_group)
        if group_size(self.ctx.dp_group) > 1:
            dist.all_reduce(local, group=self.ctx.dp_group)
            local /= self.ctx.dp_size
        return float(local.item())

    def train_step(self, microbatches: Iterator[Microbatch], num_microbatches: int):
        for model in self.parts.model_chunks:
            model.train()
        self.parts.optimizer.zero_grad()
        losses = self.schedule(self._spec(num_microbatches, forward_only=False), microbatches)
        for buffer in self.parts.grad_buffers:
            buffer.finish_grad_sync()
        self.parts.optimizer.set_lr(self.parts.lr_scheduler.lr)
        result = self.parts.optimizer.step()
        return self._reduce_loss(losses), result

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.parts.valid_stream is None:
            return None
        for model in self.parts.model_chunks:
            model.eval()
        num_microbatches = self.parts.batch_schedule.num_microbatches_at(self.state.consumed_train_samples)
        stream = self.parts.valid_stream(0)
        total = 0.0
        for _ in range(self.config.training.eval_iters):
            losses = self.schedule(self._spec(num_microbatches, forward_only=True), stream)
            total += self._reduce_loss(losses)
        stream.close()
        return total / self.config.training.eval_iters

    # ----------------------------------------------------------------- the loop
    def should_stop(self, started: float, iterations_this_run: int) -> Optional[str]:
        t = self.config.training
        if self.state.iteration >= self.train_iters:
            return f"reached {self.train_iters} iterations"
        if iterations_this_run == 0:
            return None
        if t.exit_interval and self.state.iteration % t.exit_interval == 0:
            return f"exit_interval {t.exit_interval} reached at iteration {self.state.iteration}"
        if t.exit_duration_minutes is not None:
            elapsed = torch.tensor([(time.time() - started) / 60.0])
            if self.ctx.world_size > 1:  # every rank must agree to stop at the same iteration
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if elapsed.item() >= t.exit_duration_minutes:
                return f"exit_duration_minutes {t.exit_duration_minutes} reached"
        return None

    def train(self) -> TrainingState:
        cfg, parts, state = self.config, self.parts, self.state
        started = time.time()
        stream = parts.train_stream(state.consumed_train_samples)
        interval_losses, interval_seconds, interval_iters = [], 0.0, 0
        first_iteration = state.iteration
        with StopSignalHandler(self.ctx) as signals:
            while True:
                reason = self.should_stop(started, state.iteration - first_iteration)
                if reason:
                    logger.info(f"stopping: {reason}")
                    break
                loss, seconds, global_batch, result = self._train_iteration(stream)
                interval_losses.append(loss)
                interval_seconds += seconds
                interval_iters += 1
                if state.iteration % cfg.logging.log_interval == 0 or state.iteration == self.train_iters:
                    self._log(interval_losses, interval_seconds / interval_iters, global_batch, result)
                    interval_losses, interval_seconds, interval_iters = [], 0.0, 0
                if cfg.training.eval_interval and state.iteration % cfg.training.eval_interval == 0:
                    self._log_validation()
                if cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
                    self.save_checkpoint()
                if signals.should_stop():
                    logger.info(f"stopping: stop signal received, at iteration {state.iteration}")
                    break
        stream.close()  # shut the data loader down now, not at interpreter exit
        self.save_checkpoint()
        if self.metrics is not None:
            self.metrics.close()
        return state

    def _train_iteration(self, stream: Iterator[Microbatch]) -> tuple[float, float, int, object]:
        """One optimizer step and its counters; returns (loss, seconds, global batch, StepResult)."""
        parts, state = self.parts, self.state
        global_batch = parts.batch_schedule.global_batch_at(state.consumed_train_samples)
        num_microbatches = parts.batch_schedule.num_microbatches_at(state.consumed_train_samples)
        tick = time.perf_counter()
        loss, result = self.train_step(stream, num_microbatches)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        seconds = time.perf_counter() - tick
        state.iteration += 1
        state.consumed_train_samples += global_batch
        if result.successful:
            parts.lr_scheduler.step(global_batch if self.use_samples else 1)
        else:
            state.skipped_iterations += 1
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss} at iteration {state.iteration} (consumed samples "
                f"{state.consumed_train_samples}); lower optimizer.lr, check the data, or use bf16")
        state.history.append(loss)
        return loss, seconds, global_batch, result

    def _log(self, losses: list[float], seconds: float, global_batch: int, result) -> None:
        if self.ctx.rank != 0:
            return
        cfg = self.config
        stats = IterationStats(
            iteration=self.state.iteration, consumed_samples=self.state.consumed_train_samples,
            consumed_tokens=self.state.consumed_train_samples * cfg.model.seq_length,
            lr=self.parts.lr_scheduler.lr, loss=sum(losses) / len(losses), grad_norm=result.grad_norm,
            loss_scale=result.loss_scale if cfg.precision.dtype == "fp16" else None,
            skipped_iterations=self.state.skipped_iterations, iteration_seconds=seconds,
            global_batch_size=global_batch, seq_length=cfg.model.seq_length, world_size=self.ctx.world_size,
            flops_per_iteration=self.parts.flops_per_sample * global_batch, peak_tflops=self.parts.peak_tflops,
        )
        if self.metrics is not None:
            self.metrics.log_iteration(stats)
        else:
            logger.info(stats.format())

    def _log_validation(self) -> None:
        loss = self.evaluate()
        if loss is None or self.ctx.rank != 0:
            return
        perplexity = math.exp(min(loss, 20.0))
        logger.info(f"validation at iteration {self.state.iteration} | loss {loss:.5f} | perplexity {perplexity:.3f}")
        if self.metrics is not None:
            self.metrics.log_scalars("valid", {"loss": loss, "perplexity": perplexity}, self.state.iteration)
