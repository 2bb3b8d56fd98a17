"""Routed LoRA projections fused into the stacked-weight projection kernels (Pallas, Triton).

``y = x @ W[layer] + bias[layer] + scale * sum_j g_j (x @ A[e_j]) @ B[e_j]`` where every row of
``x`` has its own route (``expert_ids, gates [M, k]``) and ``W`` is read once. The LoRA term is
split in two:

* **shrink** (:func:`lora_shrink`, XLA, small):
  ``xa[m, s] = slot_weights[m, s] * x[m] @ A[slot_experts[s]]``, ``[M, S, r]``. Computing
  ``x @ A`` inside every program of the projection repeats it once per column block; DESIGN.md
  §2 measured that at 0.38-0.49 of the copy bandwidth, against +12-18 % for a separate small op
  (:func:`routed_matmul_inline_shrink` does it, to be re-measured).
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

``split_k > 1`` writes float32 partial sums reduced by XLA (as in ``fused_projections``); only the
programs of split 0 add the expansion, so it counts once (they do more work than the others;
``split_k = 1`` avoids that imbalance, which is not yet measured). Rows are padded to a power of two
``>= 16`` and tiled in blocks of at most 64 rows (a grid axis): Triton loads and dots need
power-of-two sizes ``>= 16``, decode (``M <= 64``) is one row block, and prefill runs several
(``W`` is then re-read per row block, as in any GEMM). For the same reason the rank must be a
power of two ``>= 16`` (:func:`supports`; callers fall back to the references otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .fused_projections import (
    _accumulate,
    _bias,
    _blocks_name,
    _check_block_sizes,
    _check_layer,
    default_gate_up_block_sizes,
    default_qkv_block_sizes,
)
from .stacked_matmul import BlockSizes, default_block_sizes

__all__ = [
    "BlockSizes",
    "lora_shrink",
    "route_slots",
    "routed_gate_up_matmul",
    "routed_gate_up_matmul_reference",
    "routed_matmul",
    "routed_matmul_inline_shrink",
    "routed_matmul_inline_shrink_reference",
    "routed_matmul_reference",
    "routed_qkv_matmul",
    "routed_qkv_matmul_reference",
    "supports",
]

# Routed block sizes are not yet measured on a GPU: the defaults are stacked_matmul's and
# fused_projections' tables and heuristics, which were measured without the LoRA term.
_MAX_BLOCK_M = 64  # rows per program; not measured either (decode batches fit in one block)


# ---------------------------------------------------------------------------------------------
# Slots and the shrink (pure jnp, small)


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
    _check_slots(slot_experts)
    if slot_weights.shape != (x.shape[0], slot_experts.shape[0]):
        raise ValueError(f"expected slot_weights [M, S] = {(x.shape[0], slot_experts.shape[0])}, "
                         f"got {slot_weights.shape}")
    _check_adapted(adapted_layer, slot_experts, a.shape[:2])
    a_slots = a[adapted_layer, slot_experts].astype(x.dtype)  # [S, K, r], one gather
    xa = jnp.einsum("mk,skr->msr", x, a_slots, preferred_element_type=jnp.float32)
    return (xa * slot_weights[:, :, None]).astype(x.dtype)


def _check_slots(slot_experts) -> None:
    if slot_experts.ndim != 1 or not jnp.issubdtype(slot_experts.dtype, jnp.integer):
        raise ValueError(f"expected slot_experts [S] integers, got shape {slot_experts.shape} "
                         f"and dtype {slot_experts.dtype}")


# ---------------------------------------------------------------------------------------------
# References (the spec)


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


# ---------------------------------------------------------------------------------------------
# Shapes and checks


def _is_rank(r: int) -> bool:
    return r >= 16 and r & (r - 1) == 0


def supports(k: int, *ns: int, rank: int) -> bool:
    """Whether the kernels tile ``K`` and every output width (multiples of 16) and the LoRA rank
    (a power of two ``>= 16``: Triton loads ``[rows, r]`` blocks, whose sizes must be powers of
    two, and tensor-core dots need every dimension ``>= 16``)."""
    return all(d % 16 == 0 for d in (k, *ns)) and _is_rank(rank)


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
        if not _is_rank(r):
            raise ValueError(f"rank r={r} must be a power of two >= 16 for the kernel (Triton "
                             f"block sizes); use the reference for other ranks")
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


# ---------------------------------------------------------------------------------------------
# Kernels


def _slot_inputs(lora_refs, x_ref, adapted, slots_ref, *, block_k):
    """``(xa_of, b_ref)``: ``xa_of(s)`` is slot ``s``'s ``[block_m, r]`` input to the expansion.

    ``lora_refs`` is ``(xa_ref, b_ref)`` (shrink done outside, ``xa [S, block_m, r]``) or
    ``(a_ref, sw_ref, b_ref)`` (shrink inside: ``x @ a[adapted, slot_experts[s]]`` over all of
    ``K``, times the slot weights ``sw [S, block_m]``, rounded to ``x.dtype`` as in
    :func:`lora_shrink`).
    """
    if len(lora_refs) == 2:
        xa_ref, b_ref = lora_refs
        return (lambda s: xa_ref[s]), b_ref
    a_ref, sw_ref, b_ref = lora_refs

    def xa_of(s):
        expert = slots_ref[s]

        def body(i, xa):
            rows = pl.ds(i * block_k, block_k)
            x = x_ref[:, rows]  # [block_m, block_k]
            return xa + jnp.dot(x, a_ref[adapted, expert, rows, :].astype(x.dtype),
                                preferred_element_type=jnp.float32)

        zeros = jnp.zeros((x_ref.shape[0], a_ref.shape[3]), jnp.float32)
        xa = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, zeros)
        return (xa * sw_ref[s][:, None]).astype(x_ref.dtype)

    return xa_of, b_ref


def _add_expansion(acc, lora_refs, x_ref, slots_ref, adapted, col_block, split, *, block_k,
                   block_n, split_k):
    """``acc + sum_s xa[s] @ b[adapted, slot_experts[s]][:, cols]``, in split 0 only."""
    cols = pl.ds(col_block * block_n, block_n)
    xa_of, b_ref = _slot_inputs(lora_refs, x_ref, adapted, slots_ref, block_k=block_k)

    def body(s, acc):
        xa = xa_of(s)  # [block_m, r]
        b = b_ref[adapted, slots_ref[s], :, cols]  # [r, block_n]
        return acc + jnp.dot(xa, b.astype(xa.dtype), preferred_element_type=jnp.float32)

    def expand(acc):
        return jax.lax.fori_loop(0, slots_ref.shape[0], body, acc)

    if split_k == 1:
        return expand(acc)
    return jax.lax.cond(split == 0, expand, lambda acc: acc, acc)


def _unpack(refs, lora: tuple[int, ...], bias: tuple[bool, ...]):
    """Split the kernel's refs: weights, then ``lora[p]`` LoRA refs of each projection (0, or
    see :func:`_slot_inputs`), then biases (only those added in the kernel), then outputs."""
    it = iter(refs)
    w_refs = [next(it) for _ in lora]
    lora_refs = [tuple(next(it) for _ in range(count)) or None for count in lora]
    bias_refs = [next(it) if has else None for has in bias]
    return w_refs, lora_refs, bias_refs, list(it)


def _epilogue(acc, lora_refs, bias_ref, x_ref, ids, col_block, split, *, block_k, block_n,
              split_k):
    layer, adapted, slots_ref = ids
    if lora_refs is not None:
        acc = _add_expansion(acc, lora_refs, x_ref, slots_ref, adapted, col_block, split,
                             block_k=block_k, block_n=block_n, split_k=split_k)
    if bias_ref is not None:
        acc = acc + _bias(bias_ref, layer, col_block, block_n)
    return acc


def _projections_kernel(layer_ref, adapted_ref, slots_ref, x_ref, *refs, blocks, lora, bias,
                        split_k, block_k, block_n, k_per_split):
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
            (acc,) = _accumulate(x_ref, (w_refs[p],), ids[0], n - firsts[p], s, block_k=block_k,
                                 block_n=block_n, k_per_split=k_per_split)
            return _epilogue(acc, lora_refs[p], bias_refs[p], x_ref, ids, n - firsts[p], s,
                             block_k=block_k, block_n=block_n, split_k=split_k)

        return compute

    if len(blocks) == 1:
        acc = projection(0)()
    else:
        which = sum((n >= f).astype(jnp.int32) for f in firsts[1:])
        acc = jax.lax.switch(which, [projection(p) for p in range(len(blocks))])
    o_ref[...] = acc.astype(o_ref.dtype)


def _gate_up_kernel(layer_ref, adapted_ref, slots_ref, x_ref, *refs, lora, bias, split_k,
                    block_k, block_n, k_per_split):
    # Both weights' column block n in one program (x loaded once per K step). split_k == 1:
    # o_ref [block_m, block_n] = silu(gate) * up in x.dtype; else og_ref, ou_ref: float32
    # partial sums of split s (split 0 holding the expansions).
    w_refs, lora_refs, bias_refs, out_refs = _unpack(refs, lora, bias)
    n, s = pl.program_id(0), pl.program_id(1)
    ids = (layer_ref[()], adapted_ref[()], slots_ref)
    accs = _accumulate(x_ref, w_refs, ids[0], n, s, block_k=block_k, block_n=block_n,
                       k_per_split=k_per_split)
    gate, up = (_epilogue(acc, lr, br, x_ref, ids, n, s, block_k=block_k, block_n=block_n,
                          split_k=split_k)
                for acc, lr, br in zip(accs, lora_refs, bias_refs))
    if split_k == 1:
        (o_ref,) = out_refs
        o_ref[...] = (jax.nn.silu(gate) * up).astype(o_ref.dtype)
    else:
        og_ref, ou_ref = out_refs
        og_ref[...] = gate
        ou_ref[...] = up


# Grid: (column blocks, split_k, row blocks).


def _whole(shape):
    return pl.BlockSpec(shape, lambda n, s, m: (0,) * len(shape))


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
                slot_experts.astype(jnp.int32), jnp.pad(x, ((0, mp - num_rows), (0, 0))), *ws]
    specs = [pl.BlockSpec((), lambda n, s, m: ()), pl.BlockSpec((), lambda n, s, m: ()),
             _whole(slot_experts.shape), pl.BlockSpec((block_m, k), lambda n, s, m: (m, 0)),
             *(_whole(w.shape) for w in ws)]
    num_slots = slot_experts.shape[0]
    for lora in loras:
        if lora is None:
            continue
        if len(lora) == 2:
            # xa as [S, Mp, r]: each slot's rows contiguous, loaded as one [block_m, r] block.
            xa, b = lora
            operands += [jnp.pad(xa, ((0, mp - num_rows), (0, 0), (0, 0))).transpose(1, 0, 2), b]
            specs += [pl.BlockSpec((num_slots, block_m, xa.shape[2]), lambda n, s, m: (0, m, 0)),
                      _whole(b.shape)]
        else:
            a, slot_weights, b = lora  # slot weights as [S, Mp]
            operands += [a, jnp.pad(slot_weights, ((0, mp - num_rows), (0, 0))).T, b]
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


# ---------------------------------------------------------------------------------------------
# Public ops


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
      xa: ``[M, S, r]`` in ``x.dtype``, from :func:`lora_shrink`.
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

    Every program of split 0 recomputes ``xa = slot_weights * x @ a[adapted_layer, e]`` for all
    ``S`` slots over the whole ``K`` (redundant work, once per column block; DESIGN.md §2
    measured a kernel like it at 0.38 of the copy bandwidth). Kept to re-measure against
    :func:`lora_shrink` + :func:`routed_matmul`.

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
    if x.ndim != 2:
        raise ValueError(f"expected x [M, K], got {x.shape=}")
    m, k = x.shape
    _check_slots(slot_experts)
    if a.ndim != 4 or a.shape[2] != k:
        raise ValueError(f"expected a [La, E, K={k}, r], got {a.shape=}")
    # The xa this kernel computes has lora_shrink's shape: check the rest as routed_matmul does.
    xa = jax.ShapeDtypeStruct((m, slot_experts.shape[0], a.shape[3]), x.dtype)
    _check_operands(x, {"w": w}, {"w": bias}, {"w": xa}, {"w": b}, slot_experts)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"a and b must stack the same (La, E), got {a.shape=} and {b.shape=}")
    if slot_weights.shape != xa.shape[:2]:
        raise ValueError(f"expected slot_weights [M, S] = {xa.shape[:2]}, got {slot_weights.shape}")
    return _single_projection("routed_matmul_inline_shrink", x, w, layer,
                              (a, slot_weights.astype(jnp.float32), b), adapted_layer,
                              slot_experts, bias, block_sizes, interpret)


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
      xas: ``(xa_q, xa_k, xa_v)``, each ``[M, S, r]`` from :func:`lora_shrink` or ``None`` (that
        projection is not adapted).
      bs: the matching ``[La, E, r, N]`` ``B`` stacks (``None`` where ``xa`` is).
      adapted_layer, slot_experts: as in :func:`routed_matmul`.
      biases: ``(b_q, b_k, b_v)``, each ``[L, N]`` or ``None``.
      block_sizes: ``block_n`` must divide ``Nq`` and ``Nkv``; default from ``fused_projections``
        (measured without the LoRA term).
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``q [M, Nq]``, ``k [M, Nkv]``, ``v [M, Nkv]`` in ``x.dtype`` (float32 accumulation).
    """
    if len(xas) != 3 or len(bs) != 3 or len(biases) != 3:
        raise ValueError(f"expected 3 xas, bs and biases, got {len(xas)}, {len(bs)}, {len(biases)}")
    _check_indices(layer, wq.shape[0], adapted_layer, bs, slot_experts)
    return _routed_qkv_matmul(x, wq, wk, wv, layer, tuple(xas), tuple(bs), adapted_layer,
                              slot_experts, tuple(biases), block_sizes=block_sizes,
                              interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_qkv_matmul(x, wq, wk, wv, layer, xas, bs, adapted_layer, slot_experts, biases, *,
                       block_sizes, interpret):
    names = ("wq", "wk", "wv")
    _check_operands(x, dict(zip(names, (wq, wk, wv))), dict(zip(names, biases)),
                    dict(zip(names, xas)), dict(zip(names, bs)), slot_experts)
    if wk.shape != wv.shape:
        raise ValueError(f"wk and wv must have one shape, got {wk.shape=} and {wv.shape=}")
    m, k = x.shape
    nq, nkv = wq.shape[2], wk.shape[2]
    bs_ = block_sizes or default_qkv_block_sizes(m, k, nq, nkv)
    _check_block_sizes(bs_, k, {"Nq": nq, "Nkv": nkv})
    blocks = (nq // bs_.block_n, nkv // bs_.block_n, nkv // bs_.block_n)
    out = _launch(functools.partial(_projections_kernel, blocks=blocks), "routed_qkv_matmul", x,
                  (wq, wk, wv), layer, _loras(xas, bs), adapted_layer, slot_experts, biases, bs_,
                  col_blocks=sum(blocks), width=nq + 2 * nkv, outputs=1, interpret=interpret)
    if bs_.split_k > 1:
        out = out.sum(axis=0)
    out = out[:m]
    ys = (out[:, :nq], out[:, nq:nq + nkv], out[:, nq + nkv:])
    if bs_.split_k > 1:  # the kernel adds biases only when it writes the final sums
        ys = tuple(y if bias is None else y + bias[layer].astype(y.dtype)
                   for y, bias in zip(ys, biases))
    return tuple(y.astype(x.dtype) for y in ys)


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
      xas: ``(xa_gate, xa_up)``, each ``[M, S, r]`` from :func:`lora_shrink` or ``None``.
      bs: the matching ``[La, E, r, F]`` ``B`` stacks (``None`` where ``xa`` is).
      adapted_layer, slot_experts: as in :func:`routed_matmul`.
      b_gate, b_up: optional ``[L, F]`` biases.
      block_sizes: default from ``fused_projections`` (measured without the LoRA term). With
        ``split_k > 1`` the kernel writes float32 partial sums and XLA adds biases and SiLU.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[M, F]`` in ``x.dtype``, computed in float32.
    """
    if len(xas) != 2 or len(bs) != 2:
        raise ValueError(f"expected 2 xas and 2 bs, got {len(xas)} and {len(bs)}")
    _check_indices(layer, w_gate.shape[0], adapted_layer, bs, slot_experts)
    return _routed_gate_up_matmul(x, w_gate, w_up, layer, tuple(xas), tuple(bs), adapted_layer,
                                  slot_experts, b_gate, b_up, block_sizes=block_sizes,
                                  interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _routed_gate_up_matmul(x, w_gate, w_up, layer, xas, bs, adapted_layer, slot_experts, b_gate,
                           b_up, *, block_sizes, interpret):
    names = ("w_gate", "w_up")
    biases = (b_gate, b_up)
    _check_operands(x, dict(zip(names, (w_gate, w_up))), dict(zip(names, biases)),
                    dict(zip(names, xas)), dict(zip(names, bs)), slot_experts)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate and w_up must have one shape, got {w_gate.shape=} and "
                         f"{w_up.shape=}")
    m, k = x.shape
    f = w_gate.shape[2]
    bs_ = block_sizes or default_gate_up_block_sizes(m, k, f)
    _check_block_sizes(bs_, k, {"F": f})
    fused = bs_.split_k == 1
    out = _launch(_gate_up_kernel, "routed_gate_up_matmul", x, (w_gate, w_up), layer,
                  _loras(xas, bs), adapted_layer, slot_experts, biases, bs_,
                  col_blocks=f // bs_.block_n, width=f,
                  outputs=1 if fused else 2, interpret=interpret)
    if fused:
        return out[:m]
    gate, up = (p.sum(axis=0)[:m] for p in out)
    gate, up = (y if bias is None else y + bias[layer].astype(jnp.float32)
                for y, bias in zip((gate, up), biases))
    return (jax.nn.silu(gate) * up).astype(x.dtype)
