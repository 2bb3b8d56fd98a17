"""The one place where model code meets kernels: ``impl`` picks XLA or a Pallas kernel.

Model code calls these functions with stacked weights and a layer index; it never imports
``loraswitch_jax.pallas`` itself, so kernel backends can change without touching the model.

``impl`` is a name or an :class:`Impl`:
  * ``"xla"``: slices the layer (static index: read in place outside loops) and lets XLA fuse;
    an adapter's term is the jnp product ``adapters.lora_delta`` added after the projection.
  * ``"pallas"``: Triton kernels that read ``w[layer]`` in place, also inside ``while_loop``
    and ``scan`` (where XLA copies each slice first; DESIGN.md §2). With an adapter the routed
    kernels add ``(x A) B`` inside the projection's own launch: the expand (``B``) rides along
    with ``W``; the small shrink (``x A``) is one split launch per input group, and the down
    projection's is computed in the gate/up kernel's epilogue. Decode attends with the
    decode-attention kernel; with ``Impl(shrink_ahead=True)`` and gather slots it also computes
    the o projection's shrink (:func:`cached_attention_shrink_ahead`), and o's routed kernel
    adds the residual and computes gate's and up's (:func:`residual_linear_shrink_ahead`); not
    yet timed on a GPU, so off by default. These paths were measured fastest: ``pallas/tuned.py``.
  * ``"pallas_interpret"``: the Pallas kernels in interpret mode (CPU tests).
  * ``"auto"``: ``"pallas"`` on a GPU, ``"xla"`` elsewhere.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from loraswitch_jax.adapters import lora_delta
from loraswitch_jax.layers import attention
from loraswitch_jax.params import PROJECTIONS
from loraswitch_jax.router import Route

__all__ = ["IMPLS", "Impl", "LoraTerm", "cached_attention", "cached_attention_shrink_ahead", "mlp",
           "mlp_residual_shrink_ahead", "qkv_linear", "residual_linear_shrink_ahead", "resolve_impl", "shared_slots",
           "stacked_linear", "swiglu", "switch_merge"]

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class Impl:
    """How ``ops`` run: ``backend`` ``"xla"`` or ``"pallas"``; ``interpret`` runs the Pallas
    kernels in interpret mode; ``shrink_ahead``: at decode with gather slots, the
    decode-attention kernel also computes the o projection's ``x A`` and o's kernel gate's and
    up's (no shrink launch for o, gate and up; off by default until measured faster on a GPU:
    ``pallas/tuned.py``). Hashable: a static argument of ``jax.jit``."""

    backend: str = "pallas"
    interpret: bool = False
    shrink_ahead: bool = False

    def __post_init__(self):
        if self.backend not in ("xla", "pallas"):
            raise ValueError(f"unknown backend {self.backend!r}; expected 'xla' or 'pallas'")
        for name in ("interpret", "shrink_ahead"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Impl.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def xla(self) -> bool:
        return self.backend == "xla"


def resolve_impl(impl: str | Impl) -> Impl:
    """An :class:`Impl` from a name in ``IMPLS`` (``"auto"``: Pallas on a GPU, else XLA)."""
    if isinstance(impl, Impl):
        return impl
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS} or an ops.Impl")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    return Impl(backend="xla" if impl == "xla" else "pallas", interpret=impl == "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class LoraTerm:
    """One adapted layer's routed LoRA branch, as its projections see it.

    ``a[proj] [La, E, d_in, r]`` and ``b[proj] [La, E, r, d_out]`` are whole expert stacks read
    at ``layer`` (the adapted-layer index, may be traced); ``route`` has ``[B, T, k]`` fields.
    ``dropout_key`` turns on dropout of the branch's input (training), one mask per projection.
    ``slots``: the routed kernels' ``(slot_experts, slot_weights)`` for ``route``, when built
    once for all layers (:func:`shared_slots`); else each projection group builds its own.
    Projections missing from ``a`` are not adapted.
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    layer: int | jax.Array
    route: Route
    scale: float
    dropout: float = 0.0
    dropout_key: jax.Array | None = None
    slots: tuple[jax.Array, jax.Array] | None = None

    def adapts(self, proj: str) -> bool:
        return proj in self.a

    def input(self, x: jax.Array, proj: str) -> jax.Array:
        """``x`` as the branch of ``proj`` reads it (dropped out while training)."""
        if self.dropout_key is None or self.dropout <= 0:
            return x
        key = jax.random.fold_in(self.dropout_key, PROJECTIONS.index(proj))
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

    def delta(self, x: jax.Array, proj: str) -> jax.Array:
        """The jnp term ``scale * sum_j g_j (x A[e_j]) B[e_j]`` of ``proj`` for ``x [B, T, d_in]``."""
        return lora_delta(self.input(x, proj), self.a[proj][self.layer], self.b[proj][self.layer],
                          self.route, self.scale)


def shared_slots(route: Route, num_experts: int, scale: float,
                 impl: Impl) -> tuple[jax.Array, jax.Array] | None:
    """The routed kernels' expert slots (``lora_shrink.route_slots``) of a route that every
    adapted layer shares (switch and lora modes), for :class:`LoraTerm`'s ``slots``: built once
    per step instead of once per projection group, where each build cost small launches of its
    own (96 per batch-8 decode step of a 7B model: eval/results/profile/llama2-7b_b8_ctx1024.md).
    ``None`` where no routed kernel runs (XLA)."""
    if impl.xla:
        return None
    from loraswitch_jax.pallas.lora_shrink import route_slots

    k = route.expert_ids.shape[-1]
    return route_slots(route.expert_ids.reshape(-1, k), route.gates.reshape(-1, k), num_experts,
                       scale)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _unflat(y: jax.Array, like: jax.Array) -> jax.Array:
    return y.reshape(*like.shape[:-1], y.shape[-1])


@dataclasses.dataclass(frozen=True)
class _Routed:
    """What the routed kernels take for a group of projections sharing one input: expert slots,
    and per projection the shrink ``x A`` (``xas``) and ``B``; ``expand`` as the kernels take
    it."""

    slot_experts: jax.Array
    slot_weights: jax.Array
    xas: tuple[jax.Array | None, ...]
    b: tuple[jax.Array | None, ...]
    expand: str = "dot"


def _slots(lora: LoraTerm, num_experts: int, impl: Impl) -> tuple[jax.Array, jax.Array]:
    return lora.slots or shared_slots(lora.route, num_experts, lora.scale, impl)


def _routed(lora: LoraTerm | None, projs: tuple[str, ...], x: jax.Array, impl: Impl,
            ahead: tuple | None = None):
    """The routed-kernel operands for ``projs`` sharing input ``x``, or None when the routed
    kernels cannot serve (no adapter on these projections, XLA, untileable shapes or rank).
    ``ahead``: the projections' ``xa`` computed by an earlier launch (no shrink here)."""
    if impl.xla or lora is None or not any(lora.adapts(p) for p in projs):
        return None
    from loraswitch_jax.pallas import lora_shrink as shrink_kernel
    from loraswitch_jax.pallas import routed_projections as kernel

    adapted = [p for p in projs if lora.adapts(p)]
    widths = [lora.b[p].shape[-1] for p in adapted]
    if not kernel.supports(x.shape[-1], *widths, rank=lora.a[adapted[0]].shape[-1]):
        return None
    num_experts = lora.a[adapted[0]].shape[1]
    slot_experts, slot_weights = _slots(lora, num_experts, impl)
    b = tuple(lora.b[p] if lora.adapts(p) else None for p in projs)
    flat = _flat(x)
    # Expansion in registers for gather slots of few rows, tensor-core dots elsewhere (tuned.py).
    expand = "rows" if (slot_experts.shape[0] < num_experts
                        and flat.shape[0] <= kernel.MAX_EXPAND_ROWS) else "dot"
    if ahead is not None:
        xas = ahead
    elif _dropout(lora):  # each projection drops out its own copy of x: XLA shrinks
        xas = tuple(
            shrink_kernel.lora_shrink(_flat(lora.input(x, p)), lora.a[p], lora.layer,
                                      slot_experts, slot_weights) if lora.adapts(p) else None
            for p in projs
        )
    else:  # one split launch per group, packed: read by the routed kernel as written
        group = iter(shrink_kernel.lora_shrink_group(
            flat, tuple(lora.a[p] for p in adapted), lora.layer, slot_experts, slot_weights,
            packed=True, interpret=impl.interpret))
        xas = tuple(next(group) if lora.adapts(p) else None for p in projs)
    return _Routed(slot_experts, slot_weights, xas, b, expand)


def _dropout(lora: LoraTerm) -> bool:
    return lora.dropout_key is not None and lora.dropout > 0


def _plus_delta(y, x, lora: LoraTerm | None, proj: str):
    return y if lora is None or not lora.adapts(proj) else y + lora.delta(x, proj)


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
        routed = _routed(lora, (proj,), x, impl, None if xa is None else (xa,))
    if xa is not None and routed is None:
        raise ValueError(f"an xa computed ahead for {proj!r} needs the routed kernel to serve it, "
                         f"which it does not here (impl {impl}, w {w.shape})")
    if impl.xla or not kernel.supports(k, n):
        # Shapes the kernel cannot tile (not multiples of 16) take the XLA path.
        y = jnp.einsum("...k,kn->...n", x, w[layer].astype(x.dtype))
        y = y if bias is None else y + bias[layer].astype(y.dtype)
        return _plus_delta(y, x, lora, proj)
    interpret = impl.interpret
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        y = routed_kernel.routed_matmul(_flat(x), w, layer, routed.xas[0], routed.b[0],
                                        lora.layer, routed.slot_experts, bias,
                                        expand=routed.expand, interpret=interpret)
        return _unflat(y, x)
    y = _unflat(kernel.stacked_matmul(_flat(x), w, layer, interpret=interpret), x)
    y = y if bias is None else y + bias[layer].astype(y.dtype)
    return _plus_delta(y, x, lora, proj)


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
    routed = _routed(lora, ("q", "k", "v"), x, impl, xa) if fusable else None
    _refuse_unserved(xa, routed, "q/k/v", impl)
    if not fusable:
        return tuple(stacked_linear(x, wi, layer, bi, impl, lora, p)
                     for wi, bi, p in zip(w, b, ("q", "k", "v")))
    interpret = impl.interpret
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        out = routed_kernel.routed_qkv_matmul(
            _flat(x), wq, wk, wv, layer, routed.xas, routed.b, lora.layer, routed.slot_experts,
            b, expand=routed.expand, interpret=interpret)
        return tuple(_unflat(y, x) for y in out)
    q, k, v = kernel.qkv_matmul(_flat(x), wq, wk, wv, layer, *b, interpret=interpret)
    return tuple(_plus_delta(_unflat(y, x), x, lora, p) for y, p in zip((q, k, v), ("q", "k", "v")))


def _refuse_unserved(xa, routed, projs: str, impl: Impl) -> None:
    if xa is not None and routed is None:
        raise ValueError(f"an xa computed ahead for {projs} needs the routed kernel to serve "
                         f"them, which it does not here (impl {impl})")


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
    routed = _routed(lora, ("gate", "up"), x, impl, xa) if fusable else None
    _refuse_unserved(xa, routed, "gate/up", impl)
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        act = routed_kernel.routed_gate_up_matmul(
            _flat(x), w_gate, w_up, layer, routed.xas, routed.b, lora.layer, routed.slot_experts,
            b_gate, b_up, expand=routed.expand, interpret=interpret)
        return _unflat(act, x)
    if fusable and not adapted:
        return _unflat(kernel.gate_up_matmul(_flat(x), w_gate, w_up, layer, b_gate, b_up,
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
    fused = _gate_up_down_shrink(x, w_gate, w_up, w_down, layer, b_gate, b_up, impl, lora, xa)
    if fused is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        act, xa_down, routed = fused
        y = routed_kernel.routed_matmul(act, w_down, layer, xa_down, lora.b["down"], lora.layer,
                                        routed.slot_experts, b_down, expand=routed.expand,
                                        interpret=impl.interpret)
        return _unflat(y, x)
    act = swiglu(x, w_gate, w_up, layer, b_gate, b_up, impl, lora, xa)
    return stacked_linear(act, w_down, layer, b_down, impl, lora, "down")


def _gate_up_down_shrink(x, w_gate, w_up, w_down, layer, b_gate, b_up, impl, lora, xa):
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
    routed = _routed(lora, ("gate", "up"), x, impl, xa)
    if routed is None:
        return None
    act, xa_down = routed_kernel.routed_gate_up_matmul(
        _flat(x), w_gate, w_up, layer, routed.xas, routed.b, lora.layer, routed.slot_experts,
        b_gate, b_up, down_shrink=(lora.a["down"], routed.slot_weights), expand=routed.expand,
        interpret=impl.interpret)
    return act, xa_down, routed


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
    fused = None if nexts is None else _gate_up_down_shrink(x, w_gate, w_up, w_down, layer,
                                                            *biases[:2], impl, lora, xa)
    if fused is None:
        return h + mlp(x, w_gate, w_up, w_down, layer, biases, impl, lora, xa), None
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    act, xa_down, routed = fused
    ahead = routed_kernel.ResidualAhead(_flat(h), next_norm, tuple(lora.a[p] for p in nexts),
                                        routed.slot_weights, eps, norm_layer=layer + 1,
                                        a_layer=lora.layer + 1)
    h_next, normed = routed_kernel.routed_matmul_residual(
        act, w_down, layer, xa_down, lora.b["down"], lora.layer, routed.slot_experts, biases[2],
        ahead=ahead, expand=routed.expand, interpret=impl.interpret)
    normed = dict(zip(nexts, normed))
    return _unflat(h_next, h), tuple(normed.get(p) for p in ("q", "k", "v"))


def _ahead_targets(x: jax.Array, impl: Impl, lora: LoraTerm | None, projs: tuple[str, ...],
                   k: int, widths: tuple[int, ...]) -> tuple[str, ...] | None:
    """The adapted ones of ``projs`` (input width ``k``, output ``widths``) whose shrink an
    earlier kernel may compute ahead: shrink-ahead on, one token per sequence of ``x [B, T,
    ...]``, Pallas, no dropout, gather slots, shapes their fused and routed kernels tile; else
    None."""
    from loraswitch_jax.pallas import fused_projections as fused_kernel
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    if (impl.xla or not impl.shrink_ahead or x.ndim != 3 or x.shape[1] != 1 or lora is None
            or _dropout(lora)):
        return None
    nexts = tuple(p for p in projs if lora.adapts(p))
    if not nexts:
        return None
    a = lora.a[nexts[0]]
    if not (fused_kernel.supports(k, *widths)
            and routed_kernel.supports(k, *widths, rank=a.shape[-1])):
        return None
    slot_experts, _ = _slots(lora, a.shape[1], impl)
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


def _o_shrink_ahead(q: jax.Array, k_cache: jax.Array, impl: Impl, lora: LoraTerm | None):
    """The decode kernel's ``OShrink`` for o's LoRA where it can serve it and the routed kernel
    then expands it (one token per sequence, Pallas, o adapted, no dropout, gather slots,
    shapes both kernels tile), else None."""
    from loraswitch_jax.pallas import decode_attention as kernel
    from loraswitch_jax.pallas import routed_projections as routed_kernel
    from loraswitch_jax.pallas import stacked_matmul

    B, T, H, hd = q.shape
    if (impl.xla or not impl.shrink_ahead or T != 1 or lora is None or not lora.adapts("o")
            or _dropout(lora) or not kernel.supports(k_cache.shape[2], hd)):
        return None
    a, n = lora.a["o"], lora.b["o"].shape[-1]
    if not (stacked_matmul.supports(H * hd, n)
            and routed_kernel.supports(H * hd, n, rank=a.shape[-1])):
        return None
    slot_experts, slot_weights = _slots(lora, a.shape[1], impl)
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
    routed = _routed(lora, (proj,), x, impl, None if xa is None else (xa,)) if adapted else None
    slot_experts, slot_weights = _slots(lora, lora.a[nexts[0]].shape[1], impl)
    expand = "rows" if _flat(x).shape[0] <= routed_kernel.MAX_EXPAND_ROWS else "dot"
    ahead = routed_kernel.ResidualAhead(_flat(h), norm, tuple(lora.a[p] for p in nexts),
                                        slot_weights, eps)
    h_mid, normed = routed_kernel.routed_matmul_residual(
        _flat(x), w, layer, None if routed is None else routed.xas[0],
        None if routed is None else routed.b[0], lora.layer, slot_experts, bias, ahead=ahead,
        expand=expand, interpret=impl.interpret)
    normed = dict(zip(nexts, normed))
    return _unflat(h_mid, h), tuple(normed.get(p) for p in ("gate", "up"))


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
