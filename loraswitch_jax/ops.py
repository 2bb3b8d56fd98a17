"""The one place where model code meets kernels: ``impl`` picks XLA or a Pallas kernel.

Model code calls these functions with stacked weights and a layer index; it never imports
``loraswitch_jax.pallas`` itself, so kernel backends can change without touching the model.

``impl`` is a name or an :class:`Impl`:
  * ``"xla"``: slices the layer (static index: read in place outside loops) and lets XLA fuse;
    an adapter's term is the jnp product ``adapters.lora_delta`` added after the projection.
  * ``"pallas"``: Triton kernels that read ``w[layer]`` in place, also inside ``while_loop``
    and ``scan`` (where XLA copies each slice first; DESIGN.md §2). With an adapter the routed
    kernels add ``(x A) B`` inside the projection's own launch: the expand (``B``) rides along
    with ``W``; the small shrink (``x A``) runs where ``Impl.lora_shrink`` says.
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

__all__ = ["ATTENTIONS", "EXPANDS", "IMPLS", "SHRINKS", "Impl", "LoraTerm", "cached_attention",
           "mlp", "qkv_linear", "resolve_impl", "shared_slots", "stacked_linear", "swiglu"]

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
SHRINKS = ("auto", "xla", "pallas", "pallas-split", "epilogue", "inline")
ATTENTIONS = ("auto", "xla", "pallas")
EXPANDS = ("auto", "dot", "rows")

# Where the routed kernels compute x A when Impl.lora_shrink is "auto".
# Source: eval/results/adapters/bench_adapters_issue4{,_shrink,_attention_split,_expand}.md (H100
# 80GB HBM3, JAX 0.11.2, 2026-11-23; Llama-2-7B shapes, E 8, r 16, k 2, context 1024), decode time
# over the backbone's in the same run:
#   batch 1:  "pallas-split" (K spread over more programs) 1.142x against "pallas" 1.266x;
#             "xla" (an XLA op per projection) 1.70x, "inline" (x A recomputed in every
#             program of the projection kernel) 17.7x; "epilogue" (down's x A in the gate/up
#             kernel) 1.144x against "pallas-split" 1.138x (_epilogue: one run, within noise);
#   batch 8:  "epilogue" 1.260x, "pallas-split" 1.304x;
#   batch 32: "epilogue" 1.145x, "pallas-split" 1.178x ("pallas" 1.176x in an earlier run);
#   batch 64: "epilogue" 1.124x, "pallas-split" 1.119x ("pallas" 1.118x, "xla" 1.121x earlier).
_DEFAULT_SHRINK = "epilogue"

# How decode attends when Impl.attention is "auto". Source: the backbone-pallas-attention rows of
# eval/results/adapters/bench_adapters_issue4_attention_split.md (same GPU and shapes): the
# kernel reads only the valid slots of cache[layer] in place, 5.585 against XLA's 6.108 ms/token
# at batch 1 (0.914x), 12.01 against 13.86 at batch 32 (0.867x).
_DEFAULT_ATTENTION = "pallas"

# How the routed kernels expand a given x A when Impl.lora_expand is "auto" ("rows" applies to
# gather slots of at most 4 rows; "dot" elsewhere). Source: eval/results/adapters/
# bench_adapters_issue4_dense.md (H100 80GB HBM3, JAX 0.11.2, 2026-11-23; Llama-2-7B shapes,
# E 8, r 16, k 2, context 1024): switch decode at batch 1 took 1.123x the backbone's time with
# "rows" (registers, loads issued before the K loop) against 1.144x with "dot" (tensor-core
# dots after it), in the same run.
_DEFAULT_EXPAND = "rows"


@dataclasses.dataclass(frozen=True)
class Impl:
    """How ``ops`` run: ``backend`` ``"xla"`` or ``"pallas"``; ``interpret`` runs the Pallas
    kernels in interpret mode; ``lora_shrink`` places the routed LoRA's ``x A``: ``"xla"`` (one
    XLA op per projection), ``"pallas"`` (one launch per group of projections that share an
    input), ``"pallas-split"`` (the same with ``K`` spread over more programs at decode),
    ``"epilogue"`` (``"pallas-split"``, but the down projection's ``x A`` is computed in the
    gate/up kernel's epilogue, one launch fewer per layer; float32 atomic adds), ``"inline"``
    (inside every program of the projection kernel; no launch, redundant reads) or ``"auto"``;
    ``attention`` how decode attends over the cache: ``"pallas"`` (``pallas/decode_attention.py``:
    the stacked cache read in place, valid slots only; its cache length must be a multiple of 16,
    else XLA's runs), ``"xla"`` (``layers.attention`` over ``cache[layer]``) or ``"auto"``;
    ``lora_expand`` how the routed kernels add ``(x A) B``: ``"dot"`` (tensor-core dots after
    the K loop), ``"rows"`` (where the slots gather and at most 4 rows decode: each row in
    registers, from loads issued before the K loop so their latency hides behind it; ``"dot"``
    elsewhere) or ``"auto"``. Hashable: a static argument of ``jax.jit``."""

    backend: str = "pallas"
    interpret: bool = False
    lora_shrink: str = "auto"
    attention: str = "auto"
    lora_expand: str = "auto"

    def __post_init__(self):
        if self.backend not in ("xla", "pallas"):
            raise ValueError(f"unknown backend {self.backend!r}; expected 'xla' or 'pallas'")
        if self.lora_shrink not in SHRINKS:
            raise ValueError(f"unknown lora_shrink {self.lora_shrink!r}; expected one of {SHRINKS}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of {ATTENTIONS}")
        if self.lora_expand not in EXPANDS:
            raise ValueError(f"unknown lora_expand {self.lora_expand!r}; expected one of "
                             f"{EXPANDS}")
        if self.backend == "xla" and self.attention == "pallas":
            raise ValueError("attention='pallas' needs backend='pallas' (the XLA backend runs no "
                             "Pallas kernel)")

    @property
    def xla(self) -> bool:
        return self.backend == "xla"

    @property
    def shrink(self) -> str:
        return _DEFAULT_SHRINK if self.lora_shrink == "auto" else self.lora_shrink

    @property
    def expand(self) -> str:
        return _DEFAULT_EXPAND if self.lora_expand == "auto" else self.lora_expand

    @property
    def pallas_attention(self) -> bool:
        """Whether decode attends with the Pallas kernel (``"auto"``: :data:`_DEFAULT_ATTENTION`)."""
        choice = _DEFAULT_ATTENTION if self.attention == "auto" else self.attention
        return not self.xla and choice == "pallas"


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
    own (96 per batch-8 decode step of a 7B model: eval/results/profile/profile_step_b8.md).
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
    and per projection ``B`` plus either the shrink ``x A`` (``xas``) or, for ``inline``, ``A``;
    ``expand`` as the kernels take it."""

    slot_experts: jax.Array
    slot_weights: jax.Array
    inline: bool
    xas: tuple[jax.Array | None, ...]
    a: tuple[jax.Array | None, ...]
    b: tuple[jax.Array | None, ...]
    expand: str = "dot"


def _routed(lora: LoraTerm | None, projs: tuple[str, ...], x: jax.Array, impl: Impl):
    """The routed-kernel operands for ``projs`` sharing input ``x``, or None when the routed
    kernels cannot serve (no adapter on these projections, XLA, untileable shapes or rank)."""
    if impl.xla or lora is None or not any(lora.adapts(p) for p in projs):
        return None
    from loraswitch_jax.pallas import lora_shrink as shrink_kernel
    from loraswitch_jax.pallas import routed_projections as kernel

    adapted = [p for p in projs if lora.adapts(p)]
    widths = [lora.b[p].shape[-1] for p in adapted]
    if not kernel.supports(x.shape[-1], *widths, rank=lora.a[adapted[0]].shape[-1]):
        return None
    ids = lora.route.expert_ids
    num_experts = lora.a[adapted[0]].shape[1]
    slot_experts, slot_weights = lora.slots or shared_slots(lora.route, num_experts, lora.scale,
                                                            impl)
    a = tuple(lora.a[p] if lora.adapts(p) else None for p in projs)
    b = tuple(lora.b[p] if lora.adapts(p) else None for p in projs)
    shrink = impl.shrink
    if lora.dropout_key is not None and lora.dropout > 0:
        shrink = "xla"  # each projection drops out its own copy of x
    if shrink == "inline" and ids.size >= num_experts:
        shrink = "pallas"  # dense slots (one per expert): inline would hold E accumulators
    if shrink == "inline":
        return _Routed(slot_experts, slot_weights, True, (None,) * len(projs), a, b)
    flat = _flat(x)
    expand = "rows" if (impl.expand == "rows" and slot_experts.shape[0] < num_experts
                        and flat.shape[0] <= kernel.MAX_EXPAND_ROWS) else "dot"
    if shrink in ("pallas", "pallas-split", "epilogue"):
        # Packed: the routed kernel reads the shrink's output as written, no copy between.
        group = iter(shrink_kernel.lora_shrink_group(
            flat, tuple(lora.a[p] for p in adapted), lora.layer, slot_experts, slot_weights,
            split=shrink != "pallas", packed=True, interpret=impl.interpret))
        xas = tuple(next(group) if lora.adapts(p) else None for p in projs)
    else:
        xas = tuple(
            shrink_kernel.lora_shrink(_flat(lora.input(x, p)), lora.a[p], lora.layer,
                                      slot_experts, slot_weights) if lora.adapts(p) else None
            for p in projs
        )
    return _Routed(slot_experts, slot_weights, False, xas, a, b, expand)


def _plus_delta(y, x, lora: LoraTerm | None, proj: str):
    return y if lora is None or not lora.adapts(proj) else y + lora.delta(x, proj)


def stacked_linear(
    x: jax.Array, w: jax.Array, layer: int | jax.Array, bias: jax.Array | None, impl: Impl,
    lora: LoraTerm | None = None, proj: str | None = None,
) -> jax.Array:
    """``x [..., K] @ w[layer] (+ bias[layer])`` for a stacked ``w [L, K, N]``, in ``x.dtype``,
    plus ``lora``'s term for ``proj`` when it adapts it."""
    from loraswitch_jax.pallas import stacked_matmul as kernel

    k, n = w.shape[1:]
    if impl.xla or not kernel.supports(k, n):
        # Shapes the kernel cannot tile (not multiples of 16) take the XLA path.
        y = jnp.einsum("...k,kn->...n", x, w[layer].astype(x.dtype))
        y = y if bias is None else y + bias[layer].astype(y.dtype)
        return _plus_delta(y, x, lora, proj)
    interpret = impl.interpret
    routed = _routed(lora, (proj,), x, impl)
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        if routed.inline:
            y = routed_kernel.routed_matmul_inline_shrink(
                _flat(x), w, layer, routed.a[0], routed.b[0], lora.layer, routed.slot_experts,
                routed.slot_weights, bias, interpret=interpret)
        else:
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v`` projections of ``x [..., d]`` (plus ``lora``'s terms); one fused kernel launch
    under Pallas."""
    from loraswitch_jax.pallas import fused_projections as kernel

    wq, wk, wv = w
    if impl.xla or not kernel.supports(wq.shape[1], wq.shape[2], wk.shape[2]):
        return tuple(stacked_linear(x, wi, layer, bi, impl, lora, p)
                     for wi, bi, p in zip(w, b, ("q", "k", "v")))
    interpret = impl.interpret
    routed = _routed(lora, ("q", "k", "v"), x, impl)
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        if routed.inline:
            out = routed_kernel.routed_qkv_matmul_inline_shrink(
                _flat(x), wq, wk, wv, layer, routed.a, routed.b, lora.layer, routed.slot_experts,
                routed.slot_weights, b, interpret=interpret)
        else:
            out = routed_kernel.routed_qkv_matmul(
                _flat(x), wq, wk, wv, layer, routed.xas, routed.b, lora.layer,
                routed.slot_experts, b, expand=routed.expand, interpret=interpret)
        return tuple(_unflat(y, x) for y in out)
    q, k, v = kernel.qkv_matmul(_flat(x), wq, wk, wv, layer, *b, interpret=interpret)
    return tuple(_plus_delta(_unflat(y, x), x, lora, p) for y, p in zip((q, k, v), ("q", "k", "v")))


def swiglu(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, layer: int | jax.Array,
    b_gate: jax.Array | None, b_up: jax.Array | None, impl: Impl, lora: LoraTerm | None = None,
) -> jax.Array:
    """``silu(x W_gate + b) * (x W_up + b)`` in float32, returned in ``x.dtype``, with ``lora``'s
    terms inside both projections; one fused kernel launch under Pallas (both weights streamed
    by the same programs)."""
    from loraswitch_jax.pallas import fused_projections as kernel

    interpret = impl.interpret
    adapted = lora is not None and (lora.adapts("gate") or lora.adapts("up"))
    fusable = not impl.xla and kernel.supports(w_gate.shape[1], w_gate.shape[2])
    routed = _routed(lora, ("gate", "up"), x, impl) if fusable else None
    if routed is not None:
        from loraswitch_jax.pallas import routed_projections as routed_kernel

        if routed.inline:
            act = routed_kernel.routed_gate_up_matmul_inline_shrink(
                _flat(x), w_gate, w_up, layer, routed.a, routed.b, lora.layer,
                routed.slot_experts, routed.slot_weights, b_gate, b_up, interpret=interpret)
        else:
            act = routed_kernel.routed_gate_up_matmul(
                _flat(x), w_gate, w_up, layer, routed.xas, routed.b, lora.layer,
                routed.slot_experts, b_gate, b_up, expand=routed.expand, interpret=interpret)
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
    lora: LoraTerm | None = None,
) -> jax.Array:
    """The SwiGLU MLP ``down(silu(x W_gate + b) * (x W_up + b)) + b`` of ``x [..., d]``, with
    ``lora``'s terms in all three projections. With ``Impl.lora_shrink`` ``"epilogue"`` and all
    three adapted, the gate/up kernel also computes the down projection's ``x A`` (no shrink
    launch for ``down``); else :func:`swiglu` then :func:`stacked_linear`."""
    from loraswitch_jax.pallas import fused_projections as fused_kernel
    from loraswitch_jax.pallas import routed_projections as routed_kernel

    b_gate, b_up, b_down = biases
    d, f = w_gate.shape[1], w_gate.shape[2]
    if (impl.shrink == "epilogue" and lora is not None and lora.adapts("down")
            and lora.dropout_key is None and fused_kernel.supports(d, f)
            and routed_kernel.supports(f, w_down.shape[2], rank=lora.a["down"].shape[-1])):
        routed = _routed(lora, ("gate", "up"), x, impl)
        if routed is not None:
            act, xa_down = routed_kernel.routed_gate_up_matmul(
                _flat(x), w_gate, w_up, layer, routed.xas, routed.b, lora.layer,
                routed.slot_experts, b_gate, b_up,
                down_shrink=(lora.a["down"], routed.slot_weights), expand=routed.expand,
                interpret=impl.interpret)
            y = routed_kernel.routed_matmul(act, w_down, layer, xa_down, lora.b["down"],
                                            lora.layer, routed.slot_experts, b_down,
                                            expand=routed.expand, interpret=impl.interpret)
            return _unflat(y, x)
    act = swiglu(x, w_gate, w_up, layer, b_gate, b_up, impl, lora)
    return stacked_linear(act, w_down, layer, b_down, impl, lora, "down")


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
    if impl.pallas_attention and T == 1 and kernel.supports(k_cache.shape[2], hd):
        out = kernel.decode_attention(q[:, 0], k_cache, v_cache, layer, positions[:, 0] + 1,
                                      interpret=impl.interpret)
        return out[:, None]
    keys, values = k_cache[layer].astype(q.dtype), v_cache[layer].astype(q.dtype)
    return attention(q, keys, values, mask)
