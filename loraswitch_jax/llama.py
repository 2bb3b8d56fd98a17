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

from loraswitch_jax import ops
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.layers import apply_rope, attention, attention_mask, rms_norm, rope_inv_freq
from loraswitch_jax.params import LayerParams, LlamaParams

__all__ = ["forward", "prefill", "decode_step", "extend"]


def _layer(
    cfg: LlamaConfig,
    layers: LayerParams,
    layer: int | jax.Array,
    h: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: KVCache | None,
    impl: str,
) -> tuple[jax.Array, KVCache | None]:
    """Decoder layer ``layer`` of the stacked ``layers`` on ``h [B, T, d]``.

    Writes this layer's keys/values into ``cache``. Weights are read as ``w[layer]`` through
    ``ops``, so a kernel can read them in place.
    """
    B, T, _ = h.shape
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inv_freq = rope_inv_freq(cfg)

    def linear(x, proj):
        return ops.stacked_linear(x, layers.weight(proj), layer, layers.bias(proj), impl)

    x = rms_norm(h, layers.attn_norm[layer], cfg.rms_norm_eps)
    q = apply_rope(linear(x, "q").reshape(B, T, H, hd), positions, inv_freq)
    k = apply_rope(linear(x, "k").reshape(B, T, KV, hd), positions, inv_freq)
    v = linear(x, "v").reshape(B, T, KV, hd)
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
    h = h + linear(attention(q, keys, values, mask), "o")

    x = rms_norm(h, layers.mlp_norm[layer], cfg.rms_norm_eps)
    gate, up = linear(x, "gate"), linear(x, "up")
    act = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    h = h + linear(act, "down")
    return h, cache


def _layers(
    cfg: LlamaConfig,
    layers: LayerParams,
    h: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: KVCache | None,
    scan_layers: bool,
    impl: str,
) -> tuple[jax.Array, KVCache | None]:
    if scan_layers:

        def body(carry, layer):
            h, cache = carry
            return _layer(cfg, layers, layer, h, positions, mask, cache, impl), None

        (h, cache), _ = jax.lax.scan(body, (h, cache), jnp.arange(cfg.num_hidden_layers))
        return h, cache
    for layer in range(cfg.num_hidden_layers):
        h, cache = _layer(cfg, layers, layer, h, positions, mask, cache, impl)
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
    impl: str = "xla",
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
    h, _ = _layers(cfg, params.layers, h, positions, mask, None, scan_layers, ops.resolve_impl(impl))
    return _logits(params, cfg, h)


def extend(
    params: LlamaParams,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    cfg: LlamaConfig,
    *,
    scan_layers: bool,
    impl: str = "xla",
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
    h, cache = _layers(cfg, params.layers, h, positions, mask, cache, scan_layers, ops.resolve_impl(impl))
    last = h[jnp.arange(B), jnp.maximum(lengths - 1, 0)]  # [B, d]
    logits = _logits(params, cfg, last)
    return logits, KVCache(k=cache.k, v=cache.v, lengths=cache.lengths + lengths)


def prefill(
    params: LlamaParams,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    cfg: LlamaConfig,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """Append a batch of prompts (scanned layers: one compiled layer, fine for compute-bound work)."""
    return extend(params, cache, tokens, lengths, cfg, scan_layers=True, impl=impl)


def decode_step(
    params: LlamaParams,
    cache: KVCache,
    tokens: jax.Array,
    cfg: LlamaConfig,
    *,
    impl: str = "auto",
) -> tuple[jax.Array, KVCache]:
    """Append one token per sequence (``tokens [B]``).

    Memory bound, so weights must be read in place, and the layers are unrolled: with
    ``impl="xla"`` static slices are read in place in a jitted step but copied inside a
    ``while_loop``; ``"pallas"`` kernels read ``w[layer]`` in place everywhere.
    """
    ones = jnp.ones(tokens.shape, jnp.int32)
    return extend(params, cache, tokens[:, None], ones, cfg, scan_layers=False, impl=impl)
