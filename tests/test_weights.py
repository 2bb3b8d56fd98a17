"""safetensors I/O: exact round trips, sharding, transformers compatibility, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import loraswitch_jax as lj
from tests.helpers import jit_forward, random_params, rel_err, require
from tests.hf_models import hf_logits
from loraswitch_jax import WeightsError

torch = require("torch")  # every test here builds on the reference models
transformers = require("transformers")

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def assert_params_equal(got: lj.LlamaParams, want: lj.LlamaParams):
    got_leaves, got_tree = jax.tree.flatten_with_path(got)
    want_leaves, want_tree = jax.tree.flatten_with_path(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        name = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(
            np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name
        )


@pytest.fixture(scope="module")
def saved(llama3_case, tmp_path_factory):
    """Random float32 params of the llama3 case's config, saved in one file; tests copy it."""
    cfg = llama3_case.cfg
    params = random_params(cfg, 3, jnp.float32)
    folder = tmp_path_factory.mktemp("saved")
    lj.save_params(params, cfg, folder)
    return folder, params, cfg


def copy_of(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)
    return folder


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_round_trip_exact(case, dtype, tmp_path):
    """Tied (mha) and untied with biases (gqa_llama3), in float32 and bf16."""
    params = random_params(case.cfg, 0, dtype)
    lj.save_params(params, case.cfg, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", SINGLE]  # no temp folder left behind
    loaded, cfg = lj.load_params(tmp_path, dtype=dtype)
    assert cfg == case.cfg
    assert (loaded.lm_head is None) == case.cfg.tie_word_embeddings
    assert_params_equal(loaded, params)


def test_sharded_round_trip(case, tmp_path):
    params = random_params(case.cfg, 1, jnp.float32)
    lj.save_params(params, case.cfg, tmp_path, max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert INDEX in files and SINGLE not in files
    assert len(shards) >= 3, files
    with open(tmp_path / INDEX) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == shards
    # every tensor transformers expects, each in exactly one shard
    expected = set(case.hf.state_dict())
    if case.cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    expected = {n for n in expected if not n.endswith("rotary_emb.inv_freq")}
    assert set(weight_map) == expected
    for shard in shards:
        names = set(load_file(tmp_path / shard))
        assert names == {n for n, fn in weight_map.items() if fn == shard}
    loaded, _ = lj.load_params(tmp_path, dtype=jnp.float32)
    assert_params_equal(loaded, params)


def test_resave_replaces_other_layout(case, tmp_path):
    """A sharded save over a single-file one (and back) leaves one loadable layout."""
    first = random_params(case.cfg, 5, jnp.float32)
    second = random_params(case.cfg, 6, jnp.float32)
    lj.save_params(first, case.cfg, tmp_path)
    lj.save_params(second, case.cfg, tmp_path, max_shard_bytes=64 * 1024)
    assert SINGLE not in os.listdir(tmp_path)
    assert_params_equal(lj.load_params(tmp_path, dtype=jnp.float32)[0], second)
    lj.save_params(first, case.cfg, tmp_path)
    assert INDEX not in os.listdir(tmp_path)
    assert_params_equal(lj.load_params(tmp_path, dtype=jnp.float32)[0], first)


def test_transformers_loads_our_folder(case, tokens, tmp_path):
    """Params that never came from transformers: save, load there, same logits as ours."""
    params = random_params(case.cfg, 2, jnp.float32)
    lj.save_params(params, case.cfg, tmp_path, max_shard_bytes=64 * 1024)
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, torch_dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ours = jit_forward()(params, jnp.asarray(tokens), case.cfg)
    assert rel_err(ours, hf_logits(model.eval(), tokens)) < 1e-4


def test_transformers_round_trip_is_exact(case, tmp_path):
    """transformers' weights -> ours -> saved -> transformers: every tensor unchanged."""
    lj.save_params(case.params, case.cfg, tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    want = case.hf.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------- errors


def test_no_weights_in_folder(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    os.remove(folder / SINGLE)
    with pytest.raises(WeightsError, match=f"no {SINGLE} or {INDEX}"):
        lj.load_params(folder)


def test_index_names_missing_shard(saved, tmp_path):
    folder = tmp_path / "sharded"
    lj.save_params(saved[1], saved[2], folder, max_shard_bytes=64 * 1024)
    victim = sorted(f for f in os.listdir(folder) if f.startswith("model-"))[1]
    os.remove(folder / victim)
    with pytest.raises(WeightsError, match=victim):
        lj.load_params(folder)


def rewrite(folder, change):
    """Apply ``change`` to the tensors dict of ``folder``'s single safetensors file."""
    tensors = load_file(folder / SINGLE)
    change(tensors)
    save_file(tensors, folder / SINGLE, metadata={"format": "pt"})


def test_missing_tensor(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    name = "model.layers.1.mlp.up_proj.bias"
    rewrite(folder, lambda t: t.pop(name))
    with pytest.raises(WeightsError, match=f"missing tensors.*{name}"):
        lj.load_params(folder)


def test_missing_tensor_listed_in_index(saved, tmp_path):
    """The index promises a tensor that its shard does not hold."""
    folder = tmp_path / "sharded"
    lj.save_params(saved[1], saved[2], folder, max_shard_bytes=64 * 1024)
    with open(folder / INDEX) as f:
        index = json.load(f)
    name = "model.layers.0.self_attn.k_proj.weight"
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=name):
        lj.load_params(folder)


def test_wrong_shape(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    name = "model.layers.1.self_attn.v_proj.weight"  # [KV*hd, d] = [32, 64]

    def truncate(t):
        t[name] = np.ascontiguousarray(t[name][:16])

    rewrite(folder, truncate)
    with pytest.raises(WeightsError, match=rf"{name}.*\(16, 64\).*\(32, 64\)"):
        lj.load_params(folder)


def test_unexpected_tensor(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    name = "model.layers.0.self_attn.extra_proj.weight"
    rewrite(folder, lambda t: t.__setitem__(name, np.zeros((4, 4), np.float32)))
    with pytest.raises(WeightsError, match=f"unexpected.*{name}"):
        lj.load_params(folder)


def test_weights_from_another_config(saved):
    """Explicit config whose hidden size disagrees with the files: the first mismatch is named."""
    folder, _, cfg = saved
    wider = dataclasses.replace(cfg, hidden_size=128, head_dim=None)
    with pytest.raises(WeightsError, match=r"input_layernorm.weight.*\(64,\).*\(128,\)"):
        lj.load_params(folder, cfg=wider)


def test_bias_tensors_for_config_without_bias(saved):
    """Biases in the files that the config does not have are unexpected tensors."""
    folder, _, cfg = saved
    no_bias = dataclasses.replace(cfg, attention_bias=False)
    with pytest.raises(WeightsError, match=r"unexpected.*self_attn.*bias"):
        lj.load_params(folder, cfg=no_bias)


def test_save_rejects_params_config_mismatch(saved, tmp_path):
    _, params, cfg = saved
    with pytest.raises(WeightsError, match="lm_head"):
        lj.save_params(params, dataclasses.replace(cfg, tie_word_embeddings=True), tmp_path)
    assert not os.path.exists(tmp_path / SINGLE)


def test_invalid_index_json(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / INDEX).write_text('{"weight_map": ')
    with pytest.raises(WeightsError, match=f"{INDEX}.*not a valid safetensors index"):
        lj.load_params(folder)


def test_truncated_file(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    data = (folder / SINGLE).read_bytes()
    (folder / SINGLE).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=SINGLE):
        lj.load_params(folder)
