"""Packed vs unpacked SFT on CPU: packing efficiency and training tokens/s.

Writes a conversation dataset in the format ``tools/preprocess_data.py --sft`` produces (lengths
drawn from a log-normal around ``--median-length`` tokens, capped at the sequence length, loss
mask on the second half of each conversation), then trains a small Aquila model one process for
``--steps`` steps on each layout:

- packed: ``data/sft_dataset.py`` (greedy packing, per-conversation attention);
- unpacked: one conversation per sequence, the rest padding (what training without packing does).

Printed per layout: sequences, the share of positions that hold a conversation token, the share
that carry loss (packing efficiency = loss tokens / total tokens), step time, tokens/s over all
positions and loss tokens/s (the useful rate).

    python benchmarks/bench_sft.py [--seq 512] [--median-length 120] [--conversations 2000]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megatron_aquila.config import ModelConfig
from megatron_aquila.data.indexed_dataset import IndexedDatasetBuilder
from megatron_aquila.data.sft_dataset import (
    SFT_LOSS_MASK_SUFFIX,
    SFT_TOKENS_SUFFIX,
    PackedSFTDataset,
    SFTConversations,
)
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext


def write_dataset(prefix: Path, args: argparse.Namespace) -> np.ndarray:
    rng = np.random.RandomState(0)
    lengths = np.clip(rng.lognormal(np.log(args.median_length), 0.7, args.conversations), 8, args.seq).astype(int)
    tokens = IndexedDatasetBuilder(str(prefix) + SFT_TOKENS_SUFFIX, np.uint16)
    masks = IndexedDatasetBuilder(str(prefix) + SFT_LOSS_MASK_SUFFIX, np.uint8)
    for length in lengths:
        tokens.add_document(rng.randint(1, 1000, size=length).astype(np.uint16))
        mask = np.zeros(length, dtype=np.uint8)
        mask[length // 2:] = 1
        masks.add_document(mask)
    tokens.finalize()
    masks.finalize()
    return lengths


class Unpacked(torch.utils.data.Dataset):
    """One conversation per sequence (padding after it), the same fields as the packed dataset."""

    def __init__(self, conversations: SFTConversations, seq: int):
        self.conversations, self.seq = conversations, seq

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, mask = self.conversations.get(index)
        n, s = len(ids), self.seq
        tokens, labels = torch.zeros(s, dtype=torch.int64), torch.zeros(s, dtype=torch.int64)
        loss_mask = torch.zeros(s)
        tokens[:n] = torch.from_numpy(ids.astype(np.int64))
        labels[:n - 1] = tokens[1:n]
        loss_mask[:n - 1] = torch.from_numpy(mask[1:].astype(np.float32))
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": torch.arange(s)}


def measure(name: str, dataset, document_attention: bool, args: argparse.Namespace) -> None:
    batches = [{key: torch.stack([dataset[i * args.micro_batch + j][key] for j in range(args.micro_batch)])
                for key in ("tokens", "labels", "loss_mask", "position_ids")} for i in range(args.steps + 1)]
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_kv_heads=4,
                         ffn_hidden_size=args.hidden * 3, vocab_size=1024, make_vocab_size_divisible_by=64,
                         seq_length=args.seq, kernels="torch")
    model = AquilaModel(config, ParallelContext.single_process(), document_attention=document_attention)
    times = []
    for index, batch in enumerate(batches):
        tick = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = (model(batch["tokens"], batch["position_ids"], batch["labels"]) * batch["loss_mask"]).sum()
        loss.backward()
        if index:  # the first step warms up
            times.append(time.perf_counter() - tick)
    step = statistics.median(times)
    positions = args.micro_batch * args.seq
    used = np.mean([float((dataset[i]["tokens"] != 0).sum()) for i in range(len(dataset))]) / args.seq  # ids >= 1
    loss_share = np.mean([float(dataset[i]["loss_mask"].sum()) for i in range(len(dataset))]) / args.seq
    print(f"{name:>9} {len(dataset):>9} {used:>9.1%} {loss_share:>10.1%} {step:>8.3f} "
          f"{positions / step:>9.0f} {positions * loss_share / step:>14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--median-length", type=int, default=120)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        prefix = Path(directory) / "chat"
        lengths = write_dataset(prefix, args)
        conversations = SFTConversations([str(prefix)], args.seq)
        packed = PackedSFTDataset(conversations, 0, len(conversations), args.seq, num_samples=None, seed=0)
        print(f"{args.conversations} conversations, median {int(np.median(lengths))} tokens, seq {args.seq}; model "
              f"{args.layers} layers x hidden {args.hidden}, micro batch {args.micro_batch}, fp32, one process")
        print(f"{'layout':>9} {'sequences':>9} {'tokens':>9} {'loss tok':>10} {'step s':>8} {'tokens/s':>9} "
              f"{'loss tokens/s':>14}")
        measure("unpacked", Unpacked(conversations, args.seq), False, args)
        measure("packed", packed, True, args)


if __name__ == "__main__":
    main()
