"""How ``ops`` run (:class:`Impl`) and the operands its kernels take: the LoRA term of a layer,
its expert slots and the routed kernels' operands (``loraswitch_jax.ops``' shared parts)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from loraswitch_jax.adapters import lora_delta
from loraswitch_jax.params import PROJECTIONS
from loraswitch_jax.router import Route

__all__ = ["IMPLS", "Impl", "LoraTerm", "Routed", "flat", "has_dropout", "plus_delta",
           "refuse_unserved", "resolve_impl", "routed_operands", "shared_slots", "slots_for",
           "unflat"]

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


def flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def unflat(y: jax.Array, like: jax.Array) -> jax.Array:
    return y.reshape(*like.shape[:-1], y.shape[-1])


@dataclasses.dataclass(frozen=True)
class Routed:
    """What the routed kernels take for a group of projections sharing one input: expert slots,
    and per projection the shrink ``x A`` (``xas``) and ``B``; ``expand`` as the kernels take
    it."""

    slot_experts: jax.Array
    slot_weights: jax.Array
    xas: tuple[jax.Array | None, ...]
    b: tuple[jax.Array | None, ...]
    expand: str = "dot"


def slots_for(lora: LoraTerm, num_experts: int, impl: Impl) -> tuple[jax.Array, jax.Array]:
    """``lora``'s shared slots, or its route's own."""
    return lora.slots or shared_slots(lora.route, num_experts, lora.scale, impl)


def routed_operands(lora: LoraTerm | None, projs: tuple[str, ...], x: jax.Array, impl: Impl,
                    ahead: tuple | None = None) -> Routed | None:
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
    slot_experts, slot_weights = slots_for(lora, num_experts, impl)
    b = tuple(lora.b[p] if lora.adapts(p) else None for p in projs)
    rows = flat(x)
    # Expansion in registers for gather slots of few rows, tensor-core dots elsewhere (tuned.py).
    expand = "rows" if (slot_experts.shape[0] < num_experts
                        and rows.shape[0] <= kernel.MAX_EXPAND_ROWS) else "dot"
    if ahead is not None:
        xas = ahead
    elif has_dropout(lora):  # each projection drops out its own copy of x: XLA shrinks
        xas = tuple(
            shrink_kernel.lora_shrink(flat(lora.input(x, p)), lora.a[p], lora.layer,
                                      slot_experts, slot_weights) if lora.adapts(p) else None
            for p in projs
        )
    else:  # one split launch per group, packed: read by the routed kernel as written
        group = iter(shrink_kernel.lora_shrink_group(
            rows, tuple(lora.a[p] for p in adapted), lora.layer, slot_experts, slot_weights,
            packed=True, interpret=impl.interpret))
        xas = tuple(next(group) if lora.adapts(p) else None for p in projs)
    return Routed(slot_experts, slot_weights, xas, b, expand)


def has_dropout(lora: LoraTerm) -> bool:
    return lora.dropout_key is not None and lora.dropout > 0


def plus_delta(y, x, lora: LoraTerm | None, proj: str):
    return y if lora is None or not lora.adapts(proj) else y + lora.delta(x, proj)


def refuse_unserved(xa, routed, projs: str, impl: Impl) -> None:
    if xa is not None and routed is None:
        raise ValueError(f"an xa computed ahead for {projs} needs the routed kernel to serve "
                         f"them, which it does not here (impl {impl})")
