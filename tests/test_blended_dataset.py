"""BlendedDataset and blend parsing against pure-Python references."""
import math
import os

import numpy as np
import pytest

from megatron_aquila.data.blended_dataset import (
    BlendedDataset,
    build_blended_gpt_datasets,
    parse_blend,
    surplus_sizes,
)
from megatron_aquila.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from test_gpt_dataset import make_corpus, reference_samples
from test_helpers_cpp import reference_blending


def test_parse_blend():
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [pytest.approx(0.3), pytest.approx(0.7)])
    assert parse_blend(["30", " a ", "10", "b"]) == (["a", "b"], [0.75, 0.25])
    assert parse_blend(["a", "b", "c"]) == (["a", "b", "c"], None)
    for bad in [[], ["0.3", "a", "0.7"], ["0.3", "a", "b", "0.7"], ["a", "0.5"], ["-1", "a", "2", "b"],
                ["0", "a", "1", "b"], ["0.5", ""]]:
        with pytest.raises(ValueError, match="blend"):
            parse_blend(bad)


def test_surplus_sizes():
    assert surplus_sizes([0.3, 0.7], 1000) == [math.ceil(0.3 * 1000 * 1.005), math.ceil(0.7 * 1000 * 1.005)]
    assert surplus_sizes([0.3, 0.7], 1000) == [302, 704]


def test_weighted_blend_matches_reference(tmp_path):
    corpora = [make_corpus(tmp_path / f"corpus{i}", 30 + i) for i in range(3)]
    weights = [0.2, 0.5, 0.3]
    size, seq_length, seed = 400, 8, 9
    blend = [item for w, i in zip(weights, range(3)) for item in (str(w), str(tmp_path / f"corpus{i}"))]
    config = GPTDatasetConfig(seq_length=seq_length, seed=seed, split="1", cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_blended_gpt_datasets(blend, [size, None, None], config)
    assert valid is None and test is None
    assert isinstance(train, BlendedDataset) and len(train) == size

    per_dataset = []
    for (indexed, documents), weight in zip(corpora, weights):
        wanted = math.ceil(weight * size * 1.005)
        samples, _, _ = reference_samples(documents, np.arange(len(documents)), wanted, seq_length, seed)
        per_dataset.append(samples)
    dataset_index, sample_index = reference_blending(weights, size)
    for k in range(size):
        expected = per_dataset[dataset_index[k]][sample_index[k]]
        np.testing.assert_array_equal(train[k]["tokens"].numpy(), expected[:-1])
        np.testing.assert_array_equal(train[k]["labels"].numpy(), expected[1:])

    # Second build loads both levels from the cache; changing the weights changes the key.
    files = set(os.listdir(tmp_path / "cache"))
    again = build_blended_gpt_datasets(blend, [size, None, None], config)[0]
    assert set(os.listdir(tmp_path / "cache")) == files
    assert isinstance(again.dataset_index, np.memmap)
    np.testing.assert_array_equal(again.dataset_sample_index, train.dataset_sample_index)
    other = build_blended_gpt_datasets(["0.5", blend[1], "0.3", blend[3], "0.2", blend[5]], [size, None, None],
                                       config)[0]
    assert other.cache.hash != train.cache.hash


def test_unweighted_blends_by_length(tmp_path):
    corpora = [make_corpus(tmp_path / f"corpus{i}", 40 + i) for i in range(2)]
    config = GPTDatasetConfig(seq_length=8, seed=2, split="1")
    members = [GPTDataset(indexed, np.arange(len(indexed), dtype=np.int32), None, "train", config)
               for indexed, _ in corpora]
    lengths = [len(member) for member in members]

    exhaustive = BlendedDataset(members, None, None)
    assert len(exhaustive) == sum(lengths)
    for i, length in enumerate(lengths):
        np.testing.assert_array_equal(np.sort(exhaustive.dataset_sample_index[exhaustive.dataset_index == i]),
                                      np.arange(length))
    member, number = int(exhaustive.dataset_index[3]), int(exhaustive.dataset_sample_index[3])
    np.testing.assert_array_equal(exhaustive[3]["tokens"].numpy(), members[member][number]["tokens"].numpy())

    sized = BlendedDataset(members, None, 50)
    expected_index, expected_sample = reference_blending([n / sum(lengths) for n in lengths], 50)
    np.testing.assert_array_equal(sized.dataset_index, expected_index)
    np.testing.assert_array_equal(sized.dataset_sample_index, expected_sample)
    assert len(BlendedDataset(members, None, 10 ** 6)) == sum(lengths)


def test_overdrawn_dataset_is_an_error(tmp_path):
    indexed, _ = make_corpus(tmp_path / "corpus", 50)
    config = GPTDatasetConfig(seq_length=8, split="1")
    small = GPTDataset(indexed, np.arange(5, dtype=np.int32), None, "train", config)
    large = GPTDataset(indexed, np.arange(len(indexed), dtype=np.int32), None, "train", config)
    with pytest.raises(ValueError, match="has only"):
        BlendedDataset([small, large], [0.5, 0.5], 2 * len(small) + 10)
    with pytest.raises(ValueError, match="needs a size"):
        BlendedDataset([small, large], [0.5, 0.5], None)
