"""Convert between megatron_aquila full-state weights and a Hugging Face model directory.

    # a training checkpoint (any TP/PP/DP layout) -> HF (LlamaForCausalLM, no remote code needed)
    python tools/convert_checkpoint.py to-hf --checkpoint runs/tiny/checkpoints --output hf/tiny \\
        --tokenizer-dir data/tiny/tokenizer [--model-type llama|aquila] [--dtype bf16|fp16|fp32] \\
        [--max-shard-size 5GB]

    # a full-state weights file (save_full_state) -> HF; the recipe gives the model shape
    python tools/convert_checkpoint.py to-hf --config examples/tiny/tiny.yaml \\
        --weights run/full_state.safetensors --output hf/tiny

    # HF -> ours, vocabulary padded for the target tensor-parallel size
    python tools/convert_checkpoint.py from-hf --hf-dir hf/tiny --output converted/ --tensor-parallel 2

to-hf writes config.json, generation_config.json, model-0000k-of-0000N.safetensors shards with
model.safetensors.index.json, and copies the tokenizer files when --tokenizer-dir is given.
from-hf reads safetensors (or pytorch_model*.bin) weights and writes full_state.safetensors plus
model.yaml (the recipe's ``model:`` section). Both write to a temporary directory and rename it
when complete; an existing output is never overwritten. A ``--checkpoint`` is a save directory
(its ``latest``) or one ``iter_*`` directory; its own resolved config gives the model shape. The
export streams: tensors are read from the checkpoint one layer at a time and each safetensors
shard is written as soon as it is full, so memory stays near one shard, not the whole model.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from megatron_aquila.checkpoint.full_state import load_full_state, save_full_state  # noqa: E402
from megatron_aquila.checkpoint.hf_mapping import (  # noqa: E402
    HF_DTYPES,
    MODEL_TYPES,
    ConversionError,
    expected_hf_shapes,
    generation_config_dict,
    hf_config_dict,
    hf_to_full,
    iter_hf_tensors,
    check_same_model,
    model_config_from_hf,
    token_ids_from_tokenizer,
)
from megatron_aquila.checkpoint.manager import CheckpointError, read_full_state  # noqa: E402
from megatron_aquila.config import ConfigError, ModelConfig, config_from_dict, load_config  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens.txt",
                   "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str) -> int:
    """Bytes of '5GB' (10^9), '500MiB' (2^20) or a plain integer."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ConversionError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


class _StagingDir:
    """A temporary directory beside ``final`` that becomes ``final`` only when the block succeeds."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        if self.final.exists():
            raise ConversionError(f"output {self.final} already exists; choose a new path or remove it")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_safetensors_shards(tensors: Iterable[tuple[str, torch.Tensor]], shapes: Mapping[str, tuple[int, ...]],
                             element_size: int, directory: Path, max_shard_bytes: int) -> None:
    """model-0000k-of-0000N.safetensors and model.safetensors.index.json, streaming.

    The shards are planned from ``shapes`` (in order; each shard <= max_shard_bytes unless one
    tensor is larger), then filled from ``tensors`` (the same names in the same order) and each
    written as soon as it is complete, so only one shard is in memory at a time.
    """
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * element_size
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    stream = iter(tensors)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = dict(itertools.islice(stream, len(names)))
        assert list(shard) == names, f"shard {filename}: planned {names[:3]}..., produced {list(shard)[:3]}..."
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in names})
    total = sum(math.prod(shape) * element_size for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_hf(full: Mapping[str, torch.Tensor], config: ModelConfig, output: str | Path, *,
              tokenizer_dir: Optional[str | Path] = None, model_type: str = "llama",
              dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 10 ** 9,
              token_ids=None) -> Path:
    """Write the HF model directory of a full state dict (module docstring); returns ``output``."""
    ids = token_ids or token_ids_from_tokenizer(tokenizer_dir, config.vocab_size)
    hf_config = hf_config_dict(config, dtype=dtype, model_type=model_type, token_ids=ids)
    tensors = iter_hf_tensors(full, config, dtype=dtype)  # lazy: one layer at a time
    element_size = torch.empty((), dtype=dtype).element_size()
    output = Path(output)
    with _StagingDir(output) as tmp:
        write_safetensors_shards(tensors, expected_hf_shapes(config), element_size, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(ids), indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return output


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, a safetensors index, or pytorch_model*.bin."""
    from safetensors.torch import load_file

    def files_of(index_name: str) -> list[Path]:
        index = json.loads((hf_dir / index_name).read_text())
        if "weight_map" not in index:
            raise ConversionError(f"{hf_dir / index_name} has no 'weight_map'; the index file is corrupt")
        return [hf_dir / name for name in sorted(set(index["weight_map"].values()))]

    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif (hf_dir / "model.safetensors.index.json").is_file():
        files = files_of("model.safetensors.index.json")
    elif (hf_dir / "pytorch_model.bin").is_file():
        files = [hf_dir / "pytorch_model.bin"]
    elif (hf_dir / "pytorch_model.bin.index.json").is_file():
        files = files_of("pytorch_model.bin.index.json")
    else:
        raise ConversionError(f"{hf_dir} holds no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise ConversionError(f"weight file {path} named by the index is missing")
        part = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                      weights_only=True)
        tensors.update(part)
    return tensors


def import_hf(hf_dir: str | Path, tensor_parallel: int, *, make_vocab_size_divisible_by: int = 128,
              dtype: Optional[torch.dtype] = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Full state dict (vocab padded for ``tensor_parallel``) and ModelConfig of an HF directory."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} does not exist; --hf-dir must be a Hugging Face model directory")
    config = model_config_from_hf(json.loads(config_path.read_text()), source=str(config_path),
                                  make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    full = hf_to_full(read_hf_weights(hf_dir), config, tensor_parallel, dtype=dtype, source=str(hf_dir))
    return full, config


def write_imported(full: Mapping[str, torch.Tensor], config: ModelConfig, output: str | Path) -> Path:
    """output/full_state.safetensors and output/model.yaml (a recipe ``model:`` section)."""
    output = Path(output)
    with _StagingDir(output) as tmp:
        save_full_state(tmp / "full_state.safetensors", full, config)
        model = {k: v for k, v in asdict(config).items() if k != "preset"}
        (tmp / "model.yaml").write_text(yaml.safe_dump({"model": model}, sort_keys=False))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="full-state weights -> Hugging Face directory")
    source = to_hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint: save directory or one iter_* directory")
    source.add_argument("--weights", help="full state safetensors file (save_full_state); needs --config")
    to_hf.add_argument("--config", help="recipe or resolved config YAML (default with --checkpoint: its own)")
    to_hf.add_argument("--output", required=True, help="new directory to create")
    to_hf.add_argument("--tokenizer-dir", help="tokenizer files to copy; special token ids are read from them")
    to_hf.add_argument("--model-type", choices=MODEL_TYPES, default="llama",
                       help="aquila needs BAAI's remote code to load (see hf_mapping.py)")
    to_hf.add_argument("--dtype", choices=sorted(HF_DTYPES), default="bf16")
    to_hf.add_argument("--max-shard-size", default="5GB")
    from_hf = commands.add_parser("from-hf", help="Hugging Face directory -> full-state weights")
    from_hf.add_argument("--hf-dir", required=True)
    from_hf.add_argument("--output", required=True, help="new directory: full_state.safetensors + model.yaml")
    from_hf.add_argument("--tensor-parallel", type=int, default=1, help="pad the vocabulary for this TP size")
    from_hf.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    from_hf.add_argument("--dtype", choices=sorted(HF_DTYPES), help="cast the weights (default: keep)")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf" and args.checkpoint:
            full, meta = read_full_state(args.checkpoint)
            config = (load_config(args.config) if args.config else config_from_dict(yaml.safe_load(meta["config_yaml"]))).model
            export_hf(full, config, args.output, tokenizer_dir=args.tokenizer_dir, model_type=args.model_type,
                      dtype=HF_DTYPES[args.dtype], max_shard_bytes=parse_size(args.max_shard_size))
        elif args.command == "to-hf":
            if not args.config:
                raise ConversionError("--weights needs --config: the recipe the weights were trained with")
            config = load_config(args.config).model
            full, stored = load_full_state(args.weights)
            if stored is not None:
                check_same_model(stored, config, str(args.weights), str(args.config))
            export_hf(full, config, args.output, tokenizer_dir=args.tokenizer_dir, model_type=args.model_type,
                      dtype=HF_DTYPES[args.dtype], max_shard_bytes=parse_size(args.max_shard_size))
        else:
            if args.tensor_parallel < 1:
                raise ConversionError(f"--tensor-parallel {args.tensor_parallel} must be >= 1")
            full, config = import_hf(args.hf_dir, args.tensor_parallel,
                                     make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                     dtype=HF_DTYPES[args.dtype] if args.dtype else None)
            write_imported(full, config, args.output)
    except (ConversionError, ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
