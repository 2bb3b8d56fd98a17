"""LoRA adapters and mixtures of LoRA experts, as one pytree beside (never inside) the backbone.

Modes:
  * ``lora``: one adapter (``E = 1``) on every target projection.
  * ``layerwise``: the MoLA/MixLoRA-style baseline. Every adapted layer has its own router, reading
    that layer's normalised input (the input of its q/k/v projections), and its own top-k route
    shared by the layer's target projections.
  * ``switch``: LoRA-Switch. One pre-gated router reads the normalised input of decoder layer
    ``router_layer`` and picks ``k`` experts per token once; the same experts and gates serve every
    target projection of every adapted layer: ``W_eff = W + scale * sum_j g_j A[e_j] B[e_j]``.

Adapters cover layers ``router_layer .. L-1`` (``first_layer``); layers before it are plain
backbone. With ``router_layer = 0`` the switch route of a token depends on its id alone
(RMSNorm of its embedding); later positions see context.

Layout (one einsum alphabet: l layer, e expert, d in, r rank, o out):
  ``a[proj]: [La, E, d_in, r]``, ``b[proj]: [La, E, r, d_out]`` with ``La = L - first_layer``,
  ``router: [d, E]`` (switch), ``[La, d, E]`` (layerwise), ``None`` (lora).
``B`` starts at zero, so a fresh adapter leaves the backbone's outputs unchanged (as in LoRA);
``A`` is Kaiming-uniform as in peft.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.params import PROJECTIONS, projection_shape
from loraswitch_jax.router import Route

__all__ = [
    "MODES",
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "check_adapter",
    "init_adapter",
    "lora_delta",
    "lora_method",
    "LORA_METHODS",
]

MODES = ("lora", "layerwise", "switch")


class AdapterError(ValueError):
    """An adapter config or adapter params that are invalid or do not fit the model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """What to adapt and how. Hashable, so it can be a static argument of ``jax.jit``.

    Attributes:
      mode: ``"lora"``, ``"layerwise"`` or ``"switch"``.
      targets: adapted projections, a subset of ``("q", "k", "v", "o", "gate", "up", "down")``.
      rank: LoRA rank ``r``.
      alpha: LoRA scale numerator: the adapter output is multiplied by ``alpha / rank``.
      num_experts: ``E`` (must be 1 in ``lora`` mode).
      top_k: experts per token (1 in ``lora`` mode).
      dropout: dropout on the adapter branch's input while training (as in peft).
      router_layer: the decoder layer whose normalised input the switch router reads; adapters
        sit on layers ``router_layer`` and after (all modes).
    """

    mode: str = "switch"
    targets: tuple[str, ...] = PROJECTIONS
    rank: int = 16
    alpha: float = 32.0
    num_experts: int = 8
    top_k: int = 2
    dropout: float = 0.0
    router_layer: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise AdapterError(f"unknown adapter mode {self.mode!r}; expected one of {MODES}")
        targets = tuple(self.targets) if not isinstance(self.targets, str) else (self.targets,)
        object.__setattr__(self, "targets", targets)
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown:
            raise AdapterError(f"unknown projection names {unknown}; expected some of {PROJECTIONS}")
        if not targets:
            raise AdapterError("targets is empty: name at least one projection to adapt")
        if len(set(targets)) != len(targets):
            raise AdapterError(f"targets has duplicates: {targets}")
        # One canonical order, so that equal configs compare (and compile) equal.
        object.__setattr__(self, "targets", tuple(p for p in PROJECTIONS if p in targets))
        for name in ("rank", "num_experts", "top_k", "router_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise AdapterError(f"{name} must be an integer, got {value!r}")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            # NaN or infinity would pass the range checks below and make every logit NaN.
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise AdapterError(f"AdapterConfig.{name} must be a finite number, got {value!r}")
        if not self.alpha > 0:
            raise AdapterError(
                f"AdapterConfig.alpha must be > 0 (the adapter output is scaled by alpha / rank), "
                f"got {self.alpha!r}"
            )
        if self.rank < 1:
            raise AdapterError(f"rank must be >= 1, got {self.rank=}")
        if self.num_experts < 1:
            raise AdapterError(f"num_experts must be >= 1, got {self.num_experts=}")
        if not 1 <= self.top_k <= self.num_experts:
            raise AdapterError(
                f"top_k must be in [1, num_experts], got {self.top_k=} with {self.num_experts=}"
            )
        if self.mode == "lora" and (self.num_experts, self.top_k) != (1, 1):
            raise AdapterError(
                f"mode 'lora' is one adapter: set num_experts=1 and top_k=1 "
                f"(got {self.num_experts=}, {self.top_k=})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout=}")
        if self.router_layer < 0:
            raise AdapterError(f"router_layer must be >= 0, got {self.router_layer=}")

    @classmethod
    def lora(cls, **kwargs) -> AdapterConfig:
        """A single LoRA (``E = k = 1``)."""
        return cls(mode="lora", num_experts=1, top_k=1, **kwargs)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def first_layer(self) -> int:
        return self.router_layer

    def num_adapted_layers(self, cfg: LlamaConfig) -> int:
        return cfg.num_hidden_layers - self.first_layer

    def validate_for(self, cfg: LlamaConfig) -> None:
        if self.router_layer >= cfg.num_hidden_layers:
            raise AdapterError(
                f"router_layer {self.router_layer} is not a layer of a "
                f"{cfg.num_hidden_layers}-layer model"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"unknown adapter config keys {unknown}; expected some of {sorted(known)}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _register_adapter(cls):
    return jax.tree_util.register_dataclass(
        cls, data_fields=["a", "b", "router"], meta_fields=["config"]
    )


@_register_adapter
@dataclasses.dataclass(frozen=True)
class Adapter:
    """Adapter weights and their (static) config: a pytree whose leaves are ``a``, ``b``, ``router``.

    Being a pytree with the config in its structure, an ``Adapter`` passes through ``jax.jit``,
    optax and orbax as it is; the config travels as static data.
    """

    config: AdapterConfig
    a: dict[str, jax.Array]  # proj -> [La, E, d_in, r]
    b: dict[str, jax.Array]  # proj -> [La, E, r, d_out]
    router: jax.Array | None  # [d, E] switch; [La, d, E] layerwise; None lora

    @property
    def dtype(self):
        return next(iter(self.a.values())).dtype

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self))


def init_adapter(
    cfg: LlamaConfig, acfg: AdapterConfig, key: jax.Array, dtype=jnp.float32
) -> Adapter:
    """Fresh adapter weights: ``A`` Kaiming-uniform (bound ``1/sqrt(d_in)``), ``B = 0``, router
    normal with std ``1/sqrt(d)`` (unit-variance logits on unit-RMS inputs)."""
    acfg.validate_for(cfg)
    La, E, r, d = acfg.num_adapted_layers(cfg), acfg.num_experts, acfg.rank, cfg.hidden_size
    keys = jax.random.split(key, len(acfg.targets) + 1)
    a, b = {}, {}
    for proj, k in zip(acfg.targets, keys[1:]):
        d_in, d_out = projection_shape(cfg, proj)
        bound = 1.0 / d_in**0.5
        a[proj] = jax.random.uniform(k, (La, E, d_in, r), jnp.float32, -bound, bound).astype(dtype)
        b[proj] = jnp.zeros((La, E, r, d_out), dtype)
    router = None
    if acfg.mode == "switch":
        router = (jax.random.normal(keys[0], (d, E), jnp.float32) / d**0.5).astype(dtype)
    elif acfg.mode == "layerwise":
        router = (jax.random.normal(keys[0], (La, d, E), jnp.float32) / d**0.5).astype(dtype)
    return Adapter(config=acfg, a=a, b=b, router=router)


def check_adapter(adapter: Adapter, cfg: LlamaConfig) -> None:
    """Raise :class:`AdapterError` naming the first leaf whose shape does not fit ``cfg``."""
    acfg = adapter.config
    acfg.validate_for(cfg)
    La, E, r, d = acfg.num_adapted_layers(cfg), acfg.num_experts, acfg.rank, cfg.hidden_size
    for name, tree in (("a", adapter.a), ("b", adapter.b)):
        if set(tree) != set(acfg.targets):
            raise AdapterError(
                f"adapter.{name} holds projections {sorted(tree)}, but the config targets "
                f"{sorted(acfg.targets)}"
            )
    for proj in acfg.targets:
        d_in, d_out = projection_shape(cfg, proj)
        for name, got, want in (
            ("a", adapter.a[proj].shape, (La, E, d_in, r)),
            ("b", adapter.b[proj].shape, (La, E, r, d_out)),
        ):
            if tuple(got) != want:
                raise AdapterError(f"adapter.{name}[{proj!r}] has shape {tuple(got)}, expected {want}")
    want_router = {"lora": None, "switch": (d, E), "layerwise": (La, d, E)}[acfg.mode]
    got_router = None if adapter.router is None else tuple(adapter.router.shape)
    if got_router != want_router:
        raise AdapterError(f"adapter.router has shape {got_router}, expected {want_router}")


LORA_METHODS = ("auto", "gather", "dense")


def lora_method(tokens: int, top_k: int, num_experts: int) -> str:
    """The product ``auto`` picks for ``tokens`` rows routed to ``top_k`` of ``num_experts``.

    * ``gather``: fewer (token, slot) pairs than experts (decode): copy only the chosen experts.
    * ``dense``: every token through all ``E`` experts, combined with weights that are zero off
      the route: one plain matmul per factor over ``E * r`` columns. Its adapter FLOPs are
      ``E / k`` times the routed ones, a few percent of the base projection's where ``E * r``
      is small next to the width (the accuracy experiment keeps ``E * r`` fixed across ``E``).

    Measured against a ragged (sorted, ``ragged_dot``) product: ``pallas/tuned.py``.
    """
    return "gather" if tokens * top_k < num_experts else "dense"


def lora_delta(
    x: jax.Array, a: jax.Array, b: jax.Array, route: Route, scale: float, method: str = "auto"
) -> jax.Array:
    """The routed LoRA term ``scale * sum_j g_j (x A[e_j]) B[e_j]`` per token (pure jnp).

    Args:
      x: ``[B, T, d_in]`` inputs (the compute dtype).
      a: ``[E, d_in, r]`` and b: ``[E, r, d_out]``: one layer's experts.
      route: ``expert_ids, gates: [B, T, k]``.
      method: ``"gather"``, ``"dense"`` (equal up to rounding) or ``"auto"`` (:func:`lora_method`).
    Returns:
      ``[B, T, d_out]`` in ``x.dtype`` (float32 accumulation).
    """
    if method not in LORA_METHODS:
        raise ValueError(f"unknown LoRA product method {method!r}; expected one of {LORA_METHODS}")
    E = a.shape[0]
    Bsz, T, _ = x.shape
    k = route.expert_ids.shape[-1]
    if method == "auto":
        method = lora_method(Bsz * T, k, E)
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    gates = route.gates * scale
    if method == "gather":
        xa = jnp.einsum("btd,btkdr->btkr", x, a[route.expert_ids], preferred_element_type=jnp.float32)
        xa = (xa * gates[..., None]).astype(x.dtype)
        y = jnp.einsum("btkr,btkro->bto", xa, b[route.expert_ids], preferred_element_type=jnp.float32)
    else:
        combine = jnp.einsum("btke,btk->bte", jax.nn.one_hot(route.expert_ids, E, dtype=jnp.float32), gates)
        xa = jnp.einsum("btd,edr->bter", x, a, preferred_element_type=jnp.float32)
        xa = (xa * combine[..., None]).astype(x.dtype)
        y = jnp.einsum("bter,ero->bto", xa, b, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
