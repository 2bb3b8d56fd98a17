"""Loading Hugging Face safetensors straight into sharded global arrays, each process reading only
the slices its own devices hold.

Each parameter is built by ``jax.make_array_from_callback(shape, sharding, cb)``; JAX calls ``cb``
with the index (a tuple of slices into the global array) of every device of this process, and
``cb`` reads just that block from the memory-mapped files (``safe_open(...).get_slice(name)[idx]``):
no host ever holds a whole tensor that its devices split. Stacked per-layer leaves ``[L, ...]``
read the block's layers one HF tensor at a time; a transposed leaf (ours ``[d_in, d_out]``, HF
``[d_out, d_in]``) reads the mirrored block and transposes it. Devices of one process that hold
the same block (replicas over another mesh axis) share one read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.sharding import Sharding

from loraswitch_jax.params import LayerParams, LlamaParams

__all__ = ["Index", "ReadSlice", "check_shardings", "load_sharded"]

Index = tuple[slice, ...]
# read(hf_name, hf_shape, hf_index) -> the block hf_tensor[hf_index] in the host dtype.
ReadSlice = Callable[[str, tuple[int, ...], Index], np.ndarray]


def _bounds(index: Index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``((start, stop), ...)`` of a device index (slices with step 1, as shardings give)."""
    out = []
    for s, dim in zip(index, shape):
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ValueError(f"a shard index with step {step} (only contiguous blocks are read)")
        out.append((start, stop))
    return tuple(out)


def _build(name: str, shape: tuple[int, ...], sharding: Sharding,
           block: Callable[[tuple[tuple[int, int], ...]], np.ndarray]) -> jax.Array:
    """The global array ``name`` of ``shape`` on ``sharding``; ``block(bounds)`` reads one
    device's part, once per distinct part on this process."""
    try:
        sharding.shard_shape(shape)
    except (ValueError, IndexError) as e:  # jax's message spans lines and names no leaf
        raise ValueError(f"shardings.{name} does not fit its shape {shape}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def cb(index: Index) -> np.ndarray:
        key = _bounds(index, shape)
        if key not in cache:
            cache[key] = block(key)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, cb)


def _plain(read: ReadSlice, name: str, shape: tuple[int, ...], transpose: bool):
    """``block`` of a leaf that is one HF tensor of ``shape`` (ours is its transpose if asked)."""
    def block(bounds):
        hf = bounds[::-1] if transpose else bounds
        t = read(name, shape, tuple(slice(a, b) for a, b in hf))
        return np.ascontiguousarray(t.T) if transpose else t

    return block


def _stacked(read: ReadSlice, names: list[str], shape: tuple[int, ...], transpose: bool,
             dtype: np.dtype):
    """``block`` of a ``[L, ...]`` leaf stacked from one HF tensor of ``shape`` per layer."""
    def block(bounds):
        (l0, l1), inner = bounds[0], bounds[1:]
        hf = tuple(slice(a, b) for a, b in (inner[::-1] if transpose else inner))
        out = np.empty((l1 - l0, *(b - a for a, b in inner)), dtype)
        for j, layer in enumerate(range(l0, l1)):
            t = read(names[layer], shape, hf)
            out[j] = t.T if transpose else t
        return out

    return block


def check_shardings(shardings: LlamaParams, present: set[str]) -> None:
    """Refuse a ``shardings`` tree that is not a :class:`LlamaParams` of ``Sharding`` leaves
    exactly where the model has tensors (``present``: ``lm_head`` and the layer fields it has;
    ``embed`` and ``final_norm`` always).

    Raises:
      ValueError: the first leaf that is missing, extra or not a ``jax.sharding.Sharding``.
    """
    if not isinstance(shardings, LlamaParams) or not isinstance(shardings.layers, LayerParams):
        raise ValueError(f"shardings must be a LlamaParams of jax.sharding.Sharding, got "
                         f"{type(shardings).__name__}")
    leaves = {"embed": shardings.embed, "final_norm": shardings.final_norm,
              "lm_head": shardings.lm_head,
              **{f"layers.{f.name}": getattr(shardings.layers, f.name)
                 for f in dataclasses.fields(LayerParams)}}
    for name, s in leaves.items():
        want = name in ("embed", "final_norm") or name.removeprefix("layers.") in present
        if want and not isinstance(s, Sharding):
            raise ValueError(f"shardings.{name} must be a jax.sharding.Sharding, got "
                             f"{type(s).__name__}")
        if not want and s is not None:
            raise ValueError(f"shardings.{name} must be None: this model has no such tensor")


def load_sharded(read: ReadSlice, shardings: LlamaParams, *, num_layers: int, dtype: np.dtype,
                 layer_entries: Iterable[tuple[str, str, tuple[int, ...], bool]],
                 embed_shape: tuple[int, int], lm_head: bool) -> LlamaParams:
    """:class:`LlamaParams` of global arrays placed by ``shardings``, read block by block.

    Args:
      read: reads one block of one HF tensor (shape-checked) in ``dtype``.
      shardings: a :class:`LlamaParams` of ``Sharding`` (``check_shardings``).
      num_layers: ``L``.
      dtype: the host dtype of the blocks.
      layer_entries: ``(field, hf_suffix, hf_shape, transpose)`` per per-layer tensor.
      embed_shape: ``(V, d)``.
      lm_head: whether an untied ``lm_head.weight`` (``[V, d]``, ours ``[d, V]``) is read.
    """
    V, d = embed_shape
    fields = {}
    for field, suffix, shape, transpose in layer_entries:
        names = [f"model.layers.{layer}.{suffix}" for layer in range(num_layers)]
        ours = (num_layers, *(shape[::-1] if transpose else shape))
        fields[field] = _build(f"layers.{field}", ours, getattr(shardings.layers, field),
                               _stacked(read, names, shape, transpose, dtype))
    embed = _build("embed", (V, d), shardings.embed, _plain(read, "model.embed_tokens.weight", (V, d), False))
    head = None
    if lm_head:
        head = _build("lm_head", (d, V), shardings.lm_head, _plain(read, "lm_head.weight", (V, d), True))
    return LlamaParams(
        embed=embed,
        layers=LayerParams(**fields),
        final_norm=_build("final_norm", (d,), shardings.final_norm,
                          _plain(read, "model.norm.weight", (d,), False)),
        lm_head=head,
    )
