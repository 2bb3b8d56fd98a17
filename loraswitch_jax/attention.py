"""Full-sequence causal attention that never materialises the ``T x T`` scores (training, long
prefixes).

:func:`blockwise_attention` is flash attention written in jnp: queries in chunks, an online
softmax over key chunks (running max and sum), and a ``custom_vjp`` whose backward recomputes
each block's probabilities from the saved log-sum-exp, so neither pass holds more than one
``[B, H, chunk, chunk]`` block of scores. Key chunks past a query chunk are skipped (causality),
so the work is about half of the dense product. Causality follows the index in the row and
packed ``segment_ids`` keep sequences apart, as in :func:`loraswitch_jax.layers.attention_mask`.

:class:`CausalMask` is the mask ``forward`` hands to the layers when it does not build
``[B, T, T]``; :func:`attend` picks the dense or blockwise path from it. On a GPU,
``implementation="cudnn"`` calls ``jax.nn.dot_product_attention``'s fused cuDNN kernel where its
constraints hold (no packed segments, bf16/fp16, head dim a multiple of 8 up to 128, 256 at most).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.layers import attention, attention_mask

__all__ = ["ATTENTION_IMPLS", "CausalMask", "attend", "blockwise_attention", "causal_attention"]

ATTENTION_IMPLS = ("xla", "cudnn")
_NEG = float(np.finfo(np.float32).min)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalMask:
    """A causal (optionally packed) mask over the row index, described instead of built.

    Attributes:
      segment_ids: ``[B, T]`` int or ``None`` (one sequence per row).
      chunk: block size of :func:`blockwise_attention`; rows up to ``chunk`` long attend densely.
      implementation: ``"xla"`` (dense or blockwise jnp) or ``"cudnn"`` (GPU only).
    """

    segment_ids: jax.Array | None
    chunk: int = dataclasses.field(default=512, metadata=dict(static=True))
    implementation: str = dataclasses.field(default="xla", metadata=dict(static=True))

    def __post_init__(self):
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"attention chunk must be an int >= 1, got {self.chunk!r}")
        if self.implementation not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {self.implementation!r}; "
                             f"expected one of {ATTENTION_IMPLS}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | CausalMask) -> jax.Array:
    """Attention of ``q [B, T, H, hd]`` over ``k, v [B, S, KV, hd]`` under a built ``[B, T, S]``
    mask (dense) or a :class:`CausalMask` (``S == T``); returns ``[B, T, H * hd]``."""
    if isinstance(mask, CausalMask):
        return causal_attention(q, k, v, mask.segment_ids, chunk=mask.chunk,
                                implementation=mask.implementation)
    return attention(q, k, v, mask)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    chunk: int = 512,
    implementation: str = "xla",
) -> jax.Array:
    """Causal self-attention over the row index: dense up to ``chunk`` tokens, blockwise beyond.

    Args:
      q: ``[B, T, H, hd]`` queries (RoPE applied).
      k, v: ``[B, T, KV, hd]``; ``H`` a multiple of ``KV``.
      segment_ids: ``[B, T]`` int; tokens attend only within their own segment.
      chunk: block size; ``T <= chunk`` builds the ``[B, T, T]`` mask and attends densely.
      implementation: ``"xla"`` or ``"cudnn"`` (GPU; refuses inputs it cannot run).

    Returns:
      ``[B, T, H * hd]`` in ``q.dtype``.
    """
    _check_shapes(q, k, v, segment_ids)
    B, T, H, hd = q.shape
    if implementation == "cudnn":
        _check_cudnn(q, segment_ids)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return out.reshape(B, T, H * hd)
    if implementation != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"expected one of {ATTENTION_IMPLS}")
    if T <= chunk:
        idx = jnp.broadcast_to(jnp.arange(T), (B, T))
        return attention(q, k, v, attention_mask(idx, idx, segment_ids, segment_ids))
    return blockwise_attention(q, k, v, segment_ids, chunk=chunk)


def _check_shapes(q, k, v, segment_ids) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"need q [B, T, H, hd] and k, v [B, T, KV, hd]; got {q.shape=}, "
                         f"{k.shape=}, {v.shape=}")
    B, T, H, hd = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != hd or H % k.shape[2]:
        raise ValueError(f"k, v {k.shape} do not fit q {q.shape} (same B, T, hd; H a multiple "
                         f"of KV)")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")


def _check_cudnn(q, segment_ids) -> None:
    hd = q.shape[-1]
    why = None
    if jax.default_backend() != "gpu":
        why = f"it needs a GPU (backend is {jax.default_backend()!r})"
    elif segment_ids is not None:
        why = "packed segment_ids need the 'xla' path"
    elif q.dtype not in (jnp.bfloat16, jnp.float16):
        why = f"it runs bf16/fp16, got {q.dtype}"
    elif hd % 8 or hd > 256:
        why = f"head dim {hd} is not a multiple of 8 up to 256"
    if why:
        raise ValueError(f"attention implementation 'cudnn' cannot run here: {why}")


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    chunk: int = 512,
) -> jax.Array:
    """Causal grouped-query attention in ``chunk x chunk`` blocks (online softmax, flash style).

    Same arguments and result as :func:`causal_attention`; ``T`` need not divide by ``chunk``
    (the rows are padded, and causality keeps real queries off the padding).
    """
    _check_shapes(q, k, v, segment_ids)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    B, T, H, hd = q.shape
    KV = k.shape[2]
    c = min(chunk, T)
    pad = -(-T // c) * c - T
    seg = (jnp.zeros((B, T), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    # Padded queries see only padding and themselves (segment -1), so no row is empty.
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    q5 = jnp.pad(q.reshape(B, T, KV, H // KV, hd), ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    k4 = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v4 = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    out = _flash(q5, k4, v4, seg, c)
    return out[:, :T].reshape(B, T, H * hd)


def _block_mask(seg: jax.Array, i, j, c: int) -> jax.Array:
    """``[B, 1, 1, c, c]``: query block ``i`` may see key block ``j``."""
    qi = i * c + jnp.arange(c)
    kj = j * c + jnp.arange(c)
    qs = jax.lax.dynamic_slice_in_dim(seg, i * c, c, axis=1)
    ks = jax.lax.dynamic_slice_in_dim(seg, j * c, c, axis=1)
    mask = (kj[None, :] <= qi[:, None])[None] & (qs[:, :, None] == ks[:, None, :])
    return mask[:, None, None]


def _block(x: jax.Array, i, c: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)


def _scores(qb, kb, scale: float) -> jax.Array:
    """``[B, KV, G, c, c]`` float32 scores of a query block ``[B, c, KV, G, hd]`` and key block."""
    return jnp.einsum("btkgh,bskh->bkgts", qb, kb, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, seg, c):
    """Output ``[B, Tp, KV, G, hd]`` and log-sum-exp ``[B, KV, G, Tp]`` (float32)."""
    B, Tp, KV, G, hd = q.shape
    scale = 1.0 / math.sqrt(hd)

    def query_block(i):
        qb = _block(q, i, c)

        def key_block(j, carry):
            m, l, acc = carry
            mask = _block_mask(seg, i, j, c)
            s = jnp.where(mask, _scores(qb, _block(k, j, c), scale), _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), _block(v, j, c),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((B, KV, G, c), _NEG, jnp.float32), jnp.zeros((B, KV, G, c), jnp.float32),
                jnp.zeros((B, KV, G, c, hd), jnp.float32))
        # Key blocks after query block i are all masked by causality: not visited.
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        out = (acc / l[..., None]).astype(q.dtype)
        return out.transpose(0, 3, 1, 2, 4), m + jnp.log(l)  # [B, c, KV, G, hd], [B, KV, G, c]

    n = Tp // c
    out, lse = jax.lax.map(query_block, jnp.arange(n))
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(B, Tp, KV, G, hd)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, KV, G, Tp)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, c):
    return _forward(q, k, v, seg, c)[0]


def _flash_fwd(q, k, v, seg, c):
    out, lse = _forward(q, k, v, seg, c)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(c, res, dout):
    q, k, v, seg, out, lse = res
    B, Tp, KV, G, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    # D_t = sum_h dout * out: the softmax backward's row term.
    delta = jnp.einsum("btkgh,btkgh->bkgt", dout.astype(jnp.float32), out.astype(jnp.float32))
    n = Tp // c

    def key_block(dq, j):
        kb, vb = _block(k, j, c), _block(v, j, c)

        def query_block(i, carry):
            dq, dk, dv = carry
            qb, dob = _block(q, i, c), _block(dout, i, c)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * c, c, axis=3)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * c, c, axis=3)
            mask = _block_mask(seg, i, j, c)
            p = jnp.where(mask, jnp.exp(_scores(qb, kb, scale) - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bkgts,btkgh->bskh", p.astype(dob.dtype), dob,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("btkgh,bskh->bkgts", dob, vb, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
            dq_i = jnp.einsum("bkgts,bskh->btkgh", ds, kb, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, c) + dq_i, i * c, axis=1)
            dk = dk + jnp.einsum("bkgts,btkgh->bskh", ds, qb, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((B, c, KV, hd), jnp.float32)
        # Query blocks before key block j cannot see it: not visited.
        dq, dk, dv = jax.lax.fori_loop(j, n, query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(n))
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(k.shape)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(v.shape)
    seg_ct = np.zeros(seg.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), seg_ct


_flash.defvjp(_flash_fwd, _flash_bwd)
