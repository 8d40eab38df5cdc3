"""Typed, validated Python entry points to the C++ index builders (``csrc/helpers.cpp``).

The extension ``megatron_aquila.data._helpers`` is compiled by ``setup.py`` (``pip install -e .``
or ``python setup.py build_ext --inplace``), never at run time. Semantics are those of Megatron-LM's
dataset helpers (docs/design.md section 5):

- sample index: ``[num_samples + 1, 2]`` rows of (position in the document index, token offset in
  that document). Sample ``k`` runs from row ``k`` to row ``k + 1`` and holds ``seq_length + 1``
  tokens (``seq_length`` without the extra token); the next sample starts on the last token of
  the previous one, so that tokens = text[:-1] and labels = text[1:] cover every position.
- greedy blending: sample ``k`` comes from ``argmax_i (w_i * max(k, 1) - count_i)`` (lowest ``i``
  on ties) and is that dataset's ``count_i``-th sample.
- exhaustive blending: the same rule with ``w_i = size_i / sum(size)``, over the datasets that
  still have unused samples, until each sample of each dataset is used exactly once.
"""
from __future__ import annotations

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max
_INT16_LIMIT = np.iinfo(np.int16).max + 1  # dataset ids 0 .. 32767


def _extension():
    try:
        from megatron_aquila.data import _helpers
    except ImportError as error:
        raise ImportError(
            "the C++ extension megatron_aquila.data._helpers is not built; run "
            "`pip install -e .` or `python setup.py build_ext --inplace` in the repository root"
        ) from error
    return _helpers


def _as_int32_vector(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as a 1-D C-contiguous int32 array (no copy when it already is one)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype != np.int32 and array.size and (array.min() < 0 or array.max() > _INT32_MAX):
        raise ValueError(f"{name} has values in [{array.min()}, {array.max()}], outside int32 [0, {_INT32_MAX}]")
    return np.ascontiguousarray(array, dtype=np.int32)


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> np.ndarray:
    """Sample index ``[num_samples + 1, 2]`` over the documents ``document_index`` points to.

    Args:
        sizes: token count of every sequence of the indexed dataset, int32 ``[N]``.
        document_index: sequence ids in reading order (one epoch's documents tiled
            ``num_epochs`` times, shuffled), int32.
        seq_length: tokens per sample (without the extra label token).
        num_epochs, tokens_per_epoch: ``sizes[document_index].sum()`` must equal their product.
        drop_last_partial_sequence: drop the final sample when it would be shorter than
            ``seq_length`` tokens (otherwise it is kept, and the dataset pads it).
        add_extra_token_to_sequence: samples hold ``seq_length + 1`` tokens and overlap by one.

    Returns:
        int32 when every position and size fits int32 (as Megatron-LM decides), else int64.
        ``num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length`` (ceil when the
        last partial sequence is kept).
    """
    sizes = _as_int32_vector(sizes, "sizes")
    document_index = _as_int32_vector(document_index, "document_index")
    if sizes.size == 0:
        raise ValueError("sizes is empty: the indexed dataset has no sequences")
    largest = max(document_index.shape[0], int(sizes.max()))
    helpers = _extension()
    builder = helpers.build_sample_idx_int32 if largest <= _INT32_MAX else helpers.build_sample_idx_int64
    return builder(
        sizes,
        document_index,
        int(seq_length),
        int(num_epochs),
        int(tokens_per_epoch),
        bool(drop_last_partial_sequence),
        bool(add_extra_token_to_sequence),
    )


def build_blending_indices(weights: np.ndarray | list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy weighted blend of ``size`` samples.

    Args:
        weights: normalized (sum 1) non-negative weight of each dataset.
        size: number of samples in the blend.

    Returns:
        ``(dataset_index int16 [size], dataset_sample_index int64 [size])``.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not 1 <= weights.size <= _INT16_LIMIT:
        raise ValueError(f"weights must be a list of 1 to {_INT16_LIMIT} numbers, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
    if not np.isclose(weights.sum(), 1.0):
        raise ValueError(f"weights must be normalized (sum to 1), they sum to {weights.sum()}; divide by their sum")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    _extension().build_blending_indices(dataset_index, dataset_sample_index, weights, weights.size, int(size), False)
    return dataset_index, dataset_sample_index


def build_exhaustive_blending_indices(sizes: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Blend every sample of every dataset exactly once, interleaved in proportion to ``sizes``.

    Returns:
        ``(dataset_index int16 [sum(sizes)], dataset_sample_index int64 [sum(sizes)])``.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or not 1 <= sizes.size <= _INT16_LIMIT:
        raise ValueError(f"sizes must be a list of 1 to {_INT16_LIMIT} counts, got shape {sizes.shape}")
    if np.any(sizes < 0):
        raise ValueError(f"dataset sizes must be >= 0, got {sizes.tolist()}")
    total = int(sizes.sum())
    dataset_index = np.zeros(total, dtype=np.int16)
    dataset_sample_index = np.zeros(total, dtype=np.int64)
    _extension().build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes, sizes.size)
    return dataset_index, dataset_sample_index
