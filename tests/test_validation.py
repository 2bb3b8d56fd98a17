"""Bad input is refused early with one line naming the field: token ids, adapter shapes and cache
room in the model functions; numbers that are not numbers in the configs; ambiguous prompts;
params that do not match the config they are saved with (issue 17, cases 3-6)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax import AdapterError, GenerateConfig, GenerationError, Sampler, WeightsError
from loraswitch_jax.config import PRESETS, ConfigError, LlamaConfig
from loraswitch_jax.generate import prepare_prompts
from loraswitch_jax.kv_cache import init_cache

CFG = PRESETS["demo"]  # vocab 259, 2 layers: the issue's own numbers
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def params():
    return lj.init_params(CFG, jax.random.key(0), jnp.float32)


def small_adapter(cfg=CFG, **kwargs):
    acfg = lj.AdapterConfig(**{"rank": 2, "num_experts": 2, **kwargs})
    return lj.init_adapter(cfg, acfg, jax.random.key(1))


# ------------------------------------------------------------------- 3: ids, adapters, cache room


@pytest.mark.parametrize("bad", [300, -1, CFG.vocab_size])
def test_forward_refuses_ids_outside_vocab(params, bad):
    with pytest.raises(ValueError, match=rf"forward: token id {bad} at \[0, 1\] is outside .*259"):
        lj.forward(params, jnp.array([[1, bad, 2]]), CFG)


def test_forward_refuses_non_integer_or_flat_tokens(params):
    with pytest.raises(ValueError, match="integer ids, got dtype float32"):
        lj.forward(params, jnp.array([[1.0, 2.0]]), CFG)
    with pytest.raises(ValueError, match=r"\[B, T\], got shape \(3,\)"):
        lj.forward(params, jnp.array([1, 2, 3]), CFG)


def test_forward_refuses_adapter_of_another_model(params):
    three_layers = dataclasses.replace(CFG, num_hidden_layers=3)
    adapter = small_adapter(three_layers)
    with pytest.raises(AdapterError, match=r"adapter\.a\['q'\] has shape \(3, .*expected \(2, "):
        lj.forward(params, jnp.array([[1, 2]]), CFG, adapter=adapter)
    # Shapes are static: the check holds under jit too.
    with pytest.raises(AdapterError, match="expected"):
        jax.jit(lj.forward, static_argnames="cfg")(params, jnp.array([[1, 2]]), cfg=CFG,
                                                   adapter=adapter)


def test_prefill_refuses_writing_past_the_cache(params):
    cache = init_cache(CFG, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"prefill: sequence 0 would hold 12 tokens .* 8 slots"):
        lj.prefill(params, cache, jnp.zeros((1, 12), jnp.int32), jnp.array([12]), CFG)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 4\]"):
        lj.prefill(params, cache, jnp.zeros((1, 4), jnp.int32), jnp.array([5]), CFG)
    with pytest.raises(ValueError, match="token id 300"):
        lj.prefill(params, cache, jnp.array([[1, 300]]), jnp.array([2]), CFG)
    with pytest.raises(ValueError, match="batch size"):
        lj.prefill(params, cache, jnp.zeros((2, 4), jnp.int32), jnp.array([4, 4]), CFG)


def test_decode_step_refuses_a_full_cache_and_bad_ids(params):
    cache = init_cache(CFG, 2, 8, jnp.float32)
    _, cache = lj.prefill(params, cache, jnp.ones((2, 8), jnp.int32), jnp.array([8, 3]), CFG)
    with pytest.raises(ValueError, match=r"decode_step: sequence 0 would hold 9 tokens .*8 cached"):
        lj.decode_step(params, cache, jnp.array([3, 3]), CFG)
    _, short = lj.prefill(params, init_cache(CFG, 2, 8, jnp.float32), jnp.ones((2, 2), jnp.int32),
                          jnp.array([2, 2]), CFG)
    with pytest.raises(ValueError, match="decode_step: token id -1"):
        lj.decode_step(params, short, jnp.array([3, -1]), CFG)


def test_traced_inputs_are_not_checked_on_the_host(params):
    """Inside jit the values are tracers: the checks read only shapes (no host sync in the
    decode loop), and the documented caller guarantee applies."""
    cache = init_cache(CFG, 1, 8, jnp.float32)
    step = jax.jit(lj.decode_step, static_argnames="cfg")
    with jax.transfer_guard_device_to_host("disallow"):
        logits, cache = step(params, cache, jnp.array([3]), cfg=CFG)
    assert logits.shape == (1, CFG.vocab_size)
    assert int(cache.lengths[0]) == 1


# ---------------------------------------------------------------- 4: numbers that are not numbers


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=NAN), "temperature"), (dict(temperature=INF), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=NAN), "top_p"), (dict(top_p=0.0), "top_p"),
])
def test_sampler_refuses(kwargs, field):
    with pytest.raises(ValueError, match=rf"Sampler\.{field} must be .*got {kwargs[field]!r}"):
        Sampler(**kwargs)


def test_sampler_temperature_message():
    with pytest.raises(ValueError) as e:
        Sampler(temperature=NAN)
    assert str(e.value) == "Sampler.temperature must be a finite number >= 0, got nan"


@pytest.mark.parametrize("kwargs, field", [
    (dict(alpha=NAN), "alpha"), (dict(alpha=INF), "alpha"), (dict(alpha=-8.0), "alpha"),
    (dict(alpha=0), "alpha"), (dict(alpha=True), "alpha"), (dict(dropout=NAN), "dropout"),
])
def test_adapter_config_refuses(kwargs, field):
    with pytest.raises(AdapterError, match=rf"AdapterConfig\.{field} must be"):
        lj.AdapterConfig(**kwargs)


def test_integer_dtypes_refused(tmp_path, params):
    with pytest.raises(ValueError, match="init_params dtype must be a floating dtype.*int32"):
        lj.init_params(CFG, jax.random.key(0), jnp.int32)
    lj.save_params(params, CFG, tmp_path)
    with pytest.raises(WeightsError, match="load_params dtype must be a floating dtype.*int8"):
        lj.load_params(tmp_path, dtype=jnp.int8)
    as_int = jax.tree.map(lambda x: x.astype(jnp.int32), params)
    with pytest.raises(WeightsError, match="floating dtype.*int32"):
        lj.save_params(as_int, CFG, tmp_path / "int")
    assert not (tmp_path / "int").exists()


def hf_dict(**changes):
    return {**CFG.to_hf_dict(), **changes}


@pytest.mark.parametrize("key, value, expected", [
    ("bos_token_id", 1.5, "an integer"),
    ("pad_token_id", "7", "an integer"),
    ("rms_norm_eps", "abc", "a finite number"),
    ("rms_norm_eps", NAN, "a finite number"),
    ("rope_theta", "big", "a finite number"),
    ("num_hidden_layers", True, "an integer"),
    ("hidden_size", 64.0, "an integer"),
    ("tie_word_embeddings", "no", "true or false"),
    ("eos_token_id", [257, "x"], "an integer, a list of integers or null"),
])
def test_config_json_errors_name_key_and_type(tmp_path, key, value, expected):
    (tmp_path / "config.json").write_text(json.dumps(hf_dict(**{key: value})))
    with pytest.raises(ConfigError, match=rf"config\.json key '{key}' must be {expected}, got"):
        LlamaConfig.from_pretrained(tmp_path)


def test_rope_scaling_values_named():
    scaling = {"rope_type": "llama3", "factor": "8", "original_max_position_embeddings": 8192}
    with pytest.raises(ConfigError, match=r"'rope_scaling\.factor' must be a finite number"):
        LlamaConfig.from_hf_dict(hf_dict(rope_scaling=scaling))


def test_config_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a list, expected a JSON object"):
        LlamaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("changes, field", [
    (dict(bos_token_id=1.5), "bos_token_id"), (dict(rms_norm_eps=NAN), "rms_norm_eps"),
    (dict(rope_theta=INF), "rope_theta"), (dict(eos_token_id=(True,)), "eos_token_id"),
])
def test_llama_config_refuses(changes, field):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(CFG, **changes)


@pytest.mark.parametrize("stop", [(1.5,), (-1,), ("a",), (True,), 2.0])
def test_generate_config_refuses_stop_tokens(stop):
    with pytest.raises(GenerationError, match=r"GenerateConfig\.stop_tokens must be"):
        GenerateConfig(stop_tokens=stop)


def test_generate_config_fields():
    assert GenerateConfig(stop_tokens=[3, 4]).stop_tokens == (3, 4)  # hashable: a jit static
    assert GenerateConfig(stop_tokens=5).stop_tokens == (5,)
    with pytest.raises(GenerationError, match=r"max_new_tokens must be an integer >= 1, got 2\.0"):
        GenerateConfig(max_new_tokens=2.0)
    with pytest.raises(GenerationError, match=r"cache_len must be an integer >= 1 or None"):
        GenerateConfig(cache_len=0)
    with pytest.raises(GenerationError, match=r"sampler must be a Sampler"):
        GenerateConfig(sampler=0.7)


def test_generate_refuses_stop_tokens_outside_vocab(params):
    gen = GenerateConfig(max_new_tokens=2, stop_tokens=(257, 300))
    with pytest.raises(GenerationError, match=r"stop_tokens holds 300, outside the vocabulary"):
        lj.generate(params, CFG, [[1, 2]], gen)


def test_import_peft_refuses_non_numbers(tmp_path):
    adapter = lj.init_adapter(CFG, lj.AdapterConfig.lora(rank=2), jax.random.key(2))
    lj.export_peft(adapter, CFG, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value, message in (("lora_alpha", "abc", "'lora_alpha' must be a finite number"),
                                ("r", 2.5, "'r' must be an integer >= 1")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**conf, key: value}))
        with pytest.raises(AdapterError, match=message):
            lj.import_peft(tmp_path, CFG)


# --------------------------------------------------------------------------- 5: prompt forms

ACCEPTED = {
    "list of lists": [[1, 2, 3], [4, 5, 6]],
    "tuple of tuples": ((1, 2, 3), (4, 5, 6)),
    "list of 1-D arrays": [np.array([1, 2, 3]), jnp.array([4, 5, 6])],
    "numpy ints": [[np.int32(1), np.int64(2), 3], [4, 5, 6]],
    "2-D array": np.array([[1, 2, 3], [4, 5, 6]]),
    "2-D jax array": jnp.array([[1, 2, 3], [4, 5, 6]]),
}


@pytest.mark.parametrize("form", ACCEPTED)
def test_accepted_prompt_forms_agree(form):
    tokens, lengths, _ = prepare_prompts(ACCEPTED[form], CFG, 4)
    want, want_lengths, _ = prepare_prompts([[1, 2, 3], [4, 5, 6]], CFG, 4)
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(lengths, want_lengths)


REFUSED = {
    "flat list": ([1, 2, 3], "flat list of ints.*wrap it"),
    "1-D array": (np.array([1, 2, 3]), "1-D array.*wrap it"),
    "nested 2-D array": ([np.array([[1, 2], [3, 4]])], "prompt 0 is a 2-D array"),
    "3-D array": (np.zeros((1, 2, 2), np.int32), "3-D array"),
    "deeper lists": ([[1, [2, 3]]], "prompt 0 holds a nested sequence"),
    "floats": ([[1.0, 2.0]], r"prompt 0 holds 1\.0, not an integer"),
    "bools": ([[True, 2]], "prompt 0 holds True"),
    "bool array": (np.array([[True, False]]), "holds bool values"),
    "float array": ([np.array([1.0, 2.0])], "holds float64 values"),
    "a string": ("hello", "prompts is a str"),
    "huge id": ([[1, 2**70]], "beyond int64"),
}


@pytest.mark.parametrize("form", REFUSED)
def test_refused_prompt_forms_say_the_expected_form(params, form):
    prompts, message = REFUSED[form]
    with pytest.raises(GenerationError, match=message) as e:
        lj.generate(params, CFG, prompts, GenerateConfig(max_new_tokens=2))
    if "bool values" not in message and "float64" not in message:
        assert "2-D integer array with one prompt per row" in str(e.value)


# ------------------------------------------------------------- 6: params that do not fit the config


def test_save_params_refuses_params_of_another_config(tmp_path, params):
    wider = dataclasses.replace(CFG, intermediate_size=CFG.intermediate_size + 8)
    with pytest.raises(WeightsError, match=r"params\.layers\.w_gate has shape \(2, 64, 172\), "
                                           r"but the config expects \(2, 64, 180\)"):
        lj.save_params(params, wider, tmp_path / "model")
    assert not (tmp_path / "model").exists()  # refused before writing anything
    biased = dataclasses.replace(CFG, attention_bias=True)
    with pytest.raises(WeightsError, match=r"params\.layers\.bq has shape None"):
        lj.save_params(params, biased, tmp_path / "model")
