"""Impersonate one rank of a recipe's world in this process and run its real training step.

    report = dry_run(config, DryRunSettings(world_size=512, rank=0, gpus_per_node=8))

1. ``torch.distributed`` is initialised with torch's ``fake`` backend (``FakeStore``): every
   collective and send/recv returns at once, so rank R of a 512-rank world runs alone.
2. The real ``ParallelContext``, model chunks (LoRA included), grad buffers and optimizer are built
   under ``FakeTensorMode``: tensors have shapes, dtypes and storages but no bytes and no values.
3. The attention kernel is the one a CUDA run would use (``settings.attention``): our own wrapper
   around a stand-in of the CUDA kernel (``dryrun/cuda_kernels.py``); ``cpu`` keeps the CPU kernels
   (what the tests compare against a real gloo run).
4. ``Trainer.train_step``, the function the training loop runs, executes ``settings.iterations``
   times on synthetic micro-batches of the recipe's shape ([b, s/cp] tokens, labels, loss mask and
   packed position ids), at the full global batch's micro-batch count unless told otherwise.
5. Three observers watch the last iteration (the first allocates Adam's moments):
   ``MemoryTracker`` (peak bytes by category), ``HostSyncCounter`` (every value the host waits
   for, by call site; under fake tensors each answers 0, so the optimizer steps) and
   ``CollectiveLog`` (every collective with its group and bytes).
6. The host memory an async save would stage is the size of what this rank writes
   (``checkpoint/state.py`` ``owned_save_state``).
"""
from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode,
                                           UnsupportedOperatorException)

from megatron_aquila.batch_schedule import BatchSchedule
from megatron_aquila.build import build_model_and_optimizer
from megatron_aquila.checkpoint.state import owned_save_state
from megatron_aquila.config import Config
from megatron_aquila.dryrun import cuda_kernels
from megatron_aquila.dryrun.comm import CollectiveLog
from megatron_aquila.dryrun.memory import MemorySnapshot, MemoryTracker
from megatron_aquila.dryrun.syncs import HostSyncCounter
from megatron_aquila.model.kernels import PACKED_KERNELS, _flash_attn, _torch_sdpa, flash_attention_applies
from megatron_aquila.model.packed_attention import (find_documents, flash_varlen_attention, flex_document_attention,
                                                    packed_attention_path)
from megatron_aquila.model.qlora import prime_bitsandbytes, quantized_weights
from megatron_aquila.optim.lr_schedule import LRScheduler
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.pipeline.schedules import Microbatch
from megatron_aquila.trainer import Trainer
from megatron_aquila.training_state import TrainerParts

ATTENTION_CHOICES = ("flash-attn", "sdpa", "math", "cpu")


class DryRunError(RuntimeError):
    """The dry run cannot impersonate this rank or run an op; the message says which and where."""


@dataclass(frozen=True)
class DryRunSettings:
    world_size: int
    rank: int = 0
    gpus_per_node: int = 8
    attention: str = "flash-attn"   # flash-attn (the recipes' GPU kernel), sdpa (torch SDPA on CUDA), math (SDPA
                                    # without fused kernels: s x s scores), cpu (the CPU kernels, run for real)
    iterations: int = 2
    microbatches: Optional[int] = None  # per iteration; None: the full global batch's count

    def validate(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise DryRunError(f"--rank {self.rank} is outside the world of {self.world_size} ranks")
        if self.attention not in ATTENTION_CHOICES:
            raise DryRunError(f"attention {self.attention!r} must be one of {ATTENTION_CHOICES}")
        if self.iterations < 2:
            raise DryRunError(f"iterations {self.iterations} must be >= 2: the first allocates Adam's moments")


@dataclass
class RankReport:
    """What one impersonated rank did in its measured (last) iteration."""

    rank: int
    coordinates: dict[str, int]          # tp, cp, dp, pp ranks
    parameters: int                      # elements of this rank's parameters (adapters included)
    num_microbatches: int
    peak: MemorySnapshot                 # device bytes at the iteration's peak, by category
    peak_site: str                       # the code running when the peak was reached
    host_syncs: dict[str, float]         # call site -> count per iteration
    collectives: dict[tuple[str, str], tuple[float, float]]  # (op, group) -> (calls, bytes) per iteration
    staged_host_bytes: int               # what an async save stages in host memory on this rank
    staged_pinned_bytes: int             # the same as CUDA's pinned host allocator hands it out (powers of two)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """A default process group of the ``fake`` backend in which this process is ``rank``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise DryRunError("torch.distributed is already initialised in this process; run the dry run in a "
                          "process of its own (python -m megatron_aquila.plan ... --dry-run)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _use_cuda_attention(chunks: list[torch.nn.Module], attention: str, dropout: float) -> None:
    """Swap each layer's attention kernel for our wrapper around the CUDA kernel a GPU run would call."""
    if attention == "cpu":
        return
    if attention == "flash-attn":
        core = _flash_attn(dropout, kernel=cuda_kernels.flash_attn_func, version=cuda_kernels.FLASH_ATTN_VERSION)
    elif attention == "flash-attn-varlen":
        core = flash_varlen_attention(dropout, kernel=cuda_kernels.flash_attn_varlen_func,
                                      version=cuda_kernels.FLASH_ATTN_VERSION)
    elif attention == "flex-attention":
        core = flex_document_attention(dropout, kernel=cuda_kernels.flex_attention)
    else:
        core = _torch_sdpa(dropout, on_cuda=True,
                           sdpa=cuda_kernels.math_sdpa if attention == "math" else cuda_kernels.cuda_sdpa)
    for chunk in chunks:
        for layer in chunk.layers.values():
            layer.attention.core = core


def _synthetic_microbatches(config: Config, ctx: ParallelContext) -> Iterator[Microbatch]:
    """Endless micro-batches of this rank's shape ([b, s/cp]); values are irrelevant (fake tensors). Packed SFT
    data also carries the documents of the whole rows [b, S] (one per row), found on real host tensors as the
    loader finds them (``data/loader.py``): call this before entering the fake mode."""
    b, seq = config.training.micro_batch_size, config.model.seq_length
    s = seq // ctx.cp_size
    whole_rows = torch.arange(seq).expand(b, seq)  # [b, S] position ids: one document per row
    documents = find_documents(whole_rows) if config.data.sft else None

    def stream() -> Iterator[Microbatch]:
        while True:
            batch = {"tokens": torch.zeros(b, s, dtype=torch.long), "labels": torch.zeros(b, s, dtype=torch.long),
                     "loss_mask": torch.ones(b, s, dtype=torch.float32),
                     "position_ids": torch.zeros(b, s, dtype=torch.long)}
            yield batch if documents is None else {**batch, "documents": documents}
    return stream()


def _label_persistent(memory: MemoryTracker, parts: TrainerParts) -> None:
    memory.label((p for chunk in parts.model_chunks for p in chunk.parameters()), "parameters")
    memory.label((t for chunk in parts.model_chunks for _, weight in quantized_weights(chunk) for t in weight.tensors()),
                 "parameters")  # Q-LoRA's 4-bit base weights (model/qlora.py)
    memory.label((buffer.buffer for buffer in parts.grad_buffers), "gradients")
    optimizer = parts.optimizer
    masters = [piece.master for piece in optimizer.pieces if piece.master is not piece.param]
    states = [t for state in (optimizer.adamw.state.values() if optimizer.adamw is not None else ())
              for t in state.values() if isinstance(t, torch.Tensor)]
    memory.label(masters + states, "optimizer")


def _choose_attention(config: Config, attention: str) -> str:
    """flash-attn where it applies (``model/kernels.py`` flash_attention_applies), else torch SDPA, as on a GPU;
    packed SFT (``data.sft``) runs what ``packed_attention_path`` picks on a GPU with flash-attn ("flash-attn":
    its varlen kernel) or with torch alone ("sdpa": FlexAttention, or the dense mask with attention dropout)."""
    dtype = config.precision.torch_dtype
    if config.data.sft and attention in ("flash-attn", "sdpa"):
        path = packed_attention_path("cuda", dtype, attention == "flash-attn", True, config.model.attention_dropout)
        return "sdpa" if path == "dense" else PACKED_KERNELS[path]
    if attention == "flash-attn" and not flash_attention_applies(dtype):
        return "sdpa"
    return attention


def measure_step(config: Config, ctx: ParallelContext, settings: DryRunSettings, fake: bool) -> RankReport:
    """Build this rank's parts and run ``settings.iterations`` steps under the observers (module docstring).

    ``fake``: inside ``FakeTensorMode`` (the dry run); otherwise on real tensors in a real process group
    (what the tests measure to prove the dry run right). Synchronised ops answer 0 only when fake.
    """
    t = config.training
    attention = _choose_attention(config, settings.attention)
    memory, syncs = MemoryTracker(), HostSyncCounter(fake=fake)
    comm = CollectiveLog(ctx, memory)
    schedule = BatchSchedule(t.global_batch_size, t.micro_batch_size, ctx.dp_size, None)
    microbatches = settings.microbatches or schedule.num_microbatches_at(0)
    # Real inputs are allowed: host-side constants (the CPU RNG states full recompute saves, bitsandbytes' 4-bit
    # code tables) enter fake ops as they do real ones; every device tensor of the step is still fake.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake and config.finetune.qlora is not None:
        prime_bitsandbytes(ctx.device)  # its cached code table must be real, not this fake mode's
    stream = _synthetic_microbatches(config, ctx)
    with fake_mode, memory.tracking(), comm, syncs:
        # fused AdamW, as on CUDA: the foreach kernel reads its step counter on the host
        chunks, buffers, optimizer = build_model_and_optimizer(config, ctx, initialize=not fake, fused_adam=True)
        _use_cuda_attention(chunks, attention, config.model.attention_dropout)
        parts = TrainerParts(model_chunks=chunks, grad_buffers=buffers, optimizer=optimizer,
                             lr_scheduler=LRScheduler.from_config(config.optimizer, t), batch_schedule=schedule,
                             train_stream=lambda consumed: stream, valid_stream=None, flops_per_sample=0.0,
                             peak_tflops=None)
        trainer = Trainer(config, ctx, parts)
        for iteration in range(settings.iterations):
            if iteration == settings.iterations - 1:  # measure the last one: Adam's state now exists
                _label_persistent(memory, parts)
                memory.reset_peak()
                syncs.reset()
                comm.reset()
            _step_or_explain(trainer, stream, microbatches, ctx)
        measured = (memory.peak, memory.peak_site, syncs.per_iteration(1), comm.per_iteration(1))
        optimizer.finish_param_gather()   # the last step's ZeRO-1 gathers (overlap_param_gather) before reading
        lora = config.finetune.lora is not None
        staged_tensors = [tensor for value in owned_save_state(chunks, optimizer, ctx, lora, with_moments=True).values()
                          for tensor in value.tensors()]
        staged = sum(t.numel() * t.element_size() for t in staged_tensors)
        # torch's caching host allocator rounds every pinned block up to a power of two
        pinned = sum(1 << max(t.numel() * t.element_size() - 1, 0).bit_length() for t in staged_tensors)
    return RankReport(
        rank=ctx.rank, coordinates={"tp": ctx.tp_rank, "cp": ctx.cp_rank, "dp": ctx.dp_rank, "pp": ctx.pp_rank},
        parameters=sum(param.numel() for chunk in chunks for param in chunk.parameters()),
        num_microbatches=microbatches, peak=measured[0], peak_site=measured[1], host_syncs=measured[2],
        collectives=measured[3], staged_host_bytes=staged, staged_pinned_bytes=pinned,
        notes=[f"attention kernel: {attention}"])


def _step_or_explain(trainer: Trainer, stream: Iterator[dict[str, torch.Tensor]], microbatches: int,
                     ctx: ParallelContext) -> None:
    """``trainer.train_step``; an op that fake tensors cannot run becomes a DryRunError naming it and where."""
    try:
        trainer.train_step(stream, microbatches)
    except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException,
            NotImplementedError) as error:
        frames = [frame for frame in traceback.extract_tb(error.__traceback__)
                  if "megatron_aquila" in frame.filename and "dryrun" not in frame.filename]  # the step's own code
        where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "outside megatron_aquila"
        raise DryRunError(f"rank {ctx.rank}: {type(error).__name__} at {where}: {error}; the dry run cannot run this "
                          "op on fake tensors (give it a fake implementation, or keep it out of the step)") from error


def dry_run(config: Config, settings: DryRunSettings) -> RankReport:
    """Run ``settings.iterations`` training steps of rank ``settings.rank`` on fake tensors (module docstring)."""
    settings.validate()
    config.validate(settings.world_size)
    started = time.perf_counter()
    p = config.parallel
    with fake_world(settings.rank, settings.world_size):
        ctx = ParallelContext.initialize(p.tensor_parallel, p.pipeline_parallel, torch.device("cpu"),
                                         cp_size=p.context_parallel)
        report = measure_step(config, ctx, settings, fake=True)
        ctx.release_groups()
    report.seconds = time.perf_counter() - started
    return report
