"""Block sizes, row padding and the shared-memory fit of the kernels (private to ``pallas``).

Triton loads and dots need power-of-two block sizes (48 rows fail to lower) and tensor-core dots
need every dimension ``>= 16``: rows are padded to a power of two ``>= 16``, and default blocks
are made shallower where their K-loop buffers would not fit an H100's shared memory. Padding is
either an XLA pad of the operand (:func:`pad_rows`, a launch of its own) or done in the kernel:
a row block larger than the array, loaded and stored with a row mask (:func:`masked_rows`,
:func:`store_rows`; the Triton lowering does not mask a block that overruns its array itself).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "MAX_BLOCK_M",
    "MaskedRows",
    "SHARED_MEMORY_BYTES",
    "blocks_name",
    "check_block_sizes",
    "check_rank",
    "compiler_params",
    "fit_shared_memory",
    "is_block",
    "largest_divisor",
    "masked_rows",
    "pad_rows",
    "padded_rows",
    "row_blocks",
    "row_mask",
    "shared_memory_bytes",
    "store_rows",
]


MAX_BLOCK_M = 64  # rows per program of the routed kernels; not measured (decode fits in one)


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


def check_rank(r: int) -> None:
    """The LoRA rank is loaded as ``[rows, r]`` blocks: a power of two ``>= 16``."""
    if not is_block(r):
        raise ValueError(f"rank r={r} must be a power of two >= 16 for the kernel (Triton "
                         f"block sizes); use the reference for other ranks")


# Shared memory a program may pipeline through: an H100's 227 KiB per block (232448 B).
SHARED_MEMORY_BYTES = 227 * 1024


def shared_memory_bytes(bs, block_m: int, branches: tuple[tuple[int, ...], ...],
                        itemsize: int = 2) -> int:
    """Estimated shared memory of one program's K-loop buffers: per branch (a code path of its
    own, e.g. one of q, k, v; each keeps its own buffers) an ``x`` tile ``[block_m, block_k]``
    plus a ``[block_k, w]`` tile for each width ``w`` it streams (``gate`` and ``up`` share one
    branch), in ``num_stages`` copies for a single branch and ``num_stages - 1`` for several.

    An empirical fit to what Triton asked for on an H100, not a derivation (``tuned.py``)."""
    copies = bs.num_stages if len(branches) == 1 else bs.num_stages - 1
    return copies * itemsize * bs.block_k * sum(block_m + sum(w) for w in branches)


def fit_shared_memory(bs, block_m: int, branches: tuple[tuple[int, ...], ...], itemsize: int = 2):
    """``bs`` with ``block_k`` halved (it still tiles ``K``) until :func:`shared_memory_bytes`
    fits :data:`SHARED_MEMORY_BYTES`. The defaults were measured with 16 rows; decode at batch
    17-64 pads to 32 or 64 rows, where the same blocks would not compile."""
    block_k = bs.block_k
    while block_k > 16 and shared_memory_bytes(dataclasses.replace(bs, block_k=block_k), block_m,
                                               branches, itemsize) > SHARED_MEMORY_BYTES:
        block_k //= 2
    return bs if block_k == bs.block_k else dataclasses.replace(bs, block_k=block_k)


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


def row_mask(shape: tuple[int, ...], rows: int) -> jax.Array:
    """Booleans of ``shape``: whether an element's row (axis 0) is one of the first ``rows``."""
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0) < rows


@dataclasses.dataclass(frozen=True)
class MaskedRows:
    """A kernel ref ``[block_m, ...]`` of whose rows only the first ``rows`` exist in the array
    (the block overruns it): reads load those and give zeros past them, as :func:`pad_rows`'s
    zero rows would, without touching memory past the array. Read as ``view[idx]``."""

    ref: object
    rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    def __getitem__(self, idx) -> jax.Array:
        view = self.ref.at[idx]
        return plgpu.load(view, mask=row_mask(view.shape, self.rows),
                          other=jnp.zeros((), view.dtype))


def masked_rows(ref, rows: int):
    """``ref`` itself when its block holds exactly ``rows`` rows, else a :class:`MaskedRows`."""
    return ref if ref.shape[0] == rows else MaskedRows(ref, rows)


def store_rows(ref, value: jax.Array, rows: int) -> None:
    """``ref[...] = value`` for the first ``rows`` rows only (a masked store where the block
    overruns the array: rows past it are not written)."""
    value = value.astype(ref.dtype)
    if ref.shape[0] == rows:
        ref[...] = value
    else:
        plgpu.store(ref.at[...], value, mask=row_mask(value.shape, rows))
