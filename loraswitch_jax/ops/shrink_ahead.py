"""Shrink-ahead (DESIGN.md §8): at decode with gather slots, each launch before a consumer also
computes that consumer's LoRA shrink ``x A``, so the consumer needs no shrink launch of its own
(``Impl(shrink_ahead=True)``; off by default until timed on a GPU: ``pallas/tuned.py``).

* o's shrink from the decode-attention kernel (:func:`cached_attention_shrink_ahead`);
* gate's and up's from o's routed kernel, which also adds the residual
  (:func:`residual_linear_shrink_ahead`; the RMSNorm weight folded in, the scale applied by the
  consumer);
* the next layer's q/k/v from down's routed kernel (:func:`mlp_residual_shrink_ahead`).
"""

from __future__ import annotations

import jax

from loraswitch_jax.ops.operands import (Impl, LoraTerm, flat, has_dropout, routed_operands,
                                         slots_for, unflat)
from loraswitch_jax.ops.projections import (cached_attention, gate_up_down_shrink, mlp,
                                            stacked_linear)

__all__ = ["cached_attention_shrink_ahead", "mlp_residual_shrink_ahead",
           "residual_linear_shrink_ahead"]


def mlp_residual_shrink_ahead(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, layer: int | jax.Array,
    biases: tuple[jax.Array | None, jax.Array | None, jax.Array | None], impl: Impl,
    lora: LoraTerm | None, xa: tuple | None, h: jax.Array, next_norm: jax.Array | None,
    eps: float, next_w: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, tuple | None]:
    """``h + mlp(x, ...)`` (the residual after down), and where down's routed kernel computes
    them along (DESIGN.md §8, shrink-ahead), the next layer's q/k/v shrinks of
    ``rms_norm(h + ...) * next_norm[layer + 1]`` for its :func:`qkv_linear`'s ``xa``. Applies
    with ``next_norm`` (the stacked attention norms; ``None``: no next adapted layer sharing
    this route), decode under Pallas, a shared route (``lora.slots``), the MLP's fused path,
    q/k/v adapted with gather slots; ``next_w``: ``(wq, wk, wv)`` (their shapes decide whether
    the routed q/k/v kernel serves). Returns ``(h_next, xas or None)``."""
    nexts = None if next_norm is None else _qkv_ahead(x, impl, lora, next_w)
    fused = None if nexts is None else gate_up_down_shrink(x, w_gate, w_up, w_down, layer,
                                                            *biases[:2], impl, lora, xa)
    if fused is None:
        return h + mlp(x, w_gate, w_up, w_down, layer, biases, impl, lora, xa), None
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    act, xa_down, routed = fused
    ahead = routed_kernel.ResidualAhead(flat(h), next_norm, tuple(lora.a[p] for p in nexts),
                                        routed.slot_weights, eps, norm_layer=layer + 1,
                                        a_layer=lora.layer + 1)
    h_next, normed = routed_kernel.routed_matmul_residual(
        act, w_down, layer, xa_down, lora.b["down"], lora.layer, routed.slot_experts, biases[2],
        ahead=ahead, expand=routed.expand, interpret=impl.interpret)
    normed = dict(zip(nexts, normed))
    return unflat(h_next, h), tuple(normed.get(p) for p in ("q", "k", "v"))


def _ahead_targets(x: jax.Array, impl: Impl, lora: LoraTerm | None, projs: tuple[str, ...],
                   k: int, widths: tuple[int, ...]) -> tuple[str, ...] | None:
    """The adapted ones of ``projs`` (input width ``k``, output ``widths``) whose shrink an
    earlier kernel may compute ahead: shrink-ahead on, one token per sequence of ``x [B, T,
    ...]``, Pallas, no dropout, gather slots, shapes their fused and routed kernels tile; else
    None."""
    from loraswitch_jax.pallas import fused_projections as fused_kernel
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    if (impl.xla or not impl.shrink_ahead or x.ndim != 3 or x.shape[1] != 1 or lora is None
            or has_dropout(lora)):
        return None
    nexts = tuple(p for p in projs if lora.adapts(p))
    if not nexts:
        return None
    a = lora.a[nexts[0]]
    if not (fused_kernel.supports(k, *widths)
            and routed_kernel.supports(k, *widths, rank=a.shape[-1])):
        return None
    slot_experts, _ = slots_for(lora, a.shape[1], impl)
    if slot_experts.shape[0] >= a.shape[1]:  # dense slots: every program would read every expert
        return None
    return nexts


def _qkv_ahead(x: jax.Array, impl: Impl, lora: LoraTerm | None,
               w: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[str, ...] | None:
    """The next layer's q/k/v whose shrink down's routed kernel can compute
    (:func:`_ahead_targets`, and a route every layer shares: ``lora.slots``), else None."""
    if lora is None or lora.slots is None:
        return None
    wq, wk, _ = w
    return _ahead_targets(x, impl, lora, ("q", "k", "v"), wq.shape[1], (wq.shape[2], wk.shape[2]))


def _o_shrink_ahead(q: jax.Array, k_cache: jax.Array, impl: Impl, lora: LoraTerm | None):
    """The decode kernel's ``OShrink`` for o's LoRA where it can serve it and the routed kernel
    then expands it (one token per sequence, Pallas, o adapted, no dropout, gather slots,
    shapes both kernels tile), else None."""
    from loraswitch_jax.pallas import decode_attention as kernel
    from loraswitch_jax.pallas import routed_projections as routed_kernel
    from loraswitch_jax.pallas import stacked_matmul

    B, T, H, hd = q.shape
    if (impl.xla or not impl.shrink_ahead or T != 1 or lora is None or not lora.adapts("o")
            or has_dropout(lora) or not kernel.supports(k_cache.shape[2], hd)):
        return None
    a, n = lora.a["o"], lora.b["o"].shape[-1]
    if not (stacked_matmul.supports(H * hd, n)
            and routed_kernel.supports(H * hd, n, rank=a.shape[-1])):
        return None
    slot_experts, slot_weights = slots_for(lora, a.shape[1], impl)
    if slot_experts.shape[0] >= a.shape[1]:  # dense slots: every program would read every expert
        return None
    return kernel.OShrink(a, lora.layer, slot_experts, slot_weights)


def cached_attention_shrink_ahead(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int | jax.Array,
    positions: jax.Array, mask: jax.Array, impl: Impl, lora: LoraTerm | None = None,
):
    """:func:`cached_attention`, and the o projection's LoRA shrink of its output where the
    decode-attention kernel computes it along (DESIGN.md §8, shrink-ahead: decode under Pallas,
    o adapted, no dropout, gather slots), for :func:`stacked_linear`'s ``xa``: it saves o's
    shrink launch. Returns ``(attended [B, T, H * hd], xa or None)``; with ``None``
    :func:`stacked_linear` shrinks as before."""
    from loraswitch_jax.pallas import decode_attention as kernel

    o_shrink = _o_shrink_ahead(q, k_cache, impl, lora)
    if o_shrink is None:
        return cached_attention(q, k_cache, v_cache, layer, positions, mask, impl), None
    out, xa = kernel.decode_attention(q[:, 0], k_cache, v_cache, layer, positions[:, 0] + 1,
                                      o_shrink=o_shrink, interpret=impl.interpret)
    return out[:, None], xa


def _gate_up_ahead(x: jax.Array, w: jax.Array, impl: Impl, lora: LoraTerm | None,
                   proj: str, w_gate: jax.Array) -> tuple[str, ...] | None:
    """Gate and up where the routed kernel of ``proj`` (``x [B, T, K] @ w``) can compute their
    shrink ahead (:func:`_ahead_targets`, and shapes ``proj``'s routed kernel tiles), else
    None."""
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    nexts = _ahead_targets(x, impl, lora, ("gate", "up"), w_gate.shape[1], (w_gate.shape[2],))
    rank = None if nexts is None else lora.a[(proj if lora.adapts(proj) else nexts[0])].shape[-1]
    if nexts is None or not routed_kernel.supports(*w.shape[1:], rank=rank):
        return None
    return nexts


def residual_linear_shrink_ahead(
    x: jax.Array, w: jax.Array, layer: int | jax.Array, bias: jax.Array | None, impl: Impl,
    lora: LoraTerm | None, proj: str, xa: object | None, h: jax.Array, norm: jax.Array,
    eps: float, w_gate: jax.Array,
) -> tuple[jax.Array, tuple | None]:
    """``h + stacked_linear(x, w, layer, bias, impl, lora, proj, xa)`` (the residual after o),
    and where o's routed kernel computes them along (DESIGN.md §8, shrink-ahead: decode under
    Pallas, gate or up adapted, no dropout, gather slots), gate's and up's shrinks of
    ``rms_norm(h + ...) * norm[layer]`` for :func:`mlp`'s ``xa``: that saves their shrink
    launch, and XLA's residual add. ``w_gate [L, d, F]``: the MLP's gate weights (their shape
    decides whether its routed kernel serves). Returns ``(h_mid, xas or None)``; with ``None``
    :func:`mlp` shrinks as before."""
    nexts = _gate_up_ahead(x, w, impl, lora, proj, w_gate)
    if nexts is None:
        return h + stacked_linear(x, w, layer, bias, impl, lora, proj, xa), None
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    adapted = lora.adapts(proj)
    routed = routed_operands(lora, (proj,), x, impl, None if xa is None else (xa,)) if adapted else None
    slot_experts, slot_weights = slots_for(lora, lora.a[nexts[0]].shape[1], impl)
    expand = "rows" if flat(x).shape[0] <= routed_kernel.MAX_EXPAND_ROWS else "dot"
    ahead = routed_kernel.ResidualAhead(flat(h), norm, tuple(lora.a[p] for p in nexts),
                                        slot_weights, eps)
    h_mid, normed = routed_kernel.routed_matmul_residual(
        flat(x), w, layer, None if routed is None else routed.xas[0],
        None if routed is None else routed.b[0], lora.layer, slot_experts, bias, ahead=ahead,
        expand=expand, interpret=impl.interpret)
    normed = dict(zip(nexts, normed))
    return unflat(h_mid, h), tuple(normed.get(p) for p in ("gate", "up"))
