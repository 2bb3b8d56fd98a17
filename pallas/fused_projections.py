"""Fused decode projections over stacked weights, one launch each (Pallas, Triton lowering).

At batch 1 a Llama layer is seven weight streams. Launched one by one, the three attention
projections (4096 x 4096 each in 7B) are too small to fill the GPU, and every launch pays its
own ramp-up and tail (DESIGN.md §2, lesson 4). Here the projections that share an input share
one launch:

* ``qkv_matmul``: ``q, k, v = x @ wq[l], x @ wk[l], x @ wv[l]``. The grid covers the column
  blocks of all three weights, in order: programs ``[0, Nq/bn)`` read ``wq``, the next
  ``Nkv/bn`` read ``wk``, the last ``Nkv/bn`` read ``wv`` (a three-way ``lax.switch`` on the
  program id). One output ``[M, Nq + 2 Nkv]`` is written and sliced afterwards.
* ``gate_up_matmul``: ``silu(x @ wg[l] + bg[l]) * (x @ wu[l] + bu[l])``. Each program streams
  the same column block of ``wg`` and ``wu`` (two accumulators) and applies bias and SiLU in
  float32 before writing ``x.dtype``, so the ``[M, F]`` activation is the only output.

As in ``stacked_matmul``, weights are stacked ``[L, K, N]`` and read in place at a layer index
passed as data (one compile for all layers; nothing copied inside ``while_loop``/``scan``), and
``split_k > 1`` writes float32 partial sums that XLA reduces (for ``gate_up`` the SiLU then runs
in that reduction's epilogue). ``split_k == 1`` writes ``x.dtype`` directly: one launch, no
reduction. Rows are one block of a power of two ``>= 16`` that may overrun ``x [M, K]``: loaded
with a row mask (zeros past ``M``) and stored for the first ``M`` rows only, so no XLA pad or
slice launches around the kernels at decode batch sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._blocks import (
    blocks_name,
    check_block_sizes,
    compiler_params,
    fit_shared_memory,
    largest_divisor,
    masked_rows,
    padded_rows,
    store_rows,
)
from ._checks import check_layer
from ._tiles import SCALAR, bias_row, out_shape, stream_columns, whole
from .stacked_matmul import BlockSizes

__all__ = [
    "BlockSizes",
    "default_gate_up_block_sizes",
    "default_qkv_block_sizes",
    "gate_up_matmul",
    "gate_up_matmul_reference",
    "qkv_matmul",
    "qkv_matmul_reference",
    "supports",
]

# Measured defaults, keyed by qkv (K, Nq, Nkv) and gate_up (K, F): the sweep's numbers in tuned.py.
# qkv's three branches keep their own pipeline buffers: n64/k256 and larger do not fit at 3 stages.
_TUNED_QKV: dict[tuple[int, int, int], BlockSizes] = {
    (4096, 4096, 4096): BlockSizes(block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=3),
}
_TUNED_GATE_UP: dict[tuple[int, int], BlockSizes] = {
    (4096, 11008): BlockSizes(block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=3),
}


# ---------------------------------------------------------------------------------------------
# References (the spec)


def _project(x, w, layer, b):
    y = jnp.dot(x, w[layer].astype(x.dtype), preferred_element_type=jnp.float32)
    return y if b is None else y + b[layer].astype(jnp.float32)


def qkv_matmul_reference(
    x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, layer: jax.Array | int,
    b_q: jax.Array | None = None, b_k: jax.Array | None = None, b_v: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [M, K] @ w[layer] (+ b[layer])`` for ``w`` in ``wq, wk, wv``; float32 sums, ``x.dtype``."""
    return tuple(
        _project(x, w, layer, b).astype(x.dtype) for w, b in ((wq, b_q), (wk, b_k), (wv, b_v))
    )


def gate_up_matmul_reference(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, layer: jax.Array | int,
    b_gate: jax.Array | None = None, b_up: jax.Array | None = None,
) -> jax.Array:
    """SwiGLU input ``silu(x @ wg[layer] + bg) * (x @ wu[layer] + bu)`` in float32, ``x.dtype`` out."""
    gate = _project(x, w_gate, layer, b_gate)
    up = _project(x, w_up, layer, b_up)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Shapes and block sizes


def supports(k: int, *ns: int) -> bool:
    """Whether the kernels tile ``K`` and every output width (multiples of 16)."""
    return all(d % 16 == 0 for d in (k, *ns))


def _heuristic(k: int, ns: tuple[int, ...]) -> BlockSizes:
    """Blocks like the measured winners: wide columns, 128-deep K steps, split K only when the
    column blocks alone are fewer than ~96 programs (7B qkv: 96 programs of 128 columns won)."""
    block_n = largest_divisor(functools.reduce(_gcd, ns), (128, 64, 32, 16))
    block_k = largest_divisor(k, (128, 64, 32, 16))
    programs = sum(ns) // block_n
    split_k = 1
    while programs * split_k < 96 and split_k < 4 and (k // block_k) % (2 * split_k) == 0:
        split_k *= 2
    return BlockSizes(block_n=block_n, block_k=block_k, split_k=split_k)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def default_qkv_block_sizes(m: int, k: int, nq: int, nkv: int) -> BlockSizes:
    """Measured blocks for known shapes (``_TUNED_QKV``, 16 rows), else a heuristic that tiles
    the shape; K steps made shallower where more rows would overflow shared memory."""
    bs = _TUNED_QKV.get((k, nq, nkv)) or _heuristic(k, (nq, nkv, nkv))
    return fit_shared_memory(bs, padded_rows(m), ((bs.block_n,),) * 3)


def default_gate_up_block_sizes(m: int, k: int, f: int) -> BlockSizes:
    """Measured blocks for known shapes (``_TUNED_GATE_UP``), else the same heuristic on the
    ``F`` columns of each weight (SiLU in the kernel needs ``split_k = 1``, which also won)."""
    bs = _TUNED_GATE_UP.get((k, f)) or dataclasses.replace(_heuristic(k, (f,)), split_k=1)
    return fit_shared_memory(bs, padded_rows(m), ((bs.block_n, bs.block_n),))


def _check_operands(x, weights: dict[str, jax.Array], biases: dict[str, jax.Array | None]):
    if x.ndim != 2:
        raise ValueError(f"expected x [M, K], got {x.shape=}")
    k = x.shape[1]
    num_layers = None
    for name, w in weights.items():
        if w.ndim != 3 or w.shape[1] != k:
            raise ValueError(f"expected {name} [L, K={k}, N], got {name}.shape={w.shape}")
        if num_layers is not None and w.shape[0] != num_layers:
            raise ValueError(f"weights stack different layer counts: {name}.shape={w.shape}, "
                             f"L={num_layers}")
        num_layers = w.shape[0]
        if not supports(k, w.shape[2]):
            raise ValueError(f"{name}: K={k} and N={w.shape[2]} must be multiples of 16")
    for name, b in biases.items():
        w = weights[name.replace("b_", "w_")]
        if b is not None and b.shape != (w.shape[0], w.shape[2]):
            raise ValueError(f"expected {name} [L, N] = {(w.shape[0], w.shape[2])}, got {b.shape}")


# ---------------------------------------------------------------------------------------------
# Kernels


def _qkv_kernel(layer_ref, x_ref, wq_ref, wk_ref, wv_ref, *refs, m, blocks, has_bias, **kw):
    # x_ref [Mp, K] block of x [M, K]; w*_ref [L, K, N*] and b*_ref [L, N*] whole (in HBM);
    # o_ref [Mp, block_n]: column block n of [q | k | v] (of split s when split_k > 1); rows
    # >= M of x_ref and o_ref lie outside the arrays (masked).
    *b_refs, o_ref = refs
    if not has_bias:
        b_refs = (None, None, None)
    n, s = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[()]
    firsts = (0, blocks[0], blocks[0] + blocks[1])  # first program of each projection
    x_ref = masked_rows(x_ref, m)

    def projection(w_ref, b_ref, first):
        def compute():
            (acc,) = stream_columns(x_ref, (w_ref,), layer, n - first, s, **kw)
            return acc if b_ref is None else acc + bias_row(b_ref, layer, n - first, kw["block_n"])

        return compute

    which = (n >= firsts[1]).astype(jnp.int32) + (n >= firsts[2]).astype(jnp.int32)
    acc = jax.lax.switch(which, [projection(w, b, f) for w, b, f in
                                 zip((wq_ref, wk_ref, wv_ref), b_refs, firsts)])
    store_rows(o_ref, acc, m)


def _gate_up_kernel(layer_ref, x_ref, wg_ref, wu_ref, *refs, m, has_bias, fused, **kw):
    # fused (split_k == 1): o_ref [Mp, block_n] = silu(gate + bg) * (up + bu) in x.dtype;
    # else og_ref, ou_ref [Mp, block_n]: float32 partial sums of split s. x_ref [Mp, K] block of
    # x [M, K]; rows >= M of the blocks lie outside the arrays (masked).
    n, s = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[()]
    gate, up = stream_columns(masked_rows(x_ref, m), (wg_ref, wu_ref), layer, n, s, **kw)
    if not fused:
        og_ref, ou_ref = refs
        store_rows(og_ref, gate, m)
        store_rows(ou_ref, up, m)
        return
    if has_bias:
        bg_ref, bu_ref, o_ref = refs
        gate = gate + bias_row(bg_ref, layer, n, kw["block_n"])
        up = up + bias_row(bu_ref, layer, n, kw["block_n"])
    else:
        (o_ref,) = refs
    store_rows(o_ref, jax.nn.silu(gate) * up, m)


def _column_out(mp, block_n, split_k):
    if split_k == 1:
        return pl.BlockSpec((mp, block_n), lambda i, j: (0, i))
    return pl.BlockSpec((None, mp, block_n), lambda i, j: (j, 0, i))


# ---------------------------------------------------------------------------------------------
# Public ops


def qkv_matmul(
    x: jax.Array,
    wq: jax.Array,
    wk: jax.Array,
    wv: jax.Array,
    layer: jax.Array | int,
    b_q: jax.Array | None = None,
    b_k: jax.Array | None = None,
    b_v: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v = x @ wq[layer], x @ wk[layer], x @ wv[layer]`` (+ biases) in one launch.

    Args:
      x: ``[M, K]`` activations; read in a row block of a power of two >= 16 (the tensor-core
        dot's minimum), masked past ``M``.
      wq: ``[L, K, Nq]`` stacked weights; ``wk``, ``wv``: ``[L, K, Nkv]`` (``Nkv <= Nq`` for GQA).
      layer: the layer to read, may be traced (a loop index).
      b_q, b_k, b_v: optional ``[L, N]`` biases (all or none).
      block_sizes: ``block_n`` must divide ``Nq`` and ``Nkv``; default per shape, measured.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``q [M, Nq]``, ``k [M, Nkv]``, ``v [M, Nkv]`` in ``x.dtype`` (float32 accumulation).
    """
    check_layer(layer, wq.shape[0])
    return _qkv_matmul(x, wq, wk, wv, layer, b_q, b_k, b_v, block_sizes=block_sizes,
                       interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _qkv_matmul(x, wq, wk, wv, layer, b_q, b_k, b_v, *, block_sizes, interpret):
    biases = {"b_q": b_q, "b_k": b_k, "b_v": b_v}
    _check_operands(x, {"w_q": wq, "w_k": wk, "w_v": wv}, biases)
    if wk.shape != wv.shape:
        raise ValueError(f"wk and wv must have one shape, got {wk.shape=} and {wv.shape=}")
    has_bias = b_q is not None
    if any((b is None) != (not has_bias) for b in biases.values()):
        raise ValueError("pass all of b_q, b_k, b_v or none")
    m, k = x.shape
    nq, nkv = wq.shape[2], wk.shape[2]
    bs = block_sizes or default_qkv_block_sizes(m, k, nq, nkv)
    check_block_sizes(bs, k, {"Nq": nq, "Nkv": nkv})
    mp = padded_rows(m)
    layer = jnp.asarray(layer, jnp.int32)
    blocks = (nq // bs.block_n, nkv // bs.block_n, nkv // bs.block_n)
    in_bias = has_bias and bs.split_k == 1  # with split_k > 1, XLA adds them after the sum
    out = pl.pallas_call(
        functools.partial(_qkv_kernel, m=m, blocks=blocks, has_bias=in_bias, block_k=bs.block_k,
                          block_n=bs.block_n, k_per_split=k // bs.split_k),
        grid=(sum(blocks), bs.split_k),
        in_specs=[SCALAR, whole((mp, k)), whole(wq.shape),
                  whole(wk.shape), whole(wv.shape)]
        + ([whole(b.shape) for b in (b_q, b_k, b_v)] if in_bias else []),
        out_specs=_column_out(mp, bs.block_n, bs.split_k),
        out_shape=out_shape(m, nq + 2 * nkv, bs.split_k, x.dtype),
        compiler_params=compiler_params(bs),
        interpret=interpret,
        name=f"qkv_matmul_{blocks_name(bs)}",
    )(layer, x, wq, wk, wv, *((b_q, b_k, b_v) if in_bias else ()))
    if bs.split_k > 1:
        out = out.sum(axis=0)
    q, kk, v = out[:, :nq], out[:, nq:nq + nkv], out[:, nq + nkv:]
    if has_bias and not in_bias:
        q, kk, v = (y + b[layer].astype(y.dtype) for y, b in ((q, b_q), (kk, b_k), (v, b_v)))
    return q.astype(x.dtype), kk.astype(x.dtype), v.astype(x.dtype)


def gate_up_matmul(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    layer: jax.Array | int,
    b_gate: jax.Array | None = None,
    b_up: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``silu(x @ w_gate[layer] + b_gate[layer]) * (x @ w_up[layer] + b_up[layer])`` in one launch.

    Args:
      x: ``[M, K]`` activations; read in a row block of a power of two >= 16, masked past ``M``.
      w_gate, w_up: ``[L, K, F]`` stacked weights.
      layer: the layer to read, may be traced.
      b_gate, b_up: optional ``[L, F]`` biases (both or none).
      block_sizes: with ``split_k == 1`` bias and SiLU run in the kernel's epilogue; with
        ``split_k > 1`` the kernel writes float32 partial sums and XLA reduces them and applies
        bias and SiLU. Default per shape, measured.
      interpret: run in Pallas interpret mode (CPU tests).

    Returns:
      ``[M, F]`` in ``x.dtype``, computed in float32.
    """
    check_layer(layer, w_gate.shape[0])
    return _gate_up_matmul(x, w_gate, w_up, layer, b_gate, b_up, block_sizes=block_sizes,
                           interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _gate_up_matmul(x, w_gate, w_up, layer, b_gate, b_up, *, block_sizes, interpret):
    _check_operands(x, {"w_gate": w_gate, "w_up": w_up}, {"b_gate": b_gate, "b_up": b_up})
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate and w_up must have one shape, got {w_gate.shape=} and "
                         f"{w_up.shape=}")
    has_bias = b_gate is not None
    if (b_up is not None) != has_bias:
        raise ValueError("pass both b_gate and b_up or neither")
    m, k = x.shape
    f = w_gate.shape[2]
    bs = block_sizes or default_gate_up_block_sizes(m, k, f)
    check_block_sizes(bs, k, {"F": f})
    mp = padded_rows(m)
    layer = jnp.asarray(layer, jnp.int32)
    fused = bs.split_k == 1
    in_bias = has_bias and fused
    out = pl.pallas_call(
        functools.partial(_gate_up_kernel, m=m, has_bias=in_bias, fused=fused, block_k=bs.block_k,
                          block_n=bs.block_n, k_per_split=k // bs.split_k),
        grid=(f // bs.block_n, bs.split_k),
        in_specs=[SCALAR, whole((mp, k)), whole(w_gate.shape),
                  whole(w_up.shape)]
        + ([whole(b_gate.shape), whole(b_up.shape)] if in_bias else []),
        out_specs=_column_out(mp, bs.block_n, 1) if fused
        else [_column_out(mp, bs.block_n, bs.split_k)] * 2,
        out_shape=out_shape(m, f, 1, x.dtype) if fused
        else [out_shape(m, f, bs.split_k, x.dtype)] * 2,
        compiler_params=compiler_params(bs),
        interpret=interpret,
        name=f"gate_up_matmul_{blocks_name(bs)}",
    )(layer, x, w_gate, w_up, *((b_gate, b_up) if in_bias else ()))
    if fused:
        return out
    gate, up = (p.sum(axis=0) for p in out)
    if has_bias:
        gate = gate + b_gate[layer].astype(jnp.float32)
        up = up + b_up[layer].astype(jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)
