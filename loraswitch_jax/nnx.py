"""Flax NNX modules over the functional core: the same arrays, the same ``forward``.

:class:`Llama` (the backbone) and :class:`AdaptedLlama` (backbone plus an adapter, any mode) are
thin NNX faces: their variables hold the very arrays of :class:`~loraswitch_jax.LlamaParams` and
:class:`~loraswitch_jax.Adapter` (no copies), and every call rebuilds those pytrees from the
variables and runs :func:`loraswitch_jax.forward` or :func:`loraswitch_jax.generate`. So a Flax
user gets ``nnx.Optimizer``, ``nnx.jit``, ``nnx.split``/``merge`` and orbax checkpoints of
``nnx.state`` while the math stays in one place.

Variable types choose what trains: backbone weights are :class:`Frozen` (not an ``nnx.Param``,
so no default filter, optimizer or gradient reaches them); experts and routers are
``nnx.LoRAParam`` (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``). Every variable records its
logical axis names as ``out_sharding`` metadata (the table ``sharding.LOGICAL_AXES``), so
``nnx.get_partition_spec`` works; ``loraswitch_jax.sharding`` maps them to mesh axes, and
variables are created with ``eager_sharding=False`` so that no mesh is needed here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loraswitch_jax.adapter_io import load_adapter as _read_adapter
from loraswitch_jax.adapters import (
    Adapter,
    AdapterConfig,
    AdapterError,
    check_adapter,
    init_adapter,
)
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.generate import GenerateConfig, Generation, generate, generate_batch
from loraswitch_jax.llama import forward
from loraswitch_jax.params import (
    LayerParams,
    LlamaParams,
    init_params,
)
from loraswitch_jax.router import balance_loss
from loraswitch_jax.sharding import LOGICAL_AXES, logical_axes
from loraswitch_jax.train.loss import token_cross_entropy
from loraswitch_jax.weights import WeightsError, load_params

__all__ = [
    "LOGICAL_AXES",
    "AdaptedLlama",
    "AdapterModule",
    "Frozen",
    "Llama",
    "logical_axes",
]

class Frozen(nnx.Variable):
    """A backbone weight: its own variable type, not an ``nnx.Param``, so ``nnx.grad``'s default
    filter, ``nnx.Optimizer(..., wrt=nnx.Param)`` and ``wrt=nnx.LoRAParam`` all leave it alone."""


def _variable(kind: type[nnx.Variable], value: jax.Array, name: str) -> nnx.Variable:
    # No eager sharding: it would need a mesh, and would move (copy) the array.
    return kind(value, out_sharding=logical_axes(name), eager_sharding=False)


def _check_tokens(tokens) -> None:
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be an integer array [batch, length], got "
            f"{getattr(tokens, 'dtype', type(tokens).__name__)}{list(getattr(tokens, 'shape', []))}"
        )


def _check_params(params: LlamaParams, cfg: LlamaConfig) -> None:
    """Raise :class:`WeightsError` naming the first leaf of ``params`` that does not fit ``cfg``."""
    if not isinstance(params, LlamaParams) or not isinstance(cfg, LlamaConfig):
        raise TypeError(
            f"expected LlamaParams and LlamaConfig, got {type(params).__name__} and "
            f"{type(cfg).__name__}"
        )
    want = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype=params.dtype))
    got_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want_leaves = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    def keystr(path) -> str:
        return jax.tree_util.keystr(path, simple=True, separator=".")

    for path in sorted(want_leaves.keys() | got_leaves.keys(), key=keystr):
        name = keystr(path)
        if path not in got_leaves or path not in want_leaves:
            state = "is missing" if path not in got_leaves else "is not in this config"
            raise WeightsError(f"params.{name} {state} (a model of another config?)")
        got, expected = tuple(got_leaves[path].shape), tuple(want_leaves[path].shape)
        if got != expected:
            raise WeightsError(
                f"params.{name} has shape {got}, expected {expected} for this config"
            )


class Llama(nnx.Module):
    """The Llama backbone: :class:`Frozen` variables over the arrays of a :class:`LlamaParams`.

    Attributes:
      config: the :class:`~loraswitch_jax.LlamaConfig` (static).
      embed: ``[V, d]``; final_norm: ``[d]``; lm_head: ``[d, V]`` (``None`` when tied).
      layers: an ``nnx.Dict`` of the stacked layer fields, ``wq [L, d, H*hd]`` etc.
    """

    def __init__(self, params: LlamaParams, cfg: LlamaConfig):
        """Wrap ``params`` (checked against ``cfg``); the variables hold its arrays, not copies."""
        _check_params(params, cfg)
        self.config = cfg
        self.embed = _variable(Frozen, params.embed, "embed")
        self.final_norm = _variable(Frozen, params.final_norm, "final_norm")
        tied = params.lm_head is None
        self.lm_head = None if tied else _variable(Frozen, params.lm_head, "lm_head")
        fields = {k: v for k, v in vars(params.layers).items() if v is not None}
        self.layers = nnx.Dict({k: _variable(Frozen, v, k) for k, v in fields.items()})

    @classmethod
    def from_functional(cls, params: LlamaParams, cfg: LlamaConfig) -> Llama:
        return cls(params, cfg)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype=jnp.bfloat16) -> Llama:
        """Load a Hugging Face Llama folder (:func:`~loraswitch_jax.load_params`)."""
        params, cfg = load_params(folder, dtype=dtype)
        return cls(params, cfg)

    def to_functional(self) -> LlamaParams:
        """The core's :class:`LlamaParams` over this module's own arrays (tracers under a
        transform)."""
        layers = LayerParams(**{k: v.get_value() for k, v in self.layers.items()})
        return LlamaParams(
            embed=self.embed.get_value(),
            layers=layers,
            final_norm=self.final_norm.get_value(),
            lm_head=None if self.lm_head is None else self.lm_head.get_value(),
        )

    def __call__(self, tokens: jax.Array, **forward_kwargs) -> jax.Array:
        """Logits ``[B, T, V]`` float32 of ``tokens [B, T]``: :func:`loraswitch_jax.forward`,
        whose keyword arguments (``positions``, ``segment_ids``, ``scan_layers``, ``impl``) pass
        through."""
        _check_tokens(tokens)
        return forward(self.to_functional(), tokens, self.config, **forward_kwargs)

    def generate(self, prompts: Sequence[Sequence[int]] | np.ndarray,
                 gen: GenerateConfig = GenerateConfig(), *, seed: int = 0,
                 stream: Callable | None = None) -> Generation:
        """:func:`loraswitch_jax.generate` (validated, host side) over this module's arrays."""
        return generate(self.to_functional(), self.config, prompts, gen, seed=seed, stream=stream)

    def generate_tokens(self, tokens: jax.Array, lengths: jax.Array, key: jax.Array, *,
                        gen: GenerateConfig, cache_len: int, steps=None) -> jax.Array:
        """The traceable core of :meth:`generate` (use it under ``nnx.jit``):
        :func:`loraswitch_jax.generate.generate_batch` on prompts padded by ``prepare_prompts``.
        Returns ``[B, gen.max_new_tokens] int32``, ``-1`` after a row stops."""
        return generate_batch(self.to_functional(), None, tokens, lengths, key, steps,
                              cfg=self.config, gen=gen, cache_len=cache_len, stream=None)


class AdapterModule(nnx.Module):
    """An adapter's experts and router as ``nnx.LoRAParam`` over the arrays of an :class:`Adapter`.

    Attributes:
      config: the :class:`~loraswitch_jax.AdapterConfig` (static).
      a, b: ``nnx.Dict`` projection -> ``[La, E, d_in, r]`` / ``[La, E, r, d_out]``.
      router: ``[d, E]`` (switch), ``[La, d, E]`` (layerwise) or ``None`` (lora).
    """

    def __init__(self, adapter: Adapter):
        if not isinstance(adapter, Adapter):
            raise TypeError(f"expected a loraswitch_jax.Adapter, got {type(adapter).__name__}")
        self.config = adapter.config
        self.a = nnx.Dict({p: _variable(nnx.LoRAParam, x, f"a.{p}") for p, x in adapter.a.items()})
        self.b = nnx.Dict({p: _variable(nnx.LoRAParam, x, f"b.{p}") for p, x in adapter.b.items()})
        self.router = None if adapter.router is None else _variable(
            nnx.LoRAParam, adapter.router, f"router.{adapter.config.mode}")

    @classmethod
    def from_functional(cls, adapter: Adapter) -> AdapterModule:
        return cls(adapter)

    def to_functional(self) -> Adapter:
        """The core's :class:`Adapter` over this module's own arrays."""
        return Adapter(
            config=self.config,
            a={p: v.get_value() for p, v in self.a.items()},
            b={p: v.get_value() for p, v in self.b.items()},
            router=None if self.router is None else self.router.get_value(),
        )


class AdaptedLlama(nnx.Module):
    """The backbone with an adapter (``lora``, ``layerwise`` or ``switch``).

    Attributes:
      backbone: the :class:`Llama` (:class:`Frozen` variables).
      lora: the :class:`AdapterModule` (``nnx.LoRAParam`` variables, float32 master weights by
        default; cast to the backbone's dtype for compute, as the core's train step does).
    """

    def __init__(self, params: LlamaParams, cfg: LlamaConfig, adapter: Adapter):
        self.backbone = Llama(params, cfg)
        self.lora = AdapterModule(_fitting(adapter, cfg))

    @property
    def config(self) -> LlamaConfig:
        return self.backbone.config

    @property
    def adapter_config(self) -> AdapterConfig:
        return self.lora.config

    # ------------------------------------------------------------------ between the two worlds
    @classmethod
    def from_functional(
        cls, params: LlamaParams, cfg: LlamaConfig, adapter: Adapter
    ) -> AdaptedLlama:
        return cls(params, cfg, adapter)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, adapter: AdapterConfig | str | os.PathLike, *,
        rngs: nnx.Rngs | None = None, dtype=jnp.bfloat16, adapter_dtype=jnp.float32,
    ) -> AdaptedLlama:
        """Load a Hugging Face Llama folder with a fresh adapter or a saved one.

        Args:
          folder: the Hugging Face model folder (:func:`~loraswitch_jax.load_params`).
          adapter: an :class:`AdapterConfig` (fresh weights drawn from ``rngs.params()``) or a
            folder written by :func:`~loraswitch_jax.save_adapter`.
          rngs: needed for a fresh adapter.
          dtype: the backbone's dtype (the compute dtype); adapter_dtype: the adapter's.
        """
        params, cfg = load_params(folder, dtype=dtype)
        if isinstance(adapter, AdapterConfig):
            if rngs is None:
                raise ValueError("a fresh adapter needs rngs=nnx.Rngs(seed) for its weights")
            weights = init_adapter(cfg, adapter, rngs.params(), adapter_dtype)
        elif isinstance(adapter, (str, os.PathLike)):
            weights = _read_adapter(adapter, cfg, dtype=adapter_dtype)
        else:
            raise TypeError(
                f"adapter must be an AdapterConfig or a saved adapter's folder, got "
                f"{type(adapter).__name__}"
            )
        return cls(params, cfg, weights)

    def to_functional(self) -> tuple[LlamaParams, Adapter]:
        """``(params, adapter)``: the core's pytrees over this module's own arrays."""
        return self.backbone.to_functional(), self.lora.to_functional()

    def adapter(self) -> Adapter:
        """The core's :class:`Adapter` over this module's arrays, for ``save_adapter``,
        ``export_peft``, ``merge_lora`` or the core's ``train_step``."""
        return self.lora.to_functional()

    def load_adapter(self, adapter: Adapter) -> None:
        """Put ``adapter``'s arrays (e.g. from ``load_adapter``) into this model. With the same
        config the variables keep their identity (an ``nnx.Optimizer`` built on them stays
        valid); with another config the adapter module is replaced."""
        adapter = _fitting(adapter, self.config)
        if adapter.config != self.lora.config:
            self.lora = AdapterModule(adapter)
            return
        for p, x in adapter.a.items():
            self.lora.a[p].set_value(x)
        for p, x in adapter.b.items():
            self.lora.b[p].set_value(x)
        if adapter.router is not None:
            self.lora.router.set_value(adapter.router)

    def _compute(self) -> tuple[LlamaParams, Adapter]:
        """Params and the adapter cast to their dtype (what the core's train and eval steps
        run); a no-op when the dtypes agree."""
        params, adapter = self.to_functional()
        dtype = params.dtype
        return params, jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), adapter)

    # ------------------------------------------------------------------ compute
    def __call__(self, tokens: jax.Array, **forward_kwargs):
        """Logits ``[B, T, V]`` float32 of ``tokens [B, T]`` through :func:`loraswitch_jax.forward`
        with this adapter; its keyword arguments pass through (``positions``, ``segment_ids``,
        ``dropout_key``, ``return_routing``, ``scan_layers``, ``impl``)."""
        _check_tokens(tokens)
        params, adapter = self._compute()
        return forward(params, tokens, self.config, adapter=adapter, **forward_kwargs)

    def loss(self, batch: dict, *, aux_loss_weight: float = 0.01,
             dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """The core's training objective on one batch (``train.step``: token cross-entropy
        summed over ``loss_mask`` and divided by its count, plus ``aux_loss_weight`` times the
        router balance loss).

        Args:
          batch: ``[B, T]`` arrays ``tokens``, ``targets``, ``loss_mask`` and optionally
            ``positions``, ``segment_ids`` (packed rows), as ``train.data`` makes them.
          dropout_key: enables the adapter's dropout.
        Returns:
          ``(objective, {"ce": mean token cross-entropy, "aux": balance loss})``, float32.
        """
        missing = [k for k in ("tokens", "targets", "loss_mask") if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; it needs tokens, targets and loss_mask")
        logits, routing = self(batch["tokens"], positions=batch.get("positions"),
                               segment_ids=batch.get("segment_ids"), dropout_key=dropout_key,
                               return_routing=True)
        ce_sum, count = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        ce = ce_sum / jnp.maximum(count, 1.0)
        aux = jnp.float32(0.0) if routing is None else balance_loss(routing, batch["loss_mask"])
        return ce + aux_loss_weight * aux, {"ce": ce, "aux": aux}

    def generate(self, prompts: Sequence[Sequence[int]] | np.ndarray,
                 gen: GenerateConfig = GenerateConfig(), *, seed: int = 0,
                 stream: Callable | None = None) -> Generation:
        """:func:`loraswitch_jax.generate` (validated, host side) with this adapter."""
        params, adapter = self._compute()
        return generate(params, self.config, prompts, gen, adapter=adapter, seed=seed,
                        stream=stream)

    def generate_tokens(self, tokens: jax.Array, lengths: jax.Array, key: jax.Array, *,
                        gen: GenerateConfig, cache_len: int, steps=None) -> jax.Array:
        """:meth:`Llama.generate_tokens` with this adapter (traceable, for ``nnx.jit``)."""
        params, adapter = self._compute()
        return generate_batch(params, adapter, tokens, lengths, key, steps, cfg=self.config,
                              gen=gen, cache_len=cache_len, stream=None)


def _fitting(adapter: Adapter, cfg: LlamaConfig) -> Adapter:
    """``adapter`` if it fits the model ``cfg``; else one :class:`AdapterError` line."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected a loraswitch_jax.Adapter, got {type(adapter).__name__}")
    try:
        check_adapter(adapter, cfg)
    except AdapterError as e:
        raise AdapterError(f"the adapter does not fit this model: {e}") from None
    return adapter
