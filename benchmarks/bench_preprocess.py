"""Throughput of tools/preprocess_data.py against raw Tokenizer.encode_batch on the same documents.

    python benchmarks/bench_preprocess.py [--workers 2] [--trials 3] [--target-mb 4] [--repeat 1]

Input: the deterministic sample corpus (tools/make_sample_corpus.py). Tokenizer: the real Aquila
BBPE (../shared/aquila_tokenizer or $MEGATRON_AQUILA_TOKENIZER_DIR) if present, else a tiny BPE
trained on the corpus. The tool is timed end to end in-process (tokenizer load, worker pool
start-up, reading, tokenizing, writing, renaming); the raw rate is encode_batch over the same
texts in batches of --batch-size in this one process (HF tokenizers' own threads allowed), with
parsing excluded. Best of --trials for each, interleaved, to damp noise from other load.
--repeat N writes the corpus N times over, to show the rate once fixed start-up costs (loading
the tokenizer, forking workers: printed separately) are amortized.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_aquila.data.corpus import write_sample_corpus  # noqa: E402
from megatron_aquila.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_aquila.data.tokenizer import build_tokenizer, train_tiny_bbpe  # noqa: E402


def pick_tokenizer(corpus: Path, workdir: Path) -> Path:
    override = os.environ.get("MEGATRON_AQUILA_TOKENIZER_DIR")
    real = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "aquila_tokenizer"
    if (real / "vocab.json").is_file():
        return real
    print(f"real Aquila tokenizer not found at {real}; training a tiny one on the corpus")
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    return train_tiny_bbpe(texts, workdir / "tiny_tokenizer")


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and of its reaped children (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_raw(tokenizer, texts: list[str], batch_size: int) -> tuple[float, float, int]:
    start, start_cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    for first in range(0, len(texts), batch_size):
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(texts[first : first + batch_size]))
    return time.perf_counter() - start, cpu_seconds() - start_cpu, tokens


def time_tool(config: PreprocessConfig) -> tuple[float, float, int]:
    start, start_cpu = time.perf_counter(), cpu_seconds()
    stats = preprocess(config)
    return time.perf_counter() - start, cpu_seconds() - start_cpu, sum(stats.tokens.values())


def report(name: str, seconds: float, cpu: float, documents: int, tokens: int, megabytes: float) -> None:
    print(f"{name:<32} {seconds:6.3f} s ({cpu:6.3f} CPU s)  {documents / seconds:7.0f} docs/s  "
          f"{tokens / seconds:9.0f} tokens/s  {megabytes / seconds:6.2f} MB/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--target-mb", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=1, help="copies of the corpus in the input")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        corpus = workdir / "sample.jsonl"
        documents, corpus_bytes = write_sample_corpus(corpus, args.target_mb)
        tokenizer_dir = pick_tokenizer(corpus, workdir)
        corpus.write_bytes(corpus.read_bytes() * args.repeat)
        documents, megabytes = documents * args.repeat, corpus_bytes * args.repeat / 1e6
        load_start = time.perf_counter()
        tokenizer = build_tokenizer("aquila-bbpe", str(tokenizer_dir))
        load_seconds = time.perf_counter() - load_start
        texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
        config = PreprocessConfig(
            inputs=[str(corpus)], output_prefix=str(workdir / "out"), tokenizer_type="aquila-bbpe",
            tokenizer_path=str(tokenizer_dir), append_eod=True, workers=args.workers,
            batch_size=args.batch_size, progress=False,
        )
        print(f"corpus: {documents} documents, {megabytes:.2f} MB; tokenizer: {tokenizer_dir} "
              f"(vocab {tokenizer.vocab_size}, loads in {load_seconds:.3f} s); {os.cpu_count()} CPUs; "
              f"best of {args.trials}")
        raw_times, tool_times = [], []
        for _ in range(args.trials):
            raw_times.append(time_raw(tokenizer, texts, args.batch_size))
            tool_times.append(time_tool(config))
        raw_seconds, raw_cpu, raw_tokens = min(raw_times)
        tool_seconds, tool_cpu, tool_tokens = min(tool_times)
        report("raw encode_batch (1 process)", raw_seconds, raw_cpu, documents, raw_tokens, megabytes)
        report(f"preprocess_data --workers {args.workers}", tool_seconds, tool_cpu, documents, tool_tokens, megabytes)
        print(f"tool / raw throughput: {raw_seconds / tool_seconds:.1%} end to end (target >= 80%)")
        print(f"raw CPU / tool CPU: {raw_cpu / tool_cpu:.1%} (less sensitive to other load on the machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
