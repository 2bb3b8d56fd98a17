"""The memory planner: its figures against the real program compiled and run on placed arrays
(8 CPU devices, tiny configs), its errors, the subprocess for big meshes and ``loraswitch plan``."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax import cli, parallel
from loraswitch_jax.generate import GenerateConfig, generate_batch
from loraswitch_jax.planner import GPUS, PlanError, plan, usable_bytes
from loraswitch_jax.sharding import MeshConfig
from loraswitch_jax.train.placement import plan_placement
from loraswitch_jax.train.step import OptimConfig, init_state
from tests.test_cli import assert_one_line_error, run_cli

# GQA with 2 KV heads, so tensor=4 replicates each KV head twice (the planner must follow).
CFG = lj.PRESETS["demo"]
ACFG = lj.AdapterConfig(mode="switch", rank=4, num_experts=4, top_k=2)


def device0_bytes(tree) -> int:
    """Bytes the leaves of ``tree`` hold on the first device."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)


def total_of(compiled) -> int:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def test_presets_have_the_published_sizes():
    billions = {"llama2-7b": 6.74, "llama3-8b": 8.03, "llama2-70b": 68.98, "llama3-70b": 70.55}
    for name, size in billions.items():
        assert lj.PRESETS[name].num_params() / 1e9 == pytest.approx(size, abs=0.01), name
    assert lj.PRESETS["llama3-70b"].num_key_value_heads == 8


def test_inference_plan_matches_the_placed_and_compiled_program():
    mc = MeshConfig(data=2, tensor=4)
    B, context, new = 4, 64, 8
    p = plan(CFG, "data=2,tensor=4", batch=B, context=context, new_tokens=new,
             adapter="switch", experts=4, rank=4, top_k=2)

    params = lj.init_params(CFG, jax.random.key(0), jnp.bfloat16)
    adapter = lj.init_adapter(CFG, ACFG, jax.random.key(1))
    params, adapter = parallel.place(params, adapter, CFG, mc)
    assert p.weights == device0_bytes(params) and p.adapters == device0_bytes(adapter)
    cache = jax.jit(lambda: parallel.init_cache(CFG, B, context, jnp.bfloat16, mesh=mc))()
    assert p.kv_cache == device0_bytes(cache) > 0

    tokens = jnp.ones((B, 64), jnp.int32)  # generate's bucket of a 56-token prompt
    lengths = jnp.full((B,), context - new, jnp.int32)
    gen = GenerateConfig(max_new_tokens=new, mesh=mc)
    args = (params, adapter, tokens, lengths, jax.random.key(0))
    compiled = generate_batch.lower(*args, cfg=CFG, gen=gen, cache_len=context,
                                    stream=None).compile()
    assert abs(p.total - total_of(compiled)) <= 0.10 * total_of(compiled)
    parts = (p.weights + p.adapters + p.kv_cache + p.optimizer + p.inputs + p.activations
             + p.outputs)
    assert parts == p.total and p.optimizer == 0

    out = compiled(*args)
    jax.block_until_ready(out)
    live = device0_bytes([params, adapter, out])
    # What stays live after the run: the arguments the plan counts (less the host-side inputs).
    assert abs(live - (p.weights + p.adapters)) <= 0.10 * live


def test_train_plan_matches_the_placed_and_run_step():
    mc = MeshConfig(fsdp=2, tensor=2)
    B, T = 4, 32
    p = plan(CFG, "fsdp=2,tensor=2", batch=B, train=True, seq_len=T, remat="dots",
             adapter="switch", experts=4, rank=4, top_k=2, loss_chunk=64)

    oc = OptimConfig()
    params = lj.init_params(CFG, jax.random.key(0), jnp.bfloat16)
    state = init_state(lj.init_adapter(CFG, ACFG, jax.random.key(1)), oc, 0)
    placement = plan_placement(mc, CFG, params, state, B)
    params = jax.device_put(params, placement.params)
    state = jax.device_put(state, placement.state)
    assert p.weights == device0_bytes(params)
    assert p.adapters == device0_bytes(state.adapter) > 0
    assert p.optimizer == device0_bytes(state.opt_state) > p.adapters  # Adam: two moments
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, CFG.vocab_size, (1, B, T)).astype(np.int32)
             for k in ("tokens", "targets", "positions")}
    batch["loss_mask"] = np.ones((1, B, T), np.float32)
    batch["segment_ids"] = np.ones((1, B, T), np.int32)
    batch = placement.put_batch(batch)
    kw = dict(cfg=CFG, oc=oc, remat="dots", attention_chunk=512, loss_chunk=64)  # 2 chunks
    compiled = placement.train_step.lower(state, params, batch, **kw).compile()
    assert abs(p.total - total_of(compiled)) <= 0.10 * total_of(compiled)
    assert p.kv_cache == 0 and p.activations > 0

    state, metrics = compiled(state, params, batch)
    jax.block_until_ready(state)
    live = device0_bytes([params, state, batch, metrics])
    args = p.weights + p.adapters + p.optimizer + p.inputs
    assert abs(live - args) <= 0.10 * live


def test_fits_uses_the_stated_headroom():
    p = plan(CFG, "", batch=1, context=32, new_tokens=4, adapter="none")
    assert p.adapters == 0 and p.platform == "cpu" and any("CPU" in n for n in p.notes)
    room = usable_bytes("h100")
    assert room == int(GPUS["h100"] * 0.9)
    assert dataclasses.replace(p, total=room).fits("h100")
    assert not dataclasses.replace(p, total=room + 1).fits("h100")
    assert dataclasses.replace(p, total=room + 1).fits("h200")
    with pytest.raises(PlanError, match="unknown gpu 'v100'"):
        p.fits("v100")


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="nope"), "neither a preset"),
    (dict(model=CFG, mesh="tensor=3"), "tensor=3 does not divide"),
    (dict(model=CFG, mesh="tensor=two"), "mesh"),
    (dict(model=CFG, batch=0), "batch must be a positive integer"),
    (dict(model=CFG, context=CFG.max_position_embeddings + 1), "max_position_embeddings"),
    (dict(model=CFG, context=16, new_tokens=16), "new_tokens"),
    (dict(model=CFG, train=True, adapter="none"), "training needs an adapter"),
    (dict(model=CFG, adapter="moe"), "adapter must be one of"),
    (dict(model=CFG, train=True, remat="some"), "remat must be one of"),
    (dict(model=CFG, train=True, attention_impl="flash"), "attention_impl must be one of"),
    (dict(model=CFG, train=True, loss_chunk=0), "loss_chunk must be a positive integer"),
    (dict(model=CFG, train=True, mesh="data=2", batch=3, seq_len=16), "not divisible"),
])
def test_bad_requests_raise_one_clear_error(kwargs, match):
    with pytest.raises(PlanError, match=match):
        plan(**kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU's refusal")
def test_cudnn_training_plans_only_on_a_gpu():
    with pytest.raises(PlanError, match="attention_impl 'cudnn' compiles only on a GPU"):
        plan(CFG, train=True, seq_len=32, attention_impl="cudnn")


def test_a_mesh_larger_than_the_devices_compiles_in_a_subprocess():
    p = plan(CFG, "data=16", batch=16, context=32, new_tokens=4, adapter="none")
    assert p.devices == 16 and p.model == "custom" and any("subprocess" in n for n in p.notes)
    one = plan(CFG, "", batch=1, context=32, new_tokens=4, adapter="none")
    assert p.weights == one.weights  # data parallel: every device holds all weights
    assert p.kv_cache == one.kv_cache  # one row per device


def test_cli_plan_prints_and_writes_json(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "plan", "--model", "demo", "--mesh", "tensor=2", "--batch",
                           "2", "--context", "64", "--new-tokens", "8", "--gpu", "h100",
                           "--json", tmp_path / "plan.json")
    assert rc == 0, err
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["model"] == "demo" and saved["devices"] == 2
    for label in ("weights", "adapters", "KV cache", "optimizer state",
                  "activations/temporaries", "total"):
        assert f"\n  {label} " in out, label
    assert "fits one h100" in out and "h200" not in out

    rc, _, err = run_cli(capsys, "plan", "--model", tmp_path / "missing")
    assert_one_line_error(rc, err, "--model", "missing")
    rc, _, err = run_cli(capsys, "plan", "--model", "demo", "--mesh", "tensor=x")
    assert_one_line_error(rc, err, "--mesh")
    rc, _, err = run_cli(capsys, "plan", "--model", "demo", "--gpu", "v100")
    assert_one_line_error(rc, err, "--gpu", "v100")
    rc, _, err = run_cli(capsys, "plan", "--model", "demo", "--batch", "-1")
    assert_one_line_error(rc, err, "--batch")
    rc, _, err = run_cli(capsys, "plan", "--model", "demo", "--train", "--loss-chunk", "0")
    assert_one_line_error(rc, err, "--loss-chunk")
    rc, _, err = run_cli(capsys, "plan", "--model", "demo", "--train", "--attention-impl", "flash")
    assert_one_line_error(rc, err, "--attention-impl", "flash")
