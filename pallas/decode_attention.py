"""Attention of one new token per sequence over a stacked KV cache read in place (Pallas, Triton).

Why a kernel: in decode each layer attends over ``cache.k[layer]`` and ``cache.v[layer]`` of the
stacked ``[L, B, S, KV, hd]`` cache that the token loop carries; XLA may copy such a slice inside
a ``while_loop`` before reading it, as it does the weights' slices (``stacked_matmul``). This
kernel takes the whole cache and the layer as data, reads only each sequence's valid slots
(``lengths``), and fuses the scores, the softmax and the weighted sum (an online softmax, as in
flash-decoding). The slots of a (sequence, kv head) are split over ``num_splits`` programs so that
batch 1 still fills the GPU; XLA combines the splits' partial results (one small fusion).

**o's shrink ahead** (``o_shrink``, DESIGN.md §8): at decode the o projection's LoRA shrink
``xa[b, s] = slot_weights[b, s] * out[b] @ A_o[adapted, slot_experts[s]]`` would be one more
small launch per layer. The combine is linear in each split's unnormalised accumulator, so each
program also multiplies its heads' accumulator rows by the matching rows of ``A_o`` (head ``h``:
rows ``h hd .. (h + 1) hd``) for its sequence's own slots, and the same combine (same rescaling
weights, same softmax denominators) sums them over splits and heads. Gather slots only (row
``b``'s slots are ``b k .. b k + k - 1``, as ``lora_shrink.route_slots`` lays them out): with
dense slots every program would read every expert.

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

from ._blocks import check_rank, compiler_params, is_block, largest_divisor, pad_rows, row_blocks
from ._checks import check_adapted, check_layer, check_slots, is_concrete
from ._slots import PackedXa
from ._tiles import SCALAR, dot_f32, whole
from .lora_shrink import lora_shrink

__all__ = ["AttentionBlocks", "OShrink", "decode_attention", "decode_attention_reference",
           "default_blocks", "supports"]

# Programs to aim for when splitting the slots: two waves of an H100's 132 SMs (not measured).
_TARGET_PROGRAMS = 264
# Scores of masked slots: finite, so that an all-masked split gives exp(NEG - max) = 0, not NaN.
_NEG = -1e30
# A_o tiles a program may load before its slot loop (their latency then hides behind it); more
# are loaded after it (not measured: a Llama-2-7B program holds one 8 KiB tile, bf16).
_PREFETCH_BYTES = 16 * 1024


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OShrink:
    """The o projection's LoRA shrink that :func:`decode_attention` computes along: ``a``
    ``[La, E, H * hd, r]`` stacked ``A_o`` experts read at ``adapted_layer`` (may be traced);
    gather slots ``slot_experts [S]`` and ``slot_weights [B, S]`` of
    ``lora_shrink.route_slots`` (``S = B k < E``; row ``b``'s weights zero outside its own
    slots ``b k .. b k + k - 1``)."""

    a: jax.Array
    adapted_layer: jax.Array | int
    slot_experts: jax.Array
    slot_weights: jax.Array


def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               layer: jax.Array | int, lengths: jax.Array,
                               o_shrink: OShrink | None = None):
    """``q [B, H, hd]`` over slots ``< lengths[b]`` of ``k_cache[layer]``, ``v_cache[layer]``
    (``[L, B, S, KV, hd]``): ``[B, H * hd]`` in ``q.dtype``. Grouped-query softmax attention in
    float32, as the model's ``layers.attention`` computes it for one query. With ``o_shrink``
    also ``lora_shrink`` of the float32 output: ``[B, S, r]`` float32."""
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
    out = out.reshape(B, H * hd)
    if o_shrink is None:
        return out.astype(q.dtype)
    xa = lora_shrink(out, o_shrink.a, o_shrink.adapted_layer, o_shrink.slot_experts,
                     o_shrink.slot_weights)
    return out.astype(q.dtype), xa


def supports(num_slots: int, head_dim: int) -> bool:
    """Whether the kernel tiles the cache: ``S`` a multiple of 16 and ``hd`` a power of two
    ``>= 16`` (Triton blocks are powers of two)."""
    return num_slots % 16 == 0 and is_block(head_dim)


def _o_tiles(a_ref, adapted, slots_ref, b, kv, *, heads, hd, slots, dtype):
    """``A_o[adapted, e]`` rows of each query head ``kv * heads + g`` of this program, for each
    of row ``b``'s slots ``b * slots + j``: ``[hd, r]`` in ``dtype``, indexed ``[g][j]``."""
    experts = [slots_ref[b * slots + j] for j in range(slots)]
    return [[a_ref[adapted, e, pl.ds((kv * heads + g) * hd, hd), :].astype(dtype)
             for e in experts] for g in range(heads)]


def _o_shrink(acc, tiles, xa_ref):
    """Write this program's share of o's shrink into ``xa_ref [Gp, slots_p * r]``: row ``g``,
    columns of slot ``j``: accumulator row ``g`` (its head's unnormalised output) times that
    head's rows of slot ``j``'s ``A_o`` (``tiles[g][j]``); padding rows and slots zero."""
    gp, r = acc.shape[0], tiles[0][0].shape[1]
    rows = jax.lax.broadcasted_iota(jnp.int32, (gp, r), 0)
    for j in range(xa_ref.shape[1] // r):
        part = jnp.zeros((gp, r), jnp.float32)
        for g, head_tiles in enumerate(tiles):
            if j < len(head_tiles):  # a tensor-core dot: every row, only row g kept
                part = jnp.where(rows == g, dot_f32(acc.astype(head_tiles[j].dtype),
                                                    head_tiles[j]), part)
        xa_ref[:, pl.ds(j * r, r)] = part


def _kernel(layer_ref, lengths_ref, q_ref, k_ref, v_ref, *refs, block_s, blocks_per_split, scale,
            shrink):
    # q_ref [Gp, hd]: the query heads of kv head `kv` (rows past G are zeros); k_ref, v_ref
    # [L, B, S, KV, hd] whole (in HBM); o_ref [Gp, hd], m_ref, l_ref [Gp]: this split's
    # unnormalised output, running max and softmax denominator (float32). With ``shrink``
    # (``(G, slots per row, prefetch)``): adapted_ref, slots_ref [S], a_ref [La, E, H hd, r]
    # whole, and xa_ref [Gp, slots_p r], this split's unnormalised share of o's shrink.
    b, kv, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if shrink is None:
        o_ref, m_ref, l_ref = refs
    else:
        adapted_ref, slots_ref, a_ref, o_ref, m_ref, l_ref, xa_ref = refs
    # A length past the cache attends to all of it, as the reference does (no read past S).
    layer, length = layer_ref[()], jnp.minimum(lengths_ref[b], k_ref.shape[2])
    q = q_ref[...]
    gp, hd = q.shape
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(length, block_s))
    if shrink is not None:
        heads, slots, prefetch = shrink
        load = functools.partial(_o_tiles, a_ref, adapted_ref[()], slots_ref, b, kv, heads=heads,
                                 hd=hd, slots=slots, dtype=q.dtype)
        tiles = load() if prefetch else None

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

    init = (jnp.full((gp,), _NEG, jnp.float32), jnp.zeros((gp,), jnp.float32),
            jnp.zeros((gp, hd), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first, last, body, init)  # empty past the sequence's length
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l
    if shrink is not None:
        _o_shrink(acc, tiles if prefetch else load(), xa_ref)


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
    o_shrink: OShrink | None = None,
    blocks: AttentionBlocks | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, PackedXa]:
    """Grouped-query attention of ``q [B, H, hd]`` (one new token per sequence, RoPE applied)
    over the slots ``< lengths[b]`` of ``k_cache[layer]`` and ``v_cache[layer]``.

    Args:
      q: ``[B, H, hd]``; ``H`` a multiple of ``KV``.
      k_cache, v_cache: ``[L, B, S, KV, hd]`` stacked caches, read in place.
      layer: may be traced.
      lengths: ``[B]`` int32, the visible slots of each sequence (its new token's position + 1),
        at least 1.
      o_shrink: also compute the o projection's LoRA shrink of the output (gather slots; rank
        a power of two ``>= 16``), which saves o's shrink launch (module doc).
      blocks: default :func:`default_blocks`.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[B, H * hd]`` in ``q.dtype``, equal to :func:`decode_attention_reference`; with
      ``o_shrink`` also its ``xa`` as a :class:`PackedXa` of float32 sums ``[1, Mp, S * r]``
      (``Mp`` the routed kernels' padded rows), which ``routed_projections.routed_matmul``
      takes as is (rounding them to its ``x.dtype`` as ``lora_shrink`` rounds).
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
    # np.asarray: np.min of a concrete jax array under a trace (closed over) gives a tracer.
    if is_concrete(lengths) and lengths.size and not (1 <= np.asarray(lengths).min()
                                                      and np.asarray(lengths).max() <= S):
        raise ValueError(f"lengths must be in [1, S={S}], got {np.asarray(lengths).tolist()}")
    if o_shrink is not None:
        _check_o_shrink(o_shrink, B, q.shape[1] * hd)
        o_shrink = dataclasses.replace(
            o_shrink, adapted_layer=jnp.asarray(o_shrink.adapted_layer, jnp.int32),
            slot_experts=o_shrink.slot_experts.astype(jnp.int32),
            slot_weights=o_shrink.slot_weights.astype(jnp.float32))
    return _decode_attention(q, k_cache, v_cache, jnp.asarray(layer, jnp.int32),
                             lengths.astype(jnp.int32), o_shrink, blocks=bs, interpret=interpret)


def _check_o_shrink(o_shrink: OShrink, batch: int, width: int) -> None:
    """``a [La, E, H hd, r]`` (a kernel rank) and gather slots: ``S = B k < E``, weights
    ``[B, S]`` zero outside each row's own slots (checked when concrete)."""
    a, slot_experts, slot_weights = o_shrink.a, o_shrink.slot_experts, o_shrink.slot_weights
    if a.ndim != 4 or a.shape[2] != width:
        raise ValueError(f"expected o_shrink.a [La, E, H*hd={width}, r], got {a.shape}")
    check_rank(a.shape[3])
    check_slots(slot_experts, slot_weights, batch)
    num_slots, num_experts = slot_experts.shape[0], a.shape[1]
    if num_slots % batch or num_slots >= num_experts:
        raise ValueError(f"o_shrink needs gather slots, S = B*k < E: got S={num_slots}, "
                         f"B={batch}, E={num_experts}")
    check_adapted(o_shrink.adapted_layer, slot_experts, a.shape[:2])
    if is_concrete(slot_weights):
        own = np.kron(np.eye(batch, dtype=bool), np.ones((1, num_slots // batch), dtype=bool))
        if np.any(np.asarray(slot_weights)[~own]):
            raise ValueError("o_shrink.slot_weights must be zero outside each row's own gather "
                             "slots b*k .. b*k+k-1 (route_slots' gather layout)")


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _decode_attention(q, k_cache, v_cache, layer, lengths, o_shrink, *, blocks, interpret):
    _, B, S, KV, hd = k_cache.shape
    H = q.shape[1]
    G = H // KV
    gp = max(16, 1 << (G - 1).bit_length())  # tensor-core dots need 16 rows
    steps = S // blocks.block_s
    splits = min(blocks.num_splits or 1, steps)
    per_split = -(-steps // splits)
    splits = -(-steps // per_split)
    qp = jnp.pad(q.reshape(B, KV, G, hd), ((0, 0), (0, 0), (0, gp - G), (0, 0)))
    operands = [layer, lengths, qp, k_cache, v_cache]
    in_specs = [SCALAR, whole((B,)),
                pl.BlockSpec((None, None, gp, hd), lambda b, k, s: (b, k, 0, 0)),
                whole(k_cache.shape), whole(v_cache.shape)]
    out_specs = [pl.BlockSpec((None, None, None, gp, hd), lambda b, k, s: (b, k, s, 0, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b, k, s: (b, k, s, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b, k, s: (b, k, s, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, KV, splits, gp, hd), jnp.float32),
                 jax.ShapeDtypeStruct((B, KV, splits, gp), jnp.float32),
                 jax.ShapeDtypeStruct((B, KV, splits, gp), jnp.float32)]
    shrink, name = None, f"decode_attention_m{gp}_s{blocks.block_s}_x{splits}"
    if o_shrink is not None:
        a = o_shrink.a
        r, slots = a.shape[3], o_shrink.slot_experts.shape[0] // B
        width = (1 << (slots - 1).bit_length()) * r  # slots padded to a power of two (a block)
        prefetch = G * slots * hd * r * jnp.dtype(q.dtype).itemsize <= _PREFETCH_BYTES
        shrink = (G, slots, prefetch)
        operands += [o_shrink.adapted_layer, o_shrink.slot_experts, a]
        in_specs += [SCALAR, whole(o_shrink.slot_experts.shape), whole(a.shape)]
        out_specs.append(pl.BlockSpec((None, None, None, gp, width),
                                      lambda b, k, s: (b, k, s, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, KV, splits, gp, width), jnp.float32))
        name += f"_oshrink{width}"
    outs = pl.pallas_call(
        functools.partial(_kernel, block_s=blocks.block_s, blocks_per_split=per_split,
                          scale=1.0 / math.sqrt(hd), shrink=shrink),
        grid=(B, KV, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(blocks),
        interpret=interpret,
        name=name,
    )(*operands)
    out, m, l = outs[:3]
    # Combine the splits: rescale each to the common max (splits past the length weigh 0).
    top = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - top)  # [B, KV, splits, gp]
    total = jnp.maximum((l * weight).sum(axis=2), 1e-30)  # [B, KV, gp]
    attended = (out * weight[..., None]).sum(axis=2) / total[..., None]
    attended = attended[:, :, :G].reshape(B, H * hd).astype(q.dtype)
    if o_shrink is None:
        return attended
    # The same rescaling, summed over splits and heads in one reduction whose input already
    # has the routed kernel's layout (row b, its own slots' columns; padding rows zero), so that
    # XLA can make it one fusion: [Mp, S r] float32.
    mp = row_blocks(B)[1]
    scaled = outs[3][:, :, :, :G] * (weight / total[:, :, None])[:, :, :, :G, None]
    scaled = scaled.reshape(B, KV, splits, G, -1, r)[:, :, :, :, :slots]  # [B, KV, sp, G, k, r]
    own = o_shrink.slot_weights.reshape(B, B, slots)[jnp.arange(B), jnp.arange(B)]  # [B, k]
    scaled = scaled * own[:, None, None, None, :, None]
    placed = jnp.eye(mp, B, dtype=jnp.float32)[:, None, None, None, :, None, None] * pad_rows(
        scaled, mp)[:, :, :, :, None]  # [Mp, KV, sp, G, B, k, r]
    xa = placed.sum(axis=(1, 2, 3)).reshape(mp, B * slots * r)
    return attended, PackedXa(xa[None])
