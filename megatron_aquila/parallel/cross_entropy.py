"""Cross entropy over vocabulary-parallel logits, never gathering the full [tokens, V] logits.

Rank r holds logits z[:, r*V_pad/p : (r+1)*V_pad/p] of the padded vocabulary: V_pad is the true
vocabulary V rounded up to a multiple of ``make_vocab_size_divisible_by`` x p, and the rows
v >= V are padding, held only by the last rank(s). Padded rows are no tokens: they are left out
of the softmax, so the loss is the cross entropy over the V real rows alone (what an HF model with
V rows computes). With t the target id of a token (t < V) and R_r the real rows rank r holds,
n_r = clamp(V - r*V_pad/p, 0, V_pad/p) of them:

    m    = max_r max_{v in R_r} z_v                    (all-reduce MAX; -inf from a rank with n_r = 0)
    z_t  = sum_r (z_t if t is in r's range else 0)     (all-reduce SUM)
    S    = sum_r sum_{v in R_r} exp(z_v - m)           (all-reduce SUM)
    loss = log S - (z_t - m)

The padded rows' shifted logits are set to -inf in the fp32 buffer, so exp makes them exactly 0
and they add nothing to S.

Backward: g dloss/dz_v = g (softmax_v - [v == t]) for the incoming grad g, computed on each rank's
own shard only: exp(z_v - m) and S are kept from the forward, and g softmax_v = exp(z_v - m) (g / S)
is one pass over the kept buffer, the target column then takes -g. A padded row's softmax is exactly
0 and it is never a target, so its grad, and the grad of its output-layer weights, is exactly 0: padded rows stay as they were. A target id >= V would get an infinite loss.
Math is fp32 whatever the logits' dtype; the loss is fp32 per token. Memory: one fp32
[..., V_pad/p] buffer (the fp32 copy of half-precision logits, shifted and masked in place; a new
one for fp32 logits, which belong to the caller), saved as exp(z - m) and reused in place for the grad.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_aquila.parallel.context import ProcessGroup, group_rank, group_size


def real_vocab_columns(vocab_size: int, local_vocab: int, rank: int) -> int:
    """n_r = clamp(V - r * V_pad/p, 0, V_pad/p): how many of rank r's first columns are real tokens;
    the rest of its ``local_vocab`` columns are vocabulary padding."""
    return min(max(vocab_size - rank * local_vocab, 0), local_vocab)


def _real_max(logits32: torch.Tensor, real: int) -> torch.Tensor:
    """max over the first ``real`` columns [..., V_pad/p] -> [...] (-inf when the rank holds none)."""
    if real == 0:
        return logits32.new_full(logits32.shape[:-1], float("-inf"))
    return logits32[..., :real].amax(dim=-1)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        tp = group_size(group)
        local_vocab = logits.shape[-1]
        start = group_rank(group) * local_vocab
        real = real_vocab_columns(vocab_size, local_vocab, group_rank(group))
        logits32 = logits.float()  # [..., V/p]: a copy for fp16/bf16 logits, the logits themselves in fp32

        logits_max = _real_max(logits32, real)  # [...]
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        # One fp32 [..., V/p] buffer from here on (it becomes the saved softmax): the fp32 copy is
        # shifted in place; fp32 logits, which the caller owns, are not.
        if logits32 is logits:
            shifted = logits32 - logits_max.unsqueeze(-1)
        else:
            shifted = logits32.sub_(logits_max.unsqueeze(-1))
        shifted[..., real:] = float("-inf")  # padded rows: exp gives exactly 0, out of S and the softmax

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

        ctx.save_for_backward(exp, sum_exp, local_target, outside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, local_target, outside = ctx.saved_tensors
        # g * (softmax - onehot) with softmax = exp / S: one pass over the buffer, which is reused in
        # place (the saved exp is needed only once), then the target column.
        scale = grad_loss / sum_exp  # [...]
        grad = exp.mul_(scale.unsqueeze(-1))
        target_grad = grad_loss.masked_fill(outside, 0.0).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -target_grad)
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup,
                                 vocab_size: int) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``target``) of logits [..., V_pad/p] split over ``group``.

    ``target`` holds global vocabulary ids ([...] int64) below ``vocab_size``, the true vocabulary V;
    the columns of ids >= V are vocabulary padding and are left out of the softmax (module docstring).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits "
                         "must be target's shape plus a trailing local-vocabulary dim")
    padded = logits.shape[-1] * group_size(group)
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {padded}], the padded vocabulary of "
                         f"{logits.shape[-1]} columns x tensor_parallel {group_size(group)}")
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size)
