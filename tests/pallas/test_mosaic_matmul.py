"""The Mosaic GPU stacked matmul against its reference (GPU interpret mode) and its lowering.

JAX 0.10.2's GPU interpreter cannot take transposed wgmma operands ("TransposeTransform has no
attribute indices"), so the swapped form interprets only from JAX 0.11; its Mosaic GPU lowering
for ``cuda`` (which builds the wgmma and TMA ops and checks their shapes) runs everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import rel_err
from tests.pallas.interpret import INTERPRET
from loraswitch_jax.pallas.mosaic_matmul import (
    MosaicBlocks,
    mosaic_matmul,
    padded_rows,
    stacked_matmul_reference,
    supports,
)

JAX_011 = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)
SWAP = pytest.param("swap", marks=pytest.mark.skipif(
    INTERPRET and not JAX_011, reason="JAX < 0.11's GPU interpreter: no transposed wgmma operands"))


def operands(m, k, n, layers, dtype, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (layers, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w


@pytest.mark.parametrize("form", [SWAP, "pad"])
@pytest.mark.parametrize("m,k,n,bs", [
    (1, 256, 128, dict(block_n=64, block_k=64, split_k=2, num_stages=2)),  # split K, 2 N blocks
    (13, 128, 192, dict(block_n=64, block_k=64, split_k=1, num_stages=3)),  # odd rows, 3 blocks
    (64, 384, 128, dict(block_n=128, block_k=128, split_k=1, num_stages=2)),  # full 64 rows
    (5, 128, 64, dict(block_n=64, block_k=64, split_k=2, num_stages=4)),  # one K step a program
])
def test_matches_reference(form, m, k, n, bs):
    x, w = operands(m, k, n, 3, jnp.bfloat16, seed=m * 1000 + k + n)
    blocks = MosaicBlocks(form=form, **bs)
    for layer in (0, 2):  # the first and the last layer
        got = mosaic_matmul(x, w, layer, block_sizes=blocks, interpret=INTERPRET)
        assert got.shape == (m, n) and got.dtype == jnp.bfloat16
        assert rel_err(got, stacked_matmul_reference(x, w, layer)) < 1e-2


def test_traced_layer_inside_a_loop():
    """The layer index is data: one kernel serves every layer of a fori_loop."""
    x, w = operands(8, 64, 64, 3, jnp.bfloat16, seed=2)
    blocks = MosaicBlocks(block_n=64, block_k=64, split_k=1, num_stages=2, form="pad")

    def run(mm):
        def body(layer, h):
            return jnp.tanh(mm(h, w, layer))

        return jax.jit(lambda h: jax.lax.fori_loop(0, 3, body, h))(x)

    got = run(lambda h, w, layer: mosaic_matmul(h, w, layer, block_sizes=blocks,
                                                interpret=INTERPRET))
    assert rel_err(got, run(stacked_matmul_reference)) < 2e-2


@pytest.mark.parametrize("form", ["swap", "pad"])
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_lowers_for_gpu_at_llama_shapes(form, k, n):
    """Mosaic GPU lowering (TMA descriptors, swizzles, wgmma shapes) at Llama-2-7B's shapes."""
    blocks = MosaicBlocks(block_n=128, block_k=128, split_k=2, num_stages=3, form=form)
    for m in (1, 64):
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
                jax.ShapeDtypeStruct((2, k, n), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.int32))
        lowered = mosaic_matmul.trace(*args, block_sizes=blocks).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


def test_padded_rows():
    assert [padded_rows(m, "swap") for m in (1, 8, 9, 33, 64)] == [8, 8, 16, 40, 64]
    assert padded_rows(1, "pad") == padded_rows(64, "pad") == 64
    with pytest.raises(ValueError, match="at most 64 rows"):
        padded_rows(65, "pad")


def test_supports_names_what_does_not_fit():
    assert supports(1, 4096, 4096, MosaicBlocks()) is None
    assert "does not divide N" in supports(1, 4096, 4160, MosaicBlocks(block_n=128))
    assert "does not divide K" in supports(1, 11008, 4096, MosaicBlocks(block_k=128, split_k=4))
    assert "shared memory" in supports(64, 4096, 4096, MosaicBlocks(
        block_n=256, block_k=256, split_k=1, num_stages=4))


@pytest.mark.parametrize("field,kwargs", [
    ("form", dict(form="fma")),
    ("block_n", dict(block_n=32)),
    ("block_n", dict(block_n=96, form="swap")),
    ("block_k", dict(block_k=96)),
    ("split_k", dict(split_k=0)),
    ("num_stages", dict(num_stages=1)),
])
def test_blocks_validate(field, kwargs):
    with pytest.raises(ValueError, match=field):
        MosaicBlocks(**kwargs)


def test_rejects_bad_input():
    x, w = operands(2, 128, 64, 2, jnp.bfloat16, seed=3)
    with pytest.raises(ValueError, match="expected x"):
        mosaic_matmul(x[:, :64], w, 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_matmul(x.astype(jnp.float32), w.astype(jnp.float32), 0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="does not tile"):
        mosaic_matmul(x, w, 0, block_sizes=MosaicBlocks(block_n=128), interpret=INTERPRET)
