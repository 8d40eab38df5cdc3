"""Aquila2 fine-tuning conversations -> token and loss-mask indexed datasets (``tools/preprocess_data.py --sft``).

Inputs are ``.jsonl`` (one conversation object per line) or ``.json`` (one JSON list of
conversation objects) files, each optionally ``.gz``; the record format and templates are in
``chat_template``. Each conversation is rendered with the chat template, tokenized once and
written as one document to two datasets with identical sequence lengths (docs/design.md section 4):

* ``{prefix}_sft_tokens_document``: token ids, ``best_token_dtype(vocab_size)``;
* ``{prefix}_sft_loss_mask_document``: uint8, 1 where the token is trained on.

**Truncation.** A conversation longer than ``seq_length`` tokens is cut after the last assistant
turn that ends within ``seq_length`` tokens, so it still ends with ``</s>`` ("truncated at a
turn"). When not even the first assistant turn fits, the first ``seq_length`` tokens are kept ("cut
inside a turn"); if none of them carries loss the conversation is skipped and counted, since it
would train on nothing.

**Errors.** A malformed record (bad UTF-8 or JSON, not an object, missing or empty
``conversations``, unknown role, turns out of order, non-string value, ...) fails the run with
``file:line: reason: detail`` (``file:item N`` for the N-th, 0-based, element of a ``.json`` list)
and leaves no output, or is skipped and counted with ``on_error="skip"``. A ``.json`` file that
is not valid JSON or not a list fails in both modes: the records inside it cannot be told apart.
Blank lines are always skipped and counted.

**Outputs appear together.** Both datasets are built in a hidden staging directory beside the
outputs (``.{prefix}_sft_tokens_document.*.tmp``) and move to their final names only when both are
complete. The four files are then renamed one by one; an earlier run's files under the same names
are first moved into the staging directory, and if any rename fails every final name gets its
earlier file back (or none, where there was none). So a failed run leaves the previous token /
loss-mask pair as it was, never one dataset of each run, and the staging directory is removed
either way (only a process killed during the renames can leave a mixed pair).

Parsing and tokenizing run in ``workers`` processes (1: in this process), batches coming back in
input order with at most 2 x workers in flight, as in ``preprocess``.
"""
from __future__ import annotations

import collections
import contextlib
import gzip
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from megatron_aquila.data.chat_template import (
    CHAT_TEMPLATES,
    ConversationError,
    render_conversation,
    require_template_tokens,
    tokenize_conversation,
)
from megatron_aquila.data.indexed_dataset import (
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_token_dtype,
    data_file_path,
    index_file_path,
)
from megatron_aquila.data.preprocess import (
    ON_ERROR_CHOICES,
    PreprocessError,
    parallelism_configured_off,
    read_line_batches,
    output_prefix_for,
    resolve_inputs,
)
from megatron_aquila.data.tokenizer import Tokenizer, build_tokenizer

TOKENS_KEY, LOSS_MASK_KEY = "sft_tokens", "sft_loss_mask"
TRUNCATED_AT_TURN, CUT_INSIDE_TURN = "truncated at a turn", "cut inside a turn"
BLANK_LINE, NO_LOSS_TOKENS = "blank line", "no loss tokens within seq_length"
ALWAYS_SKIPPED = (BLANK_LINE, NO_LOSS_TOKENS)  # counted, never fail the run
_BATCH_SIZE = 64  # records per unit of work sent to a worker


@dataclass
class SFTPreprocessConfig:
    """Everything one SFT preprocessing run needs."""

    inputs: list[str]  # .jsonl / .json files (optionally .gz) or glob patterns
    output_prefix: str  # outputs are {output_prefix}_sft_tokens_document and _sft_loss_mask_document
    tokenizer_type: str  # "aquila-bbpe" or "sentencepiece"
    tokenizer_path: str
    chat_template: str  # one of CHAT_TEMPLATES
    seq_length: int  # longest conversation kept, in tokens; longer ones are truncated
    workers: int = 1  # tokenizing processes; 1 tokenizes in the main process
    on_error: str = "fail"  # "fail" or "skip" malformed records
    progress: bool = True  # show a tqdm progress bar on stderr


@dataclass
class SFTPreprocessStats:
    """What a run read, wrote, truncated and skipped."""

    records: int = 0  # .jsonl lines and .json list items read, blank lines included
    conversations: int = 0  # documents written to each dataset
    tokens: int = 0
    loss_tokens: int = 0
    truncated_at_turn: int = 0
    cut_inside_turn: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> count
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "file:line: detail"
    seconds: float = 0.0
    output_prefixes: dict[str, str] = field(default_factory=dict)  # TOKENS_KEY / LOSS_MASK_KEY -> prefix

    @property
    def bad_records(self) -> int:
        return sum(count for reason, count in self.skipped.items() if reason not in ALWAYS_SKIPPED)


@dataclass
class _RecordBatch:
    path: str
    labels: list[str]  # where each record is: "12" (line) or "item 3"
    records: list[Any]  # raw .jsonl lines (bytes) when raw, else parsed .json items
    raw: bool


@dataclass
class _EncodedBatch:
    path: str
    num_records: int
    tokens: np.ndarray  # [sum(lengths)] every kept conversation's ids back to back
    loss_mask: np.ndarray  # [sum(lengths)] uint8, aligned with tokens
    lengths: list[int]  # tokens per kept conversation
    errors: list[tuple[str, str, str]]  # (label, reason, detail) in input order
    truncated_at_turn: int
    cut_inside_turn: int


def sft_dataset_prefixes(output_prefix: str) -> tuple[str, str]:
    """(token dataset prefix, loss-mask dataset prefix) written for ``output_prefix``."""
    return output_prefix_for(output_prefix, TOKENS_KEY), output_prefix_for(output_prefix, LOSS_MASK_KEY)


def truncate_conversation(
    ids: list[int], loss_mask: list[int], turn_ends: list[int], seq_length: int
) -> tuple[list[int], list[int], str | None]:
    """Cut a conversation to at most ``seq_length`` tokens (module doc).

    Returns (ids, loss mask, None | TRUNCATED_AT_TURN | CUT_INSIDE_TURN); ``turn_ends`` are the
    token counts through each assistant turn, as ``tokenize_conversation`` returns them.
    """
    if len(ids) <= seq_length:
        return ids, loss_mask, None
    fitting = [end for end in turn_ends if end <= seq_length]
    if fitting:
        return ids[: fitting[-1]], loss_mask[: fitting[-1]], TRUNCATED_AT_TURN
    return ids[:seq_length], loss_mask[:seq_length], CUT_INSIDE_TURN


def _input_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix):
            return suffix
    raise PreprocessError(
        f"--input {path}: unknown format; SFT inputs are .jsonl (one conversation per line) or .json "
        f"(one JSON list of conversations), optionally compressed as .gz"
    )


def _read_json_list(path: str) -> list[Any]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise PreprocessError(f"{path}: cannot read: {error}") from error
    whole = "a .json input is parsed whole, so nothing inside it can be skipped; fix it or convert it to .jsonl"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PreprocessError(f"{path}:{line}: invalid UTF-8: byte {error.start} of the file: {error.reason}; "
                              f"{whole}") from error
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise PreprocessError(f"{path}:{error.lineno}: malformed JSON: {error.msg} at column {error.colno}; "
                              f"{whole}") from error
    if not isinstance(items, list):
        raise PreprocessError(
            f"{path}: a .json input must hold one JSON list of conversation objects, got a JSON "
            f"{type(items).__name__}; put one conversation per line in a .jsonl file instead"
        )
    return items


def _record_batches(files: list[str]) -> Iterator[_RecordBatch]:
    for path in files:
        if _input_format(path) == ".jsonl":
            for batch in read_line_batches([path], _BATCH_SIZE):
                labels = [str(line) for line in range(batch.first_line, batch.first_line + len(batch.lines))]
                yield _RecordBatch(path, labels, batch.lines, True)
        else:
            items = _read_json_list(path)
            for start in range(0, len(items), _BATCH_SIZE):
                chunk = items[start : start + _BATCH_SIZE]
                labels = [f"item {index}" for index in range(start, start + len(chunk))]
                yield _RecordBatch(path, labels, chunk, False)


def _parse_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConversationError("invalid UTF-8", f"byte {error.start} of the line: {error.reason}; "
                                f"re-encode the file as UTF-8") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConversationError("malformed JSON", f"{error.msg} at column {error.colno}; each line must be one "
                                f"complete JSON object") from error


class _ConversationEncoder:
    """Parses, renders, tokenizes and truncates one batch of records."""

    def __init__(self, tokenizer: Tokenizer, template: str, seq_length: int, dtype: np.dtype):
        self.tokenizer, self.template, self.seq_length, self.dtype = tokenizer, template, seq_length, dtype

    def _encode(self, record: Any) -> tuple[list[int], list[int], str | None]:
        rendered = render_conversation(record, self.template)
        try:
            ids, loss_mask, turn_ends = tokenize_conversation(rendered, self.tokenizer)
        except Exception as error:  # e.g. lone surrogates from JSON "\ud800" escapes
            raise ConversationError("untokenizable text", str(error)) from error
        ids, loss_mask, truncation = truncate_conversation(ids, loss_mask, turn_ends, self.seq_length)
        if not any(loss_mask):
            raise ConversationError(
                NO_LOSS_TOKENS,
                f"the first assistant answer starts after token {self.seq_length}; raise seq_length or shorten "
                f"the system message and first human turn",
            )
        return ids, loss_mask, truncation

    def __call__(self, batch: _RecordBatch) -> _EncodedBatch:
        errors: list[tuple[str, str, str]] = []
        ids_list, masks, truncations = [], [], collections.Counter()
        for label, record in zip(batch.labels, batch.records):
            try:
                if batch.raw:
                    if not record.strip():
                        raise ConversationError(BLANK_LINE, "the line is empty")
                    record = _parse_line(record)
                ids, loss_mask, truncation = self._encode(record)
            except ConversationError as error:
                errors.append((label, error.reason, error.detail))
                continue
            ids_list.append(ids)
            masks.append(loss_mask)
            truncations[truncation] += 1
        lengths = [len(ids) for ids in ids_list]
        total = sum(lengths)
        tokens = np.fromiter((i for ids in ids_list for i in ids), np.int64, total).astype(self.dtype)
        loss_mask = np.fromiter((m for mask in masks for m in mask), np.uint8, total)
        return _EncodedBatch(batch.path, len(batch.records), tokens, loss_mask, lengths, errors,
                             truncations[TRUNCATED_AT_TURN], truncations[CUT_INSIDE_TURN])


_worker_encoder: _ConversationEncoder | None = None  # one per worker process, set by _init_worker


def _init_worker(encoder: _ConversationEncoder) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_encoder = encoder


def _encode_in_worker(batch: _RecordBatch) -> _EncodedBatch:
    return _worker_encoder(batch)


def _encoded_batches(batches: Iterator[_RecordBatch], encoder: _ConversationEncoder,
                     workers: int) -> Iterator[_EncodedBatch]:
    """Encoded batches in input order; at most 2 x workers batches are in flight."""
    if workers == 1:
        yield from map(encoder, batches)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with parallelism_configured_off():
        pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (encoder,))
    with pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def _staged(prefixes: list[str]) -> Iterator[list[str]]:
    """Yield one staging prefix per final prefix, in a hidden directory beside them; on a clean exit
    publish every staged dataset under its final prefix (``_publish``). The directory is removed
    either way, and with it whatever a failed run staged."""
    directory = os.path.dirname(os.path.abspath(prefixes[0]))
    if not os.path.isdir(directory):
        raise IndexedDatasetError(f"output directory {directory} does not exist; create it first")
    staging = tempfile.mkdtemp(dir=directory, prefix=f".{os.path.basename(prefixes[0])}.", suffix=".tmp")
    try:
        staged = [os.path.join(staging, os.path.basename(prefix)) for prefix in prefixes]
        yield staged
        _publish([(path(old), path(new)) for old, new in zip(staged, prefixes)
                  for path in (data_file_path, index_file_path)], staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(moves: list[tuple[str, str]], backup_directory: str) -> None:
    """Rename each (staged, final) file pair; if one rename fails, give every final path its earlier file back.

    An existing final file is first moved to ``backup_directory`` (same filesystem), so the undo is
    renames too: remove the new files already placed, move the backups back.
    """
    backups: list[tuple[str, str]] = []  # (backup, final) for every final path that held an earlier file
    placed: list[str] = []  # final paths that hold a new file
    try:
        for staged, final in moves:
            if os.path.exists(final):
                backup = os.path.join(backup_directory, f"previous-{len(backups)}")
                os.replace(final, backup)
                backups.append((backup, final))
            os.replace(staged, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            os.remove(final)
        for backup, final in backups:
            os.replace(backup, final)
        raise


def _validate(config: SFTPreprocessConfig) -> None:
    if config.chat_template not in CHAT_TEMPLATES:
        raise PreprocessError(f"chat_template {config.chat_template!r} is unknown; choose one of "
                              f"{', '.join(CHAT_TEMPLATES)}")
    if config.seq_length < 1 or config.workers < 1:
        raise PreprocessError(f"seq_length ({config.seq_length}) and workers ({config.workers}) must be >= 1")
    if config.on_error not in ON_ERROR_CHOICES:
        raise PreprocessError(f"on_error must be one of {ON_ERROR_CHOICES}, got {config.on_error!r}")


def preprocess_sft(config: SFTPreprocessConfig) -> SFTPreprocessStats:
    """Write ``config.inputs``' conversations as token and loss-mask datasets; see the module doc."""
    from tqdm import tqdm

    _validate(config)
    files = resolve_inputs(config.inputs)
    for path in files:
        _input_format(path)
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_path)
    try:
        require_template_tokens(config.chat_template, tokenizer)
    except ValueError as error:
        raise PreprocessError(f"--tokenizer-path {config.tokenizer_path}: {error}") from error
    token_dtype = best_token_dtype(tokenizer.vocab_size)
    encoder = _ConversationEncoder(tokenizer, config.chat_template, config.seq_length, token_dtype)
    tokens_prefix, mask_prefix = sft_dataset_prefixes(config.output_prefix)
    stats = SFTPreprocessStats(output_prefixes={TOKENS_KEY: tokens_prefix, LOSS_MASK_KEY: mask_prefix})
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # exits in reverse: builders aborted, then staging published or removed
        staged = stack.enter_context(_staged([tokens_prefix, mask_prefix]))
        builders = []
        for prefix, dtype in zip(staged, (token_dtype, np.uint8)):
            builders.append(IndexedDatasetBuilder(prefix, dtype))
            stack.callback(builders[-1].abort)  # no-op once finalized
        tokens_builder, mask_builder = builders
        bar = stack.enter_context(tqdm(unit=" records", desc="sft preprocess", disable=not config.progress))
        results = stack.enter_context(
            contextlib.closing(_encoded_batches(_record_batches(files), encoder, config.workers))
        )
        for result in results:
            for label, reason, detail in result.errors:
                where = f"{result.path}:{label}"
                if config.on_error == "fail" and reason not in ALWAYS_SKIPPED:
                    raise PreprocessError(
                        f"{where}: {reason}: {detail}. Fix the record or pass --on-error skip to skip bad records"
                    )
                stats.skipped[reason] += 1
                stats.first_skipped.setdefault(reason, f"{where}: {detail}")
            offset = 0
            for length in result.lengths:
                tokens_builder.add_document(result.tokens[offset : offset + length])
                mask_builder.add_document(result.loss_mask[offset : offset + length])
                offset += length
            stats.records += result.num_records
            stats.conversations += len(result.lengths)
            stats.tokens += offset
            stats.loss_tokens += int(result.loss_mask.sum(dtype=np.int64))
            stats.truncated_at_turn += result.truncated_at_turn
            stats.cut_inside_turn += result.cut_inside_turn
            bar.update(result.num_records)
        for builder in builders:
            builder.finalize()  # into the staging directory
    stats.seconds = time.perf_counter() - start
    return stats


def format_sft_summary(stats: SFTPreprocessStats) -> str:
    """A few human-readable lines describing a finished run."""
    seconds = max(stats.seconds, 1e-9)
    share = 100.0 * stats.loss_tokens / max(stats.tokens, 1)
    lines = [
        f"read {stats.records} records in {stats.seconds:.2f} s ({stats.records / seconds:.0f} records/s)",
        f"conversations written: {stats.conversations} -> "
        + ", ".join(f"{prefix}.bin/.idx" for prefix in stats.output_prefixes.values()),
        f"skipped (bad): {stats.bad_records}",
        f"truncated at a turn: {stats.truncated_at_turn}",
        f"cut inside a turn: {stats.cut_inside_turn}",
        f"tokens: {stats.tokens}, loss tokens: {stats.loss_tokens} ({share:.1f}%)",
    ]
    for reason, count in sorted(stats.skipped.items()):
        lines.append(f"skipped {count} x {reason} (first: {stats.first_skipped[reason]})")
    return "\n".join(lines)
