"""MMIDIDX v1 reader/writer: byte layout against hand-packed files, round trips, corruption."""
import os
import pickle
import struct

import numpy as np
import pytest

from megatron_aquila.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_token_dtype,
    data_file_path,
    index_file_path,
)

# Two documents: [1, 2, 3] + [4] and [5, 6]; uint16 tokens (dtype code 8).
SEQUENCES = [[1, 2, 3], [4], [5, 6]]
DOCUMENTS = [[0, 1], [2]]


def hand_built_idx() -> bytes:
    """The .idx of SEQUENCES/DOCUMENTS packed field by field from the docs/design.md table (section 4)."""
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code: uint16
        + struct.pack("<Q", 3)  # sequences
        + struct.pack("<Q", 3)  # documents + 1
        + struct.pack("<3i", 3, 1, 2)  # lengths
        + struct.pack("<3q", 0, 6, 8)  # byte pointers: 2 bytes per token
        + struct.pack("<3q", 0, 2, 3)  # document indices
    )


def hand_built_bin() -> bytes:
    return struct.pack("<6H", 1, 2, 3, 4, 5, 6)


def write_hand_built(prefix: str) -> None:
    with open(index_file_path(prefix), "wb") as handle:
        handle.write(hand_built_idx())
    with open(data_file_path(prefix), "wb") as handle:
        handle.write(hand_built_bin())


def test_dtype_table_and_paths():
    assert {code: str(dtype) for code, dtype in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16",
    }
    assert best_token_dtype(65499) == np.uint16
    assert best_token_dtype(65500) == np.int32
    assert best_token_dtype(100008) == np.int32
    assert data_file_path("a/b") == "a/b.bin" and index_file_path("a/b") == "a/b.idx"


def test_reader_on_hand_built_files(tmp_path):
    prefix = str(tmp_path / "hand")
    write_hand_built(prefix)
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 3 and dataset.num_documents == 2
    assert dataset.dtype == np.uint16
    assert dataset.sequence_lengths.dtype == np.int32 and dataset.sequence_lengths.tolist() == [3, 1, 2]
    assert dataset.sequence_pointers.dtype == np.int64 and dataset.sequence_pointers.tolist() == [0, 6, 8]
    assert dataset.document_indices.dtype == np.int64 and dataset.document_indices.tolist() == [0, 2, 3]
    assert [dataset[i].tolist() for i in range(3)] == SEQUENCES
    assert dataset[-1].tolist() == [5, 6]
    assert dataset.get(0, offset=1).tolist() == [2, 3]
    assert dataset.get(0, offset=1, length=1).tolist() == [2]
    assert dataset.get(2, offset=2).tolist() == []


def test_writer_bytes_equal_hand_built(tmp_path):
    prefix = str(tmp_path / "written")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document([1, 2, 3, 4], lengths=[3, 1])
        builder.add_item(np.array([5, 6], dtype=np.int64))
        builder.end_document()
    with open(index_file_path(prefix), "rb") as handle:
        assert handle.read() == hand_built_idx()
    with open(data_file_path(prefix), "rb") as handle:
        assert handle.read() == hand_built_bin()
    assert sorted(os.listdir(tmp_path)) == ["written.bin", "written.idx"]


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65535), (np.int32, 100008)])
def test_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    documents = [
        [rng.integers(0, high, size=rng.integers(0, 50)) for _ in range(rng.integers(1, 4))] for _ in range(40)
    ]
    prefix = str(tmp_path / "rt")
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for document in documents:
            for sequence in document:
                builder.add_item(sequence.tolist())
            builder.end_document()
    sequences = [sequence for document in documents for sequence in document]
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == dtype and len(dataset) == len(sequences)
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(dataset[i], sequence)
    expected_docs = np.cumsum([0] + [len(document) for document in documents])
    np.testing.assert_array_equal(dataset.document_indices, expected_docs)
    assert os.path.getsize(data_file_path(prefix)) == sum(map(len, sequences)) * np.dtype(dtype).itemsize
    restored = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(restored[len(sequences) - 1], sequences[-1])


def test_get_is_a_zero_copy_view(tmp_path):
    prefix = str(tmp_path / "hand")
    write_hand_built(prefix)
    dataset = IndexedDataset(prefix)
    whole, part = dataset.get(0), dataset.get(0, 1, 2)
    assert np.shares_memory(whole, part)
    assert not whole.flags.writeable
    with pytest.raises(IndexError, match="out of range"):
        dataset.get(0, offset=2, length=2)
    with pytest.raises(IndexError, match="3 sequences"):
        dataset[3]


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetBuilder(prefix, np.int32):
        pass
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 0 and dataset.document_indices.tolist() == [0]


def test_builder_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16) as builder:
            builder.add_item([1, 2])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_builder_rejects_tokens_outside_dtype(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16) as builder:
        with pytest.raises(IndexedDatasetError, match="100007.*uint16"):
            builder.add_item([5, 100007])
        with pytest.raises(IndexedDatasetError, match="sum to 3 but the document has 2"):
            builder.add_document([1, 2], lengths=[1, 2])
        builder.abort()
    assert os.listdir(tmp_path) == []


def test_builder_needs_existing_directory(tmp_path):
    with pytest.raises(IndexedDatasetError, match="does not exist"):
        IndexedDatasetBuilder(str(tmp_path / "missing" / "x"), np.uint16)


def test_add_index_concatenates_and_checks_dtype(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    write_hand_built(first)
    with IndexedDatasetBuilder(second, np.uint16) as builder:
        builder.add_document([7, 8, 9])
    merged_prefix = str(tmp_path / "ab")
    with IndexedDatasetBuilder(merged_prefix, np.uint16) as builder:
        builder.add_index(first)
        builder.add_index(second)
    merged = IndexedDataset(merged_prefix)
    assert [merged[i].tolist() for i in range(len(merged))] == SEQUENCES + [[7, 8, 9]]
    assert merged.document_indices.tolist() == [0, 2, 3, 4]
    assert merged.sequence_pointers.tolist() == [0, 6, 8, 12]
    with IndexedDatasetBuilder(str(tmp_path / "c"), np.int32) as builder:
        with pytest.raises(IndexedDatasetError, match="dtype uint16.*dtype int32"):
            builder.add_index(first)
        builder.abort()


def corrupt(path: str, offset: int, payload: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(payload)


def truncate(path: str, nbytes: int) -> None:
    os.truncate(path, os.path.getsize(path) - nbytes)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: corrupt(p + ".idx", 0, b"XX"), r"hand\.idx: bad magic"),
        (lambda p: corrupt(p + ".idx", 9, struct.pack("<Q", 2)), r"hand\.idx: unsupported index version 2"),
        (lambda p: corrupt(p + ".idx", 17, b"\x09"), r"hand\.idx: unknown dtype code 9"),
        (lambda p: truncate(p + ".idx", 8), r"hand\.idx: truncated index.*94 bytes, but it is 86"),
        (lambda p: os.truncate(p + ".idx", 10), r"hand\.idx: truncated index: 10 bytes"),
        (lambda p: truncate(p + ".bin", 2), r"hand\.bin: truncated data file.*byte 12.*10 bytes"),
        (lambda p: corrupt(p + ".bin", 12, b"\x00\x00"), r"hand\.bin: data file has trailing bytes"),
        (lambda p: corrupt(p + ".idx", 94 - 8, struct.pack("<q", 2)), r"last document index is 2 but there are 3"),
        (lambda p: corrupt(p + ".idx", 34 + 12 + 8, struct.pack("<q", 4)), r"sequence 1 points to byte 4"),
        (lambda p: os.remove(p + ".bin"), r"hand\.bin: file not found"),
    ],
    ids=["magic", "version", "dtype", "idx-truncated", "idx-header-truncated", "bin-truncated",
         "bin-trailing", "doc-idx", "pointers", "bin-missing"],
)
def test_corrupt_files_raise_clear_errors(tmp_path, damage, message):
    prefix = str(tmp_path / "hand")
    write_hand_built(prefix)
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)
    assert issubclass(IndexedDatasetError, ValueError)
