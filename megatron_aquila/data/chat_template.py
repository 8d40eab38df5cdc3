"""AquilaChat2 conversation templates: render a conversation once, mark what carries loss, tokenize once.

A record in Aquila2's fine-tuning format is ``{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...], "system": optional}``. Turns alternate human, gpt, ...,
starting with human after an optional first ``"from": "system"`` turn, and end with gpt. An empty
``system`` ("" or null) means none; a non-empty ``instruction`` is refused (neither template has a
slot for it, and dropping it silently would change the data).

Templates, as AquilaChat2 (FastChat's ``aquila-v1`` and ``aquila``) define them, with
``{h}`` a human text and ``{a}`` an assistant text:

* ``aquila-v1`` (AquilaChat2-7B): ``<|startofpiece|>{h}<|endofpiece|>{a}</s>`` per exchange, no
  system message. A record with a system message is refused (``ConversationError``) rather than
  silently trained without it: use ``aquila`` for such data.
* ``aquila`` (the 16K chat models): ``{system}###`` then ``Human: {h}###Assistant: {a}</s>`` per
  exchange; ``{system}`` is the record's system message or ``AQUILA_SYSTEM_MESSAGE``.

**What carries loss.** Exactly what the model must generate when given ``render_prompt``'s text:
for each assistant turn, the characters after the prompt's end (``<|endofpiece|>`` or
``Assistant:``) up to and including that turn's ``</s>``. For ``aquila-v1`` that is ``{a}</s>``;
for ``aquila`` it is `` {a}</s>``, the space of ``Assistant: `` included. That space is not a
role marker to the model: a prompt ends at ``Assistant:``, so the first token generated carries it
(``" hello"``, or a lone ``" "`` before Chinese text, which Aquila's BPE keeps separate). Everything
else (system message, human turns, ``###``, ``Human: ``, ``Assistant:``, ``<|startofpiece|>``,
``<|endofpiece|>``) has mask 0.

**Tokens straddling a boundary.** The text is tokenized once; a token has mask 1 only if it lies
wholly inside a loss span (its character offsets ``[start, end)`` satisfy ``a <= start < b`` and
``end <= b``). With Aquila's BPE no token straddles: every span starts after ``:`` or a special
token and ends with ``</s>``, and both are token boundaries.

**Special tokens** are matched by the tokenizer as added tokens, so ``<|startofpiece|>``,
``<|endofpiece|>`` and ``</s>`` become ids 100000, 100001 and 100007 (docs/design.md section 7),
never pieces of text. As in Hugging Face and FastChat, such a string inside a message becomes the
special id too. SentencePiece has no added tokens: its text is split at every Aquila special token
the model has as a piece, and each part is encoded with byte offsets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from megatron_aquila.data.tokenizer import (
    AQUILA_SPECIAL_TOKENS,
    AquilaBBPETokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

CHAT_TEMPLATES: tuple[str, ...] = ("aquila-v1", "aquila")
HUMAN, GPT, SYSTEM = "human", "gpt", "system"
ROLES = (HUMAN, GPT, SYSTEM)
AQUILA_SYSTEM_MESSAGE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
END_OF_TURN = "</s>"


class ConversationError(ValueError):
    """A conversation that does not fit the format or the template; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class _Template:
    system: bool  # has a system message (default AQUILA_SYSTEM_MESSAGE), followed by system_separator
    system_separator: str
    human_prefix: str
    human_suffix: str
    assistant_marker: str  # where a prompt ends; loss starts right after it
    assistant_prefix: str  # generated, so it carries loss
    special_tokens: tuple[str, ...]  # the Aquila special tokens the template writes


_TEMPLATES = {
    "aquila-v1": _Template(False, "", "<|startofpiece|>", "", "<|endofpiece|>", "",
                           ("<|startofpiece|>", "<|endofpiece|>", END_OF_TURN)),
    "aquila": _Template(True, "###", "Human: ", "###", "Assistant:", " ", (END_OF_TURN,)),
}


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation as one string plus the character spans that carry loss."""

    template: str
    text: str
    loss_spans: tuple[tuple[int, int], ...]  # [start, end) per assistant turn, ending just after its </s>

    @property
    def turn_ends(self) -> tuple[int, ...]:
        """Character offset just past each assistant turn's ``</s>``."""
        return tuple(end for _, end in self.loss_spans)


def _template(name: str) -> _Template:
    if name not in _TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    return _TEMPLATES[name]


def _check_order(roles: list[str], names: list[str], last: str) -> None:
    """Turns alternate human, gpt, ... from human and end with ``last``; ``names`` locate them."""
    for index, (role, name) in enumerate(zip(roles, names)):
        expected = HUMAN if index % 2 == 0 else GPT
        if role == SYSTEM:
            raise ConversationError(
                "turns out of order", f"{name} is from 'system'; only the first turn may be a system turn"
            )
        if role != expected:
            raise ConversationError(
                "turns out of order",
                f"{name} is from {role!r} where a {expected!r} turn belongs: turns must alternate "
                f"human, gpt, human, gpt, ... starting with human (after an optional system turn)",
            )
    if not roles:
        wanted = "a human turn and its gpt answer" if last == GPT else "the human turn to answer"
        raise ConversationError("turns out of order", f"there is no turn besides the system message; add {wanted}")
    if roles[-1] != last:
        fix = ("drop the unanswered human turn or add its gpt answer" if last == GPT
               else "a prompt ends with the human turn to answer")
        raise ConversationError("turns out of order", f"the last turn {names[-1]} is from {roles[-1]!r}: {fix}")


def _optional_text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConversationError("non-string value", f"{key!r} holds a {type(value).__name__}, expected a string")
    return value


def _parse_conversation(record: Any) -> tuple[str, list[tuple[str, str]]]:
    """Validate an Aquila2 fine-tuning record; returns (system message or "", [(role, text), ...])."""
    if not isinstance(record, Mapping):
        raise ConversationError(
            "not a JSON object", f"got a JSON {type(record).__name__}, expected an object with a 'conversations' list"
        )
    if "conversations" not in record:
        present = ", ".join(sorted(map(str, record))[:10]) or "none"
        raise ConversationError(
            "missing conversations",
            f"no key 'conversations' (keys present: {present}); each record needs "
            f'"conversations": [{{"from": "human", "value": ...}}, {{"from": "gpt", "value": ...}}]',
        )
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else f"a {type(turns).__name__}"
        raise ConversationError(
            "bad conversations", f"'conversations' holds {got}, expected a non-empty list of turns"
        )
    if _optional_text(record, "instruction"):
        raise ConversationError(
            "unsupported instruction",
            f"'instruction' holds {len(record['instruction'])} characters but the AquilaChat2 templates have no "
            f"instruction slot; move it into 'system' or the first human turn",
        )
    system = _optional_text(record, "system")
    messages = []
    for index, turn in enumerate(turns):
        name = f"conversations[{index}]"
        if not isinstance(turn, Mapping):
            raise ConversationError(
                "bad turn", f'{name} is a {type(turn).__name__}, expected an object {{"from": ..., "value": ...}}'
            )
        for key in ("from", "value"):
            if key not in turn:
                raise ConversationError("bad turn", f"{name} has no {key!r} key")
        role, text = turn["from"], turn["value"]
        if role not in ROLES:
            raise ConversationError("unknown role", f"{name} has from={role!r}; use 'human', 'gpt' or 'system'")
        if not isinstance(text, str):
            raise ConversationError(
                "non-string value", f"{name}.value holds a {type(text).__name__}, expected a string"
            )
        messages.append((role, text))
    if messages[0][0] == SYSTEM:
        if system and messages[0][1]:
            raise ConversationError(
                "two system messages", "the record has both a 'system' field and a first turn from 'system'; keep one"
            )
        system = system or messages[0][1]
        first = 1
    else:
        first = 0
    names = [f"conversations[{index}]" for index in range(first, len(messages))]
    _check_order([role for role, _ in messages[first:]], names, last=GPT)
    return system, messages[first:]


class _Writer:
    """Appends template pieces and texts, recording the loss spans."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.loss_spans: list[tuple[int, int]] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def text(self) -> str:
        return "".join(self.parts)


def _render(template_name: str, system: str, messages: list[tuple[str, str]], open_assistant: bool) -> _Writer:
    template = _template(template_name)
    writer = _Writer()
    if template.system:
        writer.add(system or AQUILA_SYSTEM_MESSAGE)
        writer.add(template.system_separator)
    elif system:
        raise ConversationError(
            "system message not supported",
            f"template {template_name} (AquilaChat2-7B) has no system message but the conversation has one "
            f"({len(system)} characters); remove it or use the 'aquila' template",
        )
    for role, text in messages:
        if role == HUMAN:
            writer.add(template.human_prefix)
            writer.add(text)
            writer.add(template.human_suffix)
        else:
            writer.add(template.assistant_marker)
            start = writer.length
            writer.add(template.assistant_prefix)
            writer.add(text)
            writer.add(END_OF_TURN)
            writer.loss_spans.append((start, writer.length))
    if open_assistant:
        writer.add(template.assistant_marker)
    return writer


def render_conversation(conversation: Mapping[str, Any], template: str) -> RenderedConversation:
    """Render an Aquila2 fine-tuning record (see the module doc) with ``template``.

    Raises ``ConversationError`` for a malformed record, ``ValueError`` for an unknown template.
    """
    system, messages = _parse_conversation(conversation)
    writer = _render(template, system, messages, open_assistant=False)
    return RenderedConversation(template, writer.text(), tuple(writer.loss_spans))


def render_prompt(messages: Sequence[tuple[str, str]], template: str) -> str:
    """The text a model continues to answer the last human message.

    ``messages`` are (role, text) pairs, role "system" (first only), "human" or "gpt", alternating
    from human and ending with human. The result ends with ``<|endofpiece|>`` (aquila-v1) or
    ``Assistant:`` (aquila) and is a prefix of the rendered conversation that adds the answer.
    """
    messages = list(messages)
    for index, message in enumerate(messages):
        if len(message) != 2 or message[0] not in ROLES or not isinstance(message[1], str):
            raise ConversationError(
                "bad message", f"messages[{index}] is {message!r}; expected (role, text) with a role in "
                f"{', '.join(ROLES)} and a string text"
            )
    first = 1 if messages and messages[0][0] == SYSTEM else 0
    system = messages[0][1] if first else ""
    names = [f"messages[{index}]" for index in range(first, len(messages))]
    _check_order([role for role, _ in messages[first:]], names, last=HUMAN)
    return _render(template, system, messages[first:], open_assistant=True).text()


def _special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The Aquila special tokens this tokenizer has as single ids."""
    if isinstance(tokenizer, AquilaBBPETokenizer):
        ids = {token: tokenizer._tokenizer.token_to_id(token) for token in AQUILA_SPECIAL_TOKENS}
        return {token: token_id for token, token_id in ids.items() if token_id is not None}
    if isinstance(tokenizer, SentencePieceTokenizer):
        processor = tokenizer._processor
        ids = {token: processor.piece_to_id(token) for token in AQUILA_SPECIAL_TOKENS}
        return {token: token_id for token, token_id in ids.items() if token_id != processor.unk_id()}
    raise TypeError(
        f"chat templates need an AquilaBBPETokenizer or SentencePieceTokenizer, got {type(tokenizer).__name__}"
    )


def require_template_tokens(template: str, tokenizer: Tokenizer) -> None:
    """Fail unless ``tokenizer`` has every special token ``template`` writes as one id."""
    present = _special_token_ids(tokenizer)
    missing = [token for token in _template(template).special_tokens if token not in present]
    if missing:
        raise ValueError(
            f"chat template {template} needs the special tokens {missing} as single ids but the tokenizer has "
            f"no such token; use Aquila's tokenizer (its special_tokens.txt lists them)"
        )


def _char_offsets_of_bytes(text: str) -> np.ndarray:
    """``result[b]`` is the character holding UTF-8 byte ``b`` of ``text``; ``result[len] = len(text)``."""
    widths = np.fromiter((len(char.encode("utf-8")) for char in text), np.int64, len(text))
    return np.append(np.repeat(np.arange(len(text)), widths), len(text))


def _encode_sentencepiece(text: str, tokenizer: SentencePieceTokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    specials = _special_token_ids(tokenizer)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pattern = "(" + "|".join(map(re.escape, specials)) + ")" if specials else None
    position = 0
    for part in re.split(pattern, text) if pattern else [text]:
        if part in specials:
            ids.append(specials[part])
            offsets.append((position, position + len(part)))
        elif part:
            chars = _char_offsets_of_bytes(part)
            for piece in tokenizer._processor.encode(part, out_type="proto").pieces:
                ids.append(piece.id)
                offsets.append((position + int(chars[piece.begin]), position + int(chars[piece.end])))
        position += len(part)
    return ids, offsets


def encode_with_offsets(text: str, tokenizer: Tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (special tokens as single ids) and each token's [start, end) characters.

    For Aquila's BPE the ids equal ``tokenizer.encode(text)``. Use this, not ``encode``, to tokenize
    a ``render_prompt`` text with a SentencePiece model, so its special tokens become single ids.
    """
    if isinstance(tokenizer, AquilaBBPETokenizer):
        encoding = tokenizer._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _encode_sentencepiece(text, tokenizer)
    raise TypeError(
        f"chat templates need an AquilaBBPETokenizer or SentencePieceTokenizer, got {type(tokenizer).__name__}"
    )


def tokenize_conversation(
    rendered: RenderedConversation, tokenizer: Tokenizer
) -> tuple[list[int], list[int], list[int]]:
    """Tokenize ``rendered.text`` once; returns (token ids, loss mask, token index after each turn).

    ``loss_mask[i]`` is 1 when token i lies wholly inside a loss span (module doc). ``turn_ends[k]``
    is the number of tokens up to and including assistant turn k's ``</s>``, so ``ids[:turn_ends[k]]``
    is the conversation through turn k.
    """
    require_template_tokens(rendered.template, tokenizer)
    ids, offsets = encode_with_offsets(rendered.text, tokenizer)
    bounds = np.asarray(offsets, np.int64).reshape(-1, 2)  # [tokens, 2]
    starts, ends = bounds[:, 0], bounds[:, 1]
    mask = np.zeros(len(ids), bool)
    for start, end in rendered.loss_spans:
        mask |= (starts >= start) & (starts < end) & (ends <= end)
    turn_ends = np.searchsorted(starts, rendered.turn_ends, side="left")
    return list(ids), mask.astype(np.uint8).tolist(), turn_ends.tolist()
