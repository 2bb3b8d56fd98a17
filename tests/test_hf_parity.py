"""The Llama forward, cache and greedy generation against Hugging Face transformers (float32)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from tests.helpers import MAX_NEW, jit_forward, rel_err
from tests.hf_models import hf_greedy, hf_logits

GREEDY = lj.GenerateConfig(max_new_tokens=MAX_NEW, stop_tokens=())


@pytest.fixture(scope="module")
def hf_singles(case, prompts):
    """transformers' greedy tokens for each prompt alone."""
    return [hf_greedy(case.hf, p, MAX_NEW) for p in prompts]


@pytest.fixture(scope="module")
def our_singles(case, prompts):
    """Our greedy tokens for each prompt alone (batch 1)."""
    results = [lj.generate(case.params, case.cfg, [p], GREEDY) for p in prompts]
    for result in results:
        assert result.tokens.shape == (1, MAX_NEW)
        assert result.lengths.tolist() == [MAX_NEW]
    return [result.as_lists()[0] for result in results]


@pytest.fixture(scope="module")
def ref_logits(case, tokens):
    return hf_logits(case.hf, tokens)


def test_loaded_config_matches_hf(case):
    hf = case.hf.config
    cfg = case.cfg
    assert cfg.num_key_value_heads == hf.num_key_value_heads
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert (case.params.lm_head is None) == cfg.tie_word_embeddings
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    if case.name == "gqa_llama3":
        assert cfg.rope_scaling == lj.RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
        assert case.params.layers.bq is not None and case.params.layers.b_down is not None
    else:
        assert cfg.rope_scaling is None
        assert case.params.layers.bq is None and case.params.layers.b_down is None


def test_forward_matches_hf(case, tokens, ref_logits):
    logits = jit_forward()(case.params, jnp.asarray(tokens), case.cfg)
    assert logits.shape == (*tokens.shape, case.cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert rel_err(logits, ref_logits) < 1e-4


def test_llama3_scaling_matters(llama3_case, tokens):
    """Without the llama3 scaling the logits must be far off, or the parity test proves little."""
    case = llama3_case
    unscaled = dataclasses.replace(case.cfg, rope_scaling=None)
    logits = jit_forward()(case.params, jnp.asarray(tokens), unscaled)
    assert rel_err(logits, hf_logits(case.hf, tokens)) > 1e-2


def test_scan_equals_unrolled(case, tokens):
    scanned = jit_forward()(case.params, jnp.asarray(tokens), case.cfg, scan_layers=True)
    unrolled = jit_forward()(case.params, jnp.asarray(tokens), case.cfg, scan_layers=False)
    assert rel_err(scanned, unrolled) < 1e-6


def test_packed_rows_equal_separate_sequences(case, tokens):
    """``segment_ids`` + restarting ``positions``: two packed sequences see only themselves."""
    a, b = tokens[0, :15], tokens[1, :25]
    packed = np.concatenate([a, b])[None]
    segments = np.repeat([[0, 1]], [15, 25], axis=1)
    positions = np.concatenate([np.arange(15), np.arange(25)])[None]
    logits = jit_forward()(
        case.params, jnp.asarray(packed), case.cfg,
        positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments),
    )
    assert rel_err(logits[0, :15], hf_logits(case.hf, a[None])[0]) < 1e-4
    assert rel_err(logits[0, 15:], hf_logits(case.hf, b[None])[0]) < 1e-4
    # b read as a continuation of a is far from b alone, so the test above can fail
    unpacked = hf_logits(case.hf, packed)[0, 15:]
    assert rel_err(unpacked, hf_logits(case.hf, b[None])[0]) > 1e-2


def test_prefill_then_decode_matches_forward(case, tokens):
    """Ragged prefill (right-padded, lengths 7 and 13), then one decode step per token."""
    cfg = case.cfg
    full = np.asarray(jit_forward()(case.params, jnp.asarray(tokens), cfg))

    lengths = np.array([7, 13], np.int32)
    width = 16
    prompt = np.zeros((2, width), np.int32)
    for b, n in enumerate(lengths):
        prompt[b, :n] = tokens[b, :n]
    cache = lj.init_cache(cfg, 2, 64, jnp.float32)
    logits, cache = jax.jit(lj.prefill, static_argnames="cfg")(
        case.params, cache, jnp.asarray(prompt), jnp.asarray(lengths), cfg
    )
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    assert rel_err(logits, full[np.arange(2), lengths - 1]) < 1e-5

    step = jax.jit(lj.decode_step, static_argnames="cfg")
    for i in range(tokens.shape[1] - lengths.max()):
        pos = lengths + i
        logits, cache = step(case.params, cache, jnp.asarray(tokens[np.arange(2), pos]), cfg)
        assert rel_err(logits, full[np.arange(2), pos]) < 1e-5, f"decode step {i}"
    np.testing.assert_array_equal(np.asarray(cache.lengths), tokens.shape[1] - lengths.max() + lengths)


def test_greedy_generations_are_not_degenerate(hf_singles):
    """Guards the fixture: repeats of one token would make greedy parity a weak test."""
    for tokens in hf_singles:
        assert len(tokens) == MAX_NEW
        assert len(set(tokens)) >= 8, tokens


def test_greedy_matches_hf(our_singles, hf_singles):
    assert our_singles == hf_singles


def test_batch_equals_singles(case, prompts, our_singles):
    """Right-padded prompts of lengths 12, 5 and 9 in one batch."""
    result = lj.generate(case.params, case.cfg, prompts, GREEDY)
    assert result.tokens.shape == (len(prompts), MAX_NEW)
    assert result.as_lists() == our_singles


def test_bf16_params_load_and_generate(case, prompts, tokens, ref_logits):
    params, cfg = lj.load_params(case.path, dtype=jnp.bfloat16)
    assert cfg == case.cfg
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    logits = jit_forward()(params, jnp.asarray(tokens), cfg)
    assert logits.dtype == jnp.float32
    # bf16 rounding, not a wrong model: here transformers itself in bf16 is 6-10 % off its f32
    # logits (the weights are large), ours 4-6 %; a wrong layer is off by O(1).
    assert rel_err(logits, ref_logits) < 0.15
    result = lj.generate(params, cfg, prompts, GREEDY)
    assert result.tokens.shape == (len(prompts), MAX_NEW)
    assert ((result.tokens >= 0) & (result.tokens < cfg.vocab_size)).all()
    assert result.lengths.tolist() == [MAX_NEW] * len(prompts)
