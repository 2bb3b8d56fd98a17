"""The RMSNorm + LoRA shrink kernel (interpret mode) against ``layers.rms_norm`` and
``lora_shrink``, and its output through the routed q/k/v kernel.

Interpret mode starts every output as NaN, so an element that no program writes fails the
comparison. Every case draws fresh operands from its own seed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from loraswitch_jax.pallas.norm_shrink import (
    chunks,
    rms_norm_shrink,
    rms_norm_shrink_reference,
    supports,
)
from loraswitch_jax.pallas.lora_shrink import route_slots
from loraswitch_jax.pallas.routed_projections import routed_qkv_matmul, routed_qkv_matmul_reference
from test_lora_shrink import ADAPTED, LAYERS, RANK, TOL, lora_stacks, normal, random_route

D = 64  # a power of two: 4 chunks of 16 columns
EPS = 1e-5


def operands(rng, m, k, e, dtype, ranks=(RANK, RANK, 2 * RANK)):
    h = normal(rng, (m, D), dtype, std=3.0)
    weight = normal(rng, (LAYERS, D), dtype)
    stacks = tuple(lora_stacks(rng, e, 16, dtype, k=D, rank=r)[0] for r in ranks)
    slot_experts, slot_weights = route_slots(*random_route(rng, m, k, e), e, 2.0)
    return h, weight, stacks, slot_experts, slot_weights


def summed(xa, m, like):
    """A packed partial shrink ``[chunks, Mp, S r]`` as ``lora_shrink`` returns it."""
    return xa.xa.sum(axis=0)[:m].reshape(like.shape)


# (M, E, k): gather (2 slots; 6 slots: groups of 4 and 2), dense (8), 128 dense slots (16 groups,
# a loop), rows past one block of 16 (two blocks, the last partly padding).
@pytest.mark.parametrize("m,e,k,dtype", [
    (1, 8, 2, jnp.float32), (3, 8, 2, jnp.bfloat16), (5, 8, 2, jnp.float32),
    (20, 128, 2, jnp.float32), (40, 8, 1, jnp.bfloat16), (1, 128, 1, jnp.float32),
])
def test_equals_the_norm_and_the_shrink(m, e, k, dtype):
    rng = np.random.default_rng(100 * m + e + k)
    h, weight, stacks, slot_experts, slot_weights = operands(rng, m, k, e, dtype)
    x, xas = rms_norm_shrink(h, weight, 2, EPS, stacks, 1, slot_experts, slot_weights,
                             interpret=True)
    x_ref, xas_ref = rms_norm_shrink_reference(h, weight, 2, EPS, stacks, 1, slot_experts,
                                               slot_weights)
    assert x.shape == (m, D) and x.dtype == dtype
    assert rel_err(x, x_ref) < TOL[dtype]
    for xa, xa_ref in zip(xas, xas_ref):
        assert xa.partial and xa.xa.shape[0] == chunks(D) and xa.xa.dtype == jnp.float32
        assert rel_err(summed(xa, m, xa_ref), xa_ref) < TOL[dtype]


def test_zeros_for_the_down_shrink():
    """With zeros_rank the kernel also writes the zeros where the gate/up epilogue adds up the
    down projection's shrink (interpret mode starts outputs as NaN: every element is written)."""
    rng = np.random.default_rng(11)
    for m, e, k in ((3, 8, 2), (20, 8, 2)):  # gather (6 slots: groups 4 + 2), dense
        h, weight, stacks, slot_experts, slot_weights = operands(rng, m, k, e, jnp.float32)
        x, xas, zeros = rms_norm_shrink(h, weight, 2, EPS, stacks, 1, slot_experts, slot_weights,
                                        zeros_rank=32, interpret=True)
        mp = 16 * -(-m // 16)
        assert zeros.shape == (mp, slot_experts.shape[0] * 32) and zeros.dtype == jnp.float32
        assert not np.asarray(zeros).any()
        x2, xas2 = rms_norm_shrink(h, weight, 2, EPS, stacks, 1, slot_experts, slot_weights,
                                   interpret=True)
        assert np.array_equal(x, x2) and all(np.array_equal(a.xa, b.xa) for a, b in zip(xas, xas2))


def test_feeds_the_routed_kernels():
    """The packed partial sums go to the routed q/k/v kernel as they are."""
    rng = np.random.default_rng(7)
    m, e, k, dtype = 3, 8, 2, jnp.float32
    h, weight, stacks, slot_experts, slot_weights = operands(rng, m, k, e, dtype,
                                                             ranks=(RANK,) * 3)
    ws = tuple(normal(rng, (LAYERS, D, 32), dtype, std=D**-0.5) for _ in range(3))
    bs = tuple(lora_stacks(rng, e, 32, dtype, k=D)[1] for _ in range(3))
    x, xas = rms_norm_shrink(h, weight, 1, EPS, stacks, ADAPTED - 1, slot_experts, slot_weights,
                             interpret=True)
    got = routed_qkv_matmul(x, *ws, 1, xas, bs, ADAPTED - 1, slot_experts, interpret=True)
    x_ref, xas_ref = rms_norm_shrink_reference(h, weight, 1, EPS, stacks, ADAPTED - 1,
                                               slot_experts, slot_weights)
    want = routed_qkv_matmul_reference(x_ref, *ws, 1, xas_ref, bs, ADAPTED - 1, slot_experts)
    for y, y_ref in zip(got, want):
        assert rel_err(y, y_ref) < TOL[dtype]


def test_chunks_and_supports():
    assert chunks(4096) == 16 and chunks(2048) == 16 and chunks(64) == 4 and chunks(16) == 1
    assert chunks(5120) == 0 and chunks(48) == 0
    assert supports(4096, 16, 32) and not supports(4096, 24) and not supports(5120, 16)


def test_rejects_bad_input():
    rng = np.random.default_rng(3)
    h, weight, stacks, slot_experts, slot_weights = operands(rng, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm_shrink(h[:, :48], weight[:, :48], 0, EPS, tuple(a[:, :, :48] for a in stacks), 0,
                        slot_experts, slot_weights, interpret=True)
    with pytest.raises(ValueError, match="norm's weight"):
        rms_norm_shrink(h, weight[:, :32], 0, EPS, stacks, 0, slot_experts, slot_weights,
                        interpret=True)
    with pytest.raises(ValueError, match=r"a\[1\]"):
        rms_norm_shrink(h, weight, 0, EPS, (stacks[0], stacks[1][:, :, :32]), 0, slot_experts,
                        slot_weights, interpret=True)
    with pytest.raises(ValueError, match="at least one"):
        rms_norm_shrink(h, weight, 0, EPS, (), 0, slot_experts, slot_weights, interpret=True)
    with pytest.raises(ValueError, match="slot_weights"):
        rms_norm_shrink(h, weight, 0, EPS, stacks, 0, slot_experts, slot_weights[:1],
                        interpret=True)
    with pytest.raises(ValueError, match="layer"):
        rms_norm_shrink(h, weight, LAYERS, EPS, stacks, 0, slot_experts, slot_weights,
                        interpret=True)
