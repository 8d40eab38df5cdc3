import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from distributed import run_distributed
from megatron_aquila.config import OptimizerConfig, PrecisionConfig
from megatron_aquila.optim.build import build_optimizer
from megatron_aquila.optim.distributed_optimizer import DistributedOptimizer
from megatron_aquila.optim.lr_schedule import LRScheduler
from megatron_aquila.optim.optimizer import MixedPrecisionOptimizer
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer

BUCKET_MB = 40 * 4 / 2 ** 20   # 40 fp32 elements: several buckets, shards straddle parameters
MICRO_BATCHES, STEPS = 3, 3
OPT = OptimizerConfig(lr=0.05, min_lr=0.005, weight_decay=0.1, clip_grad=0.05, adam_beta1=0.9, adam_beta2=0.95)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(1.0 + 0.1 * torch.randn(6))
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x * self.norm)))


def micro_batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def schedule():
    return LRScheduler(OPT.lr, OPT.min_lr, warmup_steps=1, decay_steps=STEPS + 1, decay_style="cosine")


def reference_adamw(model):
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=OPT.lr, betas=(OPT.adam_beta1, OPT.adam_beta2), eps=OPT.adam_eps)


def build(model, ctx, zero1, precision=PrecisionConfig()):
    buffer = DataParallelGradBuffer(model, ctx, bucket_size_mb=BUCKET_MB, distributed_optimizer=zero1)
    return buffer, build_optimizer([model], [buffer], OPT, precision, ctx, distributed=zero1)


def run_step(model, buffer, opt, batches, lr, dtype=torch.float32):
    """Gradient accumulation over micro-batches, reduce on the last one, then one optimizer step."""
    opt.zero_grad()
    for j, batch in enumerate(batches):
        final = j == len(batches) - 1
        with (buffer.no_sync() if not final else torch.enable_grad()):
            opt.scale_loss(mse(model, [t.to(dtype) for t in batch]) / len(batches)).backward()
    buffer.finish_grad_sync()
    opt.set_lr(lr)
    return opt.step()


def rank_batches(dp_rank, step):
    return [micro_batch(1000 * step + 10 * dp_rank + j) for j in range(MICRO_BATCHES)]


# ---------------------------------------------------------------------------- single process
def test_no_weight_decay_on_1d_params():
    torch.manual_seed(0)
    model = TinyNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffer, opt = build(model, ParallelContext.single_process(), zero1=False)
    opt.set_lr(0.1)
    result = opt.step()  # zero grads: AdamW's update is 0, only decoupled decay p <- p (1 - lr wd) acts
    assert result.successful and result.grad_norm == 0.0
    for n, p in model.named_parameters():
        factor = 1.0 if p.dim() == 1 else 1.0 - 0.1 * OPT.weight_decay
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_bf16_keeps_fp32_masters():
    torch.manual_seed(0)
    model = TinyNet().to(torch.bfloat16)
    buffer, opt = build(model, ParallelContext.single_process(), zero1=False, precision=PrecisionConfig(dtype="bf16"))
    assert opt.grad_scaler is None and opt.loss_scale == 1.0
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    run_step(model, buffer, opt, rank_batches(0, 0), lr=1e-6, dtype=torch.bfloat16)
    for piece in opt.pieces:
        assert piece.master.dtype == torch.float32 and piece.param.dtype == torch.bfloat16
        assert torch.equal(piece.param.detach(), piece.master.to(torch.bfloat16))
        # an update far below bf16 resolution survives in the fp32 master only
        assert 0 < (piece.master - start[piece.name]).abs().max() < 1e-5
        assert torch.equal(piece.param.detach().float(), start[piece.name])


def test_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    ctx = ParallelContext.single_process()
    model = TinyNet()
    buffer, opt = build(model, ctx, zero1=False)
    for step in range(2):
        run_step(model, buffer, opt, rank_batches(0, step), lr=0.01)
    state = opt.state_dict()
    assert set(state["params"][0]) == {"norm", "fc1.weight", "fc1.bias", "fc2.weight"}
    assert state["params"][0]["fc1.weight"]["range"] == (0, 60) and state["params"][0]["fc1.weight"]["step"] == 2.0
    twin = copy.deepcopy(model)
    twin_buffer, twin_opt = build(twin, ctx, zero1=False)
    twin_opt.load_state_dict(state)
    run_step(model, buffer, opt, rank_batches(0, 5), lr=0.01)
    run_step(twin, twin_buffer, twin_opt, rank_batches(0, 5), lr=0.01)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_inf_grad_skips_the_step_without_a_scaler():
    torch.manual_seed(0)
    ctx = ParallelContext.single_process()
    model = TinyNet().to(torch.bfloat16)
    twin = copy.deepcopy(model)
    buffer, opt = build(model, ctx, zero1=False, precision=PrecisionConfig(dtype="bf16"))
    twin_buffer, twin_opt = build(twin, ctx, zero1=False, precision=PrecisionConfig(dtype="bf16"))
    for m, b, o in ((model, buffer, opt), (twin, twin_buffer, twin_opt)):
        assert o.grad_scaler is None and run_step(m, b, o, rank_batches(0, 0), 0.01, torch.bfloat16).successful
    before = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()
    opt.zero_grad()
    mse(model, [t.to(torch.bfloat16) for t in rank_batches(0, 1)[0]]).backward()
    model.fc1.bias.main_grad[3] = float("inf")
    buffer.finish_grad_sync()
    result = opt.step()
    assert not result.successful and result.grad_norm == math.inf and result.loss_scale == 1.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert_same_optimizer_state(opt.state_dict(), state)
    for m, b, o in ((model, buffer, opt), (twin, twin_buffer, twin_opt)):
        assert run_step(m, b, o, rank_batches(0, 2), 0.01, torch.bfloat16).successful
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def assert_same_optimizer_state(state, expected):
    assert state["params"][0].keys() == expected["params"][0].keys()
    for name, entry in expected["params"][0].items():
        got = state["params"][0][name]
        assert got.keys() == entry.keys(), name
        for key, value in entry.items():
            same = torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value
            assert same, (name, key)


# ---------------------------------------------------------------------------- DP2 vs one process
def _dp2_worker(rank, world_size):
    ctx = ParallelContext.initialize(tp_size=1, pp_size=1)
    torch.manual_seed(0)
    base = TinyNet()
    reference = copy.deepcopy(base)
    ref_opt, sched = reference_adamw(reference), schedule()
    ref_norms, lrs = [], []
    for step in range(STEPS):   # one process, the global batch of both DP ranks
        lr = sched.lr
        batches = rank_batches(0, step) + rank_batches(1, step)
        ref_opt.zero_grad()
        for batch in batches:
            (mse(reference, batch) / len(batches)).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), OPT.clip_grad)))
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        lrs.append(lr)
        sched.step(1)
    assert min(ref_norms) > 2 * OPT.clip_grad, f"clipping must be engaged for this test to mean anything: {ref_norms}"

    for zero1 in (False, True):
        model = copy.deepcopy(base)
        buffer, opt = build(model, ctx, zero1)
        assert isinstance(opt, DistributedOptimizer if zero1 else MixedPrecisionOptimizer)
        for step in range(STEPS):
            result = run_step(model, buffer, opt, rank_batches(rank, step), lrs[step])
            assert result.successful and result.loss_scale == 1.0
            assert abs(result.grad_norm - ref_norms[step]) <= 1e-5 * ref_norms[step], (zero1, step, result, ref_norms)
        for (name, p), r in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6, msg=f"zero1={zero1} {name}")
        if zero1:   # sharded state: the rank's pieces, and a reload continues identically
            state = opt.state_dict()
            assert state["kind"] == "distributed" and state["dp_rank"] == rank
            owned = {(buffer.name_of(p), lo, hi) for p, lo, hi in buffer.owned_pieces()}
            assert {(n, *e["range"]) for n, e in state["params"][0].items()} == owned
            twin = copy.deepcopy(model)
            twin_buffer, twin_opt = build(twin, ctx, zero1=True)
            twin_opt.load_state_dict(state)
            for m, b, o in ((model, buffer, opt), (twin, twin_buffer, twin_opt)):
                run_step(m, b, o, rank_batches(rank, 7), 0.01)
            for p, q in zip(model.parameters(), twin.parameters()):
                assert torch.equal(p, q)

    # fp16: an inf on rank 1 only (injected after the DP reduce, in a piece rank 1 owns under
    # ZeRO-1) must skip the step on both ranks and back off the scale.
    scales = []
    for zero1 in (False, True):
        model = copy.deepcopy(base).half()
        precision = PrecisionConfig(dtype="fp16", initial_loss_scale=1024.0, min_loss_scale=1.0,
                                    loss_scale_window=100, hysteresis=1)
        buffer, opt = build(model, ctx, zero1, precision)
        first = run_step(model, buffer, opt, rank_batches(rank, 0), 0.01, torch.float16)
        assert first.successful and first.loss_scale == 1024.0 and first.grad_norm > 0
        for piece in opt.pieces:
            assert piece.master.dtype == torch.float32 and piece.param.dtype == torch.float16
        before = [p.detach().clone() for p in model.parameters()]
        masters = [piece.master.clone() for piece in opt.pieces]
        opt.zero_grad()
        for j, batch in enumerate(rank_batches(rank, 1)):
            with (buffer.no_sync() if j < MICRO_BATCHES - 1 else torch.enable_grad()):
                opt.scale_loss(mse(model, [t.half() for t in batch]) / MICRO_BATCHES).backward()
        buffer.finish_grad_sync()
        if rank == 1:
            opt.pieces[-1].grad.view(-1)[0] = float("inf")
        result = opt.step()
        assert not result.successful and result.loss_scale == 1024.0 and opt.loss_scale == 512.0
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert all(torch.equal(piece.master, m) for piece, m in zip(opt.pieces, masters))
        scales.append(opt.loss_scale)

    # bf16 under ZeRO-1: fp32 master pieces, and the all-gathered bf16 params are their casts
    model = copy.deepcopy(base).to(torch.bfloat16)
    buffer, opt = build(model, ctx, zero1=True, precision=PrecisionConfig(dtype="bf16"))
    for step in range(2):
        assert run_step(model, buffer, opt, rank_batches(rank, step), lrs[step], torch.bfloat16).successful
    for piece in opt.pieces:
        assert piece.master.dtype == torch.float32
        assert torch.equal(piece.param.detach().reshape(-1)[piece.lo:piece.hi], piece.master.to(torch.bfloat16))
    return scales, [p.detach().float().tolist() for p in model.parameters()]


def test_dp2_and_zero1_match_single_process_adamw_with_clipping_and_fp16_overflow():
    (scales0, bf16_params0), (scales1, bf16_params1) = run_distributed(_dp2_worker, world_size=2)
    assert scales0 == scales1 == [512.0, 512.0]
    assert bf16_params0 == bf16_params1


def _nan_worker(rank, world_size):
    """A NaN in rank 1's local grads skips the step on both ranks in fp32 and bf16, plain and ZeRO-1."""
    ctx = ParallelContext.initialize(tp_size=1, pp_size=1)
    torch.manual_seed(0)
    base = TinyNet()
    # Reference for fp32: one process, torch AdamW with clipping on the global batch of steps 0 and 2
    # (the NaN step 1 never happens for it).
    reference = copy.deepcopy(base)
    ref_opt = reference_adamw(reference)
    for step in (0, 2):
        batches = rank_batches(0, step) + rank_batches(1, step)
        ref_opt.zero_grad()
        for batch in batches:
            (mse(reference, batch) / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), OPT.clip_grad)
        ref_opt.step()
    skipped_norms = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for zero1 in (False, True):
            precision = PrecisionConfig(dtype=name)
            model, twin = copy.deepcopy(base).to(dtype), copy.deepcopy(base).to(dtype)
            buffer, opt = build(model, ctx, zero1, precision)
            twin_buffer, twin_opt = build(twin, ctx, zero1, precision)   # never sees the NaN step
            for m, b, o in ((model, buffer, opt), (twin, twin_buffer, twin_opt)):
                assert run_step(m, b, o, rank_batches(rank, 0), OPT.lr, dtype).successful
            before = [p.detach().clone() for p in model.parameters()]
            state = opt.state_dict()
            opt.zero_grad()
            for j, batch in enumerate(rank_batches(rank, 1)):
                final = j == MICRO_BATCHES - 1
                if final and rank == 1:
                    # rank 1's local sum, before the DP reduce: element 0 of the buffer is fc2.weight[0, 0],
                    # in DP rank 0's shard under ZeRO-1, so there only rank 0 holds the NaN after the reduce.
                    buffer.buffer[0] = float("nan")
                with (buffer.no_sync() if not final else torch.enable_grad()):
                    mse(model, [t.to(dtype) for t in batch]).div(MICRO_BATCHES).backward()
            buffer.finish_grad_sync()
            holds_nan = any(bool(torch.isnan(piece.grad).any()) for piece in opt.pieces)
            assert holds_nan == (rank == 0 or not zero1), (name, zero1, rank, holds_nan)
            opt.set_lr(OPT.lr)
            result = opt.step()
            assert not result.successful and math.isnan(result.grad_norm) and result.loss_scale == 1.0
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), (name, zero1)
            assert_same_optimizer_state(opt.state_dict(), state)
            skipped_norms.append(result.grad_norm)
            results = [run_step(m, b, o, rank_batches(rank, 2), OPT.lr, dtype)
                       for m, b, o in ((model, buffer, opt), (twin, twin_buffer, twin_opt))]
            assert results[0] == results[1] and results[0].successful
            for (pname, p), q in zip(model.named_parameters(), twin.parameters()):
                assert torch.equal(p, q), (name, zero1, pname)
            if dtype == torch.float32:
                for (pname, p), r in zip(model.named_parameters(), reference.parameters()):
                    torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6,
                                               msg=f"zero1={zero1} {pname}")
    return len(skipped_norms)


def test_nan_grad_on_one_rank_skips_the_step_everywhere_in_fp32_and_bf16():
    assert run_distributed(_nan_worker, world_size=2) == [4, 4]


# ---------------------------------------------------------------------------- TP2 x DP2 grad norm counting
class ShardedNet(nn.Module):
    """Full model: loss = mean_rows ||(x * g) W^T||^2 + mean ((x[:, :3] R)^2).

    W [8, 4] is column-parallel (rows split over TP, ``tensor_model_parallel``); g [4] is a
    sequence-parallel-style replicated weight whose grad is partial on each TP rank; R [3, 3] is
    replicated with identical grads on every TP rank.
    """

    def __init__(self, w_full, g, r, tp_rank, tp_size):
        super().__init__()
        rows = w_full.shape[0] // tp_size
        self.w = nn.Parameter(w_full[tp_rank * rows:(tp_rank + 1) * rows].clone())
        self.w.tensor_model_parallel, self.w.partition_dim = True, 0
        self.g = nn.Parameter(g.clone())
        self.g.sequence_parallel = True
        self.r = nn.Parameter(r.clone())

    def forward(self, x):
        # this rank's share: its output columns, plus the replicated term counted once over TP
        # (the autograd of the replicated term is the same on every TP rank)
        y = (x * self.g) @ self.w.t()                                 # [n, 8 / tp]
        return (y ** 2).sum(-1).mean(), ((x[:, :3] @ self.r) ** 2).mean()


def tp_batch(seed):
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))


def _warmed_up_groups(tp_size, pp_size):
    """ParallelContext.initialize, recording the members of every group it all-reduces over."""
    warmed, real_all_reduce = [], dist.all_reduce

    def recording_all_reduce(tensor, *args, group=None, **kwargs):
        warmed.append(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        return real_all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = recording_all_reduce
    try:
        return ParallelContext.initialize(tp_size=tp_size, pp_size=pp_size), warmed
    finally:
        dist.all_reduce = real_all_reduce


def _tp2dp2_worker(rank, world_size):
    ctx, warmed = _warmed_up_groups(tp_size=2, pp_size=1)
    # Every group this rank belongs to has seen one collective over all its members before any use
    # (NCCL creates communicators on first use): TP, CP, DP, DP x CP, PP, model-parallel, world;
    # tp-cp-dp-pp grid order with CP 1.
    tp, dp = [2 * (rank // 2), 2 * (rank // 2) + 1], [rank % 2, rank % 2 + 2]
    assert warmed == [tp, [rank], dp, dp, [rank], tp, [0, 1, 2, 3]], warmed
    torch.manual_seed(0)
    w, g, r = torch.randn(8, 4) * 0.5, 1.0 + 0.1 * torch.randn(4), torch.randn(3, 3) * 0.5
    full = ShardedNet(w, g, r, 0, 1)
    ref_opt = reference_adamw(full)
    ref_norms = []
    for step in range(2):
        ref_opt.zero_grad()
        batches = [tp_batch(100 * step + 10 * d + j) for d in range(2) for j in range(2)]
        for x in batches:
            (sum(full(x)) / len(batches)).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(full.parameters(), OPT.clip_grad)))
        ref_opt.step()
    results = []
    for zero1 in (False, True):
        model = ShardedNet(w, g, r, ctx.tp_rank, 2)
        buffer, opt = build(model, ctx, zero1)
        for step in range(2):
            opt.zero_grad()
            for j in range(2):
                with (buffer.no_sync() if j == 0 else torch.enable_grad()):
                    sharded, replicated = model(tp_batch(100 * step + 10 * ctx.dp_rank + j))
                    ((sharded + replicated) / 2).backward()
            buffer.finish_grad_sync()
            opt.set_lr(OPT.lr)
            result = opt.step()
            assert abs(result.grad_norm - ref_norms[step]) <= 1e-5 * ref_norms[step], (zero1, result, ref_norms)
        rows = slice(4 * ctx.tp_rank, 4 * ctx.tp_rank + 4)
        torch.testing.assert_close(model.w.detach(), full.w.detach()[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.g.detach(), full.g.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.r.detach(), full.r.detach(), rtol=1e-5, atol=1e-6)
        results.append(result.grad_norm)
    return results


def test_tp2_dp2_grad_norm_counts_each_parameter_once():
    norms = run_distributed(_tp2dp2_worker, world_size=4)
    assert all(n == norms[0] for n in norms)
