"""Llama parameters as pytrees with a stacked layer axis.

Orientation: every projection is stored ``[in, out]`` (``y = x @ w``), the transpose of Hugging
Face's ``[out, in]``; the stacked layer axis comes first: ``wq [L, d, H*hd]``. Kernels and XLA read
a layer as ``w[l]`` by a static (or, in Pallas, a data) index, never by copying it out.
Biases are ``None`` when the config has none, so they add no leaves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from loraswitch_jax.config import LlamaConfig

__all__ = [
    "LayerParams",
    "LlamaParams",
    "PROJECTIONS",
    "WEIGHT_FIELD",
    "BIAS_FIELD",
    "check_params",
    "floating_dtype",
    "init_params",
    "projection_shape",
]

# The seven adaptable projections, by the names used everywhere in this library.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """All decoder layers, stacked on axis 0 (``L``)."""

    attn_norm: jax.Array  # [L, d]
    wq: jax.Array  # [L, d, H*hd]
    wk: jax.Array  # [L, d, KV*hd]
    wv: jax.Array  # [L, d, KV*hd]
    wo: jax.Array  # [L, H*hd, d]
    mlp_norm: jax.Array  # [L, d]
    w_gate: jax.Array  # [L, d, f]
    w_up: jax.Array  # [L, d, f]
    w_down: jax.Array  # [L, f, d]
    bq: jax.Array | None = None  # [L, H*hd]
    bk: jax.Array | None = None  # [L, KV*hd]
    bv: jax.Array | None = None  # [L, KV*hd]
    bo: jax.Array | None = None  # [L, d]
    b_gate: jax.Array | None = None  # [L, f]
    b_up: jax.Array | None = None  # [L, f]
    b_down: jax.Array | None = None  # [L, d]

    def weight(self, proj: str) -> jax.Array:
        """The stacked weight of projection ``proj`` (one of PROJECTIONS)."""
        return getattr(self, WEIGHT_FIELD[proj])

    def bias(self, proj: str) -> jax.Array | None:
        return getattr(self, BIAS_FIELD[proj])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LlamaParams:
    embed: jax.Array  # [V, d]
    layers: LayerParams
    final_norm: jax.Array  # [d]
    lm_head: jax.Array | None  # [d, V]; None when tied to embed

    @property
    def dtype(self):
        return self.embed.dtype

    def output_embedding(self) -> jax.Array:
        """The ``[d, V]`` output projection (the embedding's transpose when tied)."""
        return self.embed.T if self.lm_head is None else self.lm_head


WEIGHT_FIELD = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
BIAS_FIELD = {"q": "bq", "k": "bk", "v": "bv", "o": "bo", "gate": "b_gate", "up": "b_up", "down": "b_down"}


def projection_shape(cfg: LlamaConfig, proj: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of one projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "q": (d, cfg.q_size),
        "k": (d, cfg.kv_size),
        "v": (d, cfg.kv_size),
        "o": (cfg.q_size, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }
    if proj not in shapes:
        raise ValueError(f"unknown projection {proj!r}; expected one of {PROJECTIONS}")
    return shapes[proj]


def floating_dtype(dtype, where: str) -> jnp.dtype:
    """``dtype`` as a JAX dtype; ValueError unless it is floating (integer weights round to 0)."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{where} must be a floating dtype, got {dtype!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{where} must be a floating dtype such as bfloat16 or float32, got {dtype.name}"
        )
    return dtype


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...] | None]:
    """Leaf path (``"layers.wq"``) -> the shape ``cfg`` gives it (``None``: the leaf is absent)."""
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    shapes = {"embed": (V, d), "final_norm": (d,),
              "lm_head": None if cfg.tie_word_embeddings else (d, V),
              "layers.attn_norm": (L, d), "layers.mlp_norm": (L, d)}
    for p in PROJECTIONS:
        d_in, d_out = projection_shape(cfg, p)
        shapes[f"layers.{WEIGHT_FIELD[p]}"] = (L, d_in, d_out)
        bias = cfg.attention_bias if p in ("q", "k", "v", "o") else cfg.mlp_bias
        shapes[f"layers.{BIAS_FIELD[p]}"] = (L, d_out) if bias else None
    return shapes


def check_params(params: LlamaParams, cfg: LlamaConfig) -> None:
    """Raise ValueError naming the first leaf whose shape (or presence) does not fit ``cfg``."""
    for path, want in expected_shapes(cfg).items():
        owner = params
        for part in path.split("."):
            owner = getattr(owner, part)
        got = None if owner is None else tuple(owner.shape)
        if got != want:
            raise ValueError(
                f"params.{path} has shape {got}, but the config expects {want} "
                f"(None: no such leaf); were the params made for another config?"
            )


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16, std: float = 0.02) -> LlamaParams:
    """Random weights (normal, ``std``), unit norms, zero biases; for tests, demos and benchmarks.

    Raises:
      ValueError: ``dtype`` is not floating.
    """
    dtype = floating_dtype(dtype, "init_params dtype")
    L = cfg.num_hidden_layers
    keys = iter(jax.random.split(key, 16))

    def normal(*shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def bias(enabled, size):
        return jnp.zeros((L, size), dtype) if enabled else None

    weights = {
        WEIGHT_FIELD[p]: normal(L, *projection_shape(cfg, p)) for p in PROJECTIONS
    }
    biases = {
        BIAS_FIELD[p]: bias(
            cfg.attention_bias if p in ("q", "k", "v", "o") else cfg.mlp_bias,
            projection_shape(cfg, p)[1],
        )
        for p in PROJECTIONS
    }
    layers = LayerParams(
        attn_norm=jnp.ones((L, cfg.hidden_size), dtype),
        mlp_norm=jnp.ones((L, cfg.hidden_size), dtype),
        **weights,
        **biases,
    )
    return LlamaParams(
        embed=normal(cfg.vocab_size, cfg.hidden_size),
        layers=layers,
        final_norm=jnp.ones((cfg.hidden_size,), dtype),
        lm_head=None if cfg.tie_word_embeddings else normal(cfg.hidden_size, cfg.vocab_size),
    )
