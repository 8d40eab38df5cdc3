"""Analytic parameter count and model FLOPs per iteration (docs/design.md section 6).

Notation: L layers, h hidden, n heads, g kv heads, d = h/n head dim, f ffn width, V vocabulary
(padded when given), s sequence length, B global batch (sequences per iteration).
"""
from __future__ import annotations

from megatron_aquila.config import ModelConfig


def num_parameters(config: ModelConfig, padded_vocab: int | None = None) -> int:
    """Parameters of the untied model: per layer qkv h(n+2g)d, dense n d h, SwiGLU 3hf and two
    norms 2h; plus embedding and output head V h each and the final norm h."""
    h, d = config.hidden_size, config.head_dim
    n, g, f = config.num_attention_heads, config.kv_heads, config.ffn_size
    vocab = config.vocab_size if padded_vocab is None else padded_vocab
    per_layer = h * (n + 2 * g) * d + n * d * h + 3 * h * f + 2 * h
    return config.num_layers * per_layer + 2 * vocab * h + h


def flops_per_iteration(config: ModelConfig, global_batch: int, padded_vocab: int,
                        adapter_parameters: int | None = None) -> float:
    """Model FLOPs of one training iteration (forward + backward = 3 x forward, matmuls only):

        F = 6 B s (L (h (2 d n + 2 d g) + 3 h f + s d n) + h V)

    The h(2dn + 2dg) term covers q, k, v and the attention output projection, 3hf the SwiGLU,
    s d n the causal attention scores and values (counted half), hV the output head. No
    recompute factor: this is the MFU numerator (Megatron-LM's current formula).

    With frozen weights and ``adapter_parameters`` LoRA parameters (``finetune.lora``), the weight
    matmuls W = L h (2dn + 2dg + 3f) + hV skip their weight-gradient matmul (forward 2, input
    gradient 2 per weight and token), attention keeps its factor 6 and the adapters train fully:

        F = B s (4 W + 6 L s d n + 6 adapter_parameters)
    """
    s, h, d = config.seq_length, config.hidden_size, config.head_dim
    n, g, f = config.num_attention_heads, config.kv_heads, config.ffn_size
    weights = config.num_layers * (h * (2 * d * n + 2 * d * g) + 3 * h * f) + h * padded_vocab
    attention = config.num_layers * s * d * n
    if adapter_parameters is None:
        return 6.0 * global_batch * s * (weights + attention)
    return float(global_batch * s * (4 * weights + 6 * attention + 6 * adapter_parameters))
