"""Communication per iteration of one rank, by group: the planner's model (docs/design.md section 13).

Bytes are buffer sizes (the convention of ``dryrun/comm.py``): the tensor of an all-reduce or a
send/recv, the gathered output of an all-gather, the input of a reduce-scatter. With m micro-batches
per iteration, L layers on the rank, a bytes per activation, s this rank's tokens per sample
(seq / cp), b the micro batch, h hidden, g kv heads, d head dim, t TP, c CP, X = a s b h:

    tp, sequence parallel     all-gather      m X (6 L + e + 2 o)   per layer: 2 forward (QKV, gate_up
                                                                   inputs), 2 backward re-gathers of
                                                                   those, 2 backward (dense, down grads)
                              reduce-scatter  m X (4 L + e + o)    per layer: 2 forward (dense, down),
                                                                   2 backward (QKV, gate_up input grads)
    tp, no SP                 all-reduce      m X (4 L + e + o)    2 forward, 2 backward per layer
    tp, either                all-reduce      3 m 4 s b o          the cross entropy's max, target logit,
                                                                   sum of exponentials (fp32 [s, b])
    cp                        all-gather      2 m L a (c s) b (g / t) d   K and V of the whole sequence
                              reduce-scatter  the same, their gradients in backward
    pp                        send, recv      m a s' b h each, twice that on a middle stage (activation
                                                                   forward, gradient backward)
    dp_cp, ZeRO-1             reduce-scatter  4 P (the fp32 grad buffer), all-gather a_w P (the weights)
    dp_cp, replicated         all-reduce      4 P

e = 1 on the first stage (the vocab-parallel embedding's reduction), o = 1 on the last (the output
layer's gathers and reduction); s' = s / t under sequence parallelism. P is the rank's trainable
parameter count padded as the grad buffer pads it (to a multiple of dp x cp per bucket, ignored
here: under 0.01%). Scalars (the loss, the grad norm, the inf check, the SP norm weights' grads) are
left out; the dry run lists them.
"""
from __future__ import annotations

from megatron_aquila.config import Config

MODEL_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def communication_per_iteration(config: Config, world_size: int, pp_rank: int, layers: int,
                                trainable_parameters: int, microbatches: int) -> dict[tuple[str, str], float]:
    """(op, group) -> bytes per iteration for a rank of pipeline stage ``pp_rank`` (module docstring)."""
    m, p = config.model, config.parallel
    a = MODEL_DTYPE_BYTES[config.precision.dtype]
    t, c, pp = p.tensor_parallel, p.context_parallel, p.pipeline_parallel
    s, b = m.seq_length // c, config.training.micro_batch_size
    first, last = int(pp_rank == 0), int(pp_rank == pp - 1)
    x = a * s * b * m.hidden_size
    out: dict[tuple[str, str], float] = {}
    if t > 1:
        if p.sequence_parallel:
            out[("all_gather", "tp")] = microbatches * x * (6 * layers + first + 2 * last)
            out[("reduce_scatter", "tp")] = microbatches * x * (4 * layers + first + last)
        else:
            out[("all_reduce", "tp")] = microbatches * x * (4 * layers + first + last)
        out[("all_reduce", "tp")] = out.get(("all_reduce", "tp"), 0) + 3 * microbatches * 4 * s * b * last
    if c > 1 and layers:
        kv = 2 * microbatches * layers * a * (c * s) * b * (m.kv_heads // t) * m.head_dim
        out[("all_gather", "cp")] = kv
        out[("reduce_scatter", "cp")] = kv
    if pp > 1:
        hop = a * (s // t if p.sequence_parallel and t > 1 else s) * b * m.hidden_size
        transfers = 1 if first or last else 2
        out[("send", "pp")] = out[("recv", "pp")] = microbatches * hop * transfers
    if config.data_parallel_size(world_size) * c > 1:
        if p.distributed_optimizer:
            out[("reduce_scatter", "dp_cp")] = 4 * trainable_parameters
            out[("all_gather", "dp_cp")] = a * trainable_parameters
        else:
            out[("all_reduce", "dp_cp")] = 4 * trainable_parameters
    return {key: value for key, value in out.items() if value}
