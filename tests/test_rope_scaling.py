"""RoPE scaling (model/rope.py) against transformers' LlamaForCausalLM given the same rope_parameters,
written out here by hand: logits and grads past the original length, dynamic NTK below and above it,
the config.json round trip through to-hf / from-hf, and the ConfigError of each invalid setting."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_aquila.checkpoint.full_state import gather_full_state_dict, load_full_state
from megatron_aquila.checkpoint.hf_mapping import ConversionError, TokenIds, full_to_hf, model_config_from_hf
from megatron_aquila.config import ConfigError, ModelConfig, load_config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext

_spec = importlib.util.spec_from_file_location(
    "convert_checkpoint", Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py")
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

# GQA (4 heads of dim 16, 2 kv heads), like tests/test_hf_conversion.py; vocab 250 padded to 256. Weights of
# std 0.1 (not 0.02) make attention position-sensitive: scaled and plain RoPE then differ by ~0.6 in the logits.
SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             vocab_size=250, make_vocab_size_divisible_by=64, seq_length=96, norm_init=0.8, init_std=0.1)
ORIGINAL, LONG = 32, 96  # pretraining length L, and a test length three times past it

# (our model.rope_* fields, transformers' rope_parameters for the same scaling, written independently).
# With d = 16 and base 10000, L = 32: yarn's ramp covers pairs 0..2 and llama3 keeps pair 0, blends
# pair 1 and divides pairs 2.. by the factor, so every branch of both is exercised.
CASES = {
    "linear": (dict(rope_scaling="linear", rope_scaling_factor=3.0),
               {"rope_type": "linear", "factor": 3.0}),
    "yarn": (dict(rope_scaling="yarn", rope_scaling_factor=3.0, rope_original_max_positions=ORIGINAL),
             {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": ORIGINAL}),
    "yarn-tuned": (dict(rope_scaling="yarn", rope_scaling_factor=3.0, rope_original_max_positions=ORIGINAL,
                        rope_yarn_beta_fast=4.0, rope_yarn_beta_slow=0.5, rope_yarn_truncate=False,
                        rope_yarn_mscale=1.0, rope_yarn_mscale_all_dim=0.5),
                   {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": ORIGINAL,
                    "beta_fast": 4.0, "beta_slow": 0.5, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "yarn-attention-factor": (dict(rope_scaling="yarn", rope_scaling_factor=3.0,
                                   rope_original_max_positions=ORIGINAL, rope_yarn_attention_factor=1.3),
                              {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": ORIGINAL,
                               "attention_factor": 1.3}),
    "llama3": (dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_positions=ORIGINAL,
                    rope_llama3_low_freq_factor=1.0, rope_llama3_high_freq_factor=4.0),
               {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "dynamic": (dict(rope_scaling="dynamic", rope_scaling_factor=3.0, rope_original_max_positions=ORIGINAL),
                {"rope_type": "dynamic", "factor": 3.0}),
}


def _hf():
    import transformers

    return transformers


def _ours(**rope) -> AquilaModel:
    return AquilaModel(ModelConfig(**SHAPE, **rope), ParallelContext.single_process(), seed=7).eval()


def _hf_model(ours: AquilaModel, rope_parameters: dict, max_positions: int):
    """LlamaForCausalLM (eager attention, fp32) with our weights and a hand-written rope_parameters.

    transformers' dynamic NTK takes its original length from max_position_embeddings.
    """
    hf_config = _hf().LlamaConfig(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters={"rope_theta": 10000.0, **rope_parameters},
        attn_implementation="eager")
    hf = _hf().LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(full_to_hf(gather_full_state_dict([ours], ParallelContext.single_process()), ours.config))
    return hf


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 250, (2, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(ours: AquilaModel, hf, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> float:
    with torch.no_grad():
        mine = ours(ids, position_ids=position_ids)[..., :250]
        theirs = hf(ids, position_ids=position_ids).logits
    return (mine - theirs).abs().max().item()


@pytest.mark.parametrize("case", [name for name in CASES if name != "dynamic"])
def test_logits_and_grads_match_transformers_past_the_original_length(case):
    fields, rope_parameters = CASES[case]
    ours = _ours(**fields)
    hf = _hf_model(ours, rope_parameters, max_positions=LONG)
    ids = _ids(LONG)
    assert _max_diff(ours, hf, ids) < 1e-4
    with torch.no_grad():  # the scaling changes the model: unscaled RoPE is far from both
        plain = _hf_model(ours, {"rope_type": "default"}, max_positions=LONG)(ids).logits
        assert (plain - hf(ids).logits).abs().max().item() > 0.1

    # backward through the scaled tables (yarn's attention factor m scales the rotation)
    upstream = torch.randn(2, LONG, 250, generator=torch.Generator().manual_seed(3))
    (ours(ids)[..., :250] * upstream).sum().backward()
    (hf(ids).logits * upstream).sum().backward()
    grads = {"final_norm.weight": "model.norm.weight",
             "layers.0.input_norm.weight": "model.layers.0.input_layernorm.weight"}
    named = dict(hf.named_parameters())
    for mine, theirs in grads.items():
        torch.testing.assert_close(ours.get_parameter(mine).grad, named[theirs].grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.embedding.weight.grad[:250], hf.model.embed_tokens.weight.grad,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length", [24, ORIGINAL, 64, LONG])
def test_dynamic_ntk_matches_transformers_below_and_above_the_original_length(length):
    fields, rope_parameters = CASES["dynamic"]
    ours = _ours(**fields)
    hf = _hf_model(ours, rope_parameters, max_positions=ORIGINAL)  # fresh: its frequency buffer only grows
    ids = _ids(length, seed=length)
    assert _max_diff(ours, hf, ids) < 1e-4
    assert _max_diff(ours, hf, ids, position_ids=torch.arange(length).expand(2, length)) < 1e-4
    with torch.no_grad():
        unscaled = (ours(ids) - _ours()(ids)).abs().max().item()
    assert unscaled == 0 if length <= ORIGINAL else unscaled > 0.1


def test_dynamic_ntk_scales_for_the_largest_position_id_as_transformers_does():
    fields, rope_parameters = CASES["dynamic"]
    ours = _ours(**fields)
    positions = (torch.arange(LONG) // 2).expand(2, LONG)  # 96 tokens, positions 0..47: n = 48
    ids = _ids(LONG, seed=5)
    assert _max_diff(ours, _hf_model(ours, rope_parameters, max_positions=ORIGINAL), ids, positions) < 1e-4
    with torch.no_grad():  # n = 48, not the 96 tokens: the frequencies differ from those of the plain call
        assert (ours(ids, position_ids=positions) - ours(ids, position_ids=torch.arange(LONG).expand(2, LONG))
                ).abs().max().item() > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_to_hf_and_from_hf_round_trip_the_scaling(tmp_path, case):
    fields, rope_parameters = CASES[case]
    ours = _ours(**fields)
    convert.export_hf(gather_full_state_dict([ours], ParallelContext.single_process()), ours.config,
                      tmp_path / "hf", dtype=torch.float32, token_ids=TokenIds(bos=1, eos=2, pad=0))
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    expected = {"rope_theta": 10000.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, **rope_parameters}
    if not case.startswith("yarn"):
        expected = {key: value for key, value in expected.items() if key not in ("beta_fast", "beta_slow", "truncate")}
    assert written["rope_parameters"] == expected  # transformers 5.x
    assert written["rope_scaling"] == {k: v for k, v in expected.items() if k != "rope_theta"}  # transformers 4.x
    assert written["max_position_embeddings"] == (ORIGINAL if case == "dynamic" else LONG)

    hf = _hf().AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert _max_diff(ours, hf, _ids(LONG)) < 1e-4

    assert convert.main(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "back"),
                         "--make-vocab-size-divisible-by", "64"]) == 0
    _, stored = load_full_state(tmp_path / "back")
    back = load_config(tmp_path / "back" / "model.yaml").model
    assert stored == back
    # dynamic NTK's original length travels as max_position_embeddings, so seq_length comes back as it
    imported = {"norm_init": 1.0, "seq_length": written["max_position_embeddings"]}  # norm_init is not exported
    assert back == ModelConfig(**{**SHAPE, **fields, **imported})


def test_import_reads_transformers_4_keys_and_yarn_defaults_as_transformers_does():
    base = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 96, "vocab_size": 250, "max_position_embeddings": 128, "rope_theta": 500.0}
    linear = model_config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (linear.rope_scaling, linear.rope_scaling_factor, linear.rope_base) == ("linear", 2.0, 500.0)
    # rope_scaling wins over rope_parameters (transformers 5.x does the same)
    both = model_config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                 "rope_parameters": {"rope_type": "linear", "factor": 5.0, "rope_theta": 9.0}})
    assert (both.rope_scaling, both.rope_original_max_positions, both.rope_base) == ("dynamic", 128, 500.0)
    # a 0 beta means the default; mscale counts only with a nonzero mscale_all_dim; original defaults to max positions
    yarn = model_config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0,
                                                             "beta_fast": 0, "mscale": 1.0, "mscale_all_dim": 0}})
    assert (yarn.rope_yarn_beta_fast, yarn.rope_yarn_beta_slow, yarn.rope_original_max_positions) == (32.0, 1.0, 128)
    assert yarn.rope_yarn_mscale is None and yarn.rope_yarn_mscale_all_dim is None

    with pytest.raises(ConversionError, match="'longrope' is not supported"):
        model_config_from_hf({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 500.0}})
    with pytest.raises(ConversionError, match="no 'low_freq_factor'"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}})
    with pytest.raises(ConversionError, match="partial_rotary_factor 0.5"):
        model_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}})


VALID = ["training.train_iters=10", "data.mock=true"]


@pytest.mark.parametrize("overrides, words", [
    (["model.rope_scaling=ntk"], ["model.rope_scaling 'ntk'", "none, linear, dynamic, yarn, llama3"]),
    (["model.rope_scaling=linear", "model.rope_scaling_factor=0"], ["model.rope_scaling_factor 0.0", ">= 1"]),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=0.5", "model.rope_original_max_positions=32"],
     ["model.rope_scaling_factor 0.5", ">= 1"]),
    (["model.rope_scaling_factor=4"], ["model.rope_scaling_factor 4.0", "'none'"]),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=4"], ["model.rope_original_max_positions", "'yarn'"]),
    (["model.rope_scaling=dynamic", "model.rope_scaling_factor=4"], ["model.rope_original_max_positions", "'dynamic'"]),
    (["model.rope_scaling=llama3", "model.rope_scaling_factor=8", "model.rope_original_max_positions=0"],
     ["model.rope_original_max_positions >= 1", "got 0"]),
    (["model.rope_scaling=linear", "model.rope_scaling_factor=4", "model.rope_original_max_positions=32"],
     ["model.rope_original_max_positions 32", "'linear'"]),
    (["model.rope_scaling=dynamic", "model.rope_scaling_factor=4", "model.rope_original_max_positions=32",
      "model.hidden_size=16"], ["head dim > 2", "head dim is 2"]),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=4", "model.rope_original_max_positions=32",
      "model.rope_yarn_beta_fast=1", "model.rope_yarn_beta_slow=2"],
     ["model.rope_yarn_beta_fast 1.0", "model.rope_yarn_beta_slow 2.0"]),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=4", "model.rope_original_max_positions=32",
      "model.rope_yarn_attention_factor=0"], ["model.rope_yarn_attention_factor 0.0"]),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=4", "model.rope_original_max_positions=32",
      "model.rope_yarn_mscale=1"], ["model.rope_yarn_mscale 1.0", "model.rope_yarn_mscale_all_dim None"]),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=4", "model.rope_original_max_positions=32",
      "model.rope_yarn_mscale=1", "model.rope_yarn_mscale_all_dim=-1"], ["model.rope_yarn_mscale_all_dim -1.0", "> 0"]),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=4", "model.rope_original_max_positions=32",
      "model.rope_yarn_attention_factor=1.2", "model.rope_yarn_mscale=1", "model.rope_yarn_mscale_all_dim=1"],
     ["model.rope_yarn_attention_factor 1.2", "model.rope_yarn_mscale 1.0", "set one"]),
    (["model.rope_scaling=llama3", "model.rope_scaling_factor=8", "model.rope_original_max_positions=32",
      "model.rope_llama3_low_freq_factor=4"], ["model.rope_llama3_low_freq_factor 4.0",
                                              "model.rope_llama3_high_freq_factor 4.0"]),
])
def test_invalid_scaling_names_the_key(overrides, words):
    config = load_config(None, VALID + overrides)
    with pytest.raises(ConfigError) as error:
        config.validate(1)
    for word in words:
        assert word in str(error.value), f"{word!r} not in {error.value}"


@pytest.mark.parametrize("case", list(CASES))
def test_valid_scalings_pass_validation(case):
    fields, _ = CASES[case]
    load_config(None, VALID + [f"model.{key}={json.dumps(value)}" for key, value in fields.items()]).validate(1)
