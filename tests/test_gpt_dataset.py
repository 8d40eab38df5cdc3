"""GPTDataset against a pure-Python reimplementation of Megatron-LM's sample stream."""
import os
import pickle

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_aquila.data import gpt_dataset
from megatron_aquila.data.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    build_gpt_datasets,
    parse_split,
    split_document_ranges,
)
from megatron_aquila.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def make_corpus(path_prefix, seed, num_docs=40, max_len=60):
    """Random documents (1..max_len tokens, a few much longer) written with the real builder."""
    rng = np.random.default_rng(seed)
    documents = []
    with IndexedDatasetBuilder(str(path_prefix), np.uint16) as builder:
        for _ in range(num_docs):
            length = int(rng.integers(1, max_len)) if rng.random() > 0.1 else int(rng.integers(100, 300))
            tokens = rng.integers(1, 60000, size=length).astype(np.uint16)
            builder.add_document(tokens)
            documents.append(tokens.astype(np.int64))
    return IndexedDataset(str(path_prefix)), documents


def reference_samples(documents, document_ids, num_samples, seq_length, seed):
    """Megatron-LM core's GPTDataset sample stream, written from its definition with a flat token stream."""
    tokens_per_epoch = sum(len(documents[d]) for d in document_ids)
    num_epochs, tokens = 1, tokens_per_epoch
    while tokens < num_samples * seq_length + 1:
        num_epochs += 1
        tokens += tokens_per_epoch
    separate = False
    if num_epochs > 1:
        before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - before_final < int(0.8 * per_epoch)
    random_state = np.random.RandomState(seed)

    def shuffled_documents(epochs):
        grid = np.mgrid[0:epochs, 0:len(document_ids)][1]
        grid[:] = document_ids
        order = grid.reshape(-1).astype(np.int32)
        random_state.shuffle(order)
        return order

    if separate:
        order = np.concatenate([shuffled_documents(num_epochs - 1), shuffled_documents(1)])
    else:
        order = shuffled_documents(num_epochs)
    stream = np.concatenate([documents[d] for d in order])
    count = (len(stream) - 1) // seq_length
    samples = [stream[k * seq_length:k * seq_length + seq_length + 1] for k in range(count)]
    first = before_final if separate else count
    shuffle_first = np.arange(first, dtype=np.uint32)
    random_state.shuffle(shuffle_first)
    shuffle = shuffle_first
    if separate:
        shuffle_last = np.arange(first, count, dtype=np.uint32)
        random_state.shuffle(shuffle_last)
        shuffle = np.concatenate([shuffle_first, shuffle_last])
    return [samples[i] for i in shuffle], separate, num_epochs


@pytest.mark.parametrize("seed,seq_length,num_samples", [(0, 16, 10), (1, 32, 200), (2, 7, 1000), (3, 64, 51)])
def test_samples_match_reference(tmp_path, seed, seq_length, num_samples):
    indexed, documents = make_corpus(tmp_path / "corpus", seed)
    config = GPTDatasetConfig(seq_length=seq_length, seed=1234 + seed)
    document_ids = np.arange(3, 35, dtype=np.int32)
    dataset = GPTDataset(indexed, document_ids, num_samples, "train", config)
    expected, _, _ = reference_samples(documents, document_ids, num_samples, seq_length, 1234 + seed)
    assert len(dataset) == len(expected) >= num_samples
    for i, text in enumerate(expected):
        sample = dataset[i]
        torch.testing.assert_close(sample["tokens"], torch.from_numpy(text[:-1]), rtol=0, atol=0)
        torch.testing.assert_close(sample["labels"], torch.from_numpy(text[1:]), rtol=0, atol=0)
        assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
        assert sample["loss_mask"].dtype == torch.float32 and bool(torch.all(sample["loss_mask"] == 1))
        torch.testing.assert_close(sample["position_ids"], torch.arange(seq_length))


def test_a_sample_names_the_documents_it_reads(tmp_path):
    """sample_documents (what a skipped step's warning names): the listed documents' tokens, joined,
    hold the sample's text at the offset where it starts, and the sample reaches the last of them."""
    indexed, documents = make_corpus(tmp_path / "corpus", 5)
    dataset = GPTDataset(indexed, np.arange(3, 35, dtype=np.int32), 200, "train", GPTDatasetConfig(seq_length=32, seed=9))
    for index in range(len(dataset)):
        [(prefix, ids)] = dataset.sample_documents(index)
        assert prefix == str(tmp_path / "corpus") and all(3 <= d < 35 for d in ids), (index, ids)
        joined, text = np.concatenate([documents[d] for d in ids]), dataset.sample_text(index)[0]
        offset = int(dataset.sample_index[int(dataset.shuffle_index[index])][1])  # into the first document
        np.testing.assert_array_equal(joined[offset:offset + len(text)], text)
        assert len(ids) == 1 or offset + len(text) > len(joined) - len(documents[ids[-1]]), (index, ids)


def test_sample_sources_name_documents_or_fall_back_to_the_index(tmp_path):
    from megatron_aquila.data.loader import MockGPTDataset, sample_sources

    indexed, _ = make_corpus(tmp_path / "corpus", 6)
    dataset = GPTDataset(indexed, np.arange(0, 40, dtype=np.int32), 20, "train", GPTDatasetConfig(seq_length=16, seed=3))
    [(prefix, ids)] = dataset.sample_documents(7)
    assert sample_sources(dataset)(7) == f"sample 7 ({prefix} documents {', '.join(map(str, ids))})"
    assert sample_sources(MockGPTDataset(10, 16, 100, 0))(7) == "sample 7"


def test_separate_final_epoch(tmp_path):
    indexed, documents = make_corpus(tmp_path / "corpus", 5)
    seq_length = 8
    tokens_per_epoch = int(indexed.sequence_lengths.sum())
    per_epoch = (tokens_per_epoch - 1) // seq_length
    document_ids = np.arange(len(indexed), dtype=np.int32)
    for extra_samples, separate_expected in [(per_epoch // 10, True), (int(0.9 * per_epoch), False)]:
        num_samples = 2 * per_epoch + extra_samples
        expected, separate, num_epochs = reference_samples(documents, document_ids, num_samples, seq_length, 7)
        assert (separate, num_epochs) == (separate_expected, 3)
        config = GPTDatasetConfig(seq_length=seq_length, seed=7)
        dataset = GPTDataset(indexed, document_ids, num_samples, "train", config)
        assert len(dataset) == len(expected)
        for i in range(0, len(expected), 5):
            np.testing.assert_array_equal(dataset[i]["tokens"].numpy(), expected[i][:-1])
        if separate:
            # The first two epochs hold every document exactly twice, the last one once.
            first = np.sort(np.asarray(dataset.document_index[:2 * len(indexed)]))
            np.testing.assert_array_equal(first, np.repeat(document_ids, 2))
            # Samples of the last epoch are shuffled among themselves only, after the others.
            before_final = (2 * tokens_per_epoch - 1) // seq_length
            assert int(np.max(dataset.shuffle_index[:before_final])) == before_final - 1


def test_cache_is_reused_and_keyed_by_every_parameter(tmp_path, monkeypatch):
    indexed, _ = make_corpus(tmp_path / "corpus", 11)
    cache = tmp_path / "cache"
    config = GPTDatasetConfig(seq_length=16, seed=3, cache_dir=str(cache))
    ids = np.arange(0, 30, dtype=np.int32)
    first = GPTDataset(indexed, ids, 120, "train", config)
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(name.startswith(first.cache.hash) for name in files)
    assert not any(".tmp" in name for name in files)

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(gpt_dataset, "build_sample_index", must_not_build)
    second = GPTDataset(indexed, ids, 120, "train", config)
    assert isinstance(second.sample_index, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    monkeypatch.undo()
    # DataLoader workers get a copy that re-maps the cache files.
    copy = pickle.loads(pickle.dumps(second))
    assert isinstance(copy.shuffle_index, np.memmap)
    torch.testing.assert_close(copy[5], second[5], rtol=0, atol=0)

    hashes = {first.cache.hash}
    variants = [
        (GPTDatasetConfig(seq_length=17, seed=3, cache_dir=str(cache)), ids, 120, "train"),
        (GPTDatasetConfig(seq_length=16, seed=4, cache_dir=str(cache)), ids, 120, "train"),
        (config, ids, 121, "train"),
        (config, np.arange(0, 31, dtype=np.int32), 120, "train"),
        (config, ids, 120, "test"),
        (GPTDatasetConfig(seq_length=16, seed=3, cache_dir=str(cache), add_extra_token_to_sequence=False),
         ids, 120, "train"),
    ]
    for variant_config, variant_ids, num_samples, split in variants:
        hashes.add(GPTDataset(indexed, variant_ids, num_samples, split, variant_config).cache.hash)
    assert len(hashes) == len(variants) + 1


def test_parse_split_and_ranges_are_disjoint_and_covering():
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    for split, num_documents in [("949,50,1", 1000), ("98,2,0", 37), ("1,1,1", 10), ("3,0,7", 101)]:
        ranges = split_document_ranges(split, num_documents)
        covered = np.concatenate([np.arange(*r) for r in ranges if r is not None])
        np.testing.assert_array_equal(covered, np.arange(num_documents))
    assert split_document_ranges("98,2,0", 37)[2] is None
    assert split_document_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    for bad in ["", "a,b", "1,2,3,4", "-1,2", "0,0,0"]:
        with pytest.raises(ValueError, match="split"):
            parse_split(bad)


def test_build_gpt_datasets_splits(tmp_path):
    indexed, documents = make_corpus(tmp_path / "corpus", 13, num_docs=60)
    config = GPTDatasetConfig(seq_length=8, seed=5, split="8,1,1")
    train, valid, test = build_gpt_datasets(indexed, [100, 10, None], config)
    seen = [set(np.unique(np.asarray(d.document_index)).tolist()) for d in (train, valid, test)]
    assert seen[0] == set(range(48)) and seen[1] == set(range(48, 54)) and seen[2] == set(range(54, 60))
    expected, _, _ = reference_samples(documents, np.arange(48, 54), 10, 8, 5)
    np.testing.assert_array_equal(valid[0]["labels"].numpy(), expected[0][1:])
    assert build_gpt_datasets(indexed, [100, 0, 5], config)[1] is None


def test_eod_mask_and_kept_partial_validation_sample(tmp_path):
    indexed, documents = make_corpus(tmp_path / "corpus", 17)
    ids = np.arange(len(indexed), dtype=np.int32)
    eod = int(documents[0][0])
    config = GPTDatasetConfig(seq_length=16, eod_mask_loss=True, eod_token_id=eod,
                              drop_last_partial_validation_sequence=False)
    dataset = GPTDataset(indexed, ids, None, "valid", config)
    tokens_per_epoch = int(indexed.sequence_lengths.sum())
    assert len(dataset) == -(-(tokens_per_epoch - 1) // 16)
    for i in range(len(dataset)):
        sample = dataset[i]
        text, real = dataset.sample_text(i)
        expected_mask = (np.arange(16) < real - 1) & (text[:-1] != eod)
        np.testing.assert_array_equal(sample["loss_mask"].numpy(), expected_mask.astype(np.float32))
    assert (tokens_per_epoch - 1) % 16 != 0, "corpus should leave a partial sample for this test"
    assert any(dataset.sample_text(i)[1] < 17 for i in range(len(dataset)))


def test_bad_input_is_reported(tmp_path):
    indexed, _ = make_corpus(tmp_path / "corpus", 19, num_docs=3, max_len=5)
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTDataset(indexed, np.arange(1, dtype=np.int32), 10, "train", GPTDatasetConfig(seq_length=4096))
    with pytest.raises(ValueError, match="eod_token_id"):
        GPTDatasetConfig(seq_length=8, eod_mask_loss=True)
    with pytest.raises(ValueError, match="no documents"):
        GPTDataset(indexed, np.arange(0, dtype=np.int32), 10, "train", GPTDatasetConfig(seq_length=2))


def _distributed_build(rank, world_size, prefix, cache_dir):
    import torch.distributed as dist

    config = GPTDatasetConfig(seq_length=8, seed=21, cache_dir=cache_dir)
    dataset = GPTDataset(IndexedDataset(prefix), np.arange(20, dtype=np.int32), 300, "train", config,
                         is_builder=rank == 0, barrier=dist.barrier)
    return [np.asarray(dataset[i]["tokens"]) for i in range(0, len(dataset), 7)], sorted(os.listdir(cache_dir))


def test_rank0_builds_others_load_after_barrier(tmp_path):
    make_corpus(tmp_path / "corpus", 23)
    cache_dir = str(tmp_path / "cache")
    results = run_distributed(_distributed_build, world_size=2, args=(str(tmp_path / "corpus"), cache_dir))
    (tokens0, files0), (tokens1, files1) = results
    assert files0 == files1 and len(files0) == 4
    for a, b in zip(tokens0, tokens1):
        np.testing.assert_array_equal(a, b)
