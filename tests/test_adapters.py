"""Adapters in the model: the modes' equivalences, caching paths, per-token routes, validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from tests.helpers import jit_forward, logits, make_adapter, rel_err, trained_like
from loraswitch_jax import AdapterConfig, AdapterError
from loraswitch_jax.adapters import LORA_METHODS, check_adapter, lora_delta, lora_method
from loraswitch_jax.generate import prefill_chunk
from loraswitch_jax.router import Route, Routing, balance_loss, expert_usage


@pytest.fixture(scope="module")
def model(llama3_case):
    return llama3_case.params, llama3_case.cfg


def make(cfg, seed=0, **kwargs) -> lj.Adapter:
    return make_adapter(cfg, seed, **kwargs)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=3, num_experts=2), "top_k"),
        (dict(targets=("q", "qkv")), "unknown projection names.*qkv"),
        (dict(rank=0), "rank"),
        (dict(mode="moe"), "unknown adapter mode"),
        (dict(mode="lora"), "num_experts=1"),
        (dict(targets=()), "targets is empty"),
        (dict(targets=("q", "q")), "duplicates"),
        (dict(dropout=1.0), "dropout"),
        (dict(router_layer=-1), "router_layer"),
        (dict(num_experts=0), "num_experts"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(AdapterError, match=match):
        AdapterConfig(**kwargs)


def test_router_layer_beyond_the_model(model):
    params, cfg = model
    with pytest.raises(AdapterError, match="router_layer 2 is not a layer of a 2-layer model"):
        lj.init_adapter(cfg, AdapterConfig(router_layer=2), jax.random.key(0))


def test_config_dict_round_trip():
    acfg = AdapterConfig(mode="layerwise", targets=("q", "down"), rank=8, num_experts=4, top_k=1)
    assert AdapterConfig.from_dict(acfg.to_dict()) == acfg
    with pytest.raises(AdapterError, match="unknown adapter config keys.*'experts'"):
        AdapterConfig.from_dict({"experts": 4})


def test_check_adapter_names_the_leaf(model):
    params, cfg = model
    adapter = make(cfg)
    bad = dataclasses.replace(adapter, a={**adapter.a, "v": adapter.a["v"][:, :, :-1]})
    with pytest.raises(AdapterError, match=r"adapter.a\['v'\] has shape"):
        check_adapter(bad, cfg)
    with pytest.raises(AdapterError, match="adapter.router has shape"):
        check_adapter(dataclasses.replace(adapter, router=None), cfg)


# ------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("mode", ["lora", "switch", "layerwise"])
def test_fresh_adapter_is_the_backbone(model, tokens, mode):
    """B = 0 at init: the adapted model starts exactly where the backbone is."""
    params, cfg = model
    kw = dict(num_experts=1, top_k=1) if mode == "lora" else {}
    adapter = lj.init_adapter(cfg, AdapterConfig(mode=mode, **kw), jax.random.key(0))
    np.testing.assert_array_equal(logits(params, cfg, tokens, adapter), logits(params, cfg, tokens))


def test_adapters_change_the_outputs(model, tokens):
    params, cfg = model
    assert rel_err(logits(params, cfg, tokens, make(cfg)), logits(params, cfg, tokens)) > 1e-2


def test_switch_with_one_expert_is_a_lora(model, tokens):
    params, cfg = model
    switch = make(cfg, num_experts=1, top_k=1)
    lora = lj.Adapter(config=AdapterConfig.lora(rank=4, alpha=8.0), a=switch.a, b=switch.b, router=None)
    np.testing.assert_allclose(
        logits(params, cfg, tokens, switch), logits(params, cfg, tokens, lora), rtol=0, atol=1e-6
    )


def test_layerwise_with_equal_zero_routers_is_switch(model, tokens):
    """Zero routers tie every logit: all layers pick experts (0, 1) with gates 1/2 in both modes."""
    params, cfg = model
    switch = make(cfg, mode="switch", num_experts=4)
    switch = dataclasses.replace(switch, router=jnp.zeros_like(switch.router))
    layerwise = lj.Adapter(
        config=dataclasses.replace(switch.config, mode="layerwise"), a=switch.a, b=switch.b,
        router=jnp.zeros((cfg.num_hidden_layers, *switch.router.shape)),
    )
    np.testing.assert_allclose(
        logits(params, cfg, tokens, layerwise), logits(params, cfg, tokens, switch), atol=1e-6
    )


def test_layerwise_with_one_layer_is_switch(model, tokens):
    """With one decoder layer, the layerwise router reads exactly the switch router's input."""
    params, cfg = model
    cfg1 = dataclasses.replace(cfg, num_hidden_layers=1)
    params1 = dataclasses.replace(
        params, layers=jax.tree.map(lambda x: x[:1], params.layers)
    )
    switch = make(cfg1, mode="switch", num_experts=4)
    layerwise = lj.Adapter(
        config=dataclasses.replace(switch.config, mode="layerwise"), a=switch.a, b=switch.b,
        router=switch.router[None],
    )
    np.testing.assert_allclose(
        logits(params1, cfg1, tokens, layerwise), logits(params1, cfg1, tokens, switch), atol=1e-6
    )


@pytest.mark.parametrize("mode", ["switch", "layerwise"])
def test_scan_equals_unrolled(model, tokens, mode):
    params, cfg = model
    adapter = make(cfg, mode=mode, router_layer=1 if mode == "switch" else 0)
    scanned = logits(params, cfg, tokens, adapter, scan_layers=True)
    unrolled = logits(params, cfg, tokens, adapter, scan_layers=False)
    assert rel_err(unrolled, scanned) < 1e-5


def test_router_layer_leaves_earlier_layers_alone(model, tokens):
    params, cfg = model
    adapter = make(cfg, router_layer=1)
    assert adapter.a["q"].shape[0] == cfg.num_hidden_layers - 1
    # Only the last layer is adapted: zeroing its B gives the backbone back.
    zero = dataclasses.replace(adapter, b=jax.tree.map(jnp.zeros_like, adapter.b))
    np.testing.assert_array_equal(logits(params, cfg, tokens, zero), logits(params, cfg, tokens))


def test_every_row_routes_itself(model, tokens):
    """A batch of rows with different routes gives each row's own logits."""
    params, cfg = model
    adapter = make(cfg, mode="switch", num_experts=8)
    both = logits(params, cfg, tokens, adapter)
    for i in range(tokens.shape[0]):
        assert rel_err(both[i], logits(params, cfg, tokens[i : i + 1], adapter)[0]) < 1e-5


def test_routing_outputs(model, tokens):
    params, cfg = model
    for mode, n in (("switch", 1), ("layerwise", cfg.num_hidden_layers)):
        adapter = make(cfg, mode=mode, num_experts=8)
        _, routing = jit_forward()(params, jnp.asarray(tokens), cfg, adapter=adapter,
                                   return_routing=True)
        assert routing.probs.shape == (n, *tokens.shape, 8)
        assert routing.expert_ids.shape == (n, *tokens.shape, 2)
        np.testing.assert_allclose(routing.probs.sum(-1), 1.0, atol=1e-5)
    lora = make(cfg, mode="lora", num_experts=1, top_k=1)
    _, routing = jit_forward()(params, jnp.asarray(tokens), cfg, adapter=lora, return_routing=True)
    assert routing is None


# ------------------------------------------------------------------------------ cache paths


@pytest.mark.parametrize("mode", ["lora", "switch", "layerwise"])
def test_prefill_and_decode_match_forward(model, tokens, mode):
    """Prefill of a prefix then token-by-token decode gives the full forward's logits."""
    params, cfg = model
    kw = dict(num_experts=1, top_k=1) if mode == "lora" else dict(num_experts=8)
    adapter = make(cfg, mode=mode, **kw)
    full = logits(params, cfg, tokens, adapter)
    B, T = tokens.shape
    split = 30
    cache = lj.init_cache(cfg, B, 64, params.dtype)
    lengths = jnp.full((B,), split, jnp.int32)
    step_logits, cache = jax.jit(lj.prefill, static_argnames="cfg")(
        params, cache, jnp.asarray(tokens[:, :split]), lengths, cfg, adapter=adapter
    )
    assert rel_err(step_logits, full[:, split - 1]) < 1e-5
    decode = jax.jit(lj.decode_step, static_argnames=("cfg", "impl"))
    for t in range(split, T):
        step_logits, cache = decode(params, cache, jnp.asarray(tokens[:, t]), cfg, adapter=adapter, impl="xla")
        assert rel_err(step_logits, full[:, t]) < 1e-5


@pytest.mark.parametrize("mode", [None, "switch"])
def test_chunked_prefill_equals_one_pass(model, tokens, mode):
    """Ragged prompts (30 and 11 tokens) prefilled 8 tokens at a time: the last logits, the
    lengths and every cached key/value a query can see equal one pass; generation with chunks
    (``prefill_tokens``) gives one pass's tokens."""
    params, cfg = model
    adapter = None if mode is None else make(cfg, mode=mode, num_experts=8)
    lengths = jnp.asarray([30, 11], jnp.int32)
    prompt = jnp.asarray(tokens[:, :30])
    run = jax.jit(lj.prefill, static_argnames=("cfg", "chunk"))
    cache = lj.init_cache(cfg, 2, 64, params.dtype)
    want, want_cache = run(params, cache, prompt, lengths, cfg, adapter=adapter)
    got, got_cache = run(params, cache, prompt, lengths, cfg, adapter=adapter, chunk=8)
    assert rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(got_cache.lengths, want_cache.lengths)
    for b, n in enumerate((30, 11)):
        for got_kv, want_kv in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
            assert rel_err(got_kv[:, b, :n], want_kv[:, b, :n]) < 1e-5

    # A prompt that fills the cache: the last chunk's padding lies past the cache (dropped).
    full = lj.init_cache(cfg, 2, 40, params.dtype)
    lengths = jnp.asarray([40, 11], jnp.int32)
    want, _ = run(params, full, jnp.asarray(tokens[:, :40]), lengths, cfg, adapter=adapter)
    got, _ = run(params, full, jnp.asarray(tokens[:, :40]), lengths, cfg, adapter=adapter,
                 chunk=16)
    assert rel_err(got, want) < 1e-5

    prompts = [tokens[0, :40], tokens[1, :23]]
    one_pass = lj.GenerateConfig(max_new_tokens=6, stop_tokens=(), prefill_tokens=None)
    chunked = dataclasses.replace(one_pass, prefill_tokens=32)  # 16 tokens per prompt, 4 passes
    assert prefill_chunk(32, 2) == 16
    np.testing.assert_array_equal(
        lj.generate(params, cfg, prompts, chunked, adapter=adapter).tokens,
        lj.generate(params, cfg, prompts, one_pass, adapter=adapter).tokens)


def test_prefill_chunk_sizes():
    assert prefill_chunk(None, 64) is None
    assert prefill_chunk(8192, 1) == 8192
    assert prefill_chunk(8192, 64) == 128
    assert prefill_chunk(8192, 48) == 128  # 170 rounded down to a power of two
    assert prefill_chunk(100, 64) == 16
    for bad in (8, 100.0):
        with pytest.raises(lj.GenerationError, match="prefill_tokens must be >= 16"):
            lj.GenerateConfig(prefill_tokens=bad)


def test_generate_with_adapter(model, prompts):
    """Greedy generation with a switch adapter: the batch equals each prompt alone."""
    params, cfg = model
    adapter = make(cfg, num_experts=8)
    gen = lj.GenerateConfig(max_new_tokens=8, stop_tokens=())
    batch = lj.generate(params, cfg, prompts, gen, adapter=adapter).tokens
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(lj.generate(params, cfg, [p], gen, adapter=adapter).tokens[0], batch[i])
    plain = lj.generate(params, cfg, prompts, gen).tokens
    assert (plain != batch).any()


def test_generate_checks_the_adapter(model, prompts):
    params, cfg = model
    other = dataclasses.replace(cfg, num_hidden_layers=3)
    adapter = make(other)
    with pytest.raises(AdapterError, match="has shape"):
        lj.generate(params, cfg, prompts, lj.GenerateConfig(max_new_tokens=2), adapter=adapter)


# ------------------------------------------------------------------------------ pieces


def _delta_operands(num_experts, tokens_, seed=0):
    rng = np.random.RandomState(seed)
    d, r, o, k = 16, 4, 24, 2
    x = jnp.asarray(rng.standard_normal((2, tokens_, d)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((num_experts, d, r)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((num_experts, r, o)), jnp.float32)
    ids = rng.choice(num_experts, (2, tokens_, k))
    ids[0, 0, 0] = num_experts - 1  # the largest expert index
    gates = jax.nn.softmax(jnp.asarray(rng.standard_normal((2, tokens_, k)), jnp.float32))
    return x, a, b, Route(jnp.asarray(ids, jnp.int32), gates)


@pytest.mark.parametrize("method", ["auto", "gather", "dense"])
@pytest.mark.parametrize("num_experts, tokens_", [(8, 1), (128, 3), (4, 40), (32, 17)])
def test_lora_delta_methods_agree(num_experts, tokens_, method):
    """Gathered and dense-combine products compute the same thing."""
    x, a, b, route = _delta_operands(num_experts, tokens_)
    got = lora_delta(x, a, b, route, 2.0, method)
    ids, gates = np.asarray(route.expert_ids), np.asarray(route.gates)
    a_, b_ = np.asarray(a)[ids], np.asarray(b)[ids]
    want = 2.0 * np.einsum("btk,btkr,btkro->bto", gates, np.einsum("btd,btkdr->btkr", x, a_), b_)
    assert rel_err(got, want) < 1e-5


def test_lora_delta_gradients_agree():
    """Training differentiates the product: gather gives the dense path's gradients."""
    x, a, b, route = _delta_operands(8, 6, seed=1)
    w = jax.random.normal(jax.random.key(0), (2, 6, 24))

    def loss(x, a, b, method):
        return jnp.sum(lora_delta(x, a, b, route, 2.0, method) * w)

    got = jax.grad(loss, argnums=(0, 1, 2))(x, a, b, "gather")
    want = jax.grad(loss, argnums=(0, 1, 2))(x, a, b, "dense")
    for g, h in zip(got, want):
        assert rel_err(g, h) < 1e-5


def test_lora_method_gathers_at_decode_only():
    """``auto`` gathers where fewer (token, choice) pairs than experts, else dense."""
    assert LORA_METHODS == ("auto", "gather", "dense")
    assert lora_method(1, 2, 8) == "gather"
    assert lora_method(3, 2, 128) == "gather"
    assert lora_method(4, 2, 8) == "dense"
    assert lora_method(32768, 2, 128) == "dense"


def test_lora_delta_rejects_unknown_method():
    x, a, b, route = _delta_operands(4, 2)
    with pytest.raises(ValueError, match="unknown LoRA product method"):
        lora_delta(x, a, b, route, 1.0, "grouped")


def test_balance_loss_limits():
    E, B, T = 4, 2, 8
    ids = jnp.arange(B * T * 2).reshape(1, B, T, 2) % E  # every expert equally often
    uniform = Routing(probs=jnp.full((1, B, T, E), 1 / E), expert_ids=ids)
    assert float(balance_loss(uniform)) == pytest.approx(1.0)
    collapsed = Routing(
        probs=jnp.zeros((1, B, T, E)).at[..., 0].set(1.0), expert_ids=jnp.zeros((1, B, T, 1), jnp.int32)
    )
    assert float(balance_loss(collapsed)) == pytest.approx(E)
    mask = jnp.zeros((B, T)).at[0, :2].set(1)
    np.testing.assert_allclose(expert_usage(ids, E, mask)[0], [0.25, 0.25, 0.25, 0.25])
