"""LlamaConfig: Hugging Face ``config.json`` in and out, and the errors bad input gets."""

from __future__ import annotations

import dataclasses
import json

import pytest

import loraswitch_jax as lj
from loraswitch_jax import ConfigError
from tests.helpers import require

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# A minimal valid config.json; tests change one thing at a time.
BASE = {
    "model_type": "llama",
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny(**changes) -> lj.LlamaConfig:
    fields = dict(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return lj.LlamaConfig(**{**fields, **changes})


@pytest.mark.parametrize("name", sorted(lj.PRESETS))
def test_preset_hf_round_trip(name):
    cfg = lj.PRESETS[name]
    assert lj.LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_case_hf_round_trip(case):
    assert lj.LlamaConfig.from_hf_dict(case.cfg.to_hf_dict()) == case.cfg


def test_round_trip_through_json_file(tmp_path):
    cfg = tiny(
        rope_theta=500000.0, rope_scaling=lj.RopeScaling(**{**LLAMA3_SCALING}),
        eos_token_id=(2, 7), pad_token_id=0, attention_bias=True, head_dim=32,
    )
    cfg.save_pretrained(tmp_path)
    assert lj.LlamaConfig.from_pretrained(tmp_path) == cfg


def test_loaded_from_transformers_folder(case):
    """The case folders were written by transformers 5 (``rope_parameters`` spelling)."""
    with open(f"{case.path}/config.json") as f:
        hf = json.load(f)
    assert "rope_parameters" in hf
    assert lj.LlamaConfig.from_pretrained(case.path) == case.cfg
    assert case.cfg.num_key_value_heads == hf["num_key_value_heads"]


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(rope_theta=500000.0, rope_scaling=lj.RopeScaling(**LLAMA3_SCALING)),
        tiny(num_key_value_heads=1, rope_scaling=lj.RopeScaling("linear", 2.0)),
        tiny(num_key_value_heads=4, tie_word_embeddings=True, mlp_bias=True),
    ],
    ids=["llama3", "linear_mqa", "mha_tied"],
)
def test_saved_config_loads_in_transformers(cfg, tmp_path):
    transformers = require("transformers")  # its configs need no torch
    cfg.save_pretrained(tmp_path)
    hf = transformers.LlamaConfig.from_pretrained(tmp_path)
    assert hf.num_attention_heads == cfg.num_attention_heads
    assert hf.num_key_value_heads == cfg.num_key_value_heads
    assert hf.head_dim == cfg.head_dim
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings
    assert hf.mlp_bias == cfg.mlp_bias and hf.attention_bias == cfg.attention_bias
    rope = hf.rope_parameters
    assert rope["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling is None:
        assert rope["rope_type"] == "default"
    else:
        for key, value in cfg.rope_scaling.to_hf().items():
            assert rope[key] == value, key
    # and back: transformers' own dict (rope_parameters spelling) reads as the same config
    assert lj.LlamaConfig.from_hf_dict(hf.to_dict()) == cfg


def test_reads_transformers5_rope_parameters():
    cfg = lj.LlamaConfig.from_hf_dict(
        {**BASE, "rope_parameters": {**LLAMA3_SCALING, "rope_theta": 500000.0}}
    )
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == lj.RopeScaling(**LLAMA3_SCALING)
    default = lj.LlamaConfig.from_hf_dict(
        {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    )
    assert default.rope_theta == 1234.0 and default.rope_scaling is None


def test_reads_classic_rope_theta_and_scaling():
    cfg = lj.LlamaConfig.from_hf_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_SCALING)}
    )
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == lj.RopeScaling(**LLAMA3_SCALING)
    # Llama 2 era spelling: "type" instead of "rope_type"
    linear = lj.LlamaConfig.from_hf_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear.rope_theta == 10000.0
    assert linear.rope_scaling == lj.RopeScaling("linear", 4.0)


def test_defaults_and_derived_sizes():
    cfg = lj.LlamaConfig.from_hf_dict({**BASE, "num_key_value_heads": None, "eos_token_id": [2, 9]})
    assert cfg.num_key_value_heads == 4  # missing kv heads: multi-head attention
    assert cfg.head_dim == 16 and cfg.q_size == 64 and cfg.kv_size == 64 and cfg.num_groups == 1
    assert cfg.eos_token_id == (2, 9)
    assert tiny(eos_token_id=5).eos_token_id == (5,)


def test_config_is_hashable_static_arg():
    assert hash(tiny()) == hash(tiny())
    assert tiny() != tiny(rope_theta=500000.0)


@pytest.mark.parametrize(
    "hf, field",
    [
        ({**BASE, "model_type": "mistral"}, "model_type"),
        ({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({**BASE, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "dynamic"),
        ({**BASE, "rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({**BASE, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({k: v for k, v in BASE.items() if k != "hidden_size"}, "hidden_size"),
        ({k: v for k, v in BASE.items() if k != "vocab_size"}, "vocab_size"),
        ({**BASE, "intermediate_size": 0}, "intermediate_size"),
        ({**BASE, "vocab_size": -5}, "vocab_size"),
        ({**BASE, "num_hidden_layers": 0}, "num_hidden_layers"),
        ({**BASE, "eos_token_id": 160}, "eos_token_id"),
        ({**BASE, "eos_token_id": [2, -1]}, "eos_token_id"),
        ({**BASE, "bos_token_id": 1000}, "bos_token_id"),
        ({**BASE, "head_dim": 15}, "head_dim"),
        ({**BASE, "hidden_size": 66}, "hidden_size"),
        ({**BASE, "hidden_act": "gelu"}, "hidden_act"),
    ],
    ids=[
        "model_type", "rope_yarn", "rope_params_dynamic", "rope_no_factor", "gqa_divisibility",
        "missing_hidden", "missing_vocab", "zero_ffn", "negative_vocab", "zero_layers",
        "eos_outside_vocab", "eos_list_negative", "bos_outside_vocab", "odd_head_dim",
        "heads_do_not_divide_hidden", "activation",
    ],
)
def test_bad_hf_dict_raises(hf, field):
    with pytest.raises(ConfigError, match=field):
        lj.LlamaConfig.from_hf_dict(hf)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(factor=0.0), "factor"),
        (dict(low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
        (dict(rope_type="ntk"), "ntk"),
    ],
)
def test_bad_rope_scaling_raises(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        lj.RopeScaling(**{**LLAMA3_SCALING, **kwargs})


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(max_position_embeddings=-1), "max_position_embeddings"),
        (dict(num_attention_heads=True), "num_attention_heads"),  # a bool is not a size
        (dict(head_dim=7), "head_dim"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(pad_token_id=160), "pad_token_id"),
    ],
)
def test_bad_constructor_args_raise(changes, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**changes)


def test_invalid_json_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": ')
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        lj.LlamaConfig.from_pretrained(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        lj.LlamaConfig.from_pretrained(tmp_path)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny().vocab_size = 3
