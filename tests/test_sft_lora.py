"""LoRA fine-tuning end to end: HF base -> from-hf -> packed SFT with LoRA under TP2 -> checkpoint ->
resume in another layout -> to-hf --merge-lora and to-peft, against transformers and peft.

- The checkpoint holds only the adapters (and their optimizer state) plus meta.json's reference to
  the base weights; resuming it in one process continues the TP2 run with the same losses.
- The merged HF export and the PEFT adapter on the base HF model give the logits of our trained
  LoRA model (fp32, 1e-4).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_aquila.checkpoint.manager import read_dcp_metadata
from megatron_aquila.data.tokenizer import train_tiny_bbpe
from test_sft_training import SEQ, write_conversations
from training import train_with

VOCAB = 304  # above a byte-level tokenizer's 256 + specials (the export reads bos/eos from it); a multiple of 16

LORA = "finetune.lora={rank: 4, alpha: 8.0, targets: [qkv, dense, gate_up, down]}"


def overrides(base: str, data: str, save: str, iterations: int) -> list[str]:
    return [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=96", f"model.seq_length={SEQ}", f"model.vocab_size={VOCAB}",
        "model.make_vocab_size_divisible_by=8", "training.micro_batch_size=2", "training.global_batch_size=4",
        f"training.train_iters={iterations}", "training.seed=3", "optimizer.lr=5e-2", "optimizer.min_lr=5e-2",
        "optimizer.lr_decay_style=constant", "data.sft=true", f"data.data_path=[{data}]", "data.split=100,0,0",
        "data.num_workers=0", "logging.peak_tflops=1.0", f"checkpoint.init_weights={base}", LORA,
        f"checkpoint.save={save}", "checkpoint.save_interval=2", f"checkpoint.load={save}",
    ]


def tp2_worker(rank: int, world_size: int, args: list[str]):
    state, _, _ = train_with(args + ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], world_size)
    return state.history


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A random HF model converted with from-hf, then 4 LoRA SFT iterations under TP2 x SP, saving at 2 and 4."""
    transformers = pytest.importorskip("transformers")
    from tools.convert_checkpoint import main as convert

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-5, tie_word_embeddings=False))
    hf.save_pretrained(root / "hf")
    assert convert(["from-hf", "--hf-dir", str(root / "hf"), "--output", str(root / "base"),
                    "--make-vocab-size-divisible-by", "8", "--tensor-parallel", "2"]) == 0
    train_tiny_bbpe(["a tiny corpus for a tiny tokenizer"] * 20, root / "tokenizer", vocab_size=300)
    write_conversations(root / "chat", np.random.RandomState(1).randint(4, 20, size=40).tolist(), seed=4)
    args = overrides(str(root / "base"), str(root / "chat"), str(root / "save"), 4)
    history = run_distributed(tp2_worker, 2, args=(args,))[0]
    return root, args, history


def test_checkpoint_holds_only_the_adapters_and_resumes_in_another_layout(lora_run, tmp_path):
    root, args, straight = lora_run
    metadata = read_dcp_metadata(root / "save" / "iter_0000004").state_dict_metadata
    model_keys = sorted(key for key in metadata if key.startswith("model."))
    assert model_keys and all(key.endswith((".lora_a", ".lora_b")) for key in model_keys), model_keys
    assert len(model_keys) == 2 * 4 * 2  # 2 layers x 4 targeted layers x (A, B)
    meta = json.loads((root / "save" / "iter_0000004" / "meta.json").read_text())
    assert meta["base_weights"] == str(root / "base")

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "latest").write_text("iter_0000002\n")
    (resumed_dir / "iter_0000002").symlink_to(root / "save" / "iter_0000002")
    state, _, _ = train_with([a.replace(str(root / "save"), str(resumed_dir)) for a in args]
                             + ["checkpoint.save=null", "checkpoint.save_interval=null"], 1)
    assert len(state.history) == 2
    assert state.history == pytest.approx(straight[2:], rel=1e-5, abs=0), (state.history, straight)


def test_merged_export_and_peft_adapter_give_our_logits(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tools.convert_checkpoint import main as convert

    root, args, _ = lora_run
    # loads iteration 4, with nothing left to train
    _, parts, _ = train_with(args + ["checkpoint.save=null", "checkpoint.save_interval=null"], 1)
    ours = parts.model_chunks[0].eval()
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = ours(ids, torch.arange(SEQ).expand(2, SEQ))[..., :VOCAB]

    assert convert(["to-hf", "--checkpoint", str(root / "save"), "--merge-lora", "--output", str(tmp_path / "merged"),
                    "--dtype", "fp32", "--tokenizer-dir", str(root / "tokenizer")]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert convert(["to-peft", "--checkpoint", str(root / "save"), "--output", str(tmp_path / "adapter")]) == 0
    base = transformers.LlamaForCausalLM.from_pretrained(root / "hf").eval()
    with torch.no_grad():
        lora_effect = (base(ids).logits - expected).abs().max().item()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # wraps base in place
    with torch.no_grad():
        for name, model in (("merged HF", merged), ("PEFT adapter", adapted)):
            difference = (model(ids).logits - expected).abs().max().item()
            assert difference < 1e-4, f"{name}: max |logits difference| {difference}"
    assert lora_effect > 1e-2, f"the adapters changed the logits by only {lora_effect}: the test could not tell"
    assert convert(["to-hf", "--checkpoint", str(root / "save"), "--output", str(tmp_path / "plain")]) == 1
