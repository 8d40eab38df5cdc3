"""Regional compilation (``model.compile``): every transformer block under ``torch.compile``, as torchtitan does.

Each ``TransformerBlock`` is compiled on its own (``nn.Module.compile``: parameter names, state dicts and
hooks are those of the eager module) with inductor; the embedding, the final norm, the output layer, the
loss, the pipeline sends and the data-parallel grad hooks stay eager. All blocks share their code and
dynamo guards on types and shapes, so the graphs compiled for the first layer serve every layer of a
chunk (a layer whose input needs no grad, the first one under LoRA, adds its own). The first
micro-batch compiles: seconds to tens of seconds on a CPU.

What the compiler sees in a block:

- Collectives (TP/SP ``parallel/mappings.py``, ``layers.py``; CP ``parallel/context_parallel.py``) live in
  ``torch.autograd.Function`` s. Dynamo traces such a function, forward and backward, when it can,
  turning its c10d calls into functional collectives on the same process group. Where it cannot, the
  call is a graph break: the function runs eagerly, with its own autograd node, between two compiled
  pieces of the block. Measured (torch 2.13, CPU, gloo): TP2 breaks at ``_ReduceFromTP`` (in-place
  ``mark_dirty``) and at the overlapped column-parallel backward (``async_op=True``, ``Work.wait``): 10
  compiled graphs in all; TP2 + SP breaks at every async collective (12 graphs); CP2 breaks in the chunk
  attention (SDPA's ``causal_lower_right`` bias, a tensor subclass built inside: 8 graphs). TP1 without
  CP compiles each block whole (1 graph, no break, also with recompute selective or full). The results equal eager either way
  (``tests/test_compile.py``).
- Rotary (``model/rope.py``) and SwiGLU (``model/transformer.py``) run as plain ops when compiled:
  their hand-written backward functions write into ``out=`` views, which dynamo refuses; inductor fuses
  the plain ops and its partitioner keeps only what the backward needs.
- Recompute: ``training.recompute`` checkpoints the same region as in eager mode. Full: the block's
  body (``_forward``) is what is compiled, and the eager ``torch.utils.checkpoint`` around it reruns the
  compiled body in backward. (Compiling the whole block would make the checkpoint a higher-order op, and
  one graph break inside it, a TP or CP collective, leaves the whole block eager.) Selective: the
  checkpoint of the attention core is traced as a higher-order op that AOTAutograd recomputes in the
  compiled backward; under CP the core holds a graph break, so it runs eagerly (checkpointed) between
  the compiled pieces. Without dropout (below) there is no RNG stream to replay.
- Dropout: refused (``check_compile_config``). Inductor draws its own random numbers (its Philox
  stream), not ``torch.native_dropout``'s from the tracker's swapped-in generator state
  (``parallel/random.py``), so the masks would differ from eager and across TP/recompute in ways the
  tracker does not control.
- LoRA (``model/lora.py``): the adapters are swapped in after the build and before the first call, so
  the traced block already holds them; LoRA dropout is refused like the model's. Q-LoRA's 4-bit
  bitsandbytes weights are refused: their custom ops were never traced here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from megatron_aquila.config import Config
from megatron_aquila.model.transformer import TransformerBlock


def inductor_problem(device_type: str) -> Optional[str]:
    """Why inductor cannot compile for ``device_type`` here, or None when it can: CPU code needs a C++
    compiler (inductor's search: ``$CXX`` or g++), CUDA code needs triton."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor's CUDA backend needs triton, which is not importable"
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return "inductor's CPU backend needs a C++ compiler ($CXX or g++), and none runs here"
    return None


def check_compile_config(config: Config, device_type: str) -> None:
    """Refuse ``model.compile=true`` where it cannot run or would change the numbers; call at config/build time."""
    if not config.model.compile:
        return
    rates = {"model.attention_dropout": config.model.attention_dropout,
             "model.hidden_dropout": config.model.hidden_dropout}
    if config.finetune.lora is not None:
        rates["finetune.lora.dropout"] = config.finetune.lora.dropout
    dropping = {key: rate for key, rate in rates.items() if rate > 0}
    if dropping:
        raise ValueError(f"model.compile=true runs without dropout, but {dropping}: compiled dropout would not draw "
                         "the RNG tracker's masks (model/compile.py); set them to 0 or set model.compile=false")
    if config.finetune.qlora is not None:
        raise ValueError("model.compile=true with finetune.qlora is not supported: the 4-bit bitsandbytes weights "
                         "(model/qlora.py) have not been traced or tested compiled; set model.compile=false")
    problem = inductor_problem(device_type)
    if problem is not None:
        raise RuntimeError(f"model.compile=true: {problem}; set model.compile=false, or install it "
                           "(a C++ compiler on CPU, triton on CUDA)")


def compile_model_chunks(config: Config, chunks: Sequence[nn.Module], device: torch.device) -> None:
    """With ``model.compile``: check it can run (``check_compile_config``), then compile each
    ``TransformerBlock`` of the chunks in place (module docstring); the rest stays eager."""
    if not config.model.compile:
        return
    check_compile_config(config, device.type)
    for chunk in chunks:
        for block in chunk.modules():
            if not isinstance(block, TransformerBlock):
                continue
            if block.full_recompute:  # the checkpoint stays eager around the compiled body (module docstring)
                block._forward = torch.compile(block._forward)
            else:
                block.compile()
