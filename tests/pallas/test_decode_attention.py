"""The decode-attention kernel against its jnp reference, and that against the model's attention.

Interpret mode starts the outputs as NaN, so a split no program writes fails the comparison.
Caches are random in every slot, the slots past each length too, so reading one shows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraswitch_jax.layers import attention
from loraswitch_jax.pallas.lora_shrink import lora_shrink, route_slots
from tests.helpers import rel_err
from tests.pallas.gpu_target import lower_for_gpu, triton_kernels
from tests.pallas.interpret import F32_TOL, INTERPRET
from loraswitch_jax.pallas.decode_attention import (
    AttentionBlocks,
    OShrink,
    decode_attention,
    decode_attention_reference,
    default_blocks,
    supports,
)

TOL = {jnp.float32: F32_TOL, jnp.bfloat16: 2e-2}


def operands(rng, b, h, kv, s, hd, dtype, layers=3):
    q = jnp.asarray(rng.standard_normal((b, h, hd)), dtype)
    k = jnp.asarray(rng.standard_normal((layers, b, s, kv, hd)), dtype)
    v = jnp.asarray(rng.standard_normal((layers, b, s, kv, hd)), dtype)
    return q, k, v


@pytest.mark.parametrize("b,h,kv,s,hd,lengths,dtype,blocks", [
    (1, 4, 4, 64, 16, (37,), jnp.float32, None),                      # MHA, one sequence
    (3, 8, 2, 48, 32, (1, 48, 17), jnp.float32, None),                # GQA, ragged, full, one slot
    (2, 6, 2, 64, 16, (64, 5), jnp.bfloat16, None),                   # G = 3 pads to 16 rows
    (2, 4, 1, 128, 16, (100, 33), jnp.float32,
     AttentionBlocks(block_s=16, num_splits=3)),                      # splits past a length
    (1, 2, 2, 32, 16, (32,), jnp.float32, AttentionBlocks(block_s=32, num_splits=1)),
])
def test_matches_reference(b, h, kv, s, hd, lengths, dtype, blocks):
    rng = np.random.default_rng(b * 100 + h + s)
    q, k, v = operands(rng, b, h, kv, s, hd, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    got = decode_attention(q, k, v, 2, lengths, blocks=blocks, interpret=INTERPRET)
    want = decode_attention_reference(q, k, v, 2, lengths)
    assert got.shape == (b, h * hd) and got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype]


def test_reference_is_the_models_attention():
    """The kernel module's own jnp reference equals ``layers.attention`` over ``cache[layer]``
    masked to the valid slots (GQA, ragged lengths)."""
    rng = np.random.default_rng(7)
    q, k, v = operands(rng, 3, 8, 2, 48, 32, jnp.float32)
    lengths = jnp.asarray([1, 48, 17], jnp.int32)
    visible = jnp.arange(48)[None, :] < lengths[:, None]
    want = attention(q[:, None], k[1], v[1], visible[:, None, :])[:, 0]
    assert rel_err(decode_attention_reference(q, k, v, 1, lengths), want) < 1e-6


def test_traced_layer_and_lengths_inside_a_loop():
    """Layer and lengths are data: one compiled kernel serves every layer of a fori_loop."""
    rng = np.random.default_rng(3)
    q, k, v = operands(rng, 2, 4, 2, 32, 16, jnp.float32)

    def run(attend):
        def body(layer, acc):
            lengths = jnp.asarray([5, 32], jnp.int32) - layer
            return acc + attend(q, k, v, layer, lengths)
        return jax.jit(lambda: jax.lax.fori_loop(0, 3, body, jnp.zeros((2, 64))))()

    got = run(lambda *a: decode_attention(*a, interpret=INTERPRET))
    assert rel_err(got, run(decode_attention_reference)) < F32_TOL


def test_default_blocks():
    # Llama-2-7B at batch 1, cache 1216: 19 steps of 64 slots spread over 9 splits
    assert default_blocks(1, 32, 1216) == AttentionBlocks(block_s=64, num_splits=9)
    assert default_blocks(64, 32, 1216).num_splits == 1  # 2048 programs already
    assert default_blocks(1, 8, 48) == AttentionBlocks(block_s=16, num_splits=3)
    assert supports(1216, 128) and not supports(1210, 128) and not supports(64, 96)


def test_lowers_to_triton():
    """The kernel lowers to Triton IR for a GPU at Llama-3-8B's shapes (GQA 32/8, hd 128), with
    a traced layer and lengths (a loop with data-dependent bounds)."""
    q = jax.ShapeDtypeStruct((2, 32, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 2, 1216, 8, 128), jnp.bfloat16)
    lowered = lower_for_gpu(jax.jit(decode_attention), q, cache, cache,
                            jax.ShapeDtypeStruct((), jnp.int32),
                            jax.ShapeDtypeStruct((2,), jnp.int32))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_rejects_bad_input():
    rng = np.random.default_rng(0)
    q, k, v = operands(rng, 2, 4, 2, 32, 16, jnp.float32)
    lengths = jnp.asarray([3, 4], jnp.int32)
    with pytest.raises(ValueError, match="does not match"):
        decode_attention(q[:, :3], k, v, 0, lengths, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"expected lengths \[B=2\]"):
        decode_attention(q, k, v, 0, lengths[:1], interpret=INTERPRET)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        decode_attention(q, k, v, 3, lengths, interpret=INTERPRET)
    with pytest.raises(ValueError, match="S % 16"):
        decode_attention(q, k[:, :, :30], v[:, :, :30], 0, lengths, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_s must be"):
        AttentionBlocks(block_s=24)
    with pytest.raises(ValueError, match="num_splits must be"):
        AttentionBlocks(num_splits=0)
    with pytest.raises(ValueError, match="must divide S=32"):
        decode_attention(q, k, v, 0, lengths, blocks=AttentionBlocks(block_s=64), interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, S=32\]"):
        decode_attention(q, k, v, 0, jnp.asarray([0, 4], jnp.int32), interpret=INTERPRET)


def test_traced_length_past_the_cache_reads_no_further():
    """A traced length above S (a step on a full cache) attends to all S slots, as the
    reference does, instead of reading past the sequence's slots."""
    rng = np.random.default_rng(4)
    q, k, v = operands(rng, 2, 4, 2, 32, 16, jnp.float32)
    lengths = jnp.asarray([33, 40], jnp.int32)
    got = jax.jit(lambda n: decode_attention(q, k, v, 1, n, interpret=INTERPRET))(lengths)
    assert rel_err(got, decode_attention_reference(q, k, v, 1, lengths)) < F32_TOL


# ---------------------------------------------------------------------------------------------
# o's shrink computed along (o_shrink)


def o_shrink(rng, b, h, hd, dtype, *, experts=8, k=2, rank=16, adapted_layers=2):
    """Random ``A_o`` and the gather slots of random routes (``b * k < experts``)."""
    a = jnp.asarray(rng.standard_normal((adapted_layers, experts, h * hd, rank)), dtype)
    ids = jnp.asarray(rng.integers(0, experts, (b, k)), jnp.int32)
    gates = jnp.asarray(rng.random((b, k)), jnp.float32)
    slot_experts, slot_weights = route_slots(ids, gates, experts, 0.5)
    assert slot_experts.shape == (b * k,)  # gather slots
    return OShrink(a, adapted_layers - 1, slot_experts, slot_weights)


def unpacked(xa, b):
    """The kernel's packed float32 sums ``[1, Mp, S r]`` as ``[B, S, r]``."""
    assert xa.partial and xa.xa.dtype == jnp.float32
    return xa.xa[0, :b].reshape(b, -1, 16)


@pytest.mark.parametrize("b,h,kv,s,hd,lengths,dtype,k,blocks", [
    (1, 4, 4, 64, 16, (37,), jnp.float32, 2, None),                   # MHA, one sequence, top-2
    (3, 8, 2, 48, 32, (1, 48, 17), jnp.float32, 2, None),             # GQA 4, ragged
    (2, 6, 2, 64, 16, (64, 5), jnp.bfloat16, 3, None),                # G 3, k 3 pads to 4 slots
    (2, 4, 1, 128, 16, (100, 33), jnp.float32, 1,
     AttentionBlocks(block_s=16, num_splits=3)),                      # splits past a length
    (2, 32, 2, 32, 16, (32, 9), jnp.float32, 2, None),                # G 16: tiles after the loop
])
def test_o_shrink_matches_reference(b, h, kv, s, hd, lengths, dtype, k, blocks):
    rng = np.random.default_rng(b * 100 + h + s + k)
    q, kc, vc = operands(rng, b, h, kv, s, hd, dtype)
    shrink = o_shrink(rng, b, h, hd, dtype, k=k)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, xa = decode_attention(q, kc, vc, 2, lengths, o_shrink=shrink, blocks=blocks,
                               interpret=INTERPRET)
    want_out, want_xa = decode_attention_reference(q, kc, vc, 2, lengths, o_shrink=shrink)
    assert rel_err(out, want_out) < TOL[dtype]
    assert rel_err(out, decode_attention(q, kc, vc, 2, lengths, blocks=blocks,
                                         interpret=INTERPRET)) < TOL[dtype]
    assert xa.xa.shape == (1, 16, b * k * 16) and want_xa.shape == (b, b * k, 16)
    assert rel_err(unpacked(xa, b), want_xa) < TOL[dtype]
    # Each row's slots of the other rows stay zero (their weights are zero).
    own = np.kron(np.eye(b), np.ones((1, k)))[..., None]
    assert not np.any(np.asarray(unpacked(xa, b)) * (1 - own))


def test_o_shrink_reference_is_lora_shrink_of_the_output():
    """The reference's xa is ``lora_shrink`` of the attended output (float32), as o's shrink
    launch computes it."""
    rng = np.random.default_rng(11)
    q, kc, vc = operands(rng, 2, 8, 2, 32, 16, jnp.float32)
    shrink = o_shrink(rng, 2, 8, 16, jnp.float32)
    lengths = jnp.asarray([3, 32], jnp.int32)
    out, xa = decode_attention_reference(q, kc, vc, 0, lengths, o_shrink=shrink)
    want = lora_shrink(decode_attention_reference(q, kc, vc, 0, lengths), shrink.a, 1,
                       shrink.slot_experts, shrink.slot_weights)
    assert rel_err(xa, want) < 1e-6


def test_o_shrink_with_traced_routes_inside_a_loop():
    """Adapted layer, slot experts and weights are data: one compiled kernel per loop."""
    rng = np.random.default_rng(5)
    q, kc, vc = operands(rng, 2, 4, 2, 32, 16, jnp.float32)
    shrink = o_shrink(rng, 2, 4, 16, jnp.float32)
    lengths = jnp.asarray([5, 32], jnp.int32)

    def run(attend):
        def body(layer, acc):
            s = OShrink(shrink.a, layer % 2, (shrink.slot_experts + layer) % 8,
                        shrink.slot_weights * (layer + 1))
            out, xa = attend(q, kc, vc, layer, lengths, s)
            return acc[0] + out, acc[1] + xa
        return jax.jit(lambda: jax.lax.fori_loop(
            0, 3, body, (jnp.zeros((2, 64)), jnp.zeros((2, 4, 16)))))()

    got = run(lambda q, k, v, layer, n, s: (lambda o: (o[0], unpacked(o[1], 2)))(
        decode_attention(q, k, v, layer, n, o_shrink=s, interpret=INTERPRET)))
    want = run(lambda *a: decode_attention_reference(*a[:5], o_shrink=a[5]))
    assert rel_err(got[0], want[0]) < F32_TOL and rel_err(got[1], want[1]) < F32_TOL


def test_o_shrink_lowers_to_triton():
    """With o's shrink the kernel lowers at Llama-2-7B's shapes (MHA, A_o tiles loaded before
    the loop) and Llama-3-8B's (GQA 32/8, tiles loaded after it), top-2 and top-3."""
    for kv, k in ((32, 2), (8, 2), (8, 3)):
        b = 2
        args = (jax.ShapeDtypeStruct((b, 32, 128), jnp.bfloat16),
                jax.ShapeDtypeStruct((4, b, 1216, kv, 128), jnp.bfloat16),
                jax.ShapeDtypeStruct((4, b, 1216, kv, 128), jnp.bfloat16),
                jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
                jax.ShapeDtypeStruct((3, 8, 32 * 128, 16), jnp.bfloat16),
                jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((b * k,), jnp.int32),
                jax.ShapeDtypeStruct((b, b * k), jnp.float32))
        lowered = lower_for_gpu(
            jax.jit(lambda q, kc, vc, layer, n, *s: decode_attention(q, kc, vc, layer, n,
                                                                     o_shrink=OShrink(*s))),
            *args)
        assert "decode_attention" in " ".join(triton_kernels(lowered.as_text())), (kv, k)


def test_o_shrink_rejects_bad_input():
    rng = np.random.default_rng(0)
    q, kc, vc = operands(rng, 2, 4, 2, 32, 16, jnp.float32)
    lengths = jnp.asarray([3, 4], jnp.int32)
    good = o_shrink(rng, 2, 4, 16, jnp.float32)

    def attend(**changes):
        return decode_attention(q, kc, vc, 0, lengths, interpret=INTERPRET,
                                o_shrink=dataclasses.replace(good, **changes))

    with pytest.raises(ValueError, match=r"o_shrink.a \[La, E, H\*hd=64, r\]"):
        attend(a=good.a[:, :, :32])
    with pytest.raises(ValueError, match="rank r=8"):
        attend(a=good.a[..., :8])
    with pytest.raises(ValueError, match="gather slots"):  # dense slots: S == E
        attend(**dict(zip(("slot_experts", "slot_weights"),
                          route_slots(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4)), 8, 1.0))))
    with pytest.raises(ValueError, match="zero outside each row's own"):
        attend(slot_weights=jnp.ones_like(good.slot_weights))
    with pytest.raises(ValueError, match=r"slot_weights \[M, S\]"):
        attend(slot_weights=good.slot_weights[:1])
    with pytest.raises(ValueError, match="adapted_layer 2 out of range"):
        attend(adapted_layer=2)
