"""Shared helpers for the data-pipeline tests: the real Aquila tokenizer and a tiny corpus/BPE."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_aquila.data.corpus import iter_documents
from megatron_aquila.data.tokenizer import train_tiny_bbpe

REPO_ROOT = Path(__file__).resolve().parents[1]


def aquila_tokenizer_dir() -> Path:
    """The real Aquila tokenizer files: $MEGATRON_AQUILA_TOKENIZER_DIR or ../shared/aquila_tokenizer."""
    override = os.environ.get("MEGATRON_AQUILA_TOKENIZER_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "aquila_tokenizer"


def require_aquila_tokenizer() -> Path:
    directory = aquila_tokenizer_dir()
    if not (directory / "vocab.json").is_file() or not (directory / "merges.txt").is_file():
        message = (f"real Aquila tokenizer not found at {directory} (vocab.json + merges.txt); "
                   f"set MEGATRON_AQUILA_TOKENIZER_DIR to the directory holding them")
        if os.environ.get("CI"):  # CI has shared/ beside the clone: a missing tokenizer is a failure there
            pytest.fail(message)
        pytest.skip(message)
    return directory


def small_corpus_texts(count: int = 60) -> list[str]:
    """The first ``count`` documents of the deterministic sample corpus (pydoc topics)."""
    texts = []
    for text in iter_documents():
        texts.append(text)
        if len(texts) == count:
            return texts
    return texts


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def train_sentencepiece(directory: Path, name: str, **options) -> str:
    """Train a 400-piece LLaMA-style (byte-fallback BPE) SentencePiece model; returns the .model path."""
    spm = pytest.importorskip("sentencepiece")
    corpus = directory / f"{name}.txt"
    corpus.write_text("\n".join(small_corpus_texts(30)), "utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / name), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2, **options,
    )
    return str(directory / f"{name}.model")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 1024-entry Aquila-layout byte-level BPE trained on the small corpus."""
    return train_tiny_bbpe(small_corpus_texts(), tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=1024)
