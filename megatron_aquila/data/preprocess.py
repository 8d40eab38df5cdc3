"""JSONL corpus -> tokenized ``{prefix}_{key}_document.bin/.idx`` datasets (library behind
``tools/preprocess_data.py``).

The main process reads raw lines and writes the datasets; a pool of worker processes parses
JSON and tokenizes whole batches with ``Tokenizer.encode_batch``. Results come back in input
order with a bounded number of batches in flight, so memory stays flat on any corpus size.
A bad line (invalid UTF-8, malformed JSON, not an object, missing key, non-string value) fails
the run with ``file:line`` and leaves no output behind, or is skipped and counted with
``on_error="skip"``. Blank lines and documents with no tokens are always skipped and counted.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from megatron_aquila.data.indexed_dataset import IndexedDatasetBuilder, best_token_dtype
from megatron_aquila.data.tokenizer import Tokenizer, build_tokenizer

ON_ERROR_CHOICES = ("fail", "skip")


class PreprocessError(ValueError):
    """Bad input or configuration for preprocessing; the message names file, line and fix."""


@dataclass
class PreprocessConfig:
    """Everything one preprocessing run needs."""

    inputs: list[str]  # .jsonl / .jsonl.gz files or glob patterns
    output_prefix: str  # outputs are {output_prefix}_{key}_document.bin/.idx
    tokenizer_type: str  # "aquila-bbpe" or "sentencepiece"
    tokenizer_path: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False  # end every document with the tokenizer's eod token
    workers: int = 1  # tokenizing processes; 1 tokenizes in the main process
    batch_size: int = 256  # documents per encode_batch call
    on_error: str = "fail"  # "fail" or "skip" bad lines
    log_interval: int = 10000  # documents between throughput updates on the progress bar
    progress: bool = True  # show a tqdm progress bar on stderr


@dataclass
class PreprocessStats:
    """What a run read, wrote and skipped."""

    lines: int = 0
    input_bytes: int = 0
    documents: dict[str, int] = field(default_factory=dict)  # per key
    tokens: dict[str, int] = field(default_factory=dict)  # per key, eod included
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> count
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "file:line: detail"
    seconds: float = 0.0
    output_prefixes: dict[str, str] = field(default_factory=dict)


@dataclass
class _LineBatch:
    path: str
    first_line: int  # 1-based line number of lines[0]
    lines: list[bytes]


@dataclass
class _EncodedBatch:
    path: str
    num_lines: int
    num_bytes: int
    tokens: dict[str, np.ndarray]  # key -> all documents' tokens back to back
    lengths: dict[str, list[int]]  # key -> tokens per document
    errors: list[tuple[int, str, str]]  # (line number, reason, detail)
    empty: dict[str, int]  # key -> documents with no tokens


def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Expand files and glob patterns (each pattern's matches sorted) into existing files."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
            if not matches:
                raise PreprocessError(f"--input pattern {pattern!r} matches no files")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise PreprocessError(f"--input file {pattern} not found")
    return files


def read_line_batches(files: list[str], batch_size: int) -> Iterator[_LineBatch]:
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        line_number = 0
        try:
            with opener(path, "rb") as handle:
                lines: list[bytes] = []
                for line_number, line in enumerate(handle, 1):
                    lines.append(line)
                    if len(lines) == batch_size:
                        yield _LineBatch(path, line_number - batch_size + 1, lines)
                        lines = []
                if lines:
                    yield _LineBatch(path, line_number - len(lines) + 1, lines)
        except (OSError, EOFError) as error:
            raise PreprocessError(f"{path}: cannot read after line {line_number}: {error}") from error


class _BatchEncoder:
    """Parses and tokenizes one batch of raw JSONL lines."""

    def __init__(self, tokenizer: Tokenizer, json_keys: list[str], append_eod: bool, dtype: np.dtype):
        self.tokenizer, self.json_keys, self.append_eod, self.dtype = tokenizer, json_keys, append_eod, dtype

    def _parse(self, raw: bytes) -> tuple[dict | None, tuple[str, str] | None]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return None, ("invalid UTF-8", f"byte {error.start} of the line: {error.reason}")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            return None, ("malformed JSON", f"{error.msg} at column {error.colno}")
        if not isinstance(record, dict):
            return None, ("not a JSON object", f"got a JSON {type(record).__name__}, expected an object")
        for key in self.json_keys:
            if key not in record:
                present = ", ".join(sorted(record)[:10]) or "none"
                return None, ("missing key", f"no key {key!r} (keys present: {present}); check --json-keys")
            if not isinstance(record[key], str):
                kind = type(record[key]).__name__
                return None, ("non-string value", f"key {key!r} holds a {kind}, expected a string")
        return record, None

    def _encode(self, texts: list[str], line_numbers: list[int], errors: list) -> list[list[int] | None]:
        try:
            return self.tokenizer.encode_batch(texts)
        except Exception:  # e.g. lone surrogates from JSON "\ud800" escapes; find the culprit lines
            encoded: list[list[int] | None] = []
            for text, line_number in zip(texts, line_numbers):
                try:
                    encoded.append(self.tokenizer.encode(text))
                except Exception as error:
                    errors.append((line_number, "untokenizable text", str(error)))
                    encoded.append(None)
            return encoded

    def __call__(self, batch: _LineBatch) -> _EncodedBatch:
        errors: list[tuple[int, str, str]] = []
        records, line_numbers = [], []
        for line_number, raw in enumerate(batch.lines, batch.first_line):
            if not raw.strip():
                errors.append((line_number, "blank line", "the line is empty"))
                continue
            record, error = self._parse(raw)
            if error is not None:
                errors.append((line_number, *error))
            else:
                records.append(record)
                line_numbers.append(line_number)
        tokens, lengths, empty = {}, {}, {}
        for key in self.json_keys:
            encoded = self._encode([record[key] for record in records], line_numbers, errors)
            documents = [ids for ids in encoded if ids]
            empty[key] = sum(1 for ids in encoded if ids is not None and not ids)
            if self.append_eod:
                for ids in documents:
                    ids.append(self.tokenizer.eod)
            lengths[key] = [len(ids) for ids in documents]
            flat = np.fromiter(itertools.chain.from_iterable(documents), np.int64, sum(lengths[key]))
            tokens[key] = flat.astype(self.dtype)
        errors.sort()
        num_bytes = sum(len(line) for line in batch.lines)
        return _EncodedBatch(batch.path, len(batch.lines), num_bytes, tokens, lengths, errors, empty)


_worker_encoder: _BatchEncoder | None = None  # one per worker process, set by _init_worker


def _init_worker(encoder: _BatchEncoder) -> None:
    global _worker_encoder
    # One tokenizing thread per worker process: the pool is the parallelism. HF tokenizers reads
    # this variable on every batch call.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = encoder


@contextlib.contextmanager
def parallelism_configured_off() -> Iterator[None]:
    """Set TOKENIZERS_PARALLELISM=false while workers are created, then restore it.

    Children inherit the setting, so HF tokenizers neither warns nor needs to intervene when this
    process has already used its thread pool before forking.
    """
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _encode_in_worker(batch: _LineBatch) -> _EncodedBatch:
    return _worker_encoder(batch)


def _encoded_batches(config: PreprocessConfig, files: list[str], encoder: _BatchEncoder) -> Iterator[_EncodedBatch]:
    """Encoded batches in input order; at most 2 x workers batches are in flight."""
    batches = read_line_batches(files, config.batch_size)
    if config.workers == 1:
        yield from map(encoder, batches)
        return
    # fork: workers inherit the loaded tokenizer instead of re-importing and re-reading it (a
    # large share of the run time on small corpora); they start with HF tokenizers' threads off.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with parallelism_configured_off():
        pool = context.Pool(config.workers, _init_worker, (encoder,))
    with pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * config.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _validate(config: PreprocessConfig) -> None:
    if config.workers < 1 or config.batch_size < 1 or config.log_interval < 1:
        raise PreprocessError(
            f"workers ({config.workers}), batch_size ({config.batch_size}) and log_interval "
            f"({config.log_interval}) must all be >= 1"
        )
    if config.on_error not in ON_ERROR_CHOICES:
        raise PreprocessError(f"on_error must be one of {ON_ERROR_CHOICES}, got {config.on_error!r}")
    if not config.json_keys or len(set(config.json_keys)) != len(config.json_keys):
        raise PreprocessError(f"json_keys must be non-empty and distinct, got {config.json_keys}")


def preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Tokenize ``config.inputs`` into one indexed dataset per JSON key; see the module doc."""
    from tqdm import tqdm

    _validate(config)
    files = resolve_inputs(config.inputs)
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_path)
    dtype = best_token_dtype(tokenizer.vocab_size)
    encoder = _BatchEncoder(tokenizer, config.json_keys, config.append_eod, dtype)
    stats = PreprocessStats(
        documents=dict.fromkeys(config.json_keys, 0),
        tokens=dict.fromkeys(config.json_keys, 0),
        output_prefixes={key: output_prefix_for(config.output_prefix, key) for key in config.json_keys},
    )
    plain_sizes = [os.path.getsize(path) for path in files if not path.endswith(".gz")]
    total_bytes = sum(plain_sizes) if len(plain_sizes) == len(files) else None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        builders = {
            key: stack.enter_context(IndexedDatasetBuilder(prefix, dtype))
            for key, prefix in stats.output_prefixes.items()
        }
        bar = stack.enter_context(
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", disable=not config.progress)
        )
        results = stack.enter_context(contextlib.closing(_encoded_batches(config, files, encoder)))
        next_log = config.log_interval
        for result in results:
            for line_number, reason, detail in result.errors:
                where = f"{result.path}:{line_number}"
                if config.on_error == "fail" and reason != "blank line":
                    raise PreprocessError(
                        f"{where}: {reason}: {detail}. Fix the input or pass --on-error skip to skip bad lines"
                    )
                stats.skipped[reason] += 1
                stats.first_skipped.setdefault(reason, f"{where}: {detail}")
            for key, builder in builders.items():
                offset = 0
                for length in result.lengths[key]:
                    builder.add_item(result.tokens[key][offset : offset + length])
                    builder.end_document()
                    offset += length
                stats.documents[key] += len(result.lengths[key])
                stats.tokens[key] += offset
                if result.empty[key]:
                    stats.skipped[f"empty document ({key})"] += result.empty[key]
            stats.lines += result.num_lines
            stats.input_bytes += result.num_bytes
            bar.update(result.num_bytes)
            if stats.lines >= next_log:
                bar.set_postfix_str(f"{stats.lines / (time.perf_counter() - start):.0f} docs/s")
                next_log += config.log_interval
    stats.seconds = time.perf_counter() - start
    return stats


def format_summary(stats: PreprocessStats) -> str:
    """A few human-readable lines describing a finished run."""
    seconds = max(stats.seconds, 1e-9)
    lines = [
        f"read {stats.lines} lines ({stats.input_bytes / 1e6:.2f} MB) in {stats.seconds:.2f} s: "
        f"{stats.lines / seconds:.0f} docs/s, {stats.input_bytes / 1e6 / seconds:.2f} MB/s, "
        f"{sum(stats.tokens.values()) / seconds:.0f} tokens/s"
    ]
    for key, prefix in stats.output_prefixes.items():
        lines.append(f"{key}: {stats.documents[key]} documents, {stats.tokens[key]} tokens -> {prefix}.bin/.idx")
    for reason, count in sorted(stats.skipped.items()):
        example = f" (first: {stats.first_skipped[reason]})" if reason in stats.first_skipped else ""
        lines.append(f"skipped {count} x {reason}{example}")
    return "\n".join(lines)
