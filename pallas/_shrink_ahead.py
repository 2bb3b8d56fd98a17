"""LoRA shrinks computed ahead, in the epilogue of the launch before their consumer (private to
``pallas``; DESIGN.md §8, shrink-ahead).

**down's**, from the gate/up kernel (:func:`shrink_down`): each column block of the activations
adds its share into the packed ``xa`` with atomic adds.

**The next normed projections'**, with the RMSNorm folded out: the MLP reads ``x =
rms_norm(h_mid) * g`` with ``h_mid = h + o_out``, so its ``x A`` is ``s * ((h_mid * g) A)``
with ``s = rsqrt(mean(h_mid^2) + eps)`` per row. The o projection's routed kernel, which writes
``o_out`` by column blocks, can therefore compute gate/up's shrink in its epilogue: each program
``p`` adds the residual to its block, writes ``h_mid`` there and two per-program partials,
``xa[p] = (h_mid[:, block] * g[block]) @ A[slot][block rows]`` (times the slot weights) and
``ss[p] = sum h_mid[:, block]^2``. The consumer (the routed gate/up kernel) adds them up before
its K loop and applies ``s``: plain stores, no atomics, no zeroing. Down's kernel computes the
next layer's q/k/v shrink the same way (``ResidualAhead``'s layers). The producer runs unsplit
(``h_mid`` and its squares need the whole K sum): ``routed_matmul_residual`` turns a default
split into narrower column blocks, as many programs (Llama-2-7B: o n128 s4 -> n32, down n64 s4
-> n16; not yet timed).

:func:`write_partials` is the producer's epilogue, :func:`load_xa` the consumer's read of any
given ``xa`` (packed, split partial sums, or :class:`NormedXa`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._slots import group_weights, slot_groups, slot_rows_tile
from ._tiles import dot_f32
from .tuned import UNROLLED_GROUPS

__all__ = ["NormedXa", "ResidualAhead", "load_xa", "normed_xa_value", "shrink_down",
           "write_partials"]

# Elements of one load of partials, [chunk, rows, columns] float32 (16 KiB, in registers): one
# load per slot at decode (rows 1, r 16: up to 256 partials), a loop of chunks for row blocks.
_CHUNK_ELEMENTS = 4096


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormedXa:
    """A shrink ``x A`` of ``x = rms_norm(h_mid) * g`` in per-program partials: ``xa [P, Mp,
    S * r]`` float32 sums of ``(h_mid * g) A`` times the slot weights (the packed layout of
    ``PackedXa``) and ``ss [Q, Mp]`` float32 sums of ``h_mid^2``; ``x A = s * sum_p xa[p]`` with
    ``s = rsqrt(sum_q ss[q] / width + eps)``. The routed kernels take it as a projection's
    ``xa``."""

    xa: jax.Array
    ss: jax.Array
    eps: float = dataclasses.field(metadata=dict(static=True))
    width: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidualAhead:
    """What a projection's routed kernel needs to add the residual and compute the next
    projections' shrink ahead: ``h [M, N]`` the residual (``x.dtype``), ``norm [L, N]`` the
    stacked RMSNorm weights read at ``norm_layer``, ``eps``, ``a``: the next projections'
    ``[La, E, N, r]`` stacks read at ``a_layer``, ``slot_weights [M, S]`` of
    ``lora_shrink.route_slots`` (gather slots). ``norm_layer`` and ``a_layer`` may be traced;
    ``None``: the projection's own ``layer`` and ``adapted_layer`` (o then gate/up; down then
    the next layer's q/k/v reads ``layer + 1``)."""

    h: jax.Array
    norm: jax.Array
    a: tuple[jax.Array, ...]
    slot_weights: jax.Array
    eps: float = dataclasses.field(metadata=dict(static=True))
    norm_layer: jax.Array | int | None = None
    a_layer: jax.Array | int | None = None


def normed_xa_value(xa: NormedXa, num_rows: int, rank: int, dtype) -> jax.Array:
    """The shrink that ``xa`` holds, ``[M, S, r]`` in ``dtype`` (jnp, for tests)."""
    s = jax.lax.rsqrt(xa.ss.sum(axis=0) / xa.width + xa.eps)  # [Mp]
    out = (xa.xa.sum(axis=0) * s[:, None])[:num_rows].astype(dtype)
    return out.reshape(num_rows, -1, rank)


def _sum_partials(ref, index):
    """``sum_p ref[p, *index]`` float32 over all partials ``p``, loaded in chunks (a loop past
    one): the most partials that divide their count, are a power of two and hold at most
    :data:`_CHUNK_ELEMENTS` elements."""
    count = ref.shape[0]
    size = 1
    for dim, i in zip(ref.shape[1:], index):
        size *= dim if isinstance(i, slice) else i.size
    chunk = 1
    while count % (2 * chunk) == 0 and 2 * chunk * size <= _CHUNK_ELEMENTS:
        chunk *= 2
    if chunk == count:
        return ref[(slice(None), *index)].astype(jnp.float32).sum(axis=0)

    def body(i, acc):
        return acc + ref[(pl.ds(i * chunk, chunk), *index)].astype(jnp.float32).sum(axis=0)

    first = ref[(pl.ds(0, chunk), *index)].astype(jnp.float32).sum(axis=0)
    return jax.lax.fori_loop(1, count // chunk, body, first)


def load_xa(xa_refs, rows, cols, dtype, fold):
    """Rows ``rows`` and columns ``cols`` (``pl.ds``) of a given shrink in ``dtype``, as the
    projection's expansion reads it: ``xa_refs`` is ``(xa_ref,)``, packed ``[block_m, S r]`` or
    split partial sums ``[split_k, block_m, S r]`` (added up and rounded as ``lora_shrink``
    rounds), or ``(xa_ref, ss_ref)`` of a :class:`NormedXa` with ``fold = (eps, width)``."""
    xa_ref = xa_refs[0]
    if len(xa_ref.shape) == 2:
        return xa_ref[rows, cols]
    if fold is None:  # a split shrink's partial sums (at most 16): one load
        return xa_ref[:, rows, cols].sum(axis=0).astype(dtype)
    eps, width = fold
    ss = _sum_partials(xa_refs[1], (rows,))
    xa = _sum_partials(xa_ref, (rows, cols)) * jax.lax.rsqrt(ss / width + eps)[:, None]
    return xa.astype(dtype)


def write_partials(acc, refs, outs, slots_ref, col_block, block_n):
    """A projection's epilogue with a :class:`ResidualAhead`: ``h_mid = h + acc`` (``acc``
    rounded to the output dtype first, as ``h + y`` rounds) into ``o_ref``, and this program's
    partials of each next projection's :class:`NormedXa`: ``xa[p]`` into ``xa_refs``
    (``[block_m, S r]`` each) and ``ss[p]`` into ``ss_ref`` (``[block_m]``).

    ``refs``: the scalars ``norm_layer`` and ``a_layer``, ``h_ref [block_m, block_n]``,
    ``norm_ref [L, N]`` whole, the ``a`` refs ``[La, E, N, r]`` whole, ``sw_ref [S,
    block_m]``. Slots go in groups of up to ``GROUP_COLUMNS`` columns (``slot_groups``), one dot
    each."""
    norm_layer_ref, a_layer_ref, h_ref, norm_ref, *a_refs, sw_ref = refs
    layer, adapted = norm_layer_ref[()], a_layer_ref[()]
    o_ref, *xa_refs, ss_ref = outs
    dtype = o_ref.dtype
    h_mid = (h_ref[...].astype(jnp.float32) + acc.astype(dtype).astype(jnp.float32)).astype(dtype)
    o_ref[...] = h_mid
    v = h_mid.astype(jnp.float32)
    ss_ref[...] = (v * v).sum(axis=1)
    g = norm_ref[layer, pl.ds(col_block * block_n, block_n)].astype(jnp.float32)
    vg = (v * g[None, :]).astype(dtype)
    block_m, num_slots = v.shape[0], slots_ref.shape[0]
    for a_ref, xa_ref in zip(a_refs, xa_refs):
        r = a_ref.shape[3]
        for first, count in slot_groups(num_slots, r):
            a = slot_rows_tile(a_ref, adapted, slots_ref, col_block * block_n, block_n, first,
                               count, False)
            part = dot_f32(vg, a.astype(dtype)) * group_weights(lambda s: sw_ref[s], first,
                                                                 count, r, block_m)
            xa_ref[:, pl.ds(first * r, count * r)] = part


def shrink_down(act, down_refs, xa_ref, ids, col_block, row_block, block_n, num_rows,
                 interpret):
    """Add this program's share of the down projection's shrink, ``act[:, cols] @
    a_down[adapted, slot_experts[s]][cols]`` scaled by the slot weights, into the packed
    ``xa [Mp, S r]`` (float32, zeroed before the launch) for every slot ``s``: atomic adds, since
    every column block of the activations contributes to every slot.

    Slots go in groups of up to :data:`GROUP_COLUMNS` columns (:func:`slot_groups`; E 8, r 16:
    one), each one load, one dot and one atomic add: Pallas' atomics are acquire-release, so
    each one waits for the memory operations before it and holds back those after it, and a
    load-dot-atomic chain per slot ran the 8 dense slots of batch 8 one after another (the
    routed gate/up kernel took 18.5 us more per layer than the plain one on an H100; one slot,
    3.9 us: eval/results/profile/llama2-7b_b8_ctx1024.md). Only the ``num_rows`` real rows are added
    (at decode most rows are padding, and the adds of all programs meet at one place);
    interpret mode, which takes no mask, adds the padding rows' zeros too (their slot weights
    are 0)."""
    _, adapted, slots_ref = ids
    a_ref, sw_ref = down_refs
    block_m, r = act.shape[0], a_ref.shape[3]
    num_slots = slots_ref.shape[0]
    dense = num_slots == a_ref.shape[1]
    rows = pl.ds(row_block * block_m, block_m)

    def add(first, count):
        a = slot_rows_tile(a_ref, adapted, slots_ref, col_block * block_n, block_n, first, count,
                           dense)
        part = dot_f32(act, a.astype(act.dtype)) * group_weights(lambda s: sw_ref[s], first,
                                                                   count, r, block_m)
        real = (row_block * block_m + jax.lax.broadcasted_iota(jnp.int32, part.shape, 0)
                < num_rows)
        plgpu.atomic_add(xa_ref, (rows, pl.ds(first * r, count * r)), part,
                         mask=None if interpret else real)

    groups = slot_groups(num_slots, r)
    full = [g for g in groups if g[1] == groups[0][1]]
    if len(full) > UNROLLED_GROUPS:  # e.g. 128 dense slots: a loop over the full groups
        count = full[0][1]
        jax.lax.fori_loop(0, len(full), lambda g, carry: (add(g * count, count), carry)[1], 0)
        groups = groups[len(full):]
    for first, count in groups:
        add(first, count)
