"""RMSNorm with the LoRA shrink of its output in the same launch (Pallas, Triton).

At decode a projection group's input is ``x = rms_norm(h) * w[layer]`` (``q, k, v`` and
``gate, up``), and its routed LoRA term needs ``x @ A`` of every slot before the projection
kernel can expand it (``lora_shrink`` explains the slots). Computed apart, the shrink is a launch
of its own per group, short and bound by latency: on an H100 at Llama-2-7B shapes the three
shrink launches of a layer took about 0.4 ms of device time per step at batch 1 and 8
(``eval/results/profile/``). Here the norm's kernel does both: each program normalises a chunk
of ``K`` for a block of rows and multiplies it by that chunk of each slot's ``A``. The rows'
inverse RMS comes in computed (one XLA reduction, which fuses with the residual add before it):
a sum of squares over all of ``K`` in every program, a chain of 16 dependent loads, made the
kernel cost more than the launch it saves (on an H100, 1.61x the backbone's decode time at
batch 1 against 1.13x without it: ``eval/results/adapters/bench_adapters_issue4_norm.md``). The shrink's float32 partial sums, one per
chunk, go to the routed kernels packed (``PackedXa [chunks, Mp, S r]``), which add them up
as they do a split shrink's.

``rms_norm_shrink`` returns ``x [M, K]`` (``layers.rms_norm``'s, up to the order of the sum of
squares) and the packed shrinks, equal to :func:`rms_norm_shrink_reference`. ``layer``,
``adapted_layer`` and ``slot_experts`` are data (one compile serves all layers and routes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from loraswitch_jax.layers import rms_norm

from ._tiles import (
    MAX_SUMMED_PARTIALS,
    SCALAR,
    PackedXa,
    check_adapted,
    check_layer,
    check_rank,
    check_slots,
    dot_f32,
    group_weights,
    is_block,
    pad_rows,
    row_blocks,
    slot_groups,
    slot_rows_tile,
    whole,
)
from .lora_shrink import lora_shrink_group_reference

__all__ = ["chunks", "rms_norm_shrink", "rms_norm_shrink_reference", "supports"]

_BLOCK_M = 16  # rows per program: decode is one block; tensor-core dots need 16
_UNROLLED_GROUPS = 8  # slot groups per program up to which they are unrolled


def chunks(k: int) -> int:
    """Programs along ``K`` (each normalises and shrinks ``K / chunks`` columns): as many as the
    routed kernels add up in one load (:data:`MAX_SUMMED_PARTIALS`), fewer for small ``K``
    (a chunk is at least 16 columns); 0 when ``K`` is not a power of two times 16 (Triton
    blocks are powers of two)."""
    if not is_block(k):
        return 0
    return min(MAX_SUMMED_PARTIALS, k // 16)


def supports(k: int, *ranks: int) -> bool:
    """Whether the kernel tiles ``K`` (a power of two ``>= 16``) and the ranks (powers of two
    ``>= 16``)."""
    return chunks(k) > 0 and all(is_block(r) for r in ranks)


def rms_norm_shrink_reference(h, weight, layer, eps, a, adapted_layer, slot_experts,
                              slot_weights):
    """``x = layers.rms_norm(h, weight[layer], eps)`` and ``lora_shrink(x, a_p, ...)`` of each
    stack ``a_p`` in ``a``, ``[M, S, r_p]``."""
    x = rms_norm(h, weight[layer], eps)
    return x, lora_shrink_group_reference(x, a, adapted_layer, slot_experts, slot_weights)


def _kernel(layer_ref, adapted_ref, slots_ref, h_ref, inv_ref, w_ref, sw_ref, *refs, num_rows,
            chunk, dense, zeros_rank):
    # Program (c, i, p): h_ref [M, K], inv_ref [Mp], w_ref [L, K], sw_ref [S, Mp], a refs
    # [La, E, K, r_p] whole (in HBM); x_ref [Mp, K] and o refs [chunks, Mp, S r_p] whole: this
    # program writes rows block i of chunk c of x (p == 0) and of projection p's partial shrink;
    # with zeros_rank, z_ref [Mp, S zeros_rank] last, zeroed by the programs of c == p == 0.
    if zeros_rank:
        *refs, z_ref = refs
    a_refs, (x_ref, *o_refs) = refs[:len(refs) // 2], refs[len(refs) // 2:]
    c, i, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(i * _BLOCK_M, _BLOCK_M)
    if zeros_rank:
        @pl.when((c == 0) & (p == 0))
        def _():
            for first, count in slot_groups(slots_ref.shape[0], zeros_rank):
                z_ref[rows, pl.ds(first * zeros_rank, count * zeros_rank)] = jnp.zeros(
                    (_BLOCK_M, count * zeros_rank), jnp.float32)

    real = i * _BLOCK_M + jax.lax.broadcasted_iota(jnp.int32, (_BLOCK_M, chunk), 0) < num_rows
    h = plgpu.load(h_ref.at[rows, pl.ds(c * chunk, chunk)], mask=real, other=0)  # 0 past M
    gain = w_ref[layer_ref[()], pl.ds(c * chunk, chunk)].astype(jnp.float32)
    x = (h.astype(jnp.float32) * inv_ref[rows][:, None] * gain[None, :]).astype(x_ref.dtype)

    @pl.when(p == 0)
    def _():
        x_ref[rows, pl.ds(c * chunk, chunk)] = x

    adapted = adapted_ref[()]
    num_slots = slots_ref.shape[0]

    def shrink(a_ref, o_ref):
        r = a_ref.shape[3]

        def add(first, count):
            a = slot_rows_tile(a_ref, adapted, slots_ref, c * chunk, chunk, first, count, dense)
            weights = group_weights(lambda s: sw_ref[s, rows], first, count, r, _BLOCK_M)
            o_ref[c, rows, pl.ds(first * r, count * r)] = dot_f32(x, a.astype(x.dtype)) * weights

        groups = slot_groups(num_slots, r)
        full = [g for g in groups if g[1] == groups[0][1]]
        if len(full) > _UNROLLED_GROUPS:
            count = full[0][1]
            jax.lax.fori_loop(0, len(full), lambda g, carry: (add(g * count, count), carry)[1], 0)
            groups = groups[len(full):]
        for first, count in groups:
            add(first, count)

    for q, (a_ref, o_ref) in enumerate(zip(a_refs, o_refs)):
        pl.when(p == q)(functools.partial(shrink, a_ref, o_ref))


def _check(h, weight, a, slot_experts, slot_weights) -> None:
    if h.ndim != 2:
        raise ValueError(f"expected h [M, K], got {h.shape=}")
    m, k = h.shape
    if weight.ndim != 2 or weight.shape[1] != k:
        raise ValueError(f"expected the norm's weight stack [L, K={k}], got {weight.shape}")
    if not a:
        raise ValueError("rms_norm_shrink needs at least one a stack")
    for q, a_q in enumerate(a):
        if a_q.ndim != 4 or a_q.shape[2] != k:
            raise ValueError(f"expected a[{q}] [La, E, K={k}, r], got {a_q.shape}")
        check_rank(a_q.shape[3])
    if len({a_q.shape[:2] for a_q in a}) > 1:
        raise ValueError(f"a stacks have different (La, E): {[a_q.shape for a_q in a]}")
    if not chunks(k):
        raise ValueError(f"the norm-shrink kernel needs K a power of two >= 16, got K={k}")
    check_slots(slot_experts, slot_weights, m)


def rms_norm_shrink(
    h: jax.Array,
    weight: jax.Array,
    layer: jax.Array | int,
    eps: float,
    a: tuple[jax.Array, ...],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    *,
    zeros_rank: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, tuple[PackedXa, ...]] | tuple[jax.Array, tuple[PackedXa, ...], jax.Array]:
    """RMSNorm of ``h`` and the LoRA shrinks of the result, in one launch.

    Args:
      h: ``[M, K]`` the residual stream (``K`` a power of two ``>= 16``).
      weight: ``[L, K]`` stacked norm weights, read at ``layer`` (may be traced).
      eps: the norm's epsilon.
      a: the projections' ``[La, E, K, r_p]`` stacked LoRA ``A`` experts (one ``(La, E)``,
        ranks powers of two ``>= 16``).
      adapted_layer: index into ``La``, may be traced.
      slot_experts, slot_weights: ``[S]`` and ``[M, S]`` from ``lora_shrink.route_slots``.
      zeros_rank: also return float32 zeros ``[Mp, S * zeros_rank]``, written by the kernel:
        where the gate/up kernel's epilogue adds up the down projection's shrink
        (``routed_gate_up_matmul``'s ``down_shrink``), which then needs no launch to zero it.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``x [M, K]`` in ``h.dtype`` and one :class:`PackedXa` of float32 partial sums ``[chunks,
      Mp, S r_p]`` per stack, which the routed kernels add up and round to ``h.dtype``; with
      ``zeros_rank``, the zeros third.
    """
    a = tuple(a)
    _check(h, weight, a, slot_experts, slot_weights)
    if zeros_rank is not None:
        check_rank(zeros_rank)
    check_layer(layer, weight.shape[0])
    check_adapted(adapted_layer, slot_experts, a[0].shape[:2])
    return _rms_norm_shrink(h, weight, jnp.asarray(layer, jnp.int32),
                            jnp.asarray(adapted_layer, jnp.int32), a,
                            slot_experts.astype(jnp.int32), slot_weights, eps=float(eps),
                            zeros_rank=zeros_rank, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "zeros_rank", "interpret"))
def _rms_norm_shrink(h, weight, layer, adapted_layer, a, slot_experts, slot_weights, *, eps,
                     zeros_rank, interpret):
    m, k = h.shape
    num_chunks = chunks(k)
    chunk = k // num_chunks
    mp = row_blocks(m)[1]  # the routed kernels' padded rows
    num_slots = slot_experts.shape[0]
    dense = num_slots == a[0].shape[1]
    out_shapes = [jax.ShapeDtypeStruct((mp, k), h.dtype)] + [
        jax.ShapeDtypeStruct((num_chunks, mp, num_slots * a_q.shape[3]), jnp.float32) for a_q in a]
    if zeros_rank:
        out_shapes.append(jax.ShapeDtypeStruct((mp, num_slots * zeros_rank), jnp.float32))
    h32 = h.astype(jnp.float32)  # the inverse RMS as layers.rms_norm computes it
    inv = jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1) + eps)
    outs = pl.pallas_call(
        functools.partial(_kernel, num_rows=m, chunk=chunk, dense=dense, zeros_rank=zeros_rank),
        grid=(num_chunks, mp // _BLOCK_M, len(a)),
        in_specs=[SCALAR, SCALAR, whole(slot_experts.shape), whole(h.shape), whole((mp,)),
                  whole(weight.shape), whole((num_slots, mp)), *(whole(a_q.shape) for a_q in a)],
        out_specs=[whole(s.shape) for s in out_shapes],
        out_shape=out_shapes,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"rms_norm_shrink{len(a)}_c{chunk}",
    )(layer, adapted_layer, slot_experts, h, pad_rows(inv, mp), weight,
      pad_rows(slot_weights.astype(jnp.float32), mp).T, *a)
    x, xas = outs[0][:m], tuple(PackedXa(xa) for xa in outs[1:1 + len(a)])
    return (x, xas, outs[-1]) if zeros_rank else (x, xas)
