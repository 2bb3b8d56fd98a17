"""The projections, MLP, attention and merge that model code calls (``loraswitch_jax.ops``):
XLA or the Pallas kernels, per :class:`~loraswitch_jax.ops.operands.Impl`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loraswitch_jax.layers import attention
from loraswitch_jax.ops.operands import (Impl, LoraTerm, flat, plus_delta, refuse_unserved,
                                         routed_operands, unflat)

__all__ = ["cached_attention", "gate_up_down_shrink", "mlp", "qkv_linear", "stacked_linear",
           "swiglu", "switch_merge"]


def stacked_linear(
    x: jax.Array, w: jax.Array, layer: int | jax.Array, bias: jax.Array | None, impl: Impl,
    lora: LoraTerm | None = None, proj: str | None = None, xa: object | None = None,
) -> jax.Array:
    """``x [..., K] @ w[layer] (+ bias[layer])`` for a stacked ``w [L, K, N]``, in ``x.dtype``,
    plus ``lora``'s term for ``proj`` when it adapts it. ``xa``: ``proj``'s shrink ``x A``
    computed ahead (:func:`cached_attention_shrink_ahead`), expanded here with no shrink launch;
    given only where the routed kernel serves ``proj``."""
    from loraswitch_jax.pallas import stacked_matmul as kernel

    k, n = w.shape[1:]
    routed = None
    if not impl.xla and kernel.supports(k, n):
        routed = routed_operands(lora, (proj,), x, impl, None if xa is None else (xa,))
    if xa is not None and routed is None:
        raise ValueError(f"an xa computed ahead for {proj!r} needs the routed kernel to serve it, "
                         f"which it does not here (impl {impl}, w {w.shape})")
    if impl.xla or not kernel.supports(k, n):
        # Shapes the kernel cannot tile (not multiples of 16) take the XLA path.
        y = jnp.einsum("...k,kn->...n", x, w[layer].astype(x.dtype))
        y = y if bias is None else y + bias[layer].astype(y.dtype)
        return plus_delta(y, x, lora, proj)
    interpret = impl.interpret
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        y = routed_kernel.routed_matmul(flat(x), w, layer, routed.xas[0], routed.b[0],
                                        lora.layer, routed.slot_experts, bias,
                                        expand=routed.expand, interpret=interpret)
        return unflat(y, x)
    y = unflat(kernel.stacked_matmul(flat(x), w, layer, interpret=interpret), x)
    y = y if bias is None else y + bias[layer].astype(y.dtype)
    return plus_delta(y, x, lora, proj)


def qkv_linear(
    x: jax.Array, w: tuple[jax.Array, jax.Array, jax.Array], layer: int | jax.Array,
    b: tuple[jax.Array | None, ...], impl: Impl, lora: LoraTerm | None = None,
    xa: tuple | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v`` projections of ``x [..., d]`` (plus ``lora``'s terms); one fused kernel launch
    under Pallas. ``xa``: their shrinks computed ahead by the previous layer's down kernel
    (:func:`mlp_residual_shrink_ahead`), expanded with no shrink launch."""
    from loraswitch_jax.pallas import fused_projections as kernel

    wq, wk, wv = w
    fusable = not impl.xla and kernel.supports(wq.shape[1], wq.shape[2], wk.shape[2])
    routed = routed_operands(lora, ("q", "k", "v"), x, impl, xa) if fusable else None
    refuse_unserved(xa, routed, "q/k/v", impl)
    if not fusable:
        return tuple(stacked_linear(x, wi, layer, bi, impl, lora, p)
                     for wi, bi, p in zip(w, b, ("q", "k", "v")))
    interpret = impl.interpret
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        out = routed_kernel.routed_qkv_matmul(
            flat(x), wq, wk, wv, layer, routed.xas, routed.b, lora.layer, routed.slot_experts,
            b, expand=routed.expand, interpret=interpret)
        return tuple(unflat(y, x) for y in out)
    q, k, v = kernel.qkv_matmul(flat(x), wq, wk, wv, layer, *b, interpret=interpret)
    return tuple(plus_delta(unflat(y, x), x, lora, p) for y, p in zip((q, k, v), ("q", "k", "v")))


def swiglu(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, layer: int | jax.Array,
    b_gate: jax.Array | None, b_up: jax.Array | None, impl: Impl, lora: LoraTerm | None = None,
    xa: tuple | None = None,
) -> jax.Array:
    """``silu(x W_gate + b) * (x W_up + b)`` in float32, returned in ``x.dtype``, with ``lora``'s
    terms inside both projections; one fused kernel launch under Pallas (both weights streamed
    by the same programs). ``xa``: gate's and up's shrinks computed ahead
    (:func:`residual_linear_shrink_ahead`), expanded with no shrink launch."""
    from loraswitch_jax.pallas import fused_projections as kernel

    interpret = impl.interpret
    adapted = lora is not None and (lora.adapts("gate") or lora.adapts("up"))
    fusable = not impl.xla and kernel.supports(w_gate.shape[1], w_gate.shape[2])
    routed = routed_operands(lora, ("gate", "up"), x, impl, xa) if fusable else None
    refuse_unserved(xa, routed, "gate/up", impl)
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        act = routed_kernel.routed_gate_up_matmul(
            flat(x), w_gate, w_up, layer, routed.xas, routed.b, lora.layer, routed.slot_experts,
            b_gate, b_up, expand=routed.expand, interpret=interpret)
        return unflat(act, x)
    if fusable and not adapted:
        return unflat(kernel.gate_up_matmul(flat(x), w_gate, w_up, layer, b_gate, b_up,
                                             interpret=interpret), x)
    gate = stacked_linear(x, w_gate, layer, b_gate, impl, lora, "gate")
    up = stacked_linear(x, w_up, layer, b_up, impl, lora, "up")
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)


def mlp(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, layer: int | jax.Array,
    biases: tuple[jax.Array | None, jax.Array | None, jax.Array | None], impl: Impl,
    lora: LoraTerm | None = None, xa: tuple | None = None,
) -> jax.Array:
    """The SwiGLU MLP ``down(silu(x W_gate + b) * (x W_up + b)) + b`` of ``x [..., d]``, with
    ``lora``'s terms in all three projections. Under Pallas with all three adapted (no dropout),
    the gate/up kernel also computes the down projection's ``x A`` in its epilogue (no shrink
    launch for ``down``; ``pallas/tuned.py``); else :func:`swiglu` then :func:`stacked_linear`.
    ``xa``: gate's and up's shrinks computed ahead (:func:`residual_linear_shrink_ahead`)."""
    b_gate, b_up, b_down = biases
    fused = gate_up_down_shrink(x, w_gate, w_up, w_down, layer, b_gate, b_up, impl, lora, xa)
    if fused is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        act, xa_down, routed = fused
        y = routed_kernel.routed_matmul(act, w_down, layer, xa_down, lora.b["down"], lora.layer,
                                        routed.slot_experts, b_down, expand=routed.expand,
                                        interpret=impl.interpret)
        return unflat(y, x)
    act = swiglu(x, w_gate, w_up, layer, b_gate, b_up, impl, lora, xa)
    return stacked_linear(act, w_down, layer, b_down, impl, lora, "down")


def gate_up_down_shrink(x, w_gate, w_up, w_down, layer, b_gate, b_up, impl, lora, xa):
    """``(act, xa_down, routed)`` of the routed gate/up kernel with down's shrink in its
    epilogue, where it serves (Pallas, all three adapted, no dropout, shapes it tiles), else
    None."""
    from loraswitch_jax.pallas import fused_projections as fused_kernel
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    d, f = w_gate.shape[1], w_gate.shape[2]
    if not (not impl.xla and lora is not None and lora.adapts("down")
            and lora.dropout_key is None and fused_kernel.supports(d, f)
            and routed_kernel.supports(f, w_down.shape[2], rank=lora.a["down"].shape[-1])):
        return None
    routed = routed_operands(lora, ("gate", "up"), x, impl, xa)
    if routed is None:
        return None
    act, xa_down = routed_kernel.routed_gate_up_matmul(
        flat(x), w_gate, w_up, layer, routed.xas, routed.b, lora.layer, routed.slot_experts,
        b_gate, b_up, down_shrink=(lora.a["down"], routed.slot_weights), expand=routed.expand,
        interpret=impl.interpret)
    return act, xa_down, routed


def cached_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int | jax.Array,
    positions: jax.Array, mask: jax.Array, impl: Impl,
) -> jax.Array:
    """Attention of ``q [B, T, H, hd]`` over the stacked caches ``[L, B, S, KV, hd]`` at ``layer``
    (this step's keys already written): ``[B, T, H * hd]``. One token per sequence under Pallas
    (decode) runs the decode-attention kernel over slots ``<= positions``; else ``mask [B, T, S]``
    with ``layers.attention`` over ``cache[layer]``."""
    from loraswitch_jax.pallas import decode_attention as kernel

    B, T, H, hd = q.shape
    if not impl.xla and T == 1 and kernel.supports(k_cache.shape[2], hd):  # tuned.py
        out = kernel.decode_attention(q[:, 0], k_cache, v_cache, layer, positions[:, 0] + 1,
                                      interpret=impl.interpret)
        return out[:, None]
    keys, values = k_cache[layer].astype(q.dtype), v_cache[layer].astype(q.dtype)
    return attention(q, keys, values, mask)


def switch_merge(
    w_base: jax.Array, w_work: jax.Array, a: jax.Array, b: jax.Array, expert_ids: jax.Array,
    gates: jax.Array, first_layer: int, write: jax.Array, impl: Impl,
) -> jax.Array:
    """``w_work`` with layers from ``first_layer`` on set to ``w_base[l] + sum_j gates_j
    A[l, e_j] B[l, e_j]`` where ``write`` (a traced flag), else left as they are. Stacks:
    ``w_base, w_work [L, K, N]``, ``a [La, E, K, r]``, ``b [La, E, r, N]``; ``expert_ids,
    gates [k]``, the LoRA scale folded into ``gates``. One SGMM launch under Pallas."""
    from loraswitch_jax.pallas import switch_merge as kernel

    if not impl.xla and kernel.supports(w_base.shape[1], w_base.shape[2], a.shape[-1]):
        return kernel.switch_merge(w_base, w_work, a, b, expert_ids, gates,
                                   first_layer=first_layer, write=write, interpret=impl.interpret)
    merged = kernel.switch_merge_reference(w_base, a, b, expert_ids, gates, first_layer=first_layer)
    return w_work.at[first_layer:].set(jnp.where(write, merged, w_work[first_layer:]))
