"""Where a decode step's time goes: device time per kernel, from a profiler trace.

:mod:`.adapters` says how long a step takes; this says what the device did meanwhile. For one
configuration (a mode of :mod:`.adapter_cases`, a preset, a batch, a context) it compiles the same
generate program, traces a run of 1 new token and one of N with ``jax.profiler``, and reads the
kernels off the device's stream tracks of each trace's Perfetto JSON. Per decode step
(``(N-token run - 1-token run) / (N - 1)``, as the benchmark times it):

* each kernel group's launches and device microseconds (names with their numeric suffix
  dropped: ``loop_add_fusion_12`` counts as ``loop_add_fusion``);
* busy time (the sum of all kernels) against the step's wall time: the difference is the device
  idling between kernels, the cost of a chain of small dependent launches.

Run on a GPU (a CPU trace has no device stream tracks; ``--allow-host`` reads the host's XLA
threads instead, and ``--impl xla`` runs every mode on XLA, for a dry run)::

    python -m loraswitch_jax.eval.bench.profile --mode backbone switch-fused --batch 1 \
        --out eval/results/profile

Writes ``<preset>_b<batch>_ctx<context>.json``, ``.md`` and ``.png`` (stacked device time per
mode and group).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.config import PRESETS
from loraswitch_jax.eval.bench.adapter_cases import (
    MODES,
    Case,
    cache_len,
    make_adapter,
    model_config,
)
from loraswitch_jax.eval.bench.harness import build_params, environment, log, write_report
from loraswitch_jax.generate import GenerateConfig, generate_batch
from loraswitch_jax.sampling import Sampler

__all__ = ["ProfileConfig", "kernel_group", "kernel_times", "main", "parse_args", "per_step",
           "trace_events", "track_names"]

_SUFFIX = re.compile(r"([._]\d+)+$")


def kernel_group(name: str) -> str:
    """A kernel's name without XLA's numeric suffixes (``.3``, ``_12``) and, for Pallas kernels
    (named ``<kernel>_m16_n64_...`` or ``<kernel>_n128_k128_...`` by their block sizes), without
    the block sizes."""
    name = _SUFFIX.sub("", name)
    pallas = re.match(r"(.*?)(_[mn]\d+_.*)$", name)
    return pallas.group(1) if pallas else name


def _device_threads(events: list[dict], allow_host: bool) -> set[tuple]:
    """The (pid, tid) of the device's stream tracks; with ``allow_host`` and none found, the
    host's XLA threads (a CPU dry run)."""
    pids = {e["pid"]: e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {key: name for key, name in threads.items() if "/device:" in pids.get(key[0], "")}
    streams = {key for key, name in device.items() if name.startswith("Stream")}
    if not streams:  # no "Stream #N" tracks: the device's tracks, less XLA's derived op lines
        streams = {key for key, name in device.items() if not name.startswith(_DERIVED)}
    if streams or not allow_host:
        return streams
    return {key for key, name in threads.items() if name.startswith("tf_XLA")}


# Device tracks the profiler derives from the kernels (they would count each kernel twice).
_DERIVED = ("XLA Modules", "XLA Ops", "Steps", "TensorFlow", "Framework", "Source")


def track_names(events: list[dict], allow_host: bool = False) -> list[str]:
    """The names of the tracks :func:`kernel_times` reads (kept in the report, to check)."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return sorted(threads.get(key, str(key)) for key in _device_threads(events, allow_host))


def kernel_times(events: list[dict], allow_host: bool = False) -> dict[str, dict]:
    """``{group: {"launches": n, "us": total}}`` over the complete (``ph == "X"``) events of the
    device's stream tracks in a Chrome/Perfetto trace's ``traceEvents``."""
    tracks = _device_threads(events, allow_host)
    if not tracks:
        raise RuntimeError("the trace has no device stream track (a CPU run? --allow-host reads "
                           "the host's XLA threads instead)")
    groups: dict[str, dict] = defaultdict(lambda: {"launches": 0, "us": 0.0})
    for e in events:
        if e.get("ph") == "X" and (e["pid"], e["tid"]) in tracks:
            g = groups[kernel_group(e["name"])]
            g["launches"] += 1
            g["us"] += float(e.get("dur", 0.0))
    return dict(groups)


def per_step(one: dict[str, dict], many: dict[str, dict], steps: int) -> dict[str, dict]:
    """Per decode step: ``(many - one) / steps`` of each group (``steps = N - 1``)."""
    out = {}
    for name in sorted(set(one) | set(many)):
        a, b = one.get(name, {"launches": 0, "us": 0.0}), many.get(name, {"launches": 0, "us": 0.0})
        out[name] = {"launches": (b["launches"] - a["launches"]) / steps,
                     "us": (b["us"] - a["us"]) / steps}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us"]))


def trace_events(run, folder: str) -> tuple[list[dict], float]:
    """Events of one traced call of ``run`` (after it ran once untraced) and its wall seconds."""
    jax.block_until_ready(run())
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        wall = time.perf_counter() - t0
    paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {folder}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        data = json.load(f)
    return (data["traceEvents"] if isinstance(data, dict) else data), wall


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    modes: tuple[str, ...] = ("backbone", "switch-fused")
    preset: str = "llama2-7b"
    batch: int = 1
    context: int = 1024
    new_tokens: int = 17
    impl: str = "mode"  # "mode": each mode's kernels; "xla": all on XLA (CPU dry runs)
    allow_host: bool = False
    seed: int = 0
    out: str = "eval/results/profile"

    def __post_init__(self):
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {sorted(MODES)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.impl not in ("mode", "xla"):
            raise ValueError(f"impl must be 'mode' or 'xla', got {self.impl!r}")
        if self.new_tokens < 2 or self.batch < 1 or self.context < 1:
            raise ValueError(f"need new_tokens >= 2, batch >= 1, context >= 1: {self}")


def profile_mode(mode_name: str, params, pc: ProfileConfig) -> dict:
    """One mode's per-step kernel groups, busy and wall time."""
    mode = MODES[mode_name]
    case = Case(pc.preset, mode_name, pc.batch, pc.context)
    n = pc.new_tokens
    length = cache_len(pc.context, n)
    cfg = model_config(pc.preset, length)
    key = jax.random.fold_in(jax.random.key(pc.seed), pc.batch)
    acfg = case.adapter_config()
    adapter = None if acfg is None else make_adapter(cfg, acfg, key)
    rng = np.random.default_rng(pc.seed + pc.batch)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (pc.batch, pc.context), np.int32))
    lengths = jnp.full((pc.batch,), pc.context, jnp.int32)
    args = (params, adapter, tokens, lengths, key)
    strategy = {} if mode.strategy is None else {"switch_strategy": mode.strategy}
    gen = GenerateConfig(max_new_tokens=n, sampler=Sampler(temperature=1.0), stop_tokens=(),
                         cache_len=length, impl=mode.ops_impl if pc.impl == "mode" else pc.impl,
                         **strategy)
    run = generate_batch.lower(*args, jnp.int32(n), cfg=cfg, gen=gen, cache_len=length,
                               stream=None).compile()
    with tempfile.TemporaryDirectory() as tmp:
        ev1, wall1 = trace_events(lambda: run(*args, jnp.int32(1)), os.path.join(tmp, "one"))
        evn, walln = trace_events(lambda: run(*args, jnp.int32(n)), os.path.join(tmp, "many"))
    groups = per_step(kernel_times(ev1, pc.allow_host), kernel_times(evn, pc.allow_host), n - 1)
    busy = sum(g["us"] for g in groups.values())
    wall = 1e6 * (walln - wall1) / (n - 1)
    log(f"  {mode_name}: {wall:.0f} us/step wall, {busy:.0f} us busy "
        f"({sum(g['launches'] for g in groups.values()):.0f} launches)")
    return {"mode": mode_name, "tracks": track_names(evn, pc.allow_host), "wall_us": wall,
            "busy_us": busy, "idle_us": wall - busy,
            "launches": sum(g["launches"] for g in groups.values()), "groups": groups}


def markdown(report: dict, top: int = 15) -> str:
    env = report["environment"]
    pc = report["args"]
    lines = [f"Device time per decode step, {env['device_kind']}, JAX {env['jax']}, "
             f"{env['date'][:10]}: {pc['preset']}, batch {pc['batch']}, context {pc['context']}, "
             f"(run of {pc['new_tokens']} tokens - run of 1) / {pc['new_tokens'] - 1}. "
             "Wall is host-timed inside the trace (the profiler adds a little).", "",
             "| mode | wall us/step | busy us | idle us | launches |", "|---|---:|---:|---:|---:|"]
    for r in report["modes"]:
        lines.append(f"| {r['mode']} | {r['wall_us']:.0f} | {r['busy_us']:.0f} | "
                     f"{r['idle_us']:.0f} | {r['launches']:.0f} |")
    names = []
    for r in report["modes"]:
        names += [g for g in list(r["groups"])[:top] if g not in names]
    lines += ["", "| kernel group | " + " | ".join(f"{r['mode']} launches | us"
                                                  for r in report["modes"]) + " |",
              "|---|" + "---:|---:|" * len(report["modes"])]
    for name in names:
        cells = []
        for r in report["modes"]:
            g = r["groups"].get(name, {"launches": 0, "us": 0.0})
            cells += [f"{g['launches']:.1f}", f"{g['us']:.1f}"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: str, top: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    totals = defaultdict(float)
    for r in modes:
        for name, g in r["groups"].items():
            totals[name] += g["us"]
    shown = sorted(totals, key=lambda k: -totals[k])[:top]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.8 * len(modes)))
    for i, r in enumerate(modes):
        left = 0.0
        parts = [(name, r["groups"].get(name, {"us": 0.0})["us"]) for name in shown]
        parts.append(("other kernels", r["busy_us"] - sum(us for _, us in parts)))
        parts.append(("idle", max(r["idle_us"], 0.0)))
        for j, (name, us) in enumerate(parts):
            color = "lightgrey" if name == "idle" else plt.cm.tab20(j % 20)
            ax.barh(i, us, left=left, color=color, label=name if i == 0 else None)
            left += us
    ax.set_yticks(range(len(modes)), [r["mode"] for r in modes])
    ax.set_xlabel("microseconds per decode step")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    env = report["environment"]
    ax.set_title(f"{env['device_kind']}, batch {report['args']['batch']}", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(pc: ProfileConfig) -> dict:
    """Profile every mode of ``pc`` on one set of weights; write and print the report."""
    cfg = model_config(pc.preset, cache_len(pc.context, pc.new_tokens))
    params = build_params(cfg, jax.random.key(pc.seed))
    report = {"args": dataclasses.asdict(pc), "environment": environment(), "modes": []}
    for mode in pc.modes:
        log(f"profiling {mode} (batch {pc.batch}, {pc.preset}, context {pc.context})")
        report["modes"].append(profile_mode(mode, params, pc))
        stem = os.path.join(pc.out, f"{pc.preset}_b{pc.batch}_ctx{pc.context}")
        table = write_report(report, stem, markdown, plot)
    print(table)
    return report


def parse_args(argv: list[str] | None = None) -> ProfileConfig:
    d = ProfileConfig()
    p = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.bench.profile",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", nargs="+", default=list(d.modes),
                   help="modes of the adapter benchmark")
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--impl", default=d.impl, choices=("mode", "xla"),
                   help="mode: each mode's kernels; xla: all on XLA (CPU dry runs)")
    p.add_argument("--allow-host", action="store_true",
                   help="without device tracks (CPU), count the host's XLA threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    a = p.parse_args(argv)
    return ProfileConfig(modes=tuple(a.mode), preset=a.preset, batch=a.batch, context=a.context,
                         new_tokens=a.new_tokens, impl=a.impl, allow_host=a.allow_host,
                         seed=a.seed, out=a.out)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
