"""GPU check of the Mosaic GPU decode matmul (``pallas/mosaic_matmul``) against Triton and XLA.

A blind first run on a new backend, so nothing here may crash the run: every step records its
error text (truncated) and the report is rewritten after each step.

1. API probes: trivial ``plgpu`` kernels (a TMA copy gmem -> smem -> gmem with a barrier, an
   ``emit_pipeline`` sum of two arrays, tiny wgmma matmuls of both forms), each ok or its error.
2. Copy and read-only bandwidth (harness.best_bandwidth).
3. Llama-2-7B decode shapes ``[K, N]`` (q/k/v/o 4096x4096, gate/up 4096x11008, down
   11008x4096) at ``M`` = 1, 8, 32, 64: XLA's dot, the Triton ``stacked_matmul`` (tuned blocks)
   and ``mosaic_matmul`` over a small grid of blocks (all of them at M = 1, the two fastest
   and the default at larger M), each checked against the reference (bf16 rel err < 1e-2) on
   the last layer, then timed in one jit over ``L`` layers unrolled (outputs fed to the next
   layer, as in a decode step; L * K * N * 2 bytes exceed the L2 cache) and given as the
   fraction of copy bandwidth ``K * N * 2 / time / copy GB/s``.

Usage (GPU, ~2-3 minutes)::

    python -m loraswitch_jax.eval.bench.mosaic_check --out DIR

``--small`` runs tiny shapes in interpret mode (a CPU smoke test). Writes ``DIR/mosaic_check.json``
and ``.md`` and prints the compact table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from loraswitch_jax.eval.bench.harness import (
    best_bandwidth, environment, log, median_ms, reserve_device_memory, time_calls, write_report)
from loraswitch_jax.eval.bench.kernel_groups import feed
from loraswitch_jax.pallas.mosaic_matmul import (
    MosaicBlocks, interpret_params, mosaic_matmul, stacked_matmul_reference, supports)
from loraswitch_jax.pallas.stacked_matmul import stacked_matmul

__all__ = ["CheckConfig", "main", "parse_args"]

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)}
SMALL_SHAPES = {"q/k/v/o": (128, 128), "gate/up": (128, 192), "down": (256, 128)}
ROWS = (1, 8, 32, 64)
# (form, block_n, block_k, split_k, num_stages); a row that does not tile a shape is skipped.
GRID = (
    ("swap", 64, 128, 4, 4), ("swap", 128, 128, 4, 4), ("swap", 128, 128, 2, 4),
    ("swap", 64, 64, 4, 4), ("swap", 128, 64, 4, 6), ("swap", 128, 256, 1, 3),
    ("swap", 256, 128, 1, 3), ("pad", 64, 128, 4, 4), ("pad", 128, 128, 2, 3),
    ("pad", 64, 64, 4, 4),
)
SMALL_GRID = (("swap", 64, 64, 2, 2), ("pad", 64, 64, 2, 2))
TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """``layers``: stacked layers timed per jit (their weights must exceed L2); ``budget``:
    seconds of block search (after the probes and the bandwidth) after which only the default
    blocks run; past ``budget + 90`` s the remaining shapes are skipped (the whole run stays
    under ~4 minutes on an H100/H200)."""

    out: str = "eval/results/kernels"
    layers: int = 8
    reps: int = 20
    budget: float = 110.0
    small: bool = False

    def __post_init__(self):
        if self.layers < 1:
            raise ValueError(f"CheckConfig.layers must be >= 1, got {self.layers}")
        if self.reps < 1:
            raise ValueError(f"CheckConfig.reps must be >= 1, got {self.reps}")
        if self.budget < 0:
            raise ValueError(f"CheckConfig.budget must be >= 0, got {self.budget}")


def error_text(e: BaseException, limit: int = 600) -> str:
    """The exception's type, first line and last lines (a wrapped traceback's cause comes
    last), on one line, truncated."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " | ".join(lines if len(lines) <= 3 else [lines[0], "...", *lines[-2:]])
    return f"{type(e).__name__}: {text}"[:limit]


def reset_interpreter(interpret: bool) -> None:
    """After a failed interpreted kernel the GPU interpreter's state must be reset (CPU runs)."""
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
            reset_gpu_interpret_mode_state)
        reset_gpu_interpret_mode_state()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ------------------------------------------------------------------------------------- probes
def _tma_copy(x, interpret):
    def body(x_gmem, o_gmem):
        def scoped(smem, barrier):
            plgpu.copy_gmem_to_smem(x_gmem, smem, barrier)
            plgpu.barrier_wait(barrier)
            plgpu.copy_smem_to_gmem(smem, o_gmem)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier(num_arrivals=1))

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                        interpret=interpret)(x)


def _pipeline_sum(a, b, interpret):
    block = (64, 128)
    grid = (a.shape[0] // block[0], a.shape[1] // block[1])

    def body(a_gmem, b_gmem, o_gmem):
        def step(_, a_smem, b_smem, o_smem):
            o_smem[...] = a_smem[...] + b_smem[...]

        spec = plgpu.BlockSpec(block, lambda i, j: (i, j))
        plgpu.emit_pipeline(step, grid=grid, in_specs=[spec, spec], out_specs=[spec],
                            max_concurrent_steps=2)(a_gmem, b_gmem, o_gmem)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(a.shape, a.dtype),
                        interpret=interpret)(a, b)


def probes(interpret) -> list[dict]:
    """Each trivial kernel: ok (its result checked) or its error text."""
    key = jax.random.key(7)
    x = jax.random.normal(key, (128, 256), jnp.float32).astype(jnp.bfloat16)
    y = jax.random.normal(jax.random.fold_in(key, 1), (128, 256), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 2), (2, 256, 128), jnp.float32)
    w = w.astype(jnp.bfloat16)
    cases = {
        "tma_copy (copy_gmem_to_smem + barrier, copy_smem_to_gmem)":
            (lambda: _tma_copy(x, interpret), x),
        "emit_pipeline sum of two f32 arrays (64x128 blocks, 2 stages)":
            (lambda: _pipeline_sum(y, 2 * y, interpret), 3 * y),
    }
    for form in ("swap", "pad"):
        bs = MosaicBlocks(block_n=64, block_k=64, split_k=2, num_stages=2, form=form)
        cases[f"wgmma {form} form, M 8, K 256, N 128"] = (
            functools.partial(mosaic_matmul, x[:8], w, 1, block_sizes=bs,
                              interpret=interpret is not None),
            stacked_matmul_reference(x[:8], w, 1))
    results = []
    for name, (fn, want) in cases.items():
        try:
            err = rel_err(jax.block_until_ready(fn()), want)
            row = {"probe": name, "ok": err < TOL, "rel_err": err, "error": None}
        except Exception as e:  # noqa: BLE001 - a probe's failure is its result
            row = {"probe": name, "ok": False, "rel_err": None, "error": error_text(e)}
            reset_interpreter(interpret is not None)
        log(f"probe {name}: {'ok' if row['ok'] else row['error'] or row['rel_err']}")
        results.append(row)
    return results


# ------------------------------------------------------------------------------------ timings
def grid_blocks(small: bool) -> list[MosaicBlocks]:
    return [MosaicBlocks(form=f, block_n=n, block_k=k, split_k=s, num_stages=st)
            for f, n, k, s, st in (SMALL_GRID if small else GRID)]


def default_blocks(m: int, k: int, n: int, small: bool) -> MosaicBlocks | None:
    """The first grid entry that tiles the shape: the "default" timed at every M."""
    return next((bs for bs in grid_blocks(small) if supports(m, k, n, bs) is None), None)


def measure(name, mm, x, w, reps, layers, bytes_per_call, bw, interpret) -> dict:
    """Check ``mm(x, w, layer)`` on the last layer, then time ``layers`` chained calls."""
    row = {"impl": name, "ok": False, "rel_err": None, "us": None, "frac_copy": None,
           "frac_read": None, "error": None}
    try:
        row["rel_err"] = rel_err(mm(x, w, layers - 1), stacked_matmul_reference(x, w, layers - 1))
        if not row["rel_err"] < TOL:
            row["error"] = f"rel err {row['rel_err']:.3g} >= {TOL}"
            return row

        @jax.jit
        def run(x, w):
            for layer in range(layers):
                x = feed(x, (mm(x, w, layer),))
            return x

        per_call = median_ms(time_calls(lambda: run(x, w), reps, warmup=2)) * 1e3 / layers
        row.update(ok=True, us=per_call,
                   frac_copy=bytes_per_call / (per_call * 1e-6) / (bw["copy_gbps"] * 1e9),
                   frac_read=bytes_per_call / (per_call * 1e-6) / (bw["read_gbps"] * 1e9))
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        row["error"] = error_text(e)
        reset_interpreter(interpret)
    return row


def shape_rows(proj, k, n, cc: CheckConfig, bw, t_start, rows: list, save) -> None:
    """Appends every run of one shape to ``rows``, calling ``save`` after each M."""
    interpret = cc.small
    key = jax.random.key(k * 7 + n)
    w = jax.jit(lambda key: (jax.random.normal(key, (cc.layers, k, n), jnp.float32)
                             / np.sqrt(k)).astype(jnp.bfloat16))(key)
    best, first = [], len(rows)
    for m in ROWS:
        if time.perf_counter() - t_start > cc.budget + 90:
            rows.append({"proj": proj, "k": k, "n": n, "m": m, "impl": "-", "config": "-",
                         "ok": False, "skipped": "past the time limit (budget + 90 s)"})
            continue
        x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(jnp.bfloat16)
        common = dict(proj=proj, k=k, n=n, m=m)
        nbytes = k * n * 2 + m * (k + n) * 2
        impls = [("xla", lambda x, w, l: jnp.dot(x, w[l], preferred_element_type=jnp.float32
                                                 ).astype(x.dtype), "-"),
                 ("triton", functools.partial(stacked_matmul, interpret=interpret), "tuned")]
        over_budget = time.perf_counter() - t_start > cc.budget
        blocks = grid_blocks(cc.small) if m == ROWS[0] and not over_budget else []
        if m != ROWS[0] and not over_budget:
            blocks = best[:2]
        default = default_blocks(m, k, n, cc.small)
        if default is not None and default not in blocks:
            blocks = blocks + [default]
        for bs in blocks:
            if (why := supports(m, k, n, bs)) is not None:
                rows.append({**common, "impl": "mosaic", "config": bs.name, "ok": False,
                             "skipped": why})
                continue
            impls.append(("mosaic", functools.partial(mosaic_matmul, block_sizes=bs,
                                                      interpret=interpret), bs.name))
        for name, mm, config in impls:
            row = {**common, "config": config,
                   **measure(name, mm, x, w, cc.reps, cc.layers, nbytes, bw, interpret)}
            rows.append(row)
            state = f"{row['us']:.1f} us, {row['frac_copy']:.2f} of copy bw" if row["ok"] \
                else row["error"]
            log(f"{proj} M={m} {name} {config}: {state}")
        save()
        if m == ROWS[0]:  # the blocks carried to larger M: the fastest at M = 1
            timed = sorted((r for r in rows[first:] if r["impl"] == "mosaic" and r.get("us")),
                           key=lambda r: r["us"])
            names = [r["config"] for r in timed]
            best = [bs for bs in grid_blocks(cc.small) if bs.name in names]
            best.sort(key=lambda bs: names.index(bs.name))
    del w


# ------------------------------------------------------------------------------------ reports
def summary(report: dict) -> list[dict]:
    """Per shape and M: XLA, Triton and the fastest Mosaic blocks, with the ratios."""
    out = []
    keys = sorted({(r["proj"], r["m"]) for r in report["rows"]},
                  key=lambda pm: (list(SHAPES).index(pm[0]), pm[1]))
    for proj, m in keys:
        rs = [r for r in report["rows"] if (r["proj"], r["m"]) == (proj, m) and r.get("us")]
        pick = {impl: min((r for r in rs if r["impl"] == impl), key=lambda r: r["us"], default=None)
                for impl in ("xla", "triton", "mosaic")}
        mos = pick["mosaic"]
        out.append({"proj": proj, "m": m, **{f"{i}_us": p and p["us"] for i, p in pick.items()},
                    "mosaic_config": mos and mos["config"],
                    "mosaic_frac_copy": mos and mos["frac_copy"],
                    "mosaic_over_triton": mos and pick["triton"]
                    and mos["us"] / pick["triton"]["us"],
                    "mosaic_over_xla": mos and pick["xla"] and mos["us"] / pick["xla"]["us"]})
    return out


def _f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    env, bw = report["environment"], report.get("bandwidth") or {}
    lines = [f"# Mosaic GPU decode matmul check ({env['device_kind']}, JAX {env['jax']}, "
             f"{env['date']})", "",
             f"Copy bandwidth {_f(bw.get('copy_gbps'), '.0f')} GB/s, read "
             f"{_f(bw.get('read_gbps'), '.0f')} GB/s; {report['config']['layers']} stacked "
             f"layers per jit, median of {report['config']['reps']}.", "",
             "## API probes", "", "| probe | ok | error |", "| --- | --- | --- |"]
    lines += [f"| {p['probe']} | {p['ok']} | {p['error'] or ''} |" for p in report["probes"]]
    lines += ["", "## Fastest of each (us per call; Mosaic's fraction of copy bandwidth)", "",
              "| proj | M | XLA | Triton | Mosaic | Mosaic blocks | frac copy | /Triton | /XLA |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary(report):
        lines.append(f"| {s['proj']} | {s['m']} | {_f(s['xla_us'])} | {_f(s['triton_us'])} | "
                     f"{_f(s['mosaic_us'])} | {s['mosaic_config'] or '-'} | "
                     f"{_f(s['mosaic_frac_copy'], '.2f')} | {_f(s['mosaic_over_triton'], '.3f')} | "
                     f"{_f(s['mosaic_over_xla'], '.3f')} |")
    lines += ["", "## Every run", "", "| proj | M | impl | blocks | us | frac copy | rel err | "
              "error |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        err = r.get("error") or r.get("skipped") or ""
        lines.append(f"| {r['proj']} | {r['m']} | {r['impl']} | {r['config']} | "
                     f"{_f(r.get('us'))} | {_f(r.get('frac_copy'), '.2f')} | "
                     f"{_f(r.get('rel_err'), '.1e')} | {err[:200]} |")
    return "\n".join(lines)


def main(cc: CheckConfig) -> dict:
    t_start = time.perf_counter()
    interpret = interpret_params() if cc.small else None
    report = {"environment": environment(), "config": dataclasses.asdict(cc), "probes": [],
              "bandwidth": None, "rows": []}
    stem = f"{cc.out}/mosaic_check"
    save = lambda: write_report(report, stem, markdown, None)  # noqa: E731 - after every step
    report["probes"] = probes(interpret)
    save()
    try:
        report["bandwidth"] = best_bandwidth(None, cc.reps, jax.random.key(0),
                                             jax.devices()[0].platform)
    except Exception as e:  # noqa: BLE001 - without it the fractions are left out
        log(f"bandwidth failed: {error_text(e)}")
        report["bandwidth"] = {"copy_gbps": float("nan"), "read_gbps": float("nan"),
                               "error": error_text(e)}
    save()
    t_sweep = time.perf_counter()  # the budget counts the sweep only
    for proj, (k, n) in (SMALL_SHAPES if cc.small else SHAPES).items():
        shape_rows(proj, k, n, cc, report["bandwidth"], t_sweep, report["rows"], save)
    report["seconds"] = time.perf_counter() - t_start
    table = save()
    print(table.split("\n## Every run")[0])  # the compact table last
    log(f"wrote {stem}.json and .md in {report['seconds']:.0f} s")
    return report


def parse_args(argv=None) -> CheckConfig:
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.bench.mosaic_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=CheckConfig.out, help="directory of the report")
    parser.add_argument("--layers", type=int, default=CheckConfig.layers)
    parser.add_argument("--reps", type=int, default=CheckConfig.reps)
    parser.add_argument("--budget", type=float, default=CheckConfig.budget,
                        help="seconds of block search before only default blocks run")
    parser.add_argument("--small", action="store_true", help="tiny shapes, interpret mode (CPU)")
    a = parser.parse_args(argv)
    try:
        return CheckConfig(out=a.out, layers=a.layers, reps=a.reps, budget=a.budget,
                           small=a.small)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    reserve_device_memory()
    main(parse_args(sys.argv[1:]))
