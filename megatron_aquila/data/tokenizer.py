"""Tokenizers behind one interface: Aquila's byte-level BPE and SentencePiece (docs/design.md section 7).

``build_tokenizer("aquila-bbpe", directory_or_tokenizer_json)`` loads Aquila2's GPT-2-style
byte-level BPE with the Hugging Face ``tokenizers`` library; ``build_tokenizer("sentencepiece",
model_file)`` loads a LLaMA-style SentencePiece model. ``train_tiny_bbpe`` trains a small
Aquila-compatible BPE (same special tokens, same layout) for tests and CPU recipes.
"""
from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Iterable

# Aquila2's special tokens, in the order they follow the 100000-entry vocab.json (ids 100000+).
AQUILA_SPECIAL_TOKENS = (
    "<|startofpiece|>",
    "<|endofpiece|>",
    "<|LDWANG|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "[CLS]",
    "</s>",
)
AQUILA_UNK_PAD_TOKEN = "<|endoftext|>"  # id 0 of vocab.json
AQUILA_BOS_TOKEN = "[CLS]"
AQUILA_EOS_TOKEN = "</s>"

TOKENIZER_KINDS = ("aquila-bbpe", "sentencepiece")


class Tokenizer(abc.ABC):
    """What the data pipeline needs from a tokenizer.

    ``vocab_size`` is the unpadded size including special tokens (the model pads it);
    ``eod`` ends every document, ``bos`` starts a sequence when asked for, ``pad`` fills.
    """

    vocab_size: int
    eod: int
    bos: int
    pad: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no bos/eos added."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, usually faster."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens kept as their text)."""


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    return path


class AquilaBBPETokenizer(Tokenizer):
    """Aquila2's GPT-2-style byte-level BPE (HF ``tokenizers``).

    ``path`` is either a ``tokenizer.json`` or a directory holding ``vocab.json`` and
    ``merges.txt`` (plus optional ``special_tokens.txt``, one token per line, appended after the
    vocab in file order). Byte-level settings follow Aquila's ``tokenizer_config.json``
    (GPT2Tokenizer, ``add_prefix_space`` false, GPT-2 split regex). ``<|endoftext|>`` (id 0) is
    pad and unk, ``[CLS]`` is bos and ``</s>`` the end-of-document token; a
    ``special_tokens_map.json`` next to the files overrides these names.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        path = Path(path)
        if path.is_file() and path.suffix == ".json":
            self._tokenizer = HFTokenizer.from_file(str(path))
            directory = path.parent
        elif path.is_dir():
            directory = path
            tokenizer_json = path / "tokenizer.json"
            if tokenizer_json.is_file() and not (path / "vocab.json").is_file():
                self._tokenizer = HFTokenizer.from_file(str(tokenizer_json))
            else:
                vocab = _require_file(path / "vocab.json", "aquila-bbpe tokenizer needs vocab.json")
                merges = _require_file(path / "merges.txt", "aquila-bbpe tokenizer needs merges.txt")
                model = models.BPE.from_file(str(vocab), str(merges))
                self._tokenizer = HFTokenizer(model)
                self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
                self._tokenizer.decoder = decoders.ByteLevel()
            specials_file = path / "special_tokens.txt"
            specials = [AQUILA_UNK_PAD_TOKEN]
            if specials_file.is_file():
                specials += [line.strip() for line in specials_file.read_text("utf-8").splitlines() if line.strip()]
            # Adding a token already in the vocab keeps its id; new ones get the next ids in order.
            self._tokenizer.add_special_tokens(specials)
        else:
            raise FileNotFoundError(
                f"aquila-bbpe tokenizer path {path} is neither a tokenizer.json nor a directory "
                f"with vocab.json and merges.txt"
            )
        names = {"bos_token": AQUILA_BOS_TOKEN, "eos_token": AQUILA_EOS_TOKEN, "pad_token": AQUILA_UNK_PAD_TOKEN}
        special_map = directory / "special_tokens_map.json"
        if special_map.is_file():
            for key, value in json.loads(special_map.read_text("utf-8")).items():
                if key in names:
                    names[key] = value["content"] if isinstance(value, dict) else value
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos = self._token_id(names["bos_token"], path)
        self.eod = self._token_id(names["eos_token"], path)
        self.pad = self._token_id(names["pad_token"], path)

    def _token_id(self, token: str, path: Path) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer at {path} has no token {token!r}; add it to special_tokens.txt")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking, which we never read.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A LLaMA-style SentencePiece model; bos/eos/pad ids come from the model.

    Models without a pad piece (LLaMA's has pad_id -1) pad with the eos id.
    """

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece

        model_file = _require_file(Path(model_file), "sentencepiece tokenizer needs a .model file")
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self._processor.vocab_size()
        self.bos = self._processor.bos_id()
        self.eod = self._processor.eos_id()
        if self.eod < 0:
            raise ValueError(f"sentencepiece model {model_file} has no eos piece; train it with eos_id >= 0")
        self.pad = self._processor.pad_id() if self._processor.pad_id() >= 0 else self.eod

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._processor.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode(list(ids))


def build_tokenizer(kind: str, path: str | os.PathLike) -> Tokenizer:
    """``kind`` is ``"aquila-bbpe"`` (directory or tokenizer.json) or ``"sentencepiece"`` (.model)."""
    if kind == "aquila-bbpe":
        return AquilaBBPETokenizer(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")


def train_tiny_bbpe(texts: Iterable[str], output_dir: str | os.PathLike, vocab_size: int = 8192) -> Path:
    """Train an Aquila-layout byte-level BPE and save vocab.json, merges.txt, special_tokens.txt.

    Id 0 is ``<|endoftext|>``, then the 256 byte symbols and the learned merges; the 8 Aquila
    special tokens follow in Aquila's order, so ``vocab_size`` counts them. The same texts give
    the same files (training is single-threaded to make merge ties deterministic).
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    base_size = vocab_size - len(AQUILA_SPECIAL_TOKENS)
    minimum = 1 + len(pre_tokenizers.ByteLevel.alphabet())
    if base_size <= minimum:
        raise ValueError(f"vocab_size {vocab_size} too small: need more than {minimum + len(AQUILA_SPECIAL_TOKENS)}")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        min_frequency=2,
        special_tokens=[AQUILA_UNK_PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokenizer.train_from_iterator(texts, trainer=trainer)
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(output_dir))
    (output_dir / "special_tokens.txt").write_text("".join(token + "\n" for token in AQUILA_SPECIAL_TOKENS), "utf-8")
    return output_dir
