"""Tensor, data and mixed meshes over the 8 CPU host devices equal one device: forward logits,
routes, prefill/decode logits and greedy generation, for the backbone and every adapter mode,
with XLA and with the Pallas kernels (interpret mode) inside ``shard_map``; the mesh config, the
PartitionSpecs of every leaf and the KV-head replication rule."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import loraswitch_jax as lj
from loraswitch_jax import parallel, sharding
from loraswitch_jax.sharding import MeshConfig, MeshError
from tests.helpers import VOCAB, make_adapter, rel_err, unit_norm_params

# 2 KV heads: split at tensor=2, replicated (2 copies each) at tensor=4. Local widths stay
# multiples of 16 at tensor=4 (q 16, kv 16, mlp 32), so the kernels tile them.
CFG = lj.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                     mlp_bias=True, max_position_embeddings=64)
MESHES = ("tensor=2", "tensor=4", "data=2,tensor=2", "fsdp=2,tensor=2")
MODES = ("backbone", "lora", "layerwise", "switch")
TOL = 1e-5


@functools.cache
def params() -> lj.LlamaParams:
    return unit_norm_params(CFG, 0, jnp.float32)


@functools.cache
def adapter(mode: str) -> lj.Adapter | None:
    if mode == "backbone":
        return None
    if mode == "lora":
        return make_adapter(CFG, seed=1, lora=True, std=0.1)
    if mode == "layerwise":  # a router on each layer
        return make_adapter(CFG, seed=2, mode=mode, num_experts=4, top_k=2, std=0.1)
    # router_layer 1: layer 0 stays plain backbone, so the route sees context.
    return make_adapter(CFG, seed=3, mode=mode, num_experts=4, top_k=2, std=0.1, router_layer=1)


TOKENS = np.random.RandomState(0).randint(0, VOCAB, (4, 8)).astype(np.int32)


@functools.cache
def reference_forward():
    f = jax.jit(lambda p, ads, t: [lj.forward(p, t, CFG, adapter=a) for a in ads])
    return [np.asarray(x) for x in f(params(), [adapter(m) for m in MODES], TOKENS)]


# ------------------------------------------------------------------ forward and routes
# XLA on every mesh; interpret-mode kernels at tensor=4 (KV heads replicated) and fsdp x tensor.
@pytest.mark.parametrize("impl,mesh", [("xla", m) for m in MESHES] + [
    ("pallas_interpret", "tensor=4"), ("pallas_interpret", "fsdp=2,tensor=2")])
def test_forward_equals_one_device_and_routes_agree_on_every_shard(impl, mesh):
    mesh = MeshConfig.parse(mesh)
    f = jax.jit(lambda p, ads, t: [
        parallel.forward(p, t, CFG, mesh=mesh, adapter=a, impl=impl, return_routing=True)
        for a in ads])
    outs = f(params(), [adapter(m) for m in MODES], TOKENS)
    for mode, (logits, routing), want in zip(MODES, outs, reference_forward()):
        assert rel_err(logits, want) < TOL, (mode, rel_err(logits, want))
        if mode in ("layerwise", "switch"):
            ids, probs = np.asarray(routing.expert_ids), np.asarray(routing.probs)
            assert ids.shape[0] == mesh.tensor  # [tensor, N, B, T, k]: one route per shard
            for shard in range(1, mesh.tensor):
                np.testing.assert_array_equal(ids[shard], ids[0], err_msg=mode)
                np.testing.assert_array_equal(probs[shard], probs[0], err_msg=mode)
        else:
            assert routing is None


# ------------------------------------------------------------------ prefill and decode
@pytest.mark.parametrize("mesh,impl,mode", [("tensor=4", "pallas_interpret", "switch")])
def test_prefill_and_decode_logits_equal_one_device(mesh, impl, mode):
    mesh = MeshConfig.parse(mesh)
    tokens, lengths = TOKENS[:, :6], jnp.array([6, 3, 5, 1], jnp.int32)
    steps = jnp.array([[5, 9, 11, 13], [7, 1, 2, 3]], jnp.int32)
    p, a = params(), adapter(mode)  # concrete before any trace (they are cached)

    def run(prefill, decode, cache):
        # Chunks of 4 of the 6 prompt tokens: the chunked prefill (a scan) runs per shard too.
        logits, cache = prefill(p, cache, tokens, lengths, CFG, adapter=a, chunk=4)
        out = [logits]
        for step in steps:
            logits, cache = decode(p, cache, step, CFG, adapter=a, impl=impl)
            out.append(logits)
        return out

    want = jax.jit(lambda: run(lj.prefill, lj.decode_step, lj.init_cache(CFG, 4, 16, jnp.float32)))()
    got = jax.jit(lambda: run(functools.partial(parallel.prefill, mesh=mesh, impl=impl),
                              functools.partial(parallel.decode_step, mesh=mesh),
                              parallel.init_cache(CFG, 4, 16, jnp.float32, mesh=mesh)))()
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL


# ------------------------------------------------------------------ greedy generation
PROMPTS = [np.array([3, 17, 42, 99, 5, 61, 8], np.int32), np.array([120, 7, 33, 2, 150], np.int32)]


@functools.cache
def reference_generation(mode: str, strategy: str) -> np.ndarray:
    prompts = PROMPTS[:1] if strategy == "merge" else PROMPTS
    gen = lj.GenerateConfig(max_new_tokens=6, stop_tokens=(), impl="xla", switch_strategy=strategy)
    return lj.generate(params(), CFG, prompts, gen, adapter=adapter(mode)).tokens


# Each mesh, each mode and the merge strategy at least once, most with both impls (forward covers
# every mode on every mesh); merge on a data mesh too (its one row is replicated over data).
@pytest.mark.parametrize("mode,strategy,mesh,impl", [
    ("backbone", "fused", "tensor=4", "pallas_interpret"),
    ("lora", "fused", "fsdp=2,tensor=2", "pallas_interpret"),
    ("layerwise", "fused", "tensor=2", "xla"),
    ("layerwise", "fused", "data=2,tensor=2", "pallas_interpret"),
    ("switch", "fused", "fsdp=2,tensor=2", "xla"),
    ("switch", "fused", "tensor=4", "pallas_interpret"),
    ("switch", "merge", "data=2,tensor=2", "xla"),
    ("switch", "merge", "tensor=4", "pallas_interpret"),
])
def test_greedy_generation_equals_one_device(mode, strategy, mesh, impl):
    prompts = PROMPTS[:1] if strategy == "merge" else PROMPTS
    gen = lj.GenerateConfig(max_new_tokens=6, stop_tokens=(), impl=impl, switch_strategy=strategy,
                            mesh=mesh)
    got = lj.generate(params(), CFG, prompts, gen, adapter=adapter(mode)).tokens
    np.testing.assert_array_equal(got, reference_generation(mode, strategy))


def test_generation_refuses_bad_meshes():
    with pytest.raises(lj.GenerationError, match="bad mesh item"):
        lj.GenerateConfig(mesh="model=2")
    with pytest.raises(lj.GenerationError, match="needs 16 devices"):
        lj.generate(params(), CFG, PROMPTS, lj.GenerateConfig(max_new_tokens=2, mesh="data=16"))
    with pytest.raises(lj.GenerationError, match="does not divide the 4 attention heads"):
        lj.generate(params(), CFG, PROMPTS, lj.GenerateConfig(max_new_tokens=2, mesh="tensor=8"))


# ------------------------------------------------------------------ mesh config and specs
def test_mesh_config_parses_and_refuses_in_one_line():
    assert MeshConfig.parse("data=2,tensor=4") == MeshConfig(data=2, tensor=4)
    assert MeshConfig.parse(" fsdp=2 ") == MeshConfig(fsdp=2)
    assert MeshConfig.parse("") == MeshConfig()
    assert str(MeshConfig(tensor=4)) == "data=1,fsdp=1,tensor=4"
    for bad, message in [("pipe=2", "bad mesh item"), ("data=0", "positive integer"),
                         ("tensor=-1", "positive integer"), ("data=x", "integer size"),
                         ("data=2,data=2", "given twice"), ("tensor", "bad mesh item")]:
        with pytest.raises(MeshError, match=message) as info:
            MeshConfig.parse(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(MeshError, match="needs 16 devices, but only 8"):
        MeshConfig(data=4, tensor=4).make_mesh()
    mesh = MeshConfig(data=2, tensor=4).make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 1, 4)
    assert MeshConfig(data=2, tensor=4).make_mesh() is mesh


def test_specs_follow_the_megatron_layout():
    mesh = MeshConfig(data=2, tensor=2)
    ps = sharding.param_specs(params(), mesh)
    assert ps.layers.wq == P(None, None, "tensor") and ps.layers.bq == P(None, "tensor")
    assert ps.layers.wk == P(None, None, "tensor")
    assert ps.layers.wo == P(None, "tensor", None) and ps.layers.bo == P(None, None)
    assert ps.layers.w_down == P(None, "tensor", None) and ps.layers.w_up == P(None, None, "tensor")
    assert ps.embed == P(None, None) and ps.lm_head == P(None, "tensor")
    assert ps.layers.attn_norm == P(None, None)
    fsdp = sharding.param_specs(params(), MeshConfig(fsdp=2, tensor=2), shard_fsdp=True)
    assert fsdp.layers.wq == P(None, "fsdp", "tensor") and fsdp.layers.wo == P(None, "tensor", "fsdp")

    a = sharding.adapter_specs(adapter("switch"), mesh)
    for proj in ("q", "k", "v", "gate", "up"):  # column-parallel: A replicated, B by output
        assert a.a[proj] == P(None, None, None, None) and a.b[proj] == P(None, None, None, "tensor")
    for proj in ("o", "down"):  # row-parallel: A by input, B replicated
        assert a.a[proj] == P(None, None, "tensor", None) and a.b[proj] == P(None, None, None, None)
    assert a.router == P(None, None)
    assert sharding.adapter_specs(adapter("layerwise"), mesh).router == P(None, None, None)

    cache = jax.eval_shape(lambda: lj.init_cache(CFG, 4, 16, jnp.float32))
    c = sharding.cache_specs(cache, mesh)
    assert c.k == P(None, ("data", "fsdp"), None, "tensor", None) and c.lengths == P(("data", "fsdp"))
    assert sharding.batch_spec(mesh, 4) == P(("data", "fsdp"), None)
    assert sharding.batch_spec(mesh, 3) == P(None, None)  # rows that do not divide: replicated
    with pytest.raises(MeshError, match="heads axis .* does not divide over tensor=3"):
        sharding.logical_spec("wq", (2, 64, 64), MeshConfig(tensor=3))


def test_shard_places_each_shard_its_slice():
    mesh = MeshConfig(data=2, tensor=4)
    placed, ad = parallel.place(params(), adapter("switch"), CFG, mesh)
    assert placed.layers.wq.sharding.shard_shape(placed.layers.wq.shape) == (2, 64, 16)
    assert placed.layers.wk.shape == (2, 64, 64)  # 2 KV heads replicated to 4
    assert placed.layers.wk.sharding.shard_shape(placed.layers.wk.shape) == (2, 64, 16)
    assert ad.a["o"].sharding.shard_shape(ad.a["o"].shape) == (1, 4, 16, 4)
    assert ad.b["k"].shape == (1, 4, 4, 64)
    np.testing.assert_array_equal(np.asarray(placed.layers.wq), np.asarray(params().layers.wq))


def test_kv_heads_fewer_than_tensor_are_replicated_by_the_stated_rule():
    with pytest.raises(MeshError, match="neither divide"):
        sharding.check_tensor_fits(dataclasses.replace(CFG, num_attention_heads=12,
                                                       num_key_value_heads=6, head_dim=16),
                                   MeshConfig(tensor=4))
    assert sharding.kv_replicas(CFG, 4) == 2 and sharding.kv_replicas(CFG, 2) == 1
    p, a = sharding.expand_kv_heads(params(), adapter("switch"), CFG, 4)
    wk, wk0 = np.asarray(p.layers.wk), np.asarray(params().layers.wk)
    for copy in range(4):  # copy c holds KV head c // 2
        np.testing.assert_array_equal(wk[..., copy * 16:(copy + 1) * 16],
                                      wk0[..., copy // 2 * 16:(copy // 2 + 1) * 16])
    np.testing.assert_array_equal(np.asarray(p.layers.bv)[:, 48:], np.asarray(params().layers.bv)[:, 16:])
    assert sharding.expand_kv_heads(p, a, CFG, 4)[0] is p  # already expanded: untouched
    # One device, expanded heads: a model of 4 KV heads with the same attention, same logits.
    expanded = dataclasses.replace(CFG, num_key_value_heads=4)
    got = jax.jit(lambda p, a: lj.forward(p, TOKENS, expanded, adapter=a))(p, a)
    assert rel_err(got, reference_forward()[MODES.index("switch")]) < TOL


def test_one_all_reduce_per_sub_layer_and_none_for_adapters():
    """A decode step at tensor=4 has 2 all-reduces a layer (after o, after down), with or without
    an adapter, and no other collective: the row-parallel adapter terms ride on the layer's own."""
    mesh = MeshConfig(tensor=4)
    cache = jax.eval_shape(lambda: parallel.init_cache(CFG, 2, 16, jnp.float32, mesh=mesh))
    for mode, impl in (("backbone", "xla"), ("layerwise", "xla"), ("switch", "pallas_interpret")):
        step = jax.jit(lambda p, c, tok, a: parallel.decode_step(p, c, tok, CFG, mesh=mesh,
                                                                 adapter=a, impl=impl))
        text = step.lower(params(), cache, jnp.zeros((2,), jnp.int32), adapter(mode)).as_text()
        assert text.count("stablehlo.all_reduce") == 2 * CFG.num_hidden_layers, mode
        for other in ("all_gather", "all_to_all", "collective_permute", "reduce_scatter"):
            assert other not in text, (mode, other)
