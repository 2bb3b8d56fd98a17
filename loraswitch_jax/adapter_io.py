"""Adapter files in our format (any mode), and a single LoRA merged into the backbone.

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
* **merged** (:func:`merge_lora` / :func:`export_merged`): ``W' = W + scale * A B`` in float32,
  cast back to the parameter dtype, written as a plain Hugging Face folder by
  :func:`loraswitch_jax.weights.save_params`.

PEFT's LoRA format is :mod:`loraswitch_jax.peft_io`; it shares the folder helpers below.
Writes go to a temporary folder beside the target, which then replaces the target folder by one
rename (:func:`loraswitch_jax.weights.write_folder_atomic`): a crash leaves the old complete
folder or the new one, never new tensors beside an old config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from loraswitch_jax.adapters import Adapter, AdapterConfig, AdapterError, check_adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.params import WEIGHT_FIELD, LlamaParams, projection_shape
from loraswitch_jax.weights import interrupted_save, np_dtype, save_params, write_folder_atomic

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_TENSORS",
    "FORMAT",
    "TensorFile",
    "check_shape",
    "export_merged",
    "host_array",
    "json_writer",
    "load_adapter",
    "merge_lora",
    "read_config",
    "require_lora",
    "save_adapter",
    "tensors_writer",
    "write_folder",
]

ADAPTER_CONFIG = "adapter_config.json"  # both formats: ours and peft's
ADAPTER_TENSORS = "adapter.safetensors"
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


# ------------------------------------------------------------------------------ folders (both formats)


# Files an adapter folder's writer replaces (ours and peft's), so that no stale half stays.
_ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors", "adapter_model.safetensors")


def write_folder(folder: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Run ``writers[fn](path)`` into a temporary sibling folder that then replaces ``folder`` as a
    whole (:func:`~loraswitch_jax.weights.write_folder_atomic`); other files in it are kept."""

    def write(tmp):
        for fn, write_one in writers.items():
            write_one(os.path.join(tmp, fn))

    try:
        write_folder_atomic(folder, write, owned=lambda fn: fn in _ADAPTER_FILES)
    except NotADirectoryError as e:
        raise AdapterError(str(e)) from None


def json_writer(obj) -> Callable[[str], None]:
    """A writer for :func:`write_folder`: ``obj`` as indented JSON."""
    def write(path):
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return write


def tensors_writer(tensors: dict[str, np.ndarray]) -> Callable[[str], None]:
    """A writer for :func:`write_folder`: ``tensors`` as safetensors (torch-loadable metadata)."""
    return lambda path: save_file(tensors, path, metadata={"format": "pt"})


def host_array(x) -> np.ndarray:
    """``x`` as a C-contiguous numpy array (safetensors writes only those)."""
    return np.ascontiguousarray(np.asarray(x))


def read_config(folder: str) -> dict:
    """The JSON object in ``folder``'s ``adapter_config.json``; AdapterError if absent or bad."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    hint = interrupted_save(folder)
    if hint:
        raise AdapterError(hint)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise AdapterError(f"no {ADAPTER_CONFIG} in {folder!r}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} holds a {type(meta).__name__}, expected a JSON object")
    return meta


class TensorFile:
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


def check_shape(path: str, name: str, got: tuple[int, ...], want: tuple[int | None, ...]) -> None:
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
        tensors.update({f"{name}.{proj}": host_array(tree[proj]) for proj in acfg.targets})
    if (adapter.router is None) != (acfg.mode == "lora"):
        got = None if adapter.router is None else tuple(adapter.router.shape)
        raise AdapterError(f"a {acfg.mode!r} adapter with router of shape {got}")
    if adapter.router is not None:
        tensors["router"] = host_array(adapter.router)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "adapter": acfg.to_dict(),
        "base_model": None if cfg is None else _shape_info(cfg),
        "dtype": jnp.dtype(adapter.dtype).name,
    }
    write_folder(
        folder, {ADAPTER_TENSORS: tensors_writer(tensors), ADAPTER_CONFIG: json_writer(meta)}
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
    meta = read_config(folder)
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

    host_dtype = None if dtype is None else np_dtype(dtype)
    path = os.path.join(folder, ADAPTER_TENSORS)
    with TensorFile(path) as f:
        _check_names(path, f.names(), expected)
        if shape_cfg is None:  # no model: check E and r, and that La agrees across tensors
            La = (f.shape(f"a.{acfg.targets[0]}") or (None,))[0]
            expected = {
                name: (La, *want[1:]) if name != "router" or acfg.mode == "layerwise" else want
                for name, want in expected.items()
            }
        for name, want in expected.items():
            check_shape(path, name, f.shape(name), want)
        values = {name: jnp.asarray(f.read(name, host_dtype)) for name in expected}
    adapter = Adapter(
        config=acfg,
        a={proj: values[f"a.{proj}"] for proj in acfg.targets},
        b={proj: values[f"b.{proj}"] for proj in acfg.targets},
        router=values.get("router"),
    )
    if shape_cfg is not None:
        check_adapter(adapter, shape_cfg)
    return adapter


# ------------------------------------------------------------------------------ merged


def require_lora(adapter: Adapter, what: str) -> None:
    """Refuse a mixture adapter in ``what``: only a single LoRA has a PEFT or merged form."""
    mode = adapter.config.mode
    if mode != "lora":
        raise AdapterError(
            f"{what} needs a single LoRA (mode 'lora'), got mode {mode!r}: the mixture modes route "
            "each token to its own experts, which has no PEFT/merged equivalent; save it with "
            "save_adapter instead"
        )


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
    require_lora(adapter, "merge_lora")
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
    require_lora(adapter, "export_merged")
    check_adapter(adapter, cfg)
    save_params(merge_lora(params, adapter), cfg, folder, max_shard_bytes=max_shard_bytes)
