"""The Llama decoder as pure functions over :class:`LlamaParams`.

Three entry points share one layer function:

* :func:`forward`: full-sequence logits without a cache (training, parity tests); optional
  ``positions``/``segment_ids`` for packed sequences.
* :func:`prefill`: appends a right-padded batch of prompts to a :class:`KVCache` and returns the
  logits of each sequence's last real token.
* :func:`decode_step`: appends one token per sequence.

Inputs are checked where their values are concrete (an eager call): token ids inside the
vocabulary, adapter shapes that fit the model, room in the cache. Inside ``jax.jit`` the values
are traced and only shapes and dtypes are checked; the caller guarantees the rest (as
:func:`loraswitch_jax.generate` does), so that the decode loop never waits on the host.

Layers run either under ``lax.scan`` (compact programs; XLA copies each layer's weights out of the
stacked arrays first) or unrolled with static slices, which XLA reads in place. Decode is memory
bound, so it always unrolls: the scanned version measured 2.7x slower on an H100 (DESIGN.md §2).
The loop itself (scan or unroll, remat, FSDP's per-layer gathers) is ``layer_scan``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax import ops
from loraswitch_jax.adapters import Adapter, check_adapter
from loraswitch_jax.attention import ATTENTION_IMPLS, CausalMask, attend
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.layer_scan import (REMAT_POLICIES, check_fsdp_mesh, constrain_rows,
                                       gather_layer, gathers, layer_range)
from loraswitch_jax.layers import apply_rope, attention_mask, rms_norm, rope_inv_freq
from loraswitch_jax.params import LayerParams, LlamaParams
from loraswitch_jax.router import Route, Routing, compute_route, constant_route
from loraswitch_jax.switch import MergedWeights, merge_route, merged_layers

__all__ = ["REMAT_POLICIES", "forward", "lm_head", "prefill", "decode_step", "decode_step_merged",
           "extend"]

def _layer(
    cfg: LlamaConfig,
    layers: LayerParams,
    layer: int | jax.Array,
    h: jax.Array,
    positions: jax.Array,
    mask: jax.Array | CausalMask,
    cache: KVCache | None,
    impl: ops.Impl,
    adapter: Adapter | None = None,
    route: Route | None = None,
    dropout_key: jax.Array | None = None,
    slots: tuple[jax.Array, jax.Array] | None = None,
    tensor_axis: str | None = None,
    xa_qkv: tuple | None = None,
    ahead_next: bool = False,
) -> tuple[jax.Array, KVCache | None, tuple[jax.Array, jax.Array] | None, tuple | None]:
    """Decoder layer ``layer`` of the stacked ``layers`` on ``h [B, T, d]``.

    Writes this layer's keys/values into ``cache``. Weights are read as ``w[layer]`` through
    ``ops``, so a kernel can read them in place. With an ``adapter`` (this layer adapted), target
    projections add the routed LoRA term for ``route`` (switch/lora) or for this layer's own
    route (layerwise; returned as ``(probs, expert_ids)`` for the balance loss). ``slots``: the
    routed kernels' slots of a shared ``route`` (``ops.shared_slots``), built once for all layers.
    ``tensor_axis``: inside ``shard_map``, the mesh axis of a Megatron split (``parallel``):
    head counts come from the local widths, and o and down sum their partials (adapter terms
    included) with one ``psum`` each, their bias added once after it. ``xa_qkv``: this layer's
    q/k/v shrinks from the previous layer's down kernel; ``ahead_next``: the next layer is
    adapted with this route, so this layer's down kernel may compute its q/k/v shrinks
    (returned last, else ``None``; ``ops.mlp_residual_shrink_ahead``).
    """
    B, T, _ = h.shape
    hd = cfg.head_dim
    H, KV = layers.wq.shape[-1] // hd, layers.wk.shape[-1] // hd  # local heads under a split
    inv_freq = rope_inv_freq(cfg)
    x = rms_norm(h, layers.attn_norm[layer], cfg.rms_norm_eps)

    routing, lora = None, None
    if adapter is not None:
        acfg = adapter.config
        adapted = layer - acfg.first_layer
        if acfg.mode == "layerwise":
            route, probs = compute_route(x, adapter.router[adapted], acfg.top_k)
            routing = (probs, route.expert_ids)
        lora = ops.LoraTerm(a=adapter.a, b=adapter.b, layer=adapted, route=route,
                            scale=acfg.scale, dropout=acfg.dropout, dropout_key=dropout_key,
                            slots=None if acfg.mode == "layerwise" else slots)

    def row_parallel(y_fn, bias):
        # Partials of a row-parallel projection summed over shards; the bias once, after.
        if tensor_axis is None:
            return y_fn(bias)
        y = jax.lax.psum(y_fn(None), tensor_axis)
        return y if bias is None else y + bias[layer].astype(y.dtype)

    # q, k and v share their input: one fused launch on the GPU, adapter terms included.
    q, k, v = ops.qkv_linear(
        x, tuple(layers.weight(p) for p in "qkv"), layer, tuple(layers.bias(p) for p in "qkv"),
        impl, lora, xa_qkv,
    )
    q = apply_rope(q.reshape(B, T, H, hd), positions, inv_freq)
    k = apply_rope(k.reshape(B, T, KV, hd), positions, inv_freq)
    v = v.reshape(B, T, KV, hd)
    xa_o = None  # o's x A, where the decode-attention kernel computes it (ops)
    if cache is None:
        attended = attend(q, k, v, mask)
    else:
        # Scatter only the new tokens into the stacked cache; the rest stays in place.
        rows = jnp.arange(B)[:, None]
        cache = KVCache(
            k=cache.k.at[layer, rows, positions].set(k.astype(cache.k.dtype)),
            v=cache.v.at[layer, rows, positions].set(v.astype(cache.v.dtype)),
            lengths=cache.lengths,
        )
        attended, xa_o = ops.cached_attention_shrink_ahead(q, cache.k, cache.v, layer, positions,
                                                           mask, impl, lora)
    if tensor_axis is None:  # o's kernel may add the residual and shrink gate/up's x A (ops)
        h, xa_mlp = ops.residual_linear_shrink_ahead(
            attended, layers.wo, layer, layers.bo, impl, lora, "o", xa_o, h, layers.mlp_norm,
            cfg.rms_norm_eps, layers.w_gate)
    else:
        h, xa_mlp = h + row_parallel(lambda b: ops.stacked_linear(
            attended, layers.wo, layer, b, impl, lora, "o", xa_o), layers.bo), None

    x = rms_norm(h, layers.mlp_norm[layer], cfg.rms_norm_eps)
    # SiLU(gate) * up in one fused launch on the GPU, then down.
    if tensor_axis is None:  # down's kernel may add the residual and shrink the next q/k/v's
        h, xa_next = ops.mlp_residual_shrink_ahead(
            x, layers.w_gate, layers.w_up, layers.w_down, layer,
            (layers.b_gate, layers.b_up, layers.b_down), impl, lora, xa_mlp, h,
            layers.attn_norm if ahead_next else None, cfg.rms_norm_eps,
            tuple(layers.weight(p) for p in "qkv"))
    else:
        h, xa_next = h + row_parallel(lambda b: ops.mlp(
            x, layers.w_gate, layers.w_up, layers.w_down, layer, (layers.b_gate, layers.b_up, b),
            impl, lora, xa_mlp), layers.b_down), None
    return h, cache, routing, xa_next


def _layers(
    cfg: LlamaConfig,
    layers: LayerParams,
    h: jax.Array,
    positions: jax.Array,
    mask: jax.Array | CausalMask,
    cache: KVCache | None,
    scan_layers: bool,
    impl: ops.Impl,
    adapter: Adapter | None = None,
    dropout_key: jax.Array | None = None,
    merged: MergedWeights | None = None,
    remat: str = "none",
    tensor_axis: str | None = None,
    fsdp_mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, KVCache | None, Routing | None, MergedWeights | None]:
    """All decoder layers: plain backbone up to the adapter's first layer, adapted after it.

    In switch mode the route is computed here, once per token, from the normalised input of the
    first adapted layer, and handed to every adapted layer. With ``merged`` (switch mode, one
    token) the route is merged into the working copy instead (``loraswitch_jax.switch``) and
    the adapted layers run as the plain backbone over it. With ``fsdp_mesh`` (training, no
    cache) each layer first gathers its own weights over ``fsdp`` (``layer_scan``).
    """
    L = cfg.num_hidden_layers
    fsdp = gathers(fsdp_mesh)

    def run(layers, span, h, cache, adapter=None, route=None, dropout_key=None, slots=None):
        # Shrink-ahead (ops): layer l's down kernel computes layer l+1's q/k/v x A, carried
        # beside h; unrolled decode with a shared route only (a scan's carry keeps one form).
        ahead = (slots is not None and impl.shrink_ahead and cache is not None
                 and not scan_layers and remat == "none" and not fsdp)

        def step(carry, cache, layer):
            h, xa = carry if ahead else (carry, None)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer)
            if not fsdp:
                h, cache, routing, xa = _layer(cfg, layers, layer, h, positions, mask, cache, impl,
                                               adapter, route, key, slots, tensor_axis, xa,
                                               ahead and layer + 1 < span.stop)
                return ((h, xa) if ahead else h), cache, routing
            one_layers, one_adapter = gather_layer(layers, adapter, layer, fsdp_mesh)
            h, cache, routing, _ = _layer(cfg, one_layers, 0, constrain_rows(h, fsdp_mesh),
                                          positions, mask, cache, impl, one_adapter, route, key,
                                          slots)
            return constrain_rows(h, fsdp_mesh), cache, routing

        carry, cache, out = layer_range(step, span, (h, None) if ahead else h, cache, scan_layers,
                                        remat, fsdp)
        return (carry[0] if ahead else carry), cache, out

    if adapter is None:
        h, cache, _ = run(layers, range(L), h, cache=cache)
        return h, cache, None, None
    acfg = adapter.config
    p = acfg.first_layer
    h, cache, _ = run(layers, range(p), h, cache=cache)
    route, routing = None, None
    if acfg.mode == "lora":
        route = constant_route(h.shape[:2])
    elif acfg.mode == "switch":
        x = rms_norm(h, layers.attn_norm[p], cfg.rms_norm_eps)
        route, probs = compute_route(x, adapter.router, acfg.top_k)
        routing = Routing(probs=probs[None], expert_ids=route.expert_ids[None])
    if merged is not None:
        if acfg.mode != "switch" or h.shape[:2] != (1, 1):
            raise ValueError("merged weights serve a switch adapter, one token at a time")
        merged = merge_route(merged, layers, adapter, route.expert_ids[0, 0], route.gates[0, 0],
                             impl)
        h, cache, _ = run(merged_layers(layers, merged), range(p, L), h, cache=cache)
        return h, cache, routing, merged
    # A shared route's kernel slots are built once here, not in every layer.
    slots = None if route is None else ops.shared_slots(route, acfg.num_experts, acfg.scale, impl)
    h, cache, per_layer = run(layers, range(p, L), h, cache=cache, adapter=adapter, route=route,
                              dropout_key=dropout_key, slots=slots)
    if acfg.mode == "layerwise":
        routing = Routing(probs=per_layer[0], expert_ids=per_layer[1])
    return h, cache, routing, None


def lm_head(params: LlamaParams, hidden: jax.Array) -> jax.Array:
    """Float32 logits ``[..., V]`` of final-normed ``hidden [..., d]`` (``forward``'s
    ``return_hidden``): the output embedding, or the tied input embedding, in ``hidden.dtype``."""
    w = params.output_embedding().astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


def _logits(params: LlamaParams, cfg: LlamaConfig, h: jax.Array) -> jax.Array:
    return lm_head(params, rms_norm(h, params.final_norm, cfg.rms_norm_eps))


# ------------------------------------------------------------------------------ input checks


def _concrete(*xs) -> bool:
    """Whether every ``x`` holds values (an eager call), not a ``jit`` tracer's placeholders."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_adapter_fits(adapter: Adapter | None, cfg: LlamaConfig, tensor_axis=None) -> None:
    # Shapes are static even under jit: always checked (a 3-layer adapter on a 2-layer model),
    # except per shard, where they are local (``parallel.place`` checks them before splitting).
    if adapter is not None and tensor_axis is None:
        check_adapter(adapter, cfg)


def _check_tokens(tokens, cfg: LlamaConfig, where: str, ndim: int) -> None:
    """``tokens`` of rank ``ndim`` and an integer dtype; ids in ``[0, V)`` when concrete."""
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or len(shape) != ndim:
        want = "[B, T]" if ndim == 2 else "[B]"
        raise ValueError(f"{where}: tokens must be an integer array {want}, got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{where}: tokens must hold integer ids, got dtype {dtype}")
    if _concrete(tokens):
        ids = np.asarray(tokens)
        bad = np.argwhere((ids < 0) | (ids >= cfg.vocab_size))
        if bad.size:
            at = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"{where}: token id {int(ids[at])} at {list(at)} is outside the vocabulary "
                f"[0, {cfg.vocab_size}) (an embedding lookup would silently clamp it)"
            )


def _check_room(cache: KVCache, tokens, lengths, where: str) -> None:
    """Batch sizes agree; when concrete, ``0 <= lengths <= T`` and the real tokens fit the cache."""
    B, T = tokens.shape
    if cache.batch_size != B or tuple(lengths.shape) != (B,):
        raise ValueError(
            f"{where}: tokens {tuple(tokens.shape)}, lengths {tuple(lengths.shape)} and a cache "
            f"of batch {cache.batch_size} disagree on the batch size"
        )
    if not _concrete(cache.lengths, lengths):
        return
    have, add = np.asarray(cache.lengths), np.asarray(lengths)
    if ((add < 0) | (add > T)).any():
        raise ValueError(f"{where}: lengths must be in [0, {T}] (the tokens' width), got {add.tolist()}")
    over = np.flatnonzero(have + add > cache.max_len)
    if over.size:
        b = int(over[0])
        raise ValueError(
            f"{where}: sequence {b} would hold {int(have[b] + add[b])} tokens ({int(have[b])} cached "
            f"+ {int(add[b])} new), more than the cache's {cache.max_len} slots; "
            "make the cache longer (init_cache max_len)"
        )


def forward(
    params: LlamaParams,
    tokens: jax.Array,
    cfg: LlamaConfig,
    *,
    adapter: Adapter | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scan_layers: bool = True,
    impl: str | ops.Impl = "xla",
    dropout_key: jax.Array | None = None,
    return_routing: bool = False,
    remat: str = "none",
    attention_chunk: int | None = 512,
    attention_impl: str = "xla",
    tensor_axis: str | None = None,
    fsdp_mesh: jax.sharding.Mesh | None = None,
    return_hidden: bool = False,
) -> jax.Array | tuple[jax.Array, Routing | None]:
    """Logits ``[B, T, V]`` (float32) for ``tokens [B, T]``, causal, no cache.

    Args:
      adapter: LoRA / mixture adapters (``None``: the backbone alone).
      positions: ``[B, T]``, default ``0..T-1``.
      segment_ids: ``[B, T]``; tokens attend only within their own segment (sequence packing).
      scan_layers: ``lax.scan`` over layers (compact; training) or unrolled.
      dropout_key: enables the adapter's dropout (training).
      return_routing: also return the routers' :class:`Routing` (``None`` without routers).
      remat: what the backward pass keeps of each layer (``REMAT_POLICIES``): ``"none"``
        (everything), ``"dots"`` (weight matmul outputs) or ``"full"`` (only layer inputs).
      attention_chunk: rows longer than this attend blockwise (``loraswitch_jax.attention``),
        never building the ``[B, H, T, T]`` scores; ``None``: always dense.
      attention_impl: ``"xla"`` or ``"cudnn"`` (GPU fused attention; no ``segment_ids``).
      tensor_axis: the tensor-parallel mesh axis when run per shard (``loraswitch_jax.parallel``).
      fsdp_mesh: the training mesh (``train.placement``), under ``jit`` on global arrays: when
        its ``fsdp`` axis splits the weights, each layer all-gathers its own weights over it,
        forward and backward, and hidden states stay split by rows (``layer_scan``).
      return_hidden: return the final-normed hidden states ``[B, T, d]`` (params' dtype)
        instead of the logits, which are ``lm_head(params, hidden)``: a loss can then apply
        the head a chunk of tokens at a time (``train.loss.chunked_cross_entropy``).

    Raises:
      ValueError: ``tokens`` is not an integer ``[B, T]`` array, holds ids outside the
        vocabulary (checked when concrete; under ``jit`` the caller guarantees it), or the
        adapter's shapes do not fit ``cfg`` (an ``AdapterError``).
    """
    _check_tokens(tokens, cfg, "forward", ndim=2)
    _check_adapter_fits(adapter, cfg, tensor_axis)
    check_fsdp_mesh(fsdp_mesh)
    if fsdp_mesh is not None and tensor_axis is not None:
        raise ValueError("fsdp_mesh gathers global weights; it cannot run per shard (tensor_axis)")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; expected one of {tuple(REMAT_POLICIES)}")
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {attention_impl!r}; expected one of "
                         f"{ATTENTION_IMPLS}")
    if attention_chunk is not None and not (isinstance(attention_chunk, int)
                                            and attention_chunk >= 1):
        raise ValueError(f"attention_chunk must be an int >= 1 or None, got {attention_chunk!r}")
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if attention_impl == "cudnn" or (attention_chunk is not None and T > attention_chunk):
        mask = CausalMask(segment_ids, attention_chunk or T, attention_impl)
    else:
        # Causality follows the index in the row (positions restart inside packed rows).
        idx = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = attention_mask(idx, idx, segment_ids, segment_ids)
    h = params.embed[tokens]
    h, _, routing, _ = _layers(cfg, params.layers, h, positions, mask, None, scan_layers,
                               ops.resolve_impl(impl), adapter, dropout_key,
                               tensor_axis=tensor_axis, remat=remat, fsdp_mesh=fsdp_mesh)
    if return_hidden:
        out = rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    else:
        out = _logits(params, cfg, h)
    return (out, routing) if return_routing else out


def extend(
    params: LlamaParams,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    cfg: LlamaConfig,
    *,
    scan_layers: bool,
    adapter: Adapter | None = None,
    impl: str | ops.Impl = "xla",
    tensor_axis: str | None = None,
) -> tuple[jax.Array, KVCache]:
    """Append ``tokens [B, T]`` (right-padded; ``lengths [B]`` real tokens each) to ``cache``.

    Returns the float32 logits ``[B, V]`` of each sequence's last appended token and the cache
    with ``lengths`` advanced. Padding slots past the cache's end are dropped.

    Raises:
      ValueError: token ids outside the vocabulary, ``lengths`` outside ``[0, T]`` or real tokens
        past the cache's end (``cache.lengths + lengths > cache.max_len``). Checked when the
        values are concrete; under ``jit`` they are traced and the caller guarantees them.
    """
    _check_tokens(tokens, cfg, "extend", ndim=2)
    _check_room(cache, tokens, lengths, "extend")
    logits, cache, _ = _extend(params, cache, tokens, lengths, cfg, scan_layers, adapter, impl,
                               tensor_axis=tensor_axis)
    return logits, cache


def _extend(params, cache, tokens, lengths, cfg, scan_layers, adapter, impl, merged=None,
            tensor_axis=None):
    _check_adapter_fits(adapter, cfg, tensor_axis)
    B, T = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (B, cache.max_len))
    mask = attention_mask(positions, slots)
    h = params.embed[tokens]
    h, cache, _, merged = _layers(cfg, params.layers, h, positions, mask, cache, scan_layers,
                                  ops.resolve_impl(impl), adapter, merged=merged,
                                  tensor_axis=tensor_axis)
    last = h[jnp.arange(B), jnp.maximum(lengths - 1, 0)]  # [B, d]
    logits = _logits(params, cfg, last)
    return logits, KVCache(k=cache.k, v=cache.v, lengths=cache.lengths + lengths), merged


def prefill(
    params: LlamaParams,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    cfg: LlamaConfig,
    *,
    adapter: Adapter | None = None,
    impl: str | ops.Impl = "xla",
    chunk: int | None = None,
    tensor_axis: str | None = None,
) -> tuple[jax.Array, KVCache]:
    """Append a batch of prompts (scanned layers: one compiled layer, fine for compute-bound work).

    ``chunk``: append ``chunk`` tokens of every prompt at a time, a ``lax.scan`` over the chunks,
    so that a large batch of long prompts fits: the attention scores of one pass are
    ``[B, H, chunk, cache_len]`` float32 (64 prompts of 1024 tokens at once need ~10 GB a layer).
    The logits, the lengths and every cache slot a query can see equal those of one pass (the
    padding slots past each length may differ; decoding overwrites them before they are seen).

    Raises:
      ValueError: as :func:`extend` (ids, lengths and cache room are checked when concrete;
        inside ``jit`` the caller guarantees them).
    """
    _check_tokens(tokens, cfg, "prefill", ndim=2)
    _check_room(cache, tokens, lengths, "prefill")
    B, T = tokens.shape
    if chunk is None or chunk >= T:
        return extend(params, cache, tokens, lengths, cfg, scan_layers=True, adapter=adapter,
                      impl=impl, tensor_axis=tensor_axis)
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    n = -(-T // chunk)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * chunk - T)))

    def step(carry, c):
        cache, logits = carry
        piece = jax.lax.dynamic_slice_in_dim(tokens, c * chunk, chunk, axis=1)
        piece_lengths = jnp.clip(lengths - c * chunk, 0, chunk).astype(lengths.dtype)
        # A prompt that ended in an earlier chunk appends nothing: its cache length stays, and
        # what this pass writes past it is overwritten by decoding before any query can see it.
        new, cache = extend(params, cache, piece, piece_lengths, cfg, scan_layers=True,
                            adapter=adapter, impl=impl, tensor_axis=tensor_axis)
        return (cache, jnp.where((piece_lengths > 0)[:, None], new, logits)), None

    logits = jnp.zeros((B, params.output_embedding().shape[-1]), jnp.float32)  # local vocab
    (cache, logits), _ = jax.lax.scan(step, (cache, logits), jnp.arange(n))
    return logits, cache


def decode_step(
    params: LlamaParams,
    cache: KVCache,
    tokens: jax.Array,
    cfg: LlamaConfig,
    *,
    adapter: Adapter | None = None,
    impl: str | ops.Impl = "auto",
    tensor_axis: str | None = None,
) -> tuple[jax.Array, KVCache]:
    """Append one token per sequence (``tokens [B]``); each token routes itself.

    Memory bound, so weights must be read in place, and the layers are unrolled: with
    ``impl="xla"`` static slices are read in place in a jitted step but copied inside a
    ``while_loop``; ``"pallas"`` kernels read ``w[layer]`` in place everywhere.

    Raises:
      ValueError: ids outside the vocabulary or a full cache, checked only when the values are
        concrete (an eager call); in a jitted step they are traced, the step adds no host sync,
        and the caller guarantees ``cache.lengths < cache.max_len``.
    """
    _check_tokens(tokens, cfg, "decode_step", ndim=1)
    ones = jnp.ones(tokens.shape, jnp.int32)
    _check_room(cache, tokens[:, None], ones, "decode_step")
    return extend(params, cache, tokens[:, None], ones, cfg, scan_layers=False, adapter=adapter,
                  impl=impl, tensor_axis=tensor_axis)


def decode_step_merged(
    params: LlamaParams,
    cache: KVCache,
    merged: MergedWeights,
    tokens: jax.Array,
    cfg: LlamaConfig,
    *,
    adapter: Adapter,
    impl: str | ops.Impl = "auto",
    tensor_axis: str | None = None,
) -> tuple[jax.Array, KVCache, MergedWeights]:
    """:func:`decode_step` with the ``merge`` strategy (batch 1, switch adapter): the token's
    route is merged into ``merged`` (skipped when it repeats), then the adapted layers run as
    the plain backbone over the merged weights. Returns the updated ``merged`` too."""
    _check_tokens(tokens, cfg, "decode_step_merged", ndim=1)
    if tokens.shape != (1,):
        raise ValueError(f"the merge strategy decodes one sequence at a time, got {tokens.shape=}")
    ones = jnp.ones(tokens.shape, jnp.int32)
    _check_room(cache, tokens[:, None], ones, "decode_step_merged")
    return _extend(params, cache, tokens[:, None], ones, cfg, False, adapter, impl, merged,
                   tensor_axis)
