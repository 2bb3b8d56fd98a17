"""``x @ w[layer]`` for decode on Pallas' Mosaic GPU backend (Hopper): TMA, pipelined, wgmma.

The same computation as :mod:`.stacked_matmul` (its reference is reused): ``x [M, K]`` times a
layer of a stacked ``w [L, K, N]``, the layer passed as data, float32 accumulation, ``x.dtype``
out. Written on ``jax.experimental.pallas.mosaic_gpu`` because Pallas' Triton backend is
deprecated since JAX 0.11 (DESIGN.md §8).

Decode is memory bound: each program streams one ``[K / split_k, block_n]`` slab of
``w[layer]`` gmem -> smem with TMA through an ``emit_pipeline`` of ``num_stages`` buffers, and
the tensor cores consume it with ``wgmma``. A grid over ``N`` blocks x ``split_k`` K chunks fills
the SMs at batch 1; XLA sums the float32 partials. ``wgmma``'s M is 64 rows a warpgroup, so:

* ``form="swap"`` computes ``y^T = w^T x^T``: ``w``'s tile transposed in smem is the
  ``[block_n, block_k]`` left operand and ``x^T`` the ``[block_k, Mp]`` right one, with ``M``
  padded only to a multiple of 8 (wgmma's N step): little ``x`` traffic at batch 1..8;
* ``form="pad"`` computes ``y = x w`` with ``x`` padded to 64 rows (wasted tensor-core work is
  free in a memory-bound kernel, but each program re-reads the padded ``x``).

Both use only API present in JAX 0.10.2 and 0.11.2 (``plgpu.kernel``, ``emit_pipeline``,
``TilingTransform``/``SwizzleTransform``, ``wgmma``, ``ref.transpose``). JAX 0.10.2's GPU
interpreter cannot take transposed wgmma operands: there only ``form="pad"`` interprets.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .stacked_matmul import stacked_matmul_reference

__all__ = [
    "FORMS",
    "MosaicBlocks",
    "interpret_params",
    "mosaic_matmul",
    "padded_rows",
    "shared_memory_bytes",
    "stacked_matmul_reference",
    "supports",
]

FORMS = ("swap", "pad")
WGMMA_M = 64  # Hopper's fixed wgmma M: the "pad" form's rows, the "swap" form's block_n step
SWIZZLE_ELEMS = 64  # a 128-byte swizzle of 16-bit elements: the minor step of every smem tile
SHARED_MEMORY_BYTES = 227 * 1024  # an H100/H200 block's shared memory (232448 B)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicBlocks:
    """Tiling of :func:`mosaic_matmul`: ``block_n`` output columns and ``split_k`` K chunks per
    program, K streamed in ``block_k`` steps through ``num_stages`` smem buffers."""

    block_n: int = 128
    block_k: int = 128
    split_k: int = 4
    num_stages: int = 4
    form: str = "swap"

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"MosaicBlocks.form must be one of {FORMS}, got {self.form!r}")
        step = WGMMA_M if self.form == "swap" else SWIZZLE_ELEMS
        if self.block_n < step or self.block_n % step or self.block_n > 256:
            raise ValueError(f"MosaicBlocks.block_n={self.block_n} must be a multiple of {step} "
                             f"in [{step}, 256] for form {self.form!r}")
        if self.block_k < SWIZZLE_ELEMS or self.block_k % SWIZZLE_ELEMS:
            raise ValueError(f"MosaicBlocks.block_k={self.block_k} must be a multiple of "
                             f"{SWIZZLE_ELEMS}")
        if self.split_k < 1:
            raise ValueError(f"MosaicBlocks.split_k={self.split_k} must be >= 1")
        if self.num_stages < 2:  # one buffer is still read by the wgmma in flight
            raise ValueError(f"MosaicBlocks.num_stages={self.num_stages} must be >= 2")

    @property
    def name(self) -> str:
        return f"{self.form}_n{self.block_n}_k{self.block_k}_s{self.split_k}_st{self.num_stages}"


def padded_rows(m: int, form: str) -> int:
    """Rows of ``x`` as the kernel reads them: a multiple of 8 (swap; wgmma's N step), 64 (pad)."""
    if form == "pad":
        if m > WGMMA_M:
            raise ValueError(f"form 'pad' takes at most {WGMMA_M} rows, got M={m}")
        return WGMMA_M
    if m > 256:
        raise ValueError(f"form 'swap' takes at most 256 rows (wgmma's N), got M={m}")
    return -(-m // 8) * 8


def shared_memory_bytes(bs: MosaicBlocks, mp: int, itemsize: int = 2) -> int:
    """Pipeline buffers (an ``x`` and a ``w`` tile per stage) plus the float32 output tile."""
    return (bs.num_stages * itemsize * bs.block_k * (mp + bs.block_n)
            + 4 * mp * bs.block_n)


def supports(m: int, k: int, n: int, bs: MosaicBlocks) -> str | None:
    """Why ``bs`` cannot run ``[M, K] @ [K, N]``, or ``None`` when it can."""
    if n % bs.block_n:
        return f"block_n={bs.block_n} does not divide N={n}"
    if k % (bs.block_k * bs.split_k):
        return f"block_k * split_k = {bs.block_k * bs.split_k} does not divide K={k}"
    try:
        mp = padded_rows(m, bs.form)
    except ValueError as e:
        return str(e)
    if shared_memory_bytes(bs, mp) > SHARED_MEMORY_BYTES:
        return f"{shared_memory_bytes(bs, mp)} B of shared memory > {SHARED_MEMORY_BYTES}"
    return None


def _transforms():
    # Every smem tile has a 64-element (128-byte) minor dimension step: tile (8, 64), swizzle 128.
    return (plgpu.TilingTransform((8, SWIZZLE_ELEMS)), plgpu.SwizzleTransform(128))


def _kernel(layer_ref, x_gmem, w_gmem, o_gmem, *, bs: MosaicBlocks, mp: int, k_chunk: int):
    # x_gmem [Mp, K], w_gmem [L, K, N]; o_gmem [split_k, N, Mp] (swap) or [split_k, Mp, N] (pad).
    ni, si = lax.axis_index("n"), lax.axis_index("k")
    layer = layer_ref[0]
    swap = bs.form == "swap"
    steps = k_chunk // bs.block_k
    delay = min(1, steps - 1)  # keep one wgmma in flight; emit_pipeline wants stages > delay
    acc_shape = (bs.block_n, mp) if swap else (mp, bs.block_n)

    def step(_, x_smem, w_smem, acc_ref):
        if swap:  # acc [block_n, Mp] += w^T [block_n, block_k] @ x^T [block_k, Mp]
            plgpu.wgmma(acc_ref, w_smem.transpose((1, 0)), x_smem.transpose((1, 0)))
        else:  # acc [64, block_n] += x [64, block_k] @ w [block_k, block_n]
            plgpu.wgmma(acc_ref, x_smem, w_smem)
        plgpu.wgmma_wait(delay)  # the previous step's wgmma is done: its buffers may be refilled

    def accumulate(acc_ref):
        plgpu.emit_pipeline(
            functools.partial(step, acc_ref=acc_ref),
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((mp, bs.block_k), lambda k: (0, k), transforms=_transforms(),
                                delay_release=delay),
                plgpu.BlockSpec((bs.block_k, bs.block_n), lambda k: (k, 0),
                                transforms=_transforms(), delay_release=delay),
            ],
            max_concurrent_steps=bs.num_stages,
        )(x_gmem.at[:, pl.ds(si * k_chunk, k_chunk)],
          w_gmem.at[layer, pl.ds(si * k_chunk, k_chunk), pl.ds(ni * bs.block_n, bs.block_n)])
        return acc_ref[...]

    acc = pl.run_scoped(accumulate, plgpu.ACC(acc_shape, jnp.float32))

    def store(o_smem):
        o_smem[...] = acc
        plgpu.commit_smem()
        cols = pl.ds(ni * bs.block_n, bs.block_n)
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, cols] if swap else o_gmem.at[si, :, cols])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM(acc_shape, jnp.float32))


def interpret_params():
    """Pallas' GPU interpret mode (CPU): public in JAX 0.11, private in 0.10.2."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def mosaic_matmul(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array | int,
    *,
    block_sizes: MosaicBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x [M, K] @ w[layer]`` for a stacked ``w [L, K, N]`` (bf16 or f16); float32
    accumulation, ``x.dtype`` out. ``layer`` may be traced (a loop index); it is not
    bounds-checked on the GPU (as ``stacked_matmul``).

    ``interpret=True`` runs Pallas' GPU interpreter on the CPU.
    """
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [M, K] and w [L, K, N], got {x.shape=} and {w.shape=}")
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"mosaic_matmul takes bfloat16 or float16 x and w of one dtype, got "
                         f"{x.dtype} and {w.dtype}")
    m, k = x.shape
    n = w.shape[2]
    bs = block_sizes or MosaicBlocks()
    if (why := supports(m, k, n, bs)) is not None:
        raise ValueError(f"{bs.name} does not tile M={m}, K={k}, N={n}: {why}")
    mp = padded_rows(m, bs.form)
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    out_shape = (bs.split_k, n, mp) if bs.form == "swap" else (bs.split_k, mp, n)
    partial = plgpu.kernel(
        functools.partial(_kernel, bs=bs, mp=mp, k_chunk=k // bs.split_k),
        out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        grid=(n // bs.block_n, bs.split_k),
        grid_names=("n", "k"),
        interpret=interpret_params() if interpret else None,
    )(layer, xp, w)
    y = partial.sum(axis=0)
    y = y.T if bs.form == "swap" else y
    return y[:m].astype(x.dtype)
