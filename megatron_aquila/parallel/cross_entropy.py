"""Cross entropy over vocabulary-parallel logits, never gathering the full [tokens, V] logits.

Rank r holds logits z[:, r*V/p : (r+1)*V/p]. With t the target id of a token:

    m    = max_v z_v                          (all-reduce MAX of the local maxima)
    z_t  = sum_r (z_t if t is in r's range else 0)   (all-reduce SUM)
    S    = sum_r sum_{v local} exp(z_v - m)   (all-reduce SUM)
    loss = log S - (z_t - m)

Backward: dloss/dz_v = softmax_v - [v == t], computed on each rank's own shard only
(softmax_v = exp(z_v - m) / S is kept from the forward), scaled by the incoming grad.
Math is fp32 whatever the logits' dtype; the loss is fp32 per token.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_aquila.parallel.context import ProcessGroup, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        tp = group_size(group)
        local_vocab = logits.shape[-1]
        start = group_rank(group) * local_vocab
        logits32 = logits.float()  # [..., V/p]: a copy for fp16/bf16 logits, the logits themselves in fp32

        logits_max = logits32.amax(dim=-1)  # [...]
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        # One fp32 [..., V/p] buffer from here on (it becomes the saved softmax): the fp32 copy is
        # shifted in place; fp32 logits, which the caller owns, are not.
        if logits32 is logits:
            shifted = logits32 - logits_max.unsqueeze(-1)
        else:
            shifted = logits32.sub_(logits_max.unsqueeze(-1))

        outside = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill_(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill_(outside, 0.0)
        if tp > 1:
            dist.all_reduce(target_logit, group=group)

        exp = shifted.exp_()  # [..., V/p]
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            dist.all_reduce(sum_exp, group=group)
        loss = torch.log(sum_exp) - target_logit  # [...] fp32

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # reused in place: the saved softmax is needed only once
        inside = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``target``) of logits [..., V/p] split over ``group``.

    ``target`` holds global vocabulary ids ([...] int64). Padded vocabulary rows take part in
    the softmax like every other row (they are never targets).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits "
                         "must be target's shape plus a trailing local-vocabulary dim")
    return _VocabParallelCrossEntropy.apply(logits, target, group)
