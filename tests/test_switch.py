"""Switch-mode decode strategies (fused, merge) and the kernels behind ``ops`` against the jnp path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from tests.helpers import rel_err
from loraswitch_jax.ops import Impl, resolve_impl
from loraswitch_jax.switch import init_merged, merge_route, resolve_strategy

# 3 layers, d 64, MLP 160: every projection tiles by 16, so "pallas_interpret" runs every kernel
# (the demo's MLP width, 172, would send gate, up and down to XLA).
CFG = dataclasses.replace(lj.PRESETS["demo"], num_hidden_layers=3, intermediate_size=160)
PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [200, 3, 3, 17]]


@pytest.fixture(scope="module")
def params():
    return lj.init_params(CFG, jax.random.key(0), dtype=jnp.float32, std=0.2)


def adapter(mode: str, *, router_layer: int = 1, num_experts: int = 8, top_k: int = 2,
            targets=lj.PROJECTIONS, seed: int = 1) -> lj.Adapter:
    """A random adapter whose ``B`` is not zero, so it changes the tokens."""
    if mode == "lora":
        acfg = lj.AdapterConfig.lora(rank=16, targets=targets, router_layer=router_layer)
    else:
        acfg = lj.AdapterConfig(mode=mode, rank=16, num_experts=num_experts, top_k=top_k,
                                targets=targets, router_layer=router_layer)
    ad = lj.init_adapter(CFG, acfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(ad.b)))
    b = {p: 0.1 * jax.random.normal(next(keys), v.shape) for p, v in ad.b.items()}
    return dataclasses.replace(ad, b=b)


def greedy(params, ad, prompts, impl, strategy="auto", n=10):
    gen = lj.GenerateConfig(max_new_tokens=n, impl=impl, switch_strategy=strategy, stop_tokens=())
    return lj.generate(params, CFG, prompts, gen, adapter=ad).as_lists()


def test_adapters_change_the_tokens(params):
    ad = adapter("switch")
    assert greedy(params, ad, PROMPTS[:1], "xla") != greedy(params, None, PROMPTS[:1], "xla")


@pytest.mark.parametrize("impl,strategy", [("xla", "merge"), ("pallas_interpret", "merge"),
                                           ("pallas_interpret", "fused")])
def test_switch_strategies_equal_the_jnp_path(params, impl, strategy):
    ad = adapter("switch")
    want = greedy(params, ad, PROMPTS[:1], "xla", "fused")
    assert greedy(params, ad, PROMPTS[:1], impl, strategy) == want


@pytest.mark.parametrize("mode", ["switch", "layerwise", "lora"])
def test_fused_kernels_equal_the_jnp_path_on_a_batch(params, mode):
    """Rows of different lengths, each with its own routes, through the routed kernels."""
    ad = adapter(mode, router_layer=0)
    assert greedy(params, ad, PROMPTS, "pallas_interpret") == greedy(params, ad, PROMPTS, "xla")


@pytest.mark.parametrize("shrink,expand", [("xla", "auto"), ("pallas", "auto"),
                                           ("epilogue", "auto"), ("epilogue", "rows"),
                                           ("inline", "auto")])
def test_every_shrink_placement_equals_the_jnp_path(params, shrink, expand):
    """x A as XLA ops, one Pallas launch per input group (down's in the gate/up kernel with
    "epilogue"), or inside the projection kernels; (x A) B by dots or row by row ("rows")."""
    ad = adapter("switch", router_layer=0, targets=("q", "k", "o", "gate", "up", "down"))
    impl = Impl(backend="pallas", interpret=True, lora_shrink=shrink, lora_expand=expand)
    assert greedy(params, ad, PROMPTS[:2], impl) == greedy(params, ad, PROMPTS[:2], "xla")


def test_partial_targets_through_the_kernels(params):
    """Only some projections adapted: the fused kernels mix adapted and plain outputs."""
    ad = adapter("switch", targets=("q", "v", "up", "down"), router_layer=0)
    assert greedy(params, ad, PROMPTS, "pallas_interpret") == greedy(params, ad, PROMPTS, "xla")


def test_decode_logits_match_across_impls(params):
    """One decode step's logits, float32: kernels within 1e-5 of the jnp path."""
    ad = adapter("switch", router_layer=0, num_experts=4, top_k=1)
    tokens = jnp.array([[5, 6, 7], [9, 1, 2]], jnp.int32)
    lengths = jnp.array([3, 2], jnp.int32)
    cache = lj.init_cache(CFG, 2, 16, jnp.float32)
    _, cache = lj.prefill(params, cache, tokens, lengths, CFG, adapter=ad)
    step = jax.jit(lj.decode_step, static_argnames=("cfg", "impl"))
    want, _ = step(params, cache, jnp.array([11, 12]), cfg=CFG, adapter=ad, impl="xla")
    for shrink, expand in (("xla", "auto"), ("pallas", "auto"), ("pallas-split", "auto"),
                           ("epilogue", "auto"), ("epilogue", "rows"), ("inline", "auto")):
        impl = Impl(backend="pallas", interpret=True, lora_shrink=shrink, lora_expand=expand)
        got, _ = step(params, cache, jnp.array([11, 12]), cfg=CFG, adapter=ad, impl=impl)
        assert rel_err(got, want) < 1e-5, (shrink, expand)


def test_merge_skips_a_repeated_route(params):
    """Merging the route already merged writes nothing: a poisoned copy stays poisoned."""
    ad = adapter("switch")
    ids, gates = jnp.array([7, 2], jnp.int32), jnp.array([0.75, 0.25], jnp.float32)
    xla = resolve_impl("xla")
    merged = merge_route(init_merged(params.layers, ad), params.layers, ad, ids, gates, xla)
    poisoned = dataclasses.replace(
        merged, weights={p: jnp.full_like(w, jnp.nan) for p, w in merged.weights.items()})
    again = merge_route(poisoned, params.layers, ad, ids, gates, xla)
    assert all(bool(jnp.isnan(w).all()) for w in again.weights.values())
    other = merge_route(poisoned, params.layers, ad, jnp.array([7, 3], jnp.int32), gates, xla)
    first = ad.config.first_layer  # earlier layers are never merged into
    assert not any(bool(jnp.isnan(w[first:]).any()) for w in other.weights.values())


def test_merged_weights_are_base_plus_the_route(params):
    ad = adapter("switch", router_layer=1)
    ids, gates = jnp.array([7, 0], jnp.int32), jnp.array([0.6, 0.4], jnp.float32)
    for impl in map(resolve_impl, ("xla", "pallas_interpret")):
        merged = merge_route(init_merged(params.layers, ad), params.layers, ad, ids, gates, impl)
        for p in ad.config.targets:
            w, a, b = (np.asarray(x, np.float64) for x in (params.layers.weight(p), ad.a[p], ad.b[p]))
            want = w.copy()
            for j in range(2):
                want[1:] += ad.config.scale * float(gates[j]) * a[:, int(ids[j])] @ b[:, int(ids[j])]
            assert rel_err(merged.weights[p], want) < 1e-5, (impl, p)


def test_resolve_strategy():
    assert resolve_strategy("auto", 1) in ("fused", "merge")
    assert resolve_strategy("auto", 64) == "fused"
    assert resolve_strategy("merge", 1) == "merge"
    with pytest.raises(ValueError, match="batch size 1"):
        resolve_strategy("merge", 2)
    with pytest.raises(ValueError, match="unknown switch strategy"):
        resolve_strategy("swap", 1)


def test_bad_strategy_requests(params):
    with pytest.raises(lj.GenerationError, match="unknown switch_strategy"):
        lj.GenerateConfig(switch_strategy="swap")
    gen = lj.GenerateConfig(max_new_tokens=2, switch_strategy="merge")
    with pytest.raises(lj.GenerationError, match="batch size 1"):
        lj.generate(params, CFG, PROMPTS, gen, adapter=adapter("switch"))
    with pytest.raises(lj.GenerationError, match="applies to switch adapters"):
        lj.generate(params, CFG, PROMPTS[:1], gen, adapter=adapter("lora"))
    with pytest.raises(lj.GenerationError, match="not 'no adapter'"):
        lj.generate(params, CFG, PROMPTS[:1], gen)


def test_impl_values():
    assert resolve_impl("pallas_interpret") == Impl(backend="pallas", interpret=True)
    assert resolve_impl("xla").xla and resolve_impl("auto").xla  # no GPU here
    assert Impl().shrink in ("xla", "pallas", "pallas-split", "epilogue", "inline")
    with pytest.raises(ValueError, match="unknown lora_shrink"):
        Impl(lora_shrink="gpu")
    assert Impl().expand in ("dot", "rows")
    with pytest.raises(ValueError, match="unknown lora_expand"):
        Impl(lora_expand="registers")
    with pytest.raises(ValueError, match="unknown backend"):
        Impl(backend="triton")
