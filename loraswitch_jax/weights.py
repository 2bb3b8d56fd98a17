"""Hugging Face safetensors <-> :class:`LlamaParams`.

Loading reads one tensor at a time from memory-mapped files into one preallocated stacked host
buffer per parameter, moves that buffer to the device and frees it: host memory never holds two
copies of the model. Saving writes one layer at a time, sharded with an index above
``max_shard_bytes``, into a temporary sibling folder that replaces the destination by one rename
(:func:`write_folder_atomic`): at every instant the path holds the old complete folder or the new.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

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

    def read(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        handle = self._handle(self._files[name])
        try:
            got = tuple(handle.get_slice(name).get_shape())
        except Exception as e:  # a name in the index that the shard lacks
            raise WeightsError(f"tensor {name!r} is listed but not found in {self._files[name]!r}") from e
        if got != shape:
            raise WeightsError(f"tensor {name!r} has shape {got}, but the config expects {shape}")
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:
            raise WeightsError(f"cannot read tensor {name!r} from {self._files[name]!r}: {e}") from e
        return tensor.astype(dtype, copy=False)


def load_params(
    folder: str | os.PathLike,
    cfg: LlamaConfig | None = None,
    dtype=jnp.bfloat16,
    put: Callable[[np.ndarray], jax.Array] = jnp.asarray,
) -> tuple[LlamaParams, LlamaConfig]:
    """Load a Hugging Face Llama folder (single or sharded safetensors).

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
      cfg: the config to check the weights against; read from the folder when None.
      dtype: parameter dtype (bf16 by default, float32 for parity checks).
      put: moves one stacked host array to the device (e.g. with a sharding).

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
        params = _read_params(reader, cfg, host_dtype, put)
    return params, cfg


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


# ------------------------------------------------------------------------------ atomic folders

_SAVING, _ASIDE = ".saving-", ".replaced-"
# Leftovers of another host older than this process cannot be a save in progress that we know of.
_PROCESS_START = time.time()


def _usual_mode(directory: bool) -> int:
    """``0666 & ~umask`` for files, ``0777 & ~umask`` for folders (what ``open`` would give)."""
    mask = os.umask(0)  # the umask is read by setting it; restore it at once
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _sibling(folder: str, kind: str) -> str:
    """A new empty folder beside ``folder``, named after it, this host and this process."""
    parent, name = os.path.split(folder)
    prefix = f".{name}{kind}{os.getpid()}@{socket.gethostname()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _leftovers(folder: str, kind: str) -> list[tuple[str, int, str]]:
    """``(path, pid, host)`` of every ``kind`` sibling of ``folder`` an earlier write made."""
    parent, name = os.path.split(folder)
    pattern = re.compile(re.escape(f".{name}{kind}") + r"(\d+)@(.*)-[^-]*")
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for fn in entries:
        m = pattern.fullmatch(fn)
        if m:
            found.append((os.path.join(parent, fn), int(m.group(1)), m.group(2)))
    return found


def _is_stale(path: str, pid: int, host: str) -> bool:
    """Whether the writer of leftover ``path`` is gone (pid dead here; else older than us)."""
    if host == socket.gethostname():
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    try:
        return os.lstat(path).st_mtime < _PROCESS_START
    except OSError:
        return False


def _remove_leftovers(folder: str) -> None:
    """Remove what interrupted writes to ``folder`` left beside it (their writers are gone)."""
    for kind in (_SAVING, _ASIDE):
        for path, pid, host in _leftovers(folder, kind):
            if _is_stale(path, pid, host):
                shutil.rmtree(path, ignore_errors=True)


def interrupted_save(folder: str | os.PathLike) -> str | None:
    """A message when ``folder`` is missing because a save was interrupted between its two
    renames (the previous version is in an aside-folder beside it); ``None`` otherwise."""
    folder = os.path.realpath(os.fspath(folder))
    if os.path.exists(folder):
        return None
    asides = [path for path, _, _ in _leftovers(folder, _ASIDE)]
    if not asides:
        return None
    return (
        f"{folder!r} is missing: a save to it was interrupted, and its previous version is in "
        f"{asides[0]!r}; rename that folder back to {folder!r} (or save again)"
    )


def _carry_over(old: str, new: str, owned: Callable[[str], bool]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` this writer does not own."""
    present = set(os.listdir(new))
    for fn in os.listdir(old):
        if fn in present or owned(fn) or fn.startswith((_SAVING, _ASIDE)):
            continue  # ours, replaced; or a leftover of the in-folder temp layout of old versions
        src, dst = os.path.join(old, fn), os.path.join(new, fn)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def write_folder_atomic(
    folder: str | os.PathLike,
    write: Callable[[str], None],
    owned: Callable[[str], bool] = lambda fn: True,
) -> None:
    """Replace ``folder`` as a whole by what ``write(tmp)`` puts into a new sibling folder.

    ``write`` fills the temporary folder; the entries of the old folder that ``owned`` does not
    claim (and ``write`` did not write) are carried over by hard link. Then one rename swaps the
    folders: the old one moves aside, the new one takes its path, the old one is removed. At every
    instant the path holds the old complete folder or the new one; a crash between the two
    renames leaves no folder and the old one aside (:func:`interrupted_save` says so). Files get
    the usual mode (``0666 & ~umask``), a new folder ``0777 & ~umask``, a replaced one its old
    mode. Leftovers of interrupted earlier writes (whose process is gone) are removed after the
    swap.
    """
    folder = os.path.realpath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write a folder at {folder!r}: a file is there")
    parent = os.path.dirname(folder)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):  # makedirs would say "File exists"
        raise NotADirectoryError(20, "Not a directory", folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = _sibling(folder, _SAVING)
    try:
        write(tmp)
        file_mode = _usual_mode(directory=False)
        for fn in os.listdir(tmp):  # safetensors writes 0600; a saved model is for every user
            path = os.path.join(tmp, fn)
            if os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, file_mode)
        existed = os.path.isdir(folder)
        if existed:
            _carry_over(folder, tmp, owned)
        os.chmod(tmp, os.stat(folder).st_mode & 0o7777 if existed else _usual_mode(directory=True))
        _swap(tmp, folder, existed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_leftovers(folder)


def _swap(tmp: str, folder: str, existed: bool) -> None:
    """Rename ``tmp`` to ``folder``, moving an existing ``folder`` aside first."""
    if not existed:
        os.rename(tmp, folder)
        return
    cwd = os.getcwd()
    aside = _sibling(folder, _ASIDE)  # empty: rename(2) replaces an empty folder
    os.rename(folder, aside)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if cwd == folder or cwd.startswith(folder + os.sep):
        # The process' working folder moved aside with the old folder: follow the path.
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir(folder)
