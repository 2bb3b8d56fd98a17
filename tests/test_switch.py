"""Switch-mode decode strategies (fused, merge) and the kernels behind ``ops`` against the jnp path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax import ops
from loraswitch_jax.ops import Impl, LoraTerm, resolve_impl
from loraswitch_jax.router import Route
from loraswitch_jax.switch import STRATEGIES, init_merged, merge_route, resolve_strategy
from tests.helpers import rel_err
from tests.pallas.interpret import IMPL

# 3 layers, d 64, MLP 160: every projection tiles by 16, so the Pallas impl runs every kernel
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


def greedy(params, ad, prompts, impl, strategy="fused", n=10):
    gen = lj.GenerateConfig(max_new_tokens=n, impl=impl, switch_strategy=strategy, stop_tokens=())
    return lj.generate(params, CFG, prompts, gen, adapter=ad).as_lists()


def test_adapters_change_the_tokens(params):
    ad = adapter("switch")
    assert greedy(params, ad, PROMPTS[:1], "xla") != greedy(params, None, PROMPTS[:1], "xla")


@pytest.mark.parametrize("impl,strategy", [("xla", "merge"), (IMPL, "merge"), (IMPL, "fused")])
def test_switch_strategies_equal_the_jnp_path(params, impl, strategy):
    ad = adapter("switch")
    want = greedy(params, ad, PROMPTS[:1], "xla", "fused")
    assert greedy(params, ad, PROMPTS[:1], impl, strategy) == want


@pytest.mark.parametrize("mode", ["switch", "layerwise", "lora"])
def test_fused_kernels_equal_the_jnp_path_on_a_batch(params, mode):
    """Rows of different lengths, each with its own routes, through the routed kernels."""
    ad = adapter(mode, router_layer=0)
    assert greedy(params, ad, PROMPTS, IMPL) == greedy(params, ad, PROMPTS, "xla")


def test_dropout_takes_the_xla_shrink():
    """Under dropout each projection's branch reads its own dropped-out x: the routed kernels
    take x A from XLA then, and equal the jnp path with the same masks (q/k/v and the MLP)."""
    rng = np.random.default_rng(0)
    d, f, e, r, layers = 32, 48, 4, 16, 2
    w = {p: jnp.asarray(rng.normal(size=(layers, i, o)) * i**-0.5, jnp.float32)
         for p, (i, o) in {"q": (d, d), "k": (d, d), "v": (d, d), "gate": (d, f), "up": (d, f),
                           "down": (f, d)}.items()}
    a = {p: jnp.asarray(rng.normal(size=(layers, e) + v.shape[1:2] + (r,)), jnp.float32)
         for p, v in w.items()}
    b = {p: jnp.asarray(rng.normal(size=(layers, e, r) + v.shape[2:]), jnp.float32)
         for p, v in w.items()}
    x = jnp.asarray(rng.normal(size=(2, 3, d)), jnp.float32)
    route = Route(jnp.asarray(rng.integers(0, e, (2, 3, 2)), jnp.int32),
                  jnp.full((2, 3, 2), 0.5, jnp.float32))
    lora = LoraTerm(a, b, 1, route, scale=0.5, dropout=0.3, dropout_key=jax.random.key(3))

    def run(impl):
        q, k, v = ops.qkv_linear(x, (w["q"], w["k"], w["v"]), 1, (None,) * 3, impl, lora)
        y = ops.mlp(x, w["gate"], w["up"], w["down"], 1, (None,) * 3, impl, lora)
        return jnp.concatenate([q, k, v, y], axis=-1)

    assert rel_err(run(resolve_impl(IMPL)), run(resolve_impl("xla"))) < 1e-5


def test_partial_targets_through_the_kernels(params):
    """Only some projections adapted: the fused kernels mix adapted and plain outputs."""
    ad = adapter("switch", targets=("q", "v", "up", "down"), router_layer=0)
    assert greedy(params, ad, PROMPTS, IMPL) == greedy(params, ad, PROMPTS, "xla")


def test_decode_logits_match_across_impls(params):
    """One decode step's logits, float32: kernels within 1e-5 of the jnp path."""
    ad = adapter("switch", router_layer=0, num_experts=4, top_k=1)
    tokens = jnp.array([[5, 6, 7], [9, 1, 2]], jnp.int32)
    lengths = jnp.array([3, 2], jnp.int32)
    cache = lj.init_cache(CFG, 2, 16, jnp.float32)
    _, cache = lj.prefill(params, cache, tokens, lengths, CFG, adapter=ad)
    step = jax.jit(lj.decode_step, static_argnames=("cfg", "impl"))
    want, _ = step(params, cache, jnp.array([11, 12]), cfg=CFG, adapter=ad, impl="xla")
    got, _ = step(params, cache, jnp.array([11, 12]), cfg=CFG, adapter=ad, impl=IMPL)
    assert rel_err(got, want) < 1e-5


def kernel_names(fn, *args) -> list[str]:
    """The names of the Pallas kernels ``fn(*args)`` launches, in program order."""
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                named = eqn.params.get("name_and_src_info") or eqn.params.get("name")
                names.append(str(getattr(named, "name", named)))
            for v in eqn.params.values():  # closed and open (shard_map's) inner jaxprs
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    sub = getattr(sub, "jaxpr", sub)
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def test_the_decode_step_takes_the_tuned_kernel_paths(params):
    """A switch decode step of two rows (gather slots), all projections adapted: per layer one
    split grouped shrink for q/k/v, one for o and one for gate/up (down's x A rides in the gate/up
    kernel's epilogue), routed projections expanding in registers, and the decode-attention
    kernel (pallas/tuned.py)."""
    ad = adapter("switch", router_layer=0)
    cache = lj.init_cache(CFG, 2, 16, jnp.float32)
    _, cache = lj.prefill(params, cache, jnp.array([[5, 6, 7], [9, 1, 2]], jnp.int32),
                          jnp.array([3, 2], jnp.int32), CFG, adapter=ad)
    names = kernel_names(lambda p, c, t: lj.decode_step(p, c, t, cfg=CFG, adapter=ad,
                                                        impl=Impl(backend="pallas")),
                         params, cache, jnp.array([11, 12]))
    per_layer = CFG.num_hidden_layers
    count = lambda prefix: sum(n.startswith(prefix) for n in names)  # noqa: E731
    assert count("lora_shrink_group3_") == per_layer  # q, k, v
    assert count("lora_shrink_group2_") == per_layer  # gate, up
    assert count("lora_shrink_group1_") == per_layer  # o; none for down
    assert count("routed_gate_up_matmul") == per_layer
    assert count("routed_matmul") == 2 * per_layer  # o and down
    assert count("decode_attention") == per_layer
    assert all(n.endswith("_rows") for n in names if n.startswith("routed_"))


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
    for impl in map(resolve_impl, ("xla", IMPL)):
        merged = merge_route(init_merged(params.layers, ad), params.layers, ad, ids, gates, impl)
        for p in ad.config.targets:
            w, a, b = (np.asarray(x, np.float64) for x in (params.layers.weight(p), ad.a[p], ad.b[p]))
            want = w.copy()
            for j in range(2):
                want[1:] += ad.config.scale * float(gates[j]) * a[:, int(ids[j])] @ b[:, int(ids[j])]
            assert rel_err(merged.weights[p], want) < 1e-5, (impl, p)


def test_resolve_strategy():
    assert STRATEGIES == ("fused", "merge")
    assert lj.GenerateConfig().switch_strategy == "fused"
    assert resolve_strategy("fused", 64) == "fused"
    assert resolve_strategy("merge", 1) == "merge"
    with pytest.raises(ValueError, match="batch size 1"):
        resolve_strategy("merge", 2)
    with pytest.raises(ValueError, match="unknown switch strategy 'auto'"):
        resolve_strategy("auto", 1)


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
    assert [f.name for f in dataclasses.fields(Impl)] == ["backend", "interpret", "shrink_ahead"]
    assert Impl() == Impl(backend="pallas", interpret=False, shrink_ahead=False)
    with pytest.raises(ValueError, match="Impl.shrink_ahead must be a bool"):
        Impl(shrink_ahead=1)
    assert resolve_impl("pallas_interpret") == Impl(backend="pallas", interpret=True)
    assert resolve_impl("pallas") == Impl()
    assert resolve_impl("xla").xla and resolve_impl("auto").xla  # no GPU here
    with pytest.raises(ValueError, match="unknown backend"):
        Impl(backend="triton")
    with pytest.raises(ValueError, match="interpret must be a bool"):
        Impl(interpret="yes")
    with pytest.raises(ValueError, match="unknown impl"):
        resolve_impl("inline")
