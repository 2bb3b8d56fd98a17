"""How a ``switch`` adapter runs at decode: the ``fused`` and ``merge`` strategies.

* ``fused``: every adapted projection adds its routed LoRA term itself, ``x W + scale sum_j g_j
  (x A[e_j]) B[e_j]`` (the routed Pallas kernels on a GPU, where ``W`` is read once; jnp
  elsewhere). Works at any batch size: each row has its own route.
* ``merge``: LoRA-Switch's SGMM. When a token's route differs from the one merged in, one kernel
  launch per projection writes ``W' = W + scale sum_j g_j A[e_j] B[e_j]`` for every adapted layer
  into a working copy of the weights; the decode step is then the plain dense step over ``W'``.
  It always merges from the pristine base, so any number of switches equals a fresh merge (no
  drift), and it skips the merge when the route repeats. One route per step: batch 1 only. It
  costs a second copy of the adapted weights in memory and, per route change, a read of ``W``
  and a write of ``W'``: about two decode steps of bytes (DESIGN.md §2).

``fused`` is the default: with routes changing every step it measured 1.131x the backbone at
batch 1 against 2.751x for ``merge`` (``pallas/tuned.py``); ``merge`` can win only where routes
rarely change.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from loraswitch_jax import ops
from loraswitch_jax.adapters import Adapter
from loraswitch_jax.ops import Impl
from loraswitch_jax.params import WEIGHT_FIELD, LayerParams

__all__ = [
    "STRATEGIES",
    "MergedWeights",
    "init_merged",
    "merge_route",
    "merged_layers",
    "resolve_strategy",
]

STRATEGIES = ("fused", "merge")


def resolve_strategy(strategy: str, batch_size: int) -> str:
    """``strategy`` checked for ``batch_size`` sequences: ``"fused"`` or ``"merge"`` (batch 1)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown switch strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "merge" and batch_size != 1:
        raise ValueError(
            f"switch strategy 'merge' serves one route per step (batch size 1), got batch size "
            f"{batch_size}: the rows of a batch route to different experts; use 'fused'"
        )
    return strategy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergedWeights:
    """The working copy of the adapted weights and the route merged into it.

    ``weights[proj] [L, K, N]``: layers from the adapter's first layer on hold ``W'``, earlier
    layers the base weights. ``expert_ids [k]`` (``-1`` before the first merge) and
    ``gates [k]`` are the merged route.
    """

    weights: dict[str, jax.Array]
    expert_ids: jax.Array
    gates: jax.Array


def init_merged(layers: LayerParams, adapter: Adapter) -> MergedWeights:
    """A working copy of the adapted projections' weights, with no route merged in yet."""
    k = adapter.config.top_k
    return MergedWeights(
        weights={p: jnp.copy(layers.weight(p)) for p in adapter.config.targets},
        expert_ids=jnp.full((k,), -1, jnp.int32),
        gates=jnp.zeros((k,), jnp.float32),
    )


def merge_route(
    merged: MergedWeights,
    layers: LayerParams,
    adapter: Adapter,
    expert_ids: jax.Array,
    gates: jax.Array,
    impl: Impl,
) -> MergedWeights:
    """Merge the route ``expert_ids, gates [k]`` (one token's) into the working copy, from the
    pristine base in ``layers``; nothing is written when it equals the route merged in.

    The skip is a flag inside the merge kernel, not a ``lax.cond`` around it: inside the decode
    loop a ``cond`` makes XLA copy the whole working copy on every step (both branches must
    produce a buffer it can alias), which costs what a merge costs."""
    acfg = adapter.config
    expert_ids = expert_ids.astype(jnp.int32)
    gates = gates.astype(jnp.float32)
    changed = jnp.any(expert_ids != merged.expert_ids) | jnp.any(gates != merged.gates)
    weights = {
        p: ops.switch_merge(layers.weight(p), merged.weights[p], adapter.a[p], adapter.b[p],
                            expert_ids, gates * acfg.scale, acfg.first_layer, changed, impl)
        for p in acfg.targets
    }
    return MergedWeights(weights=weights, expert_ids=expert_ids, gates=gates)


def merged_layers(layers: LayerParams, merged: MergedWeights) -> LayerParams:
    """``layers`` with the adapted projections' weights read from the working copy."""
    return dataclasses.replace(
        layers, **{WEIGHT_FIELD[p]: w for p, w in merged.weights.items()}
    )
