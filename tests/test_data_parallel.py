import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run_distributed
from megatron_aquila.parallel import data_parallel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer

BUCKET_MB = 40 * 4 / 2 ** 20  # 40 fp32 elements: several buckets for the tiny model


class TinyNet(nn.Module):
    """x -> x * norm -> tanh(fc1) -> fc2; 6 + (60 + 10) + 30 parameters."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.norm = nn.Parameter(1.0 + 0.1 * torch.randn(6))
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3, bias=False)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x * self.norm)))


def micro_batch(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)


def loss_of(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_layout_reverse_order_buckets_and_padding():
    torch.manual_seed(0)
    model = TinyNet()
    ctx = dataclasses.replace(ParallelContext.single_process(), dp_size=3, dp_rank=1)  # layout only: no collectives
    buffer = DataParallelGradBuffer(model, ctx, bucket_size_mb=BUCKET_MB, distributed_optimizer=True)
    order = [buffer.name_of(p) for b in buffer.buckets for p in b.params]
    assert order == ["fc2.weight", "fc1.bias", "fc1.weight", "norm"]
    # buckets close once they reach 40 elements: [fc2.weight 30 + fc1.bias 10], [fc1.weight 60], [norm 6 -> 6]
    assert [(b.start, b.end) for b in buffer.buckets] == [(0, 42), (42, 102), (102, 108)]
    assert all(b.numel % 3 == 0 for b in buffer.buckets)
    assert buffer.buffer.numel() == 108
    for p in model.parameters():
        start, end = buffer.range_of(p)
        assert p.main_grad.data_ptr() == buffer.buffer[start:].data_ptr() and p.main_grad.shape == p.shape
    # the owned pieces of the 3 DP ranks partition every parameter exactly
    covered = {name: torch.zeros(p.numel(), dtype=torch.int64) for name, p in model.named_parameters()}
    for rank in range(3):
        other = DataParallelGradBuffer(TinyNet(), dataclasses.replace(ctx, dp_rank=rank), BUCKET_MB,
                                       distributed_optimizer=True)
        for param, lo, hi in other.owned_pieces():
            covered[other.name_of(param)][lo:hi] += 1
    assert all(bool((c == 1).all()) for c in covered.values())


def test_hook_accumulates_bf16_grads_in_fp32_and_frees_grad():
    torch.manual_seed(0)
    model = TinyNet(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    buffer = DataParallelGradBuffer(model, ParallelContext.single_process(), bucket_size_mb=BUCKET_MB)
    for seed in range(3):
        with buffer.no_sync():
            loss_of(model, micro_batch(seed, torch.bfloat16)).backward()
        loss_of(reference, micro_batch(seed)).backward()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is None and p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, r.grad, atol=0.05, rtol=0.05, msg=name)
    buffer.finish_grad_sync()
    buffer.zero_grad()
    assert not buffer.buffer.any()


def test_second_final_backward_without_finish_is_an_error():
    model = TinyNet()
    buffer = DataParallelGradBuffer(model, ParallelContext.single_process(), bucket_size_mb=BUCKET_MB)
    loss_of(model, micro_batch(0)).backward()
    with pytest.raises(RuntimeError, match="second final-micro-batch grad"):
        loss_of(model, micro_batch(1)).backward()


def _dp2_worker(rank, world_size):
    ctx = ParallelContext.initialize(tp_size=1, pp_size=1)
    calls = []   # (collective, numel of the bucket it reduces)
    real_all_reduce, real_reduce_scatter = dist.all_reduce, data_parallel.reduce_scatter_single

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel()))
        return real_all_reduce(tensor, *args, **kwargs)

    def counting_reduce_scatter(output, input, *args, **kwargs):
        assert output.numel() * world_size == input.numel()
        calls.append(("reduce_scatter", input.numel()))
        return real_reduce_scatter(output, input, *args, **kwargs)

    dist.all_reduce, data_parallel.reduce_scatter_single = counting_all_reduce, counting_reduce_scatter
    micro_batches = 3
    # Reference: grads of every rank's micro-batches, computed locally; rank r sees seeds 10*r + j.
    torch.manual_seed(0)
    base = TinyNet()
    local_sums, global_mean = [], {n: torch.zeros_like(p) for n, p in base.named_parameters()}
    for r in range(world_size):
        ref = copy.deepcopy(base)
        for j in range(micro_batches):
            loss_of(ref, micro_batch(10 * r + j)).backward()
            if r == rank and j == micro_batches - 2:
                local_sums = {n: p.grad.clone() for n, p in ref.named_parameters()}
        for n, p in ref.named_parameters():
            global_mean[n] += p.grad / world_size

    for overlap, zero1 in [(True, False), (False, False), (True, True)]:
        model = copy.deepcopy(base)
        buffer = DataParallelGradBuffer(model, ctx, bucket_size_mb=BUCKET_MB, overlap_grad_reduce=overlap,
                                        distributed_optimizer=zero1)
        for step in range(2):   # the second step checks that state resets after finish/zero_grad
            calls.clear()
            for j in range(micro_batches - 1):
                with buffer.no_sync():
                    loss_of(model, micro_batch(10 * rank + j)).backward()
            assert calls == [], f"non-final micro-batches reduced: {calls}"
            for n, p in model.named_parameters():   # still the local, unreduced sums
                torch.testing.assert_close(p.main_grad, local_sums[n], msg=n)
            loss_of(model, micro_batch(10 * rank + micro_batches - 1)).backward()
            launched_in_backward = len(calls)
            buffer.finish_grad_sync()
            assert launched_in_backward == (len(buffer.buckets) if overlap else 0)
            # one collective per bucket, in bucket order (the order backward completes them), on gloo
            # exactly as on NCCL: reduce-scatter for the distributed optimizer, all-reduce otherwise
            kind = "reduce_scatter" if zero1 else "all_reduce"
            assert calls == [(kind, b.numel) for b in buffer.buckets], calls
            if zero1:
                for param, lo, hi in buffer.owned_pieces():
                    expected = global_mean[buffer.name_of(param)].reshape(-1)[lo:hi]
                    torch.testing.assert_close(param.main_grad.reshape(-1)[lo:hi], expected)
            else:
                for n, p in model.named_parameters():
                    torch.testing.assert_close(p.main_grad, global_mean[n], msg=n)
            buffer.zero_grad()
    return True


def test_dp2_accumulation_overlap_and_reduce_scatter():
    assert run_distributed(_dp2_worker, world_size=2) == [True, True]
