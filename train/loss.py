"""Training losses: masked next-token cross-entropy and the router balance term."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_cross_entropy"]


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over the tokens that count, and their number.

    Args:
      logits: ``[B, T, V]`` float32.
      targets: ``[B, T]`` int32 next tokens.
      mask: ``[B, T]``, 1 where the target counts (not padding, not prompt, not a packing seam).
    Returns:
      ``(sum of -log p(target) over counted tokens, number of counted tokens)``, both float32
      scalars; sums (not means) so that gradient accumulation over micro-batches is exact.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)
