"""PEFT's LoRA format in and out (``lora`` mode only).

The mixture modes have a router, which peft's LoRA has no place for. ``adapter_config.json``
holds peft's ``LoraConfig`` fields; ``adapter_model.safetensors`` holds
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, d_in]`` and
``...lora_B.weight [d_out, r]`` (Hugging Face's ``[out, in]``: the transposes of ours), the
names peft's ``save_pretrained`` writes (adapter name stripped).

Importing: the tensors, not ``target_modules``, decide what is adapted. The imported adapter
covers layers ``min(layer) .. L-1`` and the union of the projections found; any
``(layer, projection)`` pair the file lacks gets ``A = B = 0``, which adds exactly nothing, so
gaps (``layers_to_transform=[0, 2]``, ``exclude_modules``, a regex ``target_modules``) import
exactly, at the cost of computing zeros. ``use_rslora`` (scale ``alpha / sqrt(r)``) is folded into
``alpha``: the imported ``alpha`` is ``lora_alpha * sqrt(r)``, so ``alpha / rank`` is peft's scale
and ``A``, ``B`` stay bit-identical. Options that change the function are refused with
:class:`AdapterError`: DoRA, LoRA bias, trained base biases, ``modules_to_save``, per-module
``rank_pattern``/``alpha_pattern``, trainable tokens, layer replication, ``target_parameters``
and the variants aLoRA, QALoRA, BD-LoRA, Arrow, MonteCLoRA, KaSA.
"""

from __future__ import annotations

import math
import os
import re

import jax.numpy as jnp
import numpy as np

from loraswitch_jax.adapter_io import (
    ADAPTER_CONFIG,
    FORMAT,
    TensorFile,
    check_shape,
    host_array,
    json_writer,
    read_config,
    require_lora,
    tensors_writer,
    write_folder,
)
from loraswitch_jax.adapters import Adapter, AdapterConfig, AdapterError, check_adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.params import PROJECTIONS, projection_shape
from loraswitch_jax.weights import HF_MODULE, np_dtype

__all__ = ["PEFT_TENSORS", "export_peft", "import_peft"]

PEFT_TENSORS = "adapter_model.safetensors"
_HF_NAME = {proj: module.split(".")[-1] for proj, module in HF_MODULE.items()}  # q -> q_proj
_PROJ_OF = {name: proj for proj, name in _HF_NAME.items()}
# peft writes `base_model.model.model.layers...` for a causal LM; a bare LlamaModel drops `model.`.
_PEFT_NAME = re.compile(
    r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)
# peft options that change the function (truthy means in use), with what they are.
_PEFT_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "fully trained modules saved beside the adapter",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_qalora": "QALoRA (pooled inputs)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}


def _peft_prefix(layer: int, proj: str) -> str:
    return f"base_model.model.model.layers.{layer}.{HF_MODULE[proj]}"


def export_peft(
    adapter: Adapter,
    cfg: LlamaConfig,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write a single LoRA as a peft folder (``PeftModel.from_pretrained(base, folder)`` loads it).

    Tensors keep the adapter's dtype. ``layers_to_transform`` is written when the adapter starts
    above layer 0.

    Raises:
      AdapterError: the adapter is a mixture (switch/layerwise) or does not fit ``cfg``.
    """
    require_lora(adapter, "export_peft")
    check_adapter(adapter, cfg)
    acfg = adapter.config
    p, L = acfg.first_layer, cfg.num_hidden_layers
    tensors = {}
    for proj in acfg.targets:
        a = host_array(adapter.a[proj][:, 0])  # [La, d_in, r]
        b = host_array(adapter.b[proj][:, 0])  # [La, r, d_out]
        for i in range(L - p):
            prefix = _peft_prefix(p + i, proj)
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, d_in]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [d_out, r]
    alpha = acfg.alpha
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": acfg.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": [_HF_NAME[proj] for proj in acfg.targets],
        "lora_dropout": acfg.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": list(range(p, L)) if p > 0 else None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    write_folder(
        os.fspath(folder),
        {PEFT_TENSORS: tensors_writer(tensors), ADAPTER_CONFIG: json_writer(peft_config)},
    )


def _check_peft_config(conf: dict, folder: str) -> None:
    where = f"the PEFT adapter in {folder!r}"
    if conf.get("peft_type") != "LORA":
        raise AdapterError(
            f"{where} has peft_type {conf.get('peft_type')!r}; only 'LORA' is supported"
        )
    used = [f"{key} ({what})" for key, what in _PEFT_UNSUPPORTED.items() if conf.get(key)]
    if used:
        raise AdapterError(f"{where} uses options with no equivalent here: {', '.join(used)}")
    if conf.get("bias", "none") != "none":
        raise AdapterError(
            f"{where} has bias={conf['bias']!r} (trained base biases); only 'none' is supported"
        )
    targets = conf.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = [t for t in targets if t.split(".")[-1] not in _PROJ_OF]
        if unknown:
            raise AdapterError(
                f"{where} targets modules {unknown}; supported: {', '.join(_PROJ_OF)}"
            )
    for key in ("r", "lora_alpha"):
        if key not in conf:
            raise AdapterError(f"{ADAPTER_CONFIG} in {folder!r} has no {key!r}")
    r, alpha = conf["r"], conf["lora_alpha"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{ADAPTER_CONFIG} in {folder!r}: 'r' must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(
            f"{ADAPTER_CONFIG} in {folder!r}: 'lora_alpha' must be a finite number, got {alpha!r}"
        )


def import_peft(folder: str | os.PathLike, cfg: LlamaConfig, dtype=jnp.float32) -> Adapter:
    """Read a peft LoRA folder (``save_pretrained`` of a peft Llama) as a ``lora``-mode adapter.

    See the module docstring for how gaps, ``use_rslora`` and unsupported options are handled.

    Raises:
      AdapterError: a refused option, an unknown tensor, a missing ``lora_A``/``lora_B`` half,
        or a tensor shape that does not fit ``cfg``; the message names it.
    """
    folder = os.fspath(folder)
    conf = read_config(folder)
    if conf.get("format") == FORMAT:
        raise AdapterError(
            f"{folder!r} holds a loraswitch adapter, not a PEFT one: use load_adapter"
        )
    _check_peft_config(conf, folder)
    r = int(conf["r"])
    alpha = float(conf["lora_alpha"])
    if conf.get("use_rslora"):
        alpha *= math.sqrt(r)  # peft scales by alpha / sqrt(r); ours is alpha / rank
    L = cfg.num_hidden_layers

    path = os.path.join(folder, PEFT_TENSORS)
    hint = ""
    if not os.path.isfile(path) and os.path.isfile(os.path.join(folder, "adapter_model.bin")):
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)"
    found: dict[tuple[int, str], dict[str, str]] = {}
    with TensorFile(path, hint) as f:
        unknown = []
        for name in f.names():
            m = _PEFT_NAME.fullmatch(name)
            if m is None or m.group(2) not in _PROJ_OF or int(m.group(1)) >= L:
                unknown.append(name)
                continue
            found.setdefault((int(m.group(1)), _PROJ_OF[m.group(2)]), {})[m.group(3)] = name
        if unknown:
            raise AdapterError(
                f"tensors in {path!r} that are not LoRA factors of layers 0..{L - 1} of Llama's "
                f"seven projections: {', '.join(sorted(unknown)[:5])}"
            )
        if not found:
            raise AdapterError(f"no LoRA tensors in {path!r}")
        for (layer, proj), halves in sorted(found.items()):
            if set(halves) != {"A", "B"}:
                lacks = "lora_B" if "A" in halves else "lora_A"
                raise AdapterError(f"{path!r} lacks {lacks} of layer {layer} {_HF_NAME[proj]}")

        first = min(layer for layer, _ in found)
        targets = tuple(p for p in PROJECTIONS if any(q == p for _, q in found))
        host_dtype = np_dtype(dtype)
        a, b = {}, {}
        for proj in targets:
            d_in, d_out = projection_shape(cfg, proj)
            a_np = np.zeros((L - first, 1, d_in, r), host_dtype)
            b_np = np.zeros((L - first, 1, r, d_out), host_dtype)
            for layer in range(first, L):
                halves = found.get((layer, proj))
                if halves is None:
                    continue  # not adapted in the file: B = 0 adds nothing
                check_shape(path, halves["A"], f.shape(halves["A"]), (r, d_in))
                check_shape(path, halves["B"], f.shape(halves["B"]), (d_out, r))
                a_np[layer - first, 0] = f.read(halves["A"], host_dtype).T
                b_np[layer - first, 0] = f.read(halves["B"], host_dtype).T
            a[proj], b[proj] = jnp.asarray(a_np), jnp.asarray(b_np)

    acfg = AdapterConfig.lora(
        rank=r,
        alpha=alpha,
        targets=targets,
        dropout=float(conf.get("lora_dropout") or 0.0),
        router_layer=first,
    )
    adapter = Adapter(config=acfg, a=a, b=b, router=None)
    check_adapter(adapter, cfg)
    return adapter
