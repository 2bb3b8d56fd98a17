"""Data-parallel and FSDP scaling of the adapter training step: tokens/s per device against one.

The question: does the 8B training step keep its per-device speed on 2, 4 and 8 GPUs? Each row
is one mesh (``loraswitch_jax.sharding.MeshConfig``: ``data=N`` replicates the backbone and
splits the rows; ``fsdp=N`` also splits the weights at rest, each scanned layer all-gathering its
own) running the product's mesh training path: ``train.placement.plan_placement`` and its jitted
``train.step`` (AdamW on the adapter, the backbone frozen). Llama-3-8B shapes, random bf16
weights, sequence 2048, the switch adapter (E 8, r 16, k 2), remat ``dots``; a fixed batch per
device (``--batch-per-device``), so a mesh of ``n`` devices steps ``n`` times the rows::

    tokens/s            = B_dev * n * T / step_s   (median synchronised step after warmup)
    tokens/s per device = tokens/s / n
    efficiency          = tokens/s per device / tokens/s of the one-device row of this run
    MFU                 = training.step_flops(global batch) / step_s / (n * peak)

Target: efficiency >= 0.90. Weights and the train state are made already placed in the mesh's
shardings (one jitted random draw, ``out_shardings`` the placement's: FSDP never holds the
whole model on one device). The batch's values depend only on its global size and the seed, so
meshes of the same global batch (``data=N`` and ``fsdp=N``) run the same computation: their
losses agree, a check that they do. ``collectives``: the compiled step's all-gather,
reduce-scatter, all-reduce (...) instructions, counted in its HLO; ``--profile`` traces one step
and sums the device time of the collective kernels (NCCL) per device (they may overlap compute:
kernel time, not exposed time).

Each mesh runs in a fresh subprocess, as :mod:`.training`'s runs do: ``peak_bytes_in_use`` never
resets, so only a process of its own gives a row its own peak (the max over the mesh's devices);
an OOM or a crash is a row, and the next mesh still runs. The parent never initialises JAX (it
would take the GPUs' memory); it learns the device count from the first row (always the one-device
baseline) and skips larger meshes with a row that says so. ``NCCL_NVLS_ENABLE=0`` (NVLink
multicast off) is set for the workers unless given::

    NCCL_NVLS_ENABLE=0 python -m loraswitch_jax.eval.bench.training_scaling   # 1, data/fsdp 2, 4, 8
    python -m loraswitch_jax.eval.bench.training_scaling --small --cpu        # 8 host devices
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback

import jax  # imported, never initialised in the parent: the workers own the GPUs
import jax.numpy as jnp

from loraswitch_jax.adapters import init_adapter
from loraswitch_jax.eval.bench.harness import (
    environment, failure, is_oom, log, reserve_device_memory, spawn_worker, write_report)
from loraswitch_jax.eval.bench.profile import kernel_times, trace_events
from loraswitch_jax.eval.bench.step_profile import stepper
from loraswitch_jax.eval.bench.training import (
    H200_BF16_TFLOPS, REMATS, BenchConfig, Run, add_step_arguments, model_config, random_batch,
    random_params, step_kwargs, timed_row)
from loraswitch_jax.params import init_params
from loraswitch_jax.sharding import MeshConfig, MeshError
from loraswitch_jax.train import step
from loraswitch_jax.train.placement import plan_placement

__all__ = ["DEFAULT_MESHES", "TARGET", "ScalingConfig", "add_efficiency", "collective_profile",
           "hlo_collectives", "loss_agreement", "main", "markdown", "mesh_label", "parse_args",
           "parse_mesh", "plot", "work"]

DEFAULT_MESHES = ("1", "data=2", "fsdp=2", "data=4", "fsdp=4", "data=8", "fsdp=8")
TARGET = 0.90
ONE = MeshConfig()
GIB = 2**30
# Collective instructions of compiled HLO, and collective kernels' names in a GPU trace.
_HLO_COLLECTIVE = re.compile(r"\s(all-gather|reduce-scatter|all-reduce|all-to-all|"
                             r"collective-permute)(?:-start)?\(")
_KERNEL_COLLECTIVE = re.compile(r"nccl|all.?gather|reduce.?scatter|all.?reduce|all.?to.?all|"
                                r"collective.?permute", re.I)


def parse_mesh(text: str) -> MeshConfig:
    """``"1"`` (one device) or :meth:`MeshConfig.parse`'s ``"data=2"``, ``"data=2,fsdp=2"``."""
    return ONE if text.strip() in ("1", "one") else MeshConfig.parse(text)


def mesh_label(mc: MeshConfig) -> str:
    """The axes larger than 1 (``"fsdp=4"``), ``"one"`` for one device."""
    sizes = zip(("data", "fsdp", "tensor"), mc.shape)
    return ",".join(f"{n}={s}" for n, s in sizes if s > 1) or "one"


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """What to run: ``meshes`` in order (the one-device baseline is put first when missing), each
    with ``batch_per_device`` rows per device; the rest as :class:`.training.BenchConfig`'s."""

    meshes: tuple[str, ...] = DEFAULT_MESHES
    adapter: str = "switch"
    remat: str = "dots"
    batch_per_device: int = 1
    preset: str = "llama3-8b"
    seq: int = 2048
    steps: int = 5
    warmup: int = 2
    budget_s: float = 540.0
    attention_chunk: int = 512
    loss_chunk: int | None = None  # TrainConfig's default
    peak_tflops: float = H200_BF16_TFLOPS
    cpu: bool = False
    profile: bool = False
    seed: int = 0
    out: str = "eval/results/training_scaling"

    def __post_init__(self):
        try:
            mcs = [parse_mesh(m) for m in self.meshes]
        except MeshError as e:
            raise ValueError(f"meshes: {e}") from None
        if not mcs or len(set(mcs)) != len(mcs):
            raise ValueError(f"meshes must be given, each once: {list(self.meshes)}")
        if ONE not in mcs:
            object.__setattr__(self, "meshes", ("1", *self.meshes))
        if self.adapter not in ("switch", "layerwise", "lora"):
            raise ValueError(f"adapter {self.adapter!r} is not one of switch, layerwise, lora")
        if isinstance(self.batch_per_device, bool) or not isinstance(self.batch_per_device, int) \
                or self.batch_per_device < 1:
            raise ValueError(f"batch_per_device must be an integer >= 1, got "
                             f"{self.batch_per_device!r}")
        self.bench()  # training's checks: remat, preset, seq, steps, warmup, budget, peak

    def run(self, mc: MeshConfig) -> Run:
        """Mesh ``mc``'s run: ``batch_per_device`` rows per ``data * fsdp`` shard (``tensor``
        shards share their rows)."""
        return Run(self.adapter, self.remat, self.batch_per_device * mc.data * mc.fsdp)

    def bench(self) -> dict:
        """The :class:`.training.BenchConfig` fields that ``timed_row`` and the worker read."""
        bc = BenchConfig(runs=(Run(self.adapter, self.remat, self.batch_per_device),),
                         preset=self.preset, seq=self.seq, steps=self.steps, warmup=self.warmup,
                         budget_s=self.budget_s, attention_chunk=self.attention_chunk,
                         loss_chunk=self.loss_chunk, peak_tflops=self.peak_tflops, cpu=self.cpu,
                         profile=self.profile,
                         seed=self.seed, out=self.out)
        return {**dataclasses.asdict(bc), "runs": []}

    @property
    def stem(self) -> str:
        return os.path.join(self.out, f"{self.preset}_seq{self.seq}_{self.adapter}_{self.remat}"
                                      f"_b{self.batch_per_device}")


# ------------------------------------------------------------------------------------ worker
def hlo_collectives(hlo: str) -> dict[str, int]:
    """Collective instructions in a compiled module's HLO text, by kind (each once, however
    often a loop runs it; ``-start`` halves of async pairs count as their kind)."""
    counts: dict[str, int] = {}
    for m in _HLO_COLLECTIVE.finditer(hlo):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items()))


def _device_peaks(devices) -> list[int] | None:
    stats = [d.memory_stats() for d in devices]  # None on a CPU
    return None if not all(stats) else [s.get("peak_bytes_in_use", 0) for s in stats]


def collective_profile(events: list[dict], n: int, allow_host: bool) -> dict:
    """Kernel time per device of one traced step: all kernels and the collective ones (mean over
    the ``n`` devices' tracks; a CPU trace's host threads stand in for them)."""
    groups = kernel_times(events, allow_host)
    coll = {g: v for g, v in groups.items() if _KERNEL_COLLECTIVE.search(g)}
    return {"busy_us_per_device": sum(v["us"] for v in groups.values()) / n,
            "collective_us_per_device": sum(v["us"] for v in coll.values()) / n,
            "collective_groups": dict(sorted(coll.items(), key=lambda kv: -kv[1]["us"])[:8])}


def _measure(job: dict, row: dict) -> None:
    """One mesh's run; fills ``row`` as it goes (a failure keeps what was measured)."""
    reserve_device_memory()
    bench, mc = job["bench"], parse_mesh(job["mesh"])
    row["environment"] = environment()
    if mc.size > jax.device_count():
        row |= {"status": "skipped", "error": f"needs {mc.size} devices, {jax.device_count()} "
                                              "visible"}
        return
    run, cfg, seq = Run(**job["run"]), model_config(bench["preset"]), bench["seq"]
    oc = step.OptimConfig(lr=1e-4, warmup_steps=0, steps=10_000)
    key = jax.random.key(bench["seed"])

    def make_state(k):  # jitted into the placement's shardings: made where it lives
        return step.init_state(init_adapter(cfg, run.adapter_config(), k), oc, bench["seed"])

    t0 = time.perf_counter()
    params_shape = jax.eval_shape(functools.partial(init_params, cfg, dtype=jnp.bfloat16), key)
    placement = plan_placement(mc, cfg, params_shape, jax.eval_shape(make_state, key), run.batch)
    params = random_params(cfg, key, placement.params)
    state = jax.jit(make_state, out_shardings=placement.state)(jax.random.fold_in(key, 1))
    data = placement.put_batch(random_batch(cfg, run.batch, seq, jax.random.fold_in(key, 2)))
    devices = list(placement.mesh.devices.flat)
    row |= {"build_s": time.perf_counter() - t0, "devices": len(devices), "batch": run.batch,
            "peak_bytes_after_build": _device_peaks(devices)}
    log(f"{job['label']}: built in {row['build_s']:.1f}s; compiling batch {run.batch}")
    t0 = time.perf_counter()
    compiled = placement.train_step.lower(
        state, params, data, cfg=cfg, oc=oc, remat=run.remat,
        attention_chunk=bench["attention_chunk"], loss_chunk=bench["loss_chunk"]).compile()
    row |= {"compile_s": time.perf_counter() - t0,
            "collectives": hlo_collectives(compiled.as_text())}
    log(f"{job['label']}: compiled in {row['compile_s']:.0f}s; collectives {row['collectives']}")
    times, losses = [], []
    for i in range(bench["warmup"] + bench["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, params, data)
        jax.block_until_ready((state, metrics))
        if i >= bench["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    n = len(devices)  # MFU against the mesh's peak: n devices' worth
    row |= timed_row(times, {**bench, "peak_tflops": bench["peak_tflops"] * n}, run, run.batch)
    peaks = _device_peaks(devices)
    row |= {"tokens_per_s_per_device": row["tokens_per_s"] / n, "losses": losses,
            "peak_bytes_per_device": peaks, "peak_bytes": max(peaks) if peaks else None}
    if bench["profile"]:
        log(f"{job['label']}: tracing one step")
        with tempfile.TemporaryDirectory() as tmp:
            events, wall = trace_events(stepper(compiled, state, params, data), tmp)
        row["profile"] = {"wall_us": 1e6 * wall, **collective_profile(events, n, bench["cpu"])}


def work(job: dict, result_path: str) -> None:
    """A worker process: one mesh, its row written to ``result_path`` whatever happens."""
    row: dict = {}
    try:
        _measure(job, row)
    except Exception as e:  # noqa: BLE001 - the row records it; the parent runs the next mesh
        traceback.print_exc()
        row |= {"status": "oom" if is_oom(e) else "error", "error": failure(e)}
    with open(result_path, "w") as f:
        json.dump(row, f)


# ------------------------------------------------------------------------------------ parent
def _spawn(job: dict, timeout: float, cpu: bool) -> dict:
    """Run one mesh in a fresh Python (its log goes to ours); no result file is a crash."""
    # 0.90, not training's 0.95: NCCL's buffers live outside JAX's pool on every GPU.
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90", "NCCL_NVLS_ENABLE": "0", **os.environ}
    if cpu:  # 8 host devices unless the caller chose a count
        flags = env.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            flags += " --xla_force_host_platform_device_count=8"
        env |= {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "XLA_FLAGS": flags.strip()}
    return spawn_worker("loraswitch_jax.eval.bench.training_scaling", job, timeout, env)


def add_efficiency(rows: list[dict]) -> float | None:
    """Set each measured row's ``scaling_efficiency`` (its tokens/s per device over the one-device
    row's) and ``meets_target``; returns the baseline tokens/s (None: no one-device row ran)."""
    base = next((r.get("tokens_per_s_per_device") for r in rows
                 if r["mesh"] == "one" and r.get("status") == "ok"), None)
    for r in rows:
        if r.get("status") == "ok" and base:
            r["scaling_efficiency"] = r["tokens_per_s_per_device"] / base
            r["meets_target"] = r["scaling_efficiency"] >= TARGET
    return base


def loss_agreement(rows: list[dict]) -> dict[str, float]:
    """Per global batch run by two or more meshes: the largest relative spread of their
    per-step losses (the same data and weights: only the reduction order differs)."""
    by_batch: dict[int, list[list[float]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_batch.setdefault(r["batch"], []).append(r["losses"])
    out = {}
    for batch, runs in sorted(by_batch.items()):
        if len(runs) > 1:
            out[str(batch)] = max((max(s) - min(s)) / abs(statistics.mean(s))
                                  for s in zip(*runs))
    return out


def main(sc: ScalingConfig) -> dict:
    """Run ``sc.meshes`` in order, each in a fresh process, within ``budget_s``; write each row."""
    start, bench = time.perf_counter(), sc.bench()
    report = {"args": dataclasses.asdict(sc), "environment": None,
              "model": dataclasses.asdict(model_config(sc.preset)), "target": TARGET,
              "peak_tflops": sc.peak_tflops, "results": [], "baseline_tokens_per_s": None,
              "loss_spread": {}, "wall_s": 0.0}
    log(f"{len(sc.meshes)} meshes, budget {sc.budget_s:.0f}s: {', '.join(sc.meshes)}")
    visible = None
    for i, text in enumerate(sc.meshes):
        mc = parse_mesh(text)
        run = sc.run(mc)
        row = {"mesh": mesh_label(mc), "mesh_config": dataclasses.asdict(mc), "devices": mc.size,
               "batch": run.batch}
        left = sc.budget_s - (time.perf_counter() - start)
        estimate = max((r["wall_s"] for r in report["results"] if r.get("wall_s")), default=0.0)
        if visible is not None and mc.size > visible:
            row |= {"status": "skipped", "error": f"needs {mc.size} devices, {visible} visible"}
        elif left < max(estimate, 1.0):
            row |= {"status": "skipped", "error": f"budget: {left:.0f}s left, ~{estimate:.0f}s "
                                                  "needed"}
        else:
            log(f"[{i + 1}/{len(sc.meshes)}] {row['mesh']}, global batch {run.batch}, "
                f"{left:.0f}s left")
            t0 = time.perf_counter()
            job = {"bench": bench, "mesh": text, "label": row["mesh"],
                   "run": dataclasses.asdict(run)}
            row |= _spawn(job, left, sc.cpu)
            row["wall_s"] = time.perf_counter() - t0
        env = row.pop("environment", None)
        if env:
            report["environment"] = report["environment"] or env
            visible = env["device_count"]
        report["results"].append(row)
        log(f"{row['mesh']}: {row.get('status')} {row.get('error', '')}")
        report["baseline_tokens_per_s"] = add_efficiency(report["results"])
        report["loss_spread"] = loss_agreement(report["results"])
        report["wall_s"] = time.perf_counter() - start
        write_report(report, sc.stem, markdown, plot)
    table = write_report(report, sc.stem, markdown, plot)
    log(f"wrote {sc.stem}.json, .md, .png")
    print(table, flush=True)
    return report


# ------------------------------------------------------------------------------------ report
def _f(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x / scale, spec)


def markdown(report: dict) -> str:
    """The header (device, JAX, date, setting), one row per mesh, and the loss agreement."""
    env, a = report["environment"] or {}, report["args"]
    lines = [f"Adapter training scaling, `{a['preset']}` random bf16 weights, sequence {a['seq']}, "
             f"{a['adapter']} adapter, remat {a['remat']}, {a['batch_per_device']} row(s) per "
             f"device: {env.get('device_count', '?')} x {env.get('device_kind', '?')}, JAX "
             f"{env.get('jax', '?')}, {env.get('date', '?')[:10]}. Efficiency: tokens/s per "
             f"device over the one-device row's (target >= {report['target']:.2f}); MFU against "
             f"{report['peak_tflops']:g} TFLOP/s per device; peak: the most any device used.", "",
             "| mesh | devices | batch | step s | tokens/s | tokens/s/device | efficiency | MFU "
             "| peak GiB/device | collectives in HLO | collective ms/device | compile s | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in report["results"]:
        coll = ", ".join(f"{k} {v}" for k, v in (r.get("collectives") or {}).items()) or "-"
        prof = (r.get("profile") or {}).get("collective_us_per_device")
        eff = r.get("scaling_efficiency")
        lines.append(
            f"| {r['mesh']} | {r['devices']} | {r['batch']} | {_f(r.get('step_s'), '.3f')} "
            f"| {_f(r.get('tokens_per_s'), '.0f')} | {_f(r.get('tokens_per_s_per_device'), '.0f')} "
            f"| {_f(eff, '.3f')}{'' if eff is None or r['meets_target'] else ' (below)'} "
            f"| {_f(r.get('mfu'), '.3f')} | {_f(r.get('peak_bytes'), '.1f', GIB)} | {coll} "
            f"| {_f(prof, '.1f', 1e3)} | {_f(r.get('compile_s'), '.0f')} "
            f"| {r.get('status')}{': ' + r['error'][:120] if r.get('error') else ''} |")
    if report["loss_spread"]:
        lines += ["", "Same global batch, same data and weights: largest relative spread of the "
                  "per-step losses across meshes: " + ", ".join(
                      f"batch {b}: {s:.1e}" for b, s in report["loss_spread"].items()) + "."]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Efficiency against devices, one line per mesh kind (data, fsdp), the target dashed; and
    the peak memory per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in report["results"] if r.get("scaling_efficiency") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    kinds = {r["mesh"].split("=")[0] for r in rows if r["mesh"] != "one" and "," not in r["mesh"]}
    one = [r for r in rows if r["mesh"] == "one"]
    for kind in sorted(kinds):
        line = one + sorted((r for r in rows if r["mesh"].startswith(kind + "=")
                             and "," not in r["mesh"]), key=lambda r: r["devices"])
        xs = [r["devices"] for r in line]
        axes[0].plot(xs, [r["scaling_efficiency"] for r in line], "o-", label=kind)
        peaks = [r for r in line if r.get("peak_bytes")]  # none on a CPU
        axes[1].plot([r["devices"] for r in peaks], [r["peak_bytes"] / GIB for r in peaks], "o-",
                     label=kind)
    axes[0].axhline(report["target"], ls="--", c="grey", label=f"target {report['target']:.2f}")
    axes[0].set(xlabel="devices", ylabel="tokens/s per device / one device's", ylim=(0, 1.1))
    axes[1].set(xlabel="devices", ylabel="peak GiB per device")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["devices"] for r in rows}) or [1])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    env, a = report["environment"] or {}, report["args"]
    fig.suptitle(f"{a['preset']} seq {a['seq']}, {a['adapter']} {a['remat']}, "
                 f"{a['batch_per_device']}/device; {env.get('device_kind', '?')}, JAX "
                 f"{env.get('jax', '?')}, {env.get('date', '?')[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ command
def parse_args(argv: list[str] | None = None) -> ScalingConfig | argparse.Namespace:
    d = ScalingConfig()
    p = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.bench.training_scaling",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--meshes", nargs="+", default=list(d.meshes),
                   help="1 (one device) or data=N, fsdp=N, data=N,fsdp=M; one device runs first")
    p.add_argument("--adapter", default=d.adapter, choices=("switch", "layerwise", "lora"))
    p.add_argument("--remat", default=d.remat, choices=REMATS)
    p.add_argument("--batch-per-device", type=int, default=d.batch_per_device)
    add_step_arguments(p, d, "meshes")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU (8 host devices unless XLA_FLAGS sets a count)")
    p.add_argument("--profile", action="store_true",
                   help="also trace one step per mesh: collective kernel time per device")
    a = p.parse_args(argv)
    if a.worker:
        return a
    try:
        return ScalingConfig(meshes=tuple(a.meshes), adapter=a.adapter, remat=a.remat,
                             batch_per_device=a.batch_per_device, cpu=a.cpu, profile=a.profile,
                             **step_kwargs(a))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if isinstance(args, ScalingConfig):
        main(args)
    else:
        work(json.loads(args.worker), args.result)
