"""One mesh for training and generation, and the one place that maps every leaf to a PartitionSpec.

Mesh axes (``jax.make_mesh``), in this order:
  * ``data``: rows of the batch.
  * ``fsdp``: weights split along their ``embed`` axis at rest (training, gathered a layer at a
    time); at inference the weights are replicated over it and it splits the batch like ``data``.
  * ``tensor``: Megatron tensor parallelism (DESIGN.md §7).

Every leaf has logical axis names (:data:`LOGICAL_AXES`, also the Flax face's metadata) and
:data:`RULES` maps a logical axis to mesh axes:

  * ``batch`` -> ``("data", "fsdp")``: rows (replicated when the batch does not divide).
  * ``heads``, ``kv_heads``, ``mlp`` -> ``"tensor"``: q/k/v and gate/up columns, o and down rows,
    the cache's KV-head axis.
  * ``vocab`` -> ``"tensor"``: an untied ``lm_head`` only (vocab-parallel logits, gathered where
    sampling reads them); the embedding table's vocab axis is never split (a lookup needs every
    row), though training splits its ``embed`` axis over ``fsdp`` like every weight's.
  * ``embed`` -> ``"fsdp"``: weights, when sharded over fsdp (training; ``shard_fsdp=True``).
  * ``layers``, ``experts``, ``rank``, ``length``, ``head_dim`` -> ``None``.

So adapters follow their projection with no table of their own: ``A [La, E, d_in, r]`` of a
column-parallel projection is replicated over ``tensor`` and its ``B`` split by output; a
row-parallel projection's ``A`` is split by input and its ``B`` replicated; routers replicated.

KV heads fewer than ``tensor`` (vLLM's rule): each KV head is replicated ``tensor / KV`` times
(:func:`expand_kv_heads`: the wk/wv columns, their biases, the adapters' k/v ``B`` and hence the
cache), giving exactly one KV head per shard; query head ``h`` still reads copy
``h // (H / tensor)`` of its own KV head ``h // (H / KV)``, on its own shard. Otherwise KV heads
must divide over ``tensor``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from loraswitch_jax.adapters import Adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.params import BIAS_FIELD, PROJECTIONS, WEIGHT_FIELD, LlamaParams

__all__ = [
    "AXES",
    "BATCH_AXES",
    "LOGICAL_AXES",
    "RULES",
    "MeshConfig",
    "MeshError",
    "adapter_specs",
    "batch_spec",
    "cache_specs",
    "check_tensor_fits",
    "expand_kv_heads",
    "kv_replicas",
    "logical_axes",
    "logical_spec",
    "param_specs",
    "shard",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
    """A mesh shape that is malformed, too large for the devices, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes ``data``, ``fsdp``, ``tensor`` (1 each: one device). Hashable."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MeshError(f"mesh axis {name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"data=2,tensor=4"`` (axes left out are 1; ``""`` is one device)."""
        sizes: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in str(text).split(","))):
            name, eq, value = item.partition("=")
            name = name.strip()
            if not eq or name not in AXES:
                raise MeshError(f"bad mesh item {item!r}: expected AXIS=SIZE with AXIS in {AXES}")
            if name in sizes:
                raise MeshError(f"mesh axis {name!r} given twice in {text!r}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh axis {name} needs an integer size, got {value.strip()!r}") from None
        return cls(**sizes)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def __str__(self) -> str:
        return ",".join(f"{n}={getattr(self, n)}" for n in AXES)

    def make_mesh(self, devices: list | None = None) -> Mesh:
        """A :class:`jax.sharding.Mesh` of these sizes over the first ``size`` devices."""
        devices = list(jax.devices()) if devices is None else list(devices)
        if self.size > len(devices):
            raise MeshError(f"mesh {self} needs {self.size} devices, but only {len(devices)} "
                            f"are visible ({devices[0].platform})")
        return _make_mesh(self.shape, tuple(devices[: self.size]))


_mesh_cache: dict[tuple, Mesh] = {}


def _make_mesh(shape: tuple[int, ...], devices: tuple) -> Mesh:
    key = (shape, devices)
    if key not in _mesh_cache:  # one Mesh object per shape: jit caches key on it
        # Auto axes: XLA places what the specs leave open (make_mesh's default is Explicit).
        _mesh_cache[key] = jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                                         devices=devices)
    return _mesh_cache[key]


# ------------------------------------------------------------------ logical axes
# "heads" is the flattened H * head_dim axis of q (and o's input), "kv_heads" KV * head_dim.
_PROJECTION_AXES = {
    "q": ("embed", "heads"),
    "k": ("embed", "kv_heads"),
    "v": ("embed", "kv_heads"),
    "o": ("heads", "embed"),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
}
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    **{WEIGHT_FIELD[p]: ("layers", *_PROJECTION_AXES[p]) for p in PROJECTIONS},
    **{BIAS_FIELD[p]: ("layers", _PROJECTION_AXES[p][1]) for p in PROJECTIONS},
    **{f"a.{p}": ("layers", "experts", _PROJECTION_AXES[p][0], "rank") for p in PROJECTIONS},
    **{f"b.{p}": ("layers", "experts", "rank", _PROJECTION_AXES[p][1]) for p in PROJECTIONS},
    "router.switch": ("embed", "experts"),
    "router.layerwise": ("layers", "embed", "experts"),
    "cache.k": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "cache.v": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "cache.lengths": ("batch",),
    "tokens": ("batch", "length"),
}

RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "embed": "fsdp",
    "layers": None,
    "experts": None,
    "rank": None,
    "length": None,
    "head_dim": None,
}
# Axes Megatron must split: a size that does not divide is an error, not a silent replica.
_MUST_SPLIT = ("heads", "kv_heads", "mlp")


def logical_axes(name: str) -> tuple[str, ...]:
    """Logical axis names of a backbone field (``"wq"``), an expert factor (``"a.q"``, ``"b.q"``),
    a router (``"router.switch"``, ``"router.layerwise"``), a cache field or ``"tokens"``."""
    if name not in LOGICAL_AXES:
        raise KeyError(f"no logical axes for {name!r}; known: {sorted(LOGICAL_AXES)}")
    return LOGICAL_AXES[name]


def _axis_size(mesh: MeshConfig, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for a in axes:
        size *= getattr(mesh, a)
    return size


def logical_spec(name: str, shape: tuple[int, ...], mesh: MeshConfig, *,
                 shard_fsdp: bool = False, split_vocab: bool = True) -> P:
    """The PartitionSpec of leaf ``name`` of ``shape`` under :data:`RULES`.

    ``shard_fsdp=False`` (inference) replicates weights over ``fsdp``; ``split_vocab=False``
    replicates the vocab axis. An optional axis (vocab, embed, batch) that its mesh axes do not
    divide is replicated; a tensor axis (heads, kv_heads, mlp) that does not divide raises.
    """
    axes = logical_axes(name)
    if len(axes) != len(shape):
        raise MeshError(f"{name} has shape {tuple(shape)}, but its logical axes are {axes}")
    out = []
    for logical, dim in zip(axes, shape):
        rule = RULES[logical]
        if (logical == "embed" and not shard_fsdp) or (logical == "vocab" and not split_vocab):
            rule = None
        n = _axis_size(mesh, rule)
        if n > 1 and dim % n:
            if logical in _MUST_SPLIT:
                raise MeshError(f"{name}: its {logical} axis ({dim}) does not divide over "
                                f"tensor={mesh.tensor}")
            rule = None
        out.append(rule if n > 1 else None)
    return P(*out)


def check_tensor_fits(cfg: LlamaConfig, mesh: MeshConfig) -> None:
    """Raise :class:`MeshError` unless heads, KV heads and the FFN split over ``mesh.tensor``."""
    t = mesh.tensor
    if cfg.num_attention_heads % t:
        raise MeshError(f"tensor={t} does not divide the {cfg.num_attention_heads} attention heads")
    if cfg.intermediate_size % t:
        raise MeshError(f"tensor={t} does not divide intermediate_size {cfg.intermediate_size}")
    kv = cfg.num_key_value_heads
    if kv % t and t % kv:
        raise MeshError(f"{kv} KV heads neither divide over tensor={t} nor divide it "
                        "(KV heads are replicated only when their count divides tensor)")


def kv_replicas(cfg: LlamaConfig, tensor: int) -> int:
    """Copies of each KV head under ``tensor``-way parallelism: ``tensor / KV`` when KV heads are
    fewer than ``tensor``, else 1."""
    kv = cfg.num_key_value_heads
    return tensor // kv if kv < tensor else 1


def _repeat_heads(x: jax.Array, axis: int, hd: int, r: int) -> jax.Array:
    """Each head (``hd`` consecutive entries of ``axis``) repeated ``r`` times in place."""
    shape, axis = x.shape, axis % x.ndim
    heads = x.reshape(*shape[:axis], shape[axis] // hd, hd, *shape[axis + 1:])
    return jnp.repeat(heads, r, axis=axis).reshape(*shape[:axis], -1, *shape[axis + 1:])


def expand_kv_heads(params: LlamaParams, adapter: Adapter | None, cfg: LlamaConfig,
                    tensor: int) -> tuple[LlamaParams, Adapter | None]:
    """Params and adapter with every KV head replicated :func:`kv_replicas` times (wk, wv, bk, bv,
    the adapters' k/v ``B``); a no-op when no replication is needed or already done.

    Replicating KV head ``j`` into copies ``j*r .. j*r+r-1`` keeps grouped-query attention exact:
    with ``H`` query heads and ``KV*r`` KV heads, query head ``h`` reads copy ``h // (H/(KV*r))``,
    a copy of ``h // (H/KV)``.
    """
    r = kv_replicas(cfg, tensor)
    hd = cfg.head_dim
    if r == 1 or params.layers.wk.shape[-1] != cfg.kv_size:
        return params, adapter
    layers = params.layers
    fields = {f: _repeat_heads(getattr(layers, f), -1, hd, r) for f in ("wk", "wv", "bk", "bv")
              if getattr(layers, f) is not None}
    params = dataclasses.replace(params, layers=dataclasses.replace(layers, **fields))
    if adapter is not None and any(p in adapter.b for p in ("k", "v")):
        b = {p: _repeat_heads(x, -1, hd, r) if p in ("k", "v") else x for p, x in adapter.b.items()}
        adapter = dataclasses.replace(adapter, b=b)
    return params, adapter


# ------------------------------------------------------------------ pytrees of specs
def param_specs(params: LlamaParams, mesh: MeshConfig, *, shard_fsdp: bool = False) -> LlamaParams:
    """A :class:`LlamaParams` of PartitionSpecs for ``params`` (KV heads already expanded).

    The embedding table's vocab axis is never split (a token lookup needs every row; with
    ``shard_fsdp`` its embed axis is, like every weight's); an untied ``lm_head``
    is split by vocab over ``tensor`` when it divides (its logits leave the step split by
    vocab and are gathered only where sampling reads them).
    """
    def spec(name, x, **kw):
        return None if x is None else logical_spec(name, x.shape, mesh, shard_fsdp=shard_fsdp, **kw)

    layers = params.layers
    layer_specs = {f.name: spec(f.name, getattr(layers, f.name))
                   for f in dataclasses.fields(layers)}
    return LlamaParams(
        embed=spec("embed", params.embed, split_vocab=False),
        layers=type(layers)(**layer_specs),
        final_norm=spec("final_norm", params.final_norm),
        lm_head=spec("lm_head", params.lm_head),
    )


def adapter_specs(adapter: Adapter, mesh: MeshConfig, *, shard_fsdp: bool = False) -> Adapter:
    """An :class:`Adapter` of PartitionSpecs: each factor follows its projection (module doc)."""
    def specs(factor, tree):
        return {p: logical_spec(f"{factor}.{p}", x.shape, mesh, shard_fsdp=shard_fsdp)
                for p, x in tree.items()}

    router = adapter.router
    if router is not None:
        name = "router.switch" if router.ndim == 2 else "router.layerwise"
        router = logical_spec(name, router.shape, mesh, shard_fsdp=shard_fsdp)
    return Adapter(config=adapter.config, a=specs("a", adapter.a), b=specs("b", adapter.b),
                   router=router)


def batch_spec(mesh: MeshConfig, batch_size: int, ndim: int = 2) -> P:
    """Rows over ``("data", "fsdp")`` when they divide ``batch_size``, else replicated."""
    rows = logical_spec("cache.lengths", (batch_size,), mesh)[0]
    return P(rows, *([None] * (ndim - 1)))


def cache_specs(cache: KVCache, mesh: MeshConfig) -> KVCache:
    """A :class:`KVCache` of PartitionSpecs: KV heads over ``tensor``, rows over the batch axes."""
    return KVCache(k=logical_spec("cache.k", cache.k.shape, mesh),
                   v=logical_spec("cache.v", cache.v.shape, mesh),
                   lengths=logical_spec("cache.lengths", cache.lengths.shape, mesh))


def shard(tree: Any, specs: Any, mesh: Mesh) -> Any:
    """``tree``'s arrays placed on ``mesh`` by the matching PartitionSpecs of ``specs``."""
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    return jax.device_put(tree, shardings)
