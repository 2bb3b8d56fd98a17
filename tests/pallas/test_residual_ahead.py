"""The o kernel's residual and gate/up's shrink ahead (``routed_matmul_residual``, interpret
mode) against its jnp reference, and the routed gate/up kernel reading the ``NormedXa``
partials against the reference fed the reference's shrink.

Interpret mode starts every output as NaN, so a partial that no program writes fails the
comparison. Operands come from ``test_lora_shrink``'s helpers; ``B`` is random.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraswitch_jax.pallas._shrink_ahead import normed_xa_value
from loraswitch_jax.pallas.lora_shrink import lora_shrink
from loraswitch_jax.pallas.routed_projections import (
    BlockSizes,
    NormedXa,
    ResidualAhead,
    routed_gate_up_matmul,
    routed_gate_up_matmul_reference,
    routed_matmul_residual,
    routed_matmul_residual_reference,
)
from tests.helpers import rel_err
from tests.pallas.gpu_target import lower_for_gpu
from tests.pallas.interpret import INTERPRET
from tests.pallas.test_lora_shrink import LAYERS, RANK, TOL, lora_stacks, normal, slots_and_x

EPS = 1e-5
F = 32  # the MLP's width in the consumer tests


def operands(rng, m, k, e, dtype, n=48, stacks=2, adapted=True):
    """``x [M, K]`` (o's input), its route's slots, ``w [L, K, N]``, o's ``xa`` and ``b`` (or
    ``None``s), and a ``ResidualAhead`` with ``stacks`` next ``A`` stacks ``[La, E, N, r]``."""
    x, slot_experts, slot_weights = slots_and_x(rng, m, k, e, dtype)
    x = normal(rng, (m, 64), dtype)
    w = normal(rng, (LAYERS, 64, n), dtype, std=64**-0.5)
    a_o, b_o = lora_stacks(rng, e, n, dtype, k=64)
    xa = lora_shrink(x, a_o, 1, slot_experts, slot_weights) if adapted else None
    nexts = tuple(lora_stacks(rng, e, F, dtype, k=n)[0] for _ in range(stacks))
    ahead = ResidualAhead(normal(rng, (m, n), dtype), normal(rng, (LAYERS, n), dtype) + 1.0,
                          nexts, slot_weights, EPS)
    return x, w, xa, b_o if adapted else None, slot_experts, ahead


def rms_normed(h, g, dtype):
    v = h.astype(jnp.float32)
    v = v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + EPS)
    return (v * g.astype(jnp.float32)).astype(dtype)


@pytest.mark.parametrize("m,e,k,dtype,expand,block_n,stacks,adapted,bias", [
    (1, 8, 2, jnp.float32, "rows", 16, 2, True, False),
    (1, 8, 2, jnp.bfloat16, "dot", 16, 2, True, True),
    (3, 8, 2, jnp.float32, "rows", 16, 1, True, False),  # 6 slots: groups of 4 and 2
    (3, 8, 2, jnp.float32, "dot", 16, 2, False, True),  # o not adapted: the plain projection
    (2, 32, 2, jnp.bfloat16, "rows", 16, 2, True, False),
    (5, 32, 1, jnp.float32, "dot", None, 2, True, False),  # default blocks
])
def test_residual_and_normed_shrink_match_reference(m, e, k, dtype, expand, block_n, stacks,
                                                    adapted, bias):
    rng = np.random.default_rng(7000 * m + e + stacks)
    x, w, xa, b, slot_experts, ahead = operands(rng, m, k, e, dtype, stacks=stacks,
                                                adapted=adapted)
    bias = normal(rng, (LAYERS, 48), dtype) if bias else None
    blocks = None if block_n is None else BlockSizes(block_n=block_n, block_k=16, split_k=1)
    h_mid, normed = routed_matmul_residual(x, w, 2, xa, b, 1, slot_experts, bias, ahead=ahead,
                                           expand=expand, block_sizes=blocks,
                                           interpret=INTERPRET)
    h_ref, xas_ref = routed_matmul_residual_reference(x, w, 2, xa, b, 1, slot_experts, bias,
                                                      ahead=ahead)
    assert h_mid.dtype == dtype and rel_err(h_mid, h_ref) < TOL[dtype]
    assert len(normed) == stacks
    for got, want in zip(normed, xas_ref):
        assert isinstance(got, NormedXa) and got.xa.shape[0] == got.ss.shape[0]
        assert rel_err(normed_xa_value(got, m, RANK, dtype), want) < TOL[dtype]


@pytest.mark.parametrize("m,e,k,dtype,expand,n,down", [
    (1, 8, 2, jnp.float32, "rows", 48, False),  # 3 partials: one at a time
    (1, 8, 2, jnp.bfloat16, "rows", 320, True),  # 20 partials: a loop of chunks of 4
    (3, 8, 2, jnp.float32, "dot", 512, True),  # 32 partials: two chunks of 16
    (2, 32, 2, jnp.float32, "dot", 48, False),
])
def test_gate_up_reads_the_normed_partials(m, e, k, dtype, expand, n, down):
    """The routed gate/up kernel adds the partials up, applies the RMSNorm scale and expands:
    equal to the reference fed ``lora_shrink`` of the normed input."""
    rng = np.random.default_rng(8000 * m + n)
    x, w, xa, b, slot_experts, ahead = operands(rng, m, k, e, dtype, n=n)
    blocks = BlockSizes(block_n=16, block_k=16, split_k=1)
    h_mid, normed = routed_matmul_residual(x, w, 2, xa, b, 1, slot_experts, ahead=ahead,
                                           expand=expand, block_sizes=blocks,
                                           interpret=INTERPRET)
    h_ref, xas_ref = routed_matmul_residual_reference(x, w, 2, xa, b, 1, slot_experts,
                                                      ahead=ahead)
    x_mlp = rms_normed(h_ref, ahead.norm[2], dtype)
    wg, wu = (normal(rng, (LAYERS, n, F), dtype, std=n**-0.5) for _ in range(2))
    bs = tuple(lora_stacks(rng, e, F, dtype, k=n)[1] for _ in range(2))
    kw = {}
    if down:
        kw["down_shrink"] = (lora_stacks(rng, e, 16, dtype, k=F)[0], ahead.slot_weights)
    got = routed_gate_up_matmul(x_mlp, wg, wu, 2, normed, bs, 1, slot_experts, expand=expand,
                                block_sizes=blocks, interpret=INTERPRET, **kw)
    want = routed_gate_up_matmul_reference(x_mlp, wg, wu, 2, xas_ref, bs, 1, slot_experts)
    act = got[0] if down else got
    assert rel_err(act, want) < TOL[dtype]
    if down:  # the epilogue's down shrink of the kernel's own activations
        a_down, slot_weights = kw["down_shrink"]
        xa_down = lora_shrink(act, a_down, 1, slot_experts, slot_weights)
        assert rel_err(got[1].xa[0, :m].reshape(xa_down.shape), xa_down) < TOL[dtype]


def test_other_layers_of_the_norm_and_the_next_stacks():
    """Down's kernel computes the next layer's q/k/v shrink: ``norm_layer`` and ``a_layer``
    (traced here) pick the RMSNorm weights and ``A`` stacks of another layer."""
    rng = np.random.default_rng(11)
    x, w, xa, b, slot_experts, ahead = operands(rng, 2, 2, 8, jnp.float32, stacks=3)
    blocks = BlockSizes(block_n=16, block_k=16, split_k=1)

    @jax.jit
    def run(norm_layer, a_layer):
        nexts = dataclasses.replace(ahead, norm_layer=norm_layer, a_layer=a_layer)
        return routed_matmul_residual(x, w, 1, xa, b, 0, slot_experts, ahead=nexts,
                                      block_sizes=blocks, expand="rows", interpret=INTERPRET)

    h_mid, normed = run(2, 1)
    nexts = dataclasses.replace(ahead, norm_layer=2, a_layer=1)
    h_ref, xas_ref = routed_matmul_residual_reference(x, w, 1, xa, b, 0, slot_experts,
                                                      ahead=nexts)
    assert rel_err(h_mid, h_ref) < TOL[jnp.float32]
    for got, want in zip(normed, xas_ref):
        assert rel_err(normed_xa_value(got, 2, RANK, jnp.float32), want) < TOL[jnp.float32]
    with pytest.raises(ValueError, match="out of range"):
        routed_matmul_residual(x, w, 1, xa, b, 0, slot_experts, interpret=INTERPRET,
                               ahead=dataclasses.replace(ahead, norm_layer=LAYERS))


def test_bad_operands_are_refused():
    rng = np.random.default_rng(3)
    x, w, xa, b, slot_experts, ahead = operands(rng, 1, 2, 8, jnp.float32)
    call = lambda ahead, **kw: routed_matmul_residual(  # noqa: E731
        x, w, 2, xa, b, 1, slot_experts, ahead=ahead, interpret=INTERPRET, **kw)
    with pytest.raises(ValueError, match="split_k == 1"):
        call(ahead, block_sizes=BlockSizes(block_n=16, block_k=16, split_k=2))
    with pytest.raises(ValueError, match=r"ahead.h \[M, N\]"):
        call(ResidualAhead(ahead.h[:, :16], ahead.norm, ahead.a, ahead.slot_weights, EPS))
    with pytest.raises(ValueError, match=r"ahead.norm \[L, N\]"):
        call(ResidualAhead(ahead.h, ahead.norm[0], ahead.a, ahead.slot_weights, EPS))
    with pytest.raises(ValueError, match="ahead.a stacks"):
        call(ResidualAhead(ahead.h, ahead.norm, (ahead.a[0][:, :, :16],), ahead.slot_weights,
                           EPS))
    with pytest.raises(ValueError, match="eps"):
        call(ResidualAhead(ahead.h, ahead.norm, ahead.a, ahead.slot_weights, 0.0))
    with pytest.raises(ValueError, match="ResidualAhead"):
        call((ahead.h, ahead.norm))
    dense = jnp.arange(2, dtype=jnp.int32)  # S = E = 2: dense slots
    with pytest.raises(ValueError, match="gather slots"):
        routed_matmul_residual(x, w, 2, None, None, 1, dense,
                               ahead=ResidualAhead(ahead.h, ahead.norm,
                                                   tuple(a[:, :2] for a in ahead.a),
                                                   ahead.slot_weights, EPS),
                               interpret=INTERPRET)
    _, normed = call(ahead, block_sizes=BlockSizes(block_n=16, block_k=16, split_k=1))
    wide = jnp.zeros((LAYERS, 64, F), jnp.float32)  # normed over N = 48 columns, not 64
    with pytest.raises(ValueError, match="normed over 48"):
        routed_gate_up_matmul(jnp.zeros((1, 64), jnp.float32), wide, wide, 2, normed,
                              (jnp.zeros((2, 8, RANK, F)),) * 2, 1, slot_experts,
                              interpret=INTERPRET)


def test_lowers_to_triton():
    """The residual kernel (rows and dots, one and three rows: 2 and 6 slots) and the gate/up
    kernel reading its partials (with and without the down shrink) lower to Triton IR."""
    dt = jnp.bfloat16
    d, f = 256, 512
    w = jnp.zeros((2, d, d), dt)
    a = jnp.zeros((2, 8, d, 16), dt)
    b = jnp.zeros((2, 8, 16, d), dt)
    wf, bf, af = jnp.zeros((2, d, f), dt), jnp.zeros((2, 8, 16, f), dt), jnp.zeros((2, 8, f, 16),
                                                                                   dt)

    def step(x, h, norm, slot_experts, slot_weights, layer):
        m = x.shape[0]
        xa = lora_shrink(x, a, layer, slot_experts, slot_weights)
        ahead = ResidualAhead(h, norm, (a, a), slot_weights, EPS)
        expand = "rows" if m == 1 else "dot"
        h_mid, normed = routed_matmul_residual(x, w, layer, xa, b, layer, slot_experts,
                                               ahead=ahead, expand=expand)
        act, xa_down = routed_gate_up_matmul(h_mid, wf, wf, layer, normed, (bf, bf), layer,
                                             slot_experts, down_shrink=(af, slot_weights),
                                             expand=expand)
        act2 = routed_gate_up_matmul(h_mid, wf, wf, layer, (normed[0], None), (bf, None),
                                     layer, slot_experts, expand=expand)
        return act + act2 + xa_down.xa.sum()

    for m, slots in ((1, 2), (3, 6)):
        hlo = lower_for_gpu(
            jax.jit(step), jnp.zeros((m, d), dt), jnp.zeros((m, d), dt), jnp.zeros((2, d), dt),
            jnp.arange(slots, dtype=jnp.int32), jnp.zeros((m, slots), jnp.float32), jnp.int32(1),
        ).as_text()
        assert hlo.count("__gpu$xla.gpu.triton") == 3
