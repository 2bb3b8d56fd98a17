"""The K loop, its tile loads and the ``pallas_call`` specs of the kernels (private to ``pallas``).

Every kernel reads stacked operands in place (weights ``[L, K, N]``, LoRA experts
``[La, E, K, r]`` and ``[La, E, r, N]``) at indices passed as data, so one compile serves every
layer and route, also inside ``scan``/``while_loop``. Each program streams ``K`` in steps of
``block_k`` rows into float32 accumulators (:func:`stream_k`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = [
    "SCALAR",
    "bias_row",
    "dot_f32",
    "expert_tile",
    "out_shape",
    "stream_columns",
    "stream_k",
    "weight_tile",
    "whole",
]


SCALAR = pl.BlockSpec((), lambda *_: ())


def whole(shape) -> pl.BlockSpec:
    """The whole array in every program (left in HBM; the kernel loads its own tiles)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def out_shape(mp: int, n: int, split_k: int, dtype) -> jax.ShapeDtypeStruct:
    """``[Mp, N]`` in ``dtype``, or ``[split_k, Mp, N]`` float32 partial sums for XLA to reduce."""
    if split_k == 1:
        return jax.ShapeDtypeStruct((mp, n), dtype)
    return jax.ShapeDtypeStruct((split_k, mp, n), jnp.float32)


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
