"""SGMM switch: merge a token's routed LoRA experts into every adapted layer in one launch.

For a new route (``k`` expert ids ``e_j`` with gates ``g_j``, the LoRA scale folded into the
gates), one projection's merged weights for all adapted layers are

    W'[l] = W_base[first_layer + l] + sum_j g_j A[l, e_j] @ B[l, e_j]      l = 0 .. La-1

written into the working copy ``w_work [La, K, N]`` (``input_output_aliases``: in place when
``w_work`` is donated or a loop carry). LoRA-Switch's SGMM updates ``W += [-g_old A_old |
g_new A_new] @ [B_old ; B_new]`` in place; in bf16 that drifts with every switch. Here the
kernel always reads the pristine base and overwrites the working copy, so any number of
switches equals a fresh merge bit for bit. It moves the same bytes (read ``W_base``, write
``W'``; the adapters are ~1 % more) with half the inner size (``k r`` instead of ``2 k r``).

Grid ``(N / block_n, split_k, La)``: a program owns ``block_n`` columns of one layer's rows
``[s K/split_k, (s+1) K/split_k)`` and walks them in ``block_k`` steps (Triton pipelines the
``W_base`` loads over ``num_stages``). Per step it adds, in float32, one tensor-core dot per
expert (and per rank chunk) ``(g_j A[l, e_j][rows, :]) @ B[l, e_j][:, cols]`` to the base tile
and rounds once to the weight dtype. The layer axis is the slowest grid axis, so the programs
running together share one layer's few adapter tiles in L2. Expert ids are data (read from a
``[k]`` int32 ref in the kernel), so one compiled kernel serves every route.

Dot operands are cast to the weight dtype: bf16 weights take bf16 x bf16 -> f32 tensor-core dots
(``g_j A`` is rounded to bf16 once, well below the final rounding of ``W'``); float32 weights
take ``Precision.HIGHEST`` (IEEE f32, not TF32), so a float32 merge matches the reference to
~1e-6. Adapters may be float32 or bf16; they are cast tile by tile inside the kernel (casting
``a``/``b`` outside would copy every expert).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .stacked_matmul import BlockSizes

__all__ = [
    "BlockSizes",
    "default_block_sizes",
    "supports",
    "switch_merge",
    "switch_merge_reference",
]


# ---------------------------------------------------------------------------------------------
# Reference (the spec)


def switch_merge_reference(
    w_base: jax.Array,
    a: jax.Array,
    b: jax.Array,
    expert_ids: jax.Array,
    gates: jax.Array,
    *,
    first_layer: int,
) -> jax.Array:
    """Fresh merge of the pristine base: ``W_base[first_layer + l] + sum_j g_j A[l,e_j] B[l,e_j]``.

    Args:
      w_base: ``[L, K, N]`` stacked base weights (all layers).
      a: ``[La, E, K, r]`` and b: ``[La, E, r, N]``: experts of the adapted layers
        ``first_layer .. L-1`` (``La = L - first_layer``).
      expert_ids: ``[k]`` int32; out-of-range ids are clamped to ``[0, E-1]`` (as in the kernel).
      gates: ``[k]`` gate weights with the LoRA scale ``alpha / r`` already folded in.
      first_layer: the first adapted layer.

    Returns:
      ``[La, K, N]`` in ``w_base.dtype``, summed in float32 and rounded once.
    """
    _check_operands(w_base, None, a, b, expert_ids, gates, first_layer)
    a_sel = jnp.take(a, expert_ids, axis=1, mode="clip").astype(jnp.float32)  # [La, k, K, r]
    b_sel = jnp.take(b, expert_ids, axis=1, mode="clip").astype(jnp.float32)  # [La, k, r, N]
    scaled = a_sel * gates.astype(jnp.float32)[None, :, None, None]
    delta = jnp.einsum("ljkr,ljrn->lkn", scaled, b_sel, precision=jax.lax.Precision.HIGHEST)
    return (w_base[first_layer:].astype(jnp.float32) + delta).astype(w_base.dtype)


# ---------------------------------------------------------------------------------------------
# Shapes and block sizes


def _rank_chunk(rank: int) -> int:
    """The largest power of two dividing ``rank``: Triton tiles must be powers of two, so a rank
    such as 48 is summed as 3 dots of inner size 16."""
    return rank & -rank


def supports(k_dim: int, n_dim: int, rank: int) -> bool:
    """Whether the Triton lowering tiles ``K``, ``N`` and the rank: all multiples of 16 (every dot
    dimension must be >= 16 and every block a power of two). Callers fall back to XLA otherwise."""
    return all(d > 0 and d % 16 == 0 for d in (k_dim, n_dim, rank))


def _largest_divisor(n: int, candidates) -> int:
    for c in candidates:
        if n % c == 0:
            return c
    raise ValueError(f"no block size in {tuple(candidates)} divides {n}")


# Blocks for shapes where a sweep beat the heuristic, keyed by (K, N, rank): none; the heuristic
# runs at 1.01 of copy bandwidth on an H100 at Llama-2-7B shapes (tuned.py).
_TUNED: dict[tuple[int, int, int], BlockSizes] = {}


def default_block_sizes(la: int, k_dim: int, n_dim: int, rank: int) -> BlockSizes:
    """Blocks for known shapes (``_TUNED``, empty so far), else a heuristic (measured at copy
    bandwidth, ``tuned.py``): 128 columns x 64-row steps where they divide, and ``split_k`` raised
    until ``La * N / block_n * split_k`` programs reach ~512 (a few waves of ~132 SMs). Llama-2-7B
    (La = 32) has 1024 column programs already, so ``split_k = 1``."""
    if (k_dim, n_dim, rank) in _TUNED:
        return _TUNED[(k_dim, n_dim, rank)]
    block_n = _largest_divisor(n_dim, (128, 64, 32, 16))
    block_k = _largest_divisor(k_dim, (64, 32, 16))
    programs = la * (n_dim // block_n)
    steps = k_dim // block_k
    split_k = 1
    while programs * split_k < 512 and steps % (2 * split_k) == 0:
        split_k *= 2
    return BlockSizes(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4,
                      num_stages=3)


def _is_block(size: int) -> bool:
    return size >= 16 and size & (size - 1) == 0


def _check_block_sizes(bs: BlockSizes, k_dim: int, n_dim: int) -> None:
    if not (_is_block(bs.block_n) and _is_block(bs.block_k)) or bs.split_k < 1:
        raise ValueError(f"{bs}: block_n and block_k must be powers of two >= 16, split_k >= 1")
    if n_dim % bs.block_n:
        raise ValueError(f"{bs} does not tile N={n_dim} (block_n must divide it)")
    if k_dim % (bs.block_k * bs.split_k):
        raise ValueError(f"{bs} does not tile K={k_dim} (block_k * split_k must divide it)")


def _check_operands(w_base, w_work, a, b, expert_ids, gates, first_layer) -> None:
    """Shape and dtype checks shared by the kernel and the reference (static, also under jit)."""
    if w_base.ndim != 3:
        raise ValueError(f"expected w_base [L, K, N], got {w_base.shape=}")
    if w_base.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"w_base.dtype={w_base.dtype} must be bfloat16 or float32")
    num_layers, k_dim, n_dim = w_base.shape
    if not isinstance(first_layer, (int, np.integer)) or not 0 <= first_layer < num_layers:
        raise ValueError(f"first_layer={first_layer!r} must be an int in [0, L={num_layers})")
    la = num_layers - first_layer
    if w_work is not None and w_work.shape not in ((la, k_dim, n_dim), w_base.shape):
        raise ValueError(f"expected w_work [La, K, N] = {(la, k_dim, n_dim)} (La = L - "
                         f"first_layer) or [L, K, N] = {w_base.shape}, got {w_work.shape=}")
    if w_work is not None and w_work.dtype != w_base.dtype:
        raise ValueError(f"w_work.dtype={w_work.dtype} must equal w_base.dtype={w_base.dtype}")
    if a.ndim != 4 or a.shape[0] != la or a.shape[2] != k_dim:
        raise ValueError(f"expected a [La, E, K, r] with La={la}, K={k_dim}, got {a.shape=}")
    num_experts, rank = a.shape[1], a.shape[3]
    if b.shape != (la, num_experts, rank, n_dim):
        raise ValueError(f"expected b [La, E, r, N] = {(la, num_experts, rank, n_dim)}, "
                         f"got {b.shape=}")
    if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in (a, b)):
        raise ValueError(f"a and b must be floating point, got {a.dtype=} and {b.dtype=}")
    if expert_ids.ndim != 1 or not 1 <= expert_ids.shape[0] <= num_experts:
        raise ValueError(f"expected expert_ids [k] with 1 <= k <= E={num_experts}, "
                         f"got {expert_ids.shape=}")
    if expert_ids.dtype != jnp.int32:
        raise ValueError(f"expert_ids must be int32, got {expert_ids.dtype=}")
    if gates.shape != expert_ids.shape:
        raise ValueError(f"gates must match expert_ids [k], got {gates.shape=} and "
                         f"{expert_ids.shape=}")
    if not jnp.issubdtype(gates.dtype, jnp.floating):
        raise ValueError(f"gates must be floating point, got {gates.dtype=}")


def _check_concrete_ids(expert_ids, num_experts: int) -> None:
    """Range-check ids known on the host; traced ids cannot be checked (the kernel clamps them)."""
    try:
        ids = np.asarray(expert_ids)
    except jax.errors.TracerArrayConversionError:
        return
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert_ids {ids.tolist()} out of range for E={num_experts} experts")


# ---------------------------------------------------------------------------------------------
# Kernel


def _kernel(write_ref, ids_ref, gates_ref, w_base_ref, a_ref, b_ref, w_work_ref, out_ref, *,
            block_k: int, block_n: int, rank_chunk: int, dot_dtype, precision):
    # write_ref: scalar, 0 = leave the working copy as it is; ids_ref, gates_ref [k];
    # a_ref [La, E, K, r], b_ref [La, E, r, N] whole (in HBM);
    # w_base_ref (layer first_layer + l) and out_ref (layer l): [K / split_k, block_n].
    del w_work_ref  # the aliased input of out_ref: only written, never read
    n, s, layer = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows_per_split = out_ref.shape[0]
    num_experts, rank = a_ref.shape[1], a_ref.shape[3]
    cols = pl.ds(n * block_n, block_n)
    # Clamped ids keep a bad traced id inside `a` and `b` (the reference clamps likewise).
    route = [(jnp.minimum(jnp.maximum(ids_ref[j], 0), num_experts - 1), gates_ref[j])
             for j in range(ids_ref.shape[0])]

    # The expert tiles are loaded per step (L2 hits: one layer's selected experts are at most a
    # few MiB) rather than held across the loop, where k * r * block_n values crowd the registers.
    def step(i, carry):
        tile = pl.ds(i * block_k, block_k)  # rows within this program's split
        rows = pl.ds(s * rows_per_split + i * block_k, block_k)  # rows of the layer
        acc = w_base_ref[tile, :].astype(jnp.float32)
        for expert, gate in route:
            for c in range(0, rank, rank_chunk):
                r = pl.ds(c, rank_chunk)
                a = (a_ref[layer, expert, rows, r].astype(jnp.float32) * gate).astype(dot_dtype)
                b = b_ref[layer, expert, r, cols].astype(dot_dtype)
                acc += jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)
        out_ref[tile, :] = acc.astype(out_ref.dtype)
        return carry

    @pl.when(write_ref[()] != 0)
    def _():
        jax.lax.fori_loop(0, rows_per_split // block_k, step, 0)


def switch_merge(
    w_base: jax.Array,
    w_work: jax.Array,
    a: jax.Array,
    b: jax.Array,
    expert_ids: jax.Array,
    gates: jax.Array,
    *,
    first_layer: int,
    write: jax.Array | bool = True,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Write the merged weights of one projection for every adapted layer, in one launch.

    ``W'[l] = W_base[first_layer + l] + sum_j gates[j] A[l, e_j] @ B[l, e_j]``, summed in float32
    from the pristine base and rounded once (no drift across switches). Nothing outside the
    kernel touches the weights: no copy of ``W_base`` or ``w_work``.

    Args:
      w_base: ``[L, K, N]`` stacked base weights, bf16 or float32; read only.
      w_work: ``[La, K, N]`` working copy (``La = L - first_layer``), or ``[L, K, N]`` whose
        layers ``first_layer ..`` are written and the others kept; same dtype. The result is
        written into its buffer (``input_output_aliases``): in place when the caller donates it
        (``jax.jit(..., donate_argnums=...)``) or carries it through a loop; otherwise XLA copies
        it first. Its contents are never read.
      a: ``[La, E, K, r]`` and b: ``[La, E, r, N]`` experts, float32 or bf16.
      expert_ids: ``[k]`` int32, may be traced. Concrete ids are range-checked; traced ids cannot
        be, and the kernel clamps them to ``[0, E-1]`` (no read outside ``a``, ``b``).
      gates: ``[k]`` float gates with the LoRA scale ``alpha / r`` folded in.
      first_layer: the first adapted layer (static).
      write: a (traced) flag; when false every program returns at once and the working copy
        keeps its contents. Skipping a repeated route this way, rather than with ``lax.cond``
        around the call, keeps the aliased buffer in place: a ``cond`` inside a loop makes XLA
        copy the whole working copy on every step.
      block_sizes: default per shape (``default_block_sizes``); ``block_n`` must divide ``N``
        and ``block_k * split_k`` must divide ``K``.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      the merged weights in ``w_base.dtype``, in ``w_work``'s buffer (and shape).
    """
    _check_operands(w_base, w_work, a, b, expert_ids, gates, first_layer)
    _check_concrete_ids(expert_ids, a.shape[1])
    if not supports(w_base.shape[1], w_base.shape[2], a.shape[3]):
        raise ValueError(f"K={w_base.shape[1]}, N={w_base.shape[2]} and rank={a.shape[3]} must "
                         "be multiples of 16 (use switch_merge_reference otherwise)")
    return _switch_merge(w_base, w_work, a, b, expert_ids, gates, jnp.asarray(write, jnp.int32),
                         first_layer=int(first_layer), block_sizes=block_sizes,
                         interpret=interpret)


@functools.partial(jax.jit, static_argnames=("first_layer", "block_sizes", "interpret"))
def _switch_merge(w_base, w_work, a, b, expert_ids, gates, write, *, first_layer, block_sizes,
                  interpret):
    _, k_dim, n_dim = w_work.shape
    la = w_base.shape[0] - first_layer
    offset = first_layer if w_work.shape[0] == w_base.shape[0] else 0  # a whole-model copy
    rank = a.shape[3]
    bs = block_sizes or default_block_sizes(la, k_dim, n_dim, rank)
    _check_block_sizes(bs, k_dim, n_dim)
    rows_per_split = k_dim // bs.split_k
    float32 = w_base.dtype == jnp.float32
    kernel = functools.partial(
        _kernel, block_k=bs.block_k, block_n=bs.block_n, rank_chunk=_rank_chunk(rank),
        dot_dtype=w_base.dtype,
        precision=jax.lax.Precision.HIGHEST if float32 else None,
    )
    tile = (None, rows_per_split, bs.block_n)
    route_spec = pl.BlockSpec(expert_ids.shape, lambda n, s, l: (0,))
    work_spec = pl.BlockSpec(tile, lambda n, s, l: (l + offset, s, n))
    return pl.pallas_call(
        kernel,
        grid=(n_dim // bs.block_n, bs.split_k, la),
        in_specs=[
            pl.BlockSpec((), lambda n, s, l: ()),
            route_spec,
            route_spec,
            pl.BlockSpec(tile, lambda n, s, l: (l + first_layer, s, n)),
            pl.BlockSpec(a.shape, lambda n, s, l: (0, 0, 0, 0)),
            pl.BlockSpec(b.shape, lambda n, s, l: (0, 0, 0, 0)),
            work_spec,
        ],
        out_specs=work_spec,
        out_shape=jax.ShapeDtypeStruct(w_work.shape, w_work.dtype),
        input_output_aliases={6: 0},
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=(f"switch_merge_n{bs.block_n}_k{bs.block_k}_s{bs.split_k}_w{bs.num_warps}"
              f"_st{bs.num_stages}"),
    )(write, expert_ids, gates.astype(jnp.float32), w_base, a, b, w_work)
