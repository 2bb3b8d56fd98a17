"""Operand checks of the routed projection kernels (private to ``pallas``): shapes, dtypes,
index ranges, dense slots and the expansion's preconditions, with one clear line per error.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._blocks import check_rank, row_blocks
from ._checks import check_adapted, check_layer, check_slots, is_concrete
from ._shrink_ahead import NormedXa, ResidualAhead
from ._slots import PackedXa
from .tuned import MAX_EXPAND_ROWS

__all__ = [
    "EXPANDS",
    "GATE_UP",
    "QKV",
    "check_arity",
    "check_dense_slots",
    "check_down_shrink",
    "check_expand",
    "check_indices",
    "check_operands",
    "check_residual_ahead",
]

QKV = ("wq", "wk", "wv")  # projection names in error messages
GATE_UP = ("w_gate", "w_up")
EXPANDS = ("dot", "rows")  # how a given xa is expanded: tensor-core dots, or rows in registers


def check_arity(count: int, **groups) -> None:
    """Each of ``groups`` (tuples named by their keyword) holds one entry per projection."""
    if any(len(group) != count for group in groups.values()):
        raise ValueError(f"expected {count} {', '.join(groups)}, got lengths "
                         f"{[len(group) for group in groups.values()]}")


def check_operands(x, weights: dict, biases: dict, xas: dict, bs: dict, slot_experts) -> None:
    """Shapes of ``x [M, K]``, ``w [L, K, N]``, ``bias [L, N]``, ``xa [M, S, r]`` (or a
    :class:`PackedXa` ``[Mp, S * r]``) and ``b [La, E, r, N]`` (all keyed by projection name),
    with one ``L`` and one ``(La, E)``."""
    if x.ndim != 2:
        raise ValueError(f"expected x [M, K], got {x.shape=}")
    m, k = x.shape
    check_slots(slot_experts)
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
        if b.ndim != 4 or b.shape[3] != n:
            raise ValueError(f"expected the b stack of {name} [La, E, r, N={n}], got {b.shape}")
        r = b.shape[2]
        if isinstance(xa, NormedXa):
            mp = row_blocks(m)[1]
            if (xa.xa.ndim != 3 or xa.xa.shape[1:] != (mp, num_slots * r) or xa.ss.ndim != 2
                    or xa.ss.shape[1] != mp):
                raise ValueError(f"expected the normed xa of {name} [P, Mp={mp}, S*r="
                                 f"{num_slots * r}] and ss [Q, Mp], got {xa.xa.shape} and "
                                 f"{xa.ss.shape}")
            if xa.xa.dtype != jnp.float32 or xa.ss.dtype != jnp.float32:
                raise ValueError(f"the normed xa of {name} must be float32 partial sums, got "
                                 f"{xa.xa.dtype} and {xa.ss.dtype}")
            if xa.width != k:
                raise ValueError(f"the normed xa of {name} was normed over {xa.width} columns, "
                                 f"x has K={k}")
            check_rank(r)
            experts[name] = b.shape[:2]
            continue
        if isinstance(xa, PackedXa):
            partial, xa, mp = xa.partial, xa.xa, row_blocks(m)[1]
            if xa.ndim not in (2, 3) or xa.shape[-2:] != (mp, num_slots * r):
                raise ValueError(f"expected the packed xa of {name} [Mp={mp}, S*r={num_slots * r}]"
                                 f" or its partial sums [split_k, Mp, S*r], got {xa.shape}")
        elif xa.ndim != 3 or xa.shape != (m, num_slots, r):
            raise ValueError(f"expected the xa of {name} [M={m}, S={num_slots}, r={r}] (r from its "
                             f"b stack), got {xa.shape}")
        else:
            partial = False
        if partial and xa.dtype != jnp.float32:
            raise ValueError(f"the partial sums of {name}'s xa are {xa.dtype}, expected float32")
        if not partial and xa.dtype != x.dtype:
            raise ValueError(f"the xa of {name} is {xa.dtype}, expected x's dtype {x.dtype}")
        check_rank(r)
        experts[name] = b.shape[:2]
    if len(set(layers.values())) > 1:
        raise ValueError(f"weights stack different layer counts: {layers}")
    if len(set(experts.values())) > 1:
        raise ValueError(f"b stacks have different (La, E): {experts}")


def check_down_shrink(x, w_gate, a_down, slot_experts, slot_weights, bs) -> None:
    """Operands of the gate/up kernel's down shrink: ``a_down [La, E, F, r]`` (``F`` the gate's
    width, ``r`` a kernel rank, ``(La, E)`` those of the ``B`` stacks) and ``slot_weights
    [M, S]``."""
    f = w_gate.shape[-1]
    if a_down.ndim != 4 or a_down.shape[2] != f:
        raise ValueError(f"expected the down projection's a stack [La, E, F={f}, r], got "
                         f"{a_down.shape}")
    check_rank(a_down.shape[3])
    b = next((b for b in bs if b is not None), None)
    if b is not None and b.shape[:2] != a_down.shape[:2]:
        raise ValueError(f"a_down stacks (La, E) = {a_down.shape[:2]}, the b stacks "
                         f"{b.shape[:2]}")
    check_slots(slot_experts, slot_weights, x.shape[0])


def check_dense_slots(slot_experts, bs) -> None:
    """With one slot per expert (``S == E``, :func:`lora_shrink.route_slots`' dense mode) slot
    ``e`` must read expert ``e``: the kernels then read ``B[layer]`` whole, as ``[E r, N]``.
    Checked when ``slot_experts`` is concrete."""
    b = next((b for b in bs if b is not None), None)
    if b is None or slot_experts.shape[0] != b.shape[1] or not is_concrete(slot_experts):
        return
    if not np.array_equal(np.asarray(slot_experts), np.arange(b.shape[1])):
        raise ValueError(f"with S == E = {b.shape[1]} slots, slot e must be expert e (as "
                         f"route_slots' dense mode gives); got slot_experts {slot_experts}")


def check_expand(expand: str, num_rows: int, slot_experts, bs) -> None:
    """How a given ``xa`` is expanded: ``"dot"`` (tensor-core dots after the K loop) or
    ``"rows"`` (each real row in registers, from loads issued before the K loop): only for
    gather slots (``S < E``) and at most :data:`MAX_EXPAND_ROWS` rows."""
    if expand not in EXPANDS:
        raise ValueError(f"unknown expand {expand!r}; expected one of {EXPANDS}")
    b = next((b for b in bs if b is not None), None)
    if expand == "rows" and b is not None and (
            num_rows > MAX_EXPAND_ROWS or slot_experts.shape[0] >= b.shape[1]):
        raise ValueError(f"expand='rows' needs gather slots (S={slot_experts.shape[0]} < "
                         f"E={b.shape[1]}) and at most {MAX_EXPAND_ROWS} rows, got {num_rows}")


def check_indices(layer, num_layers, adapted_layer, bs, slot_experts) -> None:
    """Range checks of the indices that are concrete (traced ones must be in range: no clamp)."""
    check_layer(layer, num_layers)
    b = next((b for b in bs if b is not None), None)
    if b is not None:
        check_adapted(adapted_layer, slot_experts, b.shape[:2])


def check_residual_ahead(x, w, ahead, slot_experts, bs) -> None:
    """Operands of ``routed_matmul_residual``: a ``ResidualAhead`` with ``h [M, N]`` in
    ``x.dtype``, ``norm [L, N]``, ``eps > 0``, one or more ``a [La, E, N, r]`` stacks (a kernel
    rank; ``(La, E)`` those of ``b``), ``slot_weights [M, S]`` and gather slots (``S < E``)."""
    if not isinstance(ahead, ResidualAhead):
        raise ValueError(f"ahead must be a ResidualAhead, got {type(ahead).__name__}")
    (m, _), (num_layers, _, n) = x.shape, w.shape
    if ahead.h.shape != (m, n) or ahead.h.dtype != x.dtype:
        raise ValueError(f"expected ahead.h [M, N] = {(m, n)} in {x.dtype}, got {ahead.h.shape} "
                         f"{ahead.h.dtype}")
    if ahead.norm.shape != (num_layers, n):
        raise ValueError(f"expected ahead.norm [L, N] = {(num_layers, n)}, got "
                         f"{ahead.norm.shape}")
    if not ahead.eps > 0:
        raise ValueError(f"ahead.eps must be > 0, got {ahead.eps}")
    if not ahead.a or any(a.ndim != 4 or a.shape[2] != n for a in ahead.a):
        raise ValueError(f"expected one or more ahead.a stacks [La, E, N={n}, r], got "
                         f"{[a.shape for a in ahead.a]}")
    for a in ahead.a:
        check_rank(a.shape[3])
    stacks = {a.shape[:2] for a in ahead.a} | {b.shape[:2] for b in bs if b is not None}
    if len(stacks) > 1:
        raise ValueError(f"ahead.a and b stack different (La, E): {sorted(stacks)}")
    check_slots(slot_experts, ahead.slot_weights, m)
    if slot_experts.shape[0] >= ahead.a[0].shape[1]:
        raise ValueError(f"the shrink ahead needs gather slots, S < E: got "
                         f"S={slot_experts.shape[0]}, E={ahead.a[0].shape[1]}")
