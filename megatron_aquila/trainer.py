"""The training loop: iterations of micro-batches, optimizer steps, validation, logging, stopping.

One iteration: zero the grad buffers; run the layout's forward-backward schedule over this
iteration's micro-batches (their number follows the batch-size ramp-up); finish the data-parallel
grad reduction; step the optimizer (which unscales, checks inf/nan on every rank, clips by the
global norm and may skip); advance the learning rate by the samples consumed; reduce the loss
over pipeline stages and data-parallel ranks for the log line (as a per-micro-batch or per-token
mean, ``training.loss_average``; see ``parallel/pipeline/schedules.py``).

Skipped steps: the optimizer skips a step whose gradients are not finite (a NaN/Inf loss from a
bad batch, a diverging run, an fp16 overflow). The run goes on, counts it in ``skipped`` and
leaves non-finite losses out of the logged interval mean; after ``training.max_skipped_in_a_row``
consecutive skipped steps it stops with ``SkippedStepsError``. Under fp16 an overflow is the loss
scaler's business while it can still back off, so a skipped step counts toward that limit only
once its loss scale is at ``precision.min_loss_scale`` (docs/design.md section 10). Every
collective runs on ``ctx.device`` (NCCL has no CPU tensors).

Checkpoints (``megatron_aquila.checkpoint``): saved every ``checkpoint.save_interval`` iterations
and whenever the loop stops (end of training, exit_interval, exit_duration_minutes, or a
SIGTERM/SIGUSR1 that any rank received: the flag is agreed over the world after each iteration).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_aquila.checkpoint.saver import CheckpointSaver
from megatron_aquila.checkpoint.signals import StopSignalHandler
from megatron_aquila.config import Config
from megatron_aquila.metrics import IterationStats, MetricsWriter
from megatron_aquila.parallel.context import ParallelContext, group_size
from megatron_aquila.parallel.pipeline.schedules import Microbatch, ScheduleSpec, get_forward_backward_func
from megatron_aquila.training_state import TrainerParts, TrainingState

logger = logging.getLogger("megatron_aquila")

class SkippedStepsError(RuntimeError):
    """``training.max_skipped_in_a_row`` optimizer steps in a row were skipped for non-finite gradients."""


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
        self.saver = CheckpointSaver(config, ctx)

    def save_checkpoint(self) -> None:
        """Save at the current iteration when ``checkpoint.save`` is set (once per iteration)."""
        if self.config.checkpoint.save is None or self.state.iteration == self.last_saved_iteration:
            return
        self.saver.save(self.parts, self.state)
        self.last_saved_iteration = self.state.iteration

    # ----------------------------------------------------------------- one iteration
    def _spec(self, num_microbatches: int, forward_only: bool) -> ScheduleSpec:
        model = self.config.model
        return ScheduleSpec(
            model_chunks=self.parts.model_chunks, grad_buffers=self.parts.grad_buffers, ctx=self.ctx,
            num_microbatches=num_microbatches, micro_batch_size=self.config.training.micro_batch_size,
            seq_length=model.seq_length // self.ctx.cp_size, hidden_size=model.hidden_size,
            sequence_parallel=self.config.parallel.sequence_parallel, activation_dtype=self.config.precision.torch_dtype,
            loss_scale=1.0 if forward_only else self.parts.optimizer.loss_scale, forward_only=forward_only,
            loss_average=self.config.training.loss_average,
        )

    def _reduce_loss(self, microbatch_losses: list[torch.Tensor]) -> float:
        """The iteration's loss from the last stage's per-micro-batch [S_j, n_j] (schedules.py).

        One quotient of sums: each rank contributes (numerator, denominator) =
        (mean_j S_j / max(n_j, 1), 1) under per_microbatch or (sum_j S_j, sum_j n_j) under per_token
        on the last stage, (0, 0) elsewhere; both are summed over the pipeline and then over data
        parallel, and divided: the mean of the micro-batch means over DP, or sum S / sum n over every
        micro-batch of every DP rank (the per-token mean).
        """
        local = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # [numerator, denominator]
        if microbatch_losses:
            pairs = torch.stack(microbatch_losses).to(device=self.ctx.device, dtype=torch.float64)  # [m, 2]
            if self.config.training.loss_average == "per_token":
                local = pairs.sum(dim=0)
            else:
                local[0] = (pairs[:, 0] / pairs[:, 1].clamp(min=1.0)).mean()
                local[1] = 1.0
        if group_size(self.ctx.pp_group) > 1:
            dist.all_reduce(local, group=self.ctx.pp_group)
        if group_size(self.ctx.dp_group) > 1:
            dist.all_reduce(local, group=self.ctx.dp_group)
        return float((local[0] / local[1].clamp(min=1.0)).item())

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
            elapsed = torch.tensor([(time.time() - started) / 60.0], dtype=torch.float64, device=self.ctx.device)
            if self.ctx.world_size > 1:  # every rank must agree to stop at the same iteration
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
            if elapsed.item() >= t.exit_duration_minutes:
                return f"exit_duration_minutes {t.exit_duration_minutes} reached"
        return None

    def train(self) -> TrainingState:
        stream = self.parts.train_stream(self.state.consumed_train_samples)
        try:
            self._loop(stream)
        except BaseException:
            self.saver.drain_after_error()   # an earlier state's background write may still complete
            raise
        stream.close()  # shut the data loader down now, not at interpreter exit
        self.save_checkpoint()
        self.saver.close()   # an async save completes (on every rank) before the run returns
        if self.metrics is not None:
            self.metrics.close()
        return self.state

    def _loop(self, stream: Iterator[Microbatch]) -> None:
        cfg, state = self.config, self.state
        started = time.time()
        interval_losses, interval_seconds, interval_iters = [], 0.0, 0
        first_iteration = state.iteration
        with StopSignalHandler(self.ctx) as signals:
            while True:
                reason = self.should_stop(started, state.iteration - first_iteration)
                if reason:
                    logger.info(f"stopping: {reason}")
                    return
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
                    return

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
        state.history.append(loss)
        if result.successful:
            parts.lr_scheduler.step(global_batch if self.use_samples else 1)
            state.skipped_in_a_row = 0
        else:
            state.skipped_iterations += 1
            self._count_skipped(loss, result)
        return loss, seconds, global_batch, result

    def _count_skipped(self, loss: float, result) -> None:
        """Count a skipped step toward ``max_skipped_in_a_row`` (module docstring) and stop at the limit.

        ``result.successful`` is agreed over the world, so every rank raises at the same iteration.
        """
        cfg, state = self.config, self.state
        limit = cfg.training.max_skipped_in_a_row
        if cfg.precision.dtype == "fp16" and result.loss_scale > cfg.precision.min_loss_scale:
            return  # the scaler backs off and retries
        state.skipped_in_a_row += 1
        if self.ctx.rank == 0:
            logger.warning(f"iteration {state.iteration}: optimizer step skipped, gradients not finite (loss {loss}); "
                           f"{state.skipped_in_a_row} in a row, the run stops at training.max_skipped_in_a_row {limit}")
        if state.skipped_in_a_row >= limit:
            raise SkippedStepsError(
                f"{state.skipped_in_a_row} optimizer steps in a row skipped for non-finite gradients, the last at "
                f"iteration {state.iteration} (loss {loss}, consumed samples {state.consumed_train_samples}, "
                f"precision {cfg.precision.dtype}; training.max_skipped_in_a_row {limit}): lower optimizer.lr, "
                "check the data these iterations read, or train in bf16 (precision.dtype=bf16) rather than fp16")

    def _log(self, losses: list[float], seconds: float, global_batch: int, result) -> None:
        """Log the interval's mean loss over its finite losses (nan if none was finite)."""
        if self.ctx.rank != 0:
            return
        cfg = self.config
        finite = [loss for loss in losses if math.isfinite(loss)]
        stats = IterationStats(
            iteration=self.state.iteration, consumed_samples=self.state.consumed_train_samples,
            consumed_tokens=self.state.consumed_train_samples * cfg.model.seq_length,
            lr=self.parts.lr_scheduler.lr, loss=sum(finite) / len(finite) if finite else math.nan,
            grad_norm=result.grad_norm,
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
