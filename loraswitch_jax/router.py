"""Routes: which ``k`` experts each token uses and with what gate weights.

A route is computed by a linear router on a normalised hidden state: ``logits = x @ router``
(float32), the top ``k`` logits pick the experts, and the gates are a softmax over those ``k``
logits only (so they sum to one however many experts there are). No bias, no noise. Balance is
encouraged by the Switch-Transformer auxiliary loss on the full softmax over all ``E`` experts.

In ``switch`` mode one route per token is computed once and used by every adapted projection of
every layer; in ``layerwise`` mode each layer computes its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Route", "Routing", "balance_loss", "compute_route", "constant_route", "expert_usage"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Route:
    """``expert_ids [..., k] int32`` and ``gates [..., k] float32``, one row per token."""

    expert_ids: jax.Array
    gates: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """What the routers decided in a forward pass, for the balance loss and usage statistics.

    ``probs [N, B, T, E]`` (softmax over all experts) and ``expert_ids [N, B, T, k]``, where ``N``
    is 1 in switch mode (one route per token) and the number of adapted layers in layerwise mode.
    """

    probs: jax.Array
    expert_ids: jax.Array


def compute_route(x: jax.Array, router: jax.Array, k: int) -> tuple[Route, jax.Array]:
    """Route tokens ``x [..., d]`` with ``router [d, E]``; returns the route and ``probs [..., E]``."""
    logits = jnp.einsum(
        "...d,de->...e", x.astype(jnp.float32), router.astype(jnp.float32)
    )
    top_logits, expert_ids = jax.lax.top_k(logits, k)
    gates = jax.nn.softmax(top_logits, axis=-1)
    return Route(expert_ids.astype(jnp.int32), gates), jax.nn.softmax(logits, axis=-1)


def constant_route(shape: tuple[int, ...]) -> Route:
    """Every token on expert 0 with gate 1: a single LoRA as a one-expert mixture."""
    return Route(jnp.zeros((*shape, 1), jnp.int32), jnp.ones((*shape, 1), jnp.float32))


def expert_usage(expert_ids: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of (token, slot) assignments per expert, ``[..., E]`` over the token axes.

    ``expert_ids [N, B, T, k]`` and ``mask [B, T]`` (1 for tokens that count) give ``[N, E]``.
    """
    one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32).sum(-2)  # [N, B, T, E]
    if mask is None:
        mask = jnp.ones(expert_ids.shape[1:3], jnp.float32)
    mask = mask.astype(jnp.float32)[None, :, :, None]
    total = jnp.maximum(mask.sum((1, 2)) * expert_ids.shape[-1], 1.0)
    return (one_hot * mask).sum((1, 2)) / total


def balance_loss(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer load-balancing loss, averaged over routers: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of assignments to expert ``e`` (not differentiable), ``P_e`` its mean
    router probability (differentiable). It is 1 when routing is uniform, ``E`` when collapsed.
    """
    num_experts = routing.probs.shape[-1]
    f = expert_usage(routing.expert_ids, num_experts, mask)  # [N, E]
    if mask is None:
        mask = jnp.ones(routing.probs.shape[1:3], jnp.float32)
    m = mask.astype(jnp.float32)[None, :, :, None]
    p = (routing.probs * m).sum((1, 2)) / jnp.maximum(m.sum((1, 2)), 1.0)  # [N, E]
    return num_experts * jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))
