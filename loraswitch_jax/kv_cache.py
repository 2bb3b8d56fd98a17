"""A preallocated key/value cache with per-sequence lengths.

Slot ``s`` of sequence ``b`` holds the token at position ``s``; ``lengths[b]`` counts the valid
slots. A batch of prompts of different lengths is right-padded: padding writes slots past
``lengths[b]``, which are masked and then overwritten by the next real tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from loraswitch_jax.config import LlamaConfig

__all__ = ["KVCache", "init_cache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, KV, hd]
    v: jax.Array  # [L, B, S, KV, hd]
    lengths: jax.Array  # [B] int32, valid slots per sequence

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: LlamaConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
    if max_len <= 0 or batch_size <= 0:
        raise ValueError(f"cache needs positive sizes, got {batch_size=}, {max_len=}")
    if max_len > cfg.max_position_embeddings:
        raise ValueError(
            f"cache length {max_len} exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    shape = (cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )
