"""The shared-memory estimate behind every kernel's default blocks, against what Triton asked for
(or accepted) on an H100 with JAX 0.11.2, and the 7B defaults it picks at 1 to 64 rows.

A miss shows on the GPU only, as "Shared memory size limit exceeded" when the program compiles
(batch 64 decode and a q/k/v kernel with A tiles beside W did, before this estimate).
"""

from __future__ import annotations

import pytest

from loraswitch_jax.pallas import fused_projections, lora_shrink, stacked_matmul
from loraswitch_jax.pallas._blocks import SHARED_MEMORY_BYTES, shared_memory_bytes
from loraswitch_jax.pallas.stacked_matmul import BlockSizes

ST3 = dict(split_k=1, num_warps=4, num_stages=3)


@pytest.mark.parametrize("blocks,block_m,branches,measured,compiled", [
    # gate/up, 64 rows: "requested 245760, available: 232448"
    (BlockSizes(block_n=128, block_k=128, **ST3), 64, ((128, 128),), 245760, False),
    # q/k/v with two rank-16 A tiles beside each W tile (the removed inline shrink), 16 rows:
    # "requested 270336"
    (BlockSizes(block_n=128, block_k=128, **ST3), 16, ((128, 32),) * 3, 270336, False),
    # q/k/v, 16 rows: the measured default, compiled and ran
    (BlockSizes(block_n=128, block_k=128, **ST3), 16, ((128,),) * 3, None, True),
    # q/k/v n64 k256: did not compile in the sweep
    (BlockSizes(block_n=64, block_k=256, **ST3), 16, ((64,),) * 3, None, False),
])
def test_estimate_matches_the_gpu(blocks, block_m, branches, measured, compiled):
    got = shared_memory_bytes(blocks, block_m, branches)
    if measured is not None:
        assert got == measured
    assert (got <= SHARED_MEMORY_BYTES) == compiled


@pytest.mark.parametrize("m", [1, 8, 17, 32, 33, 64])
def test_llama_7b_defaults_fit_at_every_batch(m):
    """Every default block size for Llama-2-7B shapes fits, for every padded row count; and
    16-row defaults stay the measured ones."""
    rows = min(64, max(16, 1 << (m - 1).bit_length()))
    for k, n in ((4096, 4096), (11008, 4096), (4096, 11008)):
        bs = stacked_matmul.default_block_sizes(m, k, n)
        assert shared_memory_bytes(bs, rows, ((bs.block_n,),)) <= SHARED_MEMORY_BYTES
    qkv = fused_projections.default_qkv_block_sizes(m, 4096, 4096, 4096)
    gate_up = fused_projections.default_gate_up_block_sizes(m, 4096, 11008)
    assert shared_memory_bytes(qkv, rows, ((qkv.block_n,),) * 3) <= SHARED_MEMORY_BYTES
    assert shared_memory_bytes(gate_up, rows, ((gate_up.block_n,) * 2,)) <= SHARED_MEMORY_BYTES
    if rows == 16:
        assert (qkv.block_k, gate_up.block_k) == (128, 128)
    shrink = lora_shrink.default_shrink_block_sizes(4096, 16, rows, projections=3)
    assert shared_memory_bytes(shrink, rows, ((16,),) * 3) <= SHARED_MEMORY_BYTES

