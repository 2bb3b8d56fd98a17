"""PEFT's LoRA format: import and export checked against peft itself."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import loraswitch_jax as lj
from loraswitch_jax import AdapterConfig, AdapterError
from loraswitch_jax.adapter_io import ADAPTER_CONFIG, load_adapter, merge_lora
from loraswitch_jax.peft_io import PEFT_TENSORS, export_peft, import_peft
from tests.helpers import assert_adapters_equal, logits, make_adapter, rel_err, require
from tests.hf_models import build_hf_model, hf_logits

torch = require("torch")  # every test here builds on the reference models and peft
peft = require("peft")

# transformers deprecates a method peft still calls.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(case_name: str, seed: int = 1, **kwargs) -> peft.PeftModel:
    """A fresh copy of the case's HF model (never the shared one: peft edits it in place) with a
    random LoRA (``init_lora_weights=False`` makes ``B`` nonzero)."""
    base = build_hf_model(case_name)
    torch.manual_seed(seed)
    conf = {"r": 4, "lora_alpha": 8, "target_modules": HF_TARGETS, "init_lora_weights": False,
            "task_type": "CAUSAL_LM", **kwargs}
    return peft.get_peft_model(base, peft.LoraConfig(**conf)).eval()


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
