"""Expert slots and the LoRA shrink: route_slots, lora_shrink and the lora_shrink_group kernel
(interpret mode) against its jnp reference.

Interpret mode starts every output as NaN, so an output element that no program writes fails
the comparison (``rel_err`` is NaN). Every case draws fresh operands from its own seed. The
operand helpers here also serve ``test_routed_projections``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import rel_err
from tests.pallas.gpu_target import lower_for_gpu
from tests.pallas.interpret import F32_TOL, INTERPRET
from loraswitch_jax.pallas._blocks import row_blocks
from loraswitch_jax.pallas.lora_shrink import (
    ShrinkBlockSizes,
    default_shrink_block_sizes,
    lora_shrink,
    lora_shrink_group,
    lora_shrink_group_reference,
    route_slots,
)

TOL = {jnp.float32: F32_TOL, jnp.bfloat16: 1e-2}
LAYERS, ADAPTED = 3, 2  # adapters on the last two layers
K, N, RANK = 48, 80, 16  # odd but supported: 3 K blocks and 5 column blocks of 16
SCALE = 2.0


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


def lora_stacks(rng, e, n, dtype, k=K, rank=RANK):
    """``a [La, E, K, r]`` and ``b [La, E, r, N]`` scaled so the LoRA term is as large as x @ W."""
    return (normal(rng, (ADAPTED, e, k, rank), dtype, std=k**-0.5),
            normal(rng, (ADAPTED, e, rank, n), dtype, std=rank**-0.5))


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
    assert rel_err(xa, want) < F32_TOL


# ranks: one A stack per projection of the group; 70 rows take two row blocks of 64.
@pytest.mark.parametrize("m,e,k,dtype,ranks,blocks", [
    (1, 8, 2, jnp.float32, (16, 32, 16), None),  # gather, default blocks
    (5, 8, 2, jnp.bfloat16, (16, 16), ShrinkBlockSizes(block_k=16, split_k=3)),  # dense
    (3, 128, 1, jnp.bfloat16, (16,), None),  # gather
    (70, 8, 1, jnp.float32, (32,), ShrinkBlockSizes(block_k=16)),  # dense
])
def test_lora_shrink_group_matches_reference(m, e, k, dtype, ranks, blocks):
    rng = np.random.default_rng(700 * m + e + len(ranks))
    x, slot_experts, slot_weights = slots_and_x(rng, m, k, e, dtype)
    a = tuple(lora_stacks(rng, e, N, dtype, rank=r)[0] for r in ranks)
    got = lora_shrink_group(x, a, ADAPTED - 1, slot_experts, slot_weights, block_sizes=blocks,
                            interpret=INTERPRET)
    ref = lora_shrink_group_reference(x, a, ADAPTED - 1, slot_experts, slot_weights)
    assert len(got) == len(a)
    for g, r, rank in zip(got, ref, ranks):
        assert g.shape == (m, slot_experts.shape[0], rank) and g.dtype == dtype
        assert rel_err(g, r) < TOL[dtype]
    # The kernels' own layout: packed, rows padded to the row block, the same values.
    raw = lora_shrink_group(x, a, ADAPTED - 1, slot_experts, slot_weights, block_sizes=blocks,
                            packed=True, interpret=INTERPRET)
    for g, r in zip(raw, got):
        assert g.xa.shape == (row_blocks(m)[1], slot_experts.shape[0] * r.shape[2])
        np.testing.assert_array_equal(g.xa[:m].reshape(r.shape), r)


# ---------------------------------------------------------------------------------------------
# Triton lowering (no GPU needed), block sizes and errors


def test_lowers_to_triton():
    """The grouped shrink lowers to Triton IR for a GPU, with rows that pad to a power of two
    (40 -> 64), a slot count that is no power of two (6) and split K, so block shapes Triton
    rejects (not powers of two) fail here on CPU."""
    dt = jnp.bfloat16
    x = jnp.zeros((40, 256), dt)
    a = jnp.zeros((2, 8, 256, 32), dt)

    def step(x, six_experts, six_weights, layer):
        six = (layer, six_experts, six_weights)
        xa_q, xa_v = lora_shrink_group(x, (a, a), *six)
        (xa_d,) = lora_shrink_group(x, (a,), *six, block_sizes=ShrinkBlockSizes(block_k=64,
                                                                                split_k=2))
        return xa_q + xa_v + xa_d

    hlo = lower_for_gpu(
        jax.jit(step), x, jnp.arange(6, dtype=jnp.int32), jnp.zeros((40, 6), jnp.float32),
        jnp.int32(1),
    ).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 2


def test_default_shrink_block_sizes():
    """Deep K steps with A tiles of at most 8192 elements, tiling Llama-2-7B's K; no split
    unless asked (``programs``), then split so that no program runs more than two steps."""
    assert default_shrink_block_sizes(4096, 16) == ShrinkBlockSizes(block_k=512, split_k=1)
    assert default_shrink_block_sizes(4096, 16, programs=1) == ShrinkBlockSizes(block_k=512,
                                                                                 split_k=4)
    assert default_shrink_block_sizes(4096, 64, programs=1) == ShrinkBlockSizes(block_k=128,
                                                                                 split_k=16)
    # 11008 = 43 * 256: 43 steps, 43 programs of one step
    assert default_shrink_block_sizes(11008, 16, programs=1) == ShrinkBlockSizes(block_k=256,
                                                                                  split_k=43)
    assert default_shrink_block_sizes(48, 1024, programs=1) == ShrinkBlockSizes(block_k=16,
                                                                                 split_k=3)
    assert default_shrink_block_sizes(32, 16, programs=1) == ShrinkBlockSizes(block_k=32)
    # Decode (q, k, v of one row, top-2: 6 programs) splits; a full grid does not.
    assert default_shrink_block_sizes(11008, 16, 16, 3, programs=6).split_k == 43
    assert default_shrink_block_sizes(11008, 16, 64, 3, programs=3 * 8 * 128).split_k == 1
    # Room for 264 // 100 = 2 splits: the best that divides 43 steps is no split.
    assert default_shrink_block_sizes(11008, 16, 64, 1, programs=100).split_k == 1
    assert default_shrink_block_sizes(4096, 16, 64, 1, programs=100).split_k == 2


def test_rejects_bad_input():
    rng = np.random.default_rng(9)
    e = 8
    x, slot_experts, slot_weights = slots_and_x(rng, 2, 2, e, jnp.float32)
    a, _ = lora_stacks(rng, e, N, jnp.float32)
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

    def group(a=(a, a), adapted_layer=1, slot_weights=slot_weights, **blocks):
        return lora_shrink_group(x, a, adapted_layer, slot_experts, slot_weights,
                                 interpret=INTERPRET, **blocks)

    with pytest.raises(ValueError, match="at least one a stack"):
        group(a=())
    with pytest.raises(ValueError, match=r"expected a\[1\] \[La, E, K=48, r\]"):
        group(a=(a, a[:, :, :32]))
    with pytest.raises(ValueError, match="rank r=8 must be a power of two"):
        group(a=(a[..., :8],))
    with pytest.raises(ValueError, match="different"):
        group(a=(a, a[:, :4]))
    with pytest.raises(ValueError, match="expected slot_weights"):
        group(slot_weights=slot_weights[:1])
    with pytest.raises(ValueError, match="adapted_layer 2 out of range"):
        group(adapted_layer=ADAPTED)
    with pytest.raises(ValueError, match="does not tile K=48"):
        group(block_sizes=ShrinkBlockSizes(block_k=32))
    with pytest.raises(ValueError, match="K=40 must be a multiple of 16"):
        lora_shrink_group(x[:, :40], (a[:, :, :40],), 1, slot_experts, slot_weights)
