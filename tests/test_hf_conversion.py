"""HF conversion: our model vs transformers' LlamaForCausalLM (logits, greedy decoding), round trips,
a TP2 x PP2 (x 2 virtual chunks) gather/load on 4 gloo processes, the CLI and its errors, and the
memory both directions hold, measured at the safetensors calls (docs/design.md section 10)."""
from __future__ import annotations

import importlib.util
import json
import weakref
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Mapping

import pytest
import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from data_fixtures import require_aquila_tokenizer
from distributed import run_distributed
from hf_models import random_llama
from megatron_aquila.checkpoint.full_state import (
    FULL_STATE_FORMAT,
    gather_full_state_dict,
    load_full_state,
    load_full_state_dict,
    open_full_state,
    save_full_state,
)
from megatron_aquila.checkpoint.hf_mapping import (
    ConversionError,
    expected_full_shapes,
    TokenIds,
    full_to_hf,
    hf_to_full,
    model_config_from_hf,
    token_ids_from_tokenizer,
)
from megatron_aquila.checkpoint.manager import CheckpointModelTensors
from megatron_aquila.config import ModelConfig, load_config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.pipeline.partition import chunk_layer_ids

_spec = importlib.util.spec_from_file_location(
    "convert_checkpoint", Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py")
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

# GQA (4 heads, 2 kv heads); vocab 250 padded to 256 for TP1 and TP2 alike.
SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             vocab_size=250, make_vocab_size_divisible_by=64, seq_length=16, norm_init=0.8)
IDS = TokenIds(bos=1, eos=2, pad=0)


def _hf():
    """transformers, imported on use: the spawned distributed workers import this module and never need it."""
    import transformers

    return transformers


def _config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SHAPE, **overrides})


def _our_model(config: ModelConfig, seed: int = 7) -> AquilaModel:
    return AquilaModel(config, ParallelContext.single_process(), seed=seed).eval()


def _tp_full(config: ModelConfig) -> dict[str, torch.Tensor]:
    return gather_full_state_dict([_our_model(config)], ParallelContext.single_process())


def _random_hf_model(vocab_size: int, dtype: torch.dtype, seed: int = 0, num_layers: int = 4
                     ) -> "transformers.LlamaForCausalLM":
    """A LlamaForCausalLM with random weights (norm weights too, so they are not all ones)."""
    return random_llama(
        seed, vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False).to(dtype)


def _import(src: Path, out: Path, tensor_parallel: int) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """from-hf into ``out``, read back whole (as owned tensors, so they can be sent to worker processes)."""
    convert.import_hf(src, out, tensor_parallel, make_vocab_size_divisible_by=64)
    full, config = load_full_state(out)
    return {name: tensor.clone() for name, tensor in full.items()}, config


def _safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory of safetensors files, read with safetensors alone."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _greedy(model: AquilaModel, prompt: torch.Tensor, steps: int, eos: int) -> torch.Tensor:
    """Greedy decoding with full recompute each step; logits of padded ids are ignored."""
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids)[:, -1, : model.config.vocab_size]  # [b, V]
        next_id = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        if next_id.item() == eos:
            break
    return ids


@pytest.mark.parametrize("interleaved", [False, True])
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(tmp_path, interleaved):
    config = _config(rope_interleaved=interleaved)
    ours = _our_model(config)
    full = gather_full_state_dict([ours], ParallelContext.single_process())
    assert full["embedding.weight"].shape == (256, 64)  # padded
    convert.export_hf(full, config, tmp_path / "hf", dtype=torch.float32, token_ids=IDS)
    hf = _hf().AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, _hf().LlamaForCausalLM)
    assert hf.config.vocab_size == 250 and hf.config.num_key_value_heads == 2

    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = ours(ids)[..., :250]
        hf_logits = hf(ids).logits
    assert (ours_logits - hf_logits).abs().max().item() < 1e-4

    prompt = ids[:1, :5]
    hf_tokens = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=IDS.eos, pad_token_id=IDS.pad)
    assert torch.equal(_greedy(ours, prompt, 6, IDS.eos), hf_tokens)


def test_hf_to_ours_to_hf_is_bit_identical(tmp_path):
    hf = _random_hf_model(vocab_size=300, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "src")
    full, config = _import(tmp_path / "src", tmp_path / "ours", tensor_parallel=2)
    assert config.vocab_size == 300 and config.kv_heads == 2 and config.ffn_size == 96
    assert full["embedding.weight"].shape == (384, 64)  # 300 -> multiple of 64 x TP2
    assert full["embedding.weight"].dtype == torch.bfloat16
    assert torch.count_nonzero(full["output_layer.weight"][300:]) == 0
    convert.export_hf(open_full_state(tmp_path / "ours")[0], config, tmp_path / "back", dtype=torch.bfloat16,
                      token_ids=IDS)

    source = _safetensors_dir(tmp_path / "src")
    exported = _safetensors_dir(tmp_path / "back")
    assert sorted(source) == sorted(exported)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def test_import_matches_transformers_logits_tp1(tmp_path):
    hf = _random_hf_model(vocab_size=250, dtype=torch.float32, seed=3)
    hf.save_pretrained(tmp_path / "src")
    full, config = _import(tmp_path / "src", tmp_path / "ours", tensor_parallel=1)
    ours = AquilaModel(config, ParallelContext.single_process()).eval()
    load_full_state_dict([ours], full, ParallelContext.single_process(), config)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids)[..., :250] - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


def _pipeline_chunks(config: ModelConfig, ctx: ParallelContext, vpp: int, seed: int) -> list[AquilaModel]:
    return [AquilaModel(config, ctx, layer_ids=chunk_layer_ids(config.num_layers, ctx.pp_size, vpp, ctx.pp_rank, c),
                        pre_process=ctx.pp_rank == 0 and c == 0,
                        post_process=ctx.pp_rank == ctx.pp_size - 1 and c == vpp - 1, seed=seed).eval()
            for c in range(vpp)]


def _pipeline_logits(chunks: list[AquilaModel], ctx: ParallelContext, ids: torch.Tensor, vpp: int):
    """Forward through the pp x vpp parts in depth order with plain send/recv; full padded logits on the last."""
    import torch.distributed as dist

    parts = ctx.pp_size * vpp
    hidden = None
    for part in range(parts):
        if part % ctx.pp_size != ctx.pp_rank:
            continue
        chunk = chunks[part // ctx.pp_size]
        if part > 0:
            hidden = torch.empty(ids.shape[1], ids.shape[0], chunk.config.hidden_size)  # [s, b, h]
            dist.recv(hidden, src=ctx.prev_stage_rank)
        with torch.no_grad():
            out = chunk(ids if part == 0 else None, hidden_states=hidden)
        if part < parts - 1:
            dist.send(out.contiguous(), dst=ctx.next_stage_rank)
    if not ctx.is_last_stage:
        return None
    shards = [torch.empty_like(out) for _ in range(ctx.tp_size)]
    dist.all_gather(shards, out.contiguous(), group=ctx.tp_group)
    return torch.cat(shards, dim=-1)  # [b, s, V_pad]


def _tp2_pp2_worker(rank: int, world_size: int, hf_full: dict, hf_config: ModelConfig, ids: torch.Tensor):
    ctx = ParallelContext.initialize(tp_size=2, pp_size=2, device=torch.device("cpu"))
    vpp = 2
    seeded = gather_full_state_dict(_pipeline_chunks(_config(), ctx, vpp, seed=7), ctx)
    chunks = _pipeline_chunks(hf_config, ctx, vpp, seed=99)
    load_full_state_dict(chunks, hf_full, ctx, hf_config)
    reloaded = gather_full_state_dict(chunks, ctx)
    logits = _pipeline_logits(chunks, ctx, ids, vpp)
    return {"seeded": seeded if rank == 0 else None, "reloaded": reloaded if rank == 0 else None,
            "logits": logits if ctx.is_last_stage and ctx.tp_rank == 0 else None}


def test_tp2_pp2_gather_equals_tp1_and_loads_hf_weights(tmp_path):
    config = _config()
    tp1 = _our_model(config, seed=7)
    tp1_full = gather_full_state_dict([tp1], ParallelContext.single_process())
    reference = {name: p.detach() for name, p in tp1.named_parameters()}  # independent of the gather code
    assert all(torch.equal(tp1_full[k], v) for k, v in reference.items()) and sorted(tp1_full) == sorted(reference)

    hf = _random_hf_model(vocab_size=300, dtype=torch.float32, seed=4)  # TP2 pads 300 -> 384 (TP1: 320)
    hf.save_pretrained(tmp_path / "src")
    hf_full, hf_config = _import(tmp_path / "src", tmp_path / "ours", tensor_parallel=2)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))

    results = run_distributed(_tp2_pp2_worker, world_size=4, args=(hf_full, hf_config, ids))
    seeded, reloaded = results[0]["seeded"], results[0]["reloaded"]
    assert sorted(seeded) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(seeded[name], tensor), name
    exported_tp1, exported_tp2 = full_to_hf(tp1_full, config), full_to_hf(seeded, config)
    assert all(torch.equal(exported_tp1[k], exported_tp2[k]) for k in exported_tp1)

    assert sorted(reloaded) == sorted(hf_full)
    assert all(torch.equal(reloaded[k], hf_full[k]) for k in hf_full)
    logits = next(r["logits"] for r in results if r["logits"] is not None)
    assert logits.shape == (2, 16, 384)
    with torch.no_grad():
        assert (logits[..., :300] - hf(ids).logits).abs().max().item() < 1e-4


def _fake_tokenizer(directory: Path) -> Path:
    """An Aquila-layout BPE tokenizer with 242 base entries + the 8 Aquila specials = 250 ids."""
    directory.mkdir()
    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, 242)}}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    specials = ["<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]", "[sMASK]", "[CLS]", "</s>"]
    (directory / "special_tokens.txt").write_text("\n".join(specials) + "\n")
    return directory


def test_cli_round_trip_with_shards_and_tokenizer(tmp_path):
    config = _config()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {k: v for k, v in SHAPE.items()}}))
    full = gather_full_state_dict([_our_model(config)], ParallelContext.single_process())
    save_full_state(tmp_path / "full", full, config)
    tokenizer = _fake_tokenizer(tmp_path / "tok")

    code = convert.main(["to-hf", "--config", str(recipe), "--weights", str(tmp_path / "full"),
                         "--output", str(tmp_path / "hf"), "--tokenizer-dir", str(tokenizer), "--dtype", "fp32",
                         "--max-shard-size", "100KB"])
    assert code == 0
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1 and all((out / f).is_file() for f in shard_files)
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (248, 249, 0)
    assert hf_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}  # transformers 5.x
    assert hf_config["rope_scaling"] is None and hf_config["rope_theta"] == 10000.0  # transformers 4.x
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 249
    assert (out / "vocab.json").read_bytes() == (tokenizer / "vocab.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]

    code = convert.main(["from-hf", "--hf-dir", str(out), "--output", str(tmp_path / "back"),
                         "--tensor-parallel", "2", "--make-vocab-size-divisible-by", "64"])
    assert code == 0
    back, stored = load_full_state(tmp_path / "back")
    model_section = load_config(tmp_path / "back" / "model.yaml").model
    assert stored == model_section and model_section.padded_vocab_size(2) == 256
    assert (model_section.num_kv_heads, model_section.ffn_size, model_section.norm_eps) == (2, 96, 1e-5)
    assert (model_section.rope_scaling, model_section.rope_scaling_factor) == ("none", 1.0)  # scaled: test_rope_scaling
    assert all(torch.equal(back[k], full[k]) for k in full if "embedding" not in k and "output" not in k)
    for name in ("embedding.weight", "output_layer.weight"):
        assert torch.equal(back[name][:250], full[name][:250]) and torch.count_nonzero(back[name][250:]) == 0


def test_aquila_model_type_needs_remote_code_but_llama_class_loads_it(tmp_path):
    config = _config()
    full = gather_full_state_dict([_our_model(config)], ParallelContext.single_process())
    convert.export_hf(full, config, tmp_path / "aq", dtype=torch.float32, token_ids=IDS, model_type="aquila")
    written = json.loads((tmp_path / "aq" / "config.json").read_text())
    assert written["model_type"] == "aquila" and written["architectures"] == ["AquilaForCausalLM"]
    with pytest.raises(OSError, match="configuration_aquila.py"):
        _hf().AutoModelForCausalLM.from_pretrained(tmp_path / "aq", trust_remote_code=True)
    llama = _hf().LlamaForCausalLM.from_pretrained(tmp_path / "aq")
    assert torch.equal(llama.lm_head.weight.detach(), full["output_layer.weight"][:250])
    assert model_config_from_hf(written, make_vocab_size_divisible_by=64).num_layers == 4


def test_errors_name_the_tensor_and_lose_nothing(tmp_path):
    config = _config()
    full = gather_full_state_dict([_our_model(config)], ParallelContext.single_process())
    bad = dict(full)
    bad["layers.2.mlp.down.weight"] = torch.zeros(64, 95)
    with pytest.raises(ConversionError, match=r"layers\.2\.mlp\.down\.weight: expected \(64, 96\), got \(64, 95\)"):
        full_to_hf(bad, config)
    del bad["layers.1.attention.qkv.weight"]
    with pytest.raises(ConversionError, match=r"missing 1 tensor\(s\): layers\.1\.attention\.qkv\.weight"):
        full_to_hf(bad, config)

    hf = full_to_hf(full, config)
    hf["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(ConversionError, match=r"k_proj\.weight: expected \(32, 64\), got \(16, 64\)"):
        hf_to_full(hf, config, tp_size=1)

    tp2_padded = _config(vocab_size=300)  # TP1 pads to 320; a TP2 full state has 384 rows
    other = hf_to_full(full_to_hf(_tp_full(tp2_padded), tp2_padded), tp2_padded, tp_size=2)
    with pytest.raises(ConversionError, match="resize_vocab"):
        load_full_state_dict([_our_model(tp2_padded)], other, ParallelContext.single_process())

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert.export_hf(full, config, tmp_path / "taken", token_ids=IDS)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConversionError, match="outside the model vocabulary"):
        convert.export_hf(full, config, tmp_path / "no_ids")  # Aquila ids 100006.. do not fit vocab 250
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    with pytest.raises(ConversionError, match="hidden_act"):
        model_config_from_hf({"model_type": "llama", "hidden_act": "gelu"})
    assert convert.main(["from-hf", "--hf-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 1


def test_tied_hf_checkpoint_gets_an_untied_copy():
    config = _config(num_layers=1)
    hf = full_to_hf(_tp_full(config), config)
    del hf["lm_head.weight"]
    full = hf_to_full(hf, config, tp_size=1)
    assert torch.equal(full["output_layer.weight"], full["embedding.weight"])
    assert full["output_layer.weight"].data_ptr() != full["embedding.weight"].data_ptr()


def test_special_ids_come_from_the_real_aquila_tokenizer():
    tokenizer_dir = require_aquila_tokenizer()
    assert token_ids_from_tokenizer(tokenizer_dir, 100008) == TokenIds(bos=100006, eos=100007, pad=0)


# ------------------------------------------------------------------ memory held while converting
class HeldBytes:
    """What a conversion holds, measured where tensors enter and leave it, whatever code sits between.

    Reads: each tensor returned by ``safe_open(...).get_tensor[s]`` (both ``safetensors.safe_open`` and
    the ``safetensors.torch.safe_open`` that ``load_file`` calls are wrapped), or by a ``track``ed
    mapping, counts as alive from the read until it is freed (a weakref finalizer; a view keeps its
    base alive, so pieces of a tensor count too). ``peak_live`` is the most bytes alive at once.
    Writes: ``saved`` holds the bytes of each dict handed to ``safetensors.torch.save_file``.
    """

    def __init__(self, monkeypatch):
        self.live = self.peak_live = 0
        self.reads: Counter = Counter()
        self.saved: list[int] = []
        real_open, real_save, held = safetensors.safe_open, safetensors.torch.save_file, self

        class TrackedOpen:
            def __init__(self, *args, **kwargs):
                self._handle = real_open(*args, **kwargs)

            def __enter__(self):
                self._handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self._handle.__exit__(*exc)

            def get_tensor(self, name):
                return held.read(name, self._handle.get_tensor(name))

            def get_tensors(self):  # load_file's call
                return {name: held.read(name, t) for name, t in self._handle.get_tensors().items()}

            def __getattr__(self, attribute):
                return getattr(self._handle, attribute)

        def save_file(tensors, filename, metadata=None):
            self.saved.append(sum(t.numel() * t.element_size() for t in tensors.values()))
            real_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors, "safe_open", TrackedOpen)
        monkeypatch.setattr(safetensors.torch, "safe_open", TrackedOpen)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    def read(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        self.reads[name] += 1
        self.live += size
        self.peak_live = max(self.peak_live, self.live)
        weakref.finalize(tensor, self._freed, size)
        return tensor

    def _freed(self, size: int) -> None:
        self.live -= size

    def track(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        held = self

        class Tracked(Mapping):
            def __getitem__(self, name):
                return held.read(name, tensors[name])

            def shape_of(self, name):
                return tensors.shape_of(name)

            def __iter__(self) -> Iterator[str]:
                return iter(tensors)

            def __len__(self):
                return len(tensors)

        return Tracked()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


SHARD = 150_000  # --max-shard-size 150KB: about one layer of the 8-layer model below, an eighth of the model


def _assert_bounded(held: HeldBytes, layer_bytes: int, largest_bytes: int, model_bytes: int, sources) -> None:
    """At most one layer + one shard alive, shards within the limit (+ one tensor), every source read once."""
    assert held.reads == Counter(list(sources)), "every source tensor read exactly once"
    assert model_bytes > 3 * (layer_bytes + SHARD)  # the bounds below exclude holding the model
    assert held.peak_live <= layer_bytes + SHARD, (
        f"{held.peak_live} bytes read and not yet freed at once; bound one layer {layer_bytes} + one shard {SHARD}")
    assert len(held.saved) >= 4 and max(held.saved) <= SHARD + largest_bytes, (
        f"shard dicts of {held.saved} bytes; bound {SHARD} + one tensor {largest_bytes}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.save in one process
def test_from_hf_and_to_hf_hold_one_layer_and_one_shard(tmp_path, monkeypatch):
    hf = _random_hf_model(vocab_size=300, dtype=torch.float32, seed=6, num_layers=8)
    hf.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    source = _safetensors_dir(tmp_path / "src")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file() and len(list(
        (tmp_path / "src").glob("*.safetensors"))) > 2
    layer_bytes = _bytes(t for name, t in source.items() if name.startswith("model.layers.0."))
    padded_rows = 384  # 300 -> multiple of 64 x TP2
    largest_bytes = padded_rows * 64 * 4  # the padded embedding, fp32
    model_bytes = _bytes(source.values())

    held = HeldBytes(monkeypatch)
    assert convert.main(["from-hf", "--hf-dir", str(tmp_path / "src"), "--output", str(tmp_path / "ours"),
                         "--tensor-parallel", "2", "--make-vocab-size-divisible-by", "64",
                         "--max-shard-size", "150KB"]) == 0
    _assert_bounded(held, layer_bytes, largest_bytes, model_bytes, source)
    index = json.loads((tmp_path / "ours" / "full_state.safetensors.index.json").read_text())
    ours = _safetensors_dir(tmp_path / "ours")
    assert set(index["weight_map"].values()) == {p.name for p in (tmp_path / "ours").glob("*.safetensors")}
    assert sorted(index["weight_map"]) == sorted(ours) and index["metadata"]["total_size"] == _bytes(ours.values())
    qkv = torch.cat([source[f"model.layers.5.self_attn.{p}_proj.weight"].view(2, -1, 16, 64) for p in "qkv"], dim=1)
    assert torch.equal(ours["layers.5.attention.qkv.weight"], qkv.reshape(-1, 64))  # hand layout: module docstring
    assert ours["embedding.weight"].shape == (padded_rows, 64)

    held = HeldBytes(monkeypatch)
    assert convert.main(["to-hf", "--config", str(tmp_path / "ours" / "model.yaml"), "--weights",
                         str(tmp_path / "ours"), "--output", str(tmp_path / "back"), "--dtype", "fp32",
                         "--tokenizer-dir", str(_fake_tokenizer(tmp_path / "tok")), "--max-shard-size", "150KB"]) == 0
    _assert_bounded(held, layer_bytes, largest_bytes, model_bytes, ours)
    back = _safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(source) and all(torch.equal(back[name], t) for name, t in source.items())

    # to-hf --checkpoint reads a torch.distributed.checkpoint through CheckpointModelTensors
    dcp.save({f"model.{name}": tensor for name, tensor in ours.items()}, checkpoint_id=str(tmp_path / "dcp"),
             no_dist=True)
    held = HeldBytes(monkeypatch)
    config = load_config(tmp_path / "ours" / "model.yaml").model
    convert.export_hf(held.track(CheckpointModelTensors(tmp_path / "dcp")), config, tmp_path / "from_dcp",
                      dtype=torch.float32, token_ids=IDS, max_shard_bytes=SHARD)
    _assert_bounded(held, layer_bytes, largest_bytes, model_bytes, ours)
    from_dcp = _safetensors_dir(tmp_path / "from_dcp")
    assert sorted(from_dcp) == sorted(source) and all(torch.equal(from_dcp[name], t) for name, t in source.items())


def test_pytorch_bin_and_single_file_formats_read_like_safetensors_shards(tmp_path):
    hf = _random_hf_model(vocab_size=250, dtype=torch.float32, seed=8)
    hf.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    expected, config = _import(tmp_path / "src", tmp_path / "ours", tensor_parallel=1)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    torch.save(_safetensors_dir(tmp_path / "src"), tmp_path / "bin" / "pytorch_model.bin")
    from_bin, _ = _import(tmp_path / "bin", tmp_path / "ours_bin", tensor_parallel=1)
    assert sorted(from_bin) == sorted(expected) and all(torch.equal(from_bin[k], v) for k, v in expected.items())

    # the earlier one-file full state, and the index path, still load (checkpoint.init_weights takes all three)
    metadata = {"format": "pt", "megatron_aquila": FULL_STATE_FORMAT,
                "model_config": json.dumps(asdict(config))}
    save_file(expected, str(tmp_path / "full_state.safetensors"), metadata=metadata)
    for path in (tmp_path / "full_state.safetensors", tmp_path / "ours" / "full_state.safetensors.index.json"):
        loaded, stored = load_full_state(path)
        assert stored == config and sorted(loaded) == sorted(expected)
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
        model = _our_model(config)
        load_full_state_dict([model], open_full_state(path)[0], ParallelContext.single_process(), config)
        assert all(torch.equal(p.detach(), expected[name]) for name, p in model.named_parameters())


def test_sharded_full_state_errors_name_the_file(tmp_path):
    config = _config(num_layers=2)
    full = _tp_full(config)
    save_full_state(tmp_path / "full", full, config, max_shard_bytes=50_000)
    with pytest.raises(ConversionError, match="already holds a full state"):
        save_full_state(tmp_path / "full", full, config)
    index = tmp_path / "full" / "full_state.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in (tmp_path / "full").iterdir()) == sorted(shards + [index.name])
    assert sorted(load_full_state(tmp_path / "full")[0]) == sorted(expected_full_shapes(config, 256))

    (tmp_path / "full" / shards[-1]).rename(tmp_path / "moved.safetensors")
    with pytest.raises(ConversionError, match=f"{shards[-1]} does not exist"):
        open_full_state(tmp_path / "full")
    index.write_text("{}")
    with pytest.raises(ConversionError, match="not a safetensors index with a 'weight_map'"):
        open_full_state(index)
    with pytest.raises(ConversionError, match="holds neither full_state.safetensors nor"):
        open_full_state(tmp_path)
