"""Random transformers ``LlamaForCausalLM`` models for the comparison tests (import, export, LoRA, Q-LoRA)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import transformers


def random_llama(seed: int = 0, **llama_config) -> "transformers.LlamaForCausalLM":
    """A ``LlamaForCausalLM(LlamaConfig(**llama_config))`` in eval mode, drawn after ``torch.manual_seed(seed)``,
    every weight redrawn (norm weights N(1, 0.1), the rest N(0, 0.05), so that norms are not all ones)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.1 if param.dim() == 1 else 0.05)
    return model
