"""The jitted train and eval steps over adapters only; the backbone is an argument, never trained.

Only the :class:`~loraswitch_jax.Adapter` (experts and routers) is differentiated and given to optax:
the frozen backbone is passed beside it, so no gradient, optimizer state or checkpoint ever holds
base weights (no optax mask needed). Adapters are float32 master weights; the forward pass casts
them to the backbone's dtype (bf16 by default), and routers and losses run in float32.

A batch is a dict of ``[A, B, T]`` arrays (``A`` micro-batches accumulated per optimizer step):
``tokens``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions`` (``segment_ids`` may be
absent or ``None``: one sequence per row). Losses are summed per token and divided by the step's
total token count, so accumulating ``A`` micro-batches of ``B`` rows gives the same update as one
batch of ``A * B`` rows.

Static arguments that change memory or speed, not results: ``remat`` (what the backward keeps
of each layer), ``attention_chunk`` (blockwise attention past it), ``attention_impl`` (``"xla"``
or the GPU's fused ``"cudnn"`` attention, which cannot keep packed sequences apart: a batch with
``segment_ids`` is refused) and ``loss_chunk`` (the cross-entropy takes that many tokens' logits
at a time, ``train.loss.chunked_cross_entropy``; ``None``: all ``[B, T, V]`` logits at once).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from loraswitch_jax.adapters import Adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.attention import ATTENTION_IMPLS
from loraswitch_jax.llama import forward, lm_head
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.router import balance_loss, expert_usage
from loraswitch_jax.train.loss import chunked_cross_entropy, token_cross_entropy

__all__ = ["STEP_STATIC", "OptimConfig", "TrainState", "eval_step", "init_state", "make_optimizer",
           "train_step"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; global-norm clipping."""

    lr: float = 2e-4
    warmup_steps: int = 20
    steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0
    aux_loss_weight: float = 0.01
    grad_accum: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), int if f.type in (int, "int") else float
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ValueError(f"optim.{f.name} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"optim.{f.name} must be finite, got {value!r}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and 0 <= self.min_lr_ratio <= 1
                and self.weight_decay >= 0):
            raise ValueError(f"need 0 <= b1, b2 < 1, 0 <= min_lr_ratio <= 1 and weight_decay >= 0; "
                             f"got {self.b1=}, {self.b2=}, {self.min_lr_ratio=}, {self.weight_decay=}")
        if self.lr <= 0 or self.steps < 1 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"need lr > 0, steps >= 1 and 0 <= warmup_steps <= steps; got {self.lr=}, "
                f"{self.steps=}, {self.warmup_steps=}"
            )
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum=}")
        if self.aux_loss_weight < 0 or self.clip_norm <= 0:
            raise ValueError(f"need aux_loss_weight >= 0 and clip_norm > 0; got {self.aux_loss_weight=}, {self.clip_norm=}")

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if self.warmup_steps else self.lr,
            peak_value=self.lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.steps,
            end_value=self.lr * self.min_lr_ratio,
        )


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(oc.clip_norm),
        optax.adamw(oc.schedule(), b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training; saved whole, so a resume is exact.

    ``rng`` is raw ``uint32`` key data (checkpoint friendly); dropout keys derive from it and the
    step number, so they do not depend on how many steps ran in this process.
    """

    step: jax.Array  # int32 scalar
    adapter: Adapter
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data


def init_state(adapter: Adapter, oc: OptimConfig, seed: int) -> TrainState:
    # A copy: train_step donates the state, which must not delete the caller's adapter.
    adapter = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), adapter)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        adapter=adapter,
        opt_state=make_optimizer(oc).init(adapter),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def _segments(batch: dict, attention_impl: str) -> jax.Array | None:
    """The batch's ``segment_ids`` (``None`` when absent); refused by the ``cudnn`` attention,
    which would let packed sequences see each other."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    segment_ids = batch.get("segment_ids")
    if segment_ids is not None and attention_impl == "cudnn":
        raise ValueError("attention_impl 'cudnn' cannot keep packed sequences apart, but the batch "
                         "has segment_ids: use attention_impl 'xla', or rows of one sequence "
                         "each (data.pack false) without segment_ids")
    return segment_ids


def _cross_entropy(params, batch, out, loss_chunk):
    """Summed cross-entropy and token count of ``forward``'s output: logits, or final-normed
    hidden states when ``loss_chunk`` is set (the head is applied a chunk at a time)."""
    if loss_chunk is None:
        return token_cross_entropy(out, batch["targets"], batch["loss_mask"])
    return chunked_cross_entropy(out, functools.partial(lm_head, params), batch["targets"],
                                 batch["loss_mask"], loss_chunk)


def _micro_loss(adapter, params, batch, key, cfg, aux_weight, n_tokens, remat, attention_chunk,
                mesh, attention_impl="xla", loss_chunk=None):
    compute = jax.tree.map(lambda x: x.astype(params.dtype), adapter)
    out, routing = forward(
        params, batch["tokens"], cfg, adapter=compute, positions=batch["positions"],
        segment_ids=_segments(batch, attention_impl), dropout_key=key, return_routing=True,
        remat=remat, attention_chunk=attention_chunk, attention_impl=attention_impl,
        fsdp_mesh=mesh, return_hidden=loss_chunk is not None,
    )
    ce_sum, count = _cross_entropy(params, batch, out, loss_chunk)
    aux = jnp.float32(0.0)
    usage = None
    if routing is not None:
        mask = batch["loss_mask"]
        aux = balance_loss(routing, mask)
        usage = expert_usage(routing.expert_ids, routing.probs.shape[-1], mask)
    return ce_sum / n_tokens + aux_weight * aux, (ce_sum, count, aux, usage)


def _train_step(
    state: TrainState, params: LlamaParams, batch: dict, *, cfg: LlamaConfig, oc: OptimConfig,
    remat: str = "none", attention_chunk: int | None = 512, mesh: jax.sharding.Mesh | None = None,
    attention_impl: str = "xla", loss_chunk: int | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step over ``A`` accumulated micro-batches (``batch`` leaves ``[A, B, T]``).

    ``remat``, ``attention_chunk`` and ``attention_impl`` are :func:`~loraswitch_jax.forward`'s
    (what the backward keeps of each layer; rows longer than the chunk attend blockwise; the
    ``cudnn`` attention refuses ``segment_ids``) and ``loss_chunk`` the cross-entropy's tokens per
    chunk (``None``: whole logits): they change memory and speed, not results. ``mesh``: the
    run's mesh (``train.placement`` binds it); with ``fsdp > 1`` each layer all-gathers its own
    weights over ``fsdp`` (``forward``'s ``fsdp_mesh``). Returns the
    new state and float32 metrics: ``loss`` (mean token cross-entropy), ``aux`` (balance loss,
    mean over micro-batches), ``grad_norm``, ``lr``, ``tokens`` and ``usage`` (``[N, E]``
    fraction of assignments per expert and router; absent without routers).
    """
    n_micro = batch["tokens"].shape[0]
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.grad(_micro_loss, has_aux=True)

    def micro(grads, xs):
        i, mb = xs
        g, (ce_sum, count, aux, usage) = grad_fn(
            state.adapter, params, mb, jax.random.fold_in(key, i), cfg,
            oc.aux_loss_weight / n_micro, n_tokens, remat, attention_chunk, mesh,
            attention_impl, loss_chunk,
        )
        return jax.tree.map(jnp.add, grads, g), (ce_sum, count, aux, usage)

    zeros = jax.tree.map(jnp.zeros_like, state.adapter)
    grads, (ce_sum, count, aux, usage) = jax.lax.scan(
        micro, zeros, (jnp.arange(n_micro), batch)
    )
    optimizer = make_optimizer(oc)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
    adapter = optax.apply_updates(state.adapter, updates)
    metrics = {
        "loss": jnp.sum(ce_sum) / n_tokens,
        "aux": jnp.mean(aux),
        "grad_norm": optax.tree.norm(grads),
        "lr": oc.schedule()(state.step),
        "tokens": jnp.sum(count),
    }
    if usage is not None:
        metrics["usage"] = jnp.mean(usage, axis=0)
    new_state = TrainState(step=state.step + 1, adapter=adapter, opt_state=opt_state, rng=state.rng)
    return new_state, metrics


STEP_STATIC = ("cfg", "oc", "remat", "attention_chunk", "mesh", "attention_impl", "loss_chunk")
# One device, or shardings taken from the (committed) inputs; train.placement jits it per mesh.
train_step = jax.jit(_train_step, static_argnames=STEP_STATIC, donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("cfg", "attention_chunk", "mesh", "attention_impl",
                                             "loss_chunk"))
def eval_step(adapter: Adapter | None, params: LlamaParams, batch: dict, *, cfg: LlamaConfig,
              attention_chunk: int | None = 512, mesh: jax.sharding.Mesh | None = None,
              attention_impl: str = "xla", loss_chunk: int | None = None) -> dict:
    """Summed cross-entropy and token count of one ``[B, T]`` batch (no dropout); ``mesh``,
    ``attention_impl`` and ``loss_chunk`` as :func:`train_step`'s."""
    if adapter is not None:
        adapter = jax.tree.map(lambda x: x.astype(params.dtype), adapter)
    out = forward(
        params, batch["tokens"], cfg, adapter=adapter, positions=batch["positions"],
        segment_ids=_segments(batch, attention_impl), attention_chunk=attention_chunk,
        attention_impl=attention_impl, fsdp_mesh=mesh, return_hidden=loss_chunk is not None,
    )
    ce_sum, count = _cross_entropy(params, batch, out, loss_chunk)
    return {"ce_sum": ce_sum, "tokens": count}
