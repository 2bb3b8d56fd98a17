"""Expert slots side by side (private to ``pallas``): the packed layout of a shrink's output and
groups of slots that one dot covers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._blocks import is_block

__all__ = [
    "GROUP_COLUMNS",
    "MAX_SUMMED_PARTIALS",
    "PackedXa",
    "group_weights",
    "slot_groups",
    "slot_rows_tile",
    "summable_partials",
]


GROUP_COLUMNS = 128  # columns of slots (S r) one dot of an expansion or a shrink covers, at most


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedXa:
    """A shrink ``x A`` already in the layout the routed kernels read: ``xa [Mp, S * r]``, rows
    padded to the row blocks (:func:`row_blocks`) and slot ``s`` in columns ``[s r, (s + 1) r)``
    (``[M, S, r]`` with the last two axes merged), as ``lora_shrink_group(..., packed=True)``
    writes it. Handing it on as is saves the slice and pad (small XLA launches) between the two
    kernels of every projection group; at decode such launches, not bytes, set the adapter's
    cost (DESIGN.md §2). With dense slots (one per expert, in order) a row block of it meets
    ``B[layer]`` viewed as ``[E * r, N]`` in a single dot.

    A split shrink (``split_k > 1``) hands on its float32 partial sums, ``xa [split_k, Mp,
    S * r]``, unreduced: the routed kernels add them up and round to ``x.dtype`` as the
    reduction would, which saves the reduction's launch per projection."""

    xa: jax.Array

    @property
    def partial(self) -> bool:
        """Whether ``xa`` holds a split shrink's float32 partial sums ``[split_k, Mp, S * r]``."""
        return self.xa.ndim == 3


MAX_SUMMED_PARTIALS = 16  # a kernel loads all partial sums of a slot as one block


def summable_partials(split_k: int) -> bool:
    """Whether the routed kernels can add up ``split_k`` partial sums themselves: one block load,
    so a power of two (Triton block sizes) and at most :data:`MAX_SUMMED_PARTIALS`."""
    return split_k == 1 or (is_block(split_k * 16) and split_k <= MAX_SUMMED_PARTIALS)


def slot_groups(num_slots: int, rank: int) -> list[tuple[int, int]]:
    """``(first slot, count)`` groups covering the slots in order, each ``count * rank`` columns
    a power of two (a Triton block) and at most :data:`GROUP_COLUMNS` wide: full groups first,
    then the binary decomposition of the rest (6 slots of rank 16: 4 then 2)."""
    most = max(1, GROUP_COLUMNS // rank)
    groups, first = [], 0
    while num_slots - first >= most:
        groups.append((first, most))
        first += most
    for bit in reversed(range(most.bit_length())):
        if (num_slots - first) & (1 << bit):
            groups.append((first, 1 << bit))
            first += 1 << bit
    return groups


def slot_rows_tile(a_ref, adapted, slots_ref, start, size, first, count, dense):
    """Rows ``[start, start + size)`` of ``a[adapted, slot_experts[s]]`` (``a [La, E, K, r]``)
    for slots ``[first, first + count)``, side by side: ``[size, count * r]``, the operand of
    one dot. Dense slots (slot ``e`` is expert ``e``) are consecutive experts: one load
    ``[count, size, r]``, its first two axes swapped. Gather slots read their experts through an
    index array: one load either way, no chain of loads per slot."""
    r = a_ref.shape[3]
    if dense:
        a = a_ref[adapted, pl.ds(first, count), pl.ds(start, size), :]  # [count, size, r]
        return jnp.transpose(a, (1, 0, 2)).reshape(size, count * r)
    column = jax.lax.broadcasted_iota(jnp.int32, (size, count * r), 1)
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, count * r), 0) + start
    expert = jnp.zeros_like(column)
    for j in range(count):
        expert = jnp.where(column // r == j, slots_ref[first + j], expert)
    return a_ref[adapted, expert, rows, column % r]


def group_weights(slot_weights, first, count, r, block_m):
    """The weights of slots ``[first, first + count)`` per column of their group, float32
    ``[block_m, count * r]``; ``slot_weights(s)`` loads slot ``s``'s ``[block_m]``."""
    slot = jax.lax.broadcasted_iota(jnp.int32, (block_m, count * r), 1) // r
    weights = jnp.zeros((block_m, count * r), jnp.float32)
    for j in range(count):
        weights = jnp.where(slot == j, slot_weights(first + j)[:, None], weights)
    return weights
