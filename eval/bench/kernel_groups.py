"""What the kernel sweep times: the projection groups, the loops they run in, the block grids.

Four projection groups at Llama-2-7B shapes (``qkv``, ``gate_up``, ``o``, ``down``), each timed
inside a ``lax.fori_loop`` over ``L`` stacked layers with the layer index as data (as in the
decode loop). Every iteration feeds the outputs back into ``x`` with one small elementwise op
(:func:`feed`), so nothing is dead or hoisted.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.pallas import fused_projections as fp
from loraswitch_jax.pallas import stacked_matmul as sm

__all__ = ["F32", "HARNESSES", "BlockSizes", "Group", "coarse_grid", "feed", "groups",
           "in_loop", "make_weights", "short", "silu_mul", "smem_ok", "timeit", "unrolled"]

BlockSizes = sm.BlockSizes
F32 = jnp.float32
HARNESSES = ("loop", "unrolled")


def timeit(fn, *args, reps: int, calls: int = 1) -> float:
    """Median seconds per call over ``reps`` samples of ``calls`` queued calls (after a warm-up)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / calls)
    return float(np.median(ts))


def feed(x, ys):
    """``x + 1e-3 * (outputs folded to x's width)``: one elementwise op keeps every output live."""
    k = x.shape[1]
    acc = x.astype(F32)
    for y in ys:
        for s in range(0, y.shape[1], k):
            c = y[:, s : s + k].astype(F32)
            acc = acc + 1e-3 * jnp.pad(c, ((0, 0), (0, k - c.shape[1])))
    return acc.astype(x.dtype)


def silu_mul(g, u, dtype):
    return (jax.nn.silu(g.astype(F32)) * u.astype(F32)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Group:
    """A projection group: its name, input width ``k`` and output widths ``ns``."""

    name: str
    k: int
    ns: tuple[int, ...]  # output widths of the weights, in order

    @property
    def weight_bytes(self) -> int:
        return 2 * self.k * sum(self.ns)

    def xla(self, x, ws, layer):
        ys = [jnp.dot(x, w[layer], preferred_element_type=F32).astype(x.dtype) for w in ws]
        return [silu_mul(*ys, x.dtype)] if self.name == "gate_up" else ys

    def xla_model(self, x, ws, layer):
        """As ``ops.stacked_linear(impl="xla")``: einsum with bf16 output, SiLU in float32."""
        ys = [jnp.einsum("mk,kn->mn", x, w[layer].astype(x.dtype)) for w in ws]
        return [silu_mul(*ys, x.dtype)] if self.name == "gate_up" else ys

    def separate(self, x, ws, layer, bss, interpret):
        ys = [sm.stacked_matmul(x, w, layer, block_sizes=bs, interpret=interpret)
              for w, bs in zip(ws, bss)]
        return [silu_mul(*ys, x.dtype)] if self.name == "gate_up" else ys

    def fused(self, x, ws, layer, bs, interpret):
        if self.name == "qkv":
            return list(fp.qkv_matmul(x, *ws, layer, block_sizes=bs, interpret=interpret))
        if self.name == "gate_up":
            return [fp.gate_up_matmul(x, *ws, layer, block_sizes=bs, interpret=interpret)]
        return [sm.stacked_matmul(x, ws[0], layer, block_sizes=bs, interpret=interpret)]

    def reference(self, x, ws, layer):
        if self.name == "qkv":
            return list(fp.qkv_matmul_reference(x, *ws, layer))
        if self.name == "gate_up":
            return [fp.gate_up_matmul_reference(x, *ws, layer)]
        return [sm.stacked_matmul_reference(x, ws[0], layer)]

    def default(self, m):
        if self.name == "qkv":
            return fp.default_qkv_block_sizes(m, self.k, self.ns[0], self.ns[1])
        if self.name == "gate_up":
            return fp.default_gate_up_block_sizes(m, self.k, self.ns[0])
        return sm.default_block_sizes(m, self.k, self.ns[0])


def in_loop(op, num_layers: int, passes: int, harness: str):
    """``passes * L`` calls of ``op(x, ws, layer)`` inside a fori_loop.

    Harness ``loop``: one call per iteration, layer = i % L (traced data; each call also pays the
    loop's per-iteration cost). Harness ``unrolled``: one iteration per pass with the L layers
    unrolled inside it (layer indices are constants, still passed to the kernels as data), as in
    the decode step, whose token loop holds all layers' launches back to back.
    """
    if harness not in HARNESSES:
        raise ValueError(f"harness must be one of {HARNESSES}, got {harness!r}")
    if harness == "unrolled":

        def run(x, ws):
            def one_pass(i, x):
                for layer in range(num_layers):
                    x = feed(x, op(x, ws, layer))
                return x

            return jax.lax.fori_loop(0, passes, one_pass, x)

        return run

    def run(x, ws):
        return jax.lax.fori_loop(
            0, passes * num_layers, lambda i, x: feed(x, op(x, ws, i % num_layers)), x
        )

    return run


def unrolled(op, num_layers):
    """One pass over the layers, unrolled (static slices, no loop): XLA's best case."""

    def run(x, ws):
        for layer in range(num_layers):
            x = feed(x, op(x, ws, layer))
        return x

    return run


def smem_ok(group: Group, bs: BlockSizes, mp: int) -> bool:
    """Skip blocks whose pipelined tiles surely exceed Hopper's 227 KiB of shared memory.

    Triton keeps ``num_stages - 1`` to ``num_stages`` copies of each tile; borderline blocks are
    tried and a failed compile is reported and skipped."""
    weights = 2 if group.name == "gate_up" else 1
    stage = 2 * (weights * bs.block_k * bs.block_n + mp * bs.block_k)
    return (bs.num_stages - 1) * stage <= 227 * 1024


def coarse_grid(group: Group, mp: int, min_programs: int = 64) -> list[BlockSizes]:
    if group.name == "qkv":
        space = itertools.product((32, 64, 128), (128, 256, 512), (1, 2, 4))
    elif group.name == "gate_up":
        space = [*itertools.product((32, 64, 128), (128, 256, 512), (1, 2)),
                 (16, 256, 1), (16, 512, 1)]
    elif group.name == "o":
        space = itertools.product((32, 64, 128, 256), (128, 256, 512), (1, 2, 4, 8))
    else:  # down: 11008 = 43 * 256, so block_k * split_k <= 256
        space = itertools.product((32, 64, 128, 256), (32, 64, 128, 256), (1, 2, 4, 8))
    out = []
    for bn, bk, sk in space:
        bs = BlockSizes(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=3)
        programs = sum(n // bn for n in group.ns) * sk / (2 if group.name == "gate_up" else 1)
        if any(n % bn for n in group.ns) or group.k % (bk * sk):
            continue
        if not min_programs <= programs <= 1600 or not smem_ok(group, bs, mp):
            continue
        if group.name == "down" and bk < 128 and bk * sk != 256:
            continue  # small K tiles only where needed to reach split_k 4 and 8
        out.append(bs)
    return out


def groups(small: bool) -> list[Group]:
    if small:
        return [Group("o", 256, (256,)), Group("qkv", 256, (256, 128, 128)),
                Group("gate_up", 256, (768, 768)), Group("down", 768, (256,))]
    d, f = 4096, 11008
    return [Group("o", d, (d,)), Group("qkv", d, (d, d, d)), Group("gate_up", d, (f, f)),
            Group("down", f, (d,))]


def make_weights(group: Group, num_layers: int, seed: int):
    def one(key, n):
        w = jax.random.normal(key, (num_layers, group.k, n), F32) / np.sqrt(group.k)
        return w.astype(jnp.bfloat16)

    keys = jax.random.split(jax.random.key(seed), len(group.ns))
    return tuple(jax.jit(one, static_argnums=1)(k, n) for k, n in zip(keys, group.ns))


def short(bs: BlockSizes) -> str:
    return (f"n{bs.block_n} k{bs.block_k} s{bs.split_k} w{bs.num_warps} st{bs.num_stages}")
