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

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "MAX_BLOCK_M",
    "SCALAR",
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
    "is_block",
    "is_concrete",
    "largest_divisor",
    "out_shape",
    "pad_rows",
    "padded_rows",
    "row_blocks",
    "stream_columns",
    "stream_k",
    "weight_tile",
    "whole",
]

MAX_BLOCK_M = 64  # rows per program of the routed kernels; not measured (decode fits in one)


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


# Shared memory a program may pipeline through: an H100's 227 KiB per block. Estimated as Triton
# buffers K-loop tiles: (num_stages - 1) copies of each streamed tile. The measured 7B defaults
# sit at or under it with 16 rows (qkv, n128 k128 st3: 3 branches x 2 x (16 + 128) x 128 x 2 B
# = 221 KiB, compiled and ran on an H100); more rows need shallower K steps.
SHARED_MEMORY_BYTES = 227 * 1024


def fit_shared_memory(bs, block_m: int, widths: tuple[int, ...], itemsize: int = 2):
    """``bs`` with ``block_k`` halved (it still tiles ``K``) until one program's pipelined tiles
    fit :data:`SHARED_MEMORY_BYTES`: per stage an ``x`` tile ``[block_m, block_k]`` and a
    ``[block_k, w]`` tile for each ``w`` in ``widths``, per branch, where each branch (one per
    entry of ``widths``: qkv's three projections are separate code paths) keeps its own buffers.

    The defaults were measured with 16 rows; decode at batch 17-64 pads to 32 or 64 rows, where
    the same blocks would not compile."""
    import dataclasses

    def estimate(block_k):
        return sum((bs.num_stages - 1) * (block_m + w) * block_k * itemsize for w in widths)

    block_k = bs.block_k
    while block_k > 16 and estimate(block_k) > SHARED_MEMORY_BYTES:
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
