"""Attention of one new token per sequence over a stacked KV cache read in place (Pallas, Triton).

Why a kernel: in decode each layer attends over ``cache.k[layer]`` and ``cache.v[layer]`` of the
stacked ``[L, B, S, KV, hd]`` cache that the token loop carries; XLA may copy such a slice inside
a ``while_loop`` before reading it, as it does the weights' slices (``stacked_matmul``). This
kernel takes the whole cache and the layer as data, reads only each sequence's valid slots
(``lengths``), and fuses the scores, the softmax and the weighted sum (an online softmax, as in
flash-decoding). The slots of a (sequence, kv head) are split over ``num_splits`` programs so that
batch 1 still fills the GPU; XLA combines the splits' partial results (one small fusion).

``ops`` runs it for decode on a GPU wherever :func:`supports` says so (measured: ``tuned.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._blocks import compiler_params, is_block, largest_divisor
from ._checks import check_layer, is_concrete
from ._tiles import SCALAR, whole

__all__ = ["AttentionBlocks", "decode_attention", "decode_attention_reference", "default_blocks",
           "supports"]

# Programs to aim for when splitting the slots: two waves of an H100's 132 SMs (not measured).
_TARGET_PROGRAMS = 264
# Scores of masked slots: finite, so that an all-masked split gives exp(NEG - max) = 0, not NaN.
_NEG = -1e30


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBlocks:
    """``block_s`` slots per step; ``num_splits`` programs per (sequence, kv head), ``None``:
    enough for :data:`_TARGET_PROGRAMS` programs in all."""

    block_s: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not is_block(self.block_s):
            raise ValueError(f"block_s must be a power of two >= 16, got {self.block_s}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps and num_stages must be >= 1: {self}")


def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               layer: jax.Array | int, lengths: jax.Array) -> jax.Array:
    """``q [B, H, hd]`` over slots ``< lengths[b]`` of ``k_cache[layer]``, ``v_cache[layer]``
    (``[L, B, S, KV, hd]``): ``[B, H * hd]`` in ``q.dtype``. Grouped-query softmax attention in
    float32, as the model's ``layers.attention`` computes it for one query."""
    B, H, hd = q.shape
    k = k_cache[layer].astype(q.dtype)  # [B, S, KV, hd]
    v = v_cache[layer].astype(q.dtype)
    kv = k.shape[2]
    visible = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
    qg = q.reshape(B, kv, H // kv, hd)
    scores = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, H * hd).astype(q.dtype)


def supports(num_slots: int, head_dim: int) -> bool:
    """Whether the kernel tiles the cache: ``S`` a multiple of 16 and ``hd`` a power of two
    ``>= 16`` (Triton blocks are powers of two)."""
    return num_slots % 16 == 0 and is_block(head_dim)


def _kernel(layer_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_s,
            blocks_per_split, scale):
    # q_ref [Gp, hd]: the query heads of kv head `kv` (rows past G are zeros); k_ref, v_ref
    # [L, B, S, KV, hd] whole (in HBM); o_ref [Gp, hd], m_ref, l_ref [Gp]: this split's
    # unnormalised output, running max and softmax denominator (float32).
    b, kv, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # A length past the cache attends to all of it, as the reference does (no read past S).
    layer, length = layer_ref[()], jnp.minimum(lengths_ref[b], k_ref.shape[2])
    q = q_ref[...]
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(length, block_s))

    def body(j, carry):
        m, l, acc = carry
        rows = pl.ds(j * block_s, block_s)
        k = k_ref[layer, b, rows, kv, :].astype(q.dtype)  # [block_s, hd]
        v = v_ref[layer, b, rows, kv, :].astype(q.dtype)
        precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale  # [Gp, block_s]
        slot = j * block_s + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(slot < length, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        pv = jnp.dot(p.astype(q.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
        return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + pv

    gp, hd = q.shape
    init = (jnp.full((gp,), _NEG, jnp.float32), jnp.zeros((gp,), jnp.float32),
            jnp.zeros((gp, hd), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first, last, body, init)  # empty past the sequence's length
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def default_blocks(batch: int, kv_heads: int, num_slots: int) -> AttentionBlocks:
    """The largest step of 64, 32 or 16 slots that divides ``S``; splits for
    :data:`_TARGET_PROGRAMS` programs (a heuristic, not measured)."""
    block_s = largest_divisor(num_slots, (64, 32, 16))
    splits = max(1, min(num_slots // block_s, -(-_TARGET_PROGRAMS // (batch * kv_heads))))
    return AttentionBlocks(block_s=block_s, num_splits=splits)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    lengths: jax.Array,
    *,
    blocks: AttentionBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query attention of ``q [B, H, hd]`` (one new token per sequence, RoPE applied)
    over the slots ``< lengths[b]`` of ``k_cache[layer]`` and ``v_cache[layer]``.

    Args:
      q: ``[B, H, hd]``; ``H`` a multiple of ``KV``.
      k_cache, v_cache: ``[L, B, S, KV, hd]`` stacked caches, read in place.
      layer: may be traced.
      lengths: ``[B]`` int32, the visible slots of each sequence (its new token's position + 1),
        at least 1.
      blocks: default :func:`default_blocks`.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[B, H * hd]`` in ``q.dtype``, equal to :func:`decode_attention_reference`.
    """
    if q.ndim != 3 or k_cache.ndim != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q [B, H, hd] and caches [L, B, S, KV, hd], got {q.shape=}, "
                         f"{k_cache.shape=}, {v_cache.shape=}")
    L, B, S, KV, hd = k_cache.shape
    if q.shape[0] != B or q.shape[2] != hd or q.shape[1] % KV:
        raise ValueError(f"q {q.shape} does not match the caches' [B={B}, H (a multiple of "
                         f"KV={KV}), hd={hd}]")
    if lengths.shape != (B,):
        raise ValueError(f"expected lengths [B={B}], got {lengths.shape}")
    if not supports(S, hd):
        raise ValueError(f"the kernel needs S % 16 == 0 and hd a power of two >= 16, got "
                         f"S={S}, hd={hd}")
    check_layer(layer, L)
    bs = blocks or default_blocks(B, KV, S)
    if S % bs.block_s:
        raise ValueError(f"{bs}: block_s must divide S={S}")
    if is_concrete(lengths) and lengths.size and not (1 <= np.min(lengths)
                                                      and np.max(lengths) <= S):
        raise ValueError(f"lengths must be in [1, S={S}], got {np.asarray(lengths).tolist()}")
    return _decode_attention(q, k_cache, v_cache, jnp.asarray(layer, jnp.int32),
                             lengths.astype(jnp.int32), blocks=bs, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _decode_attention(q, k_cache, v_cache, layer, lengths, *, blocks, interpret):
    _, B, S, KV, hd = k_cache.shape
    H = q.shape[1]
    G = H // KV
    gp = max(16, 1 << (G - 1).bit_length())  # tensor-core dots need 16 rows
    steps = S // blocks.block_s
    splits = min(blocks.num_splits or 1, steps)
    per_split = -(-steps // splits)
    splits = -(-steps // per_split)
    qp = jnp.pad(q.reshape(B, KV, G, hd), ((0, 0), (0, 0), (0, gp - G), (0, 0)))
    out, m, l = pl.pallas_call(
        functools.partial(_kernel, block_s=blocks.block_s, blocks_per_split=per_split,
                          scale=1.0 / math.sqrt(hd)),
        grid=(B, KV, splits),
        in_specs=[SCALAR, whole((B,)),
                  pl.BlockSpec((None, None, gp, hd), lambda b, k, s: (b, k, 0, 0)),
                  whole(k_cache.shape), whole(v_cache.shape)],
        out_specs=[pl.BlockSpec((None, None, None, gp, hd), lambda b, k, s: (b, k, s, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda b, k, s: (b, k, s, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda b, k, s: (b, k, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, KV, splits, gp, hd), jnp.float32),
                   jax.ShapeDtypeStruct((B, KV, splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((B, KV, splits, gp), jnp.float32)],
        compiler_params=compiler_params(blocks),
        interpret=interpret,
        name=f"decode_attention_m{gp}_s{blocks.block_s}_x{splits}",
    )(layer, lengths, qp, k_cache, v_cache)
    # Combine the splits: rescale each to the common max (splits past the length weigh 0).
    top = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - top)  # [B, KV, splits, gp]
    total = (l * weight).sum(axis=2)
    out = (out * weight[..., None]).sum(axis=2) / jnp.maximum(total, 1e-30)[..., None]
    return out[:, :, :G].reshape(B, H * hd).astype(q.dtype)
