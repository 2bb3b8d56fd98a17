"""``x @ w[layer]`` reading a layer of a stacked weight in place (Pallas, Triton lowering).

Why a kernel: inside a ``lax.while_loop`` (the device-side token loop) XLA copies each static
slice ``w[l]`` of a loop-invariant stacked weight into a temporary before its matmul, which
made a 7B decode step 2.7x slower than the same step outside a loop (H100, JAX 0.11.2;
eval/results/decode/). This kernel takes the whole ``[L, K, N]`` array and the layer as data, so nothing
is copied, one compiled kernel serves every layer, and it works under ``scan`` too.

Decode is memory bound: the kernel streams ``w[layer]`` once, split along ``N`` (one program per
``block_n`` columns) and along ``K`` (``split_k`` partial sums, reduced by XLA) so that enough
programs run to fill the GPU even at batch 1.

Rows are one block of a power of two ``>= 16`` (the tensor-core dot's minimum) that may overrun
``x``: the kernel loads it with a row mask (zeros past ``M``) and stores only the first ``M`` rows
of the output, so no XLA pad or slice launches around it at decode batch sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._blocks import (
    compiler_params,
    fit_shared_memory,
    largest_divisor,
    masked_rows,
    padded_rows,
    store_rows,
)
from ._tiles import SCALAR, stream_columns, whole

__all__ = ["BlockSizes", "supports", "stacked_matmul", "stacked_matmul_reference"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    block_n: int = 64
    block_k: int = 256
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 3


def stacked_matmul_reference(x: jax.Array, w: jax.Array, layer: jax.Array | int) -> jax.Array:
    """``x [M, K] @ w[layer] [K, N]`` with float32 accumulation, in ``x.dtype``."""
    return jnp.dot(x, w[layer], preferred_element_type=jnp.float32).astype(x.dtype)


def supports(k: int, n: int) -> bool:
    """Whether the kernel tiles ``K`` and ``N`` (multiples of 16; Triton wants power-of-two blocks)."""
    return k % 16 == 0 and n % 16 == 0


# Measured blocks for Llama-2-7B's shapes (K, N), M = 1 bf16: the sweep's numbers in tuned.py.
_TUNED: dict[tuple[int, int], BlockSizes] = {
    (4096, 4096): BlockSizes(block_n=128, block_k=128, split_k=4, num_warps=4, num_stages=3),
    (11008, 4096): BlockSizes(block_n=64, block_k=64, split_k=4, num_warps=4, num_stages=3),
    (4096, 11008): BlockSizes(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3),
}


def default_block_sizes(m: int, k: int, n: int) -> BlockSizes:
    """Measured blocks for known shapes, else blocks that divide the shape with enough programs
    (N/block_n * split_k) to fill ~132 SMs: K is cut into smaller blocks when that is what lets
    it split (11008 = 43 * 256 splits 4 ways only with block_k <= 64)."""
    if (k, n) in _TUNED:  # measured with 16 rows; more rows take shallower K steps
        return fit_shared_memory(_TUNED[(k, n)], padded_rows(m), ((_TUNED[(k, n)].block_n,),))
    block_n = largest_divisor(n, (64, 32, 16))
    programs = n // block_n
    split_k = 1
    while programs * split_k < 256 and split_k < 8 and k // (2 * split_k) >= 256:
        split_k *= 2
    while split_k > 1 and k % (16 * split_k):
        split_k //= 2
    block_k = largest_divisor(k // split_k, (256, 128, 64, 32, 16))
    bs = BlockSizes(block_n=block_n, block_k=block_k, split_k=split_k)
    return fit_shared_memory(bs, padded_rows(m), ((bs.block_n,),))


def _kernel(layer_ref, x_ref, w_ref, o_ref, *, m: int, block_k: int, block_n: int,
            k_per_split: int):
    # x_ref [Mp, K] block of x [M, K]; w_ref [L, K, N] (whole arrays in HBM);
    # o_ref [Mp, block_n] block of split s (rows >= M outside the arrays: masked).
    n, s = pl.program_id(0), pl.program_id(1)
    (acc,) = stream_columns(masked_rows(x_ref, m), (w_ref,), layer_ref[()], n, s,
                            block_k=block_k, block_n=block_n, k_per_split=k_per_split)
    store_rows(o_ref, acc, m)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def stacked_matmul(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array | int,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x [M, K] @ w[layer]`` for a stacked ``w [L, K, N]``; float32 accumulation, ``x.dtype`` out.

    ``layer`` may be traced (a loop index). Rows are read in a block of a power of two >= 16
    for the tensor-core dot, masked past ``M`` (no pad of ``x``, no slice of the output).
    """
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [M, K] and w [L, K, N], got {x.shape=} and {w.shape=}")
    m, k = x.shape
    n = w.shape[2]
    bs = block_sizes or default_block_sizes(m, k, n)
    if n % bs.block_n or k % (bs.block_k * bs.split_k):
        raise ValueError(f"{bs} does not tile K={k}, N={n}")
    mp = padded_rows(m)
    layer = jnp.asarray(layer, jnp.int32)
    k_per_split = k // bs.split_k
    partial = pl.pallas_call(
        functools.partial(_kernel, m=m, block_k=bs.block_k, block_n=bs.block_n,
                          k_per_split=k_per_split),
        grid=(n // bs.block_n, bs.split_k),
        in_specs=[SCALAR, whole((mp, k)), whole(w.shape)],
        out_specs=pl.BlockSpec((None, mp, bs.block_n), lambda i, j: (j, 0, i)),
        out_shape=jax.ShapeDtypeStruct((bs.split_k, m, n), jnp.float32),
        compiler_params=compiler_params(bs),
        interpret=interpret,
        name=f"stacked_matmul_n{bs.block_n}_k{bs.block_k}_s{bs.split_k}",
    )(layer, x, w)
    return partial.sum(axis=0).astype(x.dtype)
