"""Fused qkv and gate_up projection kernels (interpret mode) against their jnp references.

Interpret mode starts every output as NaN, so an output element that no program writes fails
the comparison (``rel_err`` is NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import rel_err
from tests.pallas.gpu_target import lower_for_gpu
from tests.pallas.interpret import F32_TOL, INTERPRET
from loraswitch_jax.pallas.fused_projections import (
    BlockSizes,
    default_gate_up_block_sizes,
    default_qkv_block_sizes,
    gate_up_matmul,
    gate_up_matmul_reference,
    qkv_matmul,
    qkv_matmul_reference,
    supports,
)
from loraswitch_jax.pallas.stacked_matmul import stacked_matmul

TOL = {jnp.float32: F32_TOL, jnp.bfloat16: 1e-2}
LAYERS = 3
K, NQ, NKV, F = 64, 64, 32, 96  # GQA: Nkv < Nq


def stack(key, n, dtype, k=K):
    return (jax.random.normal(key, (LAYERS, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)


def qkv_operands(m, dtype, seed, bias=False, nq=NQ, nkv=NKV):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (m, K), jnp.float32).astype(dtype)
    ws = [stack(kk, n, dtype) for kk, n in zip(ks[1:4], (nq, nkv, nkv))]
    bs = [jax.random.normal(kk, (LAYERS, n), jnp.float32).astype(dtype)
          for kk, n in zip(ks[4:], (nq, nkv, nkv))] if bias else []
    return x, ws, bs


def gate_up_operands(m, dtype, seed, bias=False):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (m, K), jnp.float32).astype(dtype)
    ws = [stack(kk, F, dtype) for kk in ks[1:3]]
    bs = [jax.random.normal(kk, (LAYERS, F), jnp.float32).astype(dtype)
          for kk in ks[3:]] if bias else []
    return x, ws, bs


# Rows are read in a block of a power of two >= 16 that overruns x unless M is one (16, 64).
CASES = [(m, dtype, bias) for m in (1, 3, 8, 16, 17, 40, 64)
         for dtype in (jnp.float32, jnp.bfloat16) for bias in (False, True)]


@pytest.mark.parametrize("m,dtype,bias", CASES)
def test_qkv_matches_reference(m, dtype, bias):
    x, ws, bs = qkv_operands(m, dtype, seed=m * 10 + bias, bias=bias)
    for layer in (0, LAYERS - 1):  # the first and the last layer
        got = qkv_matmul(x, *ws, layer, *bs, interpret=INTERPRET)
        ref = qkv_matmul_reference(x, *ws, layer, *bs)
        for g, r, n in zip(got, ref, (NQ, NKV, NKV)):
            assert g.shape == (m, n) and g.dtype == dtype
            assert rel_err(g, r) < TOL[dtype]


@pytest.mark.parametrize("m,dtype,bias", CASES)
def test_gate_up_matches_reference(m, dtype, bias):
    x, ws, bs = gate_up_operands(m, dtype, seed=m * 10 + bias, bias=bias)
    for layer in (0, LAYERS - 1):
        got = gate_up_matmul(x, *ws, layer, *bs, interpret=INTERPRET)
        assert got.shape == (m, F) and got.dtype == dtype
        assert rel_err(got, gate_up_matmul_reference(x, *ws, layer, *bs)) < TOL[dtype]


# split_k == 1 writes x.dtype and adds biases in the kernel; split_k > 1 reduces float32 partial
# sums (and applies bias and SiLU) in XLA.
BLOCKS = [BlockSizes(block_n=16, block_k=16, split_k=1, num_warps=8, num_stages=2),
          BlockSizes(block_n=32, block_k=16, split_k=2),
          BlockSizes(block_n=16, block_k=16, split_k=4)]


@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize("block_sizes", BLOCKS)
def test_explicit_block_sizes(block_sizes, m):
    x, ws, bs = qkv_operands(m, jnp.float32, seed=1, bias=True)
    got = qkv_matmul(x, *ws, 1, *bs, block_sizes=block_sizes, interpret=INTERPRET)
    for g, r in zip(got, qkv_matmul_reference(x, *ws, 1, *bs)):
        assert g.shape[0] == m and rel_err(g, r) < F32_TOL
    x, ws, bs = gate_up_operands(m, jnp.float32, seed=2, bias=True)
    got = gate_up_matmul(x, *ws, 1, *bs, block_sizes=block_sizes, interpret=INTERPRET)
    assert got.shape[0] == m and rel_err(got, gate_up_matmul_reference(x, *ws, 1, *bs)) < F32_TOL


def test_multi_head_shapes():
    """Nkv == Nq (Llama-2-7B's layout) and one block per projection."""
    x, ws, _ = qkv_operands(2, jnp.float32, seed=3, nq=32, nkv=32)
    bs = BlockSizes(block_n=32, block_k=32, split_k=1)
    got = qkv_matmul(x, *ws, 2, block_sizes=bs, interpret=INTERPRET)
    for g, r in zip(got, qkv_matmul_reference(x, *ws, 2)):
        assert rel_err(g, r) < F32_TOL


def test_traced_layer_inside_a_loop():
    """The layer index is data: one kernel serves every layer of a fori_loop."""
    x, (wq, wk, wv), _ = qkv_operands(2, jnp.float32, seed=4, nq=K, nkv=K // 2)
    _, (wg, wu), _ = gate_up_operands(2, jnp.float32, seed=5)
    wd = stack(jax.random.key(6), K, jnp.float32, k=F)

    def run(qkv, gate_up):
        def body(layer, h):
            q, k, v = qkv(h, wq, wk, wv, layer)
            h = jnp.tanh(q + jnp.concatenate([k, v], axis=1))
            return jnp.tanh(gate_up(h, wg, wu, layer) @ wd[layer])

        return jax.jit(lambda h: jax.lax.fori_loop(0, LAYERS, body, h))(x)

    got = run(lambda *a: qkv_matmul(*a, interpret=INTERPRET),
              lambda *a: gate_up_matmul(*a, interpret=INTERPRET))
    assert rel_err(got, run(qkv_matmul_reference, gate_up_matmul_reference)) < F32_TOL


def test_default_block_sizes_tile_llama_shapes():
    # 7B (MHA), Llama-3-8B (GQA 32/8 heads of 128), 1B-ish shapes.
    for k, nq, nkv in [(4096, 4096, 4096), (4096, 4096, 1024), (2048, 2048, 512)]:
        bs = default_qkv_block_sizes(1, k, nq, nkv)
        assert nq % bs.block_n == 0 and nkv % bs.block_n == 0
        assert k % (bs.block_k * bs.split_k) == 0
    for k, f in [(4096, 11008), (4096, 14336), (2048, 8192), (64, 96)]:
        bs = default_gate_up_block_sizes(1, k, f)
        assert f % bs.block_n == 0 and k % (bs.block_k * bs.split_k) == 0


def test_supports():
    assert supports(4096, 4096, 1024) and supports(4096, 11008)
    assert not supports(4096, 11000) and not supports(100, 64)


def test_rejects_bad_operands():
    x, (wq, wk, wv), (bq, _, bv) = qkv_operands(2, jnp.float32, seed=7, bias=True)
    with pytest.raises(ValueError, match="expected x"):
        qkv_matmul(x[0], wq, wk, wv, 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"expected w_k \[L, K=48"):
        qkv_matmul(x[:, :48], wq[:, :48], wk, wv, 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="one shape"):
        qkv_matmul(x, wq, wk, wv[..., :16], 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="layer counts"):
        qkv_matmul(x, wq, wk[:2], wv[:2], 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="multiples of 16"):
        qkv_matmul(x, wq[..., :40], wk, wv, 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="all of b_q"):
        qkv_matmul(x, wq, wk, wv, 0, bq, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"expected b_k \[L, N\]"):
        qkv_matmul(x, wq, wk, wv, 0, bq, bq, bv, interpret=INTERPRET)
    with pytest.raises(ValueError, match="out of range"):
        qkv_matmul(x, wq, wk, wv, LAYERS, interpret=INTERPRET)
    with pytest.raises(ValueError, match="does not tile Nkv"):
        qkv_matmul(x, wq, wk, wv, 0, block_sizes=BlockSizes(block_n=64, block_k=16),
                   interpret=INTERPRET)
    with pytest.raises(ValueError, match="does not tile K"):
        qkv_matmul(x, wq, wk, wv, 0, block_sizes=BlockSizes(block_n=16, block_k=64, split_k=2),
                   interpret=INTERPRET)
    with pytest.raises(ValueError, match="powers of two"):
        qkv_matmul(x, wq, wk, wv, 0, block_sizes=BlockSizes(block_n=48, block_k=16),
                   interpret=INTERPRET)

    x, (wg, wu), (bg, bu) = gate_up_operands(2, jnp.float32, seed=8, bias=True)
    with pytest.raises(ValueError, match="one shape"):
        gate_up_matmul(x, wg, wu[..., :32], 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="both b_gate and b_up"):
        gate_up_matmul(x, wg, wu, 0, bg, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"expected b_up \[L, N\]"):
        gate_up_matmul(x, wg, wu, 0, bg, bu[:, :32], interpret=INTERPRET)
    with pytest.raises(ValueError, match="does not tile F"):
        gate_up_matmul(x, wg, wu, 0, block_sizes=BlockSizes(block_n=64, block_k=16),
                       interpret=INTERPRET)


@pytest.mark.parametrize("m", [1, 40, 64])
def test_decode_kernels_lower_to_triton(m):
    """stacked_matmul, qkv_matmul and gate_up_matmul lower to Triton IR for a GPU (on this CPU),
    also with a row count whose block must overrun x (40 -> 64 rows, masked; 48 rows fail)."""
    dt = jnp.bfloat16
    x = jnp.zeros((m, 256), dt)
    w = jnp.zeros((2, 256, 128), dt)

    def step(x, layer):
        q, k, v = qkv_matmul(x, w, w, w, layer)
        act = gate_up_matmul(x, w, w, layer)
        return q + k + v + act + stacked_matmul(x, w, layer)

    hlo = lower_for_gpu(jax.jit(step), x, jnp.int32(1)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 3
