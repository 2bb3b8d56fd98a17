"""Expert slots for a batch of routes, and the LoRA shrink ``x @ A`` of every slot (Pallas, Triton).

The routed LoRA term ``scale * sum_j g_j (x @ A[e_j]) @ B[e_j]`` (every row of ``x`` has its own
route, ``expert_ids, gates [M, k]``) is split in two: the **shrink**
``xa[m, s] = slot_weights[m, s] * x[m] @ A[slot_experts[s]]``, ``[M, S, r]``, here, and the
**expand** ``sum_s xa[:, s] @ B[slot_experts[s]]``, fused into the projection kernels of
``routed_projections``.

**Slots** unify the two ways of combining experts (:func:`route_slots`):

* gather (few rows, ``M * k < E``): one slot per (row, choice), ``S = M * k``; a row's weights are
  ``scale * gate`` on its own ``k`` slots and zero elsewhere. Only the chosen experts are read.
* dense (``M * k >= E``): one slot per expert, ``S = E``; row ``m``'s weight on slot ``e`` is
  ``scale *`` the sum of its gates on ``e``. Every expert is read once, however many rows chose it.

The shrink is small (``r`` columns) and at batch 1 a launch costs more than its bytes (DESIGN.md
§2, lesson 4): :func:`lora_shrink_group` is one launch for all projections that share an input
(``q, k, v`` or ``gate, up``) and all slots, a program per (projection, slot, K split) streaming
its chunk of ``A[l, e]`` (``K x r``) once; :func:`lora_shrink` is the jnp shrink of one
projection (XLA; ``ops`` uses it under dropout, where each projection reads its own ``x``). The
placements measured against each other: ``tuned.py``.

``adapted_layer`` and ``slot_experts`` are data: one compile serves all layers and routes, also
inside ``scan``/``while_loop``. The kernel tiles rows in blocks of at most 64 (a grid axis) and
needs a rank that is a power of two ``>= 16`` (Triton block sizes); ``split_k > 1`` writes float32
partial sums, reduced by XLA or, packed, by the routed kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._blocks import (
    check_rank,
    compiler_params,
    fit_shared_memory,
    is_block,
    largest_divisor,
    pad_rows,
    row_blocks,
)
from ._checks import check_adapted, check_experts, check_slots, is_concrete
from ._slots import PackedXa, summable_partials
from ._tiles import SCALAR, expert_tile, stream_k, whole

__all__ = [
    "PackedXa",
    "ShrinkBlockSizes",
    "default_shrink_block_sizes",
    "lora_shrink",
    "lora_shrink_group",
    "lora_shrink_group_reference",
    "route_slots",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShrinkBlockSizes:
    """Blocks of :func:`lora_shrink_group`: ``block_k`` rows of ``A`` per K step; ``split_k``
    programs per slot along ``K`` (float32 partial sums, added up by the routed kernels when
    ``split_k`` is a power of two up to 16, else by XLA: one more launch)."""

    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# K steps per program and programs to aim for (two waves of 132 SMs): heuristics, the split timed
# as a whole (tuned.py).
_MAX_SHRINK_STEPS = 2
_TARGET_PROGRAMS = 264


def default_shrink_block_sizes(k: int, rank: int, block_m: int = 16, projections: int = 1,
                               programs: int | None = None) -> ShrinkBlockSizes:
    """Blocks for :func:`lora_shrink_group` (a heuristic; the split is timed as a whole): the
    deepest K step, up to 512 rows, whose ``A`` tile holds at most 8192 elements (16 KiB in
    bf16), made shallower where ``block_m`` rows of ``x`` and one branch per projection would
    overflow shared memory; then, given the ``programs`` launched without a split (projections x
    slots x row blocks; ``None``: no split), while they are fewer than
    :data:`_TARGET_PROGRAMS`, K split over more programs, towards ``_MAX_SHRINK_STEPS`` steps
    each.

    Why split: at decode only ``projections * S`` programs would stream (6 for q, k, v of one
    row with top-2), each a chain of dependent K steps (43 for ``down``'s 11008 rows), so the
    shrink is bound by latency, not bytes. On the H100 the adapter's extra time per layer
    (~52 us at batch 1, eval/results/adapters/) did not shrink when 7 small XLA launches per
    layer were removed (0.13 ms per step for 224 launches), which leaves the four shrinks'
    serial K loops; a split writes float32 partial sums, which the routed kernels add up (or,
    for splits they cannot load as one block, such as ``down``'s 43, one XLA reduction). With
    many rows the grid is full already, and a split would only write and re-read float32
    partial sums."""
    depths = tuple(b for b in (512, 256, 128, 64, 32, 16) if b * rank <= 8192) or (16,)
    bs = fit_shared_memory(ShrinkBlockSizes(block_k=largest_divisor(k, depths)), block_m,
                           ((rank,),) * projections)
    if programs is None:
        return bs
    steps = k // bs.block_k
    room = max(1, _TARGET_PROGRAMS // max(programs, 1))
    splits = [d for d in range(1, min(steps, room) + 1) if steps % d == 0]
    wanted = [d for d in splits if steps // d <= _MAX_SHRINK_STEPS]
    return dataclasses.replace(bs, split_k=wanted[0] if wanted else splits[-1])


# ---------------------------------------------------------------------------------------------
# Slots and the XLA shrink (pure jnp, small)


def route_slots(
    expert_ids: jax.Array, gates: jax.Array, num_experts: int, scale: float
) -> tuple[jax.Array, jax.Array]:
    """Slots for a batch of routes: which expert each slot reads and each row's weight on it.

    Args:
      expert_ids: ``[M, k]`` int32, the experts chosen by each row.
      gates: ``[M, k]`` their gate weights.
      num_experts: ``E``.
      scale: the LoRA scale ``alpha / r``, folded into the weights.

    Returns:
      ``slot_experts [S] int32`` and ``slot_weights [M, S] float32``. Gather mode
      (``M * k < E``): ``S = M * k``, slot ``m * k + j`` is row ``m``'s ``j``-th choice, weighted
      ``scale * gates[m, j]`` for row ``m`` and 0 for the others. Dense mode: ``S = E``, slot ``e``
      is expert ``e``, weighted ``scale *`` the sum of row ``m``'s gates on ``e``.
    """
    expert_ids, gates = jnp.asarray(expert_ids), jnp.asarray(gates)
    if expert_ids.ndim != 2 or gates.shape != expert_ids.shape:
        raise ValueError(f"expected expert_ids and gates [M, k], got {expert_ids.shape=} and "
                         f"{gates.shape=}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"expert_ids must be integers, got {expert_ids.dtype}")
    m, k = expert_ids.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} experts per row must be in [1, num_experts={num_experts}]")
    if is_concrete(expert_ids):
        check_experts(np.asarray(expert_ids), num_experts, "expert_ids")
    weights = gates.astype(jnp.float32) * scale
    if m * k < num_experts:
        owner = jnp.arange(m * k) // k  # the row of each slot
        mine = jnp.arange(m)[:, None] == owner[None, :]
        return expert_ids.reshape(-1).astype(jnp.int32), jnp.where(mine, weights.reshape(-1), 0.0)
    # Elementwise, not an einsum: a float32 dot may run in TF32 on GPUs and round the gates.
    one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)  # [M, k, E]
    return jnp.arange(num_experts, dtype=jnp.int32), (one_hot * weights[..., None]).sum(1)


def lora_shrink(
    x: jax.Array,
    a: jax.Array,
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
) -> jax.Array:
    """``xa[m, s] = slot_weights[m, s] * x[m] @ a[adapted_layer, slot_experts[s]]``.

    Args:
      x: ``[M, K]`` activations.
      a: ``[La, E, K, r]`` stacked LoRA ``A`` experts.
      adapted_layer: index into ``La``, may be traced.
      slot_experts: ``[S]`` int32, from :func:`route_slots`.
      slot_weights: ``[M, S]`` float32, from :func:`route_slots`.

    Returns:
      ``[M, S, r]`` in ``x.dtype`` (float32 accumulation). Only the ``S`` slots' experts are
      gathered (in gather mode that is not all ``E``).
    """
    if x.ndim != 2 or a.ndim != 4 or a.shape[2] != x.shape[1]:
        raise ValueError(f"expected x [M, K] and a [La, E, K, r], got {x.shape=} and {a.shape=}")
    check_slots(slot_experts, slot_weights, x.shape[0])
    check_adapted(adapted_layer, slot_experts, a.shape[:2])
    a_slots = a[adapted_layer, slot_experts].astype(x.dtype)  # [S, K, r], one gather
    xa = jnp.einsum("mk,skr->msr", x, a_slots, preferred_element_type=jnp.float32)
    return (xa * slot_weights[:, :, None]).astype(x.dtype)


def lora_shrink_group_reference(
    x: jax.Array, a: tuple[jax.Array, ...], adapted_layer: jax.Array | int,
    slot_experts: jax.Array, slot_weights: jax.Array,
) -> tuple[jax.Array, ...]:
    """:func:`lora_shrink` of each ``[La, E, K, r]`` stack in ``a``."""
    return tuple(lora_shrink(x, a_p, adapted_layer, slot_experts, slot_weights) for a_p in a)


# ---------------------------------------------------------------------------------------------
# The grouped shrink kernel


def _check_group(x, a: tuple, slot_experts, slot_weights) -> None:
    """Operands of :func:`lora_shrink_group`: ``x [M, K]``, ``a`` stacks ``[La, E, K, r]`` with one
    ``(La, E)``, and slots."""
    if x.ndim != 2:
        raise ValueError(f"expected x [M, K], got {x.shape=}")
    m, k = x.shape
    if k % 16:
        raise ValueError(f"K={k} must be a multiple of 16")
    for p, a_p in enumerate(a):
        if a_p.ndim != 4 or a_p.shape[2] != k:
            raise ValueError(f"expected a[{p}] [La, E, K={k}, r], got {a_p.shape}")
        check_rank(a_p.shape[3])
    if len({a_p.shape[:2] for a_p in a}) > 1:
        raise ValueError(f"a stacks have different (La, E): {[a_p.shape for a_p in a]}")
    check_slots(slot_experts, slot_weights, m)


def _check_shrink_blocks(bs: ShrinkBlockSizes, k: int) -> None:
    if not is_block(bs.block_k) or bs.split_k < 1:
        raise ValueError(f"{bs}: block_k must be a power of two >= 16, split_k >= 1")
    if k % (bs.block_k * bs.split_k):
        raise ValueError(f"{bs} does not tile K={k} (block_k * split_k must divide it)")


def _shrink_group_kernel(adapted_ref, slots_ref, x_ref, sw_ref, *refs, block_k, k_per_split):
    # Program (p, s, j, m): x_ref [block_m, K] (row block m); sw_ref [block_m], slot s's weights
    # on these rows; a refs [La, E, K, r_p] whole (in HBM); o refs [block_m, r_p]: slot s's
    # columns of projection p's packed xa (float32 partial sums of split j when split_k > 1). It
    # streams K chunk j of a_p[adapted, slot_experts[s]] once; other projections' outputs are left
    # to their programs.
    a_refs, o_refs = refs[:len(refs) // 2], refs[len(refs) // 2:]
    p, slot, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def shrink(a_ref, o_ref):
        tile = expert_tile(a_ref, adapted_ref[()], slots_ref[slot])
        (xa,) = stream_k(x_ref, [tile], split * k_per_split, k_per_split // block_k,
                         block_k=block_k)
        o_ref[...] = (xa * sw_ref[...][:, None]).astype(o_ref.dtype)

    for i, (a_ref, o_ref) in enumerate(zip(a_refs, o_refs)):
        pl.when(p == i)(functools.partial(shrink, a_ref, o_ref))


def lora_shrink_group(
    x: jax.Array,
    a: tuple[jax.Array, ...],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    *,
    block_sizes: ShrinkBlockSizes | None = None,
    packed: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array | PackedXa, ...]:
    """:func:`lora_shrink` of every projection that reads ``x`` (``q, k, v`` or ``gate, up``; or
    one), in one launch.

    One program per (projection, slot, K split, block of 64 rows) streams its K chunk of
    ``a[adapted_layer, slot_experts[s]]`` once. At decode that is few programs (``len(a) * S``,
    6 for ``q, k, v`` of one row with top-2), each bound by what one SM can keep in flight:
    deep K steps help, and ``split_k > 1`` spreads a slot over more programs at the price of
    adding up float32 partial sums (in the routed kernels, packed, or an XLA reduction).

    Args:
      x: ``[M, K]`` activations.
      a: the projections' ``[La, E, K, r_p]`` stacked LoRA ``A`` experts: one ``(La, E)``, ranks
        may differ (each a power of two ``>= 16``).
      adapted_layer: index into ``La``, may be traced.
      slot_experts: ``[S]`` int32, from :func:`route_slots`; may be traced.
      slot_weights: ``[M, S]`` float32, from :func:`route_slots`.
      block_sizes: ``block_k * split_k`` must divide ``K``; default
        :func:`default_shrink_block_sizes`, which spreads ``K`` over more programs
        (``split_k``) while the grid is small (decode).
      packed: return each output as the kernel wrote it, a :class:`PackedXa` ``[Mp, S * r_p]``
        (rows padded; with a ``split_k > 1`` that :func:`summable_partials` allows, the float32
        partial sums ``[split_k, Mp, S * r_p]``), which the routed kernels take without a copy
        or a reduction.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      One ``[M, S, r_p]`` per stack (or :class:`PackedXa`), in ``x.dtype`` (float32
      accumulation), equal to :func:`lora_shrink_group_reference`.
    """
    a = tuple(a)
    if not a:
        raise ValueError("lora_shrink_group needs at least one a stack")
    check_adapted(adapted_layer, slot_experts, a[0].shape[:2])
    return _lora_shrink_group(x, a, adapted_layer, slot_experts, slot_weights,
                              block_sizes=block_sizes, packed=packed, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "packed", "interpret"))
def _lora_shrink_group(x, a, adapted_layer, slot_experts, slot_weights, *, block_sizes, packed,
                       interpret):
    _check_group(x, a, slot_experts, slot_weights)
    m, k = x.shape
    ranks = [a_p.shape[3] for a_p in a]
    block_m, mp = row_blocks(m)
    programs = len(a) * slot_experts.shape[0] * (mp // block_m)
    bs_ = block_sizes or default_shrink_block_sizes(k, max(ranks), block_m, len(a), programs)
    _check_shrink_blocks(bs_, k)
    num_slots, split_k = slot_experts.shape[0], bs_.split_k
    # Grid: (projections, slots, split_k, row blocks). Outputs packed, [Mp, S * r] (one
    # [block_m, r] block per program, slot s in columns s r...): the layout the routed kernels
    # read.
    if split_k == 1:
        out_shapes = [jax.ShapeDtypeStruct((mp, num_slots * r), x.dtype) for r in ranks]
        out_specs = [pl.BlockSpec((block_m, r), lambda p, s, j, i: (i, s)) for r in ranks]
    else:
        out_shapes = [jax.ShapeDtypeStruct((split_k, mp, num_slots * r), jnp.float32)
                      for r in ranks]
        out_specs = [pl.BlockSpec((None, block_m, r), lambda p, s, j, i: (j, i, s))
                     for r in ranks]
    outs = pl.pallas_call(
        functools.partial(_shrink_group_kernel, block_k=bs_.block_k, k_per_split=k // split_k),
        grid=(len(a), num_slots, split_k, mp // block_m),
        in_specs=[SCALAR, whole(slot_experts.shape),
                  pl.BlockSpec((block_m, k), lambda p, s, j, i: (i, 0)),
                  pl.BlockSpec((None, block_m), lambda p, s, j, i: (s, i)),
                  *(whole(a_p.shape) for a_p in a)],
        out_specs=out_specs,
        out_shape=out_shapes,
        compiler_params=compiler_params(bs_),
        interpret=interpret,
        name=f"lora_shrink_group{len(a)}_m{block_m}_k{bs_.block_k}_s{split_k}"
             f"_w{bs_.num_warps}_st{bs_.num_stages}",
    )(jnp.asarray(adapted_layer, jnp.int32), slot_experts.astype(jnp.int32), pad_rows(x, mp),
      pad_rows(slot_weights.astype(jnp.float32), mp).T, *a)
    if packed and summable_partials(split_k):  # the routed kernels add the partial sums
        return tuple(PackedXa(out) for out in outs)
    if split_k > 1:
        outs = [out.sum(axis=0).astype(x.dtype) for out in outs]
    if packed:
        return tuple(PackedXa(out) for out in outs)
    return tuple(out[:m].reshape(m, num_slots, r) for out, r in zip(outs, ranks))
