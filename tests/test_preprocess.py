"""tools/preprocess_data.py, tools/merge_datasets.py and the sample corpus, end to end."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

import numpy as np
import pytest
from data_fixtures import (  # noqa: F401
    REPO_ROOT,
    small_corpus_texts,
    tiny_tokenizer_dir,
    train_sentencepiece,
    write_jsonl,
)

from megatron_aquila.data.corpus import write_sample_corpus
from megatron_aquila.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_aquila.data.preprocess import PreprocessConfig, preprocess
from megatron_aquila.data.tokenizer import AquilaBBPETokenizer, SentencePieceTokenizer


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_tool = load_tool("preprocess_data")
merge_tool = load_tool("merge_datasets")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):  # noqa: F811
    return AquilaBBPETokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def texts():
    return small_corpus_texts(40)


def run_tool(tokenizer_dir, inputs, prefix, *extra: str) -> int:
    argv = ["--input", *map(str, inputs), "--output-prefix", str(prefix), "--tokenizer-type", "aquila-bbpe",
            "--tokenizer-path", str(tokenizer_dir), *extra]
    return preprocess_tool.main(argv)


def dataset_documents(dataset: IndexedDataset) -> list[list[int]]:
    """Each document's tokens (its sequences concatenated), read back from the files."""
    docs = dataset.document_indices
    return [
        [token for i in range(docs[d], docs[d + 1]) for token in dataset[i].tolist()] for d in range(len(docs) - 1)
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_end_to_end(tmp_path, tiny_tokenizer_dir, tokenizer, texts, workers):  # noqa: F811
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text, "id": i} for i, text in enumerate(texts)])
    prefix = tmp_path / "out"
    assert run_tool(tiny_tokenizer_dir, [corpus], prefix, "--append-eod", "--workers", str(workers),
                    "--batch-size", "7") == 0
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset.dtype == np.uint16
    assert len(dataset) == len(texts) and dataset.num_documents == len(texts)
    np.testing.assert_array_equal(dataset.document_indices, np.arange(len(texts) + 1))
    expected = [tokenizer.encode(text) + [tokenizer.eod] for text in texts]
    assert dataset_documents(dataset) == expected
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_sentencepiece_tokenizer(tmp_path, texts):
    model = train_sentencepiece(tmp_path, "spm")
    tokenizer = SentencePieceTokenizer(model)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for text in texts[:8]])
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "sentencepiece",
            "--tokenizer-path", model, "--append-eod", "--workers", "2", "--batch-size", "3"]
    assert preprocess_tool.main(argv) == 0
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset.dtype == np.uint16
    assert dataset_documents(dataset) == [tokenizer.encode(t) + [tokenizer.eod] for t in texts[:8]]


def test_two_keys_without_eod(tmp_path, tiny_tokenizer_dir, tokenizer, texts):  # noqa: F811
    records = [{"title": text[:30], "text": text} for text in texts[:10]]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    assert run_tool(tiny_tokenizer_dir, [corpus], tmp_path / "out", "--json-keys", "text", "title") == 0
    for key in ("text", "title"):
        dataset = IndexedDataset(str(tmp_path / f"out_{key}_document"))
        assert dataset_documents(dataset) == [tokenizer.encode(record[key]) for record in records]


def test_gzip_and_glob_inputs(tmp_path, tiny_tokenizer_dir, tokenizer, texts):  # noqa: F811
    shards = [texts[:15], texts[15:25], texts[25:]]
    write_jsonl(tmp_path / "shard_0.jsonl", [{"text": t} for t in shards[0]])
    with gzip.open(tmp_path / "shard_1.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": t}) + "\n" for t in shards[1])
    write_jsonl(tmp_path / "shard_2.jsonl", [{"text": t} for t in shards[2]])
    assert run_tool(tiny_tokenizer_dir, [tmp_path / "shard_*.jsonl*"], tmp_path / "out", "--append-eod",
                    "--workers", "2") == 0
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset_documents(dataset) == [tokenizer.encode(t) + [tokenizer.eod] for t in texts]


def test_tokenizer_parallelism_setting_is_restored(tmp_path, tiny_tokenizer_dir, texts, monkeypatch):  # noqa: F811
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for text in texts[:4]])
    assert run_tool(tiny_tokenizer_dir, [corpus], tmp_path / "out", "--workers", "2") == 0
    assert "TOKENIZERS_PARALLELISM" not in os.environ


BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated\n',
    "missing key": b'{"body": "no text key here"}\n',
    "non-string value": b'{"text": 42}\n',
    "invalid UTF-8": b'{"text": "caf\xe9 latin-1"}\n',
    "not a JSON object": b'["text", "a list"]\n',
    "untokenizable text": b'{"text": "lone surrogate \\ud800"}\n',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_fails_with_location_and_leaves_nothing(tmp_path, tiny_tokenizer_dir, texts, reason, workers,  # noqa: F811
                                                         capsys):
    good = [json.dumps({"text": text}).encode() + b"\n" for text in texts[:12]]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(b"".join(good[:9] + [BAD_LINES[reason]] + good[9:]))  # bad line is line 10
    code = run_tool(tiny_tokenizer_dir, [corpus], tmp_path / "out", "--workers", str(workers), "--batch-size", "4")
    assert code == 1
    error = capsys.readouterr().err
    assert f"{corpus}:10: {reason}" in error and "--on-error skip" in error
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_skip_mode_counts_reasons(tmp_path, tiny_tokenizer_dir, tokenizer, texts):  # noqa: F811
    good = texts[:6]
    lines = [json.dumps({"text": text}).encode() + b"\n" for text in good]
    lines[1:1] = [BAD_LINES["malformed JSON"], BAD_LINES["missing key"], b'{"text": ""}\n']
    lines[5:5] = [BAD_LINES["invalid UTF-8"], b"\n", BAD_LINES["malformed JSON"], BAD_LINES["non-string value"]]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_bytes(b"".join(lines))
    stats = preprocess(PreprocessConfig(
        inputs=[str(corpus)], output_prefix=str(tmp_path / "out"), tokenizer_type="aquila-bbpe",
        tokenizer_path=str(tiny_tokenizer_dir), append_eod=True, on_error="skip", batch_size=3, progress=False,
    ))
    assert dict(stats.skipped) == {
        "malformed JSON": 2, "missing key": 1, "invalid UTF-8": 1, "non-string value": 1,
        "blank line": 1, "empty document (text)": 1,
    }
    assert stats.first_skipped["malformed JSON"].startswith(f"{corpus}:2: ")
    assert stats.lines == len(lines) and stats.documents == {"text": len(good)}
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset_documents(dataset) == [tokenizer.encode(t) + [tokenizer.eod] for t in good]


def test_configuration_errors_leave_nothing(tmp_path, tiny_tokenizer_dir, capsys):  # noqa: F811
    assert run_tool(tiny_tokenizer_dir, [tmp_path / "none_*.jsonl"], tmp_path / "out") == 1
    assert "matches no files" in capsys.readouterr().err
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    assert run_tool(tiny_tokenizer_dir, [corpus], tmp_path / "missing_dir" / "out") == 1
    assert "does not exist" in capsys.readouterr().err
    assert run_tool(tmp_path / "no_tokenizer", [corpus], tmp_path / "out") == 1
    assert "no_tokenizer" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["c.jsonl"]


def test_merge_equals_concatenation(tmp_path, tiny_tokenizer_dir, tokenizer, texts, capsys):  # noqa: F811
    parts = [texts[:10], texts[10:13], texts[13:20]]
    for i, part in enumerate(parts):
        write_jsonl(tmp_path / f"part{i}.jsonl", [{"text": t} for t in part])
        assert run_tool(tiny_tokenizer_dir, [tmp_path / f"part{i}.jsonl"], tmp_path / f"p{i}", "--append-eod") == 0
    inputs = [str(tmp_path / f"p{i}_text_document") for i in range(3)]
    assert merge_tool.main(["--input", *inputs, "--output-prefix", str(tmp_path / "merged")]) == 0
    merged = IndexedDataset(str(tmp_path / "merged"))
    expected = [tokenizer.encode(t) + [tokenizer.eod] for part in parts for t in part]
    assert dataset_documents(merged) == expected
    np.testing.assert_array_equal(merged.document_indices, np.arange(len(expected) + 1))

    with IndexedDatasetBuilder(str(tmp_path / "wide"), np.int32) as builder:
        builder.add_document([1, 2, 3])
    before = sorted(os.listdir(tmp_path))
    assert merge_tool.main(["--input", inputs[0], str(tmp_path / "wide"), "--output-prefix",
                            str(tmp_path / "bad")]) == 1
    error = capsys.readouterr().err
    assert "different token dtypes" in error and "(uint16)" in error and "(int32)" in error
    assert sorted(os.listdir(tmp_path)) == before


def test_sample_corpus_is_deterministic_jsonl(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    documents, written = write_sample_corpus(first, target_mb=0.2)
    write_sample_corpus(second, target_mb=0.2)
    assert first.read_bytes() == second.read_bytes()
    assert written == first.stat().st_size >= 200_000
    lines = first.read_text("utf-8").splitlines()
    assert len(lines) == documents
    assert all(isinstance(json.loads(line)["text"], str) and json.loads(line)["text"] for line in lines)
