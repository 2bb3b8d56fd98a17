"""Routed LoRA projections fused into the stacked-weight projection kernels (Pallas, Triton).

``y = x @ W[layer] + bias[layer] + scale * sum_j g_j (x @ A[e_j]) @ B[e_j]`` where every row of
``x`` has its own route (``expert_ids, gates [M, k]``) and ``W`` is read once. The LoRA term is
split in two over the expert slots of ``lora_shrink.route_slots`` (``lora_shrink`` explains the
slots, gather or dense):

* **shrink**: ``xa[m, s] = slot_weights[m, s] * x[m] @ A[slot_experts[s]]``, ``[M, S, r]``,
  given to :func:`routed_matmul`, :func:`routed_qkv_matmul` and :func:`routed_gate_up_matmul`
  by ``lora_shrink.lora_shrink_group`` (or ``lora_shrink.lora_shrink``); the gate/up kernel can
  also compute the down projection's in its epilogue (``down_shrink``), and
  :func:`routed_matmul_residual` (o, down) adds the residual and computes the next normed
  projections' (gate/up, the next layer's q/k/v) as :class:`NormedXa` partials.

* **expand** (in the projection kernel): each program, after accumulating ``x @ W[:, cols]``,
  adds ``sum_s xa[:, s] @ B[slot_experts[s]][:, cols]``. ``B`` is partitioned over column blocks
  like ``W``, so ``W`` and each slot's ``B`` are read once (per block of rows). ``xa`` is read
  packed, ``[M, S * r]``; with dense slots (``S == E``: slot ``e`` must then be expert ``e``, as
  ``route_slots`` gives) it meets ``B[layer]`` viewed as ``[E * r, N]`` in one dot per 128 of
  its rows instead of one per slot.

Each projection group is one launch (``_routed_kernels``). Layer indices (``layer``,
``adapted_layer``) and ``slot_experts`` are data: one compile serves all layers and routes, also
inside ``scan``/``while_loop``.

``split_k > 1`` writes float32 partial sums reduced by XLA (as in ``fused_projections``); slot
``s`` is expanded by the programs of split ``s % split_k`` only, so each term counts once. Rows
are padded to a power of two ``>= 16`` and tiled in blocks of at most 64 rows (a grid axis):
Triton loads and dots need power-of-two sizes ``>= 16``, decode (``M <= 64``) is one row block,
and prefill runs several (``W`` is then re-read per row block, as in any GEMM). For the same
reason the rank must be a power of two ``>= 16`` (:func:`supports`; callers fall back to the
references otherwise). Block sizes are stacked_matmul's and fused_projections' (``tuned.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ._blocks import is_block
from ._checks import check_adapted, check_layer
from ._routed_checks import (
    GATE_UP,
    QKV,
    check_arity,
    check_dense_slots,
    check_down_shrink,
    check_expand,
    check_indices,
    check_operands,
    check_residual_ahead,
)
from ._shrink_ahead import NormedXa, ResidualAhead
from ._routed_kernels import (
    gate_up_projections,
    given_loras,
    qkv_projections,
    residual_projection,
    single_projection,
)
from ._slots import PackedXa
from .lora_shrink import lora_shrink
from .stacked_matmul import BlockSizes
from .tuned import MAX_EXPAND_ROWS

__all__ = [
    "MAX_EXPAND_ROWS",
    "BlockSizes",
    "NormedXa",
    "ResidualAhead",
    "routed_gate_up_matmul",
    "routed_gate_up_matmul_reference",
    "routed_matmul",
    "routed_matmul_reference",
    "routed_matmul_residual",
    "routed_matmul_residual_reference",
    "routed_qkv_matmul",
    "routed_qkv_matmul_reference",
    "supports",
]


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
    x: jax.Array, w: jax.Array, layer: jax.Array | int, xa: jax.Array, b: jax.Array,
    adapted_layer: jax.Array | int, slot_experts: jax.Array, bias: jax.Array | None = None,
) -> jax.Array:
    """``x @ w[layer] + sum_s xa[:, s] @ b[adapted_layer, slot_experts[s]] + bias[layer]``;
    float32 sums, ``x.dtype`` out."""
    return _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias).astype(x.dtype)


def routed_matmul_residual_reference(
    x: jax.Array, w: jax.Array, layer: jax.Array | int, xa: jax.Array | None, b: jax.Array | None,
    adapted_layer: jax.Array | int, slot_experts: jax.Array, bias: jax.Array | None = None, *,
    ahead: ResidualAhead,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """``h_mid = ahead.h + y`` (``y`` as :func:`routed_matmul_reference`, ``xa = None``: no LoRA)
    and :func:`lora_shrink` of ``rms_norm(h_mid) * ahead.norm[norm_layer]`` for each of
    ``ahead.a`` (read at ``a_layer``), ``[M, S, r]`` in ``x.dtype``."""
    ahead = _resolved(ahead, layer, adapted_layer)
    y = _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias).astype(x.dtype)
    h_mid = ahead.h + y
    v = h_mid.astype(jnp.float32)
    v = v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + ahead.eps)
    normed = (v * ahead.norm[ahead.norm_layer].astype(jnp.float32)).astype(x.dtype)
    return h_mid, tuple(lora_shrink(normed, a, ahead.a_layer, slot_experts, ahead.slot_weights)
                        for a in ahead.a)


def _resolved(ahead: ResidualAhead, layer, adapted_layer) -> ResidualAhead:
    """``ahead`` with its ``None`` layers set to the projection's."""
    return dataclasses.replace(
        ahead, norm_layer=layer if ahead.norm_layer is None else ahead.norm_layer,
        a_layer=adapted_layer if ahead.a_layer is None else ahead.a_layer)


def routed_qkv_matmul_reference(
    x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, layer: jax.Array | int,
    xas: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    adapted_layer: jax.Array | int, slot_experts: jax.Array,
    biases: tuple[jax.Array | None, ...] = (None, None, None),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`routed_matmul_reference` for each of ``q, k, v``; a ``None`` xa skips its LoRA."""
    return tuple(
        _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias).astype(x.dtype)
        for w, xa, b, bias in zip((wq, wk, wv), xas, bs, biases)
    )


def routed_gate_up_matmul_reference(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, layer: jax.Array | int,
    xas: tuple[jax.Array | None, jax.Array | None],
    bs: tuple[jax.Array | None, jax.Array | None], adapted_layer: jax.Array | int,
    slot_experts: jax.Array, b_gate: jax.Array | None = None, b_up: jax.Array | None = None,
    down_shrink: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``silu(gate) * up`` of the two routed projections, in float32, ``x.dtype`` out; with
    ``down_shrink = (a_down, slot_weights)`` also :func:`lora_shrink` of it, ``[M, S, r]``."""
    gate, up = (
        _routed_projection(x, w, layer, xa, b, adapted_layer, slot_experts, bias)
        for w, xa, b, bias in zip((w_gate, w_up), xas, bs, (b_gate, b_up))
    )
    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    if down_shrink is None:
        return act
    a_down, slot_weights = down_shrink
    return act, lora_shrink(act, a_down, adapted_layer, slot_experts, slot_weights)


# ---------------------------------------------------------------------------------------------
# Public ops


def supports(k: int, *ns: int, rank: int) -> bool:
    """Whether the kernels tile ``K`` and every output width (multiples of 16) and the LoRA rank
    (a power of two ``>= 16``: Triton loads ``[rows, r]`` blocks, whose sizes must be powers of
    two, and tensor-core dots need every dimension ``>= 16``)."""
    return all(d % 16 == 0 for d in (k, *ns)) and is_block(rank)


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
    expand: str = "dot",
    interpret: bool = False,
) -> jax.Array:
    """``x @ w[layer] + sum_s xa[:, s] @ b[adapted_layer, slot_experts[s]] + bias[layer]``.

    One launch; ``w[layer]`` and the slots' ``b`` are read once (per block of 64 rows).

    Args:
      x: ``[M, K]`` activations.
      w: ``[L, K, N]`` stacked weights.
      layer: the layer of ``w`` (and ``bias``) to read; may be traced.
      xa: ``[M, S, r]`` in ``x.dtype``, from :func:`lora_shrink` or
        :func:`lora_shrink.lora_shrink_group`, or that one's ``packed`` output as is.
      b: ``[La, E, r, N]`` stacked LoRA ``B`` experts.
      adapted_layer: the layer of ``b`` to read; may be traced.
      slot_experts: ``[S]`` int32, from :func:`lora_shrink.route_slots`; may be traced.
      bias: optional ``[L, N]``.
      block_sizes: ``block_n`` must divide ``N``, ``block_k * split_k`` must divide ``K``; default
        per shape from ``stacked_matmul`` (measured without the LoRA term).
      expand: ``"dot"``: tensor-core dots after the K loop; ``"rows"`` (gather slots, at most 4
        rows: decode at small batch): each real row's term in registers, from loads issued
        before the K loop, whose latency then hides behind it.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[M, N]`` in ``x.dtype`` (float32 accumulation).
    """
    check_indices(layer, w.shape[0], adapted_layer, (b,), slot_experts)
    check_dense_slots(slot_experts, (b,))
    check_expand(expand, x.shape[0], slot_experts, (b,))
    return _routed_matmul(x, w, layer, xa, b, adapted_layer, slot_experts, bias,
                          block_sizes=block_sizes, expand=expand, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "expand", "interpret"))
def _routed_matmul(x, w, layer, xa, b, adapted_layer, slot_experts, bias, *, block_sizes, expand,
                   interpret):
    check_operands(x, {"w": w}, {"w": bias}, {"w": xa}, {"w": b}, slot_experts)
    return single_projection("routed_matmul", x, w, layer, (xa, b), adapted_layer, slot_experts,
                             bias, block_sizes, interpret, expand)


def routed_matmul_residual(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array | int,
    xa: jax.Array | None,
    b: jax.Array | None,
    adapted_layer: jax.Array | int,
    slot_experts: jax.Array,
    bias: jax.Array | None = None,
    *,
    ahead: ResidualAhead,
    block_sizes: BlockSizes | None = None,
    expand: str = "dot",
    interpret: bool = False,
) -> tuple[jax.Array, tuple[NormedXa, ...]]:
    """``h_mid = ahead.h + routed_matmul(...)`` and, ahead, the next projections' shrinks of
    ``rms_norm(h_mid) * ahead.norm[norm_layer]`` (DESIGN.md §8: o's kernel computes gate/up's,
    down's the next layer's q/k/v's).

    One launch: each program adds the residual to its column block and writes its partials
    (``_shrink_ahead``); the routed kernels take each :class:`NormedXa` as a projection's ``xa``
    and add the partials up before their K loop, which saves the next projections' shrink
    launch. Gather slots only (``S < E``: each program reads its slots' rows of ``A``).

    Args:
      x, w, layer, adapted_layer, slot_experts, bias: as in :func:`routed_matmul`.
      xa, b: as in :func:`routed_matmul`, or both ``None`` (this projection not adapted).
      ahead: a :class:`ResidualAhead`: ``h [M, N]`` in ``x.dtype``, ``norm [L, N]``, ``eps``,
        the next projections' ``a`` stacks ``[La, E, N, r]``, ``slot_weights [M, S]`` and the
        layers to read them at (default ``layer`` and ``adapted_layer``).
      block_sizes: ``split_k`` must be 1; default ``stacked_matmul``'s, a split turned into
        narrower column blocks (as many programs).
      expand: as in :func:`routed_matmul`.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``h_mid [M, N]`` in ``x.dtype`` (``h + y`` rounded as XLA rounds it) and one
      :class:`NormedXa` per stack of ``ahead.a`` (``P`` = ``N / block_n`` partials).
    """
    bs = (b,) if b is not None else (None,)
    check_indices(layer, w.shape[0], adapted_layer, bs, slot_experts)
    check_residual_ahead(x, w, ahead, slot_experts, bs)
    ahead = _resolved(ahead, layer, adapted_layer)
    check_layer(ahead.norm_layer, ahead.norm.shape[0])
    check_adapted(ahead.a_layer, slot_experts, ahead.a[0].shape[:2])
    check_expand(expand, x.shape[0], slot_experts, bs)
    return _routed_matmul_residual(x, w, layer, xa, b, adapted_layer, slot_experts, bias, ahead,
                                   block_sizes=block_sizes, expand=expand, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "expand", "interpret"))
def _routed_matmul_residual(x, w, layer, xa, b, adapted_layer, slot_experts, bias, ahead, *,
                            block_sizes, expand, interpret):
    check_operands(x, {"w": w}, {"w": bias}, {"w": xa}, {"w": b}, slot_experts)
    lora = None if xa is None else (xa, b)
    return residual_projection("routed_matmul", x, w, layer, lora, adapted_layer, slot_experts,
                               bias, block_sizes, interpret, ahead, expand)


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
    expand: str = "dot",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v``, each ``x @ w[layer] (+ its expansion) (+ its bias)``, in one launch.

    As ``fused_projections.qkv_matmul``: the grid covers the column blocks of all three weights.

    Args:
      x: ``[M, K]`` activations.
      wq: ``[L, K, Nq]``; ``wk``, ``wv``: ``[L, K, Nkv]``.
      layer: may be traced.
      xas: ``(xa_q, xa_k, xa_v)``, each as ``xa`` in :func:`routed_matmul`, or ``None`` (that
        projection is not adapted).
      bs: the matching ``[La, E, r, N]`` ``B`` stacks (``None`` where ``xa`` is).
      adapted_layer, slot_experts: as in :func:`routed_matmul`.
      biases: ``(b_q, b_k, b_v)``, each ``[L, N]`` or ``None``.
      block_sizes: ``block_n`` must divide ``Nq`` and ``Nkv``; default from ``fused_projections``
        (measured without the LoRA term).
      expand: as in :func:`routed_matmul`.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``q [M, Nq]``, ``k [M, Nkv]``, ``v [M, Nkv]`` in ``x.dtype`` (float32 accumulation).
    """
    check_arity(3, xas=xas, bs=bs, biases=biases)
    check_indices(layer, wq.shape[0], adapted_layer, bs, slot_experts)
    check_dense_slots(slot_experts, bs)
    check_expand(expand, x.shape[0], slot_experts, bs)
    return _routed_qkv_matmul(x, wq, wk, wv, layer, tuple(xas), tuple(bs), adapted_layer,
                              slot_experts, tuple(biases), block_sizes=block_sizes,
                              expand=expand, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "expand", "interpret"))
def _routed_qkv_matmul(x, wq, wk, wv, layer, xas, bs, adapted_layer, slot_experts, biases, *,
                       block_sizes, expand, interpret):
    check_operands(x, dict(zip(QKV, (wq, wk, wv))), dict(zip(QKV, biases)),
                   dict(zip(QKV, xas)), dict(zip(QKV, bs)), slot_experts)
    return qkv_projections("routed_qkv_matmul", x, (wq, wk, wv), layer, given_loras(xas, bs),
                           adapted_layer, slot_experts, biases, block_sizes, interpret, expand)


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
    down_shrink: tuple[jax.Array, jax.Array] | None = None,
    block_sizes: BlockSizes | None = None,
    expand: str = "dot",
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, PackedXa]:
    """``silu(gate) * up`` of two routed projections of ``x``, in one launch.

    As ``fused_projections.gate_up_matmul``: each program streams the same column block of both
    weights and, with ``split_k == 1``, applies expansions, biases and SiLU in its epilogue.
    With ``down_shrink`` the epilogue also starts the down projection's LoRA: each program
    multiplies its block of the result by that block's rows of every slot's ``a_down`` and adds
    it into the shrink (float32 atomic adds, so the order of the sums, and the last bits, may
    vary from run to run), which saves the down projection a shrink launch.

    Args:
      x: ``[M, K]`` activations.
      w_gate, w_up: ``[L, K, F]`` stacked weights.
      layer: may be traced.
      xas: ``(xa_gate, xa_up)``, each as ``xa`` in :func:`routed_matmul`, or ``None``.
      bs: the matching ``[La, E, r, F]`` ``B`` stacks (``None`` where ``xa`` is).
      adapted_layer, slot_experts: as in :func:`routed_matmul`.
      b_gate, b_up: optional ``[L, F]`` biases.
      down_shrink: optional ``(a_down [La, E, F, r], slot_weights [M, S])``: the down
        projection's ``A`` stack and the slot weights of :func:`lora_shrink.route_slots`.
      block_sizes: default from ``fused_projections`` (measured without the LoRA term). With
        ``split_k > 1`` the kernel writes float32 partial sums and XLA adds biases and SiLU
        (not with ``down_shrink``).
      expand: as in :func:`routed_matmul`.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[M, F]`` in ``x.dtype``, computed in float32; with ``down_shrink`` also the down
      projection's ``xa`` as a :class:`PackedXa` of float32 sums ``[1, Mp, S * r]``, which
      :func:`routed_matmul` takes as is (it rounds them to ``x.dtype`` as ``lora_shrink`` does).
    """
    check_arity(2, xas=xas, bs=bs)
    check_indices(layer, w_gate.shape[0], adapted_layer, bs, slot_experts)
    check_dense_slots(slot_experts, bs)
    check_expand(expand, x.shape[0], slot_experts, bs)
    if down_shrink is not None:
        a_down, slot_weights = down_shrink
        check_down_shrink(x, w_gate, a_down, slot_experts, slot_weights, bs)
        check_adapted(adapted_layer, slot_experts, a_down.shape[:2])
    return _routed_gate_up_matmul(x, w_gate, w_up, layer, tuple(xas), tuple(bs), adapted_layer,
                                  slot_experts, b_gate, b_up, down_shrink,
                                  block_sizes=block_sizes, expand=expand, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "expand", "interpret"))
def _routed_gate_up_matmul(x, w_gate, w_up, layer, xas, bs, adapted_layer, slot_experts, b_gate,
                           b_up, down_shrink, *, block_sizes, expand, interpret):
    biases = (b_gate, b_up)
    check_operands(x, dict(zip(GATE_UP, (w_gate, w_up))), dict(zip(GATE_UP, biases)),
                   dict(zip(GATE_UP, xas)), dict(zip(GATE_UP, bs)), slot_experts)
    return gate_up_projections("routed_gate_up_matmul", x, (w_gate, w_up), layer,
                               given_loras(xas, bs), adapted_layer, slot_experts, biases,
                               block_sizes, interpret, down=down_shrink, expand=expand)
