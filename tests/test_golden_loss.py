"""Golden losses of the tiny CPU recipe: catches silent numeric drift anywhere in the stack.

The tiny recipe's whole pipeline runs as examples/tiny/run.sh runs it (sample corpus from the
Python standard library, locally trained BPE, preprocessing to .bin/.idx) and trains 20
iterations with TP2 x DP2, sequence parallel and the distributed optimizer on 4 gloo processes.
Every iteration's loss must equal tests/golden/tiny_tp2_dp2.json. The corpus is read from this
Python's standard library, so the file records the Python version it was made with. After an
intended numeric change, regenerate with MEGATRON_AQUILA_REGENERATE_GOLDEN=1 and say why in
the commit.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from distributed import run_distributed
from megatron_aquila.data.corpus import write_sample_corpus
from megatron_aquila.data.preprocess import PreprocessConfig, preprocess
from megatron_aquila.data.tokenizer import train_tiny_bbpe
from training import train_with

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_tp2_dp2.json"
ITERATIONS = 20


def tiny_worker(rank: int, world_size: int, data_prefix: str, cache_dir: str):
    overrides = [
        f"data.data_path=[{data_prefix}]", f"data.cache_dir={cache_dir}", f"training.exit_interval={ITERATIONS}",
        "training.eval_interval=0", "logging.output_dir=null", "checkpoint.save=null", "checkpoint.load=null",
        "checkpoint.save_interval=null", "logging.peak_tflops=1.0", "data.num_workers=0"]
    return train_with(overrides, world_size, ROOT / "examples" / "tiny" / "tiny.yaml")[0].history


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tiny")
    corpus = directory / "sample.jsonl"
    write_sample_corpus(corpus, target_mb=4)
    texts = [json.loads(line)["text"] for line in corpus.read_text("utf-8").splitlines()]
    train_tiny_bbpe(texts, directory / "tokenizer", vocab_size=8192)
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_prefix=str(directory / "sample"),
                                tokenizer_type="aquila-bbpe", tokenizer_path=str(directory / "tokenizer"),
                                append_eod=True, workers=1, progress=False))
    return str(directory / "sample_text_document")


def test_tiny_recipe_matches_golden_losses(tiny_dataset, tmp_path):
    losses = run_distributed(tiny_worker, 4, args=(tiny_dataset, str(tmp_path / "cache")))[0]
    assert len(losses) == ITERATIONS
    if os.environ.get("MEGATRON_AQUILA_REGENERATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"python": platform.python_version(), "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["python"] == platform.python_version(), (
        f"golden losses were made with Python {golden['python']}, this is {platform.python_version()}: the sample "
        "corpus comes from the standard library, so regenerate them (see the module docstring)")
    assert losses[-1] < losses[0] - 1.0, f"the tiny recipe did not learn in {ITERATIONS} iterations: {losses}"
    for iteration, (loss, expected) in enumerate(zip(losses, golden["losses"]), start=1):
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-5), (
            f"iteration {iteration}: loss {loss} differs from golden {expected}\nrun: {losses}")
