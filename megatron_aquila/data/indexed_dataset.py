"""Memory-mapped token datasets in Megatron-LM's MMIDIDX v1 format (docs/design.md section 4).

A dataset is two files sharing a prefix:

* ``{prefix}.bin``: every sequence's tokens back to back, headerless, in one dtype.
* ``{prefix}.idx``: little-endian, no padding::

      offset  size  field
      0       9     magic b"MMIDIDX\\x00\\x00"
      9       8     uint64 version (1)
      17      1     uint8 dtype code (see DTYPE_CODES)
      18      8     uint64 sequence count N
      26      8     uint64 document-index length D (documents + 1)
      34      4N    int32 sequence lengths, in tokens
      ...     8N    int64 sequence pointers: byte offset of each sequence in .bin
      ...     8D    int64 document indices: 0, then the sequence count after each document

The reader validates everything it can check cheaply and raises ``IndexedDatasetError``
(a ``ValueError``) naming the file and the problem, so a corrupt file never surfaces as a
crash deep inside numpy. The writer writes to temporary names and renames on ``finalize``.
"""
from __future__ import annotations

import array
import mmap
import os
import shutil
import struct
import tempfile
from typing import Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-index length; "<" means no padding.
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Pointer consistency is checked this many sequences at a time to bound temporary memory.
_VALIDATION_CHUNK = 1 << 22


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, corrupt, truncated or inconsistent, or misused."""


def best_token_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron uses for a vocabulary: uint16 below 65500, else int32."""
    return DTYPE_CODES[8] if vocab_size < 65500 else DTYPE_CODES[4]


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dtype_code(dtype: np.dtype | type) -> int:
    """The MMIDIDX code of ``dtype``; raises IndexedDatasetError for unsupported dtypes."""
    normalized = np.dtype(dtype).newbyteorder("<")
    if normalized not in _CODE_OF_DTYPE:
        supported = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise IndexedDatasetError(f"dtype {np.dtype(dtype)} is not storable in MMIDIDX; use one of {supported}")
    return _CODE_OF_DTYPE[normalized]


def _umask_permissions() -> int:
    """Permissions a plain open() would give a new file (mkstemp makes files private, 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _map_readonly(path: str) -> mmap.mmap | bytes:
    """Memory-map a file read-only (an empty file maps to b"", which mmap cannot do)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Read-only, memory-mapped view of ``{path_prefix}.bin`` / ``{path_prefix}.idx``.

    ``dataset[i]`` and ``dataset.get(i, offset, length)`` return numpy views into the mapped
    ``.bin`` file (no copy; read-only). Pickling reopens the files by path, so datasets can be
    sent to DataLoader worker processes.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        self._open()

    # -- construction and validation -------------------------------------------------------

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(
                    f"{path}: file not found; expected the pair {idx_path} and {bin_path} "
                    f"(pass the prefix without extension, e.g. out_text_document)"
                )
        idx_size = os.path.getsize(idx_path)
        if idx_size < HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path}: truncated index: {idx_size} bytes, smaller than the {HEADER_SIZE}-byte header"
            )
        with open(idx_path, "rb") as handle:
            magic, version, code, count, doc_count = _HEADER.unpack(handle.read(HEADER_SIZE))
        if magic != MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r}: not a Megatron MMIDIDX index "
                f"(re-run tools/preprocess_data.py to regenerate it)"
            )
        if version != VERSION:
            raise IndexedDatasetError(
                f"{idx_path}: unsupported index version {version}, only version {VERSION} is known"
            )
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{idx_path}: unknown dtype code {code}; valid codes are {sorted(DTYPE_CODES)}"
            )
        self.dtype: np.dtype = DTYPE_CODES[code]
        expected_idx_size = HEADER_SIZE + count * (4 + 8) + doc_count * 8
        if idx_size != expected_idx_size:
            problem = "truncated index" if idx_size < expected_idx_size else "index has trailing bytes"
            raise IndexedDatasetError(
                f"{idx_path}: {problem}: header says {count} sequences and {doc_count} document indices, "
                f"so the file should be {expected_idx_size} bytes, but it is {idx_size} bytes"
            )

        self._idx_buffer = _map_readonly(idx_path)
        pointers_offset = HEADER_SIZE + 4 * count
        doc_offset = pointers_offset + 8 * count
        self.sequence_lengths: np.ndarray = np.frombuffer(self._idx_buffer, "<i4", count, HEADER_SIZE)
        self.sequence_pointers: np.ndarray = np.frombuffer(self._idx_buffer, "<i8", count, pointers_offset)
        self.document_indices: np.ndarray = np.frombuffer(self._idx_buffer, "<i8", doc_count, doc_offset)
        self._validate_index(idx_path, count, doc_count)

        bin_size = os.path.getsize(bin_path)
        itemsize = self.dtype.itemsize
        expected_bin_size = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize if count else 0
        )
        if bin_size != expected_bin_size:
            problem = "truncated data file" if bin_size < expected_bin_size else "data file has trailing bytes"
            raise IndexedDatasetError(
                f"{bin_path}: {problem}: {idx_path} describes {count} sequences ending at byte "
                f"{expected_bin_size}, but the file is {bin_size} bytes (regenerate the dataset)"
            )
        self._bin_buffer = _map_readonly(bin_path)

    def _validate_index(self, idx_path: str, count: int, doc_count: int) -> None:
        docs = self.document_indices
        if doc_count < 1 or docs[0] != 0:
            raise IndexedDatasetError(
                f"{idx_path}: document indices must start with 0, got "
                f"{'an empty list' if doc_count < 1 else int(docs[0])}"
            )
        if docs[-1] != count:
            raise IndexedDatasetError(
                f"{idx_path}: last document index is {int(docs[-1])} but there are {count} sequences "
                f"(len(lengths) == doc_idx[-1] == N must hold)"
            )
        if doc_count > 1 and np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(f"{idx_path}: document indices are not non-decreasing")
        itemsize = self.dtype.itemsize
        expected_start = 0
        for start in range(0, count, _VALIDATION_CHUNK):
            lengths = self.sequence_lengths[start : start + _VALIDATION_CHUNK].astype(np.int64)
            pointers = self.sequence_pointers[start : start + _VALIDATION_CHUNK]
            if np.any(lengths < 0):
                bad = start + int(np.argmax(lengths < 0))
                raise IndexedDatasetError(f"{idx_path}: sequence {bad} has negative length {int(lengths[bad - start])}")
            expected = expected_start + np.concatenate(([0], np.cumsum(lengths[:-1] * itemsize)))
            mismatch = pointers != expected
            if np.any(mismatch):
                bad = int(np.argmax(mismatch))
                raise IndexedDatasetError(
                    f"{idx_path}: sequence {start + bad} points to byte {int(pointers[bad])} but the "
                    f"lengths before it put it at byte {int(expected[bad])}"
                )
            expected_start = int(expected[-1] + lengths[-1] * itemsize)

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    # -- access ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` as a read-only zero-copy view."""
        count = len(self)
        if not -count <= idx < count:
            raise IndexError(f"sequence index {idx} out of range for {self.path_prefix} with {count} sequences")
        idx = int(idx) % count
        sequence_length = int(self.sequence_lengths[idx])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(
                f"slice offset={offset} length={length} out of range for sequence {idx} "
                f"of length {sequence_length} in {self.path_prefix}"
            )
        byte_offset = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_buffer, self.dtype, length, byte_offset)

    def __getitem__(self, idx: int) -> np.ndarray:
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(f"IndexedDataset indices must be integers, got {type(idx).__name__}")
        return self.get(int(idx))


class IndexedDatasetBuilder:
    """Writes ``{path_prefix}.bin`` / ``.idx``; nothing appears under those names until finalize().

    Tokens stream into a temporary ``.bin`` in the same directory; ``finalize`` writes the
    index to a temporary file and renames the ``.bin`` and then the ``.idx`` into place. Used as
    a context manager, a clean exit finalizes and an exception removes the temporary files.
    Sequences added after the last ``end_document()`` form one final document at ``finalize``.
    """

    def __init__(self, path_prefix: str, dtype: np.dtype):
        self.path_prefix = path_prefix
        self.dtype = DTYPE_CODES[dtype_code(dtype)]
        directory = os.path.dirname(os.path.abspath(path_prefix))
        if not os.path.isdir(directory):
            raise IndexedDatasetError(f"output directory {directory} does not exist; create it first")
        base = os.path.basename(path_prefix)
        bin_fd, self._bin_tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".bin.tmp")
        self._bin_file = os.fdopen(bin_fd, "wb")
        self._idx_tmp: str | None = None
        self._lengths = array.array("q")
        self._document_indices = array.array("q", [0])
        self._state = "open"  # -> "finalized" | "aborted"

    def _check_open(self) -> None:
        if self._state != "open":
            raise IndexedDatasetError(f"builder for {self.path_prefix} is already {self._state}")

    def _as_tokens(self, tokens: np.ndarray | Sequence[int]) -> np.ndarray:
        values = np.asarray(tokens)
        if values.ndim != 1:
            raise IndexedDatasetError(f"a sequence must be 1-D, got shape {values.shape}")
        if values.dtype == self.dtype:
            return np.ascontiguousarray(values)
        if values.size and np.issubdtype(self.dtype, np.integer):
            if not np.issubdtype(values.dtype, np.integer):
                raise IndexedDatasetError(f"token ids must be integers, got dtype {values.dtype}")
            info = np.iinfo(self.dtype)
            low, high = int(values.min()), int(values.max())
            if low < info.min or high > info.max:
                raise IndexedDatasetError(
                    f"token id range [{low}, {high}] does not fit {self.dtype} [{info.min}, {info.max}] "
                    f"for {self.path_prefix}; build with best_token_dtype(vocab_size)"
                )
        return values.astype(self.dtype)

    def add_item(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one sequence."""
        self._check_open()
        values = self._as_tokens(tokens)
        if len(values) > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"sequence of {len(values)} tokens exceeds the int32 length field")
        self._bin_file.write(memoryview(values).cast("B"))
        self._lengths.append(len(values))

    def end_document(self) -> None:
        """Close the current document: every sequence added since the previous call."""
        self._check_open()
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: np.ndarray | Sequence[int], lengths: list[int] | None = None) -> None:
        """Append one document: ``tokens`` as one sequence, or split into ``lengths`` sequences."""
        values = self._as_tokens(tokens)
        if lengths is None:
            self.add_item(values)
        else:
            if sum(lengths) != len(values):
                raise IndexedDatasetError(
                    f"sequence lengths sum to {sum(lengths)} but the document has {len(values)} tokens"
                )
            start = 0
            for length in lengths:
                self.add_item(values[start : start + length])
                start += length
        self.end_document()

    def add_index(self, other_prefix: str) -> None:
        """Append every document of the existing dataset ``other_prefix`` (same dtype required)."""
        self._check_open()
        if self._document_indices[-1] != len(self._lengths):
            raise IndexedDatasetError(
                f"call end_document() before add_index({other_prefix!r}): "
                f"{len(self._lengths) - self._document_indices[-1]} sequences are not in a document yet"
            )
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {other_prefix} (dtype {other.dtype}) into {self.path_prefix} (dtype {self.dtype}); "
                f"all inputs must share one token dtype"
            )
        offset = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.astype(np.int64).tolist())
        self._document_indices.extend((other.document_indices[1:] + offset).tolist())
        self._bin_file.flush()
        with open(data_file_path(other_prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin_file, length=16 << 20)

    def finalize(self) -> None:
        """Write the index and atomically move both files to their final names."""
        self._check_open()
        if self._document_indices[-1] != len(self._lengths):
            self._document_indices.append(len(self._lengths))
        try:
            self._bin_file.close()
            lengths = np.frombuffer(self._lengths, np.int64) if len(self._lengths) else np.zeros(0, np.int64)
            pointers = np.zeros(len(lengths), np.int64)
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
            documents = np.frombuffer(self._document_indices, np.int64)
            directory = os.path.dirname(os.path.abspath(self.path_prefix))
            idx_fd, self._idx_tmp = tempfile.mkstemp(
                dir=directory, prefix=f".{os.path.basename(self.path_prefix)}.", suffix=".idx.tmp"
            )
            with os.fdopen(idx_fd, "wb") as index:
                index.write(_HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype), len(lengths), len(documents)))
                index.write(lengths.astype("<i4").tobytes())
                index.write(pointers.astype("<i8").tobytes())
                index.write(documents.astype("<i8").tobytes())
            for path in (self._bin_tmp, self._idx_tmp):
                os.chmod(path, _umask_permissions())
            os.replace(self._bin_tmp, data_file_path(self.path_prefix))
            os.replace(self._idx_tmp, index_file_path(self.path_prefix))
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Discard everything written so far; no file is left behind."""
        if self._state == "finalized":
            return
        self._bin_file.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None and os.path.exists(path):
                os.remove(path)
        self._state = "aborted"

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()
