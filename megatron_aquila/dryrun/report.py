"""The dry run next to the planner: one table per impersonated rank, and the fit verdict.

Memory terms, at the rank's peak (``MemoryTracker``), against ``memory_model.rank_memory`` for the same
(TP rank, PP rank): parameters, gradients (the fp32 grad buffers), optimizer (fp32 masters and Adam
moments), activations (saved for backward), temporaries (alive, not saved: with communication
buffers, which the planner folds into its temporaries) and the total. Communication per iteration
against ``comm_model``. The verdict compares the measured total with the GPU's memory less
``memory_model.RESERVED_FRACTION`` (CUDA context, NCCL buffers, fragmentation: what neither sees).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_aquila.comm_model import communication_per_iteration
from megatron_aquila.config import Config
from megatron_aquila.dryrun.runner import RankReport
from megatron_aquila.memory_model import (GIB, RESERVED_FRACTION, ActivationShape, RankMemory, RankParameters,
                                          rank_memory, rank_parameters)

TERMS = ("parameters", "gradients", "optimizer", "activations", "temporaries", "total")


@dataclass(frozen=True)
class Term:
    name: str
    measured: float   # bytes
    planned: float    # bytes

    @property
    def relative_difference(self) -> float:
        """(planned - measured) / measured; 0 when both are 0."""
        if self.measured == 0:
            return 0.0 if self.planned == 0 else float("inf")
        return (self.planned - self.measured) / self.measured


def planned_rank(config: Config, world_size: int, report: RankReport) -> RankParameters:
    """The planner's parameters of the impersonated rank's (TP rank, PP rank)."""
    coordinates = (report.coordinates["tp"], report.coordinates["pp"])
    return next(r for r in rank_parameters(config, world_size) if (r.tp_rank, r.pp_rank) == coordinates)


def memory_terms(report: RankReport, planned: RankMemory, distributed_optimizer: bool) -> list[Term]:
    """Each memory term of TERMS, measured and planned (module docstring)."""
    peak = report.peak.by_category
    return [
        Term("parameters", peak["parameters"], planned.weights),
        Term("gradients", peak["gradients"], planned.grads),
        Term("optimizer", peak["optimizer"], planned.optimizer(distributed_optimizer)),
        Term("activations", peak["activations"], planned.activations),
        Term("temporaries", peak["temporaries"] + peak["communication"], planned.temporaries),
        Term("total", report.peak.total, planned.total(distributed_optimizer)),
    ]


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:8.2f} GiB"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 20:10.1f} MiB"


def format_report(config: Config, world_size: int, report: RankReport, gpu_name: str, gpu_memory_gib: float,
                  gpus_per_node: int, math_attention: bool = False) -> tuple[list[str], bool]:
    """The rank's table (module docstring) and whether it fits a GPU of ``gpu_memory_gib``."""
    p = config.parallel
    rank = planned_rank(config, world_size, report)
    planned = rank_memory(config, world_size, rank, ActivationShape.from_config(config, math_attention=math_attention))
    terms = memory_terms(report, planned, p.distributed_optimizer)
    where = " ".join(f"{axis} {value}" for axis, value in report.coordinates.items())
    out = [f"dry run of rank {report.rank} ({where}) of {world_size}: {report.parameters:,} parameters, "
           f"{report.num_microbatches} micro-batches per iteration, {'; '.join(report.notes)}, "
           f"{report.seconds:.1f} s",
           f"  memory at the peak (reached in {report.peak_site}):      dry run      planner   planner - dry run"]
    for term in terms:
        out.append(f"    {term.name:<12} {_gib(term.measured)} {_gib(term.planned)}   "
                   f"{term.relative_difference:+8.1%}")
    staged, pinned = report.staged_host_bytes, report.staged_pinned_bytes
    out.append(f"  async save staging in host memory: {_gib(staged)} on this rank ({_gib(pinned)} as pinned blocks, "
               f"each rounded up to a power of two), about {_gib(pinned * gpus_per_node)} pinned per "
               f"{gpus_per_node}-GPU node (its ranks share one pipeline stage); each replicated tensor is staged by "
               "its one writer only")
    per_microbatch = [site for site, count in report.host_syncs.items() if count >= report.num_microbatches > 1]
    syncs = "; ".join(f"{site} x{count:g}" for site, count in report.host_syncs.items()) or "none"
    out.append(f"  host syncs per iteration: {syncs}" + (
        f"; PER MICRO-BATCH: {', '.join(per_microbatch)}" if per_microbatch else " (none per micro-batch)"))
    layers = sum(len(ids) for ids in rank.chunk_layer_ids)
    model = communication_per_iteration(config, world_size, rank.pp_rank, layers, rank.trainable,
                                        report.num_microbatches)
    out.append("  communication per iteration:     calls      dry run        model")
    for key in sorted(set(report.collectives) | set(model)):
        calls, measured = report.collectives.get(key, (0.0, 0.0))
        out.append(f"    {key[0]:<15} {key[1]:<6} {calls:6g} {_mib(measured)} "
                   f"{_mib(model[key]) if key in model else '   (scalars)'}")
    usable = gpu_memory_gib * GIB * (1 - RESERVED_FRACTION)
    fits = report.peak.total <= usable
    largest = sorted(terms[:-1], key=lambda term: -term.measured)[:3]
    named = ", ".join(f"{term.name} {term.measured / GIB:.2f} GiB" for term in largest)
    verdict = "FITS" if fits else "DOES NOT FIT"
    out.append(f"  {verdict} on {gpu_name}: rank {report.rank} (pipeline stage {report.coordinates['pp']}) needs "
               f"{report.peak.total / GIB:.2f} GiB of {usable / GIB:.2f} GiB usable ({gpu_memory_gib:g} GiB less "
               f"{RESERVED_FRACTION:.0%} for the CUDA context, NCCL buffers and fragmentation); largest: {named}")
    return out, fits
