"""The model over a mesh: ``llama``'s entry points run per shard inside ``jax.shard_map``.

Each function here takes global arrays (placed by :func:`place`, or any placement: ``shard_map``
reshards to its specs) and a :class:`~loraswitch_jax.sharding.MeshConfig` (``mesh=``, keyword),
and runs the unchanged single-device code on each shard's local arrays with
``tensor_axis="tensor"`` (DESIGN.md §7):

* q/k/v and gate/up are column-parallel (local heads and FFN columns), o and down row-parallel:
  one ``psum`` over ``tensor`` per sub-layer, after the projection, with the row-parallel
  adapter partial ``(x_s A_s) B`` already added to ``x_s W_s`` (no extra communication) and the
  bias added once after the sum. The Pallas kernels (or XLA) see local arrays only.
* Hidden states between sub-layers are replicated over ``tensor``, so the router computes the
  same route on every shard; :func:`forward` can return each shard's routing to check it.
* The ``merge`` strategy merges per shard (SGMM on local ``W`` with local ``A``/``B``).
* Embedding replicated; an untied ``lm_head`` splits by vocab, so logits leave the step split
  by vocab and are gathered by whatever reads them (sampling); a tied one is replicated.
* Rows split over ``("data", "fsdp")`` when they divide; weights are replicated over ``fsdp`` at
  inference (gathering each layer's weights at every decode step would cost more traffic than
  the step itself), so ``fsdp`` acts as a second data axis here.
* KV heads fewer than ``tensor`` are replicated (``sharding.expand_kv_heads``); the functions
  expand unexpanded params themselves, :func:`place` does it once up front.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from loraswitch_jax import llama
from loraswitch_jax.adapters import Adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.kv_cache import init_cache as _init_cache
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.router import Routing
from loraswitch_jax.sharding import (
    MeshConfig,
    MeshError,
    adapter_specs,
    batch_spec,
    cache_specs,
    check_tensor_fits,
    expand_kv_heads,
    kv_replicas,
    param_specs,
    shard,
)
from loraswitch_jax.switch import MergedWeights
from loraswitch_jax.switch import init_merged as _init_merged

__all__ = [
    "TENSOR",
    "decode_step",
    "decode_step_merged",
    "forward",
    "init_cache",
    "init_merged",
    "merged_specs",
    "place",
    "prefill",
]

TENSOR = "tensor"


def _check(cfg: LlamaConfig, mesh: MeshConfig) -> None:
    if not isinstance(mesh, MeshConfig):
        raise MeshError(f"mesh must be a sharding.MeshConfig, got {type(mesh).__name__}")
    check_tensor_fits(cfg, mesh)


def _prepare(params, adapter, cfg, mesh):
    _check(cfg, mesh)
    params, adapter = expand_kv_heads(params, adapter, cfg, mesh.tensor)
    return params, adapter, param_specs(params, mesh), (
        None if adapter is None else adapter_specs(adapter, mesh))


def place(params: LlamaParams, adapter: Adapter | None, cfg: LlamaConfig,
          mesh: MeshConfig) -> tuple[LlamaParams, Adapter | None]:
    """``params`` and ``adapter`` with KV heads expanded for ``mesh.tensor`` and placed on the
    mesh by ``sharding.param_specs`` / ``adapter_specs``."""
    params, adapter, pspecs, aspecs = _prepare(params, adapter, cfg, mesh)
    devices = mesh.make_mesh()
    params = shard(params, pspecs, devices)
    if adapter is not None:
        adapter = shard(adapter, aspecs, devices)
    return params, adapter


def _logits_spec(pspecs: LlamaParams, rows: P, ndim: int) -> P:
    """Logits ``[B, (T,) V]``: split by vocab when the lm_head is."""
    vocab = None if pspecs.lm_head is None else pspecs.lm_head[1]
    return P(rows[0], *([None] * (ndim - 2)), vocab)


def _shard_map(f, mesh: MeshConfig, in_specs, out_specs):
    # check_vma off: pallas_call carries no varying-axes rule, and replication is by design.
    return jax.shard_map(f, mesh=mesh.make_mesh(), in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def forward(
    params: LlamaParams, tokens: jax.Array, cfg: LlamaConfig, *, mesh: MeshConfig,
    adapter: Adapter | None = None, scan_layers: bool = True, impl="xla",
    return_routing: bool = False,
) -> jax.Array | tuple[jax.Array, Routing | None]:
    """:func:`llama.forward` over ``mesh``: logits ``[B, T, V]``.

    With ``return_routing`` also each tensor shard's :class:`Routing`, stacked on a leading
    axis: ``probs [tensor, N, B, T, E]``, ``expert_ids [tensor, N, B, T, k]`` (all equal).
    """
    params, adapter, pspecs, aspecs = _prepare(params, adapter, cfg, mesh)
    rows = batch_spec(mesh, tokens.shape[0])
    routed = return_routing and adapter is not None and adapter.config.mode != "lora"

    def local(params, adapter, tokens):
        out = llama.forward(params, tokens, cfg, adapter=adapter, scan_layers=scan_layers,
                            impl=impl, return_routing=routed, tensor_axis=TENSOR)
        if not routed:
            return out
        logits, routing = out
        return logits, jax.tree.map(lambda x: x[None], routing)

    logits_spec = _logits_spec(pspecs, rows, 3)
    routing_spec = Routing(probs=P(TENSOR, None, rows[0]), expert_ids=P(TENSOR, None, rows[0]))
    out_specs = (logits_spec, routing_spec) if routed else logits_spec
    out = _shard_map(local, mesh, (pspecs, aspecs, rows), out_specs)(params, adapter, tokens)
    if return_routing and not routed:
        return out, None
    return out


def init_cache(cfg: LlamaConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16, *,
               mesh: MeshConfig) -> KVCache:
    """:func:`kv_cache.init_cache` with KV heads replicated for ``mesh.tensor`` (one KV head per
    shard at least), placed by ``sharding.cache_specs``."""
    _check(cfg, mesh)
    kv = cfg.num_key_value_heads * kv_replicas(cfg, mesh.tensor)
    cache = _init_cache(dataclasses.replace(cfg, num_key_value_heads=kv), batch_size, max_len,
                        dtype)
    return _constrain(cache, cache_specs(cache, mesh), mesh)


def _constrain(tree, specs, mesh: MeshConfig):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh.make_mesh(), s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    return jax.lax.with_sharding_constraint(tree, shardings)


def merged_specs(merged: MergedWeights, mesh: MeshConfig) -> MergedWeights:
    """A working copy splits like the weights it copies; its route is replicated."""
    from loraswitch_jax.params import WEIGHT_FIELD
    from loraswitch_jax.sharding import logical_spec

    return MergedWeights(
        weights={p: logical_spec(WEIGHT_FIELD[p], w.shape, mesh) for p, w in merged.weights.items()},
        expert_ids=P(), gates=P())


def init_merged(layers, adapter: Adapter, *, mesh: MeshConfig) -> MergedWeights:
    """:func:`switch.init_merged` placed like the weights it copies."""
    merged = _init_merged(layers, adapter)
    return _constrain(merged, merged_specs(merged, mesh), mesh)


def prefill(
    params: LlamaParams, cache: KVCache, tokens: jax.Array, lengths: jax.Array,
    cfg: LlamaConfig, *, mesh: MeshConfig, adapter: Adapter | None = None, impl="xla",
    chunk: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """:func:`llama.prefill` over ``mesh``; ``cache`` from :func:`init_cache`."""
    params, adapter, pspecs, aspecs = _prepare(params, adapter, cfg, mesh)
    rows = batch_spec(mesh, tokens.shape[0])
    cspecs = cache_specs(cache, mesh)
    f = functools.partial(llama.prefill, cfg=cfg, impl=impl, chunk=chunk, tensor_axis=TENSOR)

    def local(params, cache, tokens, lengths, adapter):
        return f(params, cache, tokens, lengths, adapter=adapter)

    return _shard_map(local, mesh, (pspecs, cspecs, rows, P(rows[0]), aspecs),
                      (_logits_spec(pspecs, rows, 2), cspecs))(
        params, cache, tokens, lengths, adapter)


def decode_step(
    params: LlamaParams, cache: KVCache, tokens: jax.Array, cfg: LlamaConfig, *,
    mesh: MeshConfig, adapter: Adapter | None = None, impl="auto",
) -> tuple[jax.Array, KVCache]:
    """:func:`llama.decode_step` over ``mesh``."""
    params, adapter, pspecs, aspecs = _prepare(params, adapter, cfg, mesh)
    rows = batch_spec(mesh, tokens.shape[0], 1)
    cspecs = cache_specs(cache, mesh)

    def local(params, cache, tokens, adapter):
        return llama.decode_step(params, cache, tokens, cfg, adapter=adapter, impl=impl,
                                 tensor_axis=TENSOR)

    return _shard_map(local, mesh, (pspecs, cspecs, rows, aspecs),
                      (_logits_spec(pspecs, rows, 2), cspecs))(params, cache, tokens, adapter)


def decode_step_merged(
    params: LlamaParams, cache: KVCache, merged: MergedWeights, tokens: jax.Array,
    cfg: LlamaConfig, *, mesh: MeshConfig, adapter: Adapter, impl="auto",
) -> tuple[jax.Array, KVCache, MergedWeights]:
    """:func:`llama.decode_step_merged` over ``mesh``: each shard merges its local weights."""
    params, adapter, pspecs, aspecs = _prepare(params, adapter, cfg, mesh)
    rows = batch_spec(mesh, tokens.shape[0], 1)
    cspecs, mspecs = cache_specs(cache, mesh), merged_specs(merged, mesh)

    def local(params, cache, merged, tokens, adapter):
        return llama.decode_step_merged(params, cache, merged, tokens, cfg, adapter=adapter,
                                        impl=impl, tensor_axis=TENSOR)

    return _shard_map(local, mesh, (pspecs, cspecs, mspecs, rows, aspecs),
                      (_logits_spec(pspecs, rows, 2), cspecs, mspecs))(
        params, cache, merged, tokens, adapter)
