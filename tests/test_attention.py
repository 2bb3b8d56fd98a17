"""Blockwise (flash-style) training attention equals the dense attention, values and gradients,
and never holds the T x T scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax.attention import CausalMask, attend, blockwise_attention, causal_attention
from loraswitch_jax.layers import attention, attention_mask
from tests.helpers import jit_forward, make_adapter, random_params, rel_err


def _qkv(B, T, H, KV, hd, seed=0):
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in ((B, T, H, hd), (B, T, KV, hd), (B, T, KV, hd)))


def _packed(B, T, seed=0):
    """Sorted segment ids with several segments a row (packing), some of length 1."""
    rng = np.random.RandomState(seed)
    return jnp.asarray(np.sort(rng.randint(0, 5, (B, T)), axis=1), jnp.int32)


def _dense(q, k, v, seg):
    B, T = q.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    return attention(q, k, v, attention_mask(idx, idx, seg, seg))


# Odd lengths (padding), a last block of one token, one block; MHA, GQA and one KV head.
@pytest.mark.parametrize("T, chunk, packed, H, KV", [
    (37, 8, True, 4, 2), (37, 8, False, 4, 2), (64, 16, True, 4, 4), (33, 32, True, 6, 1),
    (5, 16, False, 6, 1),
])
def test_blockwise_equals_dense_values_and_gradients(T, chunk, packed, H, KV):
    q, k, v = _qkv(2, T, H, KV, 8)
    seg = _packed(2, T) if packed else None
    w = jnp.asarray(np.random.RandomState(1).standard_normal((2, T, H * 8)), jnp.float32)
    dense = jax.jit(lambda q, k, v: _dense(q, k, v, seg))
    block = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, seg, chunk=chunk))
    want, got = dense(q, k, v), block(q, k, v)
    assert got.shape == (2, T, H * 8) and got.dtype == q.dtype
    assert rel_err(got, want) < 1e-5
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
             for f in (dense, block)]
    for g_want, g_got in zip(*grads):
        assert rel_err(g_got, g_want) < 1e-5


def test_attend_dispatches_on_the_mask():
    q, k, v = _qkv(1, 24, 4, 2, 8)
    seg = _packed(1, 24)
    want = _dense(q, k, v, seg)
    assert rel_err(attend(q, k, v, CausalMask(seg, chunk=8)), want) < 1e-5
    assert rel_err(attend(q, k, v, CausalMask(seg, chunk=64)), want) < 1e-5  # dense below chunk
    idx = jnp.broadcast_to(jnp.arange(24), (1, 24))
    assert rel_err(attend(q, k, v, attention_mask(idx, idx, seg, seg)), want) < 1e-5


def test_bad_inputs_are_refused():
    q, k, v = _qkv(1, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        blockwise_attention(q, k, v, chunk=0)
    with pytest.raises(ValueError, match="do not fit q"):
        blockwise_attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="H a multiple of KV"):
        blockwise_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="segment_ids must be"):
        blockwise_attention(q, k, v, jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        CausalMask(None, 8, "flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' cannot run here: it needs a GPU"):
            causal_attention(q, k, v, implementation="cudnn")


def test_backward_at_2048_tokens_never_holds_the_scores():
    """The gradient of T=2048 attention needs far less scratch than one T x T x H float32."""
    T, H, KV, hd, chunk = 2048, 4, 2, 8, 256
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, T, H, hd), (1, T, KV, hd),
                                                               (1, T, KV, hd)))

    def temp_bytes(f):
        grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores = T * T * H * 4
    dense = temp_bytes(lambda q, k, v: _dense(q, k, v, None))
    block = temp_bytes(lambda q, k, v: blockwise_attention(q, k, v, chunk=chunk))
    print(f"attention grad temp bytes at T={T}: dense {dense / 2**20:.1f} MiB, "
          f"blockwise {block / 2**20:.1f} MiB, one score matrix {scores / 2**20:.0f} MiB")
    assert dense >= scores  # the dense path does hold them (the measurement sees it)
    assert block < scores / 8


def test_forward_uses_blockwise_attention_past_the_chunk(llama3_case):
    """Model logits with blockwise attention (chunk below T) equal dense ones, with packing."""
    cfg = llama3_case.cfg
    params = random_params(cfg, 3, jnp.float32)
    adapter = make_adapter(cfg, seed=4, mode="switch", num_experts=4, top_k=2)
    rng = np.random.RandomState(5)
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 45)), jnp.int32)
    seg = _packed(2, 45, seed=6)
    fwd = jax.jit(lj.forward, static_argnames=("cfg", "attention_chunk"))
    for segment_ids in (None, seg):
        want = fwd(params, tokens, cfg, adapter=adapter, segment_ids=segment_ids,
                   attention_chunk=None)
        got = fwd(params, tokens, cfg, adapter=adapter, segment_ids=segment_ids,
                  attention_chunk=16)
        assert rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match="attention_chunk must be an int >= 1"):
        lj.forward(params, tokens, cfg, attention_chunk=0)
    with pytest.raises(ValueError, match="unknown attention_impl"):
        lj.forward(params, tokens, cfg, attention_impl="flash")
