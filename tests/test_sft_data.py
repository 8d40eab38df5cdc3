"""SFT data: AquilaChat2 templates, loss masks, truncation, validation and tools/preprocess_data.py --sft.

References are hand-written: the expected rendered strings and assistant texts below, the real
Aquila tokenizer's ``encode`` of whole strings or of pieces split at special tokens, and a
single-process run for the worker pool.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re

import numpy as np
import pytest
from data_fixtures import REPO_ROOT, require_aquila_tokenizer, train_sentencepiece, write_jsonl

from megatron_aquila.data.chat_template import (
    CHAT_TEMPLATES,
    ConversationError,
    render_conversation,
    render_prompt,
    tokenize_conversation,
)
from megatron_aquila.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_aquila.data.preprocess import PreprocessError
from megatron_aquila.data.sft_preprocess import (
    SFTPreprocessConfig,
    preprocess_sft,
    sft_dataset_prefixes,
    truncate_conversation,
)
from megatron_aquila.data.tokenizer import AquilaBBPETokenizer, SentencePieceTokenizer

_spec = importlib.util.spec_from_file_location("preprocess_data", REPO_ROOT / "tools" / "preprocess_data.py")
preprocess_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_tool)

START, END, EOS = 100000, 100001, 100007  # <|startofpiece|>, <|endofpiece|>, </s>
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions.")
CONVERSATION = {
    "id": "c1",
    "conversations": [
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "2+2 is 4."},
        {"from": "human", "value": "你好吗？"},
        {"from": "gpt", "value": "我很好，谢谢。"},
    ],
    "instruction": "",
}
EXPECTED_TEXT = {
    "aquila-v1": "<|startofpiece|>What is 2+2?<|endofpiece|>2+2 is 4.</s>"
                 "<|startofpiece|>你好吗？<|endofpiece|>我很好，谢谢。</s>",
    "aquila": SYSTEM + "###Human: What is 2+2?###Assistant: 2+2 is 4.</s>"
              "Human: 你好吗？###Assistant: 我很好，谢谢。</s>",
}
# What carries loss: everything generated after the prompt, so aquila's answers keep the space
# of "Assistant: " (a prompt ends at "Assistant:").
EXPECTED_LOSS_TEXTS = {
    "aquila-v1": ["2+2 is 4.</s>", "我很好，谢谢。</s>"],
    "aquila": [" 2+2 is 4.</s>", " 我很好，谢谢。</s>"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return AquilaBBPETokenizer(require_aquila_tokenizer())


def conversation(*turns: str, roles=("human", "gpt"), **fields) -> dict:
    return {"conversations": [{"from": roles[i % 2], "value": text} for i, text in enumerate(turns)], **fields}


def dataset_documents(dataset: IndexedDataset) -> list[list[int]]:
    """Each document's tokens, read back from the files."""
    docs = dataset.document_indices
    return [np.concatenate([dataset[i] for i in range(docs[d], docs[d + 1])]).tolist()
            for d in range(len(docs) - 1)]


def runs(ids: list[int], mask: list[int], value: int) -> list[list[int]]:
    """Maximal runs of consecutive tokens whose mask equals ``value``."""
    groups: list[list[int]] = []
    previous = None
    for token, bit in zip(ids, mask):
        if bit == value:
            if previous != value:
                groups.append([])
            groups[-1].append(token)
        previous = bit
    return groups


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_render_and_tokenize_match_hand_written(tokenizer, template):
    rendered = render_conversation(CONVERSATION, template)
    assert rendered.text == EXPECTED_TEXT[template]
    ids, mask, turn_ends = tokenize_conversation(rendered, tokenizer)
    assert ids == tokenizer.encode(EXPECTED_TEXT[template])  # rendered once, tokenized once
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assert [tokenizer.decode(run) for run in runs(ids, mask, 1)] == EXPECTED_LOSS_TEXTS[template]
    masked_out = "".join(tokenizer.decode(run) for run in runs(ids, mask, 0))
    remainder = EXPECTED_TEXT[template]
    for loss_text in EXPECTED_LOSS_TEXTS[template]:
        remainder = remainder.replace(loss_text, "", 1)
    assert masked_out == remainder
    first_end = EXPECTED_TEXT[template].index("</s>") + len("</s>")
    assert turn_ends == [len(tokenizer.encode(EXPECTED_TEXT[template][:first_end])), len(ids)]
    assert ids[turn_ends[0] - 1] == ids[-1] == EOS


def test_special_tokens_are_single_ids(tokenizer):
    assert [tokenizer.encode(token) for token in ("<|startofpiece|>", "<|endofpiece|>", "</s>")] == [
        [START], [END], [EOS]]
    ids, mask, _ = tokenize_conversation(render_conversation(CONVERSATION, "aquila-v1"), tokenizer)
    texts = [turn["value"] for turn in CONVERSATION["conversations"]]
    expected = []
    for human, answer in zip(texts[::2], texts[1::2]):
        expected += [START, *tokenizer.encode(human), END, *tokenizer.encode(answer), EOS]
    assert ids == expected
    assert [bit for token, bit in zip(ids, mask) if token in (START, END, EOS)] == [0, 0, 1, 0, 0, 1]


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_prompt_is_the_untrained_prefix(tokenizer, template):
    messages = [(turn["from"], turn["value"]) for turn in CONVERSATION["conversations"]]
    prompt = render_prompt(messages[:3], template)
    assert prompt.endswith("<|endofpiece|>" if template == "aquila-v1" else "###Assistant:")
    ids, mask, turn_ends = tokenize_conversation(render_conversation(CONVERSATION, template), tokenizer)
    assert EXPECTED_TEXT[template].startswith(prompt)
    prompt_ids = tokenizer.encode(prompt)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert mask[turn_ends[0]: len(prompt_ids)] == [0] * (len(prompt_ids) - turn_ends[0])
    assert mask[len(prompt_ids):] == [1] * (len(ids) - len(prompt_ids))  # the whole answer, from token one
    if template == "aquila":
        assert tokenizer.decode(ids[len(prompt_ids): len(prompt_ids) + 1]) == " "  # Aquila BPE's lone space
        assert render_prompt([("system", "Be brief."), ("human", "hi")], template) == (
            "Be brief.###Human: hi###Assistant:")


def test_system_messages(tokenizer):
    with_field = render_conversation(conversation("hi", "hello", system="Be brief."), "aquila")
    with_turn = render_conversation({"conversations": [{"from": "system", "value": "Be brief."},
                                                       *conversation("hi", "hello")["conversations"]]}, "aquila")
    expected = "Be brief.###Human: hi###Assistant: hello</s>"
    assert with_field.text == with_turn.text == expected
    assert render_conversation(conversation("hi", "hello", system=""), "aquila").text == (
        SYSTEM + "###Human: hi###Assistant: hello</s>")
    with pytest.raises(ConversationError, match="system message not supported.*aquila"):
        render_conversation(conversation("hi", "hello", system="Be brief."), "aquila-v1")


def test_truncate_conversation_by_hand():
    ids, mask = list(range(10)), [0, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    assert truncate_conversation(ids, mask, [4, 10], 10) == (ids, mask, None)
    assert truncate_conversation(ids, mask, [4, 10], 9) == (ids[:4], mask[:4], "truncated at a turn")
    assert truncate_conversation(ids, mask, [4, 10], 4) == (ids[:4], mask[:4], "truncated at a turn")
    assert truncate_conversation(ids, mask, [4, 10], 3) == (ids[:3], mask[:3], "cut inside a turn")


def run_sft(tmp_path, inputs, template="aquila-v1", seq_length=4096, **options):
    config = SFTPreprocessConfig(
        inputs=[str(path) for path in inputs], output_prefix=str(tmp_path / "out"), tokenizer_type="aquila-bbpe",
        tokenizer_path=str(require_aquila_tokenizer()), chat_template=template, seq_length=seq_length,
        progress=False, **options,
    )
    return preprocess_sft(config)


def read_outputs(tmp_path) -> tuple[IndexedDataset, IndexedDataset]:
    tokens_prefix, mask_prefix = sft_dataset_prefixes(str(tmp_path / "out"))
    tokens, loss_mask = IndexedDataset(tokens_prefix), IndexedDataset(mask_prefix)
    assert tokens.dtype == np.int32 and loss_mask.dtype == np.uint8
    assert len(tokens) == len(loss_mask) and tokens.num_documents == loss_mask.num_documents
    np.testing.assert_array_equal(tokens.sequence_lengths, loss_mask.sequence_lengths)
    np.testing.assert_array_equal(tokens.document_indices, loss_mask.document_indices)
    return tokens, loss_mask


def test_truncation_in_preprocessing(tmp_path, tokenizer):
    text = EXPECTED_TEXT["aquila-v1"]
    first_turn = text[: text.index("</s>") + len("</s>")]
    first_len, full_len = len(tokenizer.encode(first_turn)), len(tokenizer.encode(text))
    prompt_len = len(tokenizer.encode("<|startofpiece|>What is 2+2?<|endofpiece|>"))
    corpus = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION])

    stats = run_sft(tmp_path, [corpus], seq_length=first_len)  # the first turn just fits
    assert (stats.truncated_at_turn, stats.cut_inside_turn, stats.conversations) == (1, 0, 1)
    tokens, loss_mask = read_outputs(tmp_path)
    assert dataset_documents(tokens) == [tokenizer.encode(first_turn)]
    assert tokenizer.decode(t for t, m in zip(tokens[0].tolist(), loss_mask[0]) if m) == "2+2 is 4.</s>"

    stats = run_sft(tmp_path, [corpus], seq_length=first_len - 2)
    assert (stats.truncated_at_turn, stats.cut_inside_turn, stats.conversations) == (0, 1, 1)
    tokens, loss_mask = read_outputs(tmp_path)
    assert dataset_documents(tokens) == [tokenizer.encode(first_turn)[: first_len - 2]]
    assert loss_mask[0].tolist() == [0] * prompt_len + [1] * (first_len - 2 - prompt_len)

    stats = run_sft(tmp_path, [corpus], seq_length=prompt_len)
    assert stats.conversations == 0 and dict(stats.skipped) == {"no loss tokens within seq_length": 1}
    assert stats.loss_tokens == 0 and len(read_outputs(tmp_path)[0]) == 0


GOOD = [
    CONVERSATION,
    conversation("Name a colour.", "Blue."),
    conversation("One?", "1", "Two?", "2", "Three?", "3"),
]
BAD_RECORDS = {
    "invalid UTF-8": b'{"conversations": "caf\xe9"}\n',
    "malformed JSON": b'{"conversations": [\n',
    "not a JSON object": b'["human", "gpt"]\n',
    "missing conversations": b'{"id": 7, "instruction": ""}\n',
    "bad conversations": b'{"conversations": []}\n',
    "bad turn": b'{"conversations": ["hi", "hello"]}\n',
    "unknown role": json.dumps(conversation("hi", "hello", roles=("user", "gpt"))).encode() + b"\n",
    "turns out of order": json.dumps(conversation("hi", "hello", "more?")).encode() + b"\n",
    "non-string value": json.dumps(conversation("hi", 42)).encode() + b"\n",
    "two system messages": json.dumps({"system": "a", "conversations": [
        {"from": "system", "value": "b"}, *conversation("hi", "hello")["conversations"]]}).encode() + b"\n",
    "unsupported instruction": json.dumps(conversation("hi", "hello", instruction="Be kind.")).encode() + b"\n",
    "system message not supported": json.dumps(conversation("hi", "hello", system="S")).encode() + b"\n",
}


def good_lines() -> list[bytes]:
    return [json.dumps(record, ensure_ascii=False).encode() + b"\n" for record in GOOD]


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_record_fails_with_location_and_leaves_nothing(tmp_path, reason, capsys):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(b"".join(good_lines()[:2] + [BAD_RECORDS[reason]] + good_lines()[2:]))  # line 3
    argv = ["--sft", "--chat-template", "aquila-v1", "--seq-length", "64", "--input", str(corpus),
            "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "aquila-bbpe",
            "--tokenizer-path", str(require_aquila_tokenizer())]
    assert preprocess_tool.main(argv) == 1
    error = capsys.readouterr().err
    assert f"{corpus}:3: {reason}: " in error and "--on-error skip" in error
    assert os.listdir(tmp_path) == ["bad.jsonl"]


@pytest.mark.parametrize("records, message", [
    ([GOOD[0], GOOD[1], GOOD[2], conversation("gpt first", "?", roles=("gpt", "human"))],
     "item 3: turns out of order: conversations[0] is from 'gpt'"),
    ([GOOD[0], conversation("hi", "hello", roles=("human", "bot"))], "item 1: unknown role: conversations[1]"),
])
def test_bad_item_in_json_list(tmp_path, records, message):
    corpus = tmp_path / "list.json"
    corpus.write_text(json.dumps(records), "utf-8")
    with pytest.raises(PreprocessError, match="^" + re.escape(f"{corpus}:{message}")):
        run_sft(tmp_path, [corpus])
    assert os.listdir(tmp_path) == ["list.json"]


def test_unreadable_json_list_fails_in_both_modes(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"conversations": []},\n{oops}\n]', "utf-8")
    not_list = tmp_path / "object.json"
    not_list.write_text(json.dumps(GOOD[0]), "utf-8")
    for path, message in ((broken, f"{broken}:3: malformed JSON"), (not_list, "must hold one JSON list")):
        for on_error in ("fail", "skip"):
            with pytest.raises(PreprocessError, match=message):
                run_sft(tmp_path, [path], on_error=on_error)
    assert sorted(os.listdir(tmp_path)) == ["broken.json", "object.json"]


def test_skip_mode_counts_reasons(tmp_path, tokenizer):
    lines = good_lines()
    lines[1:1] = [BAD_RECORDS["malformed JSON"], b"\n", BAD_RECORDS["turns out of order"]]
    lines[5:5] = [BAD_RECORDS["malformed JSON"], BAD_RECORDS["non-string value"]]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_bytes(b"".join(lines))
    stats = run_sft(tmp_path, [corpus], on_error="skip")
    assert dict(stats.skipped) == {"malformed JSON": 2, "blank line": 1, "turns out of order": 1,
                                   "non-string value": 1}
    assert stats.bad_records == 4 and stats.records == len(lines) and stats.conversations == len(GOOD)
    assert stats.first_skipped["malformed JSON"].startswith(f"{corpus}:2: ")
    tokens, loss_mask = read_outputs(tmp_path)
    assert dataset_documents(tokens) == [tokenizer.encode(render_conversation(r, "aquila-v1").text) for r in GOOD]


def test_json_jsonl_and_gzip_inputs_and_workers(tmp_path, tokenizer, capsys):
    records = GOOD * 3
    write_jsonl(tmp_path / "a.jsonl", records[:2])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records[2:4])
    (tmp_path / "c.json").write_text(json.dumps(records[4:7]), "utf-8")
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as handle:
        json.dump(records[7:], handle)
    inputs = [tmp_path / name for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.json.gz")]
    argv = ["--sft", "--chat-template", "aquila", "--seq-length", "4096", "--input", *map(str, inputs),
            "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "aquila-bbpe",
            "--tokenizer-path", str(require_aquila_tokenizer())]
    assert preprocess_tool.main(argv) == 0
    summary = capsys.readouterr().out
    expected_tokens = [tokenizer.encode(render_conversation(record, "aquila").text) for record in records]
    total = sum(map(len, expected_tokens))
    for line in (f"conversations written: {len(records)}", "skipped (bad): 0", "truncated at a turn: 0",
                 "cut inside a turn: 0", f"tokens: {total}, loss tokens: "):
        assert line in summary
    tokens, loss_mask = read_outputs(tmp_path)
    assert tokens.num_documents == len(records)
    assert dataset_documents(tokens) == expected_tokens
    for record, ids, mask in zip(records, dataset_documents(tokens), dataset_documents(loss_mask)):
        answers = [" " + turn["value"] + "</s>" for turn in record["conversations"][1::2]]
        assert [tokenizer.decode(run) for run in runs(ids, mask, 1)] == answers
    single = {path: open(path, "rb").read() for path in sorted(tmp_path.glob("out_*"))}

    stats = run_sft(tmp_path, inputs, template="aquila", workers=2)
    assert stats.conversations == len(records)
    assert {path: open(path, "rb").read() for path in sorted(tmp_path.glob("out_*"))} == single


def test_failed_finalize_leaves_no_final_outputs(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", GOOD)
    finalize = IndexedDatasetBuilder.finalize

    def finalize_tokens_only(builder):
        if builder.path_prefix.endswith("_sft_loss_mask_document"):
            raise OSError("disk full (simulated)")
        finalize(builder)

    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", finalize_tokens_only)
    with pytest.raises(OSError, match="simulated"):
        run_sft(tmp_path, [corpus])
    assert os.listdir(tmp_path) == ["c.jsonl"]


def _rerun_failing(tmp_path, monkeypatch, fail) -> dict[str, bytes]:
    """A first run over GOOD, then a second over GOOD[:1] that the patch ``fail(monkeypatch)`` makes raise;
    returns the first run's files, for comparison with what the directory holds after the failure."""
    run_sft(tmp_path, [write_jsonl(tmp_path / "c.jsonl", GOOD)])
    first = {path.name: path.read_bytes() for path in tmp_path.glob("out_*")}
    assert len(first) == 4
    corpus = write_jsonl(tmp_path / "short.jsonl", GOOD[:1])  # a second run whose outputs would differ
    fail(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        run_sft(tmp_path, [corpus])
    return first


def _assert_previous_pair_intact(tmp_path, first: dict[str, bytes]) -> None:
    assert sorted(os.listdir(tmp_path)) == sorted([*first, "c.jsonl", "short.jsonl"])  # no staging left
    assert {name: (tmp_path / name).read_bytes() for name in first} == first
    tokens, _ = read_outputs(tmp_path)
    assert tokens.num_documents == len(GOOD)


def test_second_run_failing_in_its_second_dataset_keeps_the_previous_pair(tmp_path, monkeypatch):
    """The loss-mask dataset of a second run over the same prefix fails to finalize: the first run's
    token and loss-mask files stay as they were (before, its tokens were gone and its mask was left)."""
    finalize = IndexedDatasetBuilder.finalize

    def fail_second_dataset(monkeypatch):
        def finalize_tokens_only(builder):
            if builder.path_prefix.endswith("_sft_loss_mask_document"):
                raise OSError("disk full (simulated)")
            finalize(builder)

        monkeypatch.setattr(IndexedDatasetBuilder, "finalize", finalize_tokens_only)

    _assert_previous_pair_intact(tmp_path, _rerun_failing(tmp_path, monkeypatch, fail_second_dataset))


def test_failed_rename_while_publishing_restores_the_previous_pair(tmp_path, monkeypatch):
    """Both datasets of the second run are complete, then the rename onto the loss mask's final .bin
    fails once: the token files already renamed are taken back and the first run's four files restored."""
    replace = os.replace

    def fail_mask_rename(monkeypatch):
        target = str(tmp_path / "out_sft_loss_mask_document.bin")
        failed = []

        def replace_failing_once(source, destination):
            if str(destination) == target and not failed:
                failed.append(source)
                raise OSError("rename failed (simulated)")
            replace(source, destination)

        monkeypatch.setattr(os, "replace", replace_failing_once)

    _assert_previous_pair_intact(tmp_path, _rerun_failing(tmp_path, monkeypatch, fail_mask_rename))


def test_command_line_checks(tmp_path, capsys):
    base = ["--input", "x.jsonl", "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "aquila-bbpe",
            "--tokenizer-path", "t"]
    for extra, message in (
        (["--sft", "--chat-template", "aquila"], "--sft needs --chat-template and --seq-length"),
        (["--sft", "--chat-template", "aquila", "--seq-length", "8", "--append-eod"],
         "--sft does not take --append-eod"),
        (["--seq-length", "8"], "apply only with --sft"),
    ):
        with pytest.raises(SystemExit):
            preprocess_tool.main(base + extra)
        assert message in capsys.readouterr().err
    (tmp_path / "chat.txt").write_text("{}", "utf-8")
    with pytest.raises(PreprocessError, match="unknown format"):
        run_sft(tmp_path, [tmp_path / "chat.txt"])


def test_sentencepiece_tokenizes_between_special_tokens(tmp_path):
    model = train_sentencepiece(tmp_path, "spm")
    spm = SentencePieceTokenizer(model)
    record = conversation("What is the value?", "It is none.", "And then?", "Return it.")
    rendered = render_conversation(record, "aquila")
    ids, mask, turn_ends = tokenize_conversation(rendered, spm)
    pieces = rendered.text.split("</s>")  # "</s>" is the model's eos piece, the only special token here
    expected = []
    for piece in pieces[:-1]:
        expected += spm.encode(piece) + [spm.eod]
    assert ids == expected and turn_ends[-1] == len(ids)
    pieces_of = spm._processor.id_to_piece  # decode() would drop </s> and the leading space
    assert ["".join(map(pieces_of, run)).replace("\u2581", " ") for run in runs(ids, mask, 1)] == [
        " It is none.</s>", " Return it.</s>"]
    with pytest.raises(ValueError, match=r"needs the special tokens \['<\|startofpiece\|>', '<\|endofpiece\|>'\]"):
        tokenize_conversation(render_conversation(record, "aquila-v1"), spm)
