"""Packed SFT training (data/sft_dataset.py, per-document attention) against transformers and one process.

The conversations are written straight to the two indexed datasets ``preprocess_data.py --sft``
produces (arithmetic progressions of token ids, loss masks on random "assistant" spans), so these tests check the
training side alone:

- packing by hand: greedy, no conversation split, labels shifted inside each conversation, the
  padding masked, position ids restarting per conversation;
- a packed micro-batch through our model gives the same per-token loss and the same gradients as
  running every conversation alone through transformers' LlamaForCausalLM with labels -100
  outside the loss mask (fp32, 1e-5): so attention never crosses a conversation boundary;
- training with data.sft through the real Trainer under TP2 x DP2 (SP, ZeRO-1), PP2, CP2 and
  CP2 x TP2 equals the single-process run: losses, grad norms, parameters.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_aquila.checkpoint.full_state import gather_full_state_dict, load_full_state_dict
from megatron_aquila.checkpoint.hf_mapping import full_to_hf, hf_to_full, model_config_from_hf
from megatron_aquila.config import ConfigError, load_config
from megatron_aquila.data.indexed_dataset import IndexedDatasetBuilder
from megatron_aquila.data.sft_dataset import (
    SFT_LOSS_MASK_SUFFIX,
    SFT_TOKENS_SUFFIX,
    PackedSFTDataset,
    SFTConversations,
    pack_greedily,
)
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.training_state import TrainerParts
from training import train_with

VOCAB, SEQ = 256, 32  # a multiple of 8: no padded vocabulary rows


def write_conversations(prefix: Path, lengths: list[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Conversations of the given lengths: arithmetic progressions (random start and stride, so a
    model can learn them), loss mask 1 on a random trailing "assistant" span."""
    rng = np.random.RandomState(seed)
    conversations = []
    tokens = IndexedDatasetBuilder(str(prefix) + SFT_TOKENS_SUFFIX, np.uint16)
    masks = IndexedDatasetBuilder(str(prefix) + SFT_LOSS_MASK_SUFFIX, np.uint8)
    for length in lengths:
        start, stride = rng.randint(1, VOCAB), rng.randint(1, 9)
        ids = ((start + stride * np.arange(length)) % (VOCAB - 1) + 1).astype(np.uint16)
        mask = np.zeros(length, dtype=np.uint8)
        mask[rng.randint(1, length):] = 1
        tokens.add_document(ids)
        masks.add_document(mask)
        conversations.append((ids.astype(np.int64), mask))
    tokens.finalize()
    masks.finalize()
    return conversations


def test_greedy_packing_by_hand(tmp_path):
    assert pack_greedily(np.array([5, 4, 3, 6, 2]), 10) == [0, 2, 4, 5]  # [5, 4], [3, 6], [2]
    conversations = write_conversations(tmp_path / "chat", [5, 4, 3, 6, 2])
    dataset = PackedSFTDataset(SFTConversations([str(tmp_path / "chat")], 10), 0, 5, 10, num_samples=3, seed=0)
    order = dataset.order[:5].tolist()
    packs = [order[a:b] for a, b in dataset.packs]
    assert sum(packs, []) == order and all(sum(len(conversations[i][0]) for i in p) <= 10 for p in packs)
    sample = dataset[0]
    at = 0
    for index in packs[0]:
        ids, mask = conversations[index]
        n = len(ids)
        assert sample["tokens"][at:at + n].tolist() == ids.tolist()
        assert sample["labels"][at:at + n - 1].tolist() == ids[1:].tolist()
        assert sample["loss_mask"][at:at + n].tolist() == mask[1:].tolist() + [0.0]
        assert sample["position_ids"][at:at + n].tolist() == list(range(n))
        at += n
    assert sample["loss_mask"][at:].sum() == 0 and sample["tokens"][at:].sum() == 0
    assert sample["position_ids"][at:].tolist() == list(range(10 - at))


def test_a_conversation_longer_than_the_sequence_is_refused(tmp_path):
    write_conversations(tmp_path / "long", [12])
    with pytest.raises(Exception, match=r"conversation of 12 tokens, longer than model.seq_length 10.*--seq-length 10"):
        SFTConversations([str(tmp_path / "long")], 10)


def test_packed_batch_equals_each_conversation_alone_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="eager"))
    config = model_config_from_hf(hf.config.to_dict(), make_vocab_size_divisible_by=8)
    config.seq_length, config.kernels = SEQ, "torch"
    ours = AquilaModel(config, ParallelContext.single_process(), document_attention=True)
    load_full_state_dict([ours], hf_to_full(hf.state_dict(), config, tp_size=1), ParallelContext.single_process())

    conversations = write_conversations(tmp_path / "chat", [9, 5, 12, 7, 3, 14, 6], seed=1)
    dataset = PackedSFTDataset(SFTConversations([str(tmp_path / "chat")], SEQ), 0, 7, SEQ, num_samples=2, seed=3)
    batch = {key: torch.stack([dataset[i][key] for i in range(2)]) for key in dataset[0]}
    token_loss = ours(batch["tokens"], batch["position_ids"], batch["labels"])  # [b, s]
    ours_loss = (token_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    ours_loss.backward()

    total_tokens = sum(int(mask[1:].sum()) for _, mask in conversations)
    assert batch["loss_mask"].sum() == total_tokens, "both packed sequences together hold every conversation"
    hf_loss = torch.zeros(())
    for ids, mask in conversations:
        labels = torch.tensor(ids).unsqueeze(0).clone()
        labels[0, torch.tensor(mask) == 0] = -100  # transformers shifts labels itself
        count = int(mask[1:].sum())
        if count:
            hf_loss = hf_loss + hf(torch.tensor(ids).unsqueeze(0), labels=labels).loss * count / total_tokens
    hf_loss.backward()
    assert abs(ours_loss.item() - hf_loss.item()) < 1e-5, (ours_loss.item(), hf_loss.item())
    our_grads = full_to_hf({name: p.grad for name, p in ours.named_parameters()}, config)
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    assert our_grads.keys() == hf_grads.keys()
    for name, grad in hf_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}\n{m}")


BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=96", f"model.seq_length={SEQ}", f"model.vocab_size={VOCAB}",
    "model.make_vocab_size_divisible_by=8", "training.micro_batch_size=2", "training.global_batch_size=8",
    "training.train_iters=5", "training.seed=7", "optimizer.lr=3e-3", "optimizer.min_lr=1e-3",
    "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5", "data.sft=true", "data.split=100,0,0",
    "data.num_workers=0", "logging.peak_tflops=1.0",
]


def train(data: str, overrides: list[str], world_size: int):
    grad_norms: list[float] = []

    def record_grad_norms(parts: TrainerParts, ctx: ParallelContext) -> None:
        step = parts.optimizer.step

        def recording_step():
            result = step()
            grad_norms.append(result.grad_norm)
            return result
        parts.optimizer.step = recording_step

    state, parts, ctx = train_with(BASE + [f"data.data_path=[{data}]"] + overrides, world_size,
                                   prepare=record_grad_norms)
    return state.history, grad_norms, gather_full_state_dict(parts.model_chunks, ctx)


def training_worker(rank: int, world_size: int, data: str, overrides: list[str]):
    result = train(data, overrides, world_size)
    return result if rank == 0 else None


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> str:
    prefix = tmp_path_factory.mktemp("sft") / "chat"
    lengths = np.random.RandomState(5).randint(3, 20, size=80).tolist()
    write_conversations(prefix, lengths, seed=2)
    return str(prefix)


@pytest.fixture(scope="module")
def reference(sft_data):
    torch.set_num_threads(1)
    return train(sft_data, [], 1)


LAYOUTS = {
    "tp2-dp2-sp-zero1": (4, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                             "parallel.distributed_optimizer=true"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
    "cp2-tp2": (4, ["parallel.context_parallel=2", "parallel.tensor_parallel=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sft_training_matches_single_process(layout, sft_data, reference):
    world_size, overrides = LAYOUTS[layout]
    history, norms, params = run_distributed(training_worker, world_size, args=(sft_data, overrides))[0]
    ref_history, ref_norms, ref_params = reference
    assert ref_history[-1] < ref_history[0], f"the reference run did not learn: {ref_history}"
    torch.testing.assert_close(torch.tensor(history), torch.tensor(ref_history), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{layout}: losses {history} vs {ref_history}\n{m}")
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{layout}: grad norms {norms} vs {ref_norms}\n{m}")
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{layout}: parameter {name} differs\n{m}")


def test_sft_defaults_to_per_token_and_refuses_blend_weights():
    assert load_config(None, ["data.sft=true"]).training.loss_average == "per_token"
    assert load_config(None, ["data.sft=true", "training.loss_average=per_microbatch"]
                       ).training.loss_average == "per_microbatch"
    config = load_config(None, BASE + ["data.data_path=[0.5, a, 0.5, b]", "training.train_iters=1"])
    with pytest.raises(ConfigError, match="without blend weights"):
        config.validate(1)
