"""Choice of attention and RMSNorm kernels. GPU libraries are imported lazily, only when chosen.

Attention: flash-attn (CUDA, fp16/bf16, package importable) > transformer-engine (CUDA,
importable) > torch ``scaled_dot_product_attention`` (everywhere; causal; GQA natively).
RMSNorm: apex ``fused_rms_norm_affine`` (CUDA, importable) > transformer-engine ``RMSNorm``
(CUDA, importable) > torch (``_TorchRMSNorm``: fp32 statistics, saves the input in its own dtype).

Attention kernels share one signature: (q [sq, b, n, d], k and v [sk, b, g, d] (any strides with a
unit last stride; n a multiple of g, query head i uses kv head i // (n/g); sq <= sk), training,
segments) -> [sq, b, n*d]. The causal mask is aligned to the bottom right: query row i sees keys
j <= i + sk - sq (plain causal attention when sq == sk; the chunk-against-prefix attention of context
parallelism, ``parallel/context_parallel.py``, when sq < sk). ``segments``, when given, is a
``DocumentMask`` (``model/packed_attention.py``): query i also needs the same document as key j (packed
SFT sequences, docs/design.md section 12). Per-document attention has kernels of its own, chosen by
``packed_attention_path``: flash-attn's varlen kernel ("flash-attn-varlen", CUDA fp16/bf16), FlexAttention
with a block-sparse mask ("flex-attention", CUDA), or torch SDPA with the dense block-diagonal causal mask
("torch-sdpa": the CPU path; built once per micro-batch and shared by every layer). ``choose_kernels`` keeps
flash-attn's dense kernel and transformer-engine out when documents are masked.
The dropout rate is fixed when a kernel is built; ``training`` (the calling module's flag) decides at
every call whether it applies, so ``model.eval()`` switches attention dropout off on every backend.
RMSNorm kernels: (x [..., h], weight [h], eps) -> [..., h] in x's dtype.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_aquila.model.packed_attention import (AttentionFn, Segments, flash_varlen_attention,
                                                    flash_varlen_available, flex_available, flex_document_attention,
                                                    packed_attention_path, require_flash_attn)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout through ``torch.native_dropout``, the op CUDA's ``F.dropout`` runs: it keeps a
    boolean mask for backward on every device (the CPU's ``F.dropout`` keeps a mask in x's dtype instead), so
    a CPU run and the dry run hold what a GPU run holds. Same random draws and values as ``F.dropout``."""
    return torch.native_dropout(x, p, True)[0]


SdpaFn = Callable[..., torch.Tensor]  # torch.nn.functional.scaled_dot_product_attention's signature
NormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class KernelChoice:
    """Names of the chosen kernels: attention in {flash-attn, transformer-engine, torch-sdpa} (per-document
    attention: {flash-attn-varlen, flex-attention, torch-sdpa}), norm in {apex, transformer-engine, torch}."""

    attention: str
    norm: str

    def describe(self) -> str:
        return f"attention kernel: {self.attention}; rmsnorm kernel: {self.norm}"


def flash_attention_applies(dtype: torch.dtype) -> bool:
    """Whether a flash kernel can run this model's attention: fp16/bf16 (per-document attention runs on
    flash-attn's varlen kernel). The kernel choice here, the dry run and the planner share it."""
    return dtype in (torch.float16, torch.bfloat16)


# packed_attention_path's answer -> the attention kernel that runs it
PACKED_KERNELS = {"varlen": "flash-attn-varlen", "flex": "flex-attention", "dense": "torch-sdpa"}


def _packed_kernel(device: torch.device | str, dtype: torch.dtype, flash_varlen: bool,
                   attention_dropout: float) -> str:
    """The per-document attention kernel on ``device``: ``packed_attention_path`` with FlexAttention looked up."""
    cuda = torch.device(device).type == "cuda"
    return PACKED_KERNELS[packed_attention_path(device, dtype, flash_varlen, cuda and flex_available(),
                                                attention_dropout)]


def select_kernels(device: torch.device | str, dtype: torch.dtype, context_parallel: bool = False,
                   document_attention: bool = False, attention_dropout: float = 0.0) -> KernelChoice:
    """The fastest available kernels for parameters of ``dtype`` on ``device``; under context
    parallelism the attention kernel must take a bottom-right causal mask (not our TE wrapper), and
    per-document attention runs on the kernel ``packed_attention_path`` picks."""
    cuda = torch.device(device).type == "cuda"
    if document_attention:
        flash_varlen = cuda and _importable("flash_attn") and flash_varlen_available()
        attention = _packed_kernel(device, dtype, flash_varlen, attention_dropout)
    elif cuda and flash_attention_applies(dtype) and _importable("flash_attn"):
        attention = "flash-attn"
    elif cuda and _importable("transformer_engine") and not context_parallel:
        attention = "transformer-engine"
    else:
        attention = "torch-sdpa"
    if cuda and _importable("apex"):
        norm = "apex"
    elif cuda and _importable("transformer_engine"):
        norm = "transformer-engine"
    else:
        norm = "torch"
    return KernelChoice(attention=attention, norm=norm)


KERNEL_BACKENDS = ("auto", "torch", "flash-attn", "transformer-engine", "apex")
_BACKEND_MODULES = {"flash-attn": "flash_attn", "transformer-engine": "transformer_engine", "apex": "apex"}
# What a named backend provides; the rest comes from torch.
_BACKEND_KERNELS = {
    "torch": KernelChoice(attention="torch-sdpa", norm="torch"),
    "flash-attn": KernelChoice(attention="flash-attn", norm="torch"),
    "transformer-engine": KernelChoice(attention="transformer-engine", norm="transformer-engine"),
    "apex": KernelChoice(attention="torch-sdpa", norm="apex"),
}


def choose_kernels(backend: str, device: torch.device | str, dtype: torch.dtype,
                   context_parallel: bool = False, document_attention: bool = False,
                   attention_dropout: float = 0.0) -> KernelChoice:
    """The one switch (``model.kernels``): ``auto`` picks the fastest available, a name forces it
    (per-document attention: flash-attn forces its varlen kernel, torch and apex take torch's choice).

    A forced GPU backend that cannot run here (no CUDA, package missing, flash-attn in fp32,
    transformer-engine attention under context parallelism) is an error rather than a silent
    fallback, so a cluster run never trains on the wrong kernels.
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"model.kernels {backend!r} must be one of {KERNEL_BACKENDS}")
    if backend == "transformer-engine" and context_parallel:
        raise ValueError("model.kernels=transformer-engine: its attention wrapper here runs square causal attention "
                         "only, and context parallelism needs a bottom-right causal mask; use auto (flash-attn or "
                         "torch SDPA) or flash-attn with parallel.context_parallel > 1")
    if document_attention and backend == "transformer-engine":
        raise ValueError("model.kernels=transformer-engine: per-document attention (data.sft packed sequences) runs "
                         "on flash-attn's varlen kernel, FlexAttention or torch SDPA here (the THD kernels are not "
                         "wired in): use auto, flash-attn or torch")
    if backend == "auto":
        return select_kernels(device, dtype, context_parallel, document_attention, attention_dropout)
    if backend != "torch":
        module = _BACKEND_MODULES[backend]
        if torch.device(device).type != "cuda" or not _importable(module):
            raise ValueError(f"model.kernels={backend} needs a CUDA device and the {module} package; this process "
                             f"has device {torch.device(device)} and {module} "
                             f"{'importable' if _importable(module) else 'not installed'}: use auto or torch")
        if backend == "flash-attn" and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"model.kernels=flash-attn needs fp16 or bf16 parameters, not {dtype}: "
                             "set precision.dtype or use auto")
    if not document_attention:
        return _BACKEND_KERNELS[backend]
    if backend == "flash-attn":
        if not flash_varlen_available():
            import flash_attn  # GPU only; importable here (checked above)

            raise ValueError(f"model.kernels=flash-attn: per-document attention (data.sft) needs "
                             f"flash_attn.flash_attn_varlen_func, which the installed flash-attn "
                             f"{getattr(flash_attn, '__version__', 'unknown')} lacks: upgrade flash-attn >= 2.1, "
                             "or set model.kernels: torch")
        return KernelChoice(attention="flash-attn-varlen", norm="torch")
    return KernelChoice(attention=_packed_kernel(device, dtype, False, attention_dropout),
                        norm=_BACKEND_KERNELS[backend].norm)


def _torch_sdpa(dropout_p: float, on_cuda: Optional[bool] = None,
                sdpa: SdpaFn = F.scaled_dot_product_attention) -> AttentionFn:
    """torch SDPA. ``on_cuda`` None: decide CUDA's layout from the tensors; the dry run sets it (and
    passes a stand-in ``sdpa`` with CUDA's kernel choice) to run CUDA's code path on fake CPU tensors."""
    from torch.nn.attention.bias import causal_lower_right

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool,
               segments: Segments = None) -> torch.Tensor:
        s, b, n, d = q.shape
        cuda = q.is_cuda if on_cuda is None else on_cuda
        gqa = k.shape[2] != n
        if segments is not None:
            # Causal (bottom-right) within documents. On CUDA an additive mask in the model dtype, the
            # form the fused kernel uses: SDPA would otherwise convert the boolean mask in every layer.
            mask = dict(attn_mask=segments.dense(q.dtype if cuda else None))  # [b, 1, sq, sk]
        elif k.shape[0] == s:  # square: is_causal
            mask = dict(is_causal=True)
        else:  # queries of a suffix of the keys: the lower-right causal bias (flash on GPU, GQA native)
            mask = dict(attn_mask=causal_lower_right(s, k.shape[0]))
        # [s, b, heads, d] -> [b, heads, s, d] as strided views; the output keeps q's memory order.
        keys, values = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, g, sk, d]
        if gqa and segments is not None and cuda:
            # CUDA's fused kernel for a mask tensor (memory-efficient attention) takes no GQA: without
            # this copy of K and V per query head SDPA would fall back to its math path and keep the
            # [b, n, sq, sk] probabilities. Query head i reads kv head i // (n/g), as enable_gqa does.
            keys, values = (x.repeat_interleave(n // k.shape[2], dim=1) for x in (keys, values))  # [b, n, sk, d]
            gqa = False
        if not cuda and k._base is None and v._base is None:
            # CPU's flash kernel reads K and V per (batch, head) along the sequence: strided views of
            # [s, b, g, d] cost it ~20% of its time at s = 512 (benchmarks/bench_vs_hf.py). The copies
            # replace the saved K and V one for one, as nothing else holds the originals; views (a
            # context-parallel chunk's key prefix of the gathered K and V, which stay saved) are not
            # copied. Q stays a view, so the output (which keeps Q's memory order) reshapes to
            # [s, b, n*d] without a copy.
            keys, values = keys.contiguous(), values.contiguous()  # [b, g, sk, d] contiguous
        out = sdpa(q.permute(1, 2, 0, 3), keys, values, dropout_p=dropout_p if training else 0.0,
                   enable_gqa=gqa, **mask)
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)  # [s, b, n*d]
    return attend


def _flash_attn(dropout_p: float, kernel: Optional[Callable[..., torch.Tensor]] = None,
                version: Optional[str] = None) -> AttentionFn:
    """flash-attn's ``flash_attn_func`` (imported here, GPU only), or ``kernel`` of its ``version`` (the dry
    run's stand-in with the CUDA kernel's memory)."""
    if kernel is None:
        import flash_attn  # GPU only, imported when chosen
        from flash_attn import flash_attn_func as kernel

        version = str(getattr(flash_attn, "__version__", "unknown"))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool,
               segments: Segments = None) -> torch.Tensor:
        assert segments is None, "choose_kernels keeps flash-attn out of per-document attention"
        s, b, n, d = q.shape
        if s < k.shape[0]:  # causal=True is aligned to the bottom right when sq < sk only from flash-attn 2.1 on
            require_flash_attn(version, (2, 1), f"attention of {s} queries to {k.shape[0]} keys (context "
                                                 "parallelism: a causal mask aligned to the bottom right)")
        # Deterministic backward (no atomic adds of dQ) when torch is asked for deterministic algorithms.
        # False is flash_attn_func's default, and older versions lack the keyword: pass it only when set.
        deterministic = torch.are_deterministic_algorithms_enabled()
        if deterministic:
            require_flash_attn(version, (2, 4, 1), "a deterministic backward (torch.use_deterministic_algorithms)")
        out = kernel(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                     dropout_p=dropout_p if training else 0.0, causal=True,
                     **({"deterministic": True} if deterministic else {}))  # [b, s, n, d], GQA native
        return out.transpose(0, 1).reshape(s, b, n * d)
    return attend


def _transformer_engine(num_heads: int, num_kv_heads: int, head_dim: int, dropout_p: float) -> AttentionFn:
    import transformer_engine.pytorch as te  # GPU only, imported when chosen

    # Kept out of the module tree on purpose: its extra state must not enter our state_dict. So
    # model.eval() does not reach it; its backends drop out only in training mode, set at each call.
    core = te.DotProductAttention(num_heads, head_dim, num_gqa_groups=num_kv_heads, attention_dropout=dropout_p,
                                  qkv_format="sbhd", attn_mask_type="causal")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool,
               segments: Segments = None) -> torch.Tensor:
        assert segments is None, "choose_kernels keeps transformer-engine out of per-document attention"
        assert q.shape[0] == k.shape[0], (f"the transformer-engine kernel runs square causal attention only "
                                          f"(sq {q.shape[0]} != sk {k.shape[0]}); choose_kernels refuses it under CP")
        core.train(training)
        return core(q, k, v)  # [s, b, n*d]
    return attend


def build_attention(name: str, num_heads: int, num_kv_heads: int, head_dim: int, dropout_p: float) -> AttentionFn:
    """The attention kernel ``name`` for this rank's ``num_heads`` query and ``num_kv_heads`` kv heads,
    dropping attention probabilities with rate ``dropout_p`` in the calls made with ``training=True``."""
    if name == "torch-sdpa":
        return _torch_sdpa(dropout_p)
    if name == "flash-attn":
        return _flash_attn(dropout_p)
    if name == "transformer-engine":
        return _transformer_engine(num_heads, num_kv_heads, head_dim, dropout_p)
    if name == "flash-attn-varlen":
        return flash_varlen_attention(dropout_p)
    if name == "flex-attention":
        return flex_document_attention(dropout_p)
    raise ValueError(f"unknown attention kernel {name!r}; choose torch-sdpa, flash-attn, transformer-engine, "
                     "flash-attn-varlen or flex-attention")


class _TorchRMSNorm(torch.autograd.Function):
    """y = x_hat * w with x_hat = x * r, r = 1 / sqrt(mean(x^2) + eps) over the last dim (h).

    Forward in fp32: r [..., 1] and x_hat are fp32, x_hat is rounded to x's dtype before the
    product with w (in x's dtype), as ``F.rms_norm(x.float()).to(dtype) * w`` does.
    Backward, with g = dL/dy and gw = g * w (fp32):
        dw = sum over rows of g * x_hat,   dx = r * (gw - x_hat * mean(gw * x_hat)).
    Saved for backward: x in its own dtype, w and r [..., 1] fp32; x_hat is recomputed (apex's
    ``fused_rms_norm_affine`` saves the same), instead of an fp32 copy of x plus x_hat.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))  # [..., 1] fp32
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).to(x.dtype) * weight  # [..., h]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd  # x_hat [..., h] fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0)  # [h]
        grad_normed = (grad * weight).to(rstd.dtype)  # gw
        mean = (grad_normed * normed).mean(-1, keepdim=True)  # [..., 1]
        grad_input = grad_normed.sub_(normed.mul_(mean)).mul_(rstd).to(x.dtype)
        return grad_input, grad_weight, None


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _TorchRMSNorm.apply(x, weight, eps)


def _apex_rms_norm() -> NormFn:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # GPU only

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return fused_rms_norm_affine(x, weight, weight.shape, eps)
    return norm


def _te_rms_norm() -> NormFn:
    import transformer_engine.pytorch as te  # GPU only

    modules: dict[tuple, torch.nn.Module] = {}

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        key = (weight.shape[0], eps, weight.dtype, weight.device)
        if key not in modules:
            modules[key] = te.RMSNorm(weight.shape[0], eps=eps, params_dtype=weight.dtype, device=weight.device)
        module = modules[key]
        module._parameters["weight"] = weight  # run TE's kernel on our own parameter
        return module(x)
    return norm


def build_rms_norm(name: str) -> NormFn:
    """The RMSNorm kernel ``name``."""
    if name == "torch":
        return _torch_rms_norm
    if name == "apex":
        return _apex_rms_norm()
    if name == "transformer-engine":
        return _te_rms_norm()
    raise ValueError(f"unknown rmsnorm kernel {name!r}; choose torch, apex or transformer-engine")
