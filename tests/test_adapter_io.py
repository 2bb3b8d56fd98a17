"""Adapter files in our format: exact round trips, errors that name the problem; merged export."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loraswitch_jax import AdapterError
from loraswitch_jax.adapter_io import (
    ADAPTER_CONFIG,
    ADAPTER_TENSORS,
    export_merged,
    load_adapter,
    merge_lora,
    save_adapter,
)
from loraswitch_jax.peft_io import import_peft
from tests.helpers import assert_adapters_equal, logits, make_adapter, rel_err, require
from tests.hf_models import hf_logits

torch = require("torch")  # every test here builds on the reference models
transformers = require("transformers")


# ------------------------------------------------------------------------------ our format

MODES = {
    "lora": dict(lora=True),
    "lora_layer1": dict(lora=True, router_layer=1, targets=("q", "v", "down")),
    "layerwise": dict(mode="layerwise", num_experts=3, top_k=2),
    "switch": dict(mode="switch", num_experts=4, top_k=2),
    "switch_layer1": dict(mode="switch", num_experts=4, top_k=1, router_layer=1),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_cfg", [True, False], ids=["cfg", "nocfg"])
def test_round_trip_is_exact(llama3_case, tmp_path, mode, with_cfg):
    cfg = llama3_case.cfg
    adapter = make_adapter(cfg, **MODES[mode])
    save_adapter(adapter, tmp_path, cfg if with_cfg else None)
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_CONFIG, ADAPTER_TENSORS])  # no temp left
    assert_adapters_equal(load_adapter(tmp_path), adapter)
    assert_adapters_equal(load_adapter(tmp_path, cfg), adapter)


def test_round_trip_bf16_and_overwrite(llama3_case, tmp_path):
    cfg = llama3_case.cfg
    save_adapter(make_adapter(cfg, seed=5, mode="switch", num_experts=2), tmp_path, cfg)
    adapter = make_adapter(cfg, **MODES["layerwise"])
    adapter = jax.tree.map(lambda x: x.astype(jnp.bfloat16), adapter)
    save_adapter(adapter, tmp_path, cfg)  # replaces the switch adapter
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_CONFIG, ADAPTER_TENSORS])
    assert_adapters_equal(load_adapter(tmp_path, cfg, dtype=jnp.bfloat16), adapter)
    assert_adapters_equal(load_adapter(tmp_path, cfg, dtype=None), adapter)
    as_f32 = load_adapter(tmp_path, cfg)
    assert as_f32.dtype == jnp.float32
    assert json.load(open(tmp_path / ADAPTER_CONFIG))["dtype"] == "bfloat16"


@pytest.fixture
def saved(llama3_case, tmp_path):
    """A switch adapter saved without a model config (so shape checks come from ``cfg``)."""
    adapter = make_adapter(llama3_case.cfg, mode="switch", num_experts=2, top_k=1)
    save_adapter(adapter, tmp_path)
    return tmp_path


def rewrite_tensors(folder, edit):
    path = os.path.join(folder, ADAPTER_TENSORS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_load_errors_name_the_problem(llama3_case, saved):
    cfg = llama3_case.cfg
    path = saved / ADAPTER_TENSORS
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated"):
        load_adapter(saved, cfg)
    path.unlink()
    with pytest.raises(AdapterError, match="missing tensor file"):
        load_adapter(saved, cfg)
    path.write_bytes(data)
    load_adapter(saved, cfg)

    rewrite_tensors(saved, lambda t: t.pop("b.q"))
    with pytest.raises(AdapterError, match=r"missing tensors .*: b\.q"):
        load_adapter(saved, cfg)
    path.write_bytes(data)

    def wider(t):
        t["a.q"] = np.zeros((2, 2, 64, 5), np.float32)

    rewrite_tensors(saved, wider)
    msg = re.escape("tensor 'a.q'") + ".*" + re.escape("(2, 2, 64, 5), expected (2, 2, 64, 4)")
    with pytest.raises(AdapterError, match=msg):
        load_adapter(saved, cfg)
    with pytest.raises(AdapterError, match=re.escape("(2, 2, 64, 5), expected (2, 2, ?, 4)")):
        load_adapter(saved)  # no model: rank and experts are still checked
    path.write_bytes(data)

    rewrite_tensors(saved, lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(AdapterError, match="unexpected tensors.*extra"):
        load_adapter(saved, cfg)
    path.write_bytes(data)

    with pytest.raises(AdapterError, match="holds a loraswitch adapter.*use load_adapter"):
        import_peft(saved, cfg)
    (saved / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterError, match=f"no {ADAPTER_CONFIG}"):
        load_adapter(saved, cfg)


def test_load_refuses_another_models_config(llama3_case, tmp_path):
    cfg = llama3_case.cfg
    other = dataclasses.replace(cfg, num_key_value_heads=4)  # the mha case's kv heads
    adapter = make_adapter(cfg, **MODES["layerwise"])
    save_adapter(adapter, tmp_path / "with_cfg", cfg)
    with pytest.raises(AdapterError, match=r"another model: num_key_value_heads=2 \(saved\) vs 4"):
        load_adapter(tmp_path / "with_cfg", other)
    save_adapter(adapter, tmp_path / "no_cfg")  # caught by the shapes instead
    with pytest.raises(AdapterError, match=re.escape("tensor 'b.k'") + ".*expected"):
        load_adapter(tmp_path / "no_cfg", other)
    deeper = dataclasses.replace(cfg, num_hidden_layers=3)
    with pytest.raises(AdapterError, match="num_hidden_layers=2 \\(saved\\) vs 3"):
        load_adapter(tmp_path / "with_cfg", deeper)


def test_save_checks_against_cfg(llama3_case, tmp_path):
    cfg = llama3_case.cfg
    adapter = make_adapter(cfg, lora=True)
    msg = "adapter.b['k'] has shape (2, 1, 4, 32), expected (2, 1, 4, 64)"
    with pytest.raises(AdapterError, match=re.escape(msg)):
        save_adapter(adapter, tmp_path, dataclasses.replace(cfg, num_key_value_heads=4))
    assert not (tmp_path / ADAPTER_CONFIG).exists()


# ------------------------------------------------------------------------------ merged


@pytest.mark.parametrize("router_layer", [0, 1])
def test_merge_lora_equals_adapter(llama3_case, tokens, router_layer):
    params, cfg = llama3_case.params, llama3_case.cfg
    adapter = make_adapter(cfg, lora=True, router_layer=router_layer,
                           targets=("q", "o", "up", "down"))
    merged = merge_lora(params, adapter)
    want = logits(params, cfg, tokens, adapter)
    assert rel_err(logits(merged, cfg, tokens), want) < 1e-5
    for proj in ("k", "v", "gate"):  # untouched
        assert merged.layers.weight(proj) is params.layers.weight(proj)
    if router_layer:
        np.testing.assert_array_equal(merged.layers.wq[0], params.layers.wq[0])


def test_merge_lora_keeps_dtype(llama3_case):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), llama3_case.params)
    adapter = make_adapter(llama3_case.cfg, lora=True)
    merged = merge_lora(params, adapter)
    assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, params)
    ref = merge_lora(llama3_case.params, adapter).layers.wq.astype(jnp.bfloat16)
    diff = jnp.abs(merged.layers.wq.astype(jnp.float32) - ref.astype(jnp.float32))
    assert float(diff.max()) <= 2 ** -7 * float(jnp.abs(ref.astype(jnp.float32)).max())


def test_export_merged_loads_in_transformers(case, tokens, tmp_path):
    adapter = make_adapter(case.cfg, lora=True)
    export_merged(case.params, case.cfg, adapter, tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    got = hf_logits(model, tokens)
    assert rel_err(got, logits(case.params, case.cfg, tokens, adapter)) < 1e-4
