"""Training on a data/fsdp/tensor mesh equals one device; a checkpoint moves between meshes."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax.cli import main as cli_main
from loraswitch_jax.sharding import MeshConfig, MeshError
from loraswitch_jax.train.config import ConfigFileError, load_train_config
from loraswitch_jax.train.loop import train
from loraswitch_jax.train.placement import plan_placement
from loraswitch_jax.train.step import OptimConfig, init_state, train_step
from tests.helpers import assert_same_run, random_params, rel_err

CFG = lj.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# Adam's first steps move every weight by about lr * sign(g): a near-zero gradient's float32
# summation order (another mesh reduces in another order) shows as up to ~lr/2 in the weight, so
# lr is the default's order (2e-4), not a large one that would turn that noise into 1e-5 errors.
OC = OptimConfig(lr=1e-3, warmup_steps=0, steps=10, grad_accum=2)
STEPS = 2


def _batch(seed: int = 0) -> dict:
    """``[A=2, B=4, T=24]`` packed rows (three segments each), a random loss mask."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, CFG.vocab_size, (2, 4, 25)).astype(np.int32)
    seg = np.repeat(np.arange(3, dtype=np.int32), 8)
    return dict(tokens=tokens[..., :-1], targets=tokens[..., 1:],
                loss_mask=(rng.rand(2, 4, 24) > 0.2).astype(np.float32),
                segment_ids=np.broadcast_to(seg, (2, 4, 24)).copy(),
                positions=np.broadcast_to(np.tile(np.arange(8, dtype=np.int32), 3), (2, 4, 24)).copy())


def _setup():
    params = random_params(CFG, 0, jnp.float32)
    acfg = lj.AdapterConfig(mode="switch", rank=4, alpha=8.0, num_experts=4, top_k=2, dropout=0.1)
    adapter = lj.init_adapter(CFG, acfg, jax.random.key(1))
    # B random too, so the first step's gradients reach every factor.
    rng = np.random.RandomState(2)
    adapter = dataclasses.replace(adapter, b={p: jnp.asarray(0.1 * rng.standard_normal(x.shape),
                                                             jnp.float32)
                                              for p, x in adapter.b.items()})
    return params, adapter


def _run(step_fn, state, params, batches, remat):
    losses = []
    for batch in batches:
        # attention_chunk 16 < T = 24: the blockwise attention runs (and is differentiated).
        state, metrics = step_fn(state, params, batch, cfg=CFG, oc=OC, remat=remat,
                                 attention_chunk=16)
        losses.append(jax.device_get(metrics))
    return state, losses


@pytest.fixture(scope="module")
def one_device():
    """The reference: ``STEPS`` steps on one device, with remat off and on."""
    params, adapter = _setup()
    batches = [_batch(i) for i in range(STEPS)]
    out = {}
    for remat in ("none", "full"):
        state, metrics = _run(train_step, init_state(adapter, OC, 0), params,
                              [jax.tree.map(jnp.asarray, b) for b in batches], remat)
        out[remat] = (jax.device_get(state.adapter), metrics)
    return params, adapter, batches, out


# More meshes and policies: tests/train/test_fsdp.py (loss and gradients).
@pytest.mark.parametrize("mesh, remat", [("data=2,fsdp=2,tensor=2", "none"),
                                         ("fsdp=2,tensor=2", "full")])
def test_train_step_on_a_mesh_equals_one_device(one_device, mesh, remat):
    params, adapter, batches, ref = one_device
    mc = MeshConfig.parse(mesh)
    state = init_state(adapter, OC, 0)
    placement = plan_placement(mc, CFG, params, state, batch_size=4)
    params = jax.device_put(params, placement.params)
    state = jax.device_put(state, placement.state)
    # The backbone and the Adam moments really are split (embed over fsdp, heads over tensor).
    assert params.layers.wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert state.opt_state[1][0].mu.b["q"].sharding.spec[-1] == "tensor"
    state, metrics = _run(placement.train_step, state, params,
                          [placement.put_batch(b) for b in batches], remat)
    want_adapter, want_metrics = ref[remat]
    for got, want in zip(metrics, want_metrics):
        for key in ("loss", "aux", "grad_norm", "tokens"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), key
        np.testing.assert_allclose(got["usage"], want["usage"], rtol=1e-5, atol=1e-6)
    assert state.adapter.a["q"].sharding == placement.state.adapter.a["q"]
    for got, want in zip(jax.tree.leaves(jax.device_get(state.adapter)),
                         jax.tree.leaves(want_adapter)):
        assert rel_err(got, want) < 1e-5


def test_remat_changes_nothing_on_one_device(one_device):
    _, _, _, ref = one_device
    for got, want in zip(ref["full"][1], ref["none"][1]):
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
    for got, want in zip(jax.tree.leaves(ref["full"][0]), jax.tree.leaves(ref["none"][0])):
        assert rel_err(got, want) < 1e-5  # after Adam (see OC); the gradients: tests/test_remat


SMALL = ["data.seq_len=32", "data.batch_size=8", "optim.steps=6", "optim.warmup_steps=1",
         "save_every=2", "eval_every=3", "eval_batches=1", "dtype=float32", "remat=full",
         "attention_chunk=16", "adapter.dropout=0.1"]


def test_checkpoint_saved_on_fsdp4_resumes_on_tensor2_like_one_device(tmp_path):
    """The whole loop (steps, held-out evaluation, checkpoints, export) on a mesh equals one
    device, and a checkpoint saved on one mesh resumes on another."""
    def config(name, mesh):
        return load_train_config(None, [f"out_dir={tmp_path / name}", *SMALL, f"mesh={mesh}"])

    train(config("full", "data=1"), progress=False)
    train(config("cut", "fsdp=4"), stop_after=4, progress=False)  # last checkpoint: step 4
    tc = config("cut", "tensor=2")
    assert tc.mesh_config(8) == MeshConfig(tensor=2)
    train(tc, progress=False)
    assert_same_run(tmp_path / "cut", tmp_path / "full", steps=6)


def test_mesh_config_and_errors(tmp_path, capsys):
    tc = load_train_config(None, [f"out_dir={tmp_path}", "mesh=fsdp=2,tensor=2"])
    assert tc.mesh_config(8) == MeshConfig(fsdp=2, tensor=2)
    assert cli_main(["train", "mesh=fsdp=2,tensor=2", "remat=full", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mesh"] == "fsdp=2,tensor=2" and printed["remat"] == "full"
    assert tc.remat == "dots" and tc.attention_chunk == 512  # the defaults
    legacy = load_train_config(None, [f"out_dir={tmp_path}", "data_parallel=4", "fsdp=true"])
    assert legacy.mesh_config(8) == MeshConfig(fsdp=4)
    default = load_train_config(None, [f"out_dir={tmp_path}", "data.batch_size=12"])
    assert default.mesh_config(8) == MeshConfig(data=6)  # all devices that divide the batch
    assert default.mesh_config(1) == MeshConfig(data=1)
    for override, message in (
        ("mesh=fsdp=two", "mesh: mesh axis fsdp needs an integer size"),
        ("mesh=pipe=2", "mesh: bad mesh item 'pipe=2'"),
        ("remat=some", "remat must be one of"),
        ("attention_chunk=0", "attention_chunk must be an integer >= 1 or null"),
    ):
        with pytest.raises(ConfigFileError, match=message):
            load_train_config(None, [f"out_dir={tmp_path}", override])
    with pytest.raises(ConfigFileError, match="give mesh or data_parallel/fsdp, not both"):
        load_train_config(None, [f"out_dir={tmp_path}", "mesh=data=2", "data_parallel=2"])
    params, adapter = _setup()
    state = jax.eval_shape(lambda: init_state(adapter, OC, 0))
    with pytest.raises(MeshError, match="batch_size 4 is not divisible by data \\* fsdp = 8"):
        plan_placement(MeshConfig(data=2, fsdp=4), CFG, params, state, batch_size=4)
    with pytest.raises(MeshError, match="tensor=4 does not divide the 2 KV heads"):
        plan_placement(MeshConfig(tensor=4), CFG, params, state, batch_size=4)
    with pytest.raises(MeshError, match="needs 16 devices"):
        plan_placement(MeshConfig(data=16), CFG, params, state, batch_size=16)
