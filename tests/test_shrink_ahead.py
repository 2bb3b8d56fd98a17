"""Shrink-ahead (DESIGN.md §8): at decode with gather slots the decode-attention kernel also
computes the o projection's ``x A``, and o's routed kernel adds the residual and computes
gate's and up's ``x A`` (the MLP's RMSNorm folded out); the routed kernels expand them without
shrink launches. The ops against the XLA path, where it applies and where it does not, and
decode logits through the model (one device and per tensor-parallel shard, where o keeps the
old path) against XLA's, float32."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax import ops, parallel
from loraswitch_jax.ops import Impl, LoraTerm, resolve_impl
from loraswitch_jax.router import Route
from loraswitch_jax.sharding import MeshConfig
from tests.helpers import make_adapter, random_params, rel_err, unit_norm_params
from tests.pallas.interpret import F32_TOL, IMPL

# Shrink-ahead is opt-in (``Impl.shrink_ahead``) until timed on a GPU.
AHEAD = dataclasses.replace(resolve_impl(IMPL), shrink_ahead=True)
# GQA 4/2, hd 16, every width a multiple of 16 (also per shard at tensor=2): every kernel tiles.
CFG = lj.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def o_operands(rng, b, t, *, experts=8, k=2, dropout=0.0):
    """``q [B, T, H, hd]``, a stacked cache with ``positions`` written, ``wo`` and a LoRA term
    adapting o (rank 16) with random routes."""
    h, kv, hd, d, layers, s = 4, 2, 16, 48, 3, 32
    q = jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((layers, b, s, kv, hd)), jnp.float32)
              for _ in range(2))
    positions = jnp.asarray(rng.integers(t - 1, s, (b, 1)), jnp.int32) - jnp.arange(t)[::-1]
    mask = jnp.arange(s)[None, None, :] <= positions[..., None]
    wo = jnp.asarray(rng.standard_normal((layers, h * hd, d)) * 0.1, jnp.float32)
    bo = jnp.asarray(rng.standard_normal((layers, d)), jnp.float32)
    a = {"o": jnp.asarray(rng.standard_normal((2, experts, h * hd, 16)), jnp.float32)}
    bb = {"o": jnp.asarray(rng.standard_normal((2, experts, 16, d)) * 0.1, jnp.float32)}
    route = Route(jnp.asarray(rng.integers(0, experts, (b, t, k)), jnp.int32),
                  jnp.asarray(rng.random((b, t, k)), jnp.float32))
    lora = LoraTerm(a, bb, 1, route, scale=0.5, dropout=dropout,
                    dropout_key=jax.random.key(3) if dropout else None)
    return q, kc, vc, positions, mask, wo, bo, lora


def o_projection(impl, q, kc, vc, positions, mask, wo, bo, lora):
    attended, xa = ops.cached_attention_shrink_ahead(q, kc, vc, 2, positions, mask, impl, lora)
    return ops.stacked_linear(attended, wo, 2, bo, impl, lora, "o", xa), xa


@pytest.mark.parametrize("b,t,experts,k,ahead", [
    (1, 1, 8, 2, True),   # batch 1, top-2: gather slots
    (3, 1, 8, 2, True),   # 6 < 8 slots: gather
    (2, 1, 4, 1, True),   # top-1
    (4, 1, 8, 2, False),  # 8 slots, dense: o's shrink launch as before
    (2, 3, 8, 1, False),  # several tokens (prefill): no decode kernel
])
def test_o_projection_equals_the_xla_path(b, t, experts, k, ahead):
    rng = np.random.default_rng(b * 10 + t + k)
    operands = o_operands(rng, b, t, experts=experts, k=k)
    got, xa = o_projection(AHEAD, *operands)
    want, none = o_projection(resolve_impl("xla"), *operands)
    assert (xa is not None) == ahead and none is None
    assert rel_err(got, want) < F32_TOL


def test_no_shrink_ahead_under_dropout_or_without_o():
    """Dropout (o's branch reads its own dropped-out copy) and an o left unadapted keep the old
    path: no xa from the attention kernel, the same result as before."""
    rng = np.random.default_rng(0)
    q, kc, vc, positions, mask, wo, bo, lora = o_operands(rng, 2, 1, dropout=0.3)
    impl = AHEAD
    attended, xa = ops.cached_attention_shrink_ahead(q, kc, vc, 2, positions, mask, impl, lora)
    assert xa is None
    assert rel_err(attended, ops.cached_attention(q, kc, vc, 2, positions, mask, impl)) == 0
    unadapted = dataclasses.replace(lora, a={}, b={}, dropout_key=None)
    assert ops.cached_attention_shrink_ahead(q, kc, vc, 2, positions, mask, impl,
                                             unadapted)[1] is None
    assert ops.cached_attention_shrink_ahead(q, kc, vc, 2, positions, mask, impl)[1] is None


def test_an_xa_the_routed_kernel_cannot_take_is_refused():
    rng = np.random.default_rng(1)
    q, kc, vc, positions, mask, wo, bo, lora = o_operands(rng, 1, 1)
    attended, xa = ops.cached_attention_shrink_ahead(q, kc, vc, 2, positions, mask, AHEAD, lora)
    with pytest.raises(ValueError, match="needs the routed kernel"):
        ops.stacked_linear(attended, wo, 2, bo, resolve_impl("xla"), lora, "o", xa)


# ------------------------------------------------------------------ through the model


@functools.cache
def params() -> lj.LlamaParams:
    return unit_norm_params(CFG, 0, jnp.float32)


@functools.cache
def adapter(mode: str) -> lj.Adapter:
    return make_adapter(CFG, seed=4, mode=mode, num_experts=8, top_k=2, rank=16, std=0.3,
                        router_layer=0)


TOKENS = jnp.asarray([[5, 6, 7, 8], [9, 1, 2, 0], [40, 41, 42, 43]], jnp.int32)
LENGTHS = jnp.asarray([4, 3, 1], jnp.int32)
STEPS = jnp.asarray([[11, 12, 13], [3, 4, 5]], jnp.int32)


def decode_logits(impl, mode, decode=lj.decode_step, init_cache=lj.init_cache,
                  prefill=lj.prefill, rows=3):
    p, ad = params(), adapter(mode)  # concrete before the trace (they are cached)

    def run():
        cache = init_cache(CFG, rows, 16, jnp.float32)
        logits, cache = prefill(p, cache, TOKENS[:rows], LENGTHS[:rows], CFG, adapter=ad)
        out = [logits]
        for step in STEPS[:, :rows]:
            logits, cache = decode(p, cache, step, CFG, adapter=ad, impl=impl)
            out.append(logits)
        return out

    return jax.jit(run)()


@pytest.mark.parametrize("mode,rows", [("switch", 1), ("switch", 3), ("layerwise", 3)])
def test_decode_logits_equal_the_xla_path(mode, rows):
    """One and three rows with top-2 of 8 experts (gather slots): decode logits through the
    kernels, o's x A from the attention kernel, gate/up's from o's kernel, within float32
    tolerance of XLA's."""
    for got, want in zip(decode_logits(AHEAD, mode, rows=rows),
                         decode_logits("xla", mode, rows=rows)):
        assert rel_err(got, want) < F32_TOL


@pytest.mark.parametrize("ahead", [True, False])
def test_decode_step_launches_no_shrink_for_o_gate_up(ahead):
    """With shrink-ahead, per layer: the decode-attention kernel with o's shrink, o's routed
    kernel with the residual and gate/up's shrink, down's with the residual and the next
    layer's q/k/v shrink (but the last layer's), no grouped shrink of o or gate/up, and of
    q/k/v only in the first adapted layer. Without (the default): every shrink launch."""
    from tests.test_switch import kernel_names

    ad = adapter("switch")
    cache = lj.init_cache(CFG, 3, 16, jnp.float32)
    _, cache = lj.prefill(params(), cache, TOKENS, LENGTHS, CFG, adapter=ad)
    impl = Impl(backend="pallas", shrink_ahead=ahead)
    names = kernel_names(lambda p, c, t: lj.decode_step(p, c, t, cfg=CFG, adapter=ad, impl=impl),
                         params(), cache, STEPS[0])
    count = lambda prefix: sum(n.startswith(prefix) for n in names)  # noqa: E731
    layers = CFG.num_hidden_layers
    oshrink = sum("_oshrink" in n for n in names if n.startswith("decode_attention"))
    assert oshrink == (layers if ahead else 0)
    assert count("lora_shrink_group1_") == (0 if ahead else layers)
    assert ad.config.first_layer == 0
    assert count("lora_shrink_group3_") == (1 if ahead else layers)
    assert count("lora_shrink_group2_") == (0 if ahead else layers)
    residual = sum(n.startswith("routed_matmul") and n.endswith("_ahead") for n in names)
    assert residual == (2 * layers - 1 if ahead else 0)  # o's, and down's but the last
    assert count("routed_matmul") == 2 * layers  # o and down


def test_decode_logits_per_tensor_shard_equal_one_device():
    """tensor=2: each shard's kernel shrinks its own heads with its rows of A_o (split by
    input), the routed o kernel expands the partial, and psum adds the shards up."""
    mesh = MeshConfig.parse("tensor=2")
    got = decode_logits(AHEAD, "switch", functools.partial(parallel.decode_step, mesh=mesh),
                        functools.partial(parallel.init_cache, mesh=mesh),
                        functools.partial(parallel.prefill, mesh=mesh))
    for g, w in zip(got, decode_logits("xla", "switch")):
        assert rel_err(g, w) < F32_TOL


def test_tensor_parallel_keeps_the_residual_add():
    """Under a tensor split o's partials are summed by psum before the residual: o's kernel
    does not add it (no ``_ahead`` kernel) and gate/up keep their shrink launch."""
    mesh = MeshConfig.parse("tensor=2")
    ad = adapter("switch")
    cache = parallel.init_cache(CFG, 3, 16, jnp.float32, mesh=mesh)
    _, cache = parallel.prefill(params(), cache, TOKENS, LENGTHS, CFG, adapter=ad, mesh=mesh)
    from tests.test_switch import kernel_names

    names = kernel_names(lambda p, c, t: parallel.decode_step(p, c, t, CFG, adapter=ad,
                                                              impl=AHEAD, mesh=mesh),
                         params(), cache, STEPS[0])
    assert names and not any(n.endswith("_ahead") for n in names)
    assert sum(n.startswith("lora_shrink_group2_") for n in names) == CFG.num_hidden_layers


# ------------------------------------------------------------ gate/up's shrink from o's kernel


def mlp_operands(rng, b, t, *, experts=8, k=2, adapts=("o", "gate", "up", "down"), dropout=0.0):
    """o's input ``[B, T, K]``, ``wo``, ``bo``, the residual ``h [B, T, d]``, the MLP's norm,
    weights and a LoRA term adapting ``adapts`` (rank 16) with random routes."""
    kk, d, f, layers, la = 64, 48, 96, 3, 2
    normal = lambda *shape, std=1.0: jnp.asarray(std * rng.standard_normal(shape),  # noqa: E731
                                                 jnp.float32)
    x, h = normal(b, t, kk), normal(b, t, d)
    wo, bo = normal(layers, kk, d, std=kk**-0.5), normal(layers, d)
    norm = normal(layers, d) + 1.0
    ws = (normal(layers, d, f, std=d**-0.5), normal(layers, d, f, std=d**-0.5),
          normal(layers, f, d, std=f**-0.5))
    widths = {"o": (kk, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    a = {p: normal(la, experts, widths[p][0], 16, std=widths[p][0]**-0.5) for p in adapts}
    bb = {p: normal(la, experts, 16, widths[p][1], std=0.25) for p in adapts}
    route = Route(jnp.asarray(rng.integers(0, experts, (b, t, k)), jnp.int32),
                  jnp.asarray(rng.random((b, t, k)), jnp.float32))
    lora = LoraTerm(a, bb, 1, route, scale=0.5, dropout=dropout,
                    dropout_key=jax.random.key(3) if dropout else None)
    return x, wo, bo, h, norm, ws, lora


def mlp_block(impl, x, wo, bo, h, norm, ws, lora):
    """o with the residual, the MLP's norm and the MLP, as ``llama._layer`` runs them."""
    from loraswitch_jax.layers import rms_norm

    h, xa = ops.residual_linear_shrink_ahead(x, wo, 2, bo, impl, lora, "o", None, h, norm, 1e-5,
                                             ws[0])
    y = ops.mlp(rms_norm(h, norm[2], 1e-5), *ws, 2, (None, None, None), impl, lora, xa)
    return h + y, xa


@pytest.mark.parametrize("b,t,experts,k,adapts,ahead", [
    (1, 1, 8, 2, ("o", "gate", "up", "down"), True),  # batch 1, top-2: gather slots
    (3, 1, 8, 2, ("o", "gate", "up", "down"), True),  # 6 < 8 slots: gather
    (2, 1, 8, 2, ("gate", "up"), True),  # o and down not adapted: the plain o, then swiglu
    (1, 1, 8, 2, ("o", "up"), True),  # gate not adapted
    (4, 1, 8, 2, ("o", "gate", "up", "down"), False),  # 8 slots, dense: the old path
    (2, 3, 8, 1, ("o", "gate", "up", "down"), False),  # several tokens (prefill)
    (1, 1, 8, 2, ("o", "down"), False),  # neither gate nor up adapted
])
def test_mlp_block_equals_the_xla_path(b, t, experts, k, adapts, ahead):
    rng = np.random.default_rng(b * 100 + t * 10 + len(adapts))
    operands = mlp_operands(rng, b, t, experts=experts, k=k, adapts=adapts)
    got, xa = mlp_block(AHEAD, *operands)
    want, none = mlp_block(resolve_impl("xla"), *operands)
    assert (xa is not None) == ahead and none is None
    if ahead:
        assert [x is not None for x in xa] == [p in adapts for p in ("gate", "up")]
    assert rel_err(got, want) < F32_TOL


def test_no_mlp_shrink_ahead_under_dropout_or_when_off():
    """Dropout, shrink-ahead off (the default) and XLA keep the old path; an xa computed ahead
    that the MLP cannot expand is refused."""
    rng = np.random.default_rng(5)
    x, wo, bo, h, norm, ws, lora = mlp_operands(rng, 1, 1, dropout=0.3)
    for impl in (AHEAD, resolve_impl(IMPL), resolve_impl("xla")):
        args = (x, wo, 2, bo, impl, lora, "o", None, h, norm, 1e-5, ws[0])
        assert ops.residual_linear_shrink_ahead(*args)[1] is None
    x, wo, bo, h, norm, ws, lora = mlp_operands(rng, 1, 1)
    _, xa = ops.residual_linear_shrink_ahead(x, wo, 2, bo, AHEAD, lora, "o", None, h, norm, 1e-5,
                                             ws[0])
    with pytest.raises(ValueError, match="needs the routed kernel"):
        ops.mlp(h, *ws, 2, (None, None, None), resolve_impl("xla"), lora, xa)


# ------------------------------------------------------ the next layer's q/k/v from down's kernel


def next_qkv(impl, rng_seed, b, experts, shared=True, adapts=("o", "gate", "up", "down", "q",
                                                                "k", "v")):
    """Layer 1's MLP with the residual, then layer 2's attention norm and q/k/v (as
    ``llama._layers`` runs them unrolled): ``(h_next, q, k, v, xa)``."""
    from loraswitch_jax.layers import rms_norm

    rng = np.random.default_rng(rng_seed)
    mlp_adapts = tuple(p for p in adapts if p not in "qkv")
    x, _, _, h, norm, ws, lora = mlp_operands(rng, b, 1, experts=experts, adapts=mlp_adapts)
    d = h.shape[-1]
    wqkv = tuple(jnp.asarray(rng.standard_normal((3, d, n)) * d**-0.5, jnp.float32)
                 for n in (32, 16, 16))
    for p, n in zip("qkv", (32, 16, 16)):
        if p in adapts:
            lora.a[p] = jnp.asarray(rng.standard_normal((2, experts, d, 16)) * d**-0.5,
                                    jnp.float32)
            lora.b[p] = jnp.asarray(rng.standard_normal((2, experts, 16, n)) * 0.25, jnp.float32)
    slots = ops.shared_slots(lora.route, experts, lora.scale, impl) if shared else None
    lora = dataclasses.replace(lora, layer=0, slots=slots)
    x = rms_norm(h, norm[1], 1e-5)  # the MLP's input
    h_next, xa = ops.mlp_residual_shrink_ahead(x, *ws, 1, (None, None, None), impl, lora, None, h,
                                               norm, 1e-5, wqkv)
    q, k, v = ops.qkv_linear(rms_norm(h_next, norm[2], 1e-5), wqkv, 2, (None,) * 3, impl,
                             dataclasses.replace(lora, layer=1), xa)
    return h_next, q, k, v, xa


@pytest.mark.parametrize("b,experts,shared,adapts,ahead", [
    (1, 8, True, ("o", "gate", "up", "down", "q", "k", "v"), True),
    (3, 8, True, ("o", "gate", "up", "down", "q", "k", "v"), True),
    (2, 8, True, ("gate", "up", "down", "q", "v"), True),  # k not adapted
    (4, 8, True, ("o", "gate", "up", "down", "q", "k", "v"), False),  # dense slots
    (1, 8, False, ("o", "gate", "up", "down", "q", "k", "v"), False),  # a route per layer
    (1, 8, True, ("gate", "up", "q", "k", "v"), False),  # down not adapted: its plain kernel
])
def test_next_qkv_equal_the_xla_path(b, experts, shared, adapts, ahead):
    got = next_qkv(AHEAD, b, b, experts, shared, adapts)
    want = next_qkv(resolve_impl("xla"), b, b, experts, shared, adapts)
    assert (got[-1] is not None) == ahead and want[-1] is None
    if ahead:
        assert [x is not None for x in got[-1]] == [p in adapts for p in "qkv"]
    for g, w in zip(got[:-1], want[:-1]):
        assert rel_err(g, w) < F32_TOL


def test_decode_logits_with_plain_first_layers_and_random_norms():
    """Four layers, adapters on layers 1-3 (layer 1 keeps its q/k/v shrink, layers 2 and 3 take
    theirs from the layer before), norm weights that differ per layer (a norm or A read at the
    wrong layer shows): decode logits within float32 tolerance of XLA's, for one and three
    rows."""
    cfg = dataclasses.replace(CFG, num_hidden_layers=4)
    p = random_params(cfg, 1, jnp.float32)
    rng = np.random.default_rng(9)
    norms = {f: jnp.asarray(1 + 0.5 * rng.standard_normal(getattr(p.layers, f).shape),
                            jnp.float32) for f in ("attn_norm", "mlp_norm")}
    p = dataclasses.replace(p, layers=dataclasses.replace(p.layers, **norms))
    ad = make_adapter(cfg, seed=5, mode="switch", num_experts=8, top_k=2, rank=16, std=0.3,
                      router_layer=1)

    def run(impl, rows):
        cache = lj.init_cache(cfg, rows, 16, jnp.float32)
        logits, cache = lj.prefill(p, cache, TOKENS[:rows], LENGTHS[:rows], cfg, adapter=ad)
        out = [logits]
        for step in STEPS[:, :rows]:
            logits, cache = lj.decode_step(p, cache, step, cfg, adapter=ad, impl=impl)
            out.append(logits)
        return out

    for rows in (1, 3):
        for got, want in zip(jax.jit(functools.partial(run, AHEAD, rows))(),
                             jax.jit(functools.partial(run, "xla", rows))()):
            assert rel_err(got, want) < F32_TOL
