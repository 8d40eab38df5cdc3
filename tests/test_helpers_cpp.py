"""C++ index builders against slow pure-Python references on random inputs."""
import numpy as np
import pytest

from megatron_aquila.data import _helpers
from megatron_aquila.data.helpers import (
    build_blending_indices,
    build_exhaustive_blending_indices,
    build_sample_index,
)


def reference_sample_index(sizes, document_index, seq_length, drop_last, extra):
    """Closed form, independent of the C++ walk: sample k starts at global token k * seq_length.

    Row k >= 1 records where sample k - 1 ended: the document holding its last read token
    t = k * seq_length + extra - 1, with offset (t's offset + 1 - extra). A final partial sample
    (kept when drop_last is False) ends at the last document, offset size - extra.
    """
    lengths = [int(sizes[d]) for d in document_index]
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    usable = total - extra
    num_samples = usable // seq_length if drop_last else -(-usable // seq_length)
    rows = [(0, 0)]
    for k in range(1, num_samples + 1):
        t = k * seq_length + extra - 1
        if t >= total:
            rows.append((len(lengths) - 1, lengths[-1] - extra))
            continue
        position = int(np.searchsorted(ends, t, side="right"))  # first document ending after t
        start = int(ends[position]) - lengths[position]
        rows.append((position, t - start + 1 - extra))
    return np.array(rows, dtype=np.int64)


def reference_blending(weights, size):
    counts = [0] * len(weights)
    dataset_index, sample_index = [], []
    for k in range(size):
        errors = [w * max(k, 1) - c for w, c in zip(weights, counts)]
        best = errors.index(max(errors))  # first maximum
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return dataset_index, sample_index


def reference_exhaustive_blending(sizes):
    total = sum(sizes)
    weights = [s / total for s in sizes]
    counts = [0] * len(sizes)
    dataset_index, sample_index = [], []
    for k in range(total):
        candidates = [i for i in range(len(sizes)) if counts[i] < sizes[i]]
        errors = [weights[i] * max(k, 1) - counts[i] for i in candidates]
        best = candidates[errors.index(max(errors))]
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return dataset_index, sample_index


def random_documents(rng, num_docs, low, high, num_epochs):
    sizes = rng.integers(low, high, size=num_docs).astype(np.int32)
    document_index = np.tile(np.arange(num_docs, dtype=np.int32), num_epochs)
    rng.shuffle(document_index)
    return sizes, document_index, int(sizes.sum())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [1, 0])
def test_sample_index_matches_reference(seed, drop_last, extra):
    rng = np.random.default_rng(seed)
    # Mix of tiny documents (1-3 tokens) and documents far longer than seq_length.
    low, high = [(1, 4), (1, 200), (50, 400)][seed % 3]
    sizes, document_index, tokens_per_epoch = random_documents(rng, int(rng.integers(5, 60)), low, high, 3)
    seq_length = int(rng.integers(2, 64))
    got = build_sample_index(sizes, document_index, seq_length, 3, tokens_per_epoch, drop_last, bool(extra))
    expected = reference_sample_index(sizes, document_index, seq_length, drop_last, extra)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    got64 = _helpers.build_sample_idx_int64(sizes, document_index, seq_length, 3, tokens_per_epoch, drop_last,
                                            bool(extra))
    assert got64.dtype == np.int64
    np.testing.assert_array_equal(got64, expected)


def test_sample_index_exact_multiple_and_single_sample():
    # 4 documents of 5 tokens, seq_length 4, extra token: (20 - 1) // 4 = 4 samples.
    sizes = np.full(4, 5, dtype=np.int32)
    document_index = np.arange(4, dtype=np.int32)
    got = build_sample_index(sizes, document_index, 4, 1, 20)
    np.testing.assert_array_equal(got, [[0, 0], [0, 4], [1, 3], [2, 2], [3, 1]])
    # seq_length divides tokens - 1 exactly: the last sample ends on the last token.
    got = build_sample_index(np.array([9], np.int32), np.array([0], np.int32), 4, 1, 9)
    np.testing.assert_array_equal(got, [[0, 0], [0, 4], [0, 8]])
    # Without the extra token and an exact multiple, samples tile the documents.
    got = build_sample_index(sizes, document_index, 5, 1, 20, add_extra_token_to_sequence=False)
    np.testing.assert_array_equal(got, reference_sample_index(sizes, document_index, 5, True, 0))
    np.testing.assert_array_equal(got, [[0, 0], [0, 5], [1, 5], [2, 5], [3, 5]])


def test_sample_index_samples_hold_seq_length_plus_one_tokens():
    rng = np.random.default_rng(7)
    sizes, document_index, tokens = random_documents(rng, 40, 1, 30, 2)
    sample_index = build_sample_index(sizes, document_index, 16, 2, tokens)
    starts = np.concatenate(([0], np.cumsum(sizes[document_index])))
    for k in range(sample_index.shape[0] - 1):
        (p0, o0), (p1, o1) = sample_index[k], sample_index[k + 1]
        assert starts[p0] + o0 == 16 * k  # sample k starts on the last token of sample k - 1
        assert (starts[p1] + o1 + 1) - (starts[p0] + o0) == 17


def test_sample_index_switches_to_int64_beyond_int32(monkeypatch):
    from megatron_aquila.data import helpers

    sizes = np.array([10, 10], dtype=np.int32)
    document_index = np.array([0, 1], np.int32)
    assert build_sample_index(sizes, document_index, 3, 1, 20).dtype == np.int32
    monkeypatch.setattr(helpers, "_INT32_MAX", 9)  # pretend the sizes do not fit int32
    got = build_sample_index(sizes, document_index, 3, 1, 20)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, reference_sample_index(sizes, document_index, 3, True, 1))


def test_sample_index_rejects_bad_input():
    sizes = np.array([5, 5], dtype=np.int32)
    with pytest.raises(ValueError, match="outside"):
        build_sample_index(sizes, np.array([0, 2], np.int32), 2, 1, 10)
    with pytest.raises(ValueError, match="sums to"):
        build_sample_index(sizes, np.array([0, 1], np.int32), 2, 1, 11)
    with pytest.raises(ValueError, match="not enough for one sample"):
        build_sample_index(sizes, np.array([0, 1], np.int32), 20, 1, 10)
    with pytest.raises(ValueError, match="dtype int32"):
        _helpers.build_sample_idx_int32(sizes.astype(np.int64), np.array([0, 1], np.int32), 2, 1, 10)


@pytest.mark.parametrize("seed", range(5))
def test_blending_matches_reference(seed):
    rng = np.random.default_rng(seed)
    num_datasets = int(rng.integers(1, 8))
    weights = rng.random(num_datasets) + 0.01
    weights = (weights / weights.sum()).tolist()
    size = int(rng.integers(1, 3000))
    dataset_index, sample_index = build_blending_indices(weights, size)
    expected_index, expected_sample = reference_blending(weights, size)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    np.testing.assert_array_equal(dataset_index, expected_index)
    np.testing.assert_array_equal(sample_index, expected_sample)
    counts = np.bincount(dataset_index, minlength=num_datasets)
    assert np.all(np.abs(counts - np.array(weights) * size) <= 1.0 + 1e-9)


def test_blending_ties_and_uint8_output():
    dataset_index, sample_index = build_blending_indices([0.5, 0.5], 6)
    np.testing.assert_array_equal(dataset_index, [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(sample_index, [0, 0, 1, 1, 2, 2])
    out8 = np.zeros(6, dtype=np.uint8)
    samples = np.zeros(6, dtype=np.int64)
    _helpers.build_blending_indices(out8, samples, np.array([0.5, 0.5]), 2, 6, False)
    np.testing.assert_array_equal(out8, [0, 1, 0, 1, 0, 1])


def test_blending_rejects_bad_input():
    with pytest.raises(ValueError, match="sum to"):
        build_blending_indices([0.5, 0.6], 10)
    with pytest.raises(ValueError, match="dtype int64"):
        _helpers.build_blending_indices(np.zeros(4, np.int16), np.zeros(4, np.int32), np.array([1.0]), 1, 4, False)
    with pytest.raises(ValueError, match="at least `size`"):
        _helpers.build_blending_indices(np.zeros(3, np.int16), np.zeros(4, np.int64), np.array([1.0]), 1, 4, False)
    with pytest.raises(ValueError, match="writable"):
        frozen = np.zeros(4, np.int16)
        frozen.flags.writeable = False
        _helpers.build_blending_indices(frozen, np.zeros(4, np.int64), np.array([1.0]), 1, 4, False)


@pytest.mark.parametrize("seed", range(5))
def test_exhaustive_blending_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(1, 300, size=int(rng.integers(1, 7))).tolist()
    dataset_index, sample_index = build_exhaustive_blending_indices(sizes)
    expected_index, expected_sample = reference_exhaustive_blending(sizes)
    np.testing.assert_array_equal(dataset_index, expected_index)
    np.testing.assert_array_equal(sample_index, expected_sample)
    # Every sample of every dataset exactly once.
    for i, size in enumerate(sizes):
        np.testing.assert_array_equal(np.sort(sample_index[dataset_index == i]), np.arange(size))


def test_exhaustive_blending_skips_empty_datasets():
    dataset_index, sample_index = build_exhaustive_blending_indices([0, 1, 1])
    np.testing.assert_array_equal(dataset_index, [1, 2])
    np.testing.assert_array_equal(sample_index, [0, 0])
    expected_index, _ = reference_exhaustive_blending([3, 0, 5])
    np.testing.assert_array_equal(build_exhaustive_blending_indices([3, 0, 5])[0], expected_index)
