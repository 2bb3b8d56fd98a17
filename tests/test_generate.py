"""generate(): input validation, samplers, stop tokens and streaming (on the llama3 case)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from tests.helpers import MAX_NEW, VOCAB, jit_forward
from loraswitch_jax import GenerateConfig, GenerationError, Sampler
from loraswitch_jax.generate import generate_batch, prepare_prompts

PAD = -1
GREEDY = GenerateConfig(max_new_tokens=MAX_NEW, stop_tokens=())


def sampled(temperature=1.0, **kwargs) -> GenerateConfig:
    return GenerateConfig(
        max_new_tokens=MAX_NEW, stop_tokens=(), sampler=Sampler(temperature=temperature, **kwargs)
    )


@pytest.fixture(scope="module")
def model(llama3_case):
    return llama3_case.params, llama3_case.cfg


@pytest.fixture(scope="module")
def greedy(model, prompts) -> np.ndarray:
    """Greedy tokens ``[3, MAX_NEW]`` for the batch of prompts, no stop tokens."""
    result = lj.generate(*model, prompts, GREEDY)
    assert (result.tokens != PAD).all()
    return result.tokens


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [-3, VOCAB, VOCAB + 100])
def test_token_id_out_of_range(model, bad):
    prompts = [[5, 6, 7], [5, bad, 7]]
    with pytest.raises(GenerationError, match=rf"prompt 1 .*token id {bad}\b"):
        lj.generate(*model, prompts, GREEDY)


def test_empty_prompt(model):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        lj.generate(*model, [[4, 5], []], GREEDY)
    with pytest.raises(GenerationError, match="no prompts"):
        lj.generate(*model, [], GREEDY)


def test_non_integer_prompt(model):
    with pytest.raises(GenerationError, match="float"):
        lj.generate(*model, [np.array([1.0, 2.0])], GREEDY)


def test_longer_than_cache_len(model):
    gen = GenerateConfig(max_new_tokens=10, cache_len=16, stop_tokens=())
    with pytest.raises(GenerationError, match=r"7 tokens.*10.*17.*cache length \(16\)"):
        lj.generate(*model, [list(range(3, 10))], gen)


def test_longer_than_max_position_embeddings(model):
    params, cfg = model
    prompt = np.arange(cfg.max_position_embeddings - 5) % VOCAB
    with pytest.raises(GenerationError, match=r"max_position_embeddings \(256\)"):
        lj.generate(params, cfg, [prompt], GenerateConfig(max_new_tokens=10))


def test_cache_len_above_max_position_embeddings(model):
    params, cfg = model
    prompt = np.arange(cfg.max_position_embeddings - 5) % VOCAB
    gen = GenerateConfig(max_new_tokens=10, cache_len=2 * cfg.max_position_embeddings)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        lj.generate(params, cfg, [prompt], gen)


def test_prompt_exactly_fills_cache(model, prompts, greedy):
    """prompt + max_new_tokens == cache_len is allowed and changes nothing."""
    prompt = prompts[1]
    gen = dataclasses.replace(GREEDY, cache_len=len(prompt) + MAX_NEW)
    result = lj.generate(*model, [prompt], gen)
    np.testing.assert_array_equal(result.tokens[0], greedy[1])


def test_max_new_tokens_must_be_positive():
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerateConfig(max_new_tokens=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_sampler_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Sampler(**kwargs)


# ---------------------------------------------------------------------------- sampling


def test_same_seed_same_tokens_different_seed_differs(model, prompts, greedy):
    a = lj.generate(*model, prompts, sampled(), seed=7).tokens
    b = lj.generate(*model, prompts, sampled(), seed=7).tokens
    c = lj.generate(*model, prompts, sampled(), seed=8).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != greedy).any()  # temperature 1 is not argmax in disguise
    assert ((a >= 0) & (a < VOCAB)).all()


def test_top_k_1_is_greedy(model, prompts, greedy):
    result = lj.generate(*model, prompts, sampled(top_k=1), seed=3)
    np.testing.assert_array_equal(result.tokens, greedy)


def test_tiny_top_p_is_greedy(model, prompts, greedy):
    result = lj.generate(*model, prompts, sampled(top_p=1e-6), seed=3)
    np.testing.assert_array_equal(result.tokens, greedy)


def test_top_k_keeps_only_top_k(model, prompts):
    """Every token sampled with top_k=3 ranks in the top 3 of the logits that chose it."""
    params, cfg = model
    result = lj.generate(params, cfg, prompts, sampled(top_k=3), seed=11)
    width = max(len(p) for p in prompts) + MAX_NEW
    rows = np.zeros((len(prompts), width), np.int32)
    for i, (p, new) in enumerate(zip(prompts, result.tokens)):
        rows[i, : len(p) + MAX_NEW] = np.concatenate([p, new])
    logits = np.asarray(jit_forward()(params, jnp.asarray(rows), cfg))
    ranks = []
    for i, p in enumerate(prompts):
        chooser = logits[i, len(p) - 1 : len(p) - 1 + MAX_NEW]  # [MAX_NEW, V]
        chosen = chooser[np.arange(MAX_NEW), result.tokens[i]]
        ranks.append((chooser > chosen[:, None]).sum(-1))
    ranks = np.concatenate(ranks)
    assert ranks.max() < 3
    assert ranks.max() > 0  # not greedy


# ---------------------------------------------------------------------------- stop tokens


def pick_stop_token(greedy: np.ndarray) -> int:
    """A token that some row emits after its first step and some other row never emits."""
    for token in greedy[:, 1:-2].ravel():
        if any(token not in row for row in greedy):
            return int(token)
    raise AssertionError(f"no usable stop token in {greedy}")


def truncate_at(greedy: np.ndarray, stops: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """What a run with ``stops`` must give: each row cut after its first stop token."""
    expected = np.full_like(greedy, PAD)
    lengths = np.zeros(len(greedy), np.int32)
    for i, row in enumerate(greedy):
        hits = np.flatnonzero(np.isin(row, stops))
        n = hits[0] + 1 if hits.size else len(row)
        expected[i, :n], lengths[i] = row[:n], n
    return expected, lengths


def test_stop_token_ends_only_its_row(model, prompts, greedy):
    stops = (pick_stop_token(greedy), VOCAB - 1)  # several stop tokens may be given
    expected, lengths = truncate_at(greedy, stops)
    assert lengths.min() < MAX_NEW - 2 and lengths.max() == MAX_NEW  # one stops, one continues

    calls = []
    result = lj.generate(
        *model, prompts, dataclasses.replace(GREEDY, stop_tokens=stops),
        stream=lambda step, tokens: calls.append((int(step), np.array(tokens))),
    )
    np.testing.assert_array_equal(result.tokens, expected)
    np.testing.assert_array_equal(result.lengths, lengths)
    for row, n in zip(result.as_lists(), lengths):
        assert len(row) == n
        if n < MAX_NEW:
            assert row[-1] in stops  # the stop token is kept and counted

    # streaming: once per step, in order, the same tokens (PAD after a stop)
    assert [step for step, _ in calls] == list(range(MAX_NEW))
    np.testing.assert_array_equal(np.stack([t for _, t in calls], axis=1), result.tokens)


def test_default_stop_tokens_are_eos(model, prompts, greedy):
    """``stop_tokens=None`` stops at the config's ``eos_token_id``."""
    params, cfg = model
    stop = pick_stop_token(greedy)
    expected, lengths = truncate_at(greedy, (stop,))
    assert lengths.min() < MAX_NEW
    eos_cfg = dataclasses.replace(cfg, eos_token_id=(stop,))
    result = lj.generate(params, eos_cfg, prompts, dataclasses.replace(GREEDY, stop_tokens=None))
    np.testing.assert_array_equal(result.tokens, expected)
    np.testing.assert_array_equal(result.lengths, lengths)


def test_no_stop_tokens_never_stop(model, prompts, greedy):
    """``stop_tokens=()`` ignores the eos id even when the model emits it."""
    params, cfg = model
    eos_cfg = dataclasses.replace(cfg, eos_token_id=(int(greedy[0, 0]),))
    result = lj.generate(params, eos_cfg, prompts, GREEDY)
    np.testing.assert_array_equal(result.tokens, greedy)
    assert result.lengths.tolist() == [MAX_NEW] * len(prompts)


def test_traced_step_limit_serves_shorter_generations(model, prompts, greedy):
    """``generate_batch(..., steps)``: one compiled program stops after ``steps`` tokens, which
    equal the first ``steps`` of the full generation (the benchmarks time 1 vs N with it)."""
    params, cfg = model
    tokens, lengths, cache_len = prepare_prompts(prompts, cfg, GREEDY.max_new_tokens, None)
    run = generate_batch.lower(params, None, tokens, lengths, jax.random.key(0), jnp.int32(MAX_NEW),
                          cfg=cfg, gen=GREEDY, cache_len=cache_len, stream=None).compile()
    for steps in (1, 3, MAX_NEW, MAX_NEW + 5):
        out = np.asarray(run(params, None, tokens, lengths, jax.random.key(0), jnp.int32(steps)))
        n = min(steps, MAX_NEW)
        np.testing.assert_array_equal(out[:, :n], greedy[:, :n])
        assert (out[:, n:] == PAD).all()
