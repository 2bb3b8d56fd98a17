"""Where a training run's arrays live on the mesh (``data``, ``fsdp``, ``tensor``).

The rules are ``loraswitch_jax.sharding``'s, with weights split over ``fsdp`` (``shard_fsdp``):
the frozen backbone by its logical axes (``embed`` over ``fsdp``, heads / FFN columns over
``tensor``), the adapter by its projection's axes (and ``rank`` over ``fsdp`` where ``embed``
is not: ``layer_scan.at_rest_spec``), every optimizer-state leaf shaped like the
adapter leaf it tracks (Adam's moments) like that leaf, other leaves (step, counts, rng)
replicated, and the batch's rows over ``(data, fsdp)``. The jitted step is given the mesh: each
scanned layer all-gathers its own weights over ``fsdp`` (``loraswitch_jax.layer_scan``), in the
forward and again in the backward, and XLA's SPMD partitioner adds the gradients' reductions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.adapters import Adapter
from loraswitch_jax.layer_scan import at_rest_spec
from loraswitch_jax.sharding import MeshConfig, MeshError, batch_spec, check_tensor_fits, param_specs
from loraswitch_jax.train.step import STEP_STATIC, _train_step, eval_step

__all__ = ["Placement", "plan_placement"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """NamedShardings of a run's trees on ``mesh``.

    Attributes:
      mesh_config: the axis sizes.
      mesh: the :class:`jax.sharding.Mesh`.
      params: a :class:`LlamaParams` of shardings (the frozen backbone).
      state: a ``TrainState`` of shardings (adapter, optimizer state, step, rng).
      batch: the train batch's ``[A, B, T]`` leaves (rows over ``data`` and ``fsdp``).
      eval_batch: the eval batch's ``[B, T]`` leaves.
      replicated: scalars and metrics.
    """

    mesh_config: MeshConfig
    mesh: Mesh
    params: LlamaParams
    state: object
    batch: NamedSharding
    eval_batch: NamedSharding
    replicated: NamedSharding

    @functools.cached_property
    def train_step(self):
        """``train.step.train_step`` jitted for this mesh (bound as its ``mesh``: layers gather
        their weights over ``fsdp``): the new state comes out in the shardings of :attr:`state`
        (so it is donated and fed back as is), metrics replicated. The inputs must be placed
        already (:attr:`params`, :attr:`state`, :meth:`put_batch`): jit reads their shardings
        (it takes no ``in_shardings`` beside keyword arguments)."""
        leaves, treedef = jax.tree.flatten(self.state)
        return _jit_step(treedef, tuple(leaves), self.replicated, self.mesh)

    @functools.cached_property
    def eval_step(self):
        """``train.step.eval_step`` with this mesh bound (layers gather over ``fsdp``)."""
        return functools.partial(eval_step, mesh=self.mesh)

    def put_batch(self, batch: dict) -> dict:
        """A host train batch (``[A, B, T]`` leaves) on the mesh."""
        return jax.device_put(batch, self.batch)

    def put_eval_batch(self, batch: dict) -> dict:
        """A host eval batch (``[B, T]`` leaves) on the mesh."""
        return jax.device_put(batch, self.eval_batch)


@functools.lru_cache(maxsize=16)
def _jit_step(treedef, state_leaves: tuple, replicated: NamedSharding, mesh: Mesh):
    # One jitted step per mesh and state layout: runs on the same mesh share its compilations.
    return jax.jit(functools.partial(_train_step, mesh=mesh),
                   static_argnames=tuple(n for n in STEP_STATIC if n != "mesh"),
                   donate_argnums=(0,), out_shardings=(treedef.unflatten(state_leaves), replicated))


def _named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def _key_names(path) -> tuple:
    # GetAttrKey, DictKey and SequenceKey as plain names: a moment in a dict matches the adapter.
    return tuple(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _adapter_specs(adapter: Adapter, mc: MeshConfig) -> Adapter:
    """An Adapter of PartitionSpecs (``layer_scan.at_rest_spec``: its projection's axes, and
    ``rank`` over ``fsdp`` where ``embed`` is not)."""
    router = adapter.router
    if router is not None:
        name = "router.switch" if router.ndim == 2 else "router.layerwise"
        router = at_rest_spec(name, router.shape, mc)
    return Adapter(config=adapter.config,
                   a={p: at_rest_spec(f"a.{p}", x.shape, mc) for p, x in adapter.a.items()},
                   b={p: at_rest_spec(f"b.{p}", x.shape, mc) for p, x in adapter.b.items()},
                   router=router)


def _state_specs(state, mc: MeshConfig):
    """A TrainState of PartitionSpecs: the adapter by :func:`_adapter_specs`; an optimizer-state leaf
    whose path ends with an adapter leaf's path and whose shape is that leaf's (Adam's moments,
    or any optimizer's per-parameter state, whatever container holds it) by that leaf's spec;
    every other leaf (step, counts, rng, statistics of another shape) replicated."""
    specs = jax.tree_util.tree_flatten_with_path(
        _adapter_specs(state.adapter, mc), is_leaf=lambda s: isinstance(s, P))[0]
    shapes = [x.shape for _, x in jax.tree_util.tree_flatten_with_path(state.adapter)[0]]
    by_path = {_key_names(path): (tuple(shape), spec)
               for (path, spec), shape in zip(specs, shapes)}

    def spec(path, x):
        names = _key_names(path)
        for n in range(len(names), 0, -1):  # the longest adapter path that ends this one
            match = by_path.get(names[-n:])
            if match is not None and match[0] == tuple(x.shape):
                return match[1]
        return P()

    return jax.tree_util.tree_map_with_path(spec, state)


def plan_placement(mc: MeshConfig, cfg: LlamaConfig, params: LlamaParams, state,
                   batch_size: int, *, devices: list | None = None) -> Placement:
    """Shardings of ``params`` and the train ``state`` (arrays or shape structs) on mesh ``mc``.

    Raises :class:`MeshError` when the mesh needs more devices than are visible, when ``tensor``
    does not divide the heads, KV heads or FFN width, or when ``data * fsdp`` does not divide
    ``batch_size``.
    """
    check_tensor_fits(cfg, mc)
    if cfg.num_key_value_heads % mc.tensor:
        raise MeshError(f"training splits KV heads over tensor: tensor={mc.tensor} does not "
                        f"divide the {cfg.num_key_value_heads} KV heads")
    rows = mc.data * mc.fsdp
    if batch_size % rows:
        raise MeshError(f"batch_size {batch_size} is not divisible by data * fsdp = {rows} "
                        f"(mesh {mc})")
    mesh = mc.make_mesh(devices)
    row_spec = batch_spec(mc, batch_size, ndim=2)
    return Placement(
        mesh_config=mc,
        mesh=mesh,
        params=_named(mesh, param_specs(params, mc, shard_fsdp=True)),
        state=_named(mesh, _state_specs(state, mc)),
        batch=NamedSharding(mesh, P(None, *row_spec)),
        eval_batch=NamedSharding(mesh, row_spec),
        replicated=NamedSharding(mesh, P()),
    )
