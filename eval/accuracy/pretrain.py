"""Full-parameter pretraining of a small Llama from scratch (the accuracy experiment's backbone).

Unlike ``loraswitch_jax.train`` (adapters only, frozen backbone), here every weight is trained:
one jitted AdamW step over the whole :class:`~loraswitch_jax.LlamaParams` tree, with the
schedule, clipping and batch format of the adapter trainer (:class:`OptimConfig`, batches from
:class:`~loraswitch_jax.train.data.TrainBatches`). Master weights are float32; with
``compute_dtype="bfloat16"`` the forward and backward passes run on a bf16 copy (GPU speed).
Weight decay skips the norm scales (1-D leaves), as usual for transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.llama import forward
from loraswitch_jax.params import LlamaParams, init_params
from loraswitch_jax.train.data import TrainBatches
from loraswitch_jax.train.loss import token_cross_entropy
from loraswitch_jax.train.step import OptimConfig

__all__ = ["PretrainResult", "PretrainState", "make_pretrain_optimizer", "pretrain",
           "pretrain_state", "pretrain_step"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_pretrain_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW on ``oc``'s warmup-cosine schedule; no weight decay on 1-D leaves."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(oc.clip_norm),
        optax.adamw(oc.schedule(), b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay,
                    mask=decay_mask),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PretrainState:
    """Step counter, float32 params and optimizer state."""

    step: jax.Array
    params: LlamaParams
    opt_state: optax.OptState


def pretrain_state(params: LlamaParams, oc: OptimConfig) -> PretrainState:
    """A fresh state around a float32 copy of ``params`` (the step donates its state)."""
    params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), params)
    return PretrainState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=make_pretrain_optimizer(oc).init(params))


def _loss(params, batch, cfg, compute_dtype):
    compute = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    logits = forward(compute, batch["tokens"], cfg, positions=batch["positions"],
                     segment_ids=batch["segment_ids"])
    ce_sum, count = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return ce_sum / jnp.maximum(count, 1.0), count


@functools.partial(jax.jit, static_argnames=("cfg", "oc", "compute_dtype"), donate_argnums=(0,))
def pretrain_step(state: PretrainState, batch: dict, *, cfg: LlamaConfig, oc: OptimConfig,
                  compute_dtype: str = "float32") -> tuple[PretrainState, dict]:
    """One AdamW step on a ``[B, T]`` batch (``tokens``, ``targets``, ``loss_mask``,
    ``segment_ids``, ``positions``); returns the new state and ``loss``, ``grad_norm``, ``lr``,
    ``tokens``."""
    (loss, count), grads = jax.value_and_grad(_loss, has_aux=True)(
        state.params, batch, cfg, _DTYPES[compute_dtype])
    updates, opt_state = make_pretrain_optimizer(oc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": oc.schedule()(state.step),
               "tokens": count}
    return PretrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """The trained float32 params and the run's record."""

    params: LlamaParams
    losses: list[float]  # training loss per step (nats per token)
    tokens: int  # target tokens trained on
    seconds: float  # wall time of the steps, first (compiling) step included
    compile_seconds: float  # wall time of the first step

    @property
    def tokens_per_second(self) -> float:
        """Throughput after compilation."""
        steady = self.seconds - self.compile_seconds
        per_step = self.tokens / max(len(self.losses), 1)
        return per_step * (len(self.losses) - 1) / steady if steady > 0 else float("nan")


def pretrain(cfg: LlamaConfig, batches: TrainBatches, oc: OptimConfig, *, seed: int = 0,
             init_std: float = 0.02, compute_dtype: str = "float32",
             progress: bool = True) -> PretrainResult:
    """Train a fresh ``cfg`` model for ``oc.steps`` steps on ``batches``.

    Args:
      cfg: the architecture; weights start normal(``init_std``) from ``seed``.
      batches: ``[B, T]`` batches (``TrainBatches``); ``oc.grad_accum`` must be 1.
      oc: AdamW settings and schedule (``lr``, ``warmup_steps``, ``steps``, ``weight_decay``...).
      compute_dtype: ``"float32"`` or ``"bfloat16"`` forward/backward; master weights stay float32.
    """
    if oc.grad_accum != 1:
        raise ValueError(f"pretrain takes one batch per step; got grad_accum={oc.grad_accum}")
    if compute_dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {compute_dtype!r}")
    # One compiled program instead of an eager dispatch (and compile) per initialiser op.
    state = jax.jit(lambda: pretrain_state(
        init_params(cfg, jax.random.key(seed), jnp.float32, std=init_std), oc))()
    losses, tokens, compile_seconds, pending = [], 0, 0.0, []
    bar = tqdm(total=oc.steps, desc="pretrain", unit="step", disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(oc.steps):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        state, metrics = pretrain_step(state, batch, cfg=cfg, oc=oc, compute_dtype=compute_dtype)
        pending.append((metrics["loss"], metrics["tokens"]))
        if step == 0:
            jax.block_until_ready(metrics)
            compile_seconds = time.perf_counter() - start
        # Read metrics back every few steps only, so the device runs ahead of the host.
        if (step + 1) % 10 == 0 or step + 1 == oc.steps:
            for loss, count in jax.device_get(pending):
                losses.append(float(loss))
                tokens += int(count)
            pending = []
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"pretraining loss is {losses[-1]} at step {step + 1}; "
                                         f"lower the learning rate (lr={oc.lr})")
            bar.update(len(losses) - bar.n)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return PretrainResult(params=state.params, losses=losses, tokens=tokens,
                          seconds=time.perf_counter() - start, compile_seconds=compile_seconds)
