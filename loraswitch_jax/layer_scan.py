"""The decoder's layer loop: scanned or unrolled, rematerialised by policy, and FSDP per layer.

:func:`layer_range` runs a layer function over a span of layers, under ``lax.scan`` or unrolled,
each layer wrapped in ``jax.checkpoint`` by a :data:`REMAT_POLICIES` entry.

FSDP (training on a mesh whose ``fsdp`` axis splits the weights at rest, ``train.placement``):
:func:`gather_layer` cuts one layer out of the stacked backbone and adapter and all-gathers it
over ``fsdp`` (keeping ``tensor``) per shard in a ``shard_map``, so each scanned layer
gathers only its own weights, in the forward and again in the backward, never the ``[L, ...]``
stack; :func:`constrain_rows` keeps the hidden states split by rows over ``(data, fsdp)``.
The gathered weights are never saved for the backward (:func:`remat_policy`): with ``remat``
``"none"`` every activation is kept but the weights' slices and gathers are redone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from loraswitch_jax.adapters import Adapter
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.params import LayerParams
from loraswitch_jax.sharding import AXES, MeshConfig, batch_spec, logical_axes, logical_spec

__all__ = ["GATHERED", "REMAT_POLICIES", "at_rest_spec", "check_fsdp_mesh", "constrain_rows",
           "gather_layer", "gathers", "layer_range", "remat_policy"]

# What the backward pass keeps of each layer's forward: everything ("none": no remat), the
# outputs of weight matmuls ("dots"; attention and elementwise work is recomputed) or only the
# layer's input ("full": the whole layer is recomputed).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

GATHERED = "fsdp_gathered"  # checkpoint_name of one layer's all-gathered weights
# Layout work: the slices, casts and gathers that turn the stacked weights into one layer's
# operands. Recomputed, never saved, under "none" with FSDP (cheap: no arithmetic).
_LAYOUT_PRIMS = frozenset({"slice", "dynamic_slice", "squeeze", "reshape", "expand_dims",
                           "broadcast_in_dim", "transpose", "convert_element_type", "copy",
                           "all_gather", "shard_map"})


def _keep_all_but_weights(prim, *_, **params) -> bool:
    # "none" under FSDP: every activation, but no layer's weights (that would stack all layers).
    if prim.name == "name":
        return params.get("name") != GATHERED
    return prim.name not in _LAYOUT_PRIMS


def remat_policy(remat: str, fsdp: bool) -> Callable | None:
    """The ``jax.checkpoint`` policy of ``remat``; ``None``: no checkpoint at all.

    Under FSDP (``fsdp``) every policy leaves out the gathered weights, so the backward gathers
    each layer again instead of keeping ``L`` gathered layers alive; ``"none"`` becomes "every
    result of arithmetic": layout work (slices, reshapes, casts, gathers) is redone, so no
    gathered weight nor a view of one is kept. ``"dots"`` and ``"full"`` never save them.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; expected one of {tuple(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[remat]
    return _keep_all_but_weights if fsdp and policy is None else policy


def check_fsdp_mesh(mesh: Mesh | None) -> None:
    """Refuse an ``fsdp_mesh`` that is not a :class:`jax.sharding.Mesh` of axes ``AXES``."""
    if mesh is None:
        return
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        raise ValueError(f"fsdp_mesh must be a jax.sharding.Mesh with axes {AXES} "
                         f"(sharding.MeshConfig.make_mesh), got {mesh!r}")


def gathers(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` splits weights over ``fsdp`` (its size > 1), so layers gather them."""
    return mesh is not None and mesh.shape["fsdp"] > 1


def _mesh_config(mesh: Mesh) -> MeshConfig:
    return MeshConfig(**{a: mesh.shape[a] for a in AXES})


def at_rest_spec(name: str, shape: tuple[int, ...], mc: MeshConfig) -> P:
    """Where training keeps leaf ``name`` between steps: ``sharding.logical_spec`` with weights
    over ``fsdp``; an adapter factor whose ``embed`` axis is not split over ``fsdp`` (``B`` of
    q/k/v/gate/up, ``A`` of o/down: their other axis belongs to ``tensor``) splits its ``rank``
    axis over ``fsdp`` instead, when it divides, so that it and its optimizer moments shrink too.
    """
    spec = logical_spec(name, shape, mc, shard_fsdp=True)
    axes = logical_axes(name)
    if mc.fsdp > 1 and "rank" in axes and "fsdp" not in spec:
        i = axes.index("rank")
        if shape[i] % mc.fsdp == 0:
            spec = P(*spec[:i], "fsdp", *spec[i + 1:])
    return spec


def _gathered(x: jax.Array, name: str, start: int | jax.Array, mesh: Mesh) -> jax.Array:
    """``x[start : start + 1]`` replicated over ``fsdp`` (split over ``tensor`` as at rest).

    Sliced and all-gathered per shard (``shard_map``): the partitioner, left to choose, would
    gather the whole ``[L, ...]`` stack once and slice it, outside the loop.
    """
    mc = _mesh_config(mesh)
    at_rest = at_rest_spec(name, x.shape, mc)
    start = jnp.asarray(start, jnp.int32)
    if "fsdp" not in at_rest:  # too small to split: already whole on every device
        one = jax.lax.dynamic_slice_in_dim(x, start, 1, axis=0)
    else:
        axis = tuple(at_rest).index("fsdp")

        def local(x, start):
            one = jax.lax.dynamic_slice_in_dim(x, start, 1, axis=0)
            return jax.lax.all_gather(one, "fsdp", axis=axis, tiled=True)

        whole = logical_spec(name, x.shape, mc, shard_fsdp=False)
        # check_vma off: all_gather leaves its output typed as varying over fsdp (JAX 0.10).
        one = jax.shard_map(local, mesh=mesh, in_specs=(at_rest, P()), out_specs=whole,
                            check_vma=False)(x, start)
    return checkpoint_name(one, GATHERED)


def gather_layer(layers: LayerParams, adapter: Adapter | None, layer: int | jax.Array,
                 mesh: Mesh) -> tuple[LayerParams, Adapter | None]:
    """Layer ``layer`` of the backbone and of the adapter, gathered over ``fsdp``.

    Returns one-layer views: every ``[L, ...]`` leaf of ``layers`` becomes its ``[1, ...]``
    slice at ``layer`` and every adapter factor (and a layerwise router) its slice at
    ``layer - first_layer``, the adapter's config moved to ``router_layer=0``; the layer
    function then reads both at index 0. A switch router (not per layer) is passed unchanged.
    """
    fields = {f.name: getattr(layers, f.name) for f in dataclasses.fields(layers)}
    one_layers = type(layers)(**{n: None if x is None else _gathered(x, n, layer, mesh)
                                 for n, x in fields.items()})
    if adapter is None:
        return one_layers, None
    acfg = adapter.config
    adapted = layer - acfg.first_layer
    router = adapter.router
    if router is not None and router.ndim == 3:
        router = _gathered(router, "router.layerwise", adapted, mesh)
    one_adapter = Adapter(
        config=dataclasses.replace(acfg, router_layer=0),
        a={p: _gathered(x, f"a.{p}", adapted, mesh) for p, x in adapter.a.items()},
        b={p: _gathered(x, f"b.{p}", adapted, mesh) for p, x in adapter.b.items()},
        router=router,
    )
    return one_layers, one_adapter


def constrain_rows(h: jax.Array, mesh: Mesh) -> jax.Array:
    """``h [B, T, d]`` split by rows over ``(data, fsdp)`` (replicated when they do not divide)."""
    spec = batch_spec(_mesh_config(mesh), h.shape[0], ndim=h.ndim)
    return jax.lax.with_sharding_constraint(h, NamedSharding(mesh, spec))


def layer_range(
    step: Callable[[jax.Array, KVCache | None, int | jax.Array], tuple],
    span: range,
    h: jax.Array,
    cache: KVCache | None,
    scan_layers: bool,
    remat: str = "none",
    fsdp: bool = False,
) -> tuple[jax.Array, KVCache | None, tuple[jax.Array, jax.Array] | None]:
    """Layers ``span`` in order through ``step(h, cache, layer) -> (h, cache, routing)``, scanned
    or unrolled; stacks the layerwise routing outputs. ``remat`` names a ``REMAT_POLICIES`` entry
    applied to each layer; ``fsdp``: ``step`` gathers its weights (:func:`remat_policy`)."""
    if not span:
        return h, cache, None
    policy = remat_policy(remat, fsdp)
    if remat != "none" or fsdp:
        # The layer index stays static when unrolled, so weights are still sliced in place.
        step = jax.checkpoint(step, policy=policy, static_argnums=() if scan_layers else (2,))

    if scan_layers:

        def body(carry, layer):
            h, cache, routing = step(*carry, layer)
            return (h, cache), routing

        (h, cache), routing = jax.lax.scan(
            body, (h, cache), jnp.arange(span.start, span.stop, dtype=jnp.int32)
        )
        return h, cache, routing
    outputs = []
    for layer in span:
        h, cache, routing = step(h, cache, layer)
        outputs.append(routing)
    if outputs[0] is None:
        return h, cache, None
    return h, cache, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
