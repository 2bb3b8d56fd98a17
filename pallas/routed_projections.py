"""Routed LoRA projections fused into the stacked-weight projection kernels (Pallas, Triton).

``y = x @ W[layer] + bias[layer] + scale * sum_j g_j (x @ A[e_j]) @ B[e_j]`` where every row of
``x`` has its own route (``expert_ids, gates [M, k]``) and ``W`` is read once. The LoRA term is
split in two:

* **shrink**: ``xa[m, s] = slot_weights[m, s] * x[m] @ A[slot_experts[s]]``, ``[M, S, r]``
  (small: ``r`` columns). At batch 1 a launch costs more than its bytes (DESIGN.md §2, lesson
  4), so it has three placements, to be timed against each other on a GPU:

  - ``"xla"``: :func:`lora_shrink`, XLA ops for each projection (DESIGN.md §2 measured a separate
    small op at +12-18 % per projection).
  - ``"pallas"``: :func:`lora_shrink_group`, one launch for all projections that share an input
    (``q, k, v`` or ``gate, up``) and all slots. A program per (projection, slot) streams that
    slot's ``A[l, e]`` (``K x r``) once.
  - ``"inline"``: :func:`routed_matmul_inline_shrink`, :func:`routed_qkv_matmul_inline_shrink`
    and :func:`routed_gate_up_matmul_inline_shrink`, no launch at all. ``A`` tiles ride along
    with the ``W`` tiles in the projection's K loop (one ``x`` load per K step serves both), and
    each program expands its own ``xa``. The price: every column block re-reads all slots' ``A``
    (from L2; ``S r / block_n`` extra bytes per byte of ``W``) and keeps ``S`` accumulators
    ``[block_m, r]``, so it is meant for gather mode (few slots). Dense slots (``S = E``) are
    correct but cost in proportion to ``E``.

* **expand** (in the projection kernel): each program, after accumulating ``x @ W[:, cols]``,
  adds ``sum_s xa[:, s] @ B[slot_experts[s]][:, cols]``. ``B`` is partitioned over column blocks
  like ``W``, so ``W`` and each slot's ``B`` are read once (per block of rows).

**Slots** unify the two ways of combining experts (:func:`route_slots`):

* gather (few rows, ``M * k < E``): one slot per (row, choice), ``S = M * k``; a row's weights are
  ``scale * gate`` on its own ``k`` slots and zero elsewhere. Only the chosen experts are read.
* dense (``M * k >= E``): one slot per expert, ``S = E``; row ``m``'s weight on slot ``e`` is
  ``scale *`` the sum of its gates on ``e``. Every expert is read once, however many rows chose it.

Layer indices (``layer``, ``adapted_layer``) and ``slot_experts`` are data: one compile serves all
layers and routes, also inside ``scan``/``while_loop``.

``split_k > 1`` writes float32 partial sums reduced by XLA (as in ``fused_projections``). With a
given ``xa`` only the programs of split 0 add the expansion, so it counts once (they do more work
than the others; ``split_k = 1`` avoids that imbalance, which is not yet measured). Inline, every
split expands the partial ``xa`` of its own K chunk (the term is linear in ``x``), so the work
stays balanced. Rows are padded to a power of two ``>= 16`` and tiled in blocks of at most 64 rows
(a grid axis): Triton loads and dots need power-of-two sizes ``>= 16``, decode (``M <= 64``) is
one row block, and prefill runs several (``W`` is then re-read per row block, as in any GEMM). For
the same reason the rank must be a power of two ``>= 16`` (:func:`supports`; callers fall back to
the references otherwise).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .fused_projections import (
    _bias,
    _blocks_name,
    _check_block_sizes,
    _check_layer,
    _is_block,
    _largest_divisor,
    default_gate_up_block_sizes,
    default_qkv_block_sizes,
)
from .stacked_matmul import BlockSizes, default_block_sizes

__all__ = [
    "BlockSizes",
    "ShrinkBlockSizes",
    "default_shrink_block_sizes",
    "lora_shrink",
    "lora_shrink_group",
    "lora_shrink_group_reference",
    "route_slots",
    "routed_gate_up_matmul",
    "routed_gate_up_matmul_inline_shrink",
    "routed_gate_up_matmul_inline_shrink_reference",
    "routed_gate_up_matmul_reference",
    "routed_matmul",
    "routed_matmul_inline_shrink",
    "routed_matmul_inline_shrink_reference",
    "routed_matmul_reference",
    "routed_qkv_matmul",
    "routed_qkv_matmul_inline_shrink",
    "routed_qkv_matmul_inline_shrink_reference",
    "routed_qkv_matmul_reference",
    "supports",
]

# Routed block sizes are not yet measured on a GPU: the defaults are stacked_matmul's and
# fused_projections' tables and heuristics, which were measured without the LoRA term.
_MAX_BLOCK_M = 64  # rows per program; not measured either (decode batches fit in one block)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShrinkBlockSizes:
    """Blocks of :func:`lora_shrink_group`: ``block_k`` rows of ``A`` per K step; ``split_k``
    programs per slot along ``K`` (float32 partial sums that XLA reduces: one more launch)."""

    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_shrink_block_sizes(k: int, rank: int) -> ShrinkBlockSizes:
    """Blocks for :func:`lora_shrink_group` (a heuristic, not measured): the deepest K step, up
    to 512 rows, whose ``A`` tile holds at most 8192 elements (16 KiB in bf16, so three stages
    of ``x`` and ``A`` tiles fit shared memory). Deep steps keep many bytes in flight per
    program, which matters because at batch 1 only ``len(a) * S`` programs stream."""
    depths = tuple(b for b in (512, 256, 128, 64, 32, 16) if b * rank <= 8192) or (16,)
    return ShrinkBlockSizes(block_k=_largest_divisor(k, depths))


# ---------------------------------------------------------------------------------------------
# Slots and the XLA shrink (pure jnp, small)


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


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
    if _is_concrete(expert_ids):
        _check_experts(np.asarray(expert_ids), num_experts, "expert_ids")
    weights = gates.astype(jnp.float32) * scale
    if m * k < num_experts:
        owner = jnp.arange(m * k) // k  # the row of each slot
        mine = jnp.arange(m)[:, None] == owner[None, :]
        return expert_ids.reshape(-1).astype(jnp.int32), jnp.where(mine, weights.reshape(-1), 0.0)
    # Elementwise, not an einsum: a float32 dot may run in TF32 on GPUs and round the gates.
    one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)  # [M, k, E]
    return jnp.arange(num_experts, dtype=jnp.int32), (one_hot * weights[..., None]).sum(1)


def _check_experts(ids: np.ndarray, num_experts: int, name: str) -> None:
    if ids.size and not (0 <= ids.min() and ids.max() < num_experts):
        raise ValueError(f"{name} must be in [0, {num_experts}), got values in "
                         f"[{ids.min()}, {ids.max()}]")


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
    _check_slots(slot_experts, slot_weights, x.shape[0])
    _check_adapted(adapted_layer, slot_experts, a.shape[:2])
    a_slots = a[adapted_layer, slot_experts].astype(x.dtype)  # [S, K, r], one gather
    xa = jnp.einsum("mk,skr->msr", x, a_slots, preferred_element_type=jnp.float32)
    return (xa * slot_weights[:, :, None]).astype(x.dtype)


def _check_slots(slot_experts, slot_weights=None, num_rows: int | None = None) -> None:
    """``slot_experts [S]`` integers and, when given, ``slot_weights [M = num_rows, S]``."""
    if slot_experts.ndim != 1 or not jnp.issubdtype(slot_experts.dtype, jnp.integer):
        raise ValueError(f"expected slot_experts [S] integers, got shape {slot_experts.shape} "
                         f"and dtype {slot_experts.dtype}")
    if slot_weights is not None and slot_weights.shape != (num_rows, slot_experts.shape[0]):
        raise ValueError(f"expected slot_weights [M, S] = {(num_rows, slot_experts.shape[0])}, "
                         f"got {slot_weights.shape}")


# ---------------------------------------------------------------------------------------------
# References (the spec)


def lora_shrink_group_reference(
    x: jax.Array,
    a: tuple[jax.Array, ...],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
) -> tuple[jax.Array, ...]:
    """:func:`lora_shrink` of each ``[La, E, K, r]`` stack in ``a``."""
    return tuple(lora_shrink(x, a_p, adapted_layer, slot_experts, slot_weights) for a_p in a)


def _shrinks(x, as_, adapted_layer, slot_experts, slot_weights):
    """:func:`lora_shrink` of each stack in ``as_``; ``None`` stays ``None``."""
    return tuple(None if a is None else lora_shrink(x, a, adapted_layer, slot_experts, slot_weights)
                 for a in as_)


def _expansion(xa, b, adapted_layer, slot_experts):
    """``sum_s xa[:, s] @ b[adapted_layer, slot_experts[s]]`` in float32, ``[M, N]``."""
    b_slots = b[adapted_layer, slot_experts].astype(xa.dtype)  # [S, r, N]
    return jnp.einsum("msr,srn->mn", xa, b_slots, preferred_element_type=jnp.float32)


def _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias):
    y = jnp.dot(x, w[layer].astype(x.dtype), preferred_element_type=jnp.float32)
    if xa is not None:
        y = y + _expansion(xa, b, adapted_layer, slot_experts)
    return y if bias is None else y + bias[layer].astype(jnp.float32)


def routed_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array | int,
    xa: jax.Array,
    b: jax.Array,
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    bias: jax.Array | None = None,
) -> jax.Array:
    """``x @ w[layer] + sum_s xa[:, s] @ b[adapted_layer, slot_experts[s]] + bias[layer]``;
    float32 sums, ``x.dtype`` out."""
    return _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias).astype(x.dtype)


def routed_matmul_inline_shrink_reference(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array | int,
    a: jax.Array,
    b: jax.Array,
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    bias: jax.Array | None = None,
) -> jax.Array:
    """:func:`routed_matmul_reference` of :func:`lora_shrink`'s ``xa``."""
    xa = lora_shrink(x, a, adapted_layer, slot_experts, slot_weights)
    return routed_matmul_reference(x, w, layer, xa, b, adapted_layer, slot_experts, bias)


def routed_qkv_matmul_reference(
    x: jax.Array,
    wq: jax.Array,
    wk: jax.Array,
    wv: jax.Array,
    layer: jax.Array | int,
    xas: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    biases: tuple[jax.Array | None, ...] = (None, None, None),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`routed_matmul_reference` for each of ``q, k, v``; a ``None`` xa skips its LoRA."""
    return tuple(
        _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias).astype(x.dtype)
        for w, xa, b, bias in zip((wq, wk, wv), xas, bs, biases)
    )


def routed_qkv_matmul_inline_shrink_reference(
    x: jax.Array,
    wq: jax.Array,
    wk: jax.Array,
    wv: jax.Array,
    layer: jax.Array | int,
    as_: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    biases: tuple[jax.Array | None, ...] = (None, None, None),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`routed_qkv_matmul_reference` of :func:`lora_shrink`'s ``xa`` for each ``a``
    (``None``: that projection is not adapted)."""
    xas = _shrinks(x, as_, adapted_layer, slot_experts, slot_weights)
    return routed_qkv_matmul_reference(x, wq, wk, wv, layer, xas, bs, adapted_layer, slot_experts,
                                       biases)


def routed_gate_up_matmul_reference(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    layer: jax.Array | int,
    xas: tuple[jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    b_gate: jax.Array | None = None,
    b_up: jax.Array | None = None,
) -> jax.Array:
    """``silu(gate) * up`` of the two routed projections, in float32, ``x.dtype`` out."""
    gate, up = (
        _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias)
        for w, xa, b, bias in zip((w_gate, w_up), xas, bs, (b_gate, b_up))
    )
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def routed_gate_up_matmul_inline_shrink_reference(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    layer: jax.Array | int,
    as_: tuple[jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    b_gate: jax.Array | None = None,
    b_up: jax.Array | None = None,
) -> jax.Array:
    """:func:`routed_gate_up_matmul_reference` of :func:`lora_shrink`'s ``xa`` for each ``a``."""
    xas = _shrinks(x, as_, adapted_layer, slot_experts, slot_weights)
    return routed_gate_up_matmul_reference(x, w_gate, w_up, layer, xas, bs, adapted_layer,
                                           slot_experts, b_gate, b_up)


# ---------------------------------------------------------------------------------------------
# Shapes and checks


def _is_rank(r: int) -> bool:
    return r >= 16 and r & (r - 1) == 0


def supports(k: int, *ns: int, rank: int) -> bool:
    """Whether the kernels tile ``K`` and every output width (multiples of 16) and the LoRA rank
    (a power of two ``>= 16``: Triton loads ``[rows, r]`` blocks, whose sizes must be powers of
    two, and tensor-core dots need every dimension ``>= 16``)."""
    return all(d % 16 == 0 for d in (k, *ns)) and _is_rank(rank)


def _check_rank(r: int) -> None:
    if not _is_rank(r):
        raise ValueError(f"rank r={r} must be a power of two >= 16 for the kernel (Triton "
                         f"block sizes); use the reference for other ranks")


def _row_blocks(m: int) -> tuple[int, int]:
    """``(block_m, padded M)``: a power of two in [16, 64] rows per program, rows padded to it."""
    block_m = min(_MAX_BLOCK_M, max(16, 1 << (m - 1).bit_length()))
    return block_m, -(-m // block_m) * block_m


def _check_operands(x, weights: dict, biases: dict, xas: dict, bs: dict, slot_experts) -> None:
    """Shapes of ``x [M, K]``, ``w [L, K, N]``, ``bias [L, N]``, ``xa [M, S, r]`` and
    ``b [La, E, r, N]`` (all keyed by projection name), with one ``L`` and one ``(La, E)``."""
    if x.ndim != 2:
        raise ValueError(f"expected x [M, K], got {x.shape=}")
    m, k = x.shape
    _check_slots(slot_experts)
    num_slots = slot_experts.shape[0]
    layers, experts = {}, {}
    for name, w in weights.items():
        if w.ndim != 3 or w.shape[1] != k:
            raise ValueError(f"expected {name} [L, K={k}, N], got {name}.shape={w.shape}")
        n = w.shape[2]
        if k % 16 or n % 16:
            raise ValueError(f"{name}: K={k} and N={n} must be multiples of 16")
        layers[name] = w.shape[0]
        bias = biases[name]
        if bias is not None and bias.shape != (w.shape[0], n):
            raise ValueError(f"expected the bias of {name} [L, N] = {(w.shape[0], n)}, "
                             f"got {bias.shape}")
        xa, b = xas[name], bs[name]
        if (xa is None) != (b is None):
            raise ValueError(f"{name}: pass both its xa and its b stack, or neither")
        if xa is None:
            continue
        if xa.ndim != 3 or xa.shape[:2] != (m, num_slots):
            raise ValueError(f"expected the xa of {name} [M={m}, S={num_slots}, r], got {xa.shape}")
        if xa.dtype != x.dtype:
            raise ValueError(f"the xa of {name} is {xa.dtype}, expected x's dtype {x.dtype}")
        r = xa.shape[2]
        _check_rank(r)
        if b.ndim != 4 or b.shape[2:] != (r, n):
            raise ValueError(f"expected the b stack of {name} [La, E, r={r}, N={n}], got {b.shape}")
        experts[name] = b.shape[:2]
    if len(set(layers.values())) > 1:
        raise ValueError(f"weights stack different layer counts: {layers}")
    if len(set(experts.values())) > 1:
        raise ValueError(f"b stacks have different (La, E): {experts}")


def _check_indices(layer, num_layers, adapted_layer, bs, slot_experts) -> None:
    """Range checks of the indices that are concrete (traced ones must be in range: no clamp)."""
    _check_layer(layer, num_layers)
    b = next((b for b in bs if b is not None), None)
    if b is not None:
        _check_adapted(adapted_layer, slot_experts, b.shape[:2])


def _check_adapted(adapted_layer, slot_experts, stacked: tuple[int, int]) -> None:
    """``adapted_layer`` and ``slot_experts`` in range of a ``[La, E, ...]`` stack, if concrete."""
    if isinstance(adapted_layer, (int, np.integer)) and not 0 <= adapted_layer < stacked[0]:
        raise ValueError(f"adapted_layer {adapted_layer} out of range for {stacked[0]} adapted "
                         f"layers")
    if _is_concrete(slot_experts):
        _check_experts(np.asarray(slot_experts), stacked[1], "slot_experts")


def _check_inline(x, as_: dict, bs: dict, slot_experts, slot_weights) -> dict:
    """Shapes of the inline shrink's ``a [La, E, K, r]`` stacks (keyed by projection name, beside
    their ``b``) and ``slot_weights [M, S]``. Returns the ``xa`` each projection computes in the
    kernel, as :func:`lora_shrink` would return it (``None`` where ``a`` is), so that
    :func:`_check_operands` checks the rest as for a given ``xa``."""
    if x.ndim != 2:
        raise ValueError(f"expected x [M, K], got {x.shape=}")
    m, k = x.shape
    _check_slots(slot_experts, slot_weights, m)
    xas = {}
    for name, a in as_.items():
        b = bs[name]
        if (a is None) != (b is None):
            raise ValueError(f"{name}: pass both its a and its b stack, or neither")
        if a is not None:
            if a.ndim != 4 or a.shape[2] != k:
                raise ValueError(f"expected the a stack of {name} [La, E, K={k}, r], got {a.shape}")
            if a.shape[:2] != b.shape[:2]:
                raise ValueError(f"{name}: a and b must stack the same (La, E), got {a.shape=} "
                                 f"and {b.shape=}")
        xas[name] = None if a is None else jax.ShapeDtypeStruct(
            (m, slot_experts.shape[0], a.shape[3]), x.dtype)
    return xas


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
        _check_rank(a_p.shape[3])
    if len({a_p.shape[:2] for a_p in a}) > 1:
        raise ValueError(f"a stacks have different (La, E): {[a_p.shape for a_p in a]}")
    _check_slots(slot_experts, slot_weights, m)


def _check_shrink_blocks(bs: ShrinkBlockSizes, k: int) -> None:
    if not _is_block(bs.block_k) or bs.split_k < 1:
        raise ValueError(f"{bs}: block_k must be a power of two >= 16, split_k >= 1")
    if k % (bs.block_k * bs.split_k):
        raise ValueError(f"{bs} does not tile K={k} (block_k * split_k must divide it)")


# ---------------------------------------------------------------------------------------------
# Kernels


def _stream_k(x_ref, tiles, first, steps, *, block_k):
    """``x[:, K-chunk] @ m[K-chunk]`` for each ``(tile, width)`` in ``tiles``, where
    ``tile(rows)`` loads ``m[rows]`` (``[block_k, width]``): float32 ``[block_m, width]`` each.

    The K loop of every kernel here, over ``steps`` blocks of ``block_k`` rows from ``first``. All
    tiles share it, so ``x`` is loaded once per step whether it meets ``W`` columns, ``A``
    experts or both.
    """

    def body(i, accs):
        rows = pl.ds(first + i * block_k, block_k)
        x = x_ref[:, rows]  # [block_m, block_k]
        return tuple(acc + jnp.dot(x, tile(rows).astype(x.dtype),
                                   preferred_element_type=jnp.float32)
                     for acc, (tile, _) in zip(accs, tiles))

    zeros = tuple(jnp.zeros((x_ref.shape[0], width), jnp.float32) for _, width in tiles)
    return jax.lax.fori_loop(0, steps, body, zeros)


def _weight_tile(w_ref, layer, cols, block_n):
    """Rows of ``w[layer][:, cols]`` from a stacked ``w [L, K, N]``."""
    return (lambda rows: w_ref[layer, rows, cols]), block_n


def _expert_tile(a_ref, adapted, expert):
    """Rows of ``a[adapted, expert]`` from a stacked ``a [La, E, K, r]``."""
    return (lambda rows: a_ref[adapted, expert, rows, :]), a_ref.shape[3]


def _expand_slot(xa, b_ref, adapted, expert, cols):
    """``xa [block_m, r] @ b[adapted, expert][:, cols]`` in float32."""
    b = b_ref[adapted, expert, :, cols]  # [r, block_n]
    return jnp.dot(xa, b.astype(xa.dtype), preferred_element_type=jnp.float32)


def _is_inline(lora_refs) -> bool:
    return lora_refs is not None and len(lora_refs) == 3


def _expand_given(acc, lora_refs, slots_ref, adapted, cols, split, split_k):
    """``acc + sum_s xa[s] @ b[adapted, slot_experts[s]][:, cols]`` for a given ``xa [S, block_m,
    r]``, in split 0 only (so that it counts once)."""
    xa_ref, b_ref = lora_refs

    def body(s, acc):
        return acc + _expand_slot(xa_ref[s], b_ref, adapted, slots_ref[s], cols)

    def expand(acc):
        return jax.lax.fori_loop(0, slots_ref.shape[0], body, acc)

    if split_k == 1:
        return expand(acc)
    return jax.lax.cond(split == 0, expand, lambda acc: acc, acc)


def _columns(x_ref, projections, ids, col_block, split, *, block_k, block_n, k_per_split,
             split_k):
    """Column block ``col_block`` of each projection, from split ``split``'s K chunk: float32
    ``[block_m, block_n]`` each, ``x @ w[layer]`` plus its LoRA term and bias.

    ``projections`` holds ``(w_ref, lora_refs, bias_ref)``. ``lora_refs`` is ``None``,
    ``(xa_ref, b_ref)`` (shrink done outside, ``xa [S, block_m, r]``) or ``(a_ref, sw_ref,
    b_ref)`` (inline: ``x @ a[adapted, slot_experts[s]]`` of every slot rides along with ``W`` in
    the one K loop, then is scaled by the slot weights ``sw [S, block_m]`` and rounded to
    ``x.dtype`` as in :func:`lora_shrink`). All projections share the K loop.
    """
    layer, adapted, slots_ref = ids
    cols = pl.ds(col_block * block_n, block_n)
    inline = any(_is_inline(lora_refs) for _, lora_refs, _ in projections)
    experts = [slots_ref[s] for s in range(slots_ref.shape[0])] if inline else []
    tiles = []
    for w_ref, lora_refs, _ in projections:
        tiles.append(_weight_tile(w_ref, layer, cols, block_n))
        if _is_inline(lora_refs):
            tiles += [_expert_tile(lora_refs[0], adapted, e) for e in experts]
    accs = iter(_stream_k(x_ref, tiles, split * k_per_split, k_per_split // block_k,
                          block_k=block_k))
    outs = []
    for _, lora_refs, bias_ref in projections:
        acc = next(accs)
        if _is_inline(lora_refs):
            _, sw_ref, b_ref = lora_refs
            for s, expert in enumerate(experts):
                xa = (next(accs) * sw_ref[s][:, None]).astype(x_ref.dtype)
                acc = acc + _expand_slot(xa, b_ref, adapted, expert, cols)
        elif lora_refs is not None:
            acc = _expand_given(acc, lora_refs, slots_ref, adapted, cols, split, split_k)
        if bias_ref is not None:
            acc = acc + _bias(bias_ref, layer, col_block, block_n)
        outs.append(acc)
    return outs


def _unpack(refs, lora: tuple[int, ...], bias: tuple[bool, ...]):
    """Split the kernel's refs: weights, then ``lora[p]`` LoRA refs of each projection (0, or
    see :func:`_columns`), then biases (only those added in the kernel), then outputs."""
    it = iter(refs)
    w_refs = [next(it) for _ in lora]
    lora_refs = [tuple(next(it) for _ in range(count)) or None for count in lora]
    bias_refs = [next(it) if has else None for has in bias]
    return w_refs, lora_refs, bias_refs, list(it)


def _projections_kernel(layer_ref, adapted_ref, slots_ref, x_ref, *refs, blocks, lora, bias,
                        **blocking):
    # x_ref [block_m, K]; whole (in HBM): w refs [L, K, N_p], b refs [La, E, r, N_p] (a refs
    # [La, E, K, r]), bias refs [L, N_p]; xa refs [S, block_m, r] (or slot weights [S, block_m]);
    # o_ref [block_m, block_n]: column block n of the concatenated outputs (of split s when
    # split_k > 1). Programs [first_p, first_p + blocks[p]) compute projection p.
    w_refs, lora_refs, bias_refs, (o_ref,) = _unpack(refs, lora, bias)
    n, s = pl.program_id(0), pl.program_id(1)
    ids = (layer_ref[()], adapted_ref[()], slots_ref)
    firsts = np.cumsum((0,) + blocks[:-1]).tolist()

    def projection(p):
        def compute():
            (acc,) = _columns(x_ref, [(w_refs[p], lora_refs[p], bias_refs[p])], ids,
                              n - firsts[p], s, **blocking)
            return acc

        return compute

    if len(blocks) == 1:
        acc = projection(0)()
    else:
        which = sum((n >= f).astype(jnp.int32) for f in firsts[1:])
        acc = jax.lax.switch(which, [projection(p) for p in range(len(blocks))])
    o_ref[...] = acc.astype(o_ref.dtype)


def _gate_up_kernel(layer_ref, adapted_ref, slots_ref, x_ref, *refs, lora, bias, **blocking):
    # Both weights' column block n in one program (x loaded once per K step). split_k == 1:
    # o_ref [block_m, block_n] = silu(gate) * up in x.dtype; else og_ref, ou_ref: float32
    # partial sums of split s.
    w_refs, lora_refs, bias_refs, out_refs = _unpack(refs, lora, bias)
    n, s = pl.program_id(0), pl.program_id(1)
    ids = (layer_ref[()], adapted_ref[()], slots_ref)
    gate, up = _columns(x_ref, list(zip(w_refs, lora_refs, bias_refs)), ids, n, s, **blocking)
    if blocking["split_k"] == 1:
        (o_ref,) = out_refs
        o_ref[...] = (jax.nn.silu(gate) * up).astype(o_ref.dtype)
    else:
        og_ref, ou_ref = out_refs
        og_ref[...] = gate
        ou_ref[...] = up


def _shrink_group_kernel(adapted_ref, slots_ref, x_ref, sw_ref, *refs, block_k, k_per_split):
    # Program (p, s, j, m): x_ref [block_m, K] (row block m); sw_ref [block_m], slot s's weights
    # on these rows; a refs [La, E, K, r_p] whole (in HBM); o refs [block_m, r_p]: slot s's xa of
    # projection p (float32 partial sums of split j when split_k > 1). It streams K chunk j of
    # a_p[adapted, slot_experts[s]] once; other projections' outputs are left to their programs.
    a_refs, o_refs = refs[:len(refs) // 2], refs[len(refs) // 2:]
    p, slot, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def shrink(a_ref, o_ref):
        tile = _expert_tile(a_ref, adapted_ref[()], slots_ref[slot])
        (xa,) = _stream_k(x_ref, [tile], split * k_per_split, k_per_split // block_k,
                          block_k=block_k)
        o_ref[...] = (xa * sw_ref[...][:, None]).astype(o_ref.dtype)

    for i, (a_ref, o_ref) in enumerate(zip(a_refs, o_refs)):
        pl.when(p == i)(functools.partial(shrink, a_ref, o_ref))


# Projection grids: (column blocks, split_k, row blocks); the shrink group's grid:
# (projections, slots, split_k, row blocks).

_SCALAR = pl.BlockSpec((), lambda *_: ())


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _pad_rows(a, rows):
    return jnp.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))


def _out_spec(block_m, block_n, split_k):
    if split_k == 1:
        return pl.BlockSpec((block_m, block_n), lambda n, s, m: (m, n))
    return pl.BlockSpec((None, block_m, block_n), lambda n, s, m: (s, m, n))


def _out_shape(mp, n, split_k, dtype):
    if split_k == 1:
        return jax.ShapeDtypeStruct((mp, n), dtype)
    return jax.ShapeDtypeStruct((split_k, mp, n), jnp.float32)


def _launch(kernel, name, x, ws, layer, loras, adapted_layer, slot_experts, biases,
            block_sizes, *, col_blocks, width, outputs, interpret):
    """The shared ``pallas_call``: operands, specs and grid for ``ws`` (one or more projections),
    their LoRA operands (``None``, ``(xa, b)`` or ``(a, slot_weights, b)`` each) and biases.
    Returns the raw output(s), ``[(split_k,) Mp, width]``."""
    num_rows, k = x.shape
    block_m, mp = _row_blocks(num_rows)
    split_k = block_sizes.split_k
    in_bias = tuple(b is not None and split_k == 1 for b in biases)
    operands = [jnp.asarray(layer, jnp.int32), jnp.asarray(adapted_layer, jnp.int32),
                slot_experts.astype(jnp.int32), _pad_rows(x, mp), *ws]
    specs = [_SCALAR, _SCALAR, _whole(slot_experts.shape),
             pl.BlockSpec((block_m, k), lambda n, s, m: (m, 0)), *(_whole(w.shape) for w in ws)]
    num_slots = slot_experts.shape[0]
    for lora in loras:
        if lora is None:
            continue
        if len(lora) == 2:
            # xa as [S, Mp, r]: each slot's rows contiguous, loaded as one [block_m, r] block.
            xa, b = lora
            operands += [_pad_rows(xa, mp).transpose(1, 0, 2), b]
            specs += [pl.BlockSpec((num_slots, block_m, xa.shape[2]), lambda n, s, m: (0, m, 0)),
                      _whole(b.shape)]
        else:
            a, slot_weights, b = lora  # slot weights as [S, Mp]
            operands += [a, _pad_rows(slot_weights.astype(jnp.float32), mp).T, b]
            specs += [_whole(a.shape), pl.BlockSpec((num_slots, block_m), lambda n, s, m: (0, m)),
                      _whole(b.shape)]
    operands += [b for b, has in zip(biases, in_bias) if has]
    specs += [_whole(b.shape) for b, has in zip(biases, in_bias) if has]
    out_shape = _out_shape(mp, width, split_k, x.dtype)
    out_spec = _out_spec(block_m, block_sizes.block_n, split_k)
    return pl.pallas_call(
        functools.partial(kernel, lora=tuple(0 if lr is None else len(lr) for lr in loras),
                          bias=in_bias, split_k=split_k,
                          block_k=block_sizes.block_k, block_n=block_sizes.block_n,
                          k_per_split=k // split_k),
        grid=(col_blocks, split_k, mp // block_m),
        in_specs=specs,
        out_specs=out_spec if outputs == 1 else [out_spec] * outputs,
        out_shape=out_shape if outputs == 1 else [out_shape] * outputs,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name=f"{name}_m{block_m}_{_blocks_name(block_sizes)}",
    )(*operands)


def _loras(xas, bs):
    return tuple(None if xa is None else (xa, b) for xa, b in zip(xas, bs))


def _inline_loras(as_, slot_weights, bs):
    return tuple(None if a is None else (a, slot_weights, b) for a, b in zip(as_, bs))


# ---------------------------------------------------------------------------------------------
# Public ops


def lora_shrink_group(
    x: jax.Array,
    a: tuple[jax.Array, ...],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    *,
    block_sizes: ShrinkBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """:func:`lora_shrink` of every projection that reads ``x`` (``q, k, v`` or ``gate, up``; or
    one), in one launch.

    One program per (projection, slot, K split, block of 64 rows) streams its K chunk of
    ``a[adapted_layer, slot_experts[s]]`` once. At decode that is few programs (``len(a) * S``,
    6 for ``q, k, v`` of one row with top-2), each bound by what one SM can keep in flight:
    deep K steps help, and ``split_k > 1`` spreads a slot over more programs at the price of an
    XLA reduction (one more launch).

    Args:
      x: ``[M, K]`` activations.
      a: the projections' ``[La, E, K, r_p]`` stacked LoRA ``A`` experts: one ``(La, E)``, ranks
        may differ (each a power of two ``>= 16``).
      adapted_layer: index into ``La``, may be traced.
      slot_experts: ``[S]`` int32, from :func:`route_slots`; may be traced.
      slot_weights: ``[M, S]`` float32, from :func:`route_slots`.
      block_sizes: ``block_k * split_k`` must divide ``K``; default
        :func:`default_shrink_block_sizes` (not measured).
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      One ``[M, S, r_p]`` per stack, in ``x.dtype`` (float32 accumulation), equal to
      :func:`lora_shrink_group_reference`.
    """
    a = tuple(a)
    if not a:
        raise ValueError("lora_shrink_group needs at least one a stack")
    _check_adapted(adapted_layer, slot_experts, a[0].shape[:2])
    return _lora_shrink_group(x, a, adapted_layer, slot_experts, slot_weights,
                              block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _lora_shrink_group(x, a, adapted_layer, slot_experts, slot_weights, *, block_sizes,
                       interpret):
    _check_group(x, a, slot_experts, slot_weights)
    m, k = x.shape
    ranks = [a_p.shape[3] for a_p in a]
    bs_ = block_sizes or default_shrink_block_sizes(k, max(ranks))
    _check_shrink_blocks(bs_, k)
    block_m, mp = _row_blocks(m)
    num_slots, split_k = slot_experts.shape[0], bs_.split_k
    if split_k == 1:
        out_shapes = [jax.ShapeDtypeStruct((mp, num_slots, r), x.dtype) for r in ranks]
        out_specs = [pl.BlockSpec((block_m, None, r), lambda p, s, j, i: (i, s, 0))
                     for r in ranks]
    else:
        out_shapes = [jax.ShapeDtypeStruct((split_k, mp, num_slots, r), jnp.float32)
                      for r in ranks]
        out_specs = [pl.BlockSpec((None, block_m, None, r), lambda p, s, j, i: (j, i, s, 0))
                     for r in ranks]
    outs = pl.pallas_call(
        functools.partial(_shrink_group_kernel, block_k=bs_.block_k, k_per_split=k // split_k),
        grid=(len(a), num_slots, split_k, mp // block_m),
        in_specs=[_SCALAR, _whole(slot_experts.shape),
                  pl.BlockSpec((block_m, k), lambda p, s, j, i: (i, 0)),
                  pl.BlockSpec((None, block_m), lambda p, s, j, i: (s, i)),
                  *(_whole(a_p.shape) for a_p in a)],
        out_specs=out_specs,
        out_shape=out_shapes,
        compiler_params=plgpu.CompilerParams(num_warps=bs_.num_warps,
                                             num_stages=bs_.num_stages),
        interpret=interpret,
        name=f"lora_shrink_group{len(a)}_m{block_m}_k{bs_.block_k}_s{split_k}"
             f"_w{bs_.num_warps}_st{bs_.num_stages}",
    )(jnp.asarray(adapted_layer, jnp.int32), slot_experts.astype(jnp.int32), _pad_rows(x, mp),
      _pad_rows(slot_weights.astype(jnp.float32), mp).T, *a)
    if split_k > 1:
        outs = [out.sum(axis=0) for out in outs]
    return tuple(out[:m].astype(x.dtype) for out in outs)


def routed_matmul(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array | int,
    xa: jax.Array,
    b: jax.Array,
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    bias: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x @ w[layer] + sum_s xa[:, s] @ b[adapted_layer, slot_experts[s]] + bias[layer]``.

    One launch; ``w[layer]`` and the slots' ``b`` are read once (per block of 64 rows).

    Args:
      x: ``[M, K]`` activations.
      w: ``[L, K, N]`` stacked weights.
      layer: the layer of ``w`` (and ``bias``) to read; may be traced.
      xa: ``[M, S, r]`` in ``x.dtype``, from :func:`lora_shrink` or :func:`lora_shrink_group`.
      b: ``[La, E, r, N]`` stacked LoRA ``B`` experts.
      adapted_layer: the layer of ``b`` to read; may be traced.
      slot_experts: ``[S]`` int32, from :func:`route_slots`; may be traced.
      bias: optional ``[L, N]``.
      block_sizes: ``block_n`` must divide ``N``, ``block_k * split_k`` must divide ``K``; default
        per shape from ``stacked_matmul`` (measured without the LoRA term).
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[M, N]`` in ``x.dtype`` (float32 accumulation).
    """
    _check_indices(layer, w.shape[0], adapted_layer, (b,), slot_experts)
    return _routed_matmul(x, w, layer, xa, b, adapted_layer, slot_experts, bias,
                          block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_matmul(x, w, layer, xa, b, adapted_layer, slot_experts, bias, *, block_sizes,
                   interpret):
    _check_operands(x, {"w": w}, {"w": bias}, {"w": xa}, {"w": b}, slot_experts)
    return _single_projection("routed_matmul", x, w, layer, (xa, b), adapted_layer, slot_experts,
                              bias, block_sizes, interpret)


def _single_projection(name, x, w, layer, lora, adapted_layer, slot_experts, bias, block_sizes,
                       interpret):
    m, k = x.shape
    n = w.shape[2]
    bs_ = block_sizes or default_block_sizes(m, k, n)
    _check_block_sizes(bs_, k, {"N": n})
    out = _launch(functools.partial(_projections_kernel, blocks=(n // bs_.block_n,)), name, x,
                  (w,), layer, (lora,), adapted_layer, slot_experts, (bias,), bs_,
                  col_blocks=n // bs_.block_n, width=n, outputs=1, interpret=interpret)
    if bs_.split_k > 1:  # the kernel adds the bias only when it writes the final sums
        out = out.sum(axis=0)
        if bias is not None:
            out = out + bias[layer].astype(jnp.float32)
    return out[:m].astype(x.dtype)


def routed_matmul_inline_shrink(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array | int,
    a: jax.Array,
    b: jax.Array,
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    bias: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """:func:`routed_matmul` with the shrink inside the kernel: no separate ``x @ A`` launch.

    Every program accumulates ``xa = slot_weights * x @ a[adapted_layer, e]`` of all ``S`` slots
    over its K chunk in the loop that streams ``w`` (the ``A`` tiles share each ``x`` load), then
    expands it. ``A`` is re-read by every column block (``S r / block_n`` of ``W``'s bytes, from
    L2) and each program holds ``S`` accumulators: meant for gather mode (few slots). DESIGN.md
    §2 measured a kernel that recomputed ``x @ A`` in every program at 0.38-0.49 of the copy
    bandwidth; this one shares the ``x`` loads of the ``W`` loop and is to be measured against
    :func:`lora_shrink_group` + :func:`routed_matmul`.

    Args:
      a: ``[La, E, K, r]`` stacked LoRA ``A`` experts.
      slot_weights: ``[M, S]`` float32, from :func:`route_slots`.
      Others: as in :func:`routed_matmul`.

    Returns:
      ``[M, N]`` in ``x.dtype``, equal to :func:`routed_matmul_inline_shrink_reference`.
    """
    _check_indices(layer, w.shape[0], adapted_layer, (b,), slot_experts)
    return _routed_matmul_inline_shrink(x, w, layer, a, b, adapted_layer, slot_experts,
                                        slot_weights, bias, block_sizes=block_sizes,
                                        interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_matmul_inline_shrink(x, w, layer, a, b, adapted_layer, slot_experts, slot_weights,
                                 bias, *, block_sizes, interpret):
    xas = _check_inline(x, {"w": a}, {"w": b}, slot_experts, slot_weights)
    _check_operands(x, {"w": w}, {"w": bias}, xas, {"w": b}, slot_experts)
    return _single_projection("routed_matmul_inline_shrink", x, w, layer, (a, slot_weights, b),
                              adapted_layer, slot_experts, bias, block_sizes, interpret)


def routed_qkv_matmul(
    x: jax.Array,
    wq: jax.Array,
    wk: jax.Array,
    wv: jax.Array,
    layer: jax.Array | int,
    xas: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    biases: tuple[jax.Array | None, jax.Array | None, jax.Array | None] = (None, None, None),
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v``, each ``x @ w[layer] (+ its expansion) (+ its bias)``, in one launch.

    As ``fused_projections.qkv_matmul``: the grid covers the column blocks of all three weights.

    Args:
      x: ``[M, K]`` activations.
      wq: ``[L, K, Nq]``; ``wk``, ``wv``: ``[L, K, Nkv]``.
      layer: may be traced.
      xas: ``(xa_q, xa_k, xa_v)``, each ``[M, S, r]`` from :func:`lora_shrink` (or
        :func:`lora_shrink_group`) or ``None`` (that projection is not adapted).
      bs: the matching ``[La, E, r, N]`` ``B`` stacks (``None`` where ``xa`` is).
      adapted_layer, slot_experts: as in :func:`routed_matmul`.
      biases: ``(b_q, b_k, b_v)``, each ``[L, N]`` or ``None``.
      block_sizes: ``block_n`` must divide ``Nq`` and ``Nkv``; default from ``fused_projections``
        (measured without the LoRA term).
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``q [M, Nq]``, ``k [M, Nkv]``, ``v [M, Nkv]`` in ``x.dtype`` (float32 accumulation).
    """
    _check_arity(3, xas=xas, bs=bs, biases=biases)
    _check_indices(layer, wq.shape[0], adapted_layer, bs, slot_experts)
    return _routed_qkv_matmul(x, wq, wk, wv, layer, tuple(xas), tuple(bs), adapted_layer,
                              slot_experts, tuple(biases), block_sizes=block_sizes,
                              interpret=interpret)


def _check_arity(count: int, **groups) -> None:
    if any(len(group) != count for group in groups.values()):
        raise ValueError(f"expected {count} {', '.join(groups)}, got lengths "
                         f"{[len(group) for group in groups.values()]}")


_QKV = ("wq", "wk", "wv")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_qkv_matmul(x, wq, wk, wv, layer, xas, bs, adapted_layer, slot_experts, biases, *,
                       block_sizes, interpret):
    _check_operands(x, dict(zip(_QKV, (wq, wk, wv))), dict(zip(_QKV, biases)),
                    dict(zip(_QKV, xas)), dict(zip(_QKV, bs)), slot_experts)
    return _qkv("routed_qkv_matmul", x, (wq, wk, wv), layer, _loras(xas, bs), adapted_layer,
                slot_experts, biases, block_sizes, interpret)


def _qkv(name, x, ws, layer, loras, adapted_layer, slot_experts, biases, block_sizes, interpret):
    wq, wk, wv = ws
    if wk.shape != wv.shape:
        raise ValueError(f"wk and wv must have one shape, got {wk.shape=} and {wv.shape=}")
    m, k = x.shape
    nq, nkv = wq.shape[2], wk.shape[2]
    bs_ = block_sizes or default_qkv_block_sizes(m, k, nq, nkv)
    _check_block_sizes(bs_, k, {"Nq": nq, "Nkv": nkv})
    blocks = (nq // bs_.block_n, nkv // bs_.block_n, nkv // bs_.block_n)
    out = _launch(functools.partial(_projections_kernel, blocks=blocks), name, x, ws, layer,
                  loras, adapted_layer, slot_experts, biases, bs_, col_blocks=sum(blocks),
                  width=nq + 2 * nkv, outputs=1, interpret=interpret)
    if bs_.split_k > 1:
        out = out.sum(axis=0)
    out = out[:m]
    ys = (out[:, :nq], out[:, nq:nq + nkv], out[:, nq + nkv:])
    if bs_.split_k > 1:  # the kernel adds biases only when it writes the final sums
        ys = tuple(y if bias is None else y + bias[layer].astype(y.dtype)
                   for y, bias in zip(ys, biases))
    return tuple(y.astype(x.dtype) for y in ys)


def routed_qkv_matmul_inline_shrink(
    x: jax.Array,
    wq: jax.Array,
    wk: jax.Array,
    wv: jax.Array,
    layer: jax.Array | int,
    as_: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    biases: tuple[jax.Array | None, jax.Array | None, jax.Array | None] = (None, None, None),
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`routed_qkv_matmul` with each projection's shrink inside its own programs (as in
    :func:`routed_matmul_inline_shrink`): one launch for the whole adapted ``q, k, v``.

    Args:
      as_: ``(a_q, a_k, a_v)``, each a ``[La, E, K, r]`` ``A`` stack or ``None`` (that projection
        is not adapted).
      bs: the matching ``[La, E, r, N]`` ``B`` stacks (``None`` where ``a`` is).
      slot_weights: ``[M, S]`` float32, from :func:`route_slots`.
      Others: as in :func:`routed_qkv_matmul`.

    Returns:
      ``q, k, v`` in ``x.dtype``, equal to :func:`routed_qkv_matmul_inline_shrink_reference`.
    """
    _check_arity(3, as_=as_, bs=bs, biases=biases)
    _check_indices(layer, wq.shape[0], adapted_layer, bs, slot_experts)
    return _routed_qkv_matmul_inline_shrink(x, wq, wk, wv, layer, tuple(as_), tuple(bs),
                                            adapted_layer, slot_experts, slot_weights,
                                            tuple(biases), block_sizes=block_sizes,
                                            interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_qkv_matmul_inline_shrink(x, wq, wk, wv, layer, as_, bs, adapted_layer, slot_experts,
                                     slot_weights, biases, *, block_sizes, interpret):
    bs_by_name = dict(zip(_QKV, bs))
    xas = _check_inline(x, dict(zip(_QKV, as_)), bs_by_name, slot_experts, slot_weights)
    _check_operands(x, dict(zip(_QKV, (wq, wk, wv))), dict(zip(_QKV, biases)), xas, bs_by_name,
                    slot_experts)
    return _qkv("routed_qkv_matmul_inline_shrink", x, (wq, wk, wv), layer,
                _inline_loras(as_, slot_weights, bs), adapted_layer, slot_experts, biases,
                block_sizes, interpret)


def routed_gate_up_matmul(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    layer: jax.Array | int,
    xas: tuple[jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    b_gate: jax.Array | None = None,
    b_up: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``silu(gate) * up`` of two routed projections of ``x``, in one launch.

    As ``fused_projections.gate_up_matmul``: each program streams the same column block of both
    weights and, with ``split_k == 1``, applies expansions, biases and SiLU in its epilogue.

    Args:
      x: ``[M, K]`` activations.
      w_gate, w_up: ``[L, K, F]`` stacked weights.
      layer: may be traced.
      xas: ``(xa_gate, xa_up)``, each ``[M, S, r]`` from :func:`lora_shrink` (or
        :func:`lora_shrink_group`) or ``None``.
      bs: the matching ``[La, E, r, F]`` ``B`` stacks (``None`` where ``xa`` is).
      adapted_layer, slot_experts: as in :func:`routed_matmul`.
      b_gate, b_up: optional ``[L, F]`` biases.
      block_sizes: default from ``fused_projections`` (measured without the LoRA term). With
        ``split_k > 1`` the kernel writes float32 partial sums and XLA adds biases and SiLU.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[M, F]`` in ``x.dtype``, computed in float32.
    """
    _check_arity(2, xas=xas, bs=bs)
    _check_indices(layer, w_gate.shape[0], adapted_layer, bs, slot_experts)
    return _routed_gate_up_matmul(x, w_gate, w_up, layer, tuple(xas), tuple(bs), adapted_layer,
                                  slot_experts, b_gate, b_up, block_sizes=block_sizes,
                                  interpret=interpret)


_GATE_UP = ("w_gate", "w_up")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_gate_up_matmul(x, w_gate, w_up, layer, xas, bs, adapted_layer, slot_experts, b_gate,
                           b_up, *, block_sizes, interpret):
    biases = (b_gate, b_up)
    _check_operands(x, dict(zip(_GATE_UP, (w_gate, w_up))), dict(zip(_GATE_UP, biases)),
                    dict(zip(_GATE_UP, xas)), dict(zip(_GATE_UP, bs)), slot_experts)
    return _gate_up("routed_gate_up_matmul", x, (w_gate, w_up), layer, _loras(xas, bs),
                    adapted_layer, slot_experts, biases, block_sizes, interpret)


def _gate_up(name, x, ws, layer, loras, adapted_layer, slot_experts, biases, block_sizes,
             interpret):
    w_gate, w_up = ws
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate and w_up must have one shape, got {w_gate.shape=} and "
                         f"{w_up.shape=}")
    m, k = x.shape
    f = w_gate.shape[2]
    bs_ = block_sizes or default_gate_up_block_sizes(m, k, f)
    _check_block_sizes(bs_, k, {"F": f})
    fused = bs_.split_k == 1
    out = _launch(_gate_up_kernel, name, x, ws, layer, loras, adapted_layer, slot_experts, biases,
                  bs_, col_blocks=f // bs_.block_n, width=f, outputs=1 if fused else 2,
                  interpret=interpret)
    if fused:
        return out[:m]
    gate, up = (p.sum(axis=0)[:m] for p in out)
    gate, up = (y if bias is None else y + bias[layer].astype(jnp.float32)
                for y, bias in zip((gate, up), biases))
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def routed_gate_up_matmul_inline_shrink(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    layer: jax.Array | int,
    as_: tuple[jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    slot_weights: jax.Array,
    b_gate: jax.Array | None = None,
    b_up: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """:func:`routed_gate_up_matmul` with both shrinks inside the kernel (as in
    :func:`routed_matmul_inline_shrink`): each program's K loop streams the column block of both
    weights and the ``A`` tiles of both projections' slots, sharing every ``x`` load.

    Args:
      as_: ``(a_gate, a_up)``, each a ``[La, E, K, r]`` ``A`` stack or ``None``.
      bs: the matching ``[La, E, r, F]`` ``B`` stacks (``None`` where ``a`` is).
      slot_weights: ``[M, S]`` float32, from :func:`route_slots`.
      Others: as in :func:`routed_gate_up_matmul`.

    Returns:
      ``[M, F]`` in ``x.dtype``, equal to :func:`routed_gate_up_matmul_inline_shrink_reference`.
    """
    _check_arity(2, as_=as_, bs=bs)
    _check_indices(layer, w_gate.shape[0], adapted_layer, bs, slot_experts)
    return _routed_gate_up_matmul_inline_shrink(x, w_gate, w_up, layer, tuple(as_), tuple(bs),
                                                adapted_layer, slot_experts, slot_weights,
                                                b_gate, b_up, block_sizes=block_sizes,
                                                interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_gate_up_matmul_inline_shrink(x, w_gate, w_up, layer, as_, bs, adapted_layer,
                                         slot_experts, slot_weights, b_gate, b_up, *,
                                         block_sizes, interpret):
    biases = (b_gate, b_up)
    bs_by_name = dict(zip(_GATE_UP, bs))
    xas = _check_inline(x, dict(zip(_GATE_UP, as_)), bs_by_name, slot_experts, slot_weights)
    _check_operands(x, dict(zip(_GATE_UP, (w_gate, w_up))), dict(zip(_GATE_UP, biases)), xas,
                    bs_by_name, slot_experts)
    return _gate_up("routed_gate_up_matmul_inline_shrink", x, (w_gate, w_up), layer,
                    _inline_loras(as_, slot_weights, bs), adapted_layer, slot_experts, biases,
                    block_sizes, interpret)
