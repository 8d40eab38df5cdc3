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
once its loss scale is at ``precision.min_loss_scale`` (docs/design.md section 10). The warning
of a counted skip names the iteration's train-dataset samples and those of them whose micro-batch
loss was not finite (gathered from every data-parallel replica). Every collective runs on
``ctx.device`` (NCCL has no CPU tensors).

Failure handling (docs/design.md, "Failure handling"): the loop reports its position to the
rank's ``Watchdog`` (a new iteration, each micro-batch drawn, a save, an evaluation), times each
iteration's own work for the ``StragglerDetector``, and lets an exception go: ``train.py`` logs it
and ends the process without another collective.

Test hook: ``MEGATRON_AQUILA_FAULT_INJECT`` makes one rank misbehave, for the failure-handling
tests only (``FaultInjection``): ``rank=R,iteration=I`` raises ``InjectedFault`` on rank R in
iteration I, ``rank=R,iteration=I,sleep=S`` sleeps S seconds there instead (a stall), and
``rank=R,slow=S`` sleeps S seconds in every iteration (a straggler).

Checkpoints (``megatron_aquila.checkpoint``): saved every ``checkpoint.save_interval`` iterations
and whenever the loop stops (end of training, exit_interval, exit_duration_minutes, or a
SIGTERM/SIGUSR1 that any rank received: the flag is agreed over the world after each iteration).

ZeRO-1 parameter gather (``parallel.overlap_param_gather``, ``optim/param_gather.py``): the step
returns with its parameter all-gathers in flight, and the next iteration's forward waits for each
bucket where it first needs it. Reading parameters anywhere else waits for all of them first
(``optimizer.finish_param_gather``): before a checkpoint save, an evaluation, and at the end of
training. ``param_gather_seconds`` is the time the last iteration was blocked waiting for gathers.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_aquila.checkpoint.saver import CheckpointSaver
from megatron_aquila.checkpoint.signals import StopSignalHandler
from megatron_aquila.config import Config
from megatron_aquila.data.sampler import MicroBatchSampler
from megatron_aquila.metrics import IterationStats, MetricsWriter
from megatron_aquila.parallel.context import ParallelContext, group_size
from megatron_aquila.parallel.pipeline.schedules import Microbatch, ScheduleSpec, get_forward_backward_func
from megatron_aquila.stragglers import StragglerDetector
from megatron_aquila.training_state import TrainerParts, TrainingState
from megatron_aquila.watchdog import Watchdog

logger = logging.getLogger("megatron_aquila")

FAULT_INJECT_ENV = "MEGATRON_AQUILA_FAULT_INJECT"
SHOWN_SAMPLES = 32  # sample indices a skipped-step warning lists before it says how many more


class SkippedStepsError(RuntimeError):
    """``training.max_skipped_in_a_row`` optimizer steps in a row were skipped for non-finite gradients."""


class InjectedFault(RuntimeError):
    """The error ``MEGATRON_AQUILA_FAULT_INJECT`` raises (a test hook, module docstring)."""


@dataclass(frozen=True)
class FaultInjection:
    """Test hook (module docstring): what ``MEGATRON_AQUILA_FAULT_INJECT`` asks of rank ``rank``."""

    rank: int
    iteration: Optional[int] = None   # raise InjectedFault in this 1-based iteration, or sleep there
    sleep: Optional[float] = None     # seconds to sleep in ``iteration`` instead of raising
    slow: Optional[float] = None      # seconds to sleep in every iteration

    @classmethod
    def from_environment(cls) -> Optional["FaultInjection"]:
        text = os.environ.get(FAULT_INJECT_ENV)
        if not text:
            return None
        try:
            fields = dict(item.split("=", 1) for item in text.split(","))
            unknown = sorted(set(fields) - {"rank", "iteration", "sleep", "slow"})
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(unknown)}")
            return cls(rank=int(fields["rank"]), iteration=int(fields["iteration"]) if "iteration" in fields else None,
                       sleep=float(fields["sleep"]) if "sleep" in fields else None,
                       slow=float(fields["slow"]) if "slow" in fields else None)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{FAULT_INJECT_ENV}={text!r} is not rank=R[,iteration=I][,sleep=S][,slow=S] "
                             f"({type(error).__name__}: {error})") from None

    def apply(self, rank: int, iteration: int) -> None:
        if rank != self.rank:
            return
        if self.slow is not None:
            time.sleep(self.slow)
        if iteration == self.iteration and self.sleep is not None:
            time.sleep(self.sleep)
        elif iteration == self.iteration:
            raise InjectedFault(f"injected by {FAULT_INJECT_ENV} on rank {rank} in iteration {iteration}")


class Trainer:
    """The loop over ``parts``. ``watchdog``: the rank's started ``Watchdog`` (``train.py``); without one the
    positions are recorded and nothing watches them."""

    def __init__(self, config: Config, ctx: ParallelContext, parts: TrainerParts,
                 metrics: Optional[MetricsWriter] = None, state: Optional[TrainingState] = None,
                 watchdog: Optional[Watchdog] = None):
        self.config, self.ctx, self.parts, self.metrics = config, ctx, parts, metrics
        self.watchdog = watchdog or Watchdog(config.distributed.hang_timeout_minutes, ctx.describe())
        self.stragglers = StragglerDetector(ctx, config.logging.straggler_interval)
        self.fault = FaultInjection.from_environment()
        self.state = state or TrainingState()
        self.schedule = get_forward_backward_func(ctx.pp_size, config.parallel.virtual_pipeline_stages)
        self.use_samples = config.training.train_samples is not None
        self.train_iters = (parts.batch_schedule.iterations_for(config.training.train_samples)
                            if self.use_samples else config.training.train_iters)
        self.last_saved_iteration = self.state.iteration  # a fresh run or the checkpoint just loaded
        self.saver = CheckpointSaver(config, ctx)
        self.param_gather_seconds = 0.0  # host time the last iteration waited for ZeRO-1 parameter gathers

    def save_checkpoint(self) -> None:
        """Save at the current iteration when ``checkpoint.save`` is set (once per iteration)."""
        if self.config.checkpoint.save is None or self.state.iteration == self.last_saved_iteration:
            return
        self.watchdog.beat("save", self.state.iteration)
        self.parts.optimizer.finish_param_gather()   # the saved (and staged) parameters are the stepped ones
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
        """One optimizer step: (reduced loss, StepResult, the last stage's per-micro-batch [S_j, n_j] or [])."""
        for model in self.parts.model_chunks:
            model.train()
        self.parts.optimizer.zero_grad()
        losses = self.schedule(self._spec(num_microbatches, forward_only=False), microbatches)
        self.stragglers.stop()  # this rank's own work ends here; finish_grad_sync waits for the others
        for buffer in self.parts.grad_buffers:
            buffer.finish_grad_sync()
        self.parts.optimizer.set_lr(self.parts.lr_scheduler.lr)
        result = self.parts.optimizer.step()
        return self._reduce_loss(losses), result, losses

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.parts.valid_stream is None:
            return None
        self.parts.optimizer.finish_param_gather()
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
        self._loop(stream)   # an exception leaves at once: no wait for a background save (docs/design.md)
        self.parts.optimizer.finish_param_gather()   # the returned model holds the last step's parameters
        stream.close()  # shut the data loader down now, not at interpreter exit
        self.watchdog.beat("save", self.state.iteration)  # the last save, and the wait for a background one
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
                self.stragglers.report(state.iteration)
                if cfg.training.eval_interval and state.iteration % cfg.training.eval_interval == 0:
                    self.watchdog.beat("eval", state.iteration)
                    self._log_validation()
                if cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
                    self.save_checkpoint()
                if signals.should_stop():
                    logger.info(f"stopping: stop signal received, at iteration {state.iteration}")
                    return

    def _train_iteration(self, stream: Iterator[Microbatch]) -> tuple[float, float, int, object]:
        """One optimizer step and its counters; returns (loss, seconds, global batch, StepResult)."""
        parts, state = self.parts, self.state
        iteration, consumed = state.iteration + 1, state.consumed_train_samples
        global_batch = parts.batch_schedule.global_batch_at(consumed)
        num_microbatches = parts.batch_schedule.num_microbatches_at(consumed)
        self.watchdog.beat("iteration", iteration)
        tick, waited = time.perf_counter(), parts.optimizer.param_gather_seconds
        self.stragglers.start()
        if self.fault is not None:
            self.fault.apply(self.ctx.rank, iteration)
        loss, result, losses = self.train_step(self._watched(stream, iteration, num_microbatches), num_microbatches)
        if self.ctx.device.type == "cuda":  # the step's kernels, not the parameter gathers left in flight
            torch.cuda.current_stream(self.ctx.device).synchronize()
        seconds = time.perf_counter() - tick
        self.param_gather_seconds = parts.optimizer.param_gather_seconds - waited
        self.stragglers.record()
        state.iteration += 1
        state.consumed_train_samples += global_batch
        state.history.append(loss)
        if result.successful:
            parts.lr_scheduler.step(global_batch if self.use_samples else 1)
            state.skipped_in_a_row = 0
        else:
            state.skipped_iterations += 1
            self._count_skipped(loss, result, consumed, global_batch, losses)
        return loss, seconds, global_batch, result

    def _watched(self, stream: Iterator[Microbatch], iteration: int, count: int) -> Iterator[Microbatch]:
        """The iteration's ``count`` micro-batches of ``stream``, each draw reported to the watchdog."""
        for index in range(count):
            self.watchdog.beat("data", iteration, index, count)
            batch = next(stream)
            self.watchdog.beat("iteration", iteration, index, count)
            yield batch

    def _non_finite_samples(self, consumed: int, global_batch: int, losses: list[torch.Tensor]) -> list[int]:
        """Train-dataset indices of this iteration's samples whose micro-batch loss is not finite, on every
        rank (a collective over the world). The sampler gives each micro-batch's indices: the iteration
        read samples ``[consumed, consumed + global_batch)``, sliced by data-parallel rank."""
        sampler = MicroBatchSampler(consumed + global_batch, consumed, self.config.training.micro_batch_size,
                                    self.ctx.dp_rank, self.ctx.dp_size)
        mine = [index for pair, indices in zip(losses, sampler) if not math.isfinite(float(pair[0]))
                for index in indices]   # losses: the last stage's [S_j, n_j], micro-batch order; [] elsewhere
        if self.ctx.world_size == 1:
            return mine
        gathered: list[list[int]] = [[] for _ in range(self.ctx.world_size)]
        dist.all_gather_object(gathered, mine, group=self.ctx.world_group)
        return sorted({index for part in gathered for index in part})  # TP and CP ranks report alike

    def _count_skipped(self, loss: float, result, consumed: int, global_batch: int,
                       losses: list[torch.Tensor]) -> None:
        """Count a skipped step toward ``max_skipped_in_a_row`` (module docstring) and stop at the limit.

        ``result.successful`` is agreed over the world, so every rank raises at the same iteration.
        """
        cfg, state = self.config, self.state
        limit = cfg.training.max_skipped_in_a_row
        if cfg.precision.dtype == "fp16" and result.loss_scale > cfg.precision.min_loss_scale:
            return  # the scaler backs off and retries
        state.skipped_in_a_row += 1
        bad = self._non_finite_samples(consumed, global_batch, losses)
        if self.ctx.rank == 0:
            shown = "; ".join(map(self.parts.describe_samples, bad[:SHOWN_SAMPLES])) + (
                f" and {len(bad) - SHOWN_SAMPLES} more" if len(bad) > SHOWN_SAMPLES else "")
            culprits = (f"non-finite loss on {shown}" if bad else
                        "every micro-batch loss finite (the gradients overflowed)")
            logger.warning(f"iteration {state.iteration}: optimizer step skipped, gradients not finite (loss {loss}); "
                           f"its batch is train-dataset samples {consumed}-{consumed + global_batch - 1}, {culprits}; "
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
