"""Training losses: masked next-token cross-entropy, whole or a chunk of tokens at a time.

:func:`token_cross_entropy` takes the ``[B, T, V]`` float32 logits: the reference. At Llama 3's
vocabulary (V = 128256) they are 1 GiB per 2048-token row, and the backward holds their softmax
and its gradient beside them. :func:`chunked_cross_entropy` takes the final-normed hidden states
and the LM head instead and scans over chunks of positions: each chunk's logits, logsumexp and
target logit are computed under ``jax.checkpoint``, so neither pass holds more than one chunk's
``[B, c, V]`` logits (the backward recomputes them). Both return sums, not means, so gradient
accumulation over micro-batches stays exact (``train.step``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["chunk_positions", "chunked_cross_entropy", "token_cross_entropy"]


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


def chunk_positions(chunk: int, rows: int, length: int) -> int:
    """Positions per chunk of :func:`chunked_cross_entropy`: ``chunk`` tokens over ``rows`` rows,
    at least one position and at most the rows' ``length`` (a chunk holds at most
    ``max(chunk, rows)`` tokens)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"loss_chunk must be an integer >= 1, got {chunk!r}")
    return min(length, max(1, chunk // rows))


def chunked_cross_entropy(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    mask: jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`token_cross_entropy` of ``head(hidden)``, never holding all ``[B, T, V]`` logits.

    The positions are cut into chunks of ``c = chunk_positions(chunk, B, T)`` columns, every row
    at once (rows split over devices stay split; each chunk holds about ``chunk`` tokens). When
    ``c`` does not divide ``T`` the last chunk is padded with masked positions (zero hidden
    states, target 0), which add nothing to the sum or its gradient.

    Args:
      hidden: ``[B, T, d]`` final-normed hidden states (``forward(..., return_hidden=True)``).
      head: maps ``[..., d]`` hidden states to float32 logits ``[..., V]``
        (``functools.partial(loraswitch_jax.llama.lm_head, params)``).
      targets: ``[B, T]`` int32 next tokens.
      mask: ``[B, T]``, 1 where the target counts.
      chunk: tokens per chunk (``TrainConfig.loss_chunk``).
    Returns:
      ``(summed cross-entropy over counted tokens, number of counted tokens)``, float32 scalars
      equal to :func:`token_cross_entropy`'s (up to float rounding), as is their gradient.

    Raises:
      ValueError: ``chunk`` is not an integer >= 1, or the shapes disagree.
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"need hidden [B, T, d], targets and mask [B, T]; got {hidden.shape=}, "
                         f"{targets.shape=}, {mask.shape=}")
    B, T, d = hidden.shape
    c = chunk_positions(chunk, B, T)
    n = -(-T // c)
    mask = mask.astype(jnp.float32)
    if n * c != T:  # masked padding: its loss is multiplied by 0, its gradient is 0
        pad = ((0, 0), (0, n * c - T))
        hidden = jnp.pad(hidden, (*pad, (0, 0)))
        targets, weights = jnp.pad(targets, pad), jnp.pad(mask, pad)
    else:
        weights = mask

    def cut(x):  # [B, n*c, ...] -> [n, B, c, ...]: the scan runs over the leading chunk axis
        return jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # the backward recomputes this chunk's logits instead of saving them
    def one(h, t, w):
        logits = head(h).astype(jnp.float32)  # [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target) * w)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), (cut(hidden), cut(targets), cut(weights)))
    return total, jnp.sum(mask)
