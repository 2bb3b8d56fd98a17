"""Token samplers: greedy, temperature, top-k and top-p (nucleus), as one frozen config."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

__all__ = ["Sampler", "sample"]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to pick the next token. ``temperature=0`` is greedy (argmax).

    ``top_k=0`` and ``top_p=1`` switch those filters off; both may be combined.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # NaN passes every comparison check as False: test finiteness first (NaN gave token 0).
        if not _is_real(self.temperature) or not self.temperature >= 0:
            raise ValueError(
                f"Sampler.temperature must be a finite number >= 0, got {self.temperature!r}"
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"Sampler.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"Sampler.top_p must be a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sample(logits: jax.Array, key: jax.Array, sampler: Sampler) -> jax.Array:
    """Pick one token per row of ``logits [B, V]``; returns ``[B]`` int32."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampler.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampler.top_k:
        kth = jax.lax.top_k(logits, min(sampler.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampler.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        keep = cumulative - jax.nn.softmax(sorted_logits, axis=-1) < sampler.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
