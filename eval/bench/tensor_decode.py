"""Tensor-parallel decode: the backbone against each GPU's copy-bandwidth floor, adapters beside
it, and the time in all-reduces (DESIGN.md §2, §5, §7).

For each mesh (``tensor=4``, ``tensor=8``), batch and mode (:mod:`.adapter_cases`; backbone,
switch-fused, lora, layerwise-pallas), on random bf16 weights made already sharded on the mesh:

* **ms/token**: the jitted ``generate_batch`` over the mesh (``GenerateConfig(mesh=...)``:
  :mod:`loraswitch_jax.parallel`'s ``shard_map`` steps) run with N1 and N2 new tokens,
  interleaved; ``(median(N2) - median(N1)) / (N2 - N1)`` is one decode step.
* **per-GPU floor**: the bytes one device reads per step (its shards of every weight, replicated
  parts included, and of ``lm_head``; ``batch`` embedding rows; its KV shard at the mean context;
  its shard of the experts a step touches) over one device's copy bandwidth.
* **x backbone**: ms/token over the backbone's at the same mesh and batch, in the same run.
* **all-reduce ms/step**: device time of the kernel groups named all-reduce / AllReduce (NCCL,
  XLA) or ``psum`` (XLA:CPU) in ``jax.profiler`` traces of runs of N1 and N1 + 16 tokens, per
  step (:func:`.profile.per_step`), mean and max over the mesh's devices. Waiting in an
  all-reduce for a slower peer counts. Other collectives (the logits' all-gather) stand beside.

Each mesh's weights are made at its first case and stay resident (Llama-2-70B: 35 GB per GPU at
tensor=4 plus 17.5 at tensor=8 on GPUs 0-3), so cases run by priority: backbone and switch-fused
at every batch and mesh, then the other modes. ``--budget-s`` skips a case that would end after
the budget (estimated from the slowest comparable finished one). The backbone always runs (every
ratio needs it). JSON, Markdown and a PNG are rewritten after every case; the table is printed
last. Examples::

    NCCL_NVLS_ENABLE=0 python -m loraswitch_jax.eval.bench.tensor_decode   # 4 or 8 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m loraswitch_jax.eval.bench.tensor_decode --small --cpu    # CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import re
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.eval.bench.adapter_cases import (MODES, Case, cache_len, make_adapter,
                                                     model_config)
from loraswitch_jax.eval.bench.adapter_measure import expected_experts
from loraswitch_jax.eval.bench.harness import (best_bandwidth, build_params, environment,
                                               failure, is_oom, log, median_ms,
                                               reserve_device_memory, time_calls)
from loraswitch_jax.eval.bench.profile import kernel_times, per_step, trace_events
from loraswitch_jax.eval.bench.tensor_decode_report import write_outputs
from loraswitch_jax.generate import GenerateConfig, generate_batch
from loraswitch_jax.sampling import Sampler
from loraswitch_jax.sharding import (AXES, MeshConfig, MeshError, adapter_specs,
                                     check_tensor_fits, expand_kv_heads, kv_replicas,
                                     logical_spec, param_specs)

__all__ = ["DEFAULT_MODES", "TensorDecodeConfig", "collective_times", "device_step_bytes", "main",
           "measure", "mesh_label", "parse_args", "sharded_adapter", "sharded_params"]

DEFAULT_MODES = ("backbone", "switch-fused", "lora", "layerwise-pallas")
FIRST_MODES = ("backbone", "switch-fused")  # the targets' modes run first at every batch
ALL_REDUCE = re.compile(r"all[-_ ]?reduce|psum", re.I)
COLLECTIVE = re.compile(r"nccl|all[-_ ]?gather|reduce[-_ ]?scatter|all[-_ ]?to[-_ ]?all|"
                        r"collective|permute", re.I)
SMALL = {"preset": "demo", "context": 64, "meshes": ("tensor=2", "tensor=4"), "batches": (1, 2),
         "new_tokens": (1, 9), "reps": 3, "copy_gib": 1 / 64, "copy_reps": 2}


@dataclasses.dataclass(frozen=True)
class TensorDecodeConfig:
    """What to run. ``impl="mode"``: each mode's kernels; ``"xla"``: all on XLA (CPU dry runs).
    ``copy_gib=None``: 2 GiB on a GPU, 1/16 on a CPU."""

    preset: str = "llama2-70b"
    meshes: tuple[str, ...] = ("tensor=4", "tensor=8")
    batches: tuple[int, ...] = (1, 8, 32, 64)
    modes: tuple[str, ...] = DEFAULT_MODES
    context: int = 1024
    new_tokens: tuple[int, int] = (1, 65)
    reps: int = 3
    impl: str = "mode"
    profile_steps: int = 16  # decode steps between the two traced runs; 0: no traces
    budget_s: float = 540.0
    copy_gib: float | None = None
    copy_reps: int = 20
    seed: int = 0
    out: str = "eval/results/tensor_decode"
    name: str | None = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if not self.meshes:
            raise ValueError("meshes is empty: give at least one, e.g. tensor=4")
        for text in self.meshes:
            MeshConfig.parse(text)  # a MeshError (a ValueError) names the bad item
        for name in ("meshes", "batches", "modes"):
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"{name} has duplicates: {getattr(self, name)}")
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"modes {self.modes} unknown or empty; choose from {sorted(MODES)}")
        if "backbone" not in self.modes:  # every ratio needs it from the same run
            object.__setattr__(self, "modes", ("backbone", *self.modes))
        n1, n2 = self.new_tokens
        if not 1 <= n1 < n2:
            raise ValueError(f"new_tokens must satisfy 1 <= N1 < N2, got {self.new_tokens}")
        if min(self.batches or (0,)) < 1 or min(self.context, self.reps, self.copy_reps,
                                                self.budget_s) <= 0 or self.profile_steps < 0:
            raise ValueError(f"batches, context, reps, copy_reps and budget_s must be positive, "
                             f"profile_steps >= 0: {self}")
        if self.impl not in ("mode", "xla"):
            raise ValueError(f"impl must be 'mode' or 'xla', got {self.impl!r}")

    @property
    def cache_len(self) -> int:
        return cache_len(self.context, self.new_tokens[1])

    def cases(self) -> list[tuple[str, int, str]]:
        """``(mesh, batch, mode)`` in run order, so a budget cuts the least needed: backbone and
        switch-fused (the targets) at every batch and mesh first, then the other modes."""
        first = [m for m in self.modes if m in FIRST_MODES]
        rest = [m for m in self.modes if m not in FIRST_MODES]
        return [(mesh, b, m) for group in (first, rest) for b in self.batches
                for mesh in self.meshes for m in group]

    def stem(self) -> str:
        """The report's path without extension: ``--name``, else e.g.
        ``llama2-70b_ctx1024_tensor4+tensor8_b1-8-32-64`` (separate runs keep separate files)."""
        meshes = "+".join(mesh_label(MeshConfig.parse(m)).replace("=", "") for m in self.meshes)
        return os.path.join(self.out, self.name or f"{self.preset}_ctx{self.context}_{meshes}_b"
                            + "-".join(map(str, self.batches)))


def mesh_label(mesh: MeshConfig) -> str:
    """``tensor=4`` (axes of size 1 left out)."""
    return ",".join(f"{a}={getattr(mesh, a)}" for a in AXES if getattr(mesh, a) > 1) or "single"


# ------------------------------------------------------------------------- sharded weights
def _shardings(specs, mesh: MeshConfig):
    devices = mesh.make_mesh()
    return jax.tree.map(lambda s: NamedSharding(devices, s), specs,
                        is_leaf=lambda s: isinstance(s, P))


def sharded_params(cfg: LlamaConfig, mesh: MeshConfig, key: jax.Array):
    """Random bf16 weights (:func:`.harness.build_params`, KV heads expanded for ``mesh.tensor``
    as ``parallel.place`` does) made on the mesh one layer at a time: a device holds only its
    shards plus one layer's temporaries (all 80 layers' float32 draws at once would not fit)."""
    one = dataclasses.replace(cfg, num_hidden_layers=1)

    def layer(key, i):
        return expand_kv_heads(build_params(one, jax.random.fold_in(key, i)), None, one,
                               mesh.tensor)[0]

    def make(key):
        first = layer(key, 0)
        stacked = jax.lax.with_sharding_constraint(jax.tree.map(
            lambda x: jnp.zeros((cfg.num_hidden_layers, *x.shape[1:]), x.dtype), first.layers),
            shardings.layers)
        stacked = jax.lax.fori_loop(0, cfg.num_hidden_layers, lambda i, s: jax.tree.map(
            lambda s, x: jax.lax.dynamic_update_slice_in_dim(s, x, i, 0), s, layer(key, i).layers),
            stacked)
        return dataclasses.replace(first, layers=stacked)

    def full(key):  # the shapes and specs only
        return expand_kv_heads(build_params(cfg, key), None, cfg, mesh.tensor)[0]

    shardings = _shardings(param_specs(jax.eval_shape(full, key), mesh), mesh)
    return jax.jit(make, out_shardings=shardings)(key)


def sharded_adapter(cfg: LlamaConfig, case: Case, mesh: MeshConfig, key: jax.Array):
    """:func:`.adapter_cases.make_adapter` made on the mesh (``None`` for the backbone)."""
    acfg = case.adapter_config()
    if acfg is None:
        return None

    def make(key):
        adapter = make_adapter(cfg, acfg, key)
        if kv_replicas(cfg, mesh.tensor) == 1:
            return adapter
        # expand_kv_heads expands the adapter beside unexpanded weights (unused: XLA drops them).
        return expand_kv_heads(build_params(cfg, key), adapter, cfg, mesh.tensor)[1]

    specs = adapter_specs(jax.eval_shape(make, key), mesh)
    return jax.jit(make, out_shardings=_shardings(specs, mesh))(key)


# ---------------------------------------------------------------------------------- floor
def _local_nbytes(x: jax.Array) -> int:
    """Bytes of one device's shard of ``x``."""
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def device_step_bytes(params, adapter, cfg: LlamaConfig, mesh: MeshConfig, batch: int,
                      context: float) -> dict:
    """Fewest bytes one device reads per decode step at ``context`` valid positions (shards of
    the sharded ``params``/``adapter``, arrays or ShapeDtypeStructs; even splits, so every device
    reads the same).

    Its shard of every layer weight, the final norm and the output projection (the whole
    embedding when tied); ``batch`` rows of the replicated embedding; its KV shard (KV heads over
    ``tensor``, rows over the batch axes when they divide); its shard of the experts a step is
    expected to touch (:func:`.adapter_measure.expected_experts`) and of the router(s).
    """
    tied = params.lm_head is None
    head = params.embed if tied else params.lm_head
    weights = sum(_local_nbytes(x) for x in jax.tree.leaves(params.layers))
    weights += _local_nbytes(params.final_norm) + _local_nbytes(head)
    vocab, d = params.embed.shape
    embed_rows = 0 if tied else min(batch, vocab) * d * params.embed.dtype.itemsize
    kv_heads = params.layers.wk.shape[-1] // cfg.head_dim  # expanded for tensor
    shape = (cfg.num_hidden_layers, batch, 1, kv_heads, cfg.head_dim)
    local = NamedSharding(mesh.make_mesh(), logical_spec("cache.k", shape, mesh)).shard_shape(shape)
    kv = 2 * math.prod(local) * context * params.embed.dtype.itemsize
    out = {"weights": weights, "embed_rows": embed_rows, "kv": int(kv)}
    if adapter is not None:
        acfg = adapter.config
        touched = 1.0 if acfg.mode == "lora" else expected_experts(acfg.num_experts, acfg.top_k,
                                                                   batch)
        expert = sum(_local_nbytes(adapter.a[p]) + _local_nbytes(adapter.b[p])
                     for p in acfg.targets) / acfg.num_experts
        router = 0 if adapter.router is None else _local_nbytes(adapter.router)
        out |= {"experts_touched": touched, "adapters": int(round(expert * touched)) + router}
    out["total"] = int(weights + embed_rows + kv + out.get("adapters", 0))
    return out


# -------------------------------------------------------------------------------- profile
def _device_groups(events: list[dict], allow_host: bool, devices: int) -> list[dict]:
    """Kernel groups of each device process that ran kernels; a CPU trace (host threads only,
    all devices in one) is split evenly over the mesh's ``devices``."""
    pids = sorted({e["pid"] for e in events if e.get("ph") == "M"
                   and e.get("name") == "process_name" and "/device:" in e["args"]["name"]})
    per_device = []
    for pid in pids:
        try:
            groups = kernel_times([e for e in events if e.get("pid") == pid])
        except RuntimeError:  # a device outside the mesh: no stream track
            continue
        if groups:
            per_device.append(groups)
    if per_device or not allow_host:
        return per_device
    whole = kernel_times(events, allow_host=True)
    return [{g: {k: v / devices for k, v in t.items()} for g, t in whole.items()}] * devices


def collective_times(one: list[dict], many: list[dict], steps: int) -> dict:
    """All-reduce and other collective ms per step (mean and max over devices) from the traces'
    per-device kernel groups of the two run lengths."""
    if len(one) != len(many) or not one:
        raise RuntimeError(f"the traces show {len(one)} and {len(many)} devices with kernels")
    ar, launches, other, busy, names = [], [], [], [], set()
    for a, b in zip(one, many):
        # XLA:CPU also logs an "end: <op>" event per async op: the same op again.
        groups = {n: g for n, g in per_step(a, b, steps).items() if not n.startswith("end: ")}
        ar.append(sum(g["us"] for n, g in groups.items() if ALL_REDUCE.search(n)) / 1e3)
        launches.append(sum(g["launches"] for n, g in groups.items() if ALL_REDUCE.search(n)))
        other.append(sum(g["us"] for n, g in groups.items()
                         if COLLECTIVE.search(n) and not ALL_REDUCE.search(n)) / 1e3)
        busy.append(sum(g["us"] for g in groups.values()) / 1e3)
        names |= {n for n in groups if ALL_REDUCE.search(n) or COLLECTIVE.search(n)}
    return {"devices": len(one), "all_reduce_ms": float(np.mean(ar)),
            "all_reduce_ms_max": float(np.max(ar)), "all_reduces": float(np.mean(launches)),
            "other_collectives_ms": float(np.mean(other)),
            "busy_ms": float(np.mean(busy)), "groups": sorted(names)}


# ------------------------------------------------------------------------------- one case
def measure(params, adapter, cfg: LlamaConfig, mesh: MeshConfig, case: Case,
            bc: TensorDecodeConfig, bw: dict, allow_host: bool) -> dict:
    """Time one (mesh, batch, mode); floor, fraction and collectives; returns the row's fields."""
    mode = MODES[case.mode]
    n1, n2 = bc.new_tokens
    rng = np.random.default_rng(bc.seed + case.batch)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (case.batch, bc.context), np.int32))
    lengths = jnp.full((case.batch,), bc.context, jnp.int32)
    args = (params, adapter, tokens, lengths, jax.random.key(bc.seed))
    strategy = {} if mode.strategy is None else {"switch_strategy": mode.strategy}
    # Sampled (seeded), as the adapter benchmark does: switch routes change almost every step.
    gen = GenerateConfig(max_new_tokens=n2, sampler=Sampler(temperature=1.0), stop_tokens=(),
                         cache_len=bc.cache_len, impl=mode.impl if bc.impl == "mode" else "xla",
                         mesh=mesh, **strategy)
    t0 = time.perf_counter()
    run = generate_batch.lower(*args, jnp.int32(n2), cfg=cfg, gen=gen, cache_len=bc.cache_len,
                               stream=None).compile()
    compile_s = time.perf_counter() - t0
    log(f"  compiled in {compile_s:.1f}s")
    if (np.asarray(run(*args, jnp.int32(n2))) < 0).any():  # warm-up; PAD: fewer steps than timed
        raise RuntimeError("generate stopped early; the step count would be wrong")
    times = {n1: [], n2: []}
    for _ in range(bc.reps):  # interleaved, so a drift in clocks hits both alike
        for n in (n1, n2):
            times[n] += time_calls(lambda n=n: run(*args, jnp.int32(n)), 1, warmup=0)
    ms = (median_ms(times[n2]) - median_ms(times[n1])) / (n2 - n1)
    # The runs differ in the steps at cache lengths C+N1-1 .. C+N2-2 (+1 slot read).
    nbytes = device_step_bytes(params, adapter, cfg, mesh, case.batch,
                               bc.context + (n1 + n2 - 1) / 2)
    floor_ms = 1e3 * nbytes["total"] / (bw["copy_gbps"] * 1e9)
    row = {"status": "ok", "impl": gen.impl, "compile_s": compile_s, "ms_per_token": ms,
           "tokens_per_s": 1e3 * case.batch / ms if ms > 0 else None,
           "run_ms": {n: [1e3 * t for t in ts] for n, ts in times.items()},
           "bytes_per_device": nbytes, "floor_ms": floor_ms,
           "fraction": floor_ms / ms if ms > 0 else None}
    if bc.profile_steps:  # traced runs short of N2: a trace of every kernel of 8 GPUs is large
        lens = (n1, min(n2, n1 + bc.profile_steps))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                traced = [_device_groups(trace_events(lambda n=n: run(*args, jnp.int32(n)),
                                                      os.path.join(tmp, str(n)))[0],
                                         allow_host, mesh.size) for n in lens]
            row["collectives"] = collective_times(*traced, lens[1] - lens[0])
        except Exception as e:  # noqa: BLE001 - a failed trace must not lose the timings
            traceback.print_exc()
            row["collectives_error"] = failure(e)
    return row


# ------------------------------------------------------------------------------------- main
def _mesh_problem(mesh: MeshConfig, cfg: LlamaConfig) -> str | None:
    """Why ``mesh`` cannot run here (too few devices, heads or FFN that do not split), or None."""
    if mesh.size > jax.device_count():
        return (f"mesh {mesh_label(mesh)} needs {mesh.size} devices, {jax.device_count()} "
                f"visible ({jax.devices()[0].platform})")
    try:
        check_tensor_fits(cfg, mesh)
    except MeshError as e:
        return str(e)
    return None


def _estimate_s(done: list[dict], mesh: str, batch: int) -> float:
    """Seconds the next case may take: the slowest finished one of the same mesh and batch, else
    of the same batch, else any, times 1.5 at a larger batch (its prefills take longer)."""
    for same in (lambda r: (r["mesh"], r["batch"]) == (mesh, batch),
                 lambda r: r["batch"] == batch, lambda r: True):
        walls = [(r["wall_s"], r["batch"]) for r in done if "wall_s" in r and same(r)]
        if walls:
            return max(walls)[0] * (1.5 if batch > max(b for _, b in walls) else 1.0)
    return 0.0


def _run_case(models: dict, report: dict, cfg, mesh: MeshConfig, case: Case,
              bc: TensorDecodeConfig, key) -> dict:
    """The weights of ``mesh`` (made at its first case, then kept: every mesh's stay resident,
    so the run order can follow priority) and the mode's adapter, then :func:`measure`."""
    label = mesh_label(mesh)
    if label not in models:
        t0 = time.perf_counter()
        params = jax.block_until_ready(sharded_params(cfg, mesh, jax.random.fold_in(key, 1)))
        models[label] = (params, {})
        size = sum(_local_nbytes(x) for x in jax.tree.leaves(params))
        report["meshes"][label] = {"build_s": time.perf_counter() - t0,
                                   "param_bytes_per_device": size}
        log(f"  weights on {label}: {size / 1e9:.3g} GB per device in "
            f"{time.perf_counter() - t0:.1f}s")
    params, adapters = models[label]
    if case.mode not in adapters:
        adapters[case.mode] = sharded_adapter(cfg, case, mesh, jax.random.fold_in(key, 2))
    return measure(params, adapters[case.mode], cfg, mesh, case, bc, report["bandwidth"],
                   allow_host=report["environment"]["platform"] == "cpu")


def main(bc: TensorDecodeConfig, cpu: bool = False) -> dict:
    """Run every case of ``bc`` in order within the budget; write after each; return the report.
    ``cpu``: the CPU backend, with 8 host devices unless XLA_FLAGS sets the count."""
    reserve_device_memory()
    if cpu:  # before any backend starts
        jax.config.update("jax_platforms", "cpu")
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", 8)
    start = time.perf_counter()
    env = environment()
    if bc.impl == "mode" and env["platform"] == "cpu":
        raise ValueError("the Pallas modes need a GPU; pass --impl xla (or --cpu) for a CPU run")
    cases = bc.cases()
    log(f"{env['device_kind']} x {env['device_count']}, JAX {env['jax']}; {len(cases)} cases; "
        f"{bc}")
    cfg = model_config(bc.preset, bc.cache_len)
    key = jax.random.key(bc.seed)
    bw = best_bandwidth(bc.copy_gib, bc.copy_reps, key, env["platform"])  # one device
    report = {"args": dataclasses.asdict(bc), "environment": env, "cache_len": bc.cache_len,
              "bandwidth": bw, "meshes": {}, "results": [], "acceptance": [], "wall_s": 0.0}
    models: dict = {}
    for i, (text, batch, mode) in enumerate(cases):
        mesh = MeshConfig.parse(text)
        case = Case(bc.preset, mode, batch, bc.context)
        row = {"mesh": mesh_label(mesh), "tensor": mesh.tensor, "devices": mesh.size,
               "batch": batch, "mode": mode, "strategy": MODES[mode].strategy}
        left = bc.budget_s - (time.perf_counter() - start)
        estimate = _estimate_s(report["results"], row["mesh"], batch)
        why = _mesh_problem(mesh, cfg) or (None if case.fits() else
                                           f"{mode} runs at batch <= {MODES[mode].max_batch}")
        if not why and left < estimate:
            why = f"budget: {left:.0f}s left, ~{estimate:.0f}s needed"
        if why:
            row |= {"status": "skipped", "error": why}
            log(f"  {mode}, batch {batch}, {row['mesh']}: skipped: {why}")
        else:
            log(f"[{i + 1}/{len(cases)}] {mode}, batch {batch}, {row['mesh']}, {left:.0f}s left")
            t0 = time.perf_counter()
            try:
                row |= _run_case(models, report, cfg, mesh, case, bc, key)
                ar = (row.get("collectives") or {}).get("all_reduce_ms")
                log(f"  {row['ms_per_token']:.3f} ms/token, {row['fraction'] or 0:.2f} of the "
                    f"per-GPU floor, all-reduce {'-' if ar is None else f'{ar:.3f}'} ms/step")
            except Exception as e:  # noqa: BLE001 - record the failure, measure the rest
                traceback.print_exc()
                row |= {"status": "oom" if is_oom(e) else "error", "error": failure(e)}
            row["wall_s"] = time.perf_counter() - t0
            gc.collect()  # this case's cache and program go before the next allocates
        report["results"].append(row)
        report["wall_s"] = time.perf_counter() - start
        write_outputs(report, bc.stem())
    models.clear()
    table = write_outputs(report, bc.stem())
    log(f"wrote {bc.stem()}.json, .md, .png")
    print(table, flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> tuple[TensorDecodeConfig, bool]:
    """The config and ``--cpu``. ``--small`` fills what is not given from :data:`SMALL`."""
    d = TensorDecodeConfig()
    p = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.bench.tensor_decode",
                                description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--preset", choices=sorted(PRESETS), help=f"model shapes ({d.preset})")
    add("--mesh", nargs="+", help=f"meshes ({' '.join(d.meshes)})")
    add("--batch", type=int, nargs="+", help=f"batch sizes ({' '.join(map(str, d.batches))})")
    add("--mode", nargs="+", choices=sorted(MODES), help=f"modes ({' '.join(d.modes)})")
    add("--context", type=int, help=f"prompt tokens per sequence ({d.context})")
    add("--new-tokens", type=int, nargs=2, metavar=("N1", "N2"),
        help=f"run lengths: one step = time difference / (N2 - N1) ({d.new_tokens})")
    add("--reps", type=int, help=f"timed runs of each length ({d.reps})")
    add("--impl", choices=("mode", "xla"), help="each mode's kernels (default) or all XLA "
                                                "(--cpu's default)")
    add("--profile-steps", type=int, help=f"decode steps the all-reduce traces differ by; 0: no "
                                          f"traces ({d.profile_steps})")
    add("--budget-s", type=float, help=f"start no case that would end after this ({d.budget_s})")
    add("--copy-gib", type=float, help="GiB copied (2 on a GPU, 1/16 on a CPU)")
    add("--copy-reps", type=int, help=f"bandwidth repeats ({d.copy_reps})")
    add("--seed", type=int)
    add("--out", help=f"output folder ({d.out})")
    add("--name", help="report file stem (default: preset, context, meshes, batches)")
    add("--small", action="store_true", help="demo shapes, context 64, tensor=2 and tensor=4, "
                                             "batch 1 2, N 1/9 (explicit flags win)")
    add("--cpu", action="store_true", help="the CPU backend; 8 host devices unless XLA_FLAGS "
                                           "sets the count")
    a = vars(p.parse_args(argv))
    renamed = {"mesh": "meshes", "batch": "batches", "mode": "modes"}
    given = {renamed.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in a.items()
             if v is not None and k not in ("small", "cpu")}
    fields = (SMALL if a["small"] else {}) | given
    fields.setdefault("impl", "xla" if a["cpu"] else "mode")
    return TensorDecodeConfig(**fields), a["cpu"]


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
