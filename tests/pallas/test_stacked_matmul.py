"""The stacked-weight matmul kernel (interpret mode) against its jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from tests.helpers import rel_err
from tests.pallas.interpret import F32_TOL, IMPL, INTERPRET
from loraswitch_jax.pallas.stacked_matmul import (
    BlockSizes,
    default_block_sizes,
    stacked_matmul,
    stacked_matmul_reference,
)

TOL = {jnp.float32: F32_TOL, jnp.bfloat16: 1e-2}


def operands(m, k, n, layers, dtype, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (layers, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
# Rows are read in a block of a power of two >= 16 that overruns x unless M is one (16, 64).
@pytest.mark.parametrize("m,k,n", [(1, 64, 128), (3, 128, 48), (8, 64, 32), (16, 128, 64),
                                   (17, 96, 32), (40, 256, 80), (64, 96, 48)])
def test_matches_reference(m, k, n, dtype):
    x, w = operands(m, k, n, 3, dtype, seed=m * 1000 + k + n)
    for layer in (0, 2):  # the first and the last layer
        got = stacked_matmul(x, w, layer, interpret=INTERPRET)
        assert got.shape == (m, n) and got.dtype == dtype
        assert rel_err(got, stacked_matmul_reference(x, w, layer)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("block_sizes", [BlockSizes(block_n=16, block_k=16, split_k=1),
                                         BlockSizes(block_n=32, block_k=32, split_k=4)])
def test_explicit_block_sizes(block_sizes, m):
    x, w = operands(m, 128, 64, 2, jnp.float32, seed=m)
    got = stacked_matmul(x, w, 1, block_sizes=block_sizes, interpret=INTERPRET)
    assert rel_err(got, stacked_matmul_reference(x, w, 1)) < F32_TOL


def test_traced_layer_inside_a_loop():
    """The layer index is data: one kernel serves every layer of a fori_loop."""
    x, w = operands(2, 64, 64, 4, jnp.float32, seed=2)

    def run(mm):
        def body(layer, h):
            return jnp.tanh(mm(h, w, layer))

        return jax.jit(lambda h: jax.lax.fori_loop(0, 4, body, h))(x)

    got = run(lambda h, w, layer: stacked_matmul(h, w, layer, interpret=INTERPRET))
    assert rel_err(got, run(stacked_matmul_reference)) < F32_TOL


def test_default_block_sizes_tile_llama_shapes():
    for k, n in [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024)]:
        bs = default_block_sizes(1, k, n)
        assert n % bs.block_n == 0 and k % (bs.block_k * bs.split_k) == 0


def test_rejects_mismatched_shapes():
    x, w = operands(2, 64, 32, 2, jnp.float32, seed=3)
    with pytest.raises(ValueError, match="expected x"):
        stacked_matmul(x[:, :48], w, 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="does not tile"):
        stacked_matmul(x, w, 0, block_sizes=BlockSizes(block_n=64, block_k=16), interpret=INTERPRET)


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown impl"):
        lj.ops.resolve_impl("cuda")


def test_generation_with_interpreted_kernels(llama3_case, prompts):
    """Greedy tokens through the Pallas decode step equal the XLA decode step's."""
    params, cfg = llama3_case.params, llama3_case.cfg
    gen = lj.GenerateConfig(max_new_tokens=6, stop_tokens=(), impl="xla")
    want = lj.generate(params, cfg, prompts, gen).tokens
    got = lj.generate(params, cfg, prompts, lj.GenerateConfig(
        max_new_tokens=6, stop_tokens=(), impl=IMPL)).tokens
    np.testing.assert_array_equal(got, want)
