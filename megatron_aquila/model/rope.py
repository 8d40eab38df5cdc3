"""Rotary position embedding (RoPE, Su et al. 2021) and its context-extension scalings
(docs/design.md section 7).

Plain RoPE (``model.rope_scaling: none``): with head dim d and base b (``rope_base``), pair i < d/2
has inverse frequency theta_i = b^(-2i/d), and position p rotates it by the angle p * theta_i:
rotate-half pairs (x_i, x_{i+d/2}) (HF LLaMA/Aquila) or interleaved pairs (x_2i, x_2i+1) (Meta's
original layout, the Aquila2-7B "interleaved patch").

A scaling replaces theta_i by theta'_i, and yarn also multiplies cos and sin by an attention factor
m (so q.k by m^2). Notation: s = ``rope_scaling_factor`` (>= 1), L = ``rope_original_max_positions``
(the pretraining length), lambda_i = 2 pi / theta_i the wavelength of pair i in positions.

- linear (position interpolation, Chen et al. 2023): theta'_i = theta_i / s, the same as running
  position p at p / s.
- dynamic (dynamic NTK): for n positions, n' = max(n, L) and a new base
  b' = b * (s n' / L - (s - 1))^(d / (d - 2)); theta'_i = b'^(-2i/d). Plain RoPE while n <= L.
  n is max(position_ids) + 1 (the sequence length without position ids), read as transformers does.
  With position ids, n stays on the device: the angles are computed from it in every forward
  (fp64, [s, b, d/2]), so there is no host sync and no table per distinct n (packed batches have
  many); under context parallelism n is the maximum over the CP group (one all-reduce MAX).
- yarn (Peng et al. 2023): r(k) = d ln(L / (2 pi k)) / (2 ln b) is the pair that turns k times in L
  positions. lo = r(beta_fast), hi = r(beta_slow), floored / ceiled when ``rope_yarn_truncate``,
  then lo = max(lo, 0), hi = min(hi, d - 1) (d, not d/2: transformers' bound), hi += 0.001 if lo == hi.
  With the ramp g_i = clamp((i - lo) / (hi - lo), 0, 1):
  theta'_i = (1 - g_i) theta_i + g_i theta_i / s (fast pairs keep their frequency, slow ones are
  interpolated). m = ``rope_yarn_attention_factor`` if set, else mscale(s, mscale) /
  mscale(s, mscale_all_dim) if both are set, else mscale(s, 1), where mscale(s, k) = 1 + 0.1 k ln s
  for s > 1 and 1 otherwise.
- llama3 (Llama 3.1): with w_lo = L / ``low_freq_factor`` and w_hi = L / ``high_freq_factor``:
  theta'_i = theta_i when lambda_i < w_hi, theta_i / s when lambda_i > w_lo, otherwise
  (1 - g_i) theta_i / s + g_i theta_i with g_i = (L / lambda_i - low_freq_factor) /
  (high_freq_factor - low_freq_factor).

Each is what transformers' LlamaForCausalLM computes (``transformers.modeling_rope_utils``, 5.x)
for the same ``rope_parameters``; ``checkpoint/hf_mapping.py`` maps the keys. One difference, for
dynamic: transformers' frequency buffer only grows (a call after a longer one keeps the longer
one's frequencies until a call at or below L resets it); here each call uses its own n, which is
what transformers gives a fresh model or calls of increasing length. The frequencies and angles
are computed in fp64 and the tables stored in fp32 (transformers computes them in fp32).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_aquila.config import ROPE_SCALING_TYPES, ModelConfig


def _yarn_mscale(factor: float, k: float) -> float:
    return 1.0 + 0.1 * k * math.log(factor) if factor > 1 else 1.0


def _yarn(config: ModelConfig, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
    d, base, factor = config.head_dim, config.rope_base, config.rope_scaling_factor
    original = config.rope_original_max_positions

    def turning_pair(turns: float) -> float:  # r(k) of the module docstring
        return d * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = turning_pair(config.rope_yarn_beta_fast), turning_pair(config.rope_yarn_beta_slow)
    if config.rope_yarn_truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)  # [d/2]
    if config.rope_yarn_attention_factor is not None:
        attention = config.rope_yarn_attention_factor
    elif config.rope_yarn_mscale is not None and config.rope_yarn_mscale_all_dim is not None:
        attention = (_yarn_mscale(factor, config.rope_yarn_mscale)
                     / _yarn_mscale(factor, config.rope_yarn_mscale_all_dim))
    else:
        attention = _yarn_mscale(factor, 1.0)
    return (1 - ramp) * theta + ramp * theta / factor, attention


def _llama3(config: ModelConfig, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
    factor, original = config.rope_scaling_factor, config.rope_original_max_positions
    low, high = config.rope_llama3_low_freq_factor, config.rope_llama3_high_freq_factor
    wavelength = 2 * math.pi / theta  # [d/2]
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * theta / factor + smooth * theta
    scaled = torch.where(wavelength > original / low, theta / factor, blended)
    return torch.where(wavelength < original / high, theta, scaled), 1.0


def _dynamic_frequencies(config: ModelConfig, positions: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK's theta' [d/2] fp64 for n = ``positions`` (a one-element tensor, on any device)."""
    d, base, factor = config.head_dim, config.rope_base, config.rope_scaling_factor
    original = config.rope_original_max_positions
    scaled = positions.to(torch.float64).clamp(min=original)  # n' = max(n, L)
    scaled_base = base * (factor * scaled / original - (factor - 1)) ** (d / (d - 2))  # [1]
    return scaled_base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)


def rope_frequencies(config: ModelConfig, positions: int) -> tuple[torch.Tensor, float]:
    """(theta' [d/2] fp64, attention factor m) of ``config.rope_scaling`` (module docstring).

    ``positions`` is n, read only by dynamic.
    """
    d, base = config.head_dim, config.rope_base
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    kind, factor = config.rope_scaling, config.rope_scaling_factor
    if kind == "none":
        return theta, 1.0
    if kind == "linear":
        return theta / factor, 1.0
    if kind == "dynamic":
        return _dynamic_frequencies(config, torch.tensor([positions])), 1.0
    if kind == "yarn":
        return _yarn(config, theta)
    if kind == "llama3":
        return _llama3(config, theta)
    raise ValueError(f"model.rope_scaling {kind!r} must be one of {', '.join(ROPE_SCALING_TYPES)}")


class RotaryEmbedding:
    """cos/sin tables (times the attention factor m) of ``config``'s RoPE, fp32; the maths is in the
    module docstring.

    Tables are cached per (length, device): one per chunk length, never more (the model's lengths
    are fixed). Dynamic NTK with position ids is the exception: its frequencies depend on the batch,
    so its angles are computed on the device in every forward and nothing is cached.
    ``cp_group``: under context parallelism each rank sees only its chunks' position ids, so dynamic
    NTK's n is their maximum over the CP group (one all-reduce MAX per forward, dynamic only).
    """

    def __init__(self, config: ModelConfig, cp_group: "dist.ProcessGroup | None" = None):
        self.config = config
        self.cp_group = cp_group
        self.max_positions = config.seq_length
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, d/2] for positions 0..length-1 (dynamic: n = max(length, L))."""
        key = (length, device)
        if key not in self._cache:
            inv_freq, attention = rope_frequencies(self.config, length)
            angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # [length, d/2]
            self._cache[key] = ((angles.cos() * attention).float().to(device),
                                (angles.sin() * attention).float().to(device))
        return self._cache[key]

    def _dynamic_angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[s, b, d/2] fp64 angles of dynamic NTK for n = max(position_ids) + 1, on the device."""
        largest = position_ids.max().reshape(1)
        if self.cp_group is not None:
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.cp_group)
        inv_freq = _dynamic_frequencies(self.config, largest + 1)  # [d/2]
        return position_ids.t().to(torch.float64).unsqueeze(-1) * inv_freq  # [s, b, d/2]

    def __call__(self, seq_len: int, position_ids: torch.Tensor | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [s, 1, 1, d/2] (or [s, b, 1, d/2] for position_ids [b, s]), fp32."""
        if position_ids is None:
            cos, sin = self._tables(seq_len, device)
            return cos[:, None, None, :], sin[:, None, None, :]
        if self.config.rope_scaling == "dynamic":
            angles = self._dynamic_angles(position_ids)
            return angles.cos().float().unsqueeze(2), angles.sin().float().unsqueeze(2)
        cos, sin = self._tables(max(seq_len, self.max_positions), device)
        ids = position_ids.t()  # [s, b]
        return cos[ids].unsqueeze(2), sin[ids].unsqueeze(2)


def _halves(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


class _ApplyRotary(torch.autograd.Function):
    """y_a = x_a cos - x_b sin, y_b = x_b cos + x_a sin (fp32); the backward applies the transpose,
    cos and -sin (the inverse rotation, times m)."""

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        x_a, x_b = _halves(x, interleaved)
        out_a, out_b = _halves(out, interleaved)
        torch.mul(x_a, cos, out=out_a)
        out_a.addcmul_(x_b, sin, value=-1.0)
        torch.mul(x_b, cos, out=out_b)
        out_b.addcmul_(x_a, sin)
        return out

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _ApplyRotary._rotate(x.float(), cos, sin, interleaved).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _ApplyRotary._rotate(grad.float(), cos, -sin, ctx.interleaved).to(grad.dtype), None, None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [s, b, heads..., d] (any strides) by tables [s, 1|b, 1, d/2]; returns a contiguous tensor."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if torch.compiler.is_compiling():  # plain ops: the compiler fuses them and keeps only what backward needs
        x_a, x_b = _halves(x.float(), interleaved)
        y_a, y_b = x_a * cos - x_b * sin, x_b * cos + x_a * sin
        out = torch.stack((y_a, y_b), dim=-1).flatten(-2) if interleaved else torch.cat((y_a, y_b), dim=-1)
        return out.to(x.dtype)
    return _ApplyRotary.apply(x, cos, sin, interleaved)
