"""Adapter files: exact round trips of our format, PEFT import/export vs peft, merged export."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import loraswitch_jax as lj
from tests.helpers import jit_forward, rel_err
from tests.hf_models import build_hf_model, hf_logits
from loraswitch_jax import AdapterConfig, AdapterError
from loraswitch_jax.adapter_io import (
    ADAPTER_CONFIG,
    ADAPTER_TENSORS,
    PEFT_TENSORS,
    export_merged,
    export_peft,
    import_peft,
    load_adapter,
    merge_lora,
    save_adapter,
)

# transformers deprecates a method peft still calls.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(cfg: lj.LlamaConfig, seed: int = 0, std: float = 0.3, **kwargs) -> lj.Adapter:
    """An adapter with random ``B`` and router (zero and small at init), so it changes outputs."""
    kwargs = {"rank": 4, "alpha": 8.0, **kwargs}
    acfg = AdapterConfig.lora(**kwargs) if kwargs.pop("lora", False) else AdapterConfig(**kwargs)
    adapter = lj.init_adapter(cfg, acfg, jax.random.key(seed))
    rng = np.random.RandomState(seed)
    b = {p: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for p, x in adapter.b.items()}
    router = adapter.router
    if router is not None:
        router = jnp.asarray(3.0 * rng.standard_normal(router.shape), router.dtype)
    return dataclasses.replace(adapter, b=b, router=router)


def logits(params, cfg, tokens, adapter=None) -> np.ndarray:
    return np.asarray(jit_forward()(params, jnp.asarray(tokens), cfg, adapter=adapter))


def assert_adapters_equal(got: lj.Adapter, want: lj.Adapter):
    assert got.config == want.config
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def peft_model(case_name: str, seed: int = 1, **kwargs) -> peft.PeftModel:
    """A fresh copy of the case's HF model (never the shared one: peft edits it in place) with a
    random LoRA (``init_lora_weights=False`` makes ``B`` nonzero)."""
    base = build_hf_model(case_name)
    torch.manual_seed(seed)
    conf = {"r": 4, "lora_alpha": 8, "target_modules": HF_TARGETS, "init_lora_weights": False,
            "task_type": "CAUSAL_LM", **kwargs}
    return peft.get_peft_model(base, peft.LoraConfig(**conf)).eval()


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


# ------------------------------------------------------------------------------ PEFT import


def check_import_parity(case, tokens, tmp_path, **peft_kwargs) -> lj.Adapter:
    model = peft_model(case.name, **peft_kwargs)
    model.save_pretrained(tmp_path)
    adapter = import_peft(tmp_path, case.cfg)
    want = hf_logits(model, tokens)
    got = logits(case.params, case.cfg, tokens, adapter)
    assert rel_err(got, want) < 1e-4
    # The LoRA matters: without it the logits are far off.
    assert rel_err(logits(case.params, case.cfg, tokens), want) > 1e-2
    return adapter


def test_import_peft_matches_peft(case, tokens, tmp_path):
    adapter = check_import_parity(case, tokens, tmp_path)
    assert adapter.config == AdapterConfig.lora(rank=4, alpha=8.0)


@pytest.mark.parametrize(
    "peft_kwargs, want",
    [
        # layers_to_transform above 0 starts the adapter there
        (dict(layers_to_transform=[1], target_modules=["v_proj", "q_proj", "down_proj"]),
         dict(router_layer=1, targets=("q", "v", "down"))),
        # layer 1 not in the file: imported with B = 0
        (dict(layers_to_transform=[0], target_modules=["o_proj", "up_proj"]),
         dict(router_layer=0, targets=("o", "up"))),
        # rsLoRA: alpha / sqrt(r) folded into alpha
        (dict(use_rslora=True), dict(alpha=16.0)),
    ],
    ids=["layers_to_transform", "gap", "rslora"],
)
def test_import_peft_variants(llama3_case, tokens, tmp_path, peft_kwargs, want):
    adapter = check_import_parity(llama3_case, tokens, tmp_path, **peft_kwargs)
    for key, value in want.items():
        assert getattr(adapter.config, key) == value


@pytest.fixture
def peft_folder(llama3_case, tmp_path):
    export_peft(make_adapter(llama3_case.cfg, lora=True), llama3_case.cfg, tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(use_dora=True), "use_dora"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(bias="all"), "bias='all'"),
        (dict(target_modules=["q_proj", "lm_head"]), r"targets modules \['lm_head'\]"),
        (dict(peft_type="IA3"), "peft_type 'IA3'"),
    ],
)
def test_import_peft_refuses_unsupported_options(llama3_case, peft_folder, edit, match):
    path = peft_folder / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(AdapterError, match=match):
        import_peft(peft_folder, llama3_case.cfg)


def test_import_peft_tensor_errors(llama3_case, peft_folder):
    cfg = llama3_case.cfg
    path = peft_folder / PEFT_TENSORS
    data = path.read_bytes()
    name = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"

    def rewrite(edit):
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)

    rewrite(lambda t: t.pop(name))
    with pytest.raises(AdapterError, match="lacks lora_B of layer 1 k_proj"):
        import_peft(peft_folder, cfg)
    path.write_bytes(data)

    rewrite(lambda t: t.update({name: np.zeros((64, 4), np.float32)}))  # k is [32, 4] here
    msg = re.escape(f"{name!r}") + r".*\(64, 4\), expected \(32, 4\)"
    with pytest.raises(AdapterError, match=msg):
        import_peft(peft_folder, cfg)
    path.write_bytes(data)

    lm_head = "base_model.model.lm_head.lora_A.weight"
    rewrite(lambda t: t.update({lm_head: np.zeros((4, 64), np.float32)}))
    with pytest.raises(AdapterError, match=re.escape(lm_head)):
        import_peft(peft_folder, cfg)
    path.unlink()
    with pytest.raises(AdapterError, match="missing tensor file"):
        import_peft(peft_folder, cfg)
    with pytest.raises(AdapterError, match="holds a PEFT adapter.*use import_peft"):
        load_adapter(peft_folder, cfg)


# ------------------------------------------------------------------------------ PEFT export


@pytest.mark.parametrize("router_layer", [0, 1])
def test_export_peft_loads_in_peft(case, tokens, tmp_path, router_layer):
    targets = HF_TARGETS if router_layer == 0 else ["k_proj", "gate_proj"]
    adapter = make_adapter(case.cfg, lora=True, router_layer=router_layer, alpha=6.0,
                           targets=tuple(t.removesuffix("_proj") for t in targets))
    export_peft(adapter, case.cfg, tmp_path, base_model_name_or_path="tiny-llama")
    conf = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert conf["target_modules"] == targets and conf["r"] == 4 and conf["lora_alpha"] == 6
    assert conf["layers_to_transform"] == ([1] if router_layer else None)
    assert_adapters_equal(import_peft(tmp_path, case.cfg), adapter)

    model = peft.PeftModel.from_pretrained(build_hf_model(case.name), tmp_path).eval()
    assert rel_err(logits(case.params, case.cfg, tokens, adapter), hf_logits(model, tokens)) < 1e-4


@pytest.mark.parametrize("mode", ["switch", "layerwise"])
def test_mixtures_have_no_peft_or_merged_form(llama3_case, tmp_path, mode):
    adapter = make_adapter(llama3_case.cfg, mode=mode, num_experts=2)
    with pytest.raises(AdapterError, match=f"mode '{mode}'.*no PEFT/merged equivalent"):
        export_peft(adapter, llama3_case.cfg, tmp_path)
    with pytest.raises(AdapterError, match="needs a single LoRA"):
        merge_lora(llama3_case.params, adapter)
    assert not os.listdir(tmp_path)


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
