"""GPU sweep: block sizes of the fused decode projections and ``stacked_matmul`` against XLA.

Times, per call, every variant of the four projection groups of :mod:`.kernel_groups`:

* ``qkv``: XLA dots, three ``stacked_matmul`` calls, ``qkv_matmul`` over a grid of block sizes;
* ``gate_up``: XLA dots + SiLU, two ``stacked_matmul`` calls + SiLU, ``gate_up_matmul`` (grid);
* ``o`` (4096 x 4096) and ``down`` (11008 x 4096): XLA dot and ``stacked_matmul`` (grid);
* a whole layer's seven projections, separate launches against the fused ones.

XLA is timed in the same loop (it copies ``w[layer]`` out of the stack first) and with the layers
unrolled in one jit and no loop (its best case), as ``jnp.dot(..., preferred_element_type=
float32)`` and in the model's form (a bf16 einsum); the loop and ``feed`` alone too
(``loop_only``). Each time is also the fraction ``weight bytes / bandwidth / time`` of the copy
and read-only bandwidths (harness). Block-size grids run in two stages (block shapes at
``num_warps=4, num_stages=3``, then warps x stages for the three fastest), compiled in parallel
threads and timed one by one, each stage under a share of ``--budget``.

Harnesses: ``--harness loop`` (one call per fori_loop iteration, layer = i % L: each call also
pays the loop's per-iteration cost, ~11 us on an H100) and ``--harness unrolled`` (each iteration
runs all L layers back to back, as the decode step does). ``--configs-from RUN.json`` re-times
the ``--top`` fastest blocks of an earlier run instead of the grids. Usage (GPU)::

    python -m loraswitch_jax.eval.bench.kernel_sweep --out DIR          # ~2 minutes on an H100
    python -m loraswitch_jax.eval.bench.kernel_sweep --harness unrolled \\
        --configs-from DIR/sweep_loop.json --top 8 --out DIR             # ~3 minutes

``--small`` runs tiny shapes in interpret mode (a CPU smoke test). Writes
``DIR/sweep_<harness>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from loraswitch_jax.eval.bench.harness import environment, measure_bandwidth
from loraswitch_jax.eval.bench.kernel_groups import (
    F32,
    HARNESSES,
    BlockSizes,
    Group,
    coarse_grid,
    feed,
    groups,
    in_loop,
    make_weights,
    short,
    silu_mul,
    smem_ok,
    timeit,
    unrolled,
)
from loraswitch_jax.pallas.fused_projections import gate_up_matmul, qkv_matmul
from loraswitch_jax.pallas.stacked_matmul import default_block_sizes, stacked_matmul

__all__ = ["SweepConfig", "main", "parse_args"]

# Best stacked_matmul blocks of the first sweep (eval/results/archive/kernels/
# stacked_matmul_blocks.txt): the starting point of the separate-launch rows.
PREVIOUS_BEST = {
    (4096, 4096): BlockSizes(block_n=128, block_k=128, split_k=4),
    (4096, 11008): BlockSizes(block_n=64, block_k=128, split_k=1),
    (11008, 4096): BlockSizes(block_n=64, block_k=128, split_k=2),
}


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to sweep; ``small``: tiny shapes in interpret mode, 4 layers, one pass, one rep."""

    out: str = "eval/results/kernels"
    budget: float = 270.0
    reps: int = 5
    passes: int = 4
    small: bool = False
    harness: str = "loop"
    configs_from: str | None = None
    top: int = 6

    def __post_init__(self):
        if self.harness not in HARNESSES:
            raise ValueError(f"SweepConfig.harness must be one of {HARNESSES}, got "
                             f"{self.harness!r}")
        if self.budget <= 0 or self.reps < 1 or self.passes < 1 or self.top < 1:
            raise ValueError(f"SweepConfig: budget, reps, passes and top must be positive: {self}")

    @property
    def layers(self) -> int:
        return 4 if self.small else 32

    @property
    def stem(self) -> str:
        return os.path.join(self.out, f"sweep_{self.harness}")


class Sweeper:
    """Compiles in a thread pool, times one by one, and keeps every timing as a record."""

    def __init__(self, cfg: SweepConfig, bw: dict):
        self.cfg, self.bw = cfg, bw
        self.passes, self.reps = (1, 1) if cfg.small else (cfg.passes, cfg.reps)
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
        calls = passes * self.cfg.layers
        interp = self.cfg.small
        # fused: one kernel per block size; separate: bss holds tuples, one per weight
        kernel = group.fused if variant == "fused" else group.separate

        def make(bs):
            return in_loop(lambda x, ws, layer: kernel(x, ws, layer, bs, interp),
                           self.cfg.layers, passes, self.cfg.harness)

        built = self.compile_many({bs: make(bs) for bs in bss}, x, ws)
        out = []
        for bs, (exe, csecs) in built.items():
            if time.perf_counter() > deadline:
                print(f"  {group.name}: budget spent, {len(bss) - len(out)} configs left",
                      flush=True)
                break
            if isinstance(exe, Exception):
                print(f"  {group.name} {variant} {bs} failed: {str(exe).splitlines()[0][:160]}")
                continue
            try:
                secs = timeit(exe, x, ws, reps=self.reps) / calls
            except Exception as e:  # noqa: BLE001
                print(f"  {group.name} {variant} {bs} failed at run: {str(e)[:160]}")
                continue
            label = bs if variant == "fused" else None
            out.append(self.record(group, m, variant, label, secs, csecs,
                                   separate_block_sizes=None if variant == "fused"
                                   else [dataclasses.asdict(b) for b in bs]))
        return out

    def xla(self, group, m, x, ws):
        passes = self.passes
        f = jax.jit(in_loop(group.xla, self.cfg.layers, passes, self.cfg.harness))
        self.record(group, m, "xla dots in fori_loop", None,
                    timeit(f, x, ws, reps=self.reps) / (passes * self.cfg.layers))
        g = jax.jit(unrolled(group.xla, self.cfg.layers))
        self.record(group, m, "xla dots unrolled, no loop", None,
                    timeit(g, x, ws, reps=self.reps, calls=passes) / self.cfg.layers)
        g = jax.jit(unrolled(group.xla_model, self.cfg.layers))
        self.record(group, m, "xla einsum (model form) unrolled, no loop", None,
                    timeit(g, x, ws, reps=self.reps, calls=passes) / self.cfg.layers)

    def loop_only(self, group, m, x, ws):
        """The fori_loop and ``feed`` alone, with the outputs replaced by slices of ``x``."""
        def op(x, ws, layer):
            return [jnp.tile(x, (1, -(-n // x.shape[1])))[:, :n] for n in group.ns]

        f = jax.jit(in_loop(op, self.cfg.layers, self.passes, self.cfg.harness))
        secs = timeit(f, x, ws, reps=self.reps) / (self.passes * self.cfg.layers)
        self.record(group, m, "loop_only (feed + loop overhead)", None, secs)

    def check(self, group, x, ws, bs):
        """Relative error of one call against the reference on a middle layer (bf16)."""
        layer = self.cfg.layers // 2 + 1
        got = jax.jit(lambda x, ws: group.fused(x, ws, layer, bs, self.cfg.small))(x, ws)
        ref = jax.jit(lambda x, ws: group.reference(x, ws, layer))(x, ws)
        errs = [float(jnp.max(jnp.abs(g.astype(F32) - r.astype(F32)))
                      / jnp.max(jnp.abs(r.astype(F32))))
                for g, r in zip(got, ref)]
        return max(errs)


def top_configs(records, group: str, top: int) -> list[BlockSizes]:
    """The ``top`` fastest distinct kernel block sizes of ``group`` at M = 1 in ``records``."""
    recs = sorted((r for r in records if r["group"] == group and r["M"] == 1
                   and r["block_sizes"] is not None), key=lambda r: r["us"])
    return list(dict.fromkeys(BlockSizes(**r["block_sizes"]) for r in recs))[:top]


def top_configs(records, group: str, top: int) -> list[BlockSizes]:
    """The ``top`` fastest distinct kernel block sizes of ``group`` at M = 1 in ``records``."""
    recs = sorted((r for r in records if r["group"] == group and r["M"] == 1
                   and r["block_sizes"] is not None), key=lambda r: r["us"])
    return list(dict.fromkeys(BlockSizes(**r["block_sizes"]) for r in recs))[:top]


def write_table(stem, env, bw, records, summary):
    intro = (f"copy bandwidth {bw['copy_Bps'] / 1e12:.3f} TB/s (read+write), read-only "
             f"{bw['read_Bps'] / 1e12:.3f} TB/s; harness `{env['harness']}`: times per call "
             f"inside a fori_loop over {env['layers']} stacked layers (layer index as data) "
             "unless marked 'no loop'.")
    title = f"# Projection kernels, {env['device_kind']}, JAX {env['jax']}, {env['date'][:10]}"
    lines = [title, "",
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
    with open(stem + ".md", "w") as fh:
        fh.write(text)
    print(text, flush=True)


def best_of(recs):
    recs = [r for r in recs if r is not None]
    return min(recs, key=lambda r: r["us"]) if recs else None


def to_bs(rec) -> BlockSizes:
    return BlockSizes(**rec["block_sizes"])


def main(cfg: SweepConfig) -> dict:
    """Run the sweep within ``cfg.budget`` seconds (roughly); write and print the table."""
    previous = None
    if cfg.configs_from:
        with open(cfg.configs_from) as fh:
            previous = json.load(fh)["records"]
    start = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    env = {**environment(), "layers": cfg.layers, "dtype": "bfloat16", "harness": cfg.harness,
           "configs_from": cfg.configs_from}
    measured = measure_bandwidth(1 / 512 if cfg.small else 2.0, 20, jax.random.key(7))
    bw = {"copy_Bps": 1e9 * measured["copy_gbps"], "read_Bps": 1e9 * measured["read_gbps"],
          "bytes": measured["array_bytes"]}
    print(f"{env}\ncopy {bw['copy_Bps'] / 1e12:.3f} TB/s (read+write), "
          f"read-only {bw['read_Bps'] / 1e12:.3f} TB/s", flush=True)
    sw = Sweeper(cfg, bw)
    summary: dict[str, dict] = {}

    def save():
        with open(cfg.stem + ".json", "w") as fh:
            json.dump({"env": env, "bandwidth": bw, "summary": summary,
                       "records": sw.records}, fh, indent=1)

    # Budget shares, in order; what a phase leaves unspent passes to the next.
    shares = {"o": 0.16, "qkv": 0.25, "gate_up": 0.25, "down": 0.16, "m8": 0.18}
    spent_until = start + 30  # bandwidth and weights
    best_stacked: dict[tuple[int, int], BlockSizes] = dict(PREVIOUS_BEST)
    m8_plan = []
    for group in groups(cfg.small):
        spent_until += shares[group.name] * cfg.budget
        deadline = spent_until
        print(f"[{time.perf_counter() - start:6.1f}s] {group.name}: K={group.k} N={group.ns}",
              flush=True)
        ws = make_weights(group, cfg.layers, seed=len(sw.records))
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
                for r in sw.time_loop(group, 1, "separate", [bss], x, ws, deadline, sw.passes):
                    r["variant"] = label
        default = group.default(1)
        first = sw.time_loop(group, 1, "fused", [default], x, ws, deadline, sw.passes)
        for r in first:
            r["variant"] += ", default"
        if previous is not None:
            grid = top_configs(previous, group.name, cfg.top)
        else:
            grid = coarse_grid(group, 16, 1 if cfg.small else 64)
            grid = grid[:3] if cfg.small else grid
        grid = [bs for bs in grid if bs != default]
        coarse = sw.time_loop(group, 1, "fused", grid, x, ws, deadline, sw.passes)
        top = sorted(coarse + first, key=lambda r: r["us"])[:3]
        fine = []
        for r in top:
            b = to_bs(r)
            fine += [dataclasses.replace(b, num_warps=w, num_stages=s)
                     for w, s in itertools.product((4, 8), (2, 3, 4))
                     if (w, s) != (b.num_warps, b.num_stages)]
        fine = [b for b in dict.fromkeys(fine) if smem_ok(group, b, 16)]
        fine = fine[:2] if cfg.small else fine
        fine = [] if previous is not None else fine
        fine_recs = sw.time_loop(group, 1, "fused", fine, x, ws, deadline, sw.passes)
        best = best_of(coarse + first + fine_recs)
        if best is not None:
            bbs = to_bs(best)
            # Time the winner and the default again, side by side, to see the spread.
            again = sw.time_loop(group, 1, "fused", [bbs], x, ws, deadline + 15, sw.passes)
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
    layer_phase(sw, cfg, summary, best_stacked, spent_until + shares["m8"] * cfg.budget / 2)
    save()

    # M = 8, briefly: XLA unrolled, the best and default blocks.
    spent_until += shares["m8"] * cfg.budget
    for group, bbs, default in m8_plan:
        if time.perf_counter() > spent_until:
            break
        ws = make_weights(group, cfg.layers, seed=99)
        x = jax.random.normal(jax.random.key(2), (8, group.k), jnp.bfloat16)
        g = jax.jit(unrolled(group.xla, cfg.layers))
        sw.record(group, 8, "xla dots unrolled, no loop", None,
                  timeit(g, x, ws, reps=sw.reps, calls=sw.passes) / cfg.layers)
        sw.time_loop(group, 8, "fused", list(dict.fromkeys([bbs, default])), x, ws,
                     spent_until, sw.passes)
        del ws
    save()
    write_table(cfg.stem, env, bw, sw.records, summary)
    print(f"[{time.perf_counter() - start:6.1f}s] done", flush=True)
    return {"env": env, "bandwidth": bw, "summary": summary, "records": sw.records}


def layer_phase(sw: Sweeper, cfg: SweepConfig, summary, best_stacked, deadline):
    """Per layer: qkv, o, gate_up, down, as XLA dots, separate stacked_matmul calls, or fused."""
    gs = {g.name: g for g in groups(cfg.small)}
    d, f = gs["o"].k, gs["gate_up"].ns[0]
    group = Group("layer", d, (d, d, d, d, f, f, f))  # weight bytes of one layer
    if "qkv" not in summary or "gate_up" not in summary:
        return
    ws = (*make_weights(gs["qkv"], cfg.layers, 11), *make_weights(gs["o"], cfg.layers, 12),
          *make_weights(gs["gate_up"], cfg.layers, 13), *make_weights(gs["down"], cfg.layers, 14))
    x = jax.random.normal(jax.random.key(3), (1, d), jnp.bfloat16)
    interp = cfg.small

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

    g = jax.jit(unrolled(xla_op, cfg.layers))
    rec = sw.record(group, 1, "xla dots unrolled, no loop", None,
                    timeit(g, x, ws, reps=sw.reps, calls=sw.passes) / cfg.layers)
    results = {"xla_unrolled_us": rec["us"]}
    g = jax.jit(unrolled(xla_model_op, cfg.layers))
    rec = sw.record(group, 1, "xla einsum (model form) unrolled, no loop", None,
                    timeit(g, x, ws, reps=sw.reps, calls=sw.passes) / cfg.layers)
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
    built = sw.compile_many({k: in_loop(op, cfg.layers, sw.passes, cfg.harness)
                             for k, op in plans.items()},
                            x, ws)
    for label, (exe, csecs) in built.items():
        if isinstance(exe, Exception) or time.perf_counter() > deadline:
            why = str(exe)[:120] if isinstance(exe, Exception) else "budget spent"
            print(f"  layer {label}: skipped ({why})")
            continue
        secs = timeit(exe, x, ws, reps=sw.reps) / (sw.passes * cfg.layers)
        rec = sw.record(group, 1, label, None, secs, csecs)
        results[label] = rec["us"]
    results["floor_us_at_copy_bw"] = group.weight_bytes / sw.bw["copy_Bps"] * 1e6
    summary["layer"] = results
    del ws


def parse_args(argv: list[str] | None = None) -> SweepConfig:
    d = SweepConfig()
    p = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.bench.kernel_sweep",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default=d.out)
    p.add_argument("--budget", type=float, default=d.budget, help="seconds for the whole sweep")
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--passes", type=int, default=d.passes, help="passes over the layers per sample")
    p.add_argument("--small", action="store_true", help="tiny shapes in interpret mode (CPU)")
    p.add_argument("--harness", choices=HARNESSES, default=d.harness,
                   help="one call per fori_loop iteration, or all layers unrolled per iteration")
    p.add_argument("--configs-from", default=None,
                   help="a previous run's JSON: time its --top fastest blocks per group (M=1) "
                        "instead of the grids")
    p.add_argument("--top", type=int, default=d.top)
    a = p.parse_args(argv)
    return SweepConfig(out=a.out, budget=a.budget, reps=a.reps, passes=a.passes, small=a.small,
                       harness=a.harness, configs_from=a.configs_from, top=a.top)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
