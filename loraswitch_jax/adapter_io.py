"""Adapter files: our format for every mode, PEFT LoRA in and out, LoRA merged into the backbone.

Formats:

* **loraswitch** (:func:`save_adapter` / :func:`load_adapter`), any mode. A folder with
  ``adapter_config.json``::

      {"format": "loraswitch_jax.adapter", "version": 1,
       "adapter": AdapterConfig.to_dict(),
       "base_model": {hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                      num_key_value_heads, head_dim} | null,
       "dtype": "float32"}

  and ``adapter.safetensors`` holding the in-memory layout of :mod:`loraswitch_jax.adapters` as
  it is: ``a.{proj} [La, E, d_in, r]``, ``b.{proj} [La, E, r, d_out]``, ``router [d, E]`` (switch)
  or ``[La, d, E]`` (layerwise). ``base_model`` is written when a ``LlamaConfig`` is given and
  lets :func:`load_adapter` check shapes (and refuse another model's config) before reading.
* **PEFT LoRA** (:func:`export_peft` / :func:`import_peft`), ``lora`` mode only: the mixture
  modes have a router, which peft's LoRA has no place for. ``adapter_config.json`` holds peft's
  ``LoraConfig`` fields; ``adapter_model.safetensors`` holds
  ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, d_in]`` and
  ``...lora_B.weight [d_out, r]`` (Hugging Face's ``[out, in]``: the transposes of ours), the
  names peft's ``save_pretrained`` writes (adapter name stripped).
* **merged** (:func:`merge_lora` / :func:`export_merged`): ``W' = W + scale * A B`` in float32,
  cast back to the parameter dtype, written as a plain Hugging Face folder by
  :func:`loraswitch_jax.weights.save_params`.

Importing peft: the tensors, not ``target_modules``, decide what is adapted. The imported
adapter covers layers ``min(layer) .. L-1`` and the union of the projections found; any
``(layer, projection)`` pair the file lacks gets ``A = B = 0``, which adds exactly nothing, so
gaps (``layers_to_transform=[0, 2]``, ``exclude_modules``, a regex ``target_modules``) import
exactly, at the cost of computing zeros. ``use_rslora`` (scale ``alpha / sqrt(r)``) is folded into
``alpha``: the imported ``alpha`` is ``lora_alpha * sqrt(r)``, so ``alpha / rank`` is peft's scale
and ``A``, ``B`` stay bit-identical. Options that change the function are refused with
:class:`AdapterError`: DoRA, LoRA bias, trained base biases, ``modules_to_save``, per-module
``rank_pattern``/``alpha_pattern``, trainable tokens, layer replication, ``target_parameters``
and the variants aLoRA, QALoRA, BD-LoRA, Arrow, MonteCLoRA, KaSA.

Writes go to a temporary folder inside the target folder and are renamed into place one file at a
time (tensors first, config last), so a crash leaves whole files, never a truncated one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from loraswitch_jax.adapters import Adapter, AdapterConfig, AdapterError, check_adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.params import PROJECTIONS, WEIGHT_FIELD, LlamaParams, projection_shape
from loraswitch_jax.weights import _HF_MODULE, _np_dtype, save_params

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_TENSORS",
    "PEFT_TENSORS",
    "export_merged",
    "export_peft",
    "import_peft",
    "load_adapter",
    "merge_lora",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"  # both formats: ours and peft's
ADAPTER_TENSORS = "adapter.safetensors"
PEFT_TENSORS = "adapter_model.safetensors"
FORMAT = "loraswitch_jax.adapter"
VERSION = 1
# LlamaConfig fields that fix an adapter's shapes; saved, and compared on load.
_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_HF_NAME = {proj: module.split(".")[-1] for proj, module in _HF_MODULE.items()}  # q -> q_proj
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


# ------------------------------------------------------------------------------ file helpers


def _write_folder(folder: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Run ``writers[fn](path)`` into a temporary folder, then rename each file into ``folder``
    in the given order (one atomic rename per file)."""
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".saving-", dir=folder)
    try:
        for fn, write in writers.items():
            write(os.path.join(tmp, fn))
        for fn in writers:
            os.replace(os.path.join(tmp, fn), os.path.join(folder, fn))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_writer(obj) -> Callable[[str], None]:
    def write(path):
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return write


def _tensors_writer(tensors: dict[str, np.ndarray]) -> Callable[[str], None]:
    return lambda path: save_file(tensors, path, metadata={"format": "pt"})


def _host(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x))


def _read_json(folder: str) -> dict:
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise AdapterError(f"no {ADAPTER_CONFIG} in {folder!r}")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} holds a {type(meta).__name__}, expected a JSON object")
    return meta


class _Tensors:
    """The tensors of one safetensors file, read by name; unreadable files raise AdapterError."""

    def __init__(self, path: str, hint: str = ""):
        self.path = path
        if not os.path.isfile(path):
            raise AdapterError(f"missing tensor file {path!r}{hint}")
        try:
            self._file = safe_open(path, framework="numpy").__enter__()
        except Exception as e:  # safetensors' errors name neither the file nor the cause
            raise AdapterError(f"cannot read {path!r} (truncated or not safetensors?): {e}") from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.__exit__(None, None, None)

    def names(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def read(self, name: str, dtype: np.dtype | None) -> np.ndarray:
        try:
            tensor = self._file.get_tensor(name)
            return tensor if dtype is None else tensor.astype(dtype, copy=False)
        except Exception as e:
            raise AdapterError(f"cannot read tensor {name!r} from {self.path!r}: {e}") from e


def _check_names(path: str, found, expected) -> None:
    missing = [n for n in expected if n not in set(found)]
    if missing:
        raise AdapterError(f"missing tensors in {path!r}: {', '.join(missing)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise AdapterError(f"unexpected tensors in {path!r}: {', '.join(unexpected[:5])}")


def _check_shape(path: str, name: str, got: tuple[int, ...], want: tuple[int | None, ...]) -> None:
    """``want`` may hold ``None`` for a size that is not known (no model config)."""
    if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
        want_str = "(" + ", ".join("?" if w is None else str(w) for w in want) + ")"
        raise AdapterError(f"tensor {name!r} in {path!r} has shape {got}, expected {want_str}")


# ------------------------------------------------------------------------------ our format


def _shape_info(cfg: LlamaConfig) -> dict[str, int]:
    return {name: getattr(cfg, name) for name in _SHAPE_FIELDS}


def _shape_config(info: dict) -> LlamaConfig:
    """A config with the saved model's shapes (vocabulary and tokens do not shape an adapter)."""
    return LlamaConfig(vocab_size=1, bos_token_id=None, eos_token_id=(), **info)


def _expected_shapes(acfg: AdapterConfig, cfg: LlamaConfig | None) -> dict[str, tuple]:
    """Tensor name -> shape; without ``cfg`` the model sizes are ``None``."""
    La = None if cfg is None else acfg.num_adapted_layers(cfg)
    d = None if cfg is None else cfg.hidden_size
    E, r = acfg.num_experts, acfg.rank
    shapes = {}
    for proj in acfg.targets:
        d_in, d_out = (None, None) if cfg is None else projection_shape(cfg, proj)
        shapes[f"a.{proj}"] = (La, E, d_in, r)
        shapes[f"b.{proj}"] = (La, E, r, d_out)
    if acfg.mode == "switch":
        shapes["router"] = (d, E)
    elif acfg.mode == "layerwise":
        shapes["router"] = (La, d, E)
    return shapes


def save_adapter(
    adapter: Adapter, folder: str | os.PathLike, cfg: LlamaConfig | None = None
) -> None:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` (any mode, stacked layout).

    Args:
      adapter: the adapter to save, in its own dtype.
      folder: created if missing; our two files in it are replaced.
      cfg: the base model; checked against and recorded, so that loading can refuse a
        mismatched model by name. Recommended.
    """
    folder = os.fspath(folder)
    acfg = adapter.config
    if cfg is not None:
        check_adapter(adapter, cfg)
    tensors = {}
    for name, tree in (("a", adapter.a), ("b", adapter.b)):
        if set(tree) != set(acfg.targets):
            raise AdapterError(
                f"adapter.{name} holds projections {sorted(tree)}, but the config targets "
                f"{sorted(acfg.targets)}"
            )
        tensors.update({f"{name}.{proj}": _host(tree[proj]) for proj in acfg.targets})
    if (adapter.router is None) != (acfg.mode == "lora"):
        got = None if adapter.router is None else tuple(adapter.router.shape)
        raise AdapterError(f"a {acfg.mode!r} adapter with router of shape {got}")
    if adapter.router is not None:
        tensors["router"] = _host(adapter.router)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "adapter": acfg.to_dict(),
        "base_model": None if cfg is None else _shape_info(cfg),
        "dtype": jnp.dtype(adapter.dtype).name,
    }
    _write_folder(
        folder, {ADAPTER_TENSORS: _tensors_writer(tensors), ADAPTER_CONFIG: _json_writer(meta)}
    )


def load_adapter(
    folder: str | os.PathLike, cfg: LlamaConfig | None = None, dtype=jnp.float32
) -> Adapter:
    """Read a folder written by :func:`save_adapter`.

    Args:
      folder: holds ``adapter_config.json`` and ``adapter.safetensors``.
      cfg: the model the adapter is for; shapes are checked against it (and it must agree with
        the model recorded at save time). Without it, the recorded model is used if any.
      dtype: dtype of the returned leaves; ``None`` keeps the saved dtype.

    Raises:
      AdapterError: a file or tensor is missing or unreadable, a tensor has the wrong shape, or
        ``cfg`` is not the model the adapter was saved for; the message names it.
    """
    folder = os.fspath(folder)
    meta = _read_json(folder)
    if meta.get("format") != FORMAT:
        if "peft_type" in meta:
            raise AdapterError(
                f"{folder!r} holds a PEFT adapter, not a loraswitch one: use import_peft"
            )
        raise AdapterError(
            f"{ADAPTER_CONFIG} in {folder!r} has format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    if meta.get("version") != VERSION:
        raise AdapterError(
            f"adapter format version {meta.get('version')!r} is not supported; expected {VERSION}"
        )
    try:
        acfg = AdapterConfig.from_dict(meta["adapter"])
    except (KeyError, TypeError) as e:
        raise AdapterError(
            f"{ADAPTER_CONFIG} in {folder!r} has no valid 'adapter' entry: {e!r}"
        ) from e

    saved = meta.get("base_model")
    if cfg is not None and saved is not None:
        diffs = [f"{k}={saved.get(k)} (saved) vs {getattr(cfg, k)} (cfg)"
                 for k in _SHAPE_FIELDS if saved.get(k) != getattr(cfg, k)]
        if diffs:
            raise AdapterError(
                f"the adapter in {folder!r} was saved for another model: {', '.join(diffs)}"
            )
    shape_cfg = cfg if cfg is not None else (_shape_config(saved) if saved else None)
    if shape_cfg is not None:
        acfg.validate_for(shape_cfg)
    expected = _expected_shapes(acfg, shape_cfg)

    np_dtype = None if dtype is None else _np_dtype(dtype)
    path = os.path.join(folder, ADAPTER_TENSORS)
    with _Tensors(path) as f:
        _check_names(path, f.names(), expected)
        if shape_cfg is None:  # no model: check E and r, and that La agrees across tensors
            La = (f.shape(f"a.{acfg.targets[0]}") or (None,))[0]
            expected = {
                name: (La, *want[1:]) if name != "router" or acfg.mode == "layerwise" else want
                for name, want in expected.items()
            }
        for name, want in expected.items():
            _check_shape(path, name, f.shape(name), want)
        values = {name: jnp.asarray(f.read(name, np_dtype)) for name in expected}
    adapter = Adapter(
        config=acfg,
        a={proj: values[f"a.{proj}"] for proj in acfg.targets},
        b={proj: values[f"b.{proj}"] for proj in acfg.targets},
        router=values.get("router"),
    )
    if shape_cfg is not None:
        check_adapter(adapter, shape_cfg)
    return adapter


# ------------------------------------------------------------------------------ PEFT


def _require_lora(adapter: Adapter, what: str) -> None:
    mode = adapter.config.mode
    if mode != "lora":
        raise AdapterError(
            f"{what} needs a single LoRA (mode 'lora'), got mode {mode!r}: the mixture modes route "
            "each token to its own experts, which has no PEFT/merged equivalent; save it with "
            "save_adapter instead"
        )


def _peft_prefix(layer: int, proj: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_HF_MODULE[proj]}"


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
    _require_lora(adapter, "export_peft")
    check_adapter(adapter, cfg)
    acfg = adapter.config
    p, L = acfg.first_layer, cfg.num_hidden_layers
    tensors = {}
    for proj in acfg.targets:
        a = _host(adapter.a[proj][:, 0])  # [La, d_in, r]
        b = _host(adapter.b[proj][:, 0])  # [La, r, d_out]
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
    _write_folder(
        os.fspath(folder),
        {PEFT_TENSORS: _tensors_writer(tensors), ADAPTER_CONFIG: _json_writer(peft_config)},
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


def import_peft(folder: str | os.PathLike, cfg: LlamaConfig, dtype=jnp.float32) -> Adapter:
    """Read a peft LoRA folder (``save_pretrained`` of a peft Llama) as a ``lora``-mode adapter.

    See the module docstring for how gaps, ``use_rslora`` and unsupported options are handled.

    Raises:
      AdapterError: a refused option, an unknown tensor, a missing ``lora_A``/``lora_B`` half,
        or a tensor shape that does not fit ``cfg``; the message names it.
    """
    folder = os.fspath(folder)
    conf = _read_json(folder)
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
    with _Tensors(path, hint) as f:
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
        np_dtype = _np_dtype(dtype)
        a, b = {}, {}
        for proj in targets:
            d_in, d_out = projection_shape(cfg, proj)
            a_np = np.zeros((L - first, 1, d_in, r), np_dtype)
            b_np = np.zeros((L - first, 1, r, d_out), np_dtype)
            for layer in range(first, L):
                halves = found.get((layer, proj))
                if halves is None:
                    continue  # not adapted in the file: B = 0 adds nothing
                _check_shape(path, halves["A"], f.shape(halves["A"]), (r, d_in))
                _check_shape(path, halves["B"], f.shape(halves["B"]), (d_out, r))
                a_np[layer - first, 0] = f.read(halves["A"], np_dtype).T
                b_np[layer - first, 0] = f.read(halves["B"], np_dtype).T
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


# ------------------------------------------------------------------------------ merged


@functools.partial(jax.jit, static_argnames=("first", "scale"))
def _merge_stack(w: jax.Array, a: jax.Array, b: jax.Array, first: int, scale: float) -> jax.Array:
    """``w [L, d_in, d_out]`` with ``scale * a[i] @ b[i]`` added to layer ``first + i``.

    One layer at a time, so float32 copies are per layer, not per stack.
    """

    def body(i, w):
        delta = jnp.dot(a[i].astype(jnp.float32), b[i].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)  # [d_in, d_out]
        merged = (w[first + i].astype(jnp.float32) + scale * delta).astype(w.dtype)
        return jax.lax.dynamic_update_index_in_dim(w, merged, first + i, 0)

    return jax.lax.fori_loop(0, a.shape[0], body, w)


def merge_lora(params: LlamaParams, adapter: Adapter) -> LlamaParams:
    """Backbone params with a single LoRA folded in: ``W' = W + (alpha / r) A B`` per adapted
    layer and target, computed in float32 and cast back to each weight's dtype.

    Raises:
      AdapterError: the adapter is a mixture, or its shapes do not fit ``params``.
    """
    _require_lora(adapter, "merge_lora")
    acfg = adapter.config
    layers = params.layers
    replaced = {}
    for proj in acfg.targets:
        w, a, b = layers.weight(proj), adapter.a[proj], adapter.b[proj]
        L, d_in, d_out = w.shape
        La, r = L - acfg.first_layer, acfg.rank
        want_a, want_b = (La, 1, d_in, r), (La, 1, r, d_out)
        if a.shape != want_a or b.shape != want_b:
            raise AdapterError(
                f"adapter {proj!r} factors have shapes {a.shape}, {b.shape}; the params' weight "
                f"{tuple(w.shape)} needs {want_a}, {want_b}"
            )
        replaced[WEIGHT_FIELD[proj]] = _merge_stack(
            w, a[:, 0], b[:, 0], acfg.first_layer, acfg.scale
        )
    return dataclasses.replace(params, layers=dataclasses.replace(layers, **replaced))


def export_merged(
    params: LlamaParams,
    cfg: LlamaConfig,
    adapter: Adapter,
    folder: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write the backbone with ``adapter`` merged in as a Hugging Face folder (``save_params``)."""
    _require_lora(adapter, "export_merged")
    check_adapter(adapter, cfg)
    save_params(merge_lora(params, adapter), cfg, folder, max_shard_bytes=max_shard_bytes)
