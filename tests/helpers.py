"""Helpers the tests share: tolerances, a cached jitted forward, random params and adapters."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj

VOCAB = 160
WEIGHT_STD = 0.25  # 0.05-0.1 gives greedy repeats of one or two tokens; 0.2+ does not
MAX_NEW = 20  # greedy tokens compared with transformers
CASES = ("mha", "gqa_llama3")  # the reference models' configs (tests/hf_models.py)


def require(module: str):
    """``module``, imported, or the calling test (or test module) skipped: torch, transformers,
    peft and lm_eval come with the `test` extra only, and the rest runs without them."""
    __tracebackhide__ = True  # the skip names the caller's line
    return pytest.importorskip(module,
                               reason=f"{module} is not installed (it is in the `test` extra)")


@functools.cache
def jit_forward():
    return jax.jit(lj.forward, static_argnames=("cfg", "scan_layers", "return_routing", "impl"))


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


def unit_norm_params(cfg: lj.LlamaConfig, seed: int, dtype) -> lj.LlamaParams:
    """:func:`random_params` with every norm weight 1: random norms near zero make greedy
    decoding repeat one token."""
    p = random_params(cfg, seed, dtype)
    ones = {f: jnp.ones_like(getattr(p.layers, f)) for f in ("attn_norm", "mlp_norm")}
    return dataclasses.replace(p, layers=dataclasses.replace(p.layers, **ones),
                               final_norm=jnp.ones_like(p.final_norm))


def trained_like(adapter: lj.Adapter, seed: int, std: float = 0.3) -> lj.Adapter:
    """``B`` (zero at init) and the router made random, so adapters change the outputs."""
    rng = np.random.RandomState(seed)
    b = {p: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for p, x in adapter.b.items()}
    router = adapter.router
    if router is not None:
        router = jnp.asarray(3.0 * rng.standard_normal(router.shape), router.dtype)
    return dataclasses.replace(adapter, b=b, router=router)


def make_adapter(cfg: lj.LlamaConfig, seed: int = 0, std: float = 0.3, **kwargs) -> lj.Adapter:
    """A :func:`trained_like` adapter of rank 4, alpha 8; ``lora=True`` for a single LoRA."""
    kwargs = {"rank": 4, "alpha": 8.0, **kwargs}
    lora = kwargs.pop("lora", False)
    acfg = lj.AdapterConfig.lora(**kwargs) if lora else lj.AdapterConfig(**kwargs)
    return trained_like(lj.init_adapter(cfg, acfg, jax.random.key(seed)), seed, std)


def logits(params, cfg, tokens, adapter=None, **kwargs) -> np.ndarray:
    """The jitted forward's logits on host."""
    return np.asarray(jit_forward()(params, jnp.asarray(tokens), cfg, adapter=adapter, **kwargs))


def assert_adapters_equal(got: lj.Adapter, want: lj.Adapter):
    """Same config, tree, dtypes and values, bit for bit."""
    assert got.config == want.config
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def read_metrics(out_dir) -> list[dict]:
    """The records of a training run's ``metrics.jsonl``."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(got_dir, want_dir, steps: int) -> None:
    """Two training runs logged steps 0..``steps`` with the same losses, grad norms and held-out
    losses (1e-5 relative) and exported the same adapter."""
    want, got = read_metrics(want_dir), read_metrics(got_dir)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(steps + 1))
    for a, b in zip(got, want):
        for key in ("loss", "aux", "grad_norm", "eval_loss"):
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (b["step"], key)
    for x, y in zip(jax.tree.leaves(lj.load_adapter(os.path.join(got_dir, "adapter"))),
                    jax.tree.leaves(lj.load_adapter(os.path.join(want_dir, "adapter")))):
        assert rel_err(x, y) < 1e-5
