"""Convert between megatron_aquila full-state weights and a Hugging Face model directory.

    # a training checkpoint (any TP/PP/DP layout) -> HF (LlamaForCausalLM, no remote code needed)
    python tools/convert_checkpoint.py to-hf --checkpoint runs/tiny/checkpoints --output hf/tiny \\
        --tokenizer-dir data/tiny/tokenizer [--model-type llama|aquila] [--dtype bf16|fp16|fp32] \\
        [--max-shard-size 5GB]

    # full-state weights (from-hf output or save_full_state) -> HF; the recipe gives the model shape
    python tools/convert_checkpoint.py to-hf --config examples/tiny/tiny.yaml \\
        --weights converted/ --output hf/tiny

    # a LoRA checkpoint (adapters + a reference to its base weights) -> HF with the adapters merged,
    # or -> a PEFT adapter (adapter_config.json + adapter_model.safetensors) for the base HF model
    python tools/convert_checkpoint.py to-hf --checkpoint runs/sft_lora/checkpoints --merge-lora --output hf/chat
    python tools/convert_checkpoint.py to-peft --checkpoint runs/sft_lora/checkpoints --output hf/adapter \
        [--base-model BAAI/AquilaChat2-7B] [--dtype fp32]

    # HF -> ours, vocabulary padded for the target tensor-parallel size
    python tools/convert_checkpoint.py from-hf --hf-dir hf/tiny --output converted/ --tensor-parallel 2 \\
        [--max-shard-size 5GB]

to-hf writes config.json, generation_config.json, model-0000k-of-0000N.safetensors shards with
model.safetensors.index.json, and copies the tokenizer files when --tokenizer-dir is given.
from-hf reads model.safetensors[.index.json] (or pytorch_model*.bin, see TorchBinFiles) and writes
full_state-0000k-of-0000N.safetensors shards with full_state.safetensors.index.json, plus model.yaml
(the recipe's ``model:`` section); ``checkpoint.init_weights`` takes that directory. Both write to
a temporary directory and rename it when complete; an existing output is never overwritten. A
``--checkpoint`` is a save directory (its ``latest``) or one ``iter_*`` directory; its own resolved
config gives the model shape.

Both directions stream (docs/design.md section 10): tensors are read one at a time (a fused qkv or
gate_up with its pieces), mapped, and each output shard is written as soon as it is full, so host
memory holds about one layer plus one output shard (--max-shard-size), whatever the model size.
``benchmarks/bench_convert_memory.py`` measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from megatron_aquila.checkpoint.full_state import (  # noqa: E402
    DEFAULT_SHARD_BYTES,
    open_full_state,
    open_safetensors,
    save_full_state,
    write_safetensors_shards,
)
from megatron_aquila.checkpoint.hf_mapping import (  # noqa: E402
    HF_DTYPES,
    MODEL_TYPES,
    ConversionError,
    check_same_model,
    generation_config_dict,
    hf_config_dict,
    iter_full_tensors,
    iter_hf_tensors,
    model_config_from_hf,
    token_ids_from_tokenizer,
)
from megatron_aquila.checkpoint.manager import CheckpointError, read_full_state, resolve_checkpoint  # noqa: E402
from megatron_aquila.config import Config, ConfigError, ModelConfig, config_from_dict, load_config  # noqa: E402
from megatron_aquila.model.lora import (  # noqa: E402
    LoraSettings,
    MergedLoraWeights,
    peft_adapter_config,
    peft_adapter_tensors,
    write_peft_adapter,
)

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


def export_hf(full: Mapping[str, torch.Tensor], config: ModelConfig, output: str | Path, *,
              tokenizer_dir: Optional[str | Path] = None, model_type: str = "llama",
              dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              token_ids=None) -> Path:
    """Write the HF model directory of a full state dict (module docstring); returns ``output``.

    ``full`` may be lazy (a checkpoint or full-state reader): it is read one tensor at a time.
    """
    ids = token_ids or token_ids_from_tokenizer(tokenizer_dir, config.vocab_size)
    hf_config = hf_config_dict(config, dtype=dtype, model_type=model_type, token_ids=ids)
    tensors = iter_hf_tensors(full, config, dtype=dtype)  # checks names and shapes now; reads while writing
    output = Path(output)
    with _StagingDir(output) as tmp:
        write_safetensors_shards(tensors, tmp, "model", max_shard_bytes, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(ids), indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return output


class TorchBinFiles(Mapping[str, torch.Tensor]):
    """pytorch_model*.bin weights as a read-only mapping, one memory-mapped file at a time.

    A pickled state dict cannot be read tensor by tensor. Each file is opened with
    ``torch.load(mmap=True)``: its tensors are pages of the file, read when used, and they stay
    mapped until a tensor of another file is asked for. Host memory thus holds up to one input
    file of clean page cache (which the kernel may drop), not one layer as with safetensors;
    convert such a model to safetensors first when one input file does not fit.
    """

    def __init__(self, files: list[Path]):
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            for name, tensor in self._load(path).items():  # reads the pickle only; tensor data stays on disk
                self._file_of[name] = path
                self._shapes[name] = tuple(tensor.shape)
        self._open: tuple[Optional[Path], dict[str, torch.Tensor]] = (None, {})

    @staticmethod
    def _load(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise ConversionError(f"weight file {path} named by the index is missing")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            raise ConversionError(f"cannot memory-map {path} ({error}); re-save it with torch.save of torch >= 1.6 "
                                  "(zip format) or as safetensors") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        if self._open[0] != path:
            self._open = (None, {})  # unmap the previous file before mapping the next
            self._open = (path, self._load(path))
        return self._open[1][name]

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def open_hf_weights(hf_dir: Path) -> Mapping[str, torch.Tensor]:
    """The weights of an HF directory, lazily: model.safetensors[.index.json] or pytorch_model*.bin."""
    if (hf_dir / "model.safetensors").is_file() or (hf_dir / "model.safetensors.index.json").is_file():
        return open_safetensors(hf_dir, "model")
    if (hf_dir / "pytorch_model.bin").is_file():
        return TorchBinFiles([hf_dir / "pytorch_model.bin"])
    index = hf_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index} has no 'weight_map'; the index file is corrupt")
        return TorchBinFiles([hf_dir / name for name in dict.fromkeys(weight_map.values())])
    raise ConversionError(f"{hf_dir} holds no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def hf_model_config(hf_dir: Path, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig of an HF directory's config.json."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} does not exist; --hf-dir must be a Hugging Face model directory")
    return model_config_from_hf(json.loads(config_path.read_text()), source=str(config_path),
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def import_hf(hf_dir: str | Path, output: str | Path, tensor_parallel: int, *,
              make_vocab_size_divisible_by: int = 128, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``output``: the full state (vocab padded for ``tensor_parallel``) of an HF directory, and model.yaml.

    Streams (module docstring); ``dtype`` casts the weights (None keeps them). Returns ``output``.
    """
    hf_dir = Path(hf_dir)
    config = hf_model_config(hf_dir, make_vocab_size_divisible_by)
    tensors = iter_full_tensors(open_hf_weights(hf_dir), config, tensor_parallel, dtype=dtype,
                                source=str(hf_dir))  # checks names and shapes now; reads while writing
    output = Path(output)
    with _StagingDir(output) as tmp:
        save_full_state(tmp, tensors, config, max_shard_bytes=max_shard_bytes)
        model = {k: v for k, v in asdict(config).items() if k != "preset"}
        (tmp / "model.yaml").write_text(yaml.safe_dump({"model": model}, sort_keys=False))
    return output


def lora_run_config(meta: Mapping, checkpoint: str) -> Config:
    """The resolved config of a LoRA checkpoint (its ``finetune.lora`` gives rank, alpha and targets)."""
    run = config_from_dict(yaml.safe_load(meta["config_yaml"]))
    if run.finetune.lora is None or not meta.get("base_weights"):
        raise ConversionError(f"{checkpoint} is not a LoRA checkpoint (its run had no finetune.lora): export it with "
                              "to-hf without --merge-lora")
    return run


def open_base_weights(path: str) -> Mapping[str, torch.Tensor]:
    """The base weights a LoRA run started from (its ``checkpoint.init_weights``), read lazily: one of
    our checkpoints or a from-hf full-state directory."""
    if not Path(path).exists():
        raise ConversionError(f"the LoRA checkpoint's base weights {path} (its checkpoint.init_weights) do not exist: "
                              "run the conversion where that path is readable")
    return read_full_state(path)[0] if resolve_checkpoint(path) is not None else open_full_state(path)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="full-state weights -> Hugging Face directory")
    source = to_hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint: save directory or one iter_* directory")
    source.add_argument("--weights", help="full state: from-hf output directory, its index, or one "
                        "full_state.safetensors; needs --config")
    to_hf.add_argument("--config", help="recipe or resolved config YAML (default with --checkpoint: its own)")
    to_hf.add_argument("--output", required=True, help="new directory to create")
    to_hf.add_argument("--tokenizer-dir", help="tokenizer files to copy; special token ids are read from them")
    to_hf.add_argument("--model-type", choices=MODEL_TYPES, default="llama",
                       help="aquila needs BAAI's remote code to load (see hf_mapping.py)")
    to_hf.add_argument("--dtype", choices=sorted(HF_DTYPES), default="bf16")
    to_hf.add_argument("--max-shard-size", default="5GB")
    to_hf.add_argument("--merge-lora", action="store_true",
                       help="a LoRA checkpoint: merge W + (alpha/r) B A into its base weights (checkpoint.init_weights)")
    to_peft = commands.add_parser("to-peft", help="LoRA checkpoint -> PEFT adapter directory")
    to_peft.add_argument("--checkpoint", required=True, help="LoRA training checkpoint: save or iter_* directory")
    to_peft.add_argument("--output", required=True, help="new directory to create")
    to_peft.add_argument("--base-model", help="adapter_config.json base_model_name_or_path (default: the base weights)")
    to_peft.add_argument("--dtype", choices=sorted(HF_DTYPES), default="fp32")
    from_hf = commands.add_parser("from-hf", help="Hugging Face directory -> full-state weights")
    from_hf.add_argument("--hf-dir", required=True)
    from_hf.add_argument("--output", required=True,
                         help="new directory: full_state-*.safetensors shards + index, and model.yaml")
    from_hf.add_argument("--tensor-parallel", type=int, default=1, help="pad the vocabulary for this TP size")
    from_hf.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    from_hf.add_argument("--dtype", choices=sorted(HF_DTYPES), help="cast the weights (default: keep)")
    from_hf.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-peft":
            lora, meta = read_full_state(args.checkpoint)
            run = lora_run_config(meta, args.checkpoint)
            settings = LoraSettings.from_config(run.finetune.lora)
            tensors = peft_adapter_tensors(lora, run.model, settings, dtype=HF_DTYPES[args.dtype])
            with _StagingDir(Path(args.output)) as tmp:
                write_peft_adapter(tmp, tensors, peft_adapter_config(settings, args.base_model or meta["base_weights"]))
        elif args.command == "to-hf" and args.checkpoint:
            full, meta = read_full_state(args.checkpoint)
            run = load_config(args.config) if args.config else config_from_dict(yaml.safe_load(meta["config_yaml"]))
            if args.merge_lora:
                run = lora_run_config(meta, args.checkpoint)
                full = MergedLoraWeights(open_base_weights(meta["base_weights"]), full, run.model,
                                         LoraSettings.from_config(run.finetune.lora))
            elif meta.get("base_weights"):
                raise ConversionError(f"{args.checkpoint} holds LoRA adapters only: export it with --merge-lora, or "
                                      "as a PEFT adapter with to-peft")
            export_hf(full, run.model, args.output, tokenizer_dir=args.tokenizer_dir, model_type=args.model_type,
                      dtype=HF_DTYPES[args.dtype], max_shard_bytes=parse_size(args.max_shard_size))
        elif args.command == "to-hf":
            if not args.config:
                raise ConversionError("--weights needs --config: the recipe the weights were trained with")
            config = load_config(args.config).model
            full, stored = open_full_state(args.weights)  # lazy: read tensor by tensor while writing
            if stored is not None:
                check_same_model(stored, config, str(args.weights), str(args.config))
            export_hf(full, config, args.output, tokenizer_dir=args.tokenizer_dir, model_type=args.model_type,
                      dtype=HF_DTYPES[args.dtype], max_shard_bytes=parse_size(args.max_shard_size))
        else:
            if args.tensor_parallel < 1:
                raise ConversionError(f"--tensor-parallel {args.tensor_parallel} must be >= 1")
            import_hf(args.hf_dir, args.output, args.tensor_parallel,
                      make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                      dtype=HF_DTYPES[args.dtype] if args.dtype else None,
                      max_shard_bytes=parse_size(args.max_shard_size))
    except (ConversionError, ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
