"""GPU sweep: fused decode projections and stacked_matmul vs XLA at Llama-2-7B shapes.

Times, per call, inside a ``lax.fori_loop`` over ``L`` stacked layers with the layer index as
data (as in the decode loop), every variant of four projection groups:

* ``qkv``: XLA dots, three ``stacked_matmul`` calls, ``qkv_matmul`` over a grid of block sizes;
* ``gate_up``: XLA dots + SiLU, two ``stacked_matmul`` calls + SiLU, ``gate_up_matmul`` (grid);
* ``o`` (4096 x 4096) and ``down`` (11008 x 4096): XLA dot and ``stacked_matmul`` (grid).

XLA is timed in the same loop (it copies ``w[layer]`` out of the stack first) and with the layers
unrolled in one jit and no loop (its best case), both as ``jnp.dot(..., preferred_element_type=
float32)`` (which XLA runs at ~0.19 of copy bandwidth at M = 1, H100, JAX 0.11.2) and, unrolled,
in the model's form (``ops.stacked_linear``: a bf16 einsum). Every loop iteration feeds the outputs
back into ``x`` with one small elementwise op (``feed``), so nothing is dead or hoisted; the cost
of that op and of the loop alone is measured too (``loop_only``).

The copy bandwidth (``x * scale`` over 2 GiB of bf16, bytes read + written) and a read-only
bandwidth (a sum over the same 2 GiB) are measured first; each time is reported as the fraction
``weight bytes / bandwidth / time``. Block-size grids run in two stages (block shapes at
``num_warps=4, num_stages=3``, then warps x stages for the three fastest), compiled in parallel
threads and timed one by one, each stage under a time budget so the script ends in ~5 minutes.

Harnesses: ``--harness loop`` (one call per fori_loop iteration, layer = i % L: each call also
pays the loop's per-iteration cost, ~11 us on an H100) and ``--harness unrolled`` (each iteration
runs all L layers back to back, as the decode step does). ``--configs-from RUN.json`` re-times
the ``--top`` fastest blocks of an earlier run instead of the grids.

Usage (GPU): ``python eval/sweep_projections.py --out DIR`` (the grid, ~2 minutes on an H100),
then ``--harness unrolled --configs-from DIR/sweep_projections.json --top 8`` (~3 minutes);
``--small`` runs tiny shapes in interpret mode (a CPU smoke test of the script itself). Writes
``DIR/sweep_projections.json`` and ``DIR/sweep_projections.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import itertools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    from loraswitch_jax.pallas import fused_projections as fp
    from loraswitch_jax.pallas import stacked_matmul as sm
except ImportError:  # package not installed on a bare device machine: the kernels from the tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pallas import fused_projections as fp  # type: ignore[no-redef]
    from pallas import stacked_matmul as sm  # type: ignore[no-redef]

BlockSizes = sm.BlockSizes
default_block_sizes, stacked_matmul = sm.default_block_sizes, sm.stacked_matmul
stacked_matmul_reference = sm.stacked_matmul_reference
default_gate_up_block_sizes = fp.default_gate_up_block_sizes
default_qkv_block_sizes = fp.default_qkv_block_sizes
gate_up_matmul, gate_up_matmul_reference = fp.gate_up_matmul, fp.gate_up_matmul_reference
qkv_matmul, qkv_matmul_reference = fp.qkv_matmul, fp.qkv_matmul_reference

F32 = jnp.float32
# Best stacked_matmul blocks of the previous sweep (eval/results/decode/sweep_stacked_matmul.txt).
PREVIOUS_BEST = {
    (4096, 4096): BlockSizes(block_n=128, block_k=128, split_k=4),
    (4096, 11008): BlockSizes(block_n=64, block_k=128, split_k=1),
    (11008, 4096): BlockSizes(block_n=64, block_k=128, split_k=2),
}


# ---------------------------------------------------------------------------------------------
# Timing


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


def bandwidths(small: bool) -> dict:
    """Copy (x * scale, read + write) and read-only (sum) bandwidth over 2 GiB of bf16, B/s."""
    n = (1 << 20) if small else (1 << 30)
    x = jax.random.normal(jax.random.key(7), (n,), jnp.bfloat16)
    factor = jnp.asarray(0.999, jnp.bfloat16)  # an argument: XLA cannot fold it away
    scale = jax.jit(lambda x, s: x * s, donate_argnums=0)
    total = jax.jit(lambda x: jnp.sum(x, dtype=F32))
    chain = 5  # each sample: 5 back-to-back passes, so host overhead stays out of the numbers

    def copy_passes(x):
        for _ in range(chain):
            x = scale(x, factor)
        return x

    for _ in range(3):
        x = jax.block_until_ready(copy_passes(x))
    ts = []
    for _ in range(20):
        t = time.perf_counter()
        x = jax.block_until_ready(copy_passes(x))
        ts.append((time.perf_counter() - t) / chain)
    copy = 2 * 2 * n / float(np.median(ts))
    read = 2 * n / timeit(total, x, reps=20, calls=chain)
    del x
    return {"copy_Bps": copy, "read_Bps": read, "bytes": 2 * n}


# ---------------------------------------------------------------------------------------------
# The projection groups


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
        ys = [stacked_matmul(x, w, layer, block_sizes=bs, interpret=interpret)
              for w, bs in zip(ws, bss)]
        return [silu_mul(*ys, x.dtype)] if self.name == "gate_up" else ys

    def fused(self, x, ws, layer, bs, interpret):
        if self.name == "qkv":
            return list(qkv_matmul(x, *ws, layer, block_sizes=bs, interpret=interpret))
        if self.name == "gate_up":
            return [gate_up_matmul(x, *ws, layer, block_sizes=bs, interpret=interpret)]
        return [stacked_matmul(x, ws[0], layer, block_sizes=bs, interpret=interpret)]

    def reference(self, x, ws, layer):
        if self.name == "qkv":
            return list(qkv_matmul_reference(x, *ws, layer))
        if self.name == "gate_up":
            return [gate_up_matmul_reference(x, *ws, layer)]
        return [stacked_matmul_reference(x, ws[0], layer)]

    def default(self, m):
        if self.name == "qkv":
            return default_qkv_block_sizes(m, self.k, self.ns[0], self.ns[1])
        if self.name == "gate_up":
            return default_gate_up_block_sizes(m, self.k, self.ns[0])
        return default_block_sizes(m, self.k, self.ns[0])


HARNESS = {"name": "loop"}  # set from --harness in main


def in_loop(op, num_layers, passes):
    """``passes * L`` calls of ``op(x, ws, layer)`` inside a fori_loop.

    Harness ``loop``: one call per iteration, layer = i % L (traced data; each call also pays the
    loop's per-iteration cost). Harness ``unrolled``: one iteration per pass with the L layers
    unrolled inside it (layer indices are constants, still passed to the kernels as data), as in
    the decode step, whose token loop holds all layers' launches back to back.
    """
    if HARNESS["name"] == "unrolled":

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


# ---------------------------------------------------------------------------------------------
# Sweeps


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


class Sweeper:
    def __init__(self, args, bw):
        self.args, self.bw = args, bw
        self.records: list[dict] = []
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count()))

    def record(self, group, m, variant, bs, secs, compile_s=None, **extra):
        if variant == "fused" and group.name in ("o", "down"):
            variant = "stacked_matmul"
        nbytes = 0 if variant.startswith("loop_only") else group.weight_bytes
        rec = {
            "group": group.name, "K": group.k, "N": list(group.ns), "M": m, "variant": variant,
            "block_sizes": dataclasses.asdict(bs) if bs is not None else None,
            "us": secs * 1e6, "TBps": nbytes / secs / 1e12,
            "frac_copy": nbytes / self.bw["copy_Bps"] / secs,
            "frac_read": nbytes / self.bw["read_Bps"] / secs,
            "compile_s": compile_s, **extra,
        }
        self.records.append(rec)
        name = variant + ("" if bs is None else " " + short(bs))
        print(f"  {group.name:7s} M={m:<2d} {name:44s} {rec['us']:8.1f} us  "
              f"{rec['TBps']:5.2f} TB/s  copy-frac {rec['frac_copy']:.3f}", flush=True)
        return rec

    def compile_many(self, fns: dict, x, ws):
        """Lower in this thread, compile in the pool: {key: (executable | exception, secs)}."""
        lowered = {}
        for key, fn in fns.items():
            try:
                lowered[key] = jax.jit(fn).lower(x, ws)
            except Exception as e:  # noqa: BLE001 - a block size the lowering rejects
                lowered[key] = e

        def build(low):
            if isinstance(low, Exception):
                return low, 0.0
            t = time.perf_counter()
            try:
                return low.compile(), time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - e.g. Triton out of shared memory
                return e, time.perf_counter() - t

        futures = {key: self.pool.submit(build, low) for key, low in lowered.items()}
        return {key: f.result() for key, f in futures.items()}

    def time_loop(self, group, m, variant, bss, x, ws, deadline, passes):
        """Compile and time ``variant`` for each block size in ``bss`` until ``deadline``."""
        calls = passes * self.args.layers
        interp = self.args.small
        # fused: one kernel per block size; separate: bss holds tuples, one per weight
        kernel = group.fused if variant == "fused" else group.separate

        def make(bs):
            return in_loop(lambda x, ws, layer: kernel(x, ws, layer, bs, interp),
                           self.args.layers, passes)

        built = self.compile_many({bs: make(bs) for bs in bss}, x, ws)
        out = []
        for bs, (exe, csecs) in built.items():
            if time.perf_counter() > deadline:
                print(f"  {group.name}: budget spent, {len(bss) - len(out)} configs left", flush=True)
                break
            if isinstance(exe, Exception):
                print(f"  {group.name} {variant} {bs} failed: {str(exe).splitlines()[0][:160]}")
                continue
            try:
                secs = timeit(exe, x, ws, reps=self.args.reps) / calls
            except Exception as e:  # noqa: BLE001
                print(f"  {group.name} {variant} {bs} failed at run: {str(e)[:160]}")
                continue
            label = bs if variant == "fused" else None
            out.append(self.record(group, m, variant, label, secs, csecs,
                                   separate_block_sizes=None if variant == "fused"
                                   else [dataclasses.asdict(b) for b in bs]))
        return out

    def xla(self, group, m, x, ws):
        passes = self.args.passes
        f = jax.jit(in_loop(group.xla, self.args.layers, passes))
        self.record(group, m, "xla dots in fori_loop", None,
                    timeit(f, x, ws, reps=self.args.reps) / (passes * self.args.layers))
        g = jax.jit(unrolled(group.xla, self.args.layers))
        self.record(group, m, "xla dots unrolled, no loop", None,
                    timeit(g, x, ws, reps=self.args.reps, calls=passes) / self.args.layers)
        g = jax.jit(unrolled(group.xla_model, self.args.layers))
        self.record(group, m, "xla einsum (model form) unrolled, no loop", None,
                    timeit(g, x, ws, reps=self.args.reps, calls=passes) / self.args.layers)

    def loop_only(self, group, m, x, ws):
        """The fori_loop and ``feed`` alone, with the outputs replaced by slices of ``x``."""
        def op(x, ws, layer):
            return [jnp.tile(x, (1, -(-n // x.shape[1])))[:, :n] for n in group.ns]

        f = jax.jit(in_loop(op, self.args.layers, self.args.passes))
        secs = timeit(f, x, ws, reps=self.args.reps) / (self.args.passes * self.args.layers)
        self.record(group, m, "loop_only (feed + loop overhead)", None, secs)

    def check(self, group, x, ws, bs):
        """Relative error of one call against the reference on a middle layer (bf16)."""
        layer = self.args.layers // 2 + 1
        got = jax.jit(lambda x, ws: group.fused(x, ws, layer, bs, self.args.small))(x, ws)
        ref = jax.jit(lambda x, ws: group.reference(x, ws, layer))(x, ws)
        errs = [float(jnp.max(jnp.abs(g.astype(F32) - r.astype(F32))) / jnp.max(jnp.abs(r.astype(F32))))
                for g, r in zip(got, ref)]
        return max(errs)


def top_configs(records, group: str, top: int) -> list[BlockSizes]:
    """The ``top`` fastest distinct kernel block sizes of ``group`` at M = 1 in ``records``."""
    recs = sorted((r for r in records if r["group"] == group and r["M"] == 1
                   and r["block_sizes"] is not None), key=lambda r: r["us"])
    return list(dict.fromkeys(BlockSizes(**r["block_sizes"]) for r in recs))[:top]


def short(bs: BlockSizes) -> str:
    return (f"n{bs.block_n} k{bs.block_k} s{bs.split_k} w{bs.num_warps} st{bs.num_stages}")


def best_of(recs):
    recs = [r for r in recs if r is not None]
    return min(recs, key=lambda r: r["us"]) if recs else None


def to_bs(rec) -> BlockSizes:
    return BlockSizes(**rec["block_sizes"])


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "eval/results/kernels"))
    p.add_argument("--budget", type=float, default=270.0, help="seconds for the whole sweep")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--passes", type=int, default=4, help="passes over the layers per sample")
    p.add_argument("--small", action="store_true", help="tiny shapes in interpret mode (CPU)")
    p.add_argument("--harness", choices=("loop", "unrolled"), default="loop",
                   help="one call per fori_loop iteration, or all layers unrolled per iteration")
    p.add_argument("--configs-from", default=None,
                   help="a previous run's JSON: time its --top fastest blocks per group (M=1) "
                        "instead of the grids")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    HARNESS["name"] = args.harness
    previous = None
    if args.configs_from:
        with open(args.configs_from) as fh:
            previous = json.load(fh)["records"]
    args.layers = 4 if args.small else 32
    if args.small:
        args.passes, args.reps = 1, 1
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    env = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "host": platform.node(),
           "layers": args.layers, "dtype": "bfloat16", "harness": args.harness,
           "configs_from": args.configs_from}
    bw = bandwidths(args.small)
    print(f"{env}\ncopy {bw['copy_Bps'] / 1e12:.3f} TB/s (read+write), "
          f"read-only {bw['read_Bps'] / 1e12:.3f} TB/s", flush=True)
    sw = Sweeper(args, bw)
    summary: dict[str, dict] = {}

    def save():
        with open(os.path.join(args.out, "sweep_projections.json"), "w") as fh:
            json.dump({"env": env, "bandwidth": bw, "summary": summary,
                       "records": sw.records}, fh, indent=1)

    # Budget shares, in order; what a phase leaves unspent passes to the next.
    shares = {"o": 0.16, "qkv": 0.25, "gate_up": 0.25, "down": 0.16, "m8": 0.18}
    spent_until = start + 30  # bandwidth and weights
    best_stacked: dict[tuple[int, int], BlockSizes] = dict(PREVIOUS_BEST)
    m8_plan = []
    for group in groups(args.small):
        spent_until += shares[group.name] * args.budget
        deadline = spent_until
        print(f"[{time.perf_counter() - start:6.1f}s] {group.name}: K={group.k} N={group.ns}",
              flush=True)
        ws = make_weights(group, args.layers, seed=len(sw.records))
        x = jax.random.normal(jax.random.key(1), (1, group.k), jnp.bfloat16)
        sw.xla(group, 1, x, ws)
        sw.loop_only(group, 1, x, ws)
        if group.name in ("qkv", "gate_up"):
            shape = (group.k, group.ns[0])
            seps = {"separate stacked_matmul, defaults": tuple(
                default_block_sizes(1, group.k, n) for n in group.ns)}
            seps["separate stacked_matmul, best"] = (
                best_stacked.get(shape, default_block_sizes(1, *shape)),) * len(group.ns)
            for label, bss in seps.items():
                for r in sw.time_loop(group, 1, "separate", [bss], x, ws, deadline, args.passes):
                    r["variant"] = label
        default = group.default(1)
        first = sw.time_loop(group, 1, "fused", [default], x, ws, deadline, args.passes)
        for r in first:
            r["variant"] += ", default"
        if previous is not None:
            grid = top_configs(previous, group.name, args.top)
        else:
            grid = coarse_grid(group, 16, 1 if args.small else 64)
            grid = grid[:3] if args.small else grid
        grid = [bs for bs in grid if bs != default]
        coarse = sw.time_loop(group, 1, "fused", grid, x, ws, deadline, args.passes)
        top = sorted(coarse + first, key=lambda r: r["us"])[:3]
        fine = []
        for r in top:
            b = to_bs(r)
            fine += [dataclasses.replace(b, num_warps=w, num_stages=s)
                     for w, s in itertools.product((4, 8), (2, 3, 4))
                     if (w, s) != (b.num_warps, b.num_stages)]
        fine = [b for b in dict.fromkeys(fine) if smem_ok(group, b, 16)]
        fine = fine[:2] if args.small else fine
        fine = [] if previous is not None else fine
        fine_recs = sw.time_loop(group, 1, "fused", fine, x, ws, deadline, args.passes)
        best = best_of(coarse + first + fine_recs)
        if best is not None:
            bbs = to_bs(best)
            # Time the winner and the default again, side by side, to see the spread.
            again = sw.time_loop(group, 1, "fused", [bbs], x, ws, deadline + 15, args.passes)
            for r in again:
                r["variant"] += " (best, again)"
            err = sw.check(group, x, ws, bbs)
            xla_best = min(r["us"] for r in sw.records
                           if r["group"] == group.name and r["M"] == 1 and "xla" in r["variant"])
            summary[group.name] = {"best": dataclasses.asdict(bbs), "us": best["us"],
                                   "frac_copy": best["frac_copy"], "rel_err_bf16": err,
                                   "xla_best_us": xla_best,
                                   "default_us": first[0]["us"] if first else None}
            if group.name in ("o", "down"):
                best_stacked[(group.k, group.ns[0])] = bbs
            m8_plan.append((group, bbs, default))
            print(f"  -> best {short(bbs)}: {best['us']:.1f} us, copy-frac "
                  f"{best['frac_copy']:.3f}, rel err {err:.2e}", flush=True)
        save()
        del ws

    # A whole layer's projections (attention and norms replaced by `feed`): 7 weights per layer.
    layer_phase(sw, args, summary, best_stacked, spent_until + shares["m8"] * args.budget / 2)
    save()

    # M = 8, briefly: XLA unrolled, the best and default blocks.
    spent_until += shares["m8"] * args.budget
    for group, bbs, default in m8_plan:
        if time.perf_counter() > spent_until:
            break
        ws = make_weights(group, args.layers, seed=99)
        x = jax.random.normal(jax.random.key(2), (8, group.k), jnp.bfloat16)
        g = jax.jit(unrolled(group.xla, args.layers))
        sw.record(group, 8, "xla dots unrolled, no loop", None,
                  timeit(g, x, ws, reps=args.reps, calls=args.passes) / args.layers)
        sw.time_loop(group, 8, "fused", list(dict.fromkeys([bbs, default])), x, ws,
                     spent_until, args.passes)
        del ws
    save()
    write_table(args.out, env, bw, sw.records, summary)
    print(f"[{time.perf_counter() - start:6.1f}s] done", flush=True)


def layer_phase(sw, args, summary, best_stacked, deadline):
    """Per layer: qkv, o, gate_up, down, as XLA dots, separate stacked_matmul calls, or fused."""
    gs = {g.name: g for g in groups(args.small)}
    d, f = gs["o"].k, gs["gate_up"].ns[0]
    group = Group("layer", d, (d, d, d, d, f, f, f))  # weight bytes of one layer
    if "qkv" not in summary or "gate_up" not in summary:
        return
    ws = (*make_weights(gs["qkv"], args.layers, 11), *make_weights(gs["o"], args.layers, 12),
          *make_weights(gs["gate_up"], args.layers, 13), *make_weights(gs["down"], args.layers, 14))
    x = jax.random.normal(jax.random.key(3), (1, d), jnp.bfloat16)
    interp = args.small

    def plan(qkv_bs, o_bs, gu_bs, down_bs, fused):
        def op(x, ws, layer):
            wq, wk, wv, wo, wg, wu, wd = ws
            if fused:
                qkv = qkv_matmul(x, wq, wk, wv, layer, block_sizes=qkv_bs, interpret=interp)
            else:
                qkv = [stacked_matmul(x, w, layer, block_sizes=qkv_bs, interpret=interp)
                       for w in (wq, wk, wv)]
            h = feed(x, qkv)  # stands in for RoPE + attention
            h = feed(h, [stacked_matmul(h, wo, layer, block_sizes=o_bs, interpret=interp)])
            if fused:
                act = gate_up_matmul(h, wg, wu, layer, block_sizes=gu_bs, interpret=interp)
            else:
                act = silu_mul(*(stacked_matmul(h, w, layer, block_sizes=gu_bs, interpret=interp)
                                 for w in (wg, wu)), h.dtype)
            return [stacked_matmul(act, wd, layer, block_sizes=down_bs, interpret=interp)]

        return op

    def xla_layer(dot):
        def op(x, ws, layer):
            wq, wk, wv, wo, wg, wu, wd = (w[layer] for w in ws)
            h = feed(x, [dot(x, wq), dot(x, wk), dot(x, wv)])
            h = feed(h, [dot(h, wo)])
            return [dot(silu_mul(dot(h, wg), dot(h, wu), h.dtype), wd)]

        return op

    def f32_dot(a, w):
        return jnp.dot(a, w, preferred_element_type=F32).astype(a.dtype)

    def model_dot(a, w):
        return jnp.einsum("mk,kn->mn", a, w)

    xla_op, xla_model_op = xla_layer(f32_dot), xla_layer(model_dot)

    g = jax.jit(unrolled(xla_op, args.layers))
    rec = sw.record(group, 1, "xla dots unrolled, no loop", None,
                    timeit(g, x, ws, reps=args.reps, calls=args.passes) / args.layers)
    results = {"xla_unrolled_us": rec["us"]}
    g = jax.jit(unrolled(xla_model_op, args.layers))
    rec = sw.record(group, 1, "xla einsum (model form) unrolled, no loop", None,
                    timeit(g, x, ws, reps=args.reps, calls=args.passes) / args.layers)
    results["xla_model_unrolled_us"] = rec["us"]
    sq, sf, sd = (d, d), (d, f), (f, d)
    best = {sh: best_stacked.get(sh) or default_block_sizes(1, *sh) for sh in (sq, sf, sd)}
    plans = {
        "separate stacked_matmul, defaults": plan(
            default_block_sizes(1, *sq), default_block_sizes(1, *sq),
            default_block_sizes(1, *sf), default_block_sizes(1, *sd), False),
        "separate stacked_matmul, best": plan(
            best[sq], best[sq], best[sf], best[sd], False),
        "fused qkv + gate_up, best": plan(
            BlockSizes(**summary["qkv"]["best"]), best[sq],
            BlockSizes(**summary["gate_up"]["best"]), best[sd], True),
    }
    built = sw.compile_many({k: in_loop(op, args.layers, args.passes) for k, op in plans.items()},
                            x, ws)
    for label, (exe, csecs) in built.items():
        if isinstance(exe, Exception) or time.perf_counter() > deadline:
            why = str(exe)[:120] if isinstance(exe, Exception) else "budget spent"
            print(f"  layer {label}: skipped ({why})")
            continue
        secs = timeit(exe, x, ws, reps=args.reps) / (args.passes * args.layers)
        rec = sw.record(group, 1, label, None, secs, csecs)
        results[label] = rec["us"]
    results["floor_us_at_copy_bw"] = group.weight_bytes / sw.bw["copy_Bps"] * 1e6
    summary["layer"] = results
    del ws


def write_table(out, env, bw, records, summary):
    intro = (f"copy bandwidth {bw['copy_Bps'] / 1e12:.3f} TB/s (read+write), read-only "
             f"{bw['read_Bps'] / 1e12:.3f} TB/s; harness `{env['harness']}`: times per call "
             f"inside a fori_loop over {env['layers']} stacked layers (layer index as data) "
             "unless marked 'no loop'.")
    lines = [f"# Projection kernels, {env['device']}, JAX {env['jax']}, {env['date']}", "",
             intro, "",
             "| group | M | variant | blocks (n k split warps stages) | us | TB/s | frac copy |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for r in sorted(records, key=lambda r: (r["group"], r["M"], r["us"])):
        key = (r["group"], r["M"], r["variant"])
        if r["variant"] in ("fused", "stacked_matmul") and key in seen:
            continue  # the grid: only its best row here (the JSON has all)
        seen.add(key)
        bs = short(BlockSizes(**r["block_sizes"])) if r["block_sizes"] else ""
        lines.append(f"| {r['group']} | {r['M']} | {r['variant']} | {bs} | {r['us']:.1f} | "
                     f"{r['TBps']:.2f} | {r['frac_copy']:.3f} |")
    lines += ["", "Best per group (M=1): " + json.dumps(summary)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "sweep_projections.md"), "w") as fh:
        fh.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
