"""Routed LoRA projection kernels (interpret mode) against their jnp references and lora_delta.

Interpret mode starts every output as NaN, so an output element that no program writes fails
the comparison (``rel_err`` is NaN). Every case draws fresh operands from its own seed; ``B`` is
random (not the zero init), so a missing, doubled or misplaced expansion shows. Slots and
operands come from ``test_lora_shrink``'s helpers.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import rel_err
from tests.pallas.gpu_target import lower_for_gpu
from tests.pallas.interpret import F32_TOL, INTERPRET
from loraswitch_jax.adapters import lora_delta
from loraswitch_jax.pallas.lora_shrink import (
    ShrinkBlockSizes,
    PackedXa,
    lora_shrink,
    lora_shrink_group,
    route_slots,
)
from loraswitch_jax.pallas.routed_projections import (
    MAX_EXPAND_ROWS,
    BlockSizes,
    routed_gate_up_matmul,
    routed_gate_up_matmul_reference,
    routed_matmul,
    routed_matmul_reference,
    routed_qkv_matmul,
    routed_qkv_matmul_reference,
    supports,
)
from loraswitch_jax.router import Route
from tests.pallas.test_lora_shrink import (
    ADAPTED,
    K,
    LAYERS,
    N,
    RANK,
    SCALE,
    TOL,
    lora_stacks,
    normal,
    random_route,
    slots_and_x,
)

BLOCKS16 = BlockSizes(block_n=16, block_k=16, split_k=1)
INTERPRET16 = dict(block_sizes=BLOCKS16, interpret=INTERPRET)


def stack(rng, n, dtype, k=K):
    return normal(rng, (LAYERS, k, n), dtype, std=k**-0.5)


# ---------------------------------------------------------------------------------------------
# Kernels against references

# (M, E, k): gather (M k < E) and dense (M k >= E) slots; 70 rows take two row blocks of 64.
MATMUL_CASES = [
    (1, 8, 2, jnp.float32, True, None),  # default block sizes
    (1, 128, 1, jnp.bfloat16, False, 1),
    (1, 128, 2, jnp.bfloat16, True, 1),
    (5, 8, 2, jnp.bfloat16, True, 1),
    (5, 8, 1, jnp.float32, False, 3),  # gather, slots spread over the splits
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
                            block_sizes=blocks, interpret=INTERPRET)
        ref = routed_matmul_reference(x, w, layer, xa, b, adapted, slot_experts, *biases)
        assert got.shape == (m, N) and got.dtype == dtype
        assert rel_err(got, ref) < TOL[dtype]


NQ, NKV = 64, 32  # GQA


def adapted_stacks(rng, e, ns, adapted, dtype):
    """``(as_, bs)``: an ``A`` and a ``B`` stack for each output width in ``ns`` that is
    ``adapted``, ``None`` for the others."""
    stacks = [lora_stacks(rng, e, n, dtype) for n in ns]
    return ([a if has else None for (a, _), has in zip(stacks, adapted)],
            [b if has else None for (_, b), has in zip(stacks, adapted)])


# adapted: which of q, k, v carry a LoRA term; k: experts per row.
@pytest.mark.parametrize("m,e,k,adapted,dtype,bias,split_k", [
    (1, 8, 2, (True, True, True), jnp.bfloat16, True, 1),
    (1, 128, 2, (True, True, True), jnp.bfloat16, True, 1),  # gather
    (5, 8, 2, (True, False, True), jnp.float32, True, 3),
    (5, 8, 1, (True, False, True), jnp.float32, True, 3),  # gather
    (17, 128, 2, (False, True, False), jnp.bfloat16, False, 1),
    (5, 8, 2, (False, False, False), jnp.float32, True, 1),
])
def test_routed_qkv_matches_reference(m, e, k, adapted, dtype, bias, split_k):
    rng = np.random.default_rng(2000 * m + e + split_k + 10 * k)
    x, slot_experts, slot_weights = slots_and_x(rng, m, k, e, dtype)
    ws = [stack(rng, n, dtype) for n in (NQ, NKV, NKV)]
    biases = tuple(normal(rng, (LAYERS, n), dtype) if bias else None for n in (NQ, NKV, NKV))
    as_, bs = adapted_stacks(rng, e, (NQ, NKV, NKV), adapted, dtype)
    blocks = BlockSizes(block_n=16, block_k=16, split_k=split_k)
    xas = [None if a is None else lora_shrink(x, a, 1, slot_experts, slot_weights) for a in as_]
    got = routed_qkv_matmul(x, *ws, 2, xas, bs, 1, slot_experts, biases, block_sizes=blocks,
                            interpret=INTERPRET)
    ref = routed_qkv_matmul_reference(x, *ws, 2, xas, bs, 1, slot_experts, biases)
    for g, r, n in zip(got, ref, (NQ, NKV, NKV)):
        assert g.shape == (m, n) and g.dtype == dtype
        assert rel_err(g, r) < TOL[dtype]


@pytest.mark.parametrize("m,e,k,adapted,dtype,bias,split_k", [
    (1, 8, 2, (True, True), jnp.float32, True, 1),
    (1, 8, 1, (True, True), jnp.float32, True, 1),  # gather
    (5, 8, 2, (True, False), jnp.bfloat16, False, 1),
    (17, 128, 2, (False, True), jnp.float32, True, 3),
    (17, 8, 2, (False, True), jnp.bfloat16, False, 3),  # dense
])
def test_routed_gate_up_matches_reference(m, e, k, adapted, dtype, bias, split_k):
    rng = np.random.default_rng(3000 * m + e + split_k + 10 * k)
    x, slot_experts, slot_weights = slots_and_x(rng, m, k, e, dtype)
    ws = [stack(rng, N, dtype) for _ in range(2)]
    biases = tuple(normal(rng, (LAYERS, N), dtype) if bias else None for _ in range(2))
    as_, bs = adapted_stacks(rng, e, (N, N), adapted, dtype)
    blocks = BlockSizes(block_n=16, block_k=16, split_k=split_k)
    xas = [None if a is None else lora_shrink(x, a, 0, slot_experts, slot_weights) for a in as_]
    got = routed_gate_up_matmul(x, *ws, 1, xas, bs, 0, slot_experts, *biases, block_sizes=blocks,
                                interpret=INTERPRET)
    ref = routed_gate_up_matmul_reference(x, *ws, 1, xas, bs, 0, slot_experts, *biases)
    assert got.shape == (m, N) and got.dtype == dtype
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
    got = routed_matmul(x, w, 2, xa, b, 1, slot_experts, block_sizes=BLOCKS16, interpret=INTERPRET)
    delta = lora_delta(x[None], a[1], b[1], Route(ids[None], gates[None]), SCALE)[0]
    assert rel_err(got - x @ w[2], delta) < F32_TOL


def shrink_xla(x, as_, *route):
    """``lora_shrink`` of each stack in ``as_`` (``None`` stays ``None``)."""
    return [None if a is None else lora_shrink(x, a, *route) for a in as_]


def shrink_pallas(x, as_, *route):
    """``lora_shrink_group`` of the stacks in ``as_``, packed as ops hands it on (``None`` stays
    ``None``)."""
    xas = iter(lora_shrink_group(x, [a for a in as_ if a is not None], *route, packed=True,
                                 interpret=INTERPRET))
    return [None if a is None else next(xas) for a in as_]


def via_xa(shrink, qkv_op, gate_up_op, matmul_op, **kw):
    """Projections taking ``(a, slot_weights)``: ``shrink`` then the kernels (or references)
    that take ``xa``."""

    def qkv(x, wq, wk, wv, layer, as_, bs, adapted, slot_experts, slot_weights):
        xas = shrink(x, as_, adapted, slot_experts, slot_weights)
        return qkv_op(x, wq, wk, wv, layer, xas, bs, adapted, slot_experts, **kw)

    def gate_up(x, wg, wu, layer, as_, bs, adapted, slot_experts, slot_weights):
        xas = shrink(x, as_, adapted, slot_experts, slot_weights)
        return gate_up_op(x, wg, wu, layer, xas, bs, adapted, slot_experts, **kw)

    def matmul(x, w, layer, a, b, adapted, slot_experts, slot_weights):
        (xa,) = shrink(x, (a,), adapted, slot_experts, slot_weights)
        return matmul_op(x, w, layer, xa, b, adapted, slot_experts, **kw)

    return qkv, gate_up, matmul


KERNELS = (routed_qkv_matmul, routed_gate_up_matmul, routed_matmul)
REFERENCES = (routed_qkv_matmul_reference, routed_gate_up_matmul_reference,
              routed_matmul_reference)
SHRINK_PLACEMENTS = {
    "xla": lambda: via_xa(shrink_xla, *KERNELS, **INTERPRET16),  # ops' shrink under dropout
    # The grouped shrink's own padded [Mp, S r] output handed on as is (what ops does).
    "pallas-packed": lambda: via_xa(shrink_pallas, *KERNELS, **INTERPRET16),
}


@pytest.mark.parametrize("shrink", SHRINK_PLACEMENTS)
def test_traced_layers_and_routes_inside_a_loop(shrink):
    """Layer, adapted layer and slot experts are data: one kernel serves every layer of a
    jitted fori_loop, with the route computed inside the jit, for each shrink placement."""
    rng = np.random.default_rng(5)
    m, e = 3, 8
    ids, gates = random_route(rng, m, 2, e)
    x = normal(rng, (m, K), jnp.float32)
    wq, wk, wv = stack(rng, K, jnp.float32), stack(rng, K // 3, jnp.float32), \
        stack(rng, K // 3, jnp.float32)
    wg, wu = stack(rng, N, jnp.float32), stack(rng, N, jnp.float32)
    wd = stack(rng, K, jnp.float32, k=N)
    (aq, bq), (av, bv), (ag, bg), (ad, bd) = (lora_stacks(rng, e, n, jnp.float32, k=kk) for n, kk
                                              in ((K, K), (K // 3, K), (N, K), (K, N)))

    def run(qkv, gate_up, matmul):
        def forward(h, ids, gates):
            route = route_slots(ids, gates, e, SCALE)

            def body(layer, h):
                adapted = jnp.maximum(layer - (LAYERS - ADAPTED), 0)
                q, k, v = qkv(h, wq, wk, wv, layer, (aq, None, av), (bq, None, bv), adapted,
                              *route)
                h = jnp.tanh(q + jnp.concatenate([k, v, k], axis=1))
                act = gate_up(h, wg, wu, layer, (ag, None), (bg, None), adapted, *route)
                return jnp.tanh(matmul(act, wd, layer, ad, bd, adapted, *route))

            return jax.lax.fori_loop(LAYERS - ADAPTED, LAYERS, body, h)

        return jax.jit(forward)(x, ids, gates)

    got = run(*SHRINK_PLACEMENTS[shrink]())
    ref = run(*via_xa(shrink_xla, *REFERENCES))
    assert rel_err(got, ref) < F32_TOL


# ---------------------------------------------------------------------------------------------
# Triton lowering (no GPU needed), shapes and errors


def test_lowers_to_triton():
    """The projection kernels lower to Triton IR for a GPU, with rows that pad to a power of two
    (40 -> 64), dense slots (8) and a slot count that is no power of two (6), so block shapes
    Triton rejects (not powers of two) fail here on CPU."""
    dt = jnp.bfloat16
    x = jnp.zeros((40, 256), dt)
    w = jnp.zeros((2, 256, 128), dt)
    a = jnp.zeros((2, 8, 256, 32), dt)
    b = jnp.zeros((2, 8, 32, 128), dt)
    xa = jnp.zeros((40, 8, 32), dt)
    split2 = BlockSizes(block_n=64, block_k=64, split_k=2)

    def step(x, xa, slot_experts, six_experts, six_weights, layer):
        q, _, _ = routed_qkv_matmul(x, w, w, w, layer, (xa, None, xa), (b, None, b), layer,
                                    slot_experts, (w[:, 0], None, None))
        y = routed_matmul(x, w, layer, xa, b, layer, slot_experts, block_sizes=split2)
        act = routed_gate_up_matmul(x, w, w, layer, (xa, xa), (b, b), layer, slot_experts)
        act3, xa_down = routed_gate_up_matmul(x, w, w, layer, (xa, xa), (b, b), layer,
                                              slot_experts,
                                              down_shrink=(a[..., :128, :], xa[..., 0] * 1.0))
        act = act + act3 + xa_down.xa.sum()
        xa6 = lora_shrink(x, a, layer, six_experts, six_weights)
        y2 = routed_matmul(x, w, layer, xa6, b, layer, six_experts)
        q2, _, _ = routed_qkv_matmul(x, w, w, w, layer, (xa6, None, xa6), (b, None, b), layer,
                                     six_experts, (w[:, 0], None, None))
        act2 = routed_gate_up_matmul(x, w, w, layer, (xa6, xa6), (b, b), layer, six_experts,
                                     block_sizes=split2)
        return q + y + act + y2 + q2 + act2

    hlo = lower_for_gpu(
        jax.jit(step), x, xa, jnp.arange(8, dtype=jnp.int32), jnp.arange(6, dtype=jnp.int32),
        jnp.zeros((40, 6), jnp.float32), jnp.int32(1),
    ).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 7


def test_rows_expansion_lowers_to_triton():
    """The "rows" expansion (one-row loads and their transpose, issued before the K loop) lowers
    to Triton IR for a GPU, with a given xa, a split shrink's partial sums, the gate/up
    epilogue's sums and slots spread over two splits."""
    dt = jnp.bfloat16
    x = jnp.zeros((1, 256), dt)
    w = jnp.zeros((2, 256, 128), dt)
    a = jnp.zeros((2, 8, 128, 16), dt)
    b = jnp.zeros((2, 8, 16, 128), dt)
    xa = jnp.zeros((1, 2, 16), dt)
    partial = PackedXa(jnp.zeros((4, 16, 32), jnp.float32))
    fused = BlockSizes(block_n=64, block_k=64, split_k=1)

    def step(x, xa, slot_experts, slot_weights, layer):
        q, _, _ = routed_qkv_matmul(x, w, w, w, layer, (xa, None, partial), (b, None, b), layer,
                                    slot_experts, expand="rows")
        act, xa_down = routed_gate_up_matmul(x, w, w, layer, (xa, xa), (b, b), layer,
                                             slot_experts, down_shrink=(a, slot_weights),
                                             expand="rows", block_sizes=fused)
        y = routed_matmul(act, w[:, :128], layer, xa_down, b, layer, slot_experts,
                          expand="rows",
                          block_sizes=BlockSizes(block_n=64, block_k=16, split_k=2))
        return q + y

    hlo = lower_for_gpu(
        jax.jit(step), x, xa, jnp.array([3, 7], jnp.int32), jnp.ones((1, 2), jnp.float32),
        jnp.int32(1),
    ).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 3


def test_supports():
    assert supports(4096, 4096, 1024, rank=16) and supports(4096, 11008, rank=64)
    assert not supports(4096, 4096, rank=8) and not supports(4096, 4096, rank=48)
    assert not supports(4096, 11000, rank=16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_shrink_partial_sums_are_added_up_in_the_kernel(dtype):
    """A split shrink handed on packed keeps its float32 partial sums when the routed kernel
    can load them as one block (split_k a power of two), which adds them up and rounds them as
    the reduction would; other splits (3) are reduced before. Outputs equal the reference."""
    rng = np.random.default_rng(31)
    m, e, k = 3, 8, 64
    x = normal(rng, (m, k), dtype)
    ids, gates = random_route(rng, m, 2, e)
    slot_experts, slot_weights = route_slots(ids, gates, e, SCALE)
    a, b = lora_stacks(rng, e, N, dtype, k=k)
    w = stack(rng, N, dtype, k=k)
    (xa,) = lora_shrink_group(x, (a,), 1, slot_experts, slot_weights, interpret=INTERPRET)
    ref = routed_matmul_reference(x, w, 2, xa, b, 1, slot_experts)
    for split_k, partial in ((2, True), (4, True), (1, False)):
        (raw,) = lora_shrink_group(x, (a,), 1, slot_experts, slot_weights, packed=True,
                                   block_sizes=ShrinkBlockSizes(block_k=16, split_k=split_k),
                                   interpret=INTERPRET)
        assert raw.partial == partial
        if partial:
            assert raw.xa.shape == (split_k, 16, m * 2 * RANK) and raw.xa.dtype == jnp.float32
        got = routed_matmul(x, w, 2, raw, b, 1, slot_experts, **INTERPRET16)
        assert rel_err(got, ref) < TOL[dtype]
    x48 = x[:, :48]
    (raw,) = lora_shrink_group(x48, (a[:, :, :48],), 1, slot_experts, slot_weights,
                               packed=True, interpret=INTERPRET,
                               block_sizes=ShrinkBlockSizes(block_k=16, split_k=3))
    assert not raw.partial and raw.xa.dtype == dtype


# (M, E, k, split_k): gather with more splits than slots (1 x 2 slots over 3 splits), dense
# slots in one dot over 3 splits (E 8), more gather slots per program than are unrolled (34),
# dense slots in 4 dots of 128 rows in an uneven last round (E 32 over 3 splits) and in 16 dots,
# more than are unrolled (E 128).
@pytest.mark.parametrize("m,e,k,split_k", [(1, 8, 2, 3), (5, 8, 2, 3), (17, 128, 2, 1),
                                           (3, 8, 2, 2), (20, 32, 2, 3), (64, 128, 2, 1)])
def test_expansion_spread_over_the_splits(m, e, k, split_k):
    """Group g of the expansion (a slot, or with dense slots up to 128 rows of B) is expanded by
    split g % split_k: with a given xa (plain, or a split shrink's partial sums handed on
    packed) each slot's term counts exactly once."""
    rng = np.random.default_rng(4000 * m + e + 10 * split_k)
    depth = 96  # K that 2 shrink splits and 3 projection splits of 16-row steps both tile
    x = normal(rng, (m, depth), jnp.float32)
    slot_experts, slot_weights = route_slots(*random_route(rng, m, k, e), e, SCALE)
    w, wg = (stack(rng, N, jnp.float32, k=depth) for _ in range(2))
    (a, b), (ag, bg) = (lora_stacks(rng, e, N, jnp.float32, k=depth) for _ in range(2))
    xa = lora_shrink(x, a, 1, slot_experts, slot_weights)
    (partial,) = lora_shrink_group(x, (a,), 1, slot_experts, slot_weights, packed=True,
                                   block_sizes=ShrinkBlockSizes(block_k=16, split_k=2),
                                   interpret=INTERPRET)
    assert partial.partial
    blocks = BlockSizes(block_n=16, block_k=16, split_k=split_k)
    # Gather slots of few rows may also expand row by row in registers ("rows").
    expands = ("dot", "rows") if m * k < e and m <= MAX_EXPAND_ROWS else ("dot",)
    ref = routed_matmul_reference(x, w, 2, xa, b, 1, slot_experts)
    for given, expand in itertools.product((xa, partial), expands):
        got = routed_matmul(x, w, 2, given, b, 1, slot_experts, block_sizes=blocks,
                            expand=expand, interpret=INTERPRET)
        assert rel_err(got, ref) < TOL[jnp.float32], expand
    xag = lora_shrink(x, ag, 1, slot_experts, slot_weights)
    ref = routed_gate_up_matmul_reference(x, w, wg, 2, (xa, xag), (b, bg), 1, slot_experts)
    for expand in expands:
        got = routed_gate_up_matmul(x, w, wg, 2, (xa, xag), (b, bg), 1, slot_experts,
                                    block_sizes=blocks, expand=expand, interpret=INTERPRET)
        assert rel_err(got, ref) < TOL[jnp.float32], expand


# (M, E, k, expand): gather (2 slots), in registers too, gather slots in groups of 4 + 2 and
# of 8 + 2, dense (8), dense groups in a loop (128 slots: 16 groups), two row blocks.
@pytest.mark.parametrize("m,e,k,dtype,expand", [
    (1, 8, 2, jnp.float32, "dot"), (2, 8, 2, jnp.bfloat16, "rows"),
    (3, 8, 2, jnp.float32, "dot"), (5, 32, 2, jnp.float32, "dot"),
    (5, 8, 2, jnp.bfloat16, "dot"), (17, 128, 2, jnp.float32, "dot"),
    (70, 8, 1, jnp.float32, "dot"),
])
def test_down_shrink_in_the_gate_up_epilogue(m, e, k, dtype, expand):
    """The gate/up kernel's epilogue adds every column block's share of the down projection's
    shrink; the routed down projection takes the sums as they are and equals the reference."""
    rng = np.random.default_rng(5000 * m + e)
    f = 48  # three column blocks of 16
    x, slot_experts, slot_weights = slots_and_x(rng, m, k, e, dtype)
    wg, wu = stack(rng, f, dtype), stack(rng, f, dtype)
    wd = normal(rng, (LAYERS, f, N), dtype, std=f**-0.5)
    biases = tuple(normal(rng, (LAYERS, f), dtype) for _ in range(2))
    (ag, bg), (au, bu) = lora_stacks(rng, e, f, dtype), lora_stacks(rng, e, f, dtype)
    ad, bd = lora_stacks(rng, e, N, dtype, k=f)
    xas = tuple(lora_shrink(x, a, 1, slot_experts, slot_weights) for a in (ag, au))
    act, xa_down = routed_gate_up_matmul(x, wg, wu, 2, xas, (bg, bu), 1, slot_experts, *biases,
                                         down_shrink=(ad, slot_weights), expand=expand,
                                         **INTERPRET16)
    act_ref, xa_ref = routed_gate_up_matmul_reference(x, wg, wu, 2, xas, (bg, bu), 1,
                                                      slot_experts, *biases,
                                                      down_shrink=(ad, slot_weights))
    assert rel_err(act, act_ref) < TOL[dtype]
    assert xa_down.partial and xa_down.xa.dtype == jnp.float32
    assert rel_err(xa_down.xa[0, :m].reshape(xa_ref.shape), xa_ref) < TOL[dtype]
    got = routed_matmul(act, wd, 2, xa_down, bd, 1, slot_experts, expand=expand, **INTERPRET16)
    ref = routed_matmul_reference(act_ref, wd, 2, xa_ref, bd, 1, slot_experts)
    assert rel_err(got, ref) < TOL[dtype]
    with pytest.raises(ValueError, match="a stack"):
        routed_gate_up_matmul(x, wg, wu, 2, xas, (bg, bu), 1, slot_experts,
                              down_shrink=(ad[:, :, :16], slot_weights), interpret=INTERPRET)
    with pytest.raises(ValueError, match="split_k == 1"):
        routed_gate_up_matmul(x, wg, wu, 2, xas, (bg, bu), 1, slot_experts,
                              down_shrink=(ad, slot_weights), interpret=INTERPRET,
                              block_sizes=BlockSizes(block_n=16, block_k=16, split_k=3))


def test_slot_groups_are_blocks_in_order():
    """The epilogue's slot groups: in order, each a power-of-two block of columns, at most 128
    wide."""
    from loraswitch_jax.pallas._slots import slot_groups

    assert slot_groups(8, 16) == [(0, 8)]
    assert slot_groups(6, 16) == [(0, 4), (4, 2)]
    assert slot_groups(1, 16) == [(0, 1)]
    assert slot_groups(128, 16) == [(8 * g, 8) for g in range(16)]
    assert slot_groups(13, 32) == [(0, 4), (4, 4), (8, 4), (12, 1)]
    for slots, rank in ((126, 16), (7, 64), (3, 128)):
        groups = slot_groups(slots, rank)
        assert [f for f, _ in groups] == list(np.cumsum([0] + [c for _, c in groups])[:-1])
        assert sum(c for _, c in groups) == slots
        assert all(c & (c - 1) == 0 and c * rank <= 128 or c == 1 for _, c in groups)


def test_expansion_unrolls_within_shared_memory():
    """Dense expansion groups are unrolled only while their operands fit shared memory: 4 groups
    of split float32 xa (96 KiB each) failed to compile on an H100 at 7B shapes, E 128."""
    from loraswitch_jax.pallas._routed_kernels import unrolled

    assert unrolled(1, 10**6) and unrolled(4, 48 * 1024) and unrolled(8, 1024)
    assert not unrolled(4, 96 * 1024) and not unrolled(9, 1024)
