"""Peak host memory (RSS) of convert_checkpoint.py from-hf and to-hf against the model size.

    python benchmarks/bench_convert_memory.py [--layers 4 12] [--hidden 1024] [--ffn 2816] [--vocab 32000] \
        [--max-shard-size 100MB] [--workdir DIR]

(with the package installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root)

For each ``--layers`` value, writes a random bf16 Llama model as Hugging Face safetensors shards
(220 and 400 MB with the defaults), then runs ``from-hf`` and ``to-hf --weights`` each in a fresh
process and prints each process's peak resident set size (VmHWM, file-mapped pages included)
next to a process that only imports the converter. Streaming conversion adds about one output
shard plus a layer's worth of tensors (the largest tensor, here the output layer, twice: its source
and the copy built from it, plus what glibc keeps of freed blocks), and that does not grow with
the number of layers (docs/design.md section 10).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 10 ** 6


def write_hf_model(directory: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv_heads: int,
                   layers_per_file: int = 4) -> tuple[int, int]:
    """A random LlamaForCausalLM directory (config.json, bf16 shards + index); returns (model, layer) bytes."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    d = hidden // heads
    shapes = {"self_attn.q_proj.weight": (heads * d, hidden), "self_attn.k_proj.weight": (kv_heads * d, hidden),
              "self_attn.v_proj.weight": (kv_heads * d, hidden), "self_attn.o_proj.weight": (hidden, heads * d),
              "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
              "mlp.down_proj.weight": (hidden, ffn), "input_layernorm.weight": (hidden,),
              "post_attention_layernorm.weight": (hidden,)}
    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        if i % layers_per_file == 0:
            groups.append({})
        groups[-1].update({f"model.layers.{i}.{name}": shape for name, shape in shapes.items()})
    groups[-1].update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                   for name, shape in group.items()}
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(group, filename))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "num_hidden_layers": layers, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "vocab_size": vocab, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    layer = sum(2 * (shape[0] * (shape[1] if len(shape) > 1 else 1)) for shape in shapes.values())
    return total, layer


def write_tokenizer(directory: Path, vocab: int) -> Path:
    """An Aquila-layout BPE tokenizer of ``vocab`` ids (so the exported special ids fit the vocabulary)."""
    directory.mkdir()
    specials = ["<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]", "[sMASK]", "[CLS]", "</s>"]
    entries = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab - len(specials))}}
    (directory / "vocab.json").write_text(json.dumps(entries))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "special_tokens.txt").write_text("\n".join(specials) + "\n")
    return directory


def child(argv: list[str]) -> None:
    """Run the converter (or, with no arguments, only import it) and print this process's peak RSS."""
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_checkpoint  # noqa: F401  (the baseline: torch, safetensors, the package)
    import megatron_aquila.data.tokenizer  # noqa: F401  (to-hf imports it to read the special ids)

    if argv and convert_checkpoint.main(argv) != 0:
        sys.exit(1)
    # VmHWM, not ru_maxrss: a spawned process's ru_maxrss starts from its parent's peak on Linux.
    peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_kb": int(peak.split()[1])}))


def peak_mb(argv: list[str]) -> float:
    result = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:1]) or 'baseline'} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_kb"] * 1024 / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12], help="one model per value")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--workdir", help="where to write the models (default: a temporary directory)")
    args = parser.parse_args()

    baseline = peak_mb([])
    embedding = -(-args.vocab // 128) * 128 * args.hidden * 2  # padded for TP1 (make_vocab_size_divisible_by 128)
    print(f"baseline (imports only) peak RSS {baseline:.0f} MB; output shards <= {args.max_shard_size}; "
          f"padded embedding {embedding / MB:.1f} MB")
    print(f"{'layers':>6}{'model MB':>10}{'layer MB':>10}{'from-hf peak':>14}{'above base':>12}"
          f"{'to-hf peak':>12}{'above base':>12}")
    for layers in args.layers:
        with tempfile.TemporaryDirectory(dir=args.workdir) as work:
            work = Path(work)
            model, layer = write_hf_model(work / "hf", layers, args.hidden, args.ffn, args.vocab, args.heads,
                                          args.kv_heads)
            tokenizer = write_tokenizer(work / "tokenizer", args.vocab)
            from_hf = peak_mb(["from-hf", "--hf-dir", str(work / "hf"), "--output", str(work / "ours"),
                               "--max-shard-size", args.max_shard_size])
            to_hf = peak_mb(["to-hf", "--config", str(work / "ours" / "model.yaml"), "--weights",
                             str(work / "ours"), "--output", str(work / "back"), "--tokenizer-dir", str(tokenizer),
                             "--dtype", "bf16", "--max-shard-size", args.max_shard_size])
        print(f"{layers:>6}{model / MB:>10.0f}{layer / MB:>10.1f}{from_hf:>14.0f}{from_hf - baseline:>12.0f}"
              f"{to_hf:>12.0f}{to_hf - baseline:>12.0f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
