"""The backbone decode kernels take unpadded rows: no XLA pad or row slice launches around them.

``stacked_matmul``, ``qkv_matmul`` and ``gate_up_matmul`` read ``x [M, K]`` in a row block of a
power of two >= 16 that overruns it (masked loads and stores in the kernel), where they used to
pad ``x`` with an XLA pad (a launch of its own at every projection of every layer) and slice
the output back. Counted on the StableHLO of a Llama-2-7B-wide decode step lowered for a GPU on
this CPU (pad ops reached per step, each call of a private function counted).
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import loraswitch_jax as lj
from loraswitch_jax.ops import Impl
from loraswitch_jax.pallas._blocks import masked_rows, store_rows
from tests.pallas.gpu_target import lower_for_gpu, triton_kernels
from tests.pallas.interpret import INTERPRET

CFG = dataclasses.replace(lj.PRESETS["llama2-7b"], num_hidden_layers=2)
BACKBONE = ("stacked_matmul", "qkv_matmul", "gate_up_matmul")

_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w$.]+)\(")
_CALL = re.compile(r"\bcall @([\w$.]+)\(")


def ops_per_run(text: str, op: str, entry: str = "main") -> int:
    """How many ``op`` ops (e.g. ``stablehlo.pad``) one run of ``entry`` reaches in a lowered
    module's text: each ``call`` of a private function counts its ops again (the kernels'
    jitted wrappers are shared private functions); loop bodies count once."""
    own, calls, name = collections.Counter(), collections.defaultdict(list), None
    pattern = re.compile(rf"\b{re.escape(op)}\b")
    for line in text.splitlines():
        if m := _FUNC.match(line):
            name = m.group(1)
        elif name is not None:
            own[name] += len(pattern.findall(line))
            calls[name] += _CALL.findall(line)

    def reached(f, seen=()):
        if f in seen:
            raise ValueError(f"recursive call of {f}")
        return own[f] + sum(reached(g, seen + (f,)) for g in calls[f])

    return reached(entry)


def lowered_decode_step(batch: int) -> str:
    """The text of one Pallas decode step (backbone, no adapter) lowered for a GPU."""
    params = jax.eval_shape(lambda: lj.init_params(CFG, jax.random.key(0)))
    cache = jax.eval_shape(lambda: lj.init_cache(CFG, batch, 64))
    step = jax.jit(lj.decode_step, static_argnames=("cfg", "impl"))
    return lower_for_gpu(step, params, cache, jax.ShapeDtypeStruct((batch,), jnp.int32),
                         cfg=CFG, impl=Impl(backend="pallas")).as_text()


@pytest.mark.parametrize("m", [3, 16])
def test_masked_rows_read_zeros_past_the_array(m):
    """A 16-row block over ``x [M, 32]``: rows past ``M`` read as 0 (interpret mode pads the
    block with NaN, so an unmasked read fails), and only ``M`` output rows are stored."""
    x = jnp.arange(m * 32, dtype=jnp.float32).reshape(m, 32) + 1

    def kernel(x_ref, block_ref, o_ref):
        block = masked_rows(x_ref, m)[:, pl.ds(0, 32)]
        block_ref[...] = block
        store_rows(o_ref, block * 2, m)

    block, out = pl.pallas_call(
        kernel, grid=(1,), in_specs=[pl.BlockSpec((16, 32), lambda i: (0, 0))],
        out_specs=[pl.BlockSpec((16, 32), lambda i: (0, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((16, 32), jnp.float32),
                   jax.ShapeDtypeStruct((m, 32), jnp.float32)],
        interpret=INTERPRET)(x)
    np.testing.assert_array_equal(block, jnp.zeros((16, 32)).at[:m].set(x))
    np.testing.assert_array_equal(out, 2 * x)


def test_ops_per_run_counts_each_call():
    text = "\n".join([
        "  func.func public @main(%a: tensor<1xf32>) {",
        "    %0 = stablehlo.pad %a",
        "    %1 = func.call @f(%0)",
        "    %2 = func.call @f(%1)",
        "  func.func private @f(%a: tensor<1xf32>) {",
        "    %0 = call @g(%a)",
        "    %1 = stablehlo.pad %0",
        "  func.func private @g(%a: tensor<1xf32>) {",
        "    %0 = stablehlo.pad %a",
    ])
    assert ops_per_run(text, "stablehlo.pad") == 1 + 2 * (1 + 1)
    assert ops_per_run(text, "stablehlo.slice") == 0


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_decode_step_pads_only_for_attention(batch):
    """Per layer the step's only pad is the decode-attention kernel's (its query heads, not
    these kernels' rows): 1 per layer, where the padded kernels added 4 (q/k/v, o, gate/up,
    down). Every row slice left is a column split of the fused q/k/v output."""
    text = lowered_decode_step(batch)
    kernels = triton_kernels(text)
    for name in BACKBONE:
        assert any(k.startswith(name) for k in kernels), (name, kernels)
    assert ops_per_run(text, "stablehlo.pad") <= CFG.num_hidden_layers
    # A slice that cuts rows of an operand the kernels padded would start from Mp > batch rows.
    sliced_rows = re.findall(r"stablehlo\.slice %\S+ \[0:(\d+),.*?\(tensor<(\d+)x", text)
    assert all(int(kept) == int(rows) for kept, rows in sliced_rows if int(rows) >= 16)


@pytest.mark.parametrize("m", [1, 40])
def test_kernels_alone_lower_without_pad_or_slice(m):
    dt = jnp.bfloat16
    x = jnp.zeros((m, 256), dt)
    w = jnp.zeros((2, 256, 128), dt)

    def step(x, layer):
        from loraswitch_jax.pallas.fused_projections import gate_up_matmul, qkv_matmul
        from loraswitch_jax.pallas.stacked_matmul import stacked_matmul

        q, k, v = qkv_matmul(x, w, w, w, layer)
        act = gate_up_matmul(x, w, w, layer)
        return q + k + v + act + stacked_matmul(x, w, layer)

    text = lower_for_gpu(jax.jit(step), x, jnp.int32(1)).as_text()
    assert ops_per_run(text, "stablehlo.pad") == 0
    # q, k, v are column slices of the one [M, Nq + 2 Nkv] output; nothing else is sliced.
    assert ops_per_run(text, "stablehlo.slice") == 3
    assert re.findall(r"stablehlo\.slice %\S+ \[0:(\d+),", text) == [str(m)] * 3
