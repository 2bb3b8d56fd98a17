"""Routed LoRA projection kernels (interpret mode) against their jnp references and lora_delta.

Interpret mode starts every output as NaN, so an output element that no program writes fails
the comparison (``rel_err`` is NaN). Every case draws fresh operands from its own seed; ``B`` is
random (not the zero init), so a missing, doubled or misplaced expansion shows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from loraswitch_jax.adapters import lora_delta
from loraswitch_jax.pallas.routed_projections import (
    BlockSizes,
    lora_shrink,
    route_slots,
    routed_gate_up_matmul,
    routed_gate_up_matmul_reference,
    routed_matmul,
    routed_matmul_inline_shrink,
    routed_matmul_inline_shrink_reference,
    routed_matmul_reference,
    routed_qkv_matmul,
    routed_qkv_matmul_reference,
    supports,
)
from loraswitch_jax.router import Route

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
LAYERS, ADAPTED = 3, 2  # adapters on the last two layers
K, N, RANK = 48, 80, 16  # odd but supported: 3 K blocks and 5 column blocks of 16
SCALE = 2.0
BLOCKS16 = BlockSizes(block_n=16, block_k=16, split_k=1)


def normal(rng, shape, dtype, std=1.0):
    return jnp.asarray(std * rng.standard_normal(shape), jnp.float32).astype(dtype)


def random_route(rng, m, k, e):
    """Distinct experts per row; row 0 holds the largest expert index."""
    ids = np.argsort(rng.random((m, e)), axis=1)[:, :k]
    if e - 1 not in ids[0]:
        ids[0, 0] = e - 1
    gates = rng.random((m, k)) + 0.1
    gates /= gates.sum(1, keepdims=True)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(gates, jnp.float32)


def stack(rng, n, dtype, k=K):
    return normal(rng, (LAYERS, k, n), dtype, std=k**-0.5)


def lora_stacks(rng, e, n, dtype, k=K):
    """``a [La, E, K, r]`` and ``b [La, E, r, N]`` scaled so the LoRA term is as large as x @ W."""
    return (normal(rng, (ADAPTED, e, k, RANK), dtype, std=k**-0.5),
            normal(rng, (ADAPTED, e, RANK, n), dtype, std=RANK**-0.5))


def slots_and_x(rng, m, k, e, dtype):
    ids, gates = random_route(rng, m, k, e)
    slot_experts, slot_weights = route_slots(ids, gates, e, SCALE)
    return normal(rng, (m, K), dtype), slot_experts, slot_weights


# ---------------------------------------------------------------------------------------------
# Slots and shrink


@pytest.mark.parametrize("m,k,e", [(1, 2, 8), (3, 1, 8), (5, 2, 8), (17, 2, 128), (1, 1, 1)])
def test_route_slots(m, k, e):
    ids, gates = random_route(np.random.default_rng(m * 100 + e), m, k, e)
    slot_experts, slot_weights = route_slots(ids, gates, e, SCALE)
    ids, gates = np.asarray(ids), np.asarray(gates)
    gather = m * k < e
    num_slots = m * k if gather else e
    assert slot_experts.shape == (num_slots,) and slot_experts.dtype == jnp.int32
    assert slot_weights.shape == (m, num_slots) and slot_weights.dtype == jnp.float32
    want = np.zeros((m, num_slots))
    for row in range(m):
        for j in range(k):
            want[row, row * k + j if gather else ids[row, j]] += SCALE * gates[row, j]
    np.testing.assert_allclose(slot_weights, want, rtol=1e-6)
    want_experts = ids.reshape(-1) if gather else np.arange(e)
    np.testing.assert_array_equal(slot_experts, want_experts)


@pytest.mark.parametrize("m,k,e", [(1, 2, 8), (5, 2, 8), (3, 1, 128)])
def test_lora_shrink(m, k, e):
    rng = np.random.default_rng(m + k + e)
    x, slot_experts, slot_weights = slots_and_x(rng, m, k, e, jnp.float32)
    a, _ = lora_stacks(rng, e, N, jnp.float32)
    xa = lora_shrink(x, a, ADAPTED - 1, slot_experts, slot_weights)
    want = np.einsum("mk,skr->msr", np.asarray(x, np.float64),
                     np.asarray(a[ADAPTED - 1], np.float64)[np.asarray(slot_experts)])
    want *= np.asarray(slot_weights)[:, :, None]
    assert xa.shape == (m, slot_experts.shape[0], RANK) and xa.dtype == x.dtype
    assert rel_err(xa, want) < 1e-5


# ---------------------------------------------------------------------------------------------
# Kernels against references

# (M, E, k): gather (M k < E) and dense (M k >= E) slots; 70 rows take two row blocks of 64.
MATMUL_CASES = [
    (1, 8, 2, jnp.float32, True, None),  # default block sizes
    (1, 128, 1, jnp.bfloat16, False, 1),
    (5, 8, 2, jnp.bfloat16, True, 1),
    (5, 8, 1, jnp.float32, False, 3),
    (17, 128, 2, jnp.float32, True, 3),
    (70, 8, 2, jnp.float32, True, 1),
]


@pytest.mark.parametrize("m,e,k,dtype,bias,split_k", MATMUL_CASES)
def test_routed_matmul_matches_reference(m, e, k, dtype, bias, split_k):
    rng = np.random.default_rng(1000 * m + 10 * e + k + (split_k or 0))
    x, slot_experts, slot_weights = slots_and_x(rng, m, k, e, dtype)
    w = stack(rng, N, dtype)
    a, b = lora_stacks(rng, e, N, dtype)
    biases = (normal(rng, (LAYERS, N), dtype),) if bias else ()
    blocks = None if split_k is None else BlockSizes(block_n=16, block_k=16, split_k=split_k)
    for layer, adapted in ((LAYERS - 1, ADAPTED - 1), (1, 0)):
        xa = lora_shrink(x, a, adapted, slot_experts, slot_weights)
        got = routed_matmul(x, w, layer, xa, b, adapted, slot_experts, *biases,
                            block_sizes=blocks, interpret=True)
        ref = routed_matmul_reference(x, w, layer, xa, b, adapted, slot_experts, *biases)
        assert got.shape == (m, N) and got.dtype == dtype
        assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("m,e,dtype,bias,split_k", [
    (1, 128, jnp.bfloat16, True, 1),
    (70, 8, jnp.float32, False, 3),
])
def test_routed_matmul_inline_shrink_matches_reference(m, e, dtype, bias, split_k):
    rng = np.random.default_rng(1500 * m + e)
    x, slot_experts, slot_weights = slots_and_x(rng, m, 2, e, dtype)
    w = stack(rng, N, dtype)
    a, b = lora_stacks(rng, e, N, dtype)
    biases = (normal(rng, (LAYERS, N), dtype),) if bias else ()
    blocks = BlockSizes(block_n=16, block_k=16, split_k=split_k)
    got = routed_matmul_inline_shrink(x, w, 2, a, b, 1, slot_experts, slot_weights, *biases,
                                      block_sizes=blocks, interpret=True)
    ref = routed_matmul_inline_shrink_reference(x, w, 2, a, b, 1, slot_experts, slot_weights,
                                                *biases)
    assert got.shape == (m, N) and got.dtype == dtype
    assert rel_err(got, ref) < TOL[dtype]


NQ, NKV = 64, 32  # GQA


# adapted: which of q, k, v carry a LoRA term.
@pytest.mark.parametrize("m,e,adapted,dtype,bias,split_k", [
    (1, 8, (True, True, True), jnp.bfloat16, True, 1),
    (5, 8, (True, False, True), jnp.float32, True, 3),
    (17, 128, (False, True, False), jnp.bfloat16, False, 1),
    (5, 8, (False, False, False), jnp.float32, True, 1),
])
def test_routed_qkv_matches_reference(m, e, adapted, dtype, bias, split_k):
    rng = np.random.default_rng(2000 * m + e + split_k)
    x, slot_experts, slot_weights = slots_and_x(rng, m, 2, e, dtype)
    ws = [stack(rng, n, dtype) for n in (NQ, NKV, NKV)]
    biases = tuple(normal(rng, (LAYERS, n), dtype) if bias else None for n in (NQ, NKV, NKV))
    xas, bs = [], []
    for n, has in zip((NQ, NKV, NKV), adapted):
        a, b = lora_stacks(rng, e, n, dtype)
        xas.append(lora_shrink(x, a, 1, slot_experts, slot_weights) if has else None)
        bs.append(b if has else None)
    blocks = BlockSizes(block_n=16, block_k=16, split_k=split_k)
    got = routed_qkv_matmul(x, *ws, 2, xas, bs, 1, slot_experts, biases, block_sizes=blocks,
                            interpret=True)
    ref = routed_qkv_matmul_reference(x, *ws, 2, xas, bs, 1, slot_experts, biases)
    for g, r, n in zip(got, ref, (NQ, NKV, NKV)):
        assert g.shape == (m, n) and g.dtype == dtype
        assert rel_err(g, r) < TOL[dtype]


@pytest.mark.parametrize("m,e,adapted,dtype,bias,split_k", [
    (1, 8, (True, True), jnp.float32, True, 1),
    (5, 8, (True, False), jnp.bfloat16, False, 1),
    (17, 128, (False, True), jnp.float32, True, 3),
])
def test_routed_gate_up_matches_reference(m, e, adapted, dtype, bias, split_k):
    rng = np.random.default_rng(3000 * m + e + split_k)
    x, slot_experts, slot_weights = slots_and_x(rng, m, 2, e, dtype)
    ws = [stack(rng, N, dtype) for _ in range(2)]
    biases = tuple(normal(rng, (LAYERS, N), dtype) if bias else None for _ in range(2))
    xas, bs = [], []
    for has in adapted:
        a, b = lora_stacks(rng, e, N, dtype)
        xas.append(lora_shrink(x, a, 0, slot_experts, slot_weights) if has else None)
        bs.append(b if has else None)
    blocks = BlockSizes(block_n=16, block_k=16, split_k=split_k)
    got = routed_gate_up_matmul(x, *ws, 1, xas, bs, 0, slot_experts, *biases, block_sizes=blocks,
                                interpret=True)
    assert got.shape == (m, N) and got.dtype == dtype
    ref = routed_gate_up_matmul_reference(x, *ws, 1, xas, bs, 0, slot_experts, *biases)
    assert rel_err(got, ref) < TOL[dtype]


# ---------------------------------------------------------------------------------------------
# The whole pipeline against the direct formula


@pytest.mark.parametrize("m,k,e", [(1, 2, 128), (5, 2, 8), (17, 1, 128)])
def test_slots_shrink_expand_equal_lora_delta(m, k, e):
    """route_slots + lora_shrink + routed_matmul - x W = scale sum_j g_j (x A[e_j]) B[e_j]."""
    rng = np.random.default_rng(4000 * m + 10 * e + k)
    ids, gates = random_route(rng, m, k, e)
    x = normal(rng, (m, K), jnp.float32)
    w = stack(rng, N, jnp.float32)
    a, b = lora_stacks(rng, e, N, jnp.float32)
    slot_experts, slot_weights = route_slots(ids, gates, e, SCALE)
    xa = lora_shrink(x, a, 1, slot_experts, slot_weights)
    got = routed_matmul(x, w, 2, xa, b, 1, slot_experts, block_sizes=BLOCKS16, interpret=True)
    delta = lora_delta(x[None], a[1], b[1], Route(ids[None], gates[None]), SCALE)[0]
    assert rel_err(got - x @ w[2], delta) < 1e-5


def test_traced_layers_and_routes_inside_a_loop():
    """Layer, adapted layer and slot experts are data: one kernel serves every layer of a
    jitted fori_loop, with the route computed inside the jit."""
    rng = np.random.default_rng(5)
    m, e = 3, 8
    ids, gates = random_route(rng, m, 2, e)
    x = normal(rng, (m, K), jnp.float32)
    wq, wk, wv = stack(rng, K, jnp.float32), stack(rng, K // 3, jnp.float32), \
        stack(rng, K // 3, jnp.float32)
    wg, wu = stack(rng, N, jnp.float32), stack(rng, N, jnp.float32)
    wd = stack(rng, K, jnp.float32, k=N)
    (aq, bq), (ag, bg), (ad, bd) = (lora_stacks(rng, e, n, jnp.float32, k=kk)
                                    for n, kk in ((K, K), (N, K), (K, N)))

    def run(qkv, gate_up, matmul):
        def forward(h, ids, gates):
            slot_experts, slot_weights = route_slots(ids, gates, e, SCALE)

            def body(layer, h):
                adapted = jnp.maximum(layer - (LAYERS - ADAPTED), 0)
                xa = lora_shrink(h, aq, adapted, slot_experts, slot_weights)
                q, k, v = qkv(h, wq, wk, wv, layer, (xa, None, None), (bq, None, None), adapted,
                              slot_experts)
                h = jnp.tanh(q + jnp.concatenate([k, v, k], axis=1))
                xg = lora_shrink(h, ag, adapted, slot_experts, slot_weights)
                act = gate_up(h, wg, wu, layer, (xg, None), (bg, None), adapted, slot_experts)
                xd = lora_shrink(act, ad, adapted, slot_experts, slot_weights)
                return jnp.tanh(matmul(act, wd, layer, xd, bd, adapted, slot_experts))

            return jax.lax.fori_loop(LAYERS - ADAPTED, LAYERS, body, h)

        return jax.jit(forward)(x, ids, gates)

    got = run(lambda *a: routed_qkv_matmul(*a, block_sizes=BLOCKS16, interpret=True),
              lambda *a: routed_gate_up_matmul(*a, block_sizes=BLOCKS16, interpret=True),
              lambda *a: routed_matmul(*a, block_sizes=BLOCKS16, interpret=True))
    ref = run(routed_qkv_matmul_reference, routed_gate_up_matmul_reference,
              routed_matmul_reference)
    assert rel_err(got, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# Triton lowering (no GPU needed), shapes and errors


def test_lowers_to_triton():
    """The kernels lower to Triton IR for a GPU, with rows that pad to a power of two (40 -> 64)
    and dense slots, so block shapes Triton rejects (not powers of two) fail here on CPU."""
    dt = jnp.bfloat16
    x = jnp.zeros((40, 256), dt)
    w = jnp.zeros((2, 256, 128), dt)
    b = jnp.zeros((2, 8, 32, 128), dt)
    xa = jnp.zeros((40, 8, 32), dt)
    slot_experts = jnp.arange(8, dtype=jnp.int32)
    split2 = BlockSizes(block_n=64, block_k=64, split_k=2)

    a = jnp.zeros((2, 8, 256, 32), dt)
    slot_weights = jnp.zeros((40, 8), jnp.float32)

    def step(x, xa, slot_experts, slot_weights, layer):
        q, _, _ = routed_qkv_matmul(x, w, w, w, layer, (xa, None, xa), (b, None, b), layer,
                                    slot_experts, (w[:, 0], None, None))
        y = routed_matmul(x, w, layer, xa, b, layer, slot_experts, block_sizes=split2)
        y2 = routed_matmul_inline_shrink(x, w, layer, a, b, layer, slot_experts, slot_weights)
        act = routed_gate_up_matmul(x, w, w, layer, (xa, xa), (b, b), layer, slot_experts)
        return q + y + y2 + act

    hlo = jax.jit(step).trace(x, xa, slot_experts, slot_weights, jnp.int32(1)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 4


def test_supports():
    assert supports(4096, 4096, 1024, rank=16) and supports(4096, 11008, rank=64)
    assert not supports(4096, 4096, rank=8) and not supports(4096, 4096, rank=48)
    assert not supports(4096, 11000, rank=16)


def test_rejects_bad_input():
    rng = np.random.default_rng(9)
    e = 8
    x, slot_experts, slot_weights = slots_and_x(rng, 2, 2, e, jnp.float32)
    w = stack(rng, N, jnp.float32)
    a, b = lora_stacks(rng, e, N, jnp.float32)
    xa = lora_shrink(x, a, 1, slot_experts, slot_weights)
    ids, gates = random_route(rng, 2, 2, e)

    with pytest.raises(ValueError, match=r"k=3 experts per row must be in \[1, num_experts=2\]"):
        route_slots(jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)), 2, 1.0)
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, 8\)"):
        route_slots(ids.at[1, 1].set(e), gates, e, SCALE)
    with pytest.raises(ValueError, match="expert_ids and gates"):
        route_slots(ids, gates[:, :1], e, SCALE)
    with pytest.raises(ValueError, match="must be integers"):
        route_slots(gates, gates, e, SCALE)
    with pytest.raises(ValueError, match="expected slot_weights"):
        lora_shrink(x, a, 1, slot_experts, slot_weights[:1])
    with pytest.raises(ValueError, match="expected x"):
        lora_shrink(x, a[..., :32, :], 1, slot_experts, slot_weights)
    with pytest.raises(ValueError, match=r"slot_experts must be in \[0, 8\)"):
        lora_shrink(x, a, 1, slot_experts.at[0].set(-1), slot_weights)

    def call(**changes):
        args = dict(x=x, w=w, layer=2, xa=xa, b=b, adapted_layer=1, slot_experts=slot_experts,
                    block_sizes=BLOCKS16, interpret=True) | changes
        return routed_matmul(**args)

    with pytest.raises(ValueError, match="layer 3 out of range"):
        call(layer=LAYERS)
    with pytest.raises(ValueError, match="adapted_layer 2 out of range"):
        call(adapted_layer=ADAPTED)
    with pytest.raises(ValueError, match=r"slot_experts must be in \[0, 8\)"):
        call(slot_experts=slot_experts.at[-1].set(e))
    with pytest.raises(ValueError, match="expected slot_experts"):
        call(slot_experts=slot_experts.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"expected the xa of w \[M=2, S="):
        call(xa=xa[:1])
    with pytest.raises(ValueError, match="expected x's dtype"):
        call(xa=xa.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="rank r=8 must be a power of two"):
        call(xa=xa[..., :8], b=b[:, :, :8])
    with pytest.raises(ValueError, match=r"expected the b stack of w \[La, E, r=16, N=80\]"):
        call(b=b[..., :64])
    with pytest.raises(ValueError, match=r"expected the bias of w \[L, N\]"):
        call(bias=jnp.zeros((LAYERS, 64)))
    with pytest.raises(ValueError, match="multiples of 16"):
        call(x=x[:, :40], w=w[:, :40])
    with pytest.raises(ValueError, match="does not tile N"):
        call(block_sizes=BlockSizes(block_n=32, block_k=16))
    with pytest.raises(ValueError, match="same"):
        routed_matmul_inline_shrink(x, w, 2, a[:, :4], b, 1, slot_experts, slot_weights,
                                    block_sizes=BLOCKS16, interpret=True)
    with pytest.raises(ValueError, match="expected slot_weights"):
        routed_matmul_inline_shrink(x, w, 2, a, b, 1, slot_experts, slot_weights[:1],
                                    block_sizes=BLOCKS16, interpret=True)

    ws = (w, w[..., :32], w[..., :32])
    with pytest.raises(ValueError, match="expected 3 xas"):
        routed_qkv_matmul(x, *ws, 0, (xa,), (b,), 0, slot_experts, interpret=True)
    with pytest.raises(ValueError, match="pass both its xa and its b stack"):
        routed_qkv_matmul(x, *ws, 0, (xa, None, None), (None, None, None), 0, slot_experts,
                          block_sizes=BLOCKS16, interpret=True)
    with pytest.raises(ValueError, match="different"):
        routed_qkv_matmul(x, *ws, 0, (xa, None, xa), (b, None, b[:1, :, :, :32]), 0, slot_experts,
                          block_sizes=BLOCKS16, interpret=True)
    with pytest.raises(ValueError, match="one shape"):
        routed_gate_up_matmul(x, w, w[..., :64], 0, (None, None), (None, None), 0, slot_experts,
                              block_sizes=BLOCKS16, interpret=True)
