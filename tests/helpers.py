"""Helpers the tests share: tolerances, a cached jitted forward, random params of any config."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import loraswitch_jax as lj

VOCAB = 160
WEIGHT_STD = 0.25  # 0.05-0.1 gives greedy repeats of one or two tokens; 0.2+ does not
MAX_NEW = 20  # greedy tokens compared with transformers


@functools.cache
def jit_forward():
    return jax.jit(lj.forward, static_argnames=("cfg", "scan_layers"))


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def random_params(cfg: lj.LlamaConfig, seed: int, dtype) -> lj.LlamaParams:
    """Params with every leaf random (norms and biases too), so any mix-up of leaves shows.

    Drawn with numpy on the shapes of ``init_params`` (no eager jax ops to compile).
    """
    abstract = jax.eval_shape(lambda: lj.init_params(cfg, jax.random.key(0), dtype=dtype))
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(WEIGHT_STD * rng.standard_normal(x.shape), dtype), abstract
    )
