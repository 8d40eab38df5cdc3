"""Tokenizers: the real Aquila BBPE against docs/design.md s.7 and an independent GPT-2 reference,
SentencePiece round trips, the factory's errors, and the tiny BPE's layout and determinism."""
from __future__ import annotations

import json

import pytest
from data_fixtures import (  # noqa: F401
    require_aquila_tokenizer,
    small_corpus_texts,
    tiny_tokenizer_dir,
    train_sentencepiece,
)

from megatron_aquila.data.tokenizer import (
    AQUILA_SPECIAL_TOKENS,
    AquilaBBPETokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    train_tiny_bbpe,
)

SAMPLES = [
    "Hello world!\n",
    "  It's 2024: naïve café -- 你好，世界。 déjà vu\tTabs\r\nand   spaces   ",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "Ünïcödé 🚀 emoji, numbers 1234567 and 3.14159",
    "",
]


@pytest.fixture(scope="module")
def aquila():
    return build_tokenizer("aquila-bbpe", str(require_aquila_tokenizer()))


def test_aquila_facts(aquila):
    assert aquila.vocab_size == 100008
    assert (aquila.pad, aquila.bos, aquila.eod) == (0, 100006, 100007)
    assert aquila.encode("\n") == [199]
    assert aquila.encode("<|endoftext|>") == [0]
    for offset, token in enumerate(AQUILA_SPECIAL_TOKENS):
        assert aquila.encode(token) == [100000 + offset], token
    assert AQUILA_SPECIAL_TOKENS[6:] == ("[CLS]", "</s>")


def test_aquila_matches_slow_gpt2_reference(aquila):
    """transformers' pure-Python GPT2Tokenizer is an independent BPE implementation."""
    transformers = pytest.importorskip("transformers")
    directory = require_aquila_tokenizer()
    reference = transformers.GPT2Tokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), add_prefix_space=False
    )
    texts = SAMPLES + small_corpus_texts(5)
    for text in texts:
        assert aquila.encode(text) == reference.encode(text), text[:60]
    assert aquila.encode_batch(texts) == [aquila.encode(text) for text in texts]


def test_aquila_round_trip_and_specials_in_text(aquila):
    text = "Question: [MASK] is?</s>[CLS] next\n"
    ids = aquila.encode(text)
    assert 100003 in ids and 100007 in ids and 100006 in ids
    assert aquila.decode(ids) == text
    for sample in SAMPLES:
        assert aquila.decode(aquila.encode(sample)) == sample


def test_aquila_from_tokenizer_json(aquila, tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    directory = require_aquila_tokenizer()
    reference = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    reference.add_special_tokens(["<|endoftext|>", *AQUILA_SPECIAL_TOKENS])
    reference.save(str(tmp_path / "tokenizer.json"))
    loaded = build_tokenizer("aquila-bbpe", str(tmp_path / "tokenizer.json"))
    assert (loaded.vocab_size, loaded.bos, loaded.eod, loaded.pad) == (100008, 100006, 100007, 0)
    for sample in SAMPLES:
        assert loaded.encode(sample) == aquila.encode(sample)


def test_sentencepiece_round_trip(tmp_path):
    model = train_sentencepiece(tmp_path, "llama_like")  # unk 0, bos 1, eos 2, no pad (as LLaMA)
    tokenizer = build_tokenizer("sentencepiece", model)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (400, 1, 2, 2)
    texts = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé 🚀 and 你好 via byte fallback"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids and all(0 <= i < 400 for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_sentencepiece_pad_from_model(tmp_path):
    model = train_sentencepiece(tmp_path, "with_pad", pad_id=3)
    assert build_tokenizer("sentencepiece", model).pad == 3


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'gpt2'.*aquila-bbpe, sentencepiece"):
        build_tokenizer("gpt2", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a tokenizer.json nor a directory"):
        build_tokenizer("aquila-bbpe", str(tmp_path / "missing"))
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="needs merges.txt"):
        build_tokenizer("aquila-bbpe", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="needs a .model file"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))


def test_tiny_bbpe_layout(tiny_tokenizer_dir):  # noqa: F811
    tokenizer = AquilaBBPETokenizer(tiny_tokenizer_dir)
    vocab = json.loads((tiny_tokenizer_dir / "vocab.json").read_text("utf-8"))
    assert vocab["<|endoftext|>"] == 0 and len(vocab) == 1024 - 8
    assert tokenizer.vocab_size == 1024
    for offset, token in enumerate(AQUILA_SPECIAL_TOKENS):
        assert tokenizer.encode(token) == [1016 + offset]
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eod) == (0, 1022, 1023)
    assert tokenizer.encode("\n") == [vocab["Ċ"]]
    for sample in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(sample)) == sample
    text = small_corpus_texts(1)[0]
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2  # merges were learned


def test_tiny_bbpe_is_deterministic(tmp_path):
    texts = small_corpus_texts(20)
    first = train_tiny_bbpe(texts, tmp_path / "first", vocab_size=700)
    second = train_tiny_bbpe(texts, tmp_path / "second", vocab_size=700)
    for name in ("vocab.json", "merges.txt", "special_tokens.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
