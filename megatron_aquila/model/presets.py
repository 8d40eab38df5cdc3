"""Model shapes by name. A recipe names one with ``model.preset`` and may override any field."""
from __future__ import annotations

from typing import Any

AQUILA_VOCAB_SIZE = 100008  # 100000 byte-level BPE entries + 8 special tokens (docs/design.md section 7)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Aquila2-7B: BAAI's released config and FlagScale's training script.
    "aquila2-7b": dict(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=32,
        ffn_multiple_of=256, ffn_multiplier=None, seq_length=2048, vocab_size=AQUILA_VOCAB_SIZE,
        make_vocab_size_divisible_by=128, norm_eps=1e-5, norm_init=1.0, rope_base=10000.0, init_std=0.02,
    ),
    # Aquila2-34B: GQA with 8 kv heads, ffn multiplier 1.3 rounded to a multiple of 4096.
    "aquila2-34b": dict(
        num_layers=60, hidden_size=6144, num_attention_heads=48, num_kv_heads=8,
        ffn_multiple_of=4096, ffn_multiplier=1.3, seq_length=4096, vocab_size=AQUILA_VOCAB_SIZE,
        make_vocab_size_divisible_by=64, norm_eps=1e-5, norm_init=0.3, rope_base=10000.0, init_std=0.0165,
    ),
    # CPU shapes for the demo, tests and benchmarks (vocab from the locally trained tiny tokenizer).
    "tiny": dict(
        num_layers=4, hidden_size=128, num_attention_heads=4, num_kv_heads=2,
        ffn_multiple_of=64, ffn_multiplier=None, seq_length=128, vocab_size=8192,
        make_vocab_size_divisible_by=64, norm_eps=1e-5, norm_init=1.0, rope_base=10000.0, init_std=0.02,
    ),
    "small-512": dict(
        num_layers=8, hidden_size=512, num_attention_heads=8, num_kv_heads=8,
        ffn_multiple_of=256, ffn_multiplier=None, seq_length=512, vocab_size=32000,
        make_vocab_size_divisible_by=128, norm_eps=1e-5, norm_init=1.0, rope_base=10000.0, init_std=0.02,
    ),
}
