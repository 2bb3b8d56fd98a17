"""Hugging Face safetensors <-> :class:`LlamaParams`.

Loading reads one tensor at a time from memory-mapped files into one preallocated stacked host
buffer per parameter, moves that buffer to the device and frees it: host memory never holds two
copies of the model. With ``shardings``, each process reads only the blocks its devices hold
(:mod:`~loraswitch_jax.sharded_load`). Saving writes one layer at a time, sharded with an index
above ``max_shard_bytes``, into a temporary sibling folder that replaces the destination by one
rename (:func:`~loraswitch_jax.atomic_folder.write_folder_atomic`): at every instant the path
holds the old complete folder or the new.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from loraswitch_jax.atomic_folder import interrupted_save, write_folder_atomic
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.params import (
    BIAS_FIELD,
    PROJECTIONS,
    WEIGHT_FIELD,
    LayerParams,
    LlamaParams,
    check_params,
    floating_dtype,
    projection_shape,
)
from loraswitch_jax.sharded_load import check_shardings, load_sharded

__all__ = [
    "HF_MODULE",
    "WeightsError",
    "hf_tensor_names",
    "interrupted_save",
    "load_params",
    "np_dtype",
    "save_params",
    "write_folder_atomic",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Our projection name -> its module path inside a Hugging Face decoder layer.
HF_MODULE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


class WeightsError(ValueError):
    """Weight files are missing, incomplete or do not match the config."""


def np_dtype(dtype) -> np.dtype:
    """The numpy dtype of a JAX dtype (bfloat16 through ml_dtypes)."""
    dtype = jnp.dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else np.dtype(dtype)


def _has_bias(cfg: LlamaConfig, proj: str) -> bool:
    return cfg.attention_bias if proj in ("q", "k", "v", "o") else cfg.mlp_bias


def _layer_entries(cfg: LlamaConfig) -> Iterator[tuple[str, str, tuple[int, ...], bool]]:
    """``(field, hf_suffix, hf_shape, transpose)`` for each per-layer tensor."""
    d = cfg.hidden_size
    yield "attn_norm", "input_layernorm.weight", (d,), False
    yield "mlp_norm", "post_attention_layernorm.weight", (d,), False
    for proj in PROJECTIONS:
        d_in, d_out = projection_shape(cfg, proj)
        yield WEIGHT_FIELD[proj], f"{HF_MODULE[proj]}.weight", (d_out, d_in), True
        if _has_bias(cfg, proj):
            yield BIAS_FIELD[proj], f"{HF_MODULE[proj]}.bias", (d_out,), False


def hf_tensor_names(cfg: LlamaConfig) -> list[str]:
    """Every tensor name a Hugging Face checkpoint of ``cfg`` holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for layer in range(cfg.num_hidden_layers):
        names += [f"model.layers.{layer}.{suffix}" for _, suffix, _, _ in _layer_entries(cfg)]
    return names


def _tensor_files(folder: str) -> dict[str, str]:
    """Map each tensor name to the file that holds it, checking that the files exist."""
    single, index = os.path.join(folder, SINGLE_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index} is not a valid safetensors index: {e}") from e
        missing_files = sorted({fn for fn in weight_map.values()
                                if not os.path.isfile(os.path.join(folder, fn))})
        if missing_files:
            raise WeightsError(
                f"{INDEX_FILE} in {folder!r} names shard files that are missing: "
                + ", ".join(missing_files)
            )
        return {name: os.path.join(folder, fn) for name, fn in weight_map.items()}
    if os.path.isfile(single):
        with _open(single) as f:
            return {name: single for name in f.keys()}
    hint = ""
    if any(os.path.isfile(os.path.join(folder, n)) for n in ("pytorch_model.bin", "model.bin")):
        hint = " (found PyTorch .bin weights: re-save them as safetensors)"
    raise WeightsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder!r}{hint}")


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors' own error type names neither the file nor the fix
        raise WeightsError(f"cannot read {path!r} (truncated or not safetensors?): {e}") from e


class _Reader:
    """Reads tensors by name from a set of safetensors files, checking shapes."""

    def __init__(self, files: dict[str, str]):
        self._files = files
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def _handle(self, path):
        if path not in self._handles:
            self._handles[path] = _open(path).__enter__()
        return self._handles[path]

    def _checked(self, name: str, shape: tuple[int, ...]):
        """The open file holding ``name`` and its lazy slice, after checking the shape."""
        handle = self._handle(self._files[name])
        try:
            lazy = handle.get_slice(name)
            got = tuple(lazy.get_shape())
        except Exception as e:  # a name in the index that the shard lacks
            raise WeightsError(f"tensor {name!r} is listed but not found in {self._files[name]!r}") from e
        if got != shape:
            raise WeightsError(f"tensor {name!r} has shape {got}, but the config expects {shape}")
        return handle, lazy

    def read(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        handle, _ = self._checked(name, shape)
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:
            raise WeightsError(f"cannot read tensor {name!r} from {self._files[name]!r}: {e}") from e
        return tensor.astype(dtype, copy=False)

    def read_slice(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...],
                   dtype: np.dtype) -> np.ndarray:
        """The block ``tensor[index]`` of tensor ``name`` of ``shape``, reading only that block."""
        _, lazy = self._checked(name, shape)
        try:
            block = lazy[index]
        except Exception as e:
            raise WeightsError(f"cannot read {index} of tensor {name!r} from "
                               f"{self._files[name]!r}: {e}") from e
        return block.astype(dtype, copy=False)


def load_params(
    folder: str | os.PathLike,
    cfg: LlamaConfig | None = None,
    dtype=jnp.bfloat16,
    put: Callable[[np.ndarray], jax.Array] = jnp.asarray,
    shardings: LlamaParams | None = None,
) -> tuple[LlamaParams, LlamaConfig]:
    """Load a Hugging Face Llama folder (single or sharded safetensors).

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
      cfg: the config to check the weights against; read from the folder when None.
      dtype: parameter dtype (bf16 by default, float32 for parity checks).
      put: moves one stacked host array to the device (e.g. with a sharding).
      shardings: a :class:`LlamaParams` of ``jax.sharding.Sharding`` (``None`` where the model
        has no tensor): each leaf is built as a global array on its sharding, every process
        reading only the blocks its devices hold (:mod:`~loraswitch_jax.sharded_load`); ``put``
        is then unused. Required when the shardings span several processes.

    Raises:
      WeightsError: a file or tensor is missing, unexpected or of the wrong shape; the message
        names it. Also a folder that an interrupted save left only as its moved-aside copy.
      ValueError: ``dtype`` is not floating.
    """
    folder = os.fspath(folder)
    try:
        host_dtype = np_dtype(floating_dtype(dtype, "load_params dtype"))
    except ValueError as e:
        raise WeightsError(str(e)) from None
    hint = interrupted_save(folder)
    if hint:
        raise WeightsError(hint)
    cfg = cfg or LlamaConfig.from_pretrained(folder)
    files = _tensor_files(folder)
    expected = hf_tensor_names(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"missing tensors in {folder!r}: {', '.join(missing[:5])}{more}")
    allowed = set(expected) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = [n for n in files if n not in allowed and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise WeightsError(
            f"unexpected tensors in {folder!r} for this config: {', '.join(sorted(unexpected)[:5])}"
        )

    with _Reader(files) as reader:
        if shardings is None:
            params = _read_params(reader, cfg, host_dtype, put)
        else:
            params = _load_sharded(reader, cfg, host_dtype, shardings)
    return params, cfg


def _load_sharded(reader: _Reader, cfg: LlamaConfig, host_dtype: np.dtype,
                  shardings: LlamaParams) -> LlamaParams:
    """:func:`~loraswitch_jax.sharded_load.load_sharded` of the checked files."""
    present = {field for field, _, _, _ in _layer_entries(cfg)}
    present |= set() if cfg.tie_word_embeddings else {"lm_head"}
    try:
        check_shardings(shardings, present)
        return load_sharded(
            lambda name, shape, index: reader.read_slice(name, shape, index, host_dtype),
            shardings, num_layers=cfg.num_hidden_layers, dtype=host_dtype,
            layer_entries=_layer_entries(cfg), embed_shape=(cfg.vocab_size, cfg.hidden_size),
            lm_head=not cfg.tie_word_embeddings)
    except WeightsError:
        raise
    except ValueError as e:  # a tree or a sharding that does not fit the model
        raise WeightsError(str(e)) from None


def _read_params(reader: _Reader, cfg: LlamaConfig, host_dtype: np.dtype, put) -> LlamaParams:
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    layer_fields = {}
    for field, suffix, shape, transpose in _layer_entries(cfg):
        stacked_shape = (L, *(shape[::-1] if transpose else shape))
        buf = np.empty(stacked_shape, host_dtype)
        for layer in range(L):
            t = reader.read(f"model.layers.{layer}.{suffix}", shape, host_dtype)
            buf[layer] = t.T if transpose else t
        layer_fields[field] = put(buf)
        del buf
    embed = put(reader.read("model.embed_tokens.weight", (V, d), host_dtype))
    lm_head = None
    if not cfg.tie_word_embeddings:
        lm_head = put(np.ascontiguousarray(reader.read("lm_head.weight", (V, d), host_dtype).T))
    return LlamaParams(
        embed=embed,
        layers=LayerParams(**layer_fields),
        final_norm=put(reader.read("model.norm.weight", (d,), host_dtype)),
        lm_head=lm_head,
    )


def _hf_tensors(params: LlamaParams, cfg: LlamaConfig) -> Iterator[tuple[str, Callable[[], np.ndarray], int]]:
    """``(name, produce, nbytes)`` for every tensor, produced lazily (one layer on the host)."""

    def host(a):
        a = np.asarray(a)
        return np.ascontiguousarray(a)

    itemsize = jnp.dtype(params.dtype).itemsize
    yield "model.embed_tokens.weight", lambda: host(params.embed), params.embed.size * itemsize
    for layer in range(cfg.num_hidden_layers):
        for field, suffix, shape, transpose in _layer_entries(cfg):
            stacked = getattr(params.layers, field)

            def produce(stacked=stacked, layer=layer, transpose=transpose):
                t = np.asarray(stacked[layer])
                return host(t.T if transpose else t)

            yield f"model.layers.{layer}.{suffix}", produce, int(np.prod(shape)) * itemsize
    yield "model.norm.weight", lambda: host(params.final_norm), params.final_norm.size * itemsize
    if params.lm_head is not None:
        yield "lm_head.weight", lambda: host(params.lm_head.T), params.lm_head.size * itemsize


def _is_weight_file(fn: str) -> bool:
    return fn in (SINGLE_FILE, INDEX_FILE) or (fn.startswith("model-") and fn.endswith(".safetensors"))


def save_params(
    params: LlamaParams,
    cfg: LlamaConfig,
    folder: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``).

    The folder is replaced as a whole (:func:`write_folder_atomic`); other files in it (a
    tokenizer, say) are kept, earlier weight files of any layout are not.

    Raises:
      WeightsError: a leaf's shape (or presence) does not match ``cfg``; nothing is written.
    """
    folder = os.fspath(folder)
    if (params.lm_head is None) != cfg.tie_word_embeddings:
        raise WeightsError(
            f"params {'lack' if params.lm_head is None else 'have'} an lm_head but "
            f"{cfg.tie_word_embeddings=}"
        )
    try:
        check_params(params, cfg)
        floating_dtype(params.dtype, "save_params: the params' dtype")
    except ValueError as e:  # found before writing, not at load time
        raise WeightsError(f"cannot save to {folder!r}: {e}") from None
    entries = list(_hf_tensors(params, cfg))
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry[2] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[2]
    shards.append(current)

    def write(tmp: str) -> None:
        names = (
            [SINGLE_FILE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for fn, shard in zip(names, shards):
            save_file({name: produce() for name, produce, _ in shard}, os.path.join(tmp, fn),
                      metadata={"format": "pt"})
            weight_map.update({name: fn for name, _, _ in shard})
        if len(shards) > 1:
            total = sum(e[2] for e in entries)
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        cfg.save_pretrained(tmp)

    write_folder_atomic(folder, write, owned=lambda fn: _is_weight_file(fn) or fn == "config.json")
