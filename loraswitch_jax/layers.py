"""The Llama building blocks as pure jnp functions: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Dtype policy: matmul inputs stay in the activation dtype (bf16 by default); norms, RoPE, softmax
and logits are computed in float32. Einsum letters: b batch, t query, s key, k kv head, g query
heads per kv head, h head dim, d model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.config import LlamaConfig

__all__ = ["rms_norm", "rope_inv_freq", "apply_rope", "attention", "attention_mask"]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x) * weight``, computed in float32, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies ``[hd/2]`` (float32), with ``linear`` or ``llama3`` scaling."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [B, T, N, hd]`` by ``positions [B, T]`` (Hugging Face's rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
) -> jax.Array:
    """Causal mask ``[B, T, S]``: key s is visible to query t when it is not later (and, for packed
    sequences, in the same segment)."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: ``[B, T, H, hd]`` queries (RoPE applied).
      k, v: ``[B, S, KV, hd]`` keys and values; ``H`` is a multiple of ``KV``.
      mask: ``[B, T, S]`` bool, True where a query may attend to a key.

    Returns:
      ``[B, T, H * hd]`` in ``q.dtype``.
    """
    B, T, H, hd = q.shape
    KV = k.shape[2]
    q = q.reshape(B, T, KV, H // KV, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H * hd).astype(q.dtype)
