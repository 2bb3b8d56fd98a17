"""The Llama decoder as pure functions over :class:`LlamaParams`.

Three entry points share one layer function:

* :func:`forward`: full-sequence logits without a cache (training, parity tests); optional
  ``positions``/``segment_ids`` for packed sequences.
* :func:`prefill`: appends a right-padded batch of prompts to a :class:`KVCache` and returns the
  logits of each sequence's last real token.
* :func:`decode_step`: appends one token per sequence.

Layers run either under ``lax.scan`` (compact programs; XLA copies each layer's weights out of the
stacked arrays first) or unrolled with static slices, which XLA reads in place. Decode is memory
bound, so it always unrolls: the scanned version measured 2.7x slower on an H100 (DESIGN.md §2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.layers import apply_rope, attention, attention_mask, rms_norm, rope_inv_freq
from loraswitch_jax.params import LayerParams, LlamaParams

__all__ = ["forward", "prefill", "decode_step", "extend"]


def _linear(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    y = jnp.einsum("btd,de->bte", x, w.astype(x.dtype))
    return y if b is None else y + b.astype(y.dtype)


def _layer(
    cfg: LlamaConfig,
    lp: LayerParams,
    layer: int | jax.Array,
    h: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: KVCache | None,
) -> tuple[jax.Array, KVCache | None]:
    """One decoder layer on ``h [B, T, d]``; writes this layer's keys/values into ``cache``."""
    B, T, _ = h.shape
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inv_freq = rope_inv_freq(cfg)

    x = rms_norm(h, lp.attn_norm, cfg.rms_norm_eps)
    q = apply_rope(_linear(x, lp.wq, lp.bq).reshape(B, T, H, hd), positions, inv_freq)
    k = apply_rope(_linear(x, lp.wk, lp.bk).reshape(B, T, KV, hd), positions, inv_freq)
    v = _linear(x, lp.wv, lp.bv).reshape(B, T, KV, hd)
    if cache is None:
        keys, values = k, v
    else:
        # Scatter only the new tokens into the stacked cache; the rest stays in place.
        rows = jnp.arange(B)[:, None]
        cache = KVCache(
            k=cache.k.at[layer, rows, positions].set(k.astype(cache.k.dtype)),
            v=cache.v.at[layer, rows, positions].set(v.astype(cache.v.dtype)),
            lengths=cache.lengths,
        )
        keys, values = cache.k[layer].astype(q.dtype), cache.v[layer].astype(q.dtype)
    h = h + _linear(attention(q, keys, values, mask), lp.wo, lp.bo)

    x = rms_norm(h, lp.mlp_norm, cfg.rms_norm_eps)
    gate = _linear(x, lp.w_gate, lp.b_gate)
    up = _linear(x, lp.w_up, lp.b_up)
    act = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    h = h + _linear(act, lp.w_down, lp.b_down)
    return h, cache


def _layers(
    cfg: LlamaConfig,
    layers: LayerParams,
    h: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: KVCache | None,
    scan_layers: bool,
) -> tuple[jax.Array, KVCache | None]:
    if scan_layers:

        def body(carry, xs):
            lp, layer = xs
            h, cache = carry
            return _layer(cfg, lp, layer, h, positions, mask, cache), None

        (h, cache), _ = jax.lax.scan(
            body, (h, cache), (layers, jnp.arange(cfg.num_hidden_layers))
        )
        return h, cache
    for layer in range(cfg.num_hidden_layers):
        lp = jax.tree.map(lambda a: a[layer], layers)
        h, cache = _layer(cfg, lp, layer, h, positions, mask, cache)
    return h, cache


def _logits(params: LlamaParams, cfg: LlamaConfig, h: jax.Array) -> jax.Array:
    h = rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    w = params.output_embedding().astype(h.dtype)
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


def forward(
    params: LlamaParams,
    tokens: jax.Array,
    cfg: LlamaConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scan_layers: bool = True,
) -> jax.Array:
    """Logits ``[B, T, V]`` (float32) for ``tokens [B, T]``, causal, no cache.

    ``positions [B, T]`` default to ``0..T-1``; with ``segment_ids [B, T]`` tokens attend only
    within their own segment (sequence packing).
    """
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # Causality follows the index in the row (positions restart inside packed rows).
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(idx, idx, segment_ids, segment_ids)
    h = params.embed[tokens]
    h, _ = _layers(cfg, params.layers, h, positions, mask, None, scan_layers)
    return _logits(params, cfg, h)


def extend(
    params: LlamaParams,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    cfg: LlamaConfig,
    *,
    scan_layers: bool,
) -> tuple[jax.Array, KVCache]:
    """Append ``tokens [B, T]`` (right-padded; ``lengths [B]`` real tokens each) to ``cache``.

    Returns the float32 logits ``[B, V]`` of each sequence's last appended token and the cache
    with ``lengths`` advanced. The caller guarantees ``cache.lengths + T <= cache.max_len``.
    """
    B, T = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (B, cache.max_len))
    mask = attention_mask(positions, slots)
    h = params.embed[tokens]
    h, cache = _layers(cfg, params.layers, h, positions, mask, cache, scan_layers)
    last = h[jnp.arange(B), jnp.maximum(lengths - 1, 0)]  # [B, d]
    logits = _logits(params, cfg, last)
    return logits, KVCache(k=cache.k, v=cache.v, lengths=cache.lengths + lengths)


def prefill(
    params: LlamaParams, cache: KVCache, tokens: jax.Array, lengths: jax.Array, cfg: LlamaConfig
) -> tuple[jax.Array, KVCache]:
    """Append a batch of prompts (scanned layers: one compiled layer, fine for compute-bound work)."""
    return extend(params, cache, tokens, lengths, cfg, scan_layers=True)


def decode_step(
    params: LlamaParams, cache: KVCache, tokens: jax.Array, cfg: LlamaConfig
) -> tuple[jax.Array, KVCache]:
    """Append one token per sequence (``tokens [B]``); layers unrolled so weights are read in place."""
    ones = jnp.ones(tokens.shape, jnp.int32)
    return extend(params, cache, tokens[:, None], ones, cfg, scan_layers=False)
