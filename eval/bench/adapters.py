"""Decode latency of dynamic adapters beside the backbone, all in one run (DESIGN.md §2, §5).

Every configuration (model preset, mode, batch, context, experts E, top-k; modes in
:mod:`.adapter_cases`) is measured as :mod:`.adapter_measure` describes: decode ms/token, its
ratio to the backbone at the same preset, batch and context in the same run, the fraction of the
copy-bandwidth floor, launches per decode step from the compiled HLO (a ``conditional``, such as
switch-merge's merge-if-the-route-changed, counts as one) and, for switch modes, the routes of
the generated tokens (distinct routes per step, in all, and how often a row's route changes).
The SGMM merge kernel is also timed alone on all seven projections.

Grids: ``main`` (Llama-2-7B, context 1024, E 8, k 2, batches 1 8 32 64, all modes) and
``suite`` (backbone, lora, layerwise-pallas, switch-merge, switch-fused; 7B and ~1B shapes;
contexts 128 1024 4096; E 8 32 128 at k 2 and k 1 2 4 at E 8, around E 8 k 2 and context 1024).
Configurations run in priority order; ``--max-minutes`` stops before one that would not finish in
time, and ``--only`` filters. JSON, Markdown and a PNG are rewritten after every configuration, so
a killed run keeps what it measured. Examples::

    python -m loraswitch_jax.eval.bench.adapters --out eval/results/adapters
    python -m loraswitch_jax.eval.bench.adapters --grid suite --only preset=llama-1b
    python -m loraswitch_jax.eval.bench.adapters --preset demo --context 32 --batch 1 2 \\
        --new-tokens 5 --reps 1 --impl xla              # CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import traceback

import jax

from loraswitch_jax.config import PRESETS
from loraswitch_jax.eval.bench.adapter_cases import FILTER_KEYS, GRIDS, MODES, RANK, Case
from loraswitch_jax.eval.bench.adapter_measure import measure_case, measure_sgmm
from loraswitch_jax.eval.bench.adapter_report import write_outputs
from loraswitch_jax.eval.bench.harness import (
    best_bandwidth,
    build_params,
    environment,
    failure,
    log,
    nbytes,
    reserve_device_memory,
)
from loraswitch_jax.params import LlamaParams

__all__ = ["AdaptersConfig", "main", "parse_args"]


@dataclasses.dataclass(frozen=True)
class AdaptersConfig:
    """What to run. ``presets``/``batches``/``contexts`` replace the grid's axes when given;
    ``only`` keeps the configurations whose field is one of the listed values (as text);
    ``name`` the report's file stem (None: from the grid and its settings, see :meth:`stem`)."""

    grid: str = "main"
    presets: tuple[str, ...] | None = None
    batches: tuple[int, ...] | None = None
    contexts: tuple[int, ...] | None = None
    only: tuple[tuple[str, tuple[str, ...]], ...] = ()
    new_tokens: int = 65
    reps: int = 5
    impl: str = "mode"  # "mode": each mode's kernels; "xla": everything on XLA (CPU dry runs)
    sgmm: bool = True
    max_minutes: float = 8.5
    copy_gib: float | None = None
    copy_reps: int = 20
    seed: int = 0
    out: str = "eval/results/adapters"
    name: str | None = None

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; choose from {sorted(GRIDS)}")
        for p in self.presets or ():
            if p not in PRESETS:
                raise ValueError(f"unknown preset {p!r}; choose from {sorted(PRESETS)}")
        for key, values in self.only:
            if key not in FILTER_KEYS:
                raise ValueError(f"--only key {key!r} is not one of {FILTER_KEYS}")
            if key == "mode" and set(values) - set(MODES):
                raise ValueError(f"unknown modes {sorted(set(values) - set(MODES))}; "
                                 f"choose from {sorted(MODES)}")
        if self.new_tokens < 2 or self.reps < 1 or self.max_minutes <= 0:
            raise ValueError(f"need new_tokens >= 2, reps >= 1, max_minutes > 0: {self}")
        if self.impl not in ("mode", "xla"):
            raise ValueError(f"impl must be 'mode' or 'xla', got {self.impl!r}")

    def cases(self) -> list[Case]:
        """The grid's configurations that pass ``only``, in run order. The backbone of every
        kept (preset, batch, context) is kept too: each ratio needs it from the same run."""
        axes = {"presets": self.presets, "batches": self.batches, "contexts": self.contexts}
        cases = GRIDS[self.grid](**{k: v for k, v in axes.items() if v})
        only = dict(self.only)
        kept = [c for c in cases if all(str(getattr(c, k)) in v for k, v in only.items())]
        if not kept:
            raise ValueError(f"no configuration of grid {self.grid!r} passes --only {only}")
        needed = {(c.preset, c.batch, c.context) for c in kept}
        return [c for c in cases if c in kept or (
            c.mode == "backbone" and (c.preset, c.batch, c.context) in needed)]

    def stem(self) -> str:
        """The report's path without extension, named by what it measures: ``main`` gives e.g.
        ``llama2-7b_e8_r16_ctx1024``, ``suite`` gives ``suite``."""
        if self.name:
            return os.path.join(self.out, self.name)
        if self.grid == "suite":
            return os.path.join(self.out, "suite")
        cases = self.cases()
        presets = "+".join(dict.fromkeys(c.preset for c in cases))
        contexts = "+".join(dict.fromkeys(str(c.context) for c in cases))
        return os.path.join(self.out, f"{presets}_e8_r{RANK}_ctx{contexts}")


# ------------------------------------------------------------------------------------- main
def _estimate_s(done: list[dict], case: Case) -> float:
    """Seconds the next configuration may take, from the slowest comparable finished one."""
    for same in (lambda r: (r["preset"], r["batch"]) == (case.preset, case.batch),
                 lambda r: r["preset"] == case.preset, lambda r: True):
        walls = [r["wall_s"] for r in done if same(r)]
        if walls:
            return max(walls)
    return 0.0


def _sgmm_entry(params: LlamaParams, preset: str, bc: AdaptersConfig, bw: dict) -> dict:
    """The SGMM kernel's timing for the report, or why there is none."""
    if bc.impl != "mode":
        return {"skipped": "the SGMM kernel is timed on a GPU only (--impl xla)"}
    try:
        s = measure_sgmm(params, PRESETS[preset], bw, reps=10, seed=bc.seed)
    except Exception as e:  # noqa: BLE001 - one failure must not end the run
        traceback.print_exc()
        return {"error": failure(e)}
    log(f"SGMM merge {s['ms']:.2f} ms, {s['fraction']:.2f} of copy bandwidth")
    return s


def main(bc: AdaptersConfig) -> dict:
    """Run the grid in order until done or out of time; write after each config; return it."""
    reserve_device_memory()
    start = time.perf_counter()
    deadline = start + 60 * bc.max_minutes
    cases = bc.cases()
    env = environment()
    if bc.impl == "mode" and env["platform"] == "cpu":
        raise ValueError("the Pallas modes need a GPU; pass --impl xla for a CPU dry run")
    log(f"{env['device_kind']} ({env['platform']}), JAX {env['jax']}; {len(cases)} configs; {bc}")
    key = jax.random.key(bc.seed)
    bw = best_bandwidth(bc.copy_gib, bc.copy_reps, key, env["platform"])
    stem = bc.stem()
    report = {
        "args": dataclasses.asdict(bc), "environment": env, "bandwidth": bw, "sgmm": {},
        "results": [], "acceptance": [], "not_run": [], "stopped": None, "wall_s": 0.0,
    }

    params, params_preset = None, None
    for i, case in enumerate(cases):
        estimate = _estimate_s(report["results"], case)
        if time.perf_counter() + estimate > deadline:
            report["not_run"] = [dataclasses.asdict(c) for c in cases[i:]]
            report["stopped"] = f"--max-minutes {bc.max_minutes} reached"
            log(f"stopping: {len(cases) - i} configs left, ~{estimate:.0f}s each")
            break
        if case.preset != params_preset:  # one model resident at a time
            params = None
            gc.collect()
            t0 = time.perf_counter()
            params = jax.block_until_ready(build_params(PRESETS[case.preset],
                                                        jax.random.fold_in(key, 1)))
            params_preset = case.preset
            log(f"{case.preset}: {nbytes(params) / 1e9:.3g} GB of weights in "
                f"{time.perf_counter() - t0:.1f}s")
            if bc.sgmm and case.preset not in report["sgmm"]:
                report["sgmm"][case.preset] = _sgmm_entry(params, case.preset, bc, bw)
                gc.collect()
        log(f"[{i + 1}/{len(cases)}] {case.name}")
        t0 = time.perf_counter()
        try:
            row = measure_case(case, params, bw, new_tokens=bc.new_tokens, reps=bc.reps,
                               impl=bc.impl, seed=bc.seed)
        except Exception as e:  # noqa: BLE001 - record the failure, keep measuring the rest
            traceback.print_exc()
            row = {**dataclasses.asdict(case), "setting": case.setting, "error": failure(e)}
        row["wall_s"] = time.perf_counter() - t0
        report["results"].append(row)
        gc.collect()  # this config's adapter, cache and programs go before the next allocates
        if "ms_per_token" in row:
            log(f"  {row['ms_per_token']:.3f} ms/token, {row['fraction'] or 0:.2f} of the "
                f"floor, {row['launches']['launches']} launches/step ({row['wall_s']:.0f}s)")
        else:
            log(f"  skipped: {row['error']}")
        report["wall_s"] = time.perf_counter() - start
        write_outputs(report, stem)
    report["wall_s"] = time.perf_counter() - start
    table = write_outputs(report, stem)
    log(f"wrote {stem}.json, .md, .png")
    print(table, flush=True)
    return report


def _filter(text: str) -> tuple[str, tuple[str, ...]]:
    key, sep, values = text.partition("=")
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"--only takes KEY=V1,V2 ..., got {text!r}")
    return key, tuple(values.split(","))


def parse_args(argv: list[str] | None = None) -> AdaptersConfig:
    d = AdaptersConfig()
    p = argparse.ArgumentParser(
        prog="python -m loraswitch_jax.eval.bench.adapters",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--grid", default=d.grid, choices=sorted(GRIDS))
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), help="replace the presets")
    p.add_argument("--batch", type=int, nargs="+", help="replace the batch sizes")
    p.add_argument("--context", type=int, nargs="+", help="replace the contexts")
    p.add_argument("--only", type=_filter, nargs="+", default=[], metavar="KEY=V1,V2",
                   help=f"keep configs whose KEY is a listed value; keys {', '.join(FILTER_KEYS)}")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens,
                   help="N: decode = (T_N - T_1) / (N - 1)")
    p.add_argument("--reps", type=int, default=d.reps, help="timed runs of each generation")
    p.add_argument("--impl", default=d.impl, choices=("mode", "xla"),
                   help="mode: each mode's kernels; xla: all on XLA (CPU dry runs)")
    p.add_argument("--no-sgmm", action="store_true", help="skip timing the SGMM kernel alone")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="start no config that would end after this (estimated from finished ones)")
    p.add_argument("--copy-gib", type=float, default=None,
                   help="GiB copied; None: 2 on a GPU, 1/16 on a CPU")
    p.add_argument("--copy-reps", type=int, default=d.copy_reps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--name", default=None,
                   help="report file stem (default: from the grid and its settings)")
    a = p.parse_args(argv)
    return AdaptersConfig(
        grid=a.grid, presets=tuple(a.preset) if a.preset else None,
        batches=tuple(a.batch) if a.batch else None,
        contexts=tuple(a.context) if a.context else None, only=tuple(a.only),
        new_tokens=a.new_tokens, reps=a.reps, impl=a.impl, sgmm=not a.no_sgmm,
        max_minutes=a.max_minutes, copy_gib=a.copy_gib, copy_reps=a.copy_reps, seed=a.seed,
        out=a.out, name=a.name,
    )


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
