"""The routed projection kernels' operand checks (``_routed_checks``): one clear error per bad
input, before any kernel runs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from loraswitch_jax.pallas.lora_shrink import PackedXa, lora_shrink
from loraswitch_jax.pallas.routed_projections import (
    BlockSizes,
    routed_gate_up_matmul,
    routed_matmul,
    routed_qkv_matmul,
)
from tests.pallas.interpret import INTERPRET
from tests.pallas.test_lora_shrink import ADAPTED, LAYERS, N, lora_stacks, slots_and_x
from tests.pallas.test_routed_projections import BLOCKS16, stack


def test_rejects_bad_input():
    rng = np.random.default_rng(9)
    e = 8
    x, slot_experts, slot_weights = slots_and_x(rng, 2, 2, e, jnp.float32)
    w = stack(rng, N, jnp.float32)
    a, b = lora_stacks(rng, e, N, jnp.float32)
    xa = lora_shrink(x, a, 1, slot_experts, slot_weights)

    def call(**changes):
        args = dict(x=x, w=w, layer=2, xa=xa, b=b, adapted_layer=1, slot_experts=slot_experts,
                    block_sizes=BLOCKS16, interpret=INTERPRET) | changes
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
    with pytest.raises(ValueError, match=r"expected the packed xa of w \[Mp=16, S\*r=64\]"):
        call(xa=PackedXa(xa.reshape(2, -1)))  # rows not padded to the row block
    with pytest.raises(ValueError, match="expected x's dtype"):
        call(xa=xa.astype(jnp.bfloat16))
    padded = jnp.zeros((2, 16, 4 * 16), jnp.bfloat16)  # partial sums must stay float32; S = 4
    with pytest.raises(ValueError, match="partial sums of w's xa are bfloat16, expected float32"):
        call(xa=PackedXa(padded))
    with pytest.raises(ValueError, match="rank r=8 must be a power of two"):
        call(xa=xa[..., :8], b=b[:, :, :8])
    with pytest.raises(ValueError, match=r"expected the b stack of w \[La, E, r, N=80\]"):
        call(b=b[..., :64])
    with pytest.raises(ValueError, match=r"expected the xa of w \[M=2, S=4, r=32\] \(r from"):
        call(b=jnp.concatenate([b, b], axis=2))
    # Dense slots (S == E) are read as B[layer] whole: slot e must be expert e.
    x4, dense_experts, dense_weights = slots_and_x(rng, 4, 2, e, jnp.float32)
    xa4 = lora_shrink(x4, a, 1, dense_experts, dense_weights)
    with pytest.raises(ValueError, match="slot e must be expert e"):
        call(x=x4, xa=xa4, slot_experts=dense_experts[::-1])
    with pytest.raises(ValueError, match="expand='rows' needs gather slots"):
        call(x=x4, xa=xa4, slot_experts=dense_experts, expand="rows")
    with pytest.raises(ValueError, match="unknown expand 'registers'"):
        call(expand="registers")
    with pytest.raises(ValueError, match=r"expected the bias of w \[L, N\]"):
        call(bias=jnp.zeros((LAYERS, 64)))
    with pytest.raises(ValueError, match="multiples of 16"):
        call(x=x[:, :40], w=w[:, :40])
    with pytest.raises(ValueError, match="does not tile N"):
        call(block_sizes=BlockSizes(block_n=32, block_k=16))

    ws = (w, w[..., :32], w[..., :32])
    with pytest.raises(ValueError, match="expected 3 xas"):
        routed_qkv_matmul(x, *ws, 0, (xa,), (b,), 0, slot_experts, interpret=INTERPRET)
    with pytest.raises(ValueError, match="pass both its xa and its b stack"):
        routed_qkv_matmul(x, *ws, 0, (xa, None, None), (None, None, None), 0, slot_experts,
                          block_sizes=BLOCKS16, interpret=INTERPRET)
    with pytest.raises(ValueError, match="different"):
        routed_qkv_matmul(x, *ws, 0, (xa, None, xa), (b, None, b[:1, :, :, :32]), 0, slot_experts,
                          block_sizes=BLOCKS16, interpret=INTERPRET)
    with pytest.raises(ValueError, match="one shape"):
        routed_gate_up_matmul(x, w, w[..., :64], 0, (None, None), (None, None), 0, slot_experts,
                              block_sizes=BLOCKS16, interpret=INTERPRET)
