"""The whole jitted generation lowers for an NVIDIA GPU (Triton kernels included), on this CPU.

No GPU runs in CI; lowering for ``cuda`` still runs every Pallas kernel's Triton lowering at the
real shapes, which rejects what a GPU would (block shapes that are not powers of two, unsupported
ops), so a decode path that cannot run on the GPU fails here first. Llama-2-7B widths, 2 layers,
shapes only (no weights are allocated).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import loraswitch_jax as lj
from loraswitch_jax.generate import generate_batch
from loraswitch_jax.ops import Impl
from tests.pallas.gpu_target import lower_for_gpu, triton_kernels

CFG = dataclasses.replace(lj.PRESETS["llama2-7b"], num_hidden_layers=2)


def adapter_shapes(mode):
    if mode is None:
        return None
    acfg = (lj.AdapterConfig.lora(rank=16) if mode == "lora"
            else lj.AdapterConfig(mode=mode, rank=16, num_experts=8, top_k=2))
    return jax.eval_shape(lambda: lj.init_adapter(CFG, acfg, jax.random.key(1), jnp.bfloat16))


@pytest.mark.parametrize("mode,strategy,batch", [
    (None, "fused", 1),
    (None, "fused", 40),  # rows padded to 64
    ("switch", "fused", 1),  # gather slots, expansion in registers
    ("switch", "fused", 3),  # 6 gather slots: 96 columns of xa, not a power of two
    ("switch", "fused", 8),  # dense slots, expansion by dots
    ("switch", "fused", 64),
    ("switch", "merge", 1),
    ("layerwise", "fused", 8),
    ("layerwise", "fused", 1),  # a route per layer, o's x A still from the attention kernel
    ("lora", "fused", 1),
])
def test_generation_lowers_for_gpu(mode, strategy, batch):
    params = jax.eval_shape(lambda: lj.init_params(CFG, jax.random.key(0)))
    gen = lj.GenerateConfig(max_new_tokens=4, stop_tokens=(), switch_strategy=strategy,
                            impl=Impl(backend="pallas", shrink_ahead=True))
    tokens = jax.ShapeDtypeStruct((batch, 16), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    text = lower_for_gpu(generate_batch, params, adapter_shapes(mode), tokens, lengths,
                         jax.random.key(0), cfg=CFG, gen=gen, cache_len=64, stream=None).as_text()
    kernels = " ".join(triton_kernels(text))
    assert "decode_attention" in kernels  # the kernel wherever it tiles the cache (pallas/tuned.py)
    if mode == "switch" and strategy == "fused":
        assert "lora_shrink_group3" in kernels  # q/k/v
        assert bool(re.search(r"routed_\w+_st\d_rows", kernels)) == (batch <= 3)
    # Shrink-ahead on: o's x A from the decode-attention kernel, gate/up's from o's routed
    # kernel and (a route shared by all layers: switch) the next layer's q/k/v's from down's,
    # both with the residual, with gather slots (switch and layerwise at batch 1 and 3: top-2 of
    # 8 experts); batch 8 and up have dense slots and keep every shrink launch.
    gather = mode in ("switch", "layerwise") and strategy == "fused" and batch * 2 < 8
    assert bool(re.search(r"decode_attention_\w+_oshrink32", kernels)) == gather
    residual = set(re.findall(r"routed_matmul_\w+_ahead", kernels))  # o's; down's: narrower
    assert len(residual) == (0 if not gather else 2 if mode == "switch" else 1)
    if mode in ("switch", "layerwise") and strategy == "fused":
        assert ("lora_shrink_group2" in kernels) == (not gather)  # gate/up's own shrink


@pytest.mark.parametrize("mode", [None, "switch"])
def test_xla_attention_where_the_kernel_does_not_tile(mode):
    """A cache length that is not a multiple of 16: the decode step attends with XLA's attention
    over ``cache[layer]`` instead of the decode-attention kernel, at 7B widths."""
    params = jax.eval_shape(lambda: lj.init_params(CFG, jax.random.key(0)))
    gen = lj.GenerateConfig(max_new_tokens=4, stop_tokens=(), impl=Impl(backend="pallas"))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    text = lower_for_gpu(generate_batch, params, adapter_shapes(mode), tokens,
                         jax.ShapeDtypeStruct((2,), jnp.int32), jax.random.key(0),
                         cfg=CFG, gen=gen, cache_len=60, stream=None).as_text()
    kernels = triton_kernels(text)
    assert kernels and not any(k.startswith("decode_attention") for k in kernels)
