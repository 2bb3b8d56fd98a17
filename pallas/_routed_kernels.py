"""The kernels behind ``routed_projections`` (private to ``pallas``): the one ``pallas_call``
that every routed projection launches (operand checks live in ``_routed_checks``).

Each program computes one column block of one or more projections of ``x``: the K loop streams
``W[layer][:, cols]``, then the epilogue adds ``sum_s xa[:, s] @ B[adapted, slot_experts[s]][:,
cols]`` and the bias (``split_k == 1``; with ``split_k > 1`` XLA adds the bias after its
reduction). Grid: (column blocks, split_k, row blocks). The epilogues that compute the next
projection's shrink ahead (down's from gate/up; gate/up's from o, q/k/v's from down, with the
residual) are ``_shrink_ahead``'s.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._blocks import (
    blocks_name,
    check_block_sizes,
    compiler_params,
    is_block,
    largest_divisor,
    pad_rows,
    row_blocks,
)
from ._shrink_ahead import NormedXa, load_xa, shrink_down, write_partials
from ._slots import GROUP_COLUMNS, PackedXa
from ._tiles import SCALAR, bias_row, dot_f32, out_shape, stream_k, weight_tile, whole
from .fused_projections import default_gate_up_block_sizes, default_qkv_block_sizes
from .stacked_matmul import default_block_sizes
from .tuned import UNROLLED_BYTES, UNROLLED_GROUPS

__all__ = [
    "gate_up_projections",
    "given_loras",
    "qkv_projections",
    "residual_projection",
    "single_projection",
    "unrolled",
]


def unrolled(rounds: int, group_bytes: int) -> bool:
    """Whether ``rounds`` expansion dots of one program, each loading ``group_bytes`` of
    operands, are unrolled (their loads issued together) rather than run in a loop."""
    return rounds == 1 or (rounds <= UNROLLED_GROUPS
                           and rounds * group_bytes <= UNROLLED_BYTES)


def _split_groups(split, split_k, count):
    """The groups whose expansion split ``split`` adds, ``(group, valid)`` each: group ``g``
    goes to split ``g % split_k``, so the work is balanced over the splits (each term counts
    once in their sum). ``valid`` is ``None`` or, in the last round where some splits have no
    group left, a flag (the group index is clamped)."""
    if split_k == 1:
        return [(g, None) for g in range(count)]
    groups = []
    for i in range(-(-count // split_k)):
        g = split + i * split_k
        if (i + 1) * split_k <= count:
            groups.append((g, None))
        else:
            groups.append((jnp.minimum(g, count - 1), g < count))
    return groups


def _expand_given(acc, lora_refs, slots_ref, adapted, cols, split, split_k, dtype):
    """``acc`` plus this split's share of ``sum_s xa[:, s] @ b[adapted, slot_experts[s]][:,
    cols]`` for a given packed ``xa [(P,) block_m, S r]`` (float32 partial sums are added up
    and rounded to ``dtype``, as ``lora_shrink`` rounds; a ``NormedXa``'s also scaled:
    ``_shrink_ahead.load_xa``) and ``b`` viewed as ``[La, E r, N]``.

    The term is a sum of dots over groups of ``xa``'s columns. Gather slots: one group per slot,
    ``r`` rows of its expert's ``B``. Dense slots (``S == E``, slot ``e`` is expert ``e``): ``xa``
    and ``B[adapted]`` line up row for row, so groups of up to :data:`GROUP_COLUMNS` rows span
    several experts (E 8, r 16: one dot where there were 8). Group ``g`` goes to split
    ``g % split_k``; up to :data:`UNROLLED_GROUPS` per program (and :data:`UNROLLED_BYTES` of
    operands) are unrolled, so all their loads are issued together, more run in a loop
    (measured: ``tuned.py``)."""
    xa_refs, b_ref, fold = lora_refs
    xa_ref = xa_refs[0]
    width = xa_ref.shape[-1]  # S r
    rank = width // slots_ref.shape[0]
    dense = b_ref.shape[1] == width
    size = largest_divisor(width, (GROUP_COLUMNS, 64, 32, 16)) if dense else rank
    count = width // size

    def term(g, valid):
        start = g * size
        xa = load_xa(xa_refs, slice(None), pl.ds(start, size), dtype, fold)
        if valid is not None:
            xa = jnp.where(valid, xa, jnp.zeros_like(xa))
        b = b_ref[adapted, pl.ds(start if dense else slots_ref[g] * rank, size), cols]
        return dot_f32(xa, b.astype(xa.dtype))

    rounds = -(-count // split_k)
    xa_bytes = np.prod(xa_ref.shape) // width * size * jnp.dtype(xa_ref.dtype).itemsize
    group_bytes = xa_bytes + size * cols.size * jnp.dtype(b_ref.dtype).itemsize
    if unrolled(rounds, group_bytes):
        for g, valid in _split_groups(split, split_k, count):
            acc = acc + term(g, valid)
        return acc

    def body(i, acc):
        g = split + i * split_k
        return acc + term(jnp.minimum(g, count - 1), g < count)

    return jax.lax.fori_loop(0, rounds, body, acc)


def _prefetch_rows(lora_refs, slots_ref, adapted, cols, split, split_k, dtype, num_rows):
    """Loads for :func:`_expand_rows`, issued before the K loop so that their latency hides
    behind it: for each gather slot of this split (as in :func:`_expand_given`), each real row's
    ``xa`` (float32 ``[r, 1]``, zero when the slot is not valid) and the slot's ``B`` block
    ``[r, block_n]``. Plain loads, no dot: a tensor-core operand would hold shared memory through
    the K loop (what overflowed when dots' operands were loaded early)."""
    xa_refs, b_ref, fold = lora_refs
    rank = xa_refs[0].shape[-1] // slots_ref.shape[0]
    loaded = []
    for g, valid in _split_groups(split, split_k, slots_ref.shape[0]):
        b = b_ref[adapted, pl.ds(slots_ref[g] * rank, rank), cols].astype(jnp.float32)
        xas = []
        for row in range(num_rows):
            xa = load_xa(xa_refs, pl.ds(row, 1), pl.ds(g * rank, rank), dtype, fold)
            xa = xa.astype(jnp.float32).T  # [r, 1]
            xas.append(xa if valid is None else jnp.where(valid, xa, jnp.zeros_like(xa)))
        loaded.append((xas, b))
    return loaded


def _expand_rows(acc, loaded):
    """``acc`` plus the prefetched slots' terms, row by row in registers: row ``i`` of the
    term is ``sum_j xa[i, j] B[j, :]``, a broadcast product summed over the rank."""
    rows = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0)
    for xas, b in loaded:
        for row, xa in enumerate(xas):
            term = (xa * b).sum(axis=0)  # [block_n]
            acc = acc + jnp.where(rows == row, term[None, :], 0.0)
    return acc


def _columns(x_ref, projections, ids, col_block, split, *, block_k, block_n, k_per_split,
             split_k, expand_rows=None):
    """Column block ``col_block`` of each projection, from split ``split``'s K chunk: float32
    ``[block_m, block_n]`` each, ``x @ w[layer]`` plus its LoRA term and bias.

    ``projections`` holds ``(w_ref, lora_refs, bias_ref)``. ``lora_refs`` is ``None`` or
    ``(xa_refs, b_ref, fold)`` (``xa_refs``: packed ``xa [(P,) block_m, S r]``, and a
    ``NormedXa``'s ``ss`` with ``fold = (eps, width)``; ``b [La, E r, N]``; expanded after the K
    loop by :func:`_expand_given`). All projections share the K loop. ``expand_rows`` (the
    number of real rows, gather slots): ``xa`` is expanded in registers from loads issued before
    the K loop (:func:`_prefetch_rows`) instead of by tensor-core dots after it.
    """
    layer, adapted, slots_ref = ids
    cols = pl.ds(col_block * block_n, block_n)
    tiles = [weight_tile(w_ref, layer, cols, block_n) for w_ref, _, _ in projections]
    prefetched = [
        _prefetch_rows(lora_refs, slots_ref, adapted, cols, split, split_k, x_ref.dtype,
                       expand_rows)
        if expand_rows and lora_refs is not None else None
        for _, lora_refs, _ in projections
    ]
    accs = iter(stream_k(x_ref, tiles, split * k_per_split, k_per_split // block_k,
                         block_k=block_k))
    outs = []
    for (_, lora_refs, bias_ref), loaded in zip(projections, prefetched):
        acc = next(accs)
        if loaded is not None:
            acc = _expand_rows(acc, loaded)
        elif lora_refs is not None:
            acc = _expand_given(acc, lora_refs, slots_ref, adapted, cols, split, split_k,
                                x_ref.dtype)
        if bias_ref is not None:
            acc = acc + bias_row(bias_ref, layer, col_block, block_n)
        outs.append(acc)
    return outs


def _unpack(refs, lora: tuple, bias: tuple[bool, ...], extra: int = 0):
    """Split the kernel's refs: weights, then each projection's LoRA refs (``lora[p]``: ``None``,
    no LoRA; ``False``, ``xa`` and ``b``; a ``NormedXa``'s ``(eps, width)``, ``xa``, ``b`` and
    ``ss``; see :func:`_columns`), then biases (only those added in the kernel), then ``extra``
    refs (the down shrink's or the residual's operands), then outputs."""
    it = iter(refs)
    w_refs = [next(it) for _ in lora]
    lora_refs = []
    for fold in lora:
        if fold is None:
            lora_refs.append(None)
            continue
        xa_ref, b_ref = next(it), next(it)
        xa_refs = (xa_ref,) if fold is False else (xa_ref, next(it))
        lora_refs.append((xa_refs, b_ref, fold or None))
    bias_refs = [next(it) if has else None for has in bias]
    extra_refs = [next(it) for _ in range(extra)]
    return w_refs, lora_refs, bias_refs, extra_refs, list(it)


def _projections_kernel(layer_ref, adapted_ref, slots_ref, x_ref, *refs, blocks, lora, bias,
                        ahead=0, **blocking):
    # x_ref [block_m, K]; whole (in HBM): w refs [L, K, N_p], b refs [La, E r, N_p], bias refs
    # [L, N_p]; packed xa refs [(split_k,) block_m, S r];
    # o_ref [block_m, block_n]: column block n of the concatenated outputs (of split s when
    # split_k > 1). Programs [first_p, first_p + blocks[p]) compute projection p. With
    # ``ahead`` (one projection, split_k == 1: the number of next projections' A stacks) the
    # residual's refs follow and o_ref holds h + y, then the next shrink's partials
    # (``_shrink_ahead.write_partials``).
    w_refs, lora_refs, bias_refs, extra, outs = _unpack(refs, lora, bias,
                                                         ahead + 5 if ahead else 0)
    n, s = pl.program_id(0), pl.program_id(1)
    ids = (layer_ref[()], adapted_ref[()], slots_ref)
    firsts = np.cumsum((0,) + blocks[:-1]).tolist()

    def projection(p):
        def compute():
            (acc,) = _columns(x_ref, [(w_refs[p], lora_refs[p], bias_refs[p])], ids,
                              n - firsts[p], s, **blocking)
            return acc

        return compute

    if len(blocks) == 1:
        acc = projection(0)()
    else:
        which = sum((n >= f).astype(jnp.int32) for f in firsts[1:])
        acc = jax.lax.switch(which, [projection(p) for p in range(len(blocks))])
    if ahead:
        write_partials(acc, extra, outs, slots_ref, n, blocking["block_n"])
    else:
        outs[0][...] = acc.astype(outs[0].dtype)


def _gate_up_kernel(layer_ref, adapted_ref, slots_ref, x_ref, *refs, lora, bias, down,
                    interpret, **blocking):
    # Both weights' column block n in one program (x loaded once per K step). split_k == 1:
    # o_ref [block_m, block_n] = silu(gate) * up in x.dtype (and, with ``down`` (the number of
    # real rows), that block's share of the down projection's shrink added into xa_ref); else
    # og_ref, ou_ref: float32 partial sums of split s.
    w_refs, lora_refs, bias_refs, down_refs, out_refs = _unpack(refs, lora, bias,
                                                                0 if down is None else 3)
    down_refs = down_refs[:2]
    n, s = pl.program_id(0), pl.program_id(1)
    ids = (layer_ref[()], adapted_ref[()], slots_ref)
    gate, up = _columns(x_ref, list(zip(w_refs, lora_refs, bias_refs)), ids, n, s, **blocking)
    if blocking["split_k"] == 1:
        o_ref = out_refs[0]
        act = (jax.nn.silu(gate) * up).astype(o_ref.dtype)
        if down is not None:  # first: an atomic add waits for the stores before it
            shrink_down(act, down_refs, out_refs[1], ids, n, pl.program_id(2),
                         blocking["block_n"], down, interpret)
        o_ref[...] = act
    else:
        og_ref, ou_ref = out_refs
        og_ref[...] = gate
        ou_ref[...] = up


# ---------------------------------------------------------------------------------------------
# The launch, and the drivers per output layout


def _out_spec(block_m, block_n, split_k):
    if split_k == 1:
        return pl.BlockSpec((block_m, block_n), lambda n, s, m: (m, n))
    return pl.BlockSpec((None, block_m, block_n), lambda n, s, m: (s, m, n))


def _launch(kernel, name, x, ws, layer, loras, adapted_layer, slot_experts, biases,
            block_sizes, *, col_blocks, width, outputs, interpret, down=None, ahead=None,
            expand="dot"):
    """The shared ``pallas_call``: operands, specs and grid for ``ws`` (one or more projections),
    their LoRA operands (``None`` or ``(xa, b)`` each) and biases.
    Returns the raw output(s), ``[(split_k,) Mp, width]``; with ``down`` (``(a_down,
    slot_weights)``, gate/up only) also the down projection's packed shrink, float32
    ``[Mp, S r]``; with ``ahead`` (a ``ResidualAhead``, one projection, ``split_k == 1``) the
    output is ``h + y``, then each next projection's ``xa`` partials ``[P, Mp, S r]`` and the
    ``ss`` partials ``[P, Mp]`` (float32, ``P`` the column blocks). ``expand``: ``"dot"`` or
    ``"rows"`` (:func:`check_expand`)."""
    num_rows, k = x.shape
    block_m, mp = row_blocks(num_rows)
    split_k = block_sizes.split_k
    in_bias = tuple(b is not None and split_k == 1 for b in biases)
    operands = [jnp.asarray(layer, jnp.int32), jnp.asarray(adapted_layer, jnp.int32),
                slot_experts.astype(jnp.int32), pad_rows(x, mp), *ws]
    specs = [SCALAR, SCALAR, whole(slot_experts.shape),
             pl.BlockSpec((block_m, k), lambda n, s, m: (m, 0)), *(whole(w.shape) for w in ws)]
    num_slots = slot_experts.shape[0]
    folds = []
    for lora in loras:
        if lora is None:
            folds.append(None)
            continue
        # xa packed, [Mp, S r]: a row block is one load, and B viewed as [La, E r, N] meets it
        # row for row in dense mode.
        given, b = lora
        xa = (given.xa if isinstance(given, (PackedXa, NormedXa))
              else pad_rows(given.reshape(num_rows, -1), mp))
        operands += [xa, b.reshape(b.shape[0], -1, b.shape[3])]
        if xa.ndim == 2:
            xa_spec = pl.BlockSpec((block_m, xa.shape[1]), lambda n, s, m: (m, 0))
        else:  # partial sums (a split shrink's, or per program), added up in the kernel
            xa_spec = pl.BlockSpec((xa.shape[0], block_m, xa.shape[2]), lambda n, s, m: (0, m, 0))
        specs += [xa_spec, whole(operands[-1].shape)]
        folds.append(False)
        if isinstance(given, NormedXa):
            operands.append(given.ss)
            specs.append(pl.BlockSpec((given.ss.shape[0], block_m), lambda n, s, m: (0, m)))
            folds[-1] = (given.eps, given.width)
    operands += [b for b, has in zip(biases, in_bias) if has]
    specs += [whole(b.shape) for b, has in zip(biases, in_bias) if has]
    shape = out_shape(mp, width, split_k, x.dtype)
    spec = _out_spec(block_m, block_sizes.block_n, split_k)
    out_shapes, out_specs, aliases = [shape] * outputs, [spec] * outputs, {}
    if down is not None:
        a_down, slot_weights = down
        zeros = jnp.zeros((mp, num_slots * a_down.shape[3]), jnp.float32)  # the atomic adds' start
        operands += [a_down, pad_rows(slot_weights.astype(jnp.float32), mp).T, zeros]
        specs += [whole(a_down.shape), pl.BlockSpec((num_slots, block_m), lambda n, s, m: (0, m)),
                  whole(zeros.shape)]
        aliases = {len(operands) - 1: outputs}
        out_shapes.append(jax.ShapeDtypeStruct(zeros.shape, zeros.dtype))
        out_specs.append(whole(zeros.shape))
    if ahead is not None:
        operands += [jnp.asarray(ahead.norm_layer, jnp.int32),
                     jnp.asarray(ahead.a_layer, jnp.int32), pad_rows(ahead.h, mp), ahead.norm,
                     *ahead.a, pad_rows(ahead.slot_weights.astype(jnp.float32), mp).T]
        specs += [SCALAR, SCALAR,
                  pl.BlockSpec((block_m, block_sizes.block_n), lambda n, s, m: (m, n)),
                  whole(ahead.norm.shape), *(whole(a.shape) for a in ahead.a),
                  pl.BlockSpec((num_slots, block_m), lambda n, s, m: (0, m))]
        for a in ahead.a:
            out_shapes.append(jax.ShapeDtypeStruct((col_blocks, mp, num_slots * a.shape[3]),
                                                   jnp.float32))
            out_specs.append(pl.BlockSpec((None, block_m, num_slots * a.shape[3]),
                                          lambda n, s, m: (n, m, 0)))
        out_shapes.append(jax.ShapeDtypeStruct((col_blocks, mp), jnp.float32))
        out_specs.append(pl.BlockSpec((None, block_m), lambda n, s, m: (n, m)))
    single = len(out_shapes) == 1
    suffix = ("_rows" if expand == "rows" else "") + ("_ahead" if ahead is not None else "")
    return pl.pallas_call(
        functools.partial(kernel, lora=tuple(folds), bias=in_bias, split_k=split_k,
                          block_k=block_sizes.block_k, block_n=block_sizes.block_n,
                          k_per_split=k // split_k,
                          expand_rows=num_rows if expand == "rows" else None),
        grid=(col_blocks, split_k, mp // block_m),
        in_specs=specs,
        out_specs=out_specs[0] if single else out_specs,
        out_shape=out_shapes[0] if single else out_shapes,
        input_output_aliases=aliases,
        compiler_params=compiler_params(block_sizes),
        interpret=interpret,
        name=f"{name}_m{block_m}_{blocks_name(block_sizes)}{suffix}",
    )(*operands)


def given_loras(xas, bs):
    """The LoRA operands of projections whose ``xa`` is given: ``(xa, b)`` each, or ``None``."""
    return tuple(None if xa is None else (xa, b) for xa, b in zip(xas, bs))


def single_projection(name, x, w, layer, lora, adapted_layer, slot_experts, bias, block_sizes,
                      interpret, expand="dot"):
    """One routed projection ``[M, N]`` in ``x.dtype`` (``lora`` from :func:`given_loras`);
    default blocks from ``stacked_matmul``."""
    m, k = x.shape
    n = w.shape[2]
    bs_ = block_sizes or default_block_sizes(m, k, n)
    check_block_sizes(bs_, k, {"N": n})
    out = _launch(functools.partial(_projections_kernel, blocks=(n // bs_.block_n,)), name, x,
                  (w,), layer, (lora,), adapted_layer, slot_experts, (bias,), bs_,
                  col_blocks=n // bs_.block_n, width=n, outputs=1, interpret=interpret,
                  expand=expand)
    if bs_.split_k > 1:  # the kernel adds the bias only when it writes the final sums
        out = out.sum(axis=0)
        if bias is not None:
            out = out + bias[layer].astype(jnp.float32)
    return out[:m].astype(x.dtype)


def residual_projection(name, x, w, layer, lora, adapted_layer, slot_experts, bias, block_sizes,
                        interpret, ahead, expand="dot"):
    """``h + y`` for one routed projection ``y`` (as :func:`single_projection`) and the next
    projections' shrinks of ``rms_norm(h + y) * norm[layer]`` as ``NormedXa`` partials (one per
    column block), for a ``ResidualAhead`` ``ahead``. ``split_k == 1`` only: default blocks are
    ``stacked_matmul``'s with a split turned into narrower column blocks (as many programs)."""
    m, k = x.shape
    n = w.shape[2]
    bs_ = block_sizes or default_block_sizes(m, k, n)
    if block_sizes is None and bs_.split_k > 1:
        narrow = bs_.block_n // bs_.split_k
        bs_ = dataclasses.replace(bs_, block_n=narrow if is_block(narrow) else bs_.block_n,
                                  split_k=1)
    check_block_sizes(bs_, k, {"N": n})
    if bs_.split_k != 1:
        raise ValueError(f"{bs_}: the residual and the next shrink ride in the projection's "
                         f"epilogue, which needs split_k == 1")
    col_blocks = n // bs_.block_n
    out = _launch(functools.partial(_projections_kernel, blocks=(col_blocks,),
                                    ahead=len(ahead.a)),
                  name, x, (w,), layer, (lora,), adapted_layer, slot_experts, (bias,), bs_,
                  col_blocks=col_blocks, width=n, outputs=1, interpret=interpret, ahead=ahead,
                  expand=expand)
    h_mid, *xas, ss = out
    return h_mid[:m], tuple(NormedXa(xa, ss, ahead.eps, n) for xa in xas)


def qkv_projections(name, x, ws, layer, loras, adapted_layer, slot_experts, biases, block_sizes,
                    interpret, expand="dot"):
    """``q, k, v`` of ``ws = (wq, wk, wv)`` in one launch, in ``x.dtype``; default blocks from
    ``fused_projections``."""
    wq, wk, wv = ws
    if wk.shape != wv.shape:
        raise ValueError(f"wk and wv must have one shape, got {wk.shape=} and {wv.shape=}")
    m, k = x.shape
    nq, nkv = wq.shape[2], wk.shape[2]
    bs_ = block_sizes or default_qkv_block_sizes(m, k, nq, nkv)
    check_block_sizes(bs_, k, {"Nq": nq, "Nkv": nkv})
    blocks = (nq // bs_.block_n, nkv // bs_.block_n, nkv // bs_.block_n)
    out = _launch(functools.partial(_projections_kernel, blocks=blocks), name, x, ws, layer,
                  loras, adapted_layer, slot_experts, biases, bs_, col_blocks=sum(blocks),
                  width=nq + 2 * nkv, outputs=1, interpret=interpret, expand=expand)
    if bs_.split_k > 1:
        out = out.sum(axis=0)
    out = out[:m]
    ys = (out[:, :nq], out[:, nq:nq + nkv], out[:, nq + nkv:])
    if bs_.split_k > 1:  # the kernel adds biases only when it writes the final sums
        ys = tuple(y if bias is None else y + bias[layer].astype(y.dtype)
                   for y, bias in zip(ys, biases))
    return tuple(y.astype(x.dtype) for y in ys)


def gate_up_projections(name, x, ws, layer, loras, adapted_layer, slot_experts, biases,
                        block_sizes, interpret, down=None, expand="dot"):
    """``silu(gate) * up`` of ``ws = (w_gate, w_up)`` in one launch (plus XLA's reduction when
    ``split_k > 1``), in ``x.dtype``; default blocks from ``fused_projections``. With ``down``
    (``(a_down, slot_weights)``; ``split_k == 1`` only) also the down projection's shrink of the
    result, as :class:`PackedXa` float32 sums ``[1, Mp, S r]``."""
    w_gate, w_up = ws
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate and w_up must have one shape, got {w_gate.shape=} and "
                         f"{w_up.shape=}")
    m, k = x.shape
    f = w_gate.shape[2]
    bs_ = block_sizes or default_gate_up_block_sizes(m, k, f)
    check_block_sizes(bs_, k, {"F": f})
    fused = bs_.split_k == 1
    if down is not None and not fused:
        raise ValueError(f"{bs_}: the down projection's shrink rides in the gate/up kernel's "
                         f"epilogue, which needs split_k == 1")
    out = _launch(functools.partial(_gate_up_kernel, down=None if down is None else m,
                                    interpret=interpret), name, x,
                  ws, layer, loras, adapted_layer, slot_experts, biases, bs_,
                  col_blocks=f // bs_.block_n, width=f, outputs=1 if fused else 2,
                  interpret=interpret, down=down, expand=expand)
    if down is not None:
        act, xa_down = out
        return act[:m], PackedXa(xa_down[None])
    if fused:
        return out[:m]
    gate, up = (p.sum(axis=0)[:m] for p in out)
    gate, up = (y if bias is None else y + bias[layer].astype(jnp.float32)
                for y, bias in zip((gate, up), biases))
    return (jax.nn.silu(gate) * up).astype(x.dtype)
