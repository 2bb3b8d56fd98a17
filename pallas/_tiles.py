"""Building blocks shared by the Pallas kernel modules (private to ``pallas``).

Every kernel here reads stacked operands in place (weights ``[L, K, N]``, LoRA experts
``[La, E, K, r]`` and ``[La, E, r, N]``) at indices passed as data, so one compile serves every
layer and route, also inside ``scan``/``while_loop``. Each program streams ``K`` in steps of
``block_k`` rows into float32 accumulators, and rows are padded to a power of two ``>= 16``:
Triton loads and dots need power-of-two block sizes (48 rows fail to lower) and tensor-core dots
need every dimension ``>= 16``. This module holds those pieces once: the K loop and its tile
loaders, the bias epilogue, row blocks and padding, ``pallas_call`` specs and names, and the
checks of block sizes and of indices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "GROUP_COLUMNS",
    "MAX_BLOCK_M",
    "PackedXa",
    "SCALAR",
    "SHARED_MEMORY_BYTES",
    "bias_row",
    "blocks_name",
    "check_adapted",
    "check_block_sizes",
    "check_experts",
    "check_layer",
    "check_rank",
    "check_slots",
    "compiler_params",
    "dot_f32",
    "expert_tile",
    "fit_shared_memory",
    "group_weights",
    "is_block",
    "is_concrete",
    "largest_divisor",
    "out_shape",
    "pad_rows",
    "padded_rows",
    "row_blocks",
    "shared_memory_bytes",
    "slot_groups",
    "slot_rows_tile",
    "stream_columns",
    "stream_k",
    "summable_partials",
    "weight_tile",
    "whole",
]

MAX_BLOCK_M = 64  # rows per program of the routed kernels; not measured (decode fits in one)
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
    """Whether the routed kernels can add up ``split_k`` partial sums themselves: one block load, so a power of two (Triton block sizes) and at most :data:`MAX_SUMMED_PARTIALS`."""
    return split_k == 1 or (is_block(split_k * 16) and split_k <= MAX_SUMMED_PARTIALS)


# ---------------------------------------------------------------------------------------------
# Block sizes and rows


def is_block(b: int) -> bool:
    """Whether ``b`` is a power of two ``>= 16`` (a Triton block size a tensor-core dot takes)."""
    return b >= 16 and b & (b - 1) == 0


def largest_divisor(n: int, candidates) -> int:
    """The first of ``candidates`` that divides ``n``."""
    for c in candidates:
        if n % c == 0:
            return c
    raise ValueError(f"no block size in {tuple(candidates)} divides {n}")


def check_block_sizes(bs, k: int, ns: dict[str, int]) -> None:
    """``bs`` (a ``stacked_matmul.BlockSizes``) tiles ``K`` and each named output width."""
    if not (is_block(bs.block_n) and is_block(bs.block_k)) or bs.split_k < 1:
        raise ValueError(f"{bs}: block_n and block_k must be powers of two >= 16, split_k >= 1")
    for name, n in ns.items():
        if n % bs.block_n:
            raise ValueError(f"{bs} does not tile {name}={n} (block_n must divide it)")
    if k % (bs.block_k * bs.split_k):
        raise ValueError(f"{bs} does not tile K={k} (block_k * split_k must divide it)")


# Shared memory a program may pipeline through: an H100's 227 KiB per block (232448 B).
SHARED_MEMORY_BYTES = 227 * 1024


def shared_memory_bytes(bs, block_m: int, branches: tuple[tuple[int, ...], ...],
                        itemsize: int = 2) -> int:
    """Estimated shared memory of one program's K-loop buffers: per branch (a code path of its
    own, e.g. one of q, k, v; each keeps its own buffers) an ``x`` tile ``[block_m, block_k]``
    plus a ``[block_k, w]`` tile for each width ``w`` it streams (``gate`` and ``up`` share one
    branch), in ``num_stages`` copies for a single branch and ``num_stages - 1`` for several.

    An empirical fit to what Triton asked for on an H100 (JAX 0.11.2), not a derivation: exact
    for gate/up at 64 rows, n128 k128 st3 (245760 B) and for q/k/v with the inline shrink at 16
    rows, two rank-16 slots (270336 B); q/k/v at 16 rows (n128 k128 st3: 221184 B) and the q/k/v
    shrink (k512, r16) compiled and ran; q/k/v n64 k256 (245760 B) did not."""
    copies = bs.num_stages if len(branches) == 1 else bs.num_stages - 1
    return copies * itemsize * bs.block_k * sum(block_m + sum(w) for w in branches)


def fit_shared_memory(bs, block_m: int, branches: tuple[tuple[int, ...], ...], itemsize: int = 2):
    """``bs`` with ``block_k`` halved (it still tiles ``K``) until :func:`shared_memory_bytes`
    fits :data:`SHARED_MEMORY_BYTES`. The defaults were measured with 16 rows; decode at batch
    17-64 pads to 32 or 64 rows, and the inline shrink streams ``A`` tiles beside ``W``, where
    the same blocks would not compile."""
    block_k = bs.block_k
    while block_k > 16 and shared_memory_bytes(dataclasses.replace(bs, block_k=block_k), block_m,
                                               branches, itemsize) > SHARED_MEMORY_BYTES:
        block_k //= 2
    return bs if block_k == bs.block_k else dataclasses.replace(bs, block_k=block_k)


def check_rank(r: int) -> None:
    """The LoRA rank is loaded as ``[rows, r]`` blocks: a power of two ``>= 16``."""
    if not is_block(r):
        raise ValueError(f"rank r={r} must be a power of two >= 16 for the kernel (Triton "
                         f"block sizes); use the reference for other ranks")


def blocks_name(bs) -> str:
    """``bs`` (a ``stacked_matmul.BlockSizes``) as a ``pallas_call`` name suffix."""
    return f"n{bs.block_n}_k{bs.block_k}_s{bs.split_k}_w{bs.num_warps}_st{bs.num_stages}"


def compiler_params(bs):
    """Triton compiler parameters of block sizes with ``num_warps`` and ``num_stages``."""
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def padded_rows(m: int) -> int:
    """Rows padded to a power of two >= 16: Triton blocks must be powers of two (48 fails)."""
    return max(16, 1 << (m - 1).bit_length())


def row_blocks(m: int) -> tuple[int, int]:
    """``(block_m, padded M)``: a power of two in [16, 64] rows per program, rows padded to it."""
    block_m = min(MAX_BLOCK_M, padded_rows(m))
    return block_m, -(-m // block_m) * block_m


def pad_rows(a: jax.Array, rows: int) -> jax.Array:
    """``a`` with zero rows appended along axis 0 up to ``rows``."""
    return jnp.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))


# ---------------------------------------------------------------------------------------------
# pallas_call pieces

SCALAR = pl.BlockSpec((), lambda *_: ())


def whole(shape) -> pl.BlockSpec:
    """The whole array in every program (left in HBM; the kernel loads its own tiles)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def out_shape(mp: int, n: int, split_k: int, dtype) -> jax.ShapeDtypeStruct:
    """``[Mp, N]`` in ``dtype``, or ``[split_k, Mp, N]`` float32 partial sums for XLA to reduce."""
    if split_k == 1:
        return jax.ShapeDtypeStruct((mp, n), dtype)
    return jax.ShapeDtypeStruct((split_k, mp, n), jnp.float32)


# ---------------------------------------------------------------------------------------------
# The K loop and its tiles (inside kernels)


def dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` with float32 accumulation. Float32 operands get full float32 precision: Triton
    would otherwise take TF32 (~1e-3), and float32 runs are the parity runs."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def stream_k(x_ref, tiles, first, steps, *, block_k):
    """``x[:, K-chunk] @ m[K-chunk]`` for each ``(tile, width)`` in ``tiles``, where
    ``tile(rows)`` loads ``m[rows]`` (``[block_k, width]``): float32 ``[block_m, width]`` each.

    The K loop of every kernel, over ``steps`` blocks of ``block_k`` rows from ``first``. All
    tiles share it, so ``x`` is loaded once per step whether it meets ``W`` columns, ``A``
    experts or both.
    """

    def body(i, accs):
        rows = pl.ds(first + i * block_k, block_k)
        x = x_ref[:, rows]  # [block_m, block_k]
        return tuple(acc + dot_f32(x, tile(rows).astype(x.dtype))
                     for acc, (tile, _) in zip(accs, tiles))

    zeros = tuple(jnp.zeros((x_ref.shape[0], width), jnp.float32) for _, width in tiles)
    return jax.lax.fori_loop(0, steps, body, zeros)


def stream_columns(x_ref, w_refs, layer, col_block, split, *, block_k, block_n, k_per_split):
    """``x[:, K-chunk] @ w[layer][K-chunk, cols]`` for each stacked ``w [L, K, N]`` in ``w_refs``,
    over column block ``col_block`` and split ``split``'s K chunk: float32 ``[block_m, block_n]``
    each. All weights of one program share the loop, so ``x`` is loaded once per K step."""
    cols = pl.ds(col_block * block_n, block_n)
    tiles = [weight_tile(w_ref, layer, cols, block_n) for w_ref in w_refs]
    return stream_k(x_ref, tiles, split * k_per_split, k_per_split // block_k, block_k=block_k)


def weight_tile(w_ref, layer, cols, block_n):
    """Rows of ``w[layer][:, cols]`` from a stacked ``w [L, K, N]``, for :func:`stream_k`."""
    return (lambda rows: w_ref[layer, rows, cols]), block_n


def expert_tile(a_ref, adapted, expert):
    """Rows of ``a[adapted, expert]`` from a stacked ``a [La, E, K, r]``, for :func:`stream_k`."""
    return (lambda rows: a_ref[adapted, expert, rows, :]), a_ref.shape[3]


def bias_row(b_ref, layer, col_block, block_n):
    """Column block ``col_block`` of ``bias[layer]`` (``bias [L, N]``), float32 ``[1, block_n]``."""
    return b_ref[layer, pl.ds(col_block * block_n, block_n)].astype(jnp.float32)[None, :]


# ---------------------------------------------------------------------------------------------
# Checks of indices passed as data (only concrete ones can be checked; traced ones must be in
# range: they are not clamped)


def is_concrete(a) -> bool:
    """Whether ``a`` has values now (not a tracer)."""
    return not isinstance(a, jax.core.Tracer)


def check_layer(layer, num_layers: int) -> None:
    """A concrete ``layer`` indexes one of ``num_layers`` stacked layers."""
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for {num_layers} stacked layers")


def check_experts(ids: np.ndarray, num_experts: int, name: str) -> None:
    """Expert indices ``ids`` (named ``name`` in the error) are in ``[0, num_experts)``."""
    if ids.size and not (0 <= ids.min() and ids.max() < num_experts):
        raise ValueError(f"{name} must be in [0, {num_experts}), got values in "
                         f"[{ids.min()}, {ids.max()}]")


def check_adapted(adapted_layer, slot_experts, stacked: tuple[int, int]) -> None:
    """``adapted_layer`` and ``slot_experts`` in range of a ``[La, E, ...]`` stack, if concrete."""
    if isinstance(adapted_layer, (int, np.integer)) and not 0 <= adapted_layer < stacked[0]:
        raise ValueError(f"adapted_layer {adapted_layer} out of range for {stacked[0]} adapted "
                         f"layers")
    if is_concrete(slot_experts):
        check_experts(np.asarray(slot_experts), stacked[1], "slot_experts")


def check_slots(slot_experts, slot_weights=None, num_rows: int | None = None) -> None:
    """``slot_experts [S]`` integers and, when given, ``slot_weights [M = num_rows, S]``."""
    if slot_experts.ndim != 1 or not jnp.issubdtype(slot_experts.dtype, jnp.integer):
        raise ValueError(f"expected slot_experts [S] integers, got shape {slot_experts.shape} "
                         f"and dtype {slot_experts.dtype}")
    if slot_weights is not None and slot_weights.shape != (num_rows, slot_experts.shape[0]):
        raise ValueError(f"expected slot_weights [M, S] = {(num_rows, slot_experts.shape[0])}, "
                         f"got {slot_weights.shape}")


# ---------------------------------------------------------------------------------------------
# Slots side by side (one dot for several slots)


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
