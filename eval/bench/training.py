"""Adapter training on one GPU: tokens/s, model FLOPs utilisation, peak memory, largest batch.

Llama-3-8B shapes, random bf16 weights made on the device, sequence 2048. A run is
``ADAPTER:REMAT:BATCH[:ATTENTION]``: ``switch`` (E 8, r 16, k 2), ``layerwise`` (the same budget
per layer) or ``lora`` (r 16), as :mod:`.adapter_cases` sets them; remat ``none``/``dots``/``full``
(``TrainConfig.remat``); batch N or ``max``; attention ``xla`` (blockwise) or ``cudnn``. The
cross-entropy runs in chunks of ``--loss-chunk`` tokens (``TrainConfig.loss_chunk``; ``none``:
whole logits).
``mixlora:none|full:N|max`` is the PyTorch peer (:mod:`.training_peers`).

Each run is the product's jitted ``train.step.train_step`` (AdamW on the adapter, the backbone
frozen) in a fresh subprocess: ``peak_bytes_in_use`` is its own, an OOM or a crash is a row.
tokens/s: ``B * T`` over the median synchronised step after warmup. Model FLOPs per step (the
frozen backbone's backward computes input gradients only; remat's recomputation not counted)::

    N_mm = L (d (q + 2 kv) + q d + 3 d f) + d V   matmul weights (layers and lm_head)
    F    = 4 N_mm B T       forward 2 N_mm B T + input gradients 2 N_mm B T
         + 6 L q B T^2      causal attention: forward 2 T^2 q, backward 4 T^2 q (per layer, row)
         + 6 N_a B T        adapter weights a token uses (k experts, routers): forward, 2 grads
    MFU  = F / step_s / peak;  "PaLM convention": 6 N B T / step_s / peak, N = all weights

``peak``: the H200's dense bf16 spec, 989 TFLOP/s (``--peak-tflops``). The product's training path
runs mixtures densely (all ``E`` experts, ``lora_method``): ``E / k`` times the adapter FLOPs here.

``max``: the compiled step's memory (``memory_analysis``) at batch 1 and 2, linear in the batch,
predicts the largest ``B`` under the device's ``bytes_limit``; one compile and run confirms it.
``--budget-s`` skips what would not finish in time; the report is rewritten after every run::

    python -m loraswitch_jax.eval.bench.training     # DEFAULT_RUNS within --budget-s 450
    python -m loraswitch_jax.eval.bench.training --runs switch:dots:1:cudnn mixlora:none:1
    python -m loraswitch_jax.eval.bench.training --small --cpu --bytes-limit 3e8  # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax  # imported, never initialised here: the parent leaves the GPU to its workers
import jax.numpy as jnp

from loraswitch_jax import planner
from loraswitch_jax.adapters import AdapterConfig, init_adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.eval.bench.adapter_cases import ALPHA, BASE_EXPERTS, BASE_TOP_K, RANK
from loraswitch_jax.eval.bench.harness import (
    environment, failure, is_oom, log, peak_memory, reserve_device_memory, spawn_worker,
    write_report)
from loraswitch_jax.eval.bench.step_profile import profile_step, stepper
from loraswitch_jax.eval.bench.training_peers import mixlora_active_params, peer_batch, work_mixlora
from loraswitch_jax.eval.bench.training_report import markdown, plot
from loraswitch_jax.params import init_params, projection_shape
from loraswitch_jax.train import step

__all__ = ["DEFAULT_RUNS", "H200_BF16_TFLOPS", "LLAMA3_8B", "BenchConfig", "Run",
           "add_step_arguments", "main", "model_config", "parse_args", "predict_batch",
           "random_batch", "random_params", "step_flops", "step_kwargs", "timed_row", "work"]

H200_BF16_TFLOPS = 989.0  # NVIDIA H200 SXM spec, dense bf16 (no sparsity)
# Llama-3-8B shapes; PRESETS["llama3-8b"] is used when the package has it.
LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=(128001,),
)
ADAPTERS = ("switch", "layerwise", "lora", "mixlora")
REMATS = ("none", "dots", "full")
ATTENTIONS = ("xla", "cudnn")
DEFAULT_RUNS = ("switch:none:1", "switch:dots:1", "switch:full:1", "lora:dots:1",
                "layerwise:dots:1", "switch:dots:max", "switch:full:max")


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration: adapter, remat policy, batch (``0``: the largest that fits)."""

    adapter: str
    remat: str
    batch: int
    attention: str = "xla"

    def __post_init__(self):
        peer = self.adapter == "mixlora"  # its remat: Hugging Face checkpointing, off or on
        for field, value, allowed in (("adapter", self.adapter, ADAPTERS),
                                      ("remat", self.remat, ("none", "full") if peer else REMATS),
                                      ("attention", self.attention, ATTENTIONS[:2 - peer])):
            if value not in allowed:
                raise ValueError(f"run {field} {value!r} is not one of {allowed} ({self.adapter})")
        if not isinstance(self.batch, int) or self.batch < 0:
            raise ValueError(f"run batch must be an integer >= 1 or 'max', got {self.batch!r}")

    @classmethod
    def parse(cls, text: str) -> Run:
        parts = text.split(":")
        b = parts[2] if len(parts) in (3, 4) else ""
        if not (b == "max" or b.isdigit() and int(b)):
            raise ValueError(f"a run is ADAPTER:REMAT:BATCH[:ATTENTION] (BATCH >= 1 or max), got "
                             f"{text!r}")
        return cls(parts[0], parts[1], 0 if b == "max" else int(b), *parts[3:])

    @property
    def name(self) -> str:
        return f"{self.adapter}:{self.remat}:{self.batch or 'max'}:{self.attention}"

    def adapter_config(self) -> AdapterConfig:
        """Equal budgets as the adapter benchmark: rank 16, alpha 32; E 8, k 2 for mixtures."""
        if self.adapter == "lora":
            return AdapterConfig.lora(rank=RANK, alpha=ALPHA)
        return AdapterConfig(mode=self.adapter, rank=RANK, alpha=ALPHA, num_experts=BASE_EXPERTS,
                             top_k=BASE_TOP_K)  # mixlora: not an AdapterConfig mode, refused


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run. ``bytes_limit``: the memory the largest batch must fit (None: the device's);
    ``ours``: an earlier report whose confirmed largest batch a ``mixlora:...:max`` run uses."""

    runs: tuple[Run, ...] = tuple(Run.parse(r) for r in DEFAULT_RUNS)
    preset: str = "llama3-8b"
    seq: int = 2048
    steps: int = 5
    warmup: int = 1
    budget_s: float = 450.0
    attention_chunk: int = 512
    loss_chunk: int | None = None  # TrainConfig's default (whole logits); N: chunks of N tokens
    peak_tflops: float = H200_BF16_TFLOPS
    bytes_limit: int | None = None
    max_batch: int = 256
    cpu: bool = False
    ours: str | None = None
    plan: bool = False
    profile: bool = False
    seed: int = 0
    out: str = "eval/results/training"

    def __post_init__(self):
        if self.preset not in PRESETS and self.preset != "llama3-8b":
            raise ValueError(f"unknown preset {self.preset!r}; choose from "
                             f"{sorted(set(PRESETS) | {'llama3-8b'})}")
        checks = {"runs": bool(self.runs), "warmup": self.warmup >= 0,
                  "budget_s": self.budget_s > 0, "peak_tflops": self.peak_tflops > 0,
                  "bytes_limit": self.bytes_limit is None or self.bytes_limit >= 1,
                  "loss_chunk": self.loss_chunk is None or self.loss_chunk >= 1,
                  **{k: getattr(self, k) >= 1 for k in ("seq", "steps", "attention_chunk",
                                                         "max_batch")}}
        for name in (k for k, ok in checks.items() if not ok):
            raise ValueError(f"{name} {getattr(self, name)!r} is out of range (need runs; seq, "
                             "steps, attention_chunk, max_batch >= 1; warmup >= 0; budget_s, "
                             "peak_tflops, bytes_limit > 0)")
        if self.ours is not None and not os.path.isfile(self.ours):
            raise ValueError(f"--ours {self.ours!r} is not a file")
        if self.seq > model_config(self.preset).max_position_embeddings:
            raise ValueError(f"seq {self.seq} is more than {self.preset}'s positions")

    @property
    def stem(self) -> str:
        return os.path.join(self.out, f"{self.preset}_seq{self.seq}")


def model_config(preset: str) -> LlamaConfig:
    return PRESETS.get(preset) or LLAMA3_8B


# ------------------------------------------------------------------------------------ arithmetic
def step_flops(cfg: LlamaConfig, run: Run, batch: int, seq: int) -> dict:
    """Model FLOPs of one step of ``batch`` rows of ``seq`` tokens (the module docstring's).
    ``N_a``: ``k`` experts of rank ``r`` on each target projection, and the routers."""
    d, q, kv, f, L = (cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size,
                      cfg.num_hidden_layers)
    n_mm = L * (d * (q + 2 * kv) + q * d + 3 * d * f) + d * cfg.vocab_size
    if run.adapter == "mixlora":
        n_a = mixlora_active_params(cfg)
    else:
        a = run.adapter_config()
        La, routers = a.num_adapted_layers(cfg), {"lora": 0, "switch": 1}.get(a.mode)
        n_a = (La * a.top_k * sum(a.rank * sum(projection_shape(cfg, p)) for p in a.targets)
               + (La if routers is None else routers) * d * a.num_experts)
    tokens = batch * seq
    base, attention, adapter = 4 * n_mm * tokens, 6 * L * q * batch * seq ** 2, 6 * n_a * tokens
    return {"n_matmul": n_mm, "n_adapter_active": n_a, "n_params": cfg.num_params(),
            "base": base, "attention": attention, "adapter": adapter,
            "model": base + attention + adapter, "palm_6nt": 6 * cfg.num_params() * tokens}


def predict_batch(m1: int, m2: int, limit: int, cap: int) -> dict:
    """Largest ``B <= cap`` with ``m1 + (B - 1) (m2 - m1) <= limit`` (bytes at batch 1, 2)."""
    slope = m2 - m1
    if slope <= 0:
        return {"bytes_b1": m1, "bytes_b2": m2, "error": "memory does not grow with the batch"}
    fits = math.floor((limit - m1) / slope) + 1
    return {"bytes_b1": m1, "bytes_b2": m2, "bytes_per_row": slope, "bytes_limit": limit,
            "fits": fits, "batch": max(0, min(fits, cap)), "capped": fits > cap}


# ------------------------------------------------------------------------------------ worker
def random_params(cfg: LlamaConfig, key, shardings=None):
    """Random bf16 weights (std 0.02, unit norms; leaf ``i`` drawn from ``fold_in(key, i)``).

    One device (``shardings`` None): made on the device one array at a time, so that building
    them never holds a float32 copy beside them (the run's peak stays its own). With
    ``shardings`` (a :class:`LlamaParams` of them): one jitted draw whose ``out_shardings`` they
    are, so each device computes only its own shards (FSDP never builds the whole model on one
    device); threefry is partitionable, so the values do not depend on the sharding.
    """
    shapes = jax.eval_shape(functools.partial(init_params, cfg, dtype=jnp.bfloat16), key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    def draw(key, i, path, s):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(s.shape, s.dtype)
        return 0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.bfloat16)

    if shardings is not None:
        def draw_all(key):
            return jax.tree_util.tree_unflatten(
                treedef, [draw(key, i, path, s) for i, (path, s) in enumerate(leaves)])

        return jax.block_until_ready(jax.jit(draw_all, out_shardings=shardings)(key))
    one = jax.jit(draw, static_argnums=(1, 2, 3))
    out = [one(key, i, path, s) for i, (path, s) in enumerate(leaves)]
    return jax.block_until_ready(jax.tree_util.tree_unflatten(treedef, out))


def random_batch(cfg: LlamaConfig, batch: int, seq: int, key) -> dict:
    """A ``[1, B, T]`` batch of random tokens, one sequence a row: no ``segment_ids`` (the cudnn
    path refuses them; the blockwise path costs the same either way)."""
    shape = (1, batch, seq)
    tokens = jax.random.randint(key, (1, batch, seq + 1), 0, cfg.vocab_size, jnp.int32)
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
            "loss_mask": jnp.ones(shape, jnp.float32), "segment_ids": None,
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), shape)}


def _analysis(compiled) -> dict | None:
    """The compiled step's memory fields; ``total``: arguments + outputs - donated (aliased) +
    temporaries, the bytes the step needs (XLA's own ``peak_memory_in_bytes`` is kept beside)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    d = {k: int(getattr(ma, k)) for k in dir(ma) if k.endswith("_in_bytes")}
    d["total"] = (d["argument_size_in_bytes"] + d["output_size_in_bytes"]
                  - d["alias_size_in_bytes"] + d["temp_size_in_bytes"])
    return d


def _work_jax(job: dict, row: dict) -> None:
    """One run of the product's train step; fills ``row`` as it goes (a failure keeps the rest)."""
    reserve_device_memory()
    bench, run = job["bench"], Run(**job["run"])
    cfg, seq, cap = model_config(bench["preset"]), bench["seq"], bench["max_batch"]
    row["environment"] = environment()
    oc = step.OptimConfig(lr=1e-4, warmup_steps=0, steps=10_000)
    kwargs = dict(cfg=cfg, oc=oc, remat=run.remat, attention_chunk=bench["attention_chunk"],
                  attention_impl=run.attention, loss_chunk=bench["loss_chunk"])
    key = jax.random.key(bench["seed"])
    t0 = time.perf_counter()
    params = random_params(cfg, key)
    make_adapter = jax.jit(functools.partial(init_adapter, cfg, run.adapter_config()))
    # init_state copies the adapter; the original is freed here, not held through the steps.
    state = step.init_state(make_adapter(jax.random.fold_in(key, 1)), oc, bench["seed"])
    limit = bench["bytes_limit"] or (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    row |= {"build_s": time.perf_counter() - t0, "bytes_limit": limit,
            "peak_bytes_after_build": peak_memory()}

    def compile_at(b: int):
        shapes = jax.eval_shape(functools.partial(random_batch, cfg, b, seq), key)  # nothing allocated
        return step.train_step.lower(state, params, shapes, **kwargs).compile()

    def predict(m1: int) -> dict:
        if not limit:
            return {"error": "no device memory limit here (CPU): pass --bytes-limit"}
        return predict_batch(m1, _analysis(compile_at(2))["total"], limit, cap)

    batch = job["batch"]
    if batch == 0:  # no batch-1 row of this policy ran: predict here
        row["prediction"] = predict(_analysis(compile_at(1))["total"])
        batch = row["prediction"].get("batch", 0)
        if batch < 1:
            raise RuntimeError(f"no batch to run: {row['prediction']}")
    elif job["prediction"]:
        row["prediction"] = job["prediction"]
    row["batch"] = batch
    log(f"{run.name}: built in {row['build_s']:.1f}s; compiling batch {batch}")
    t0 = time.perf_counter()
    compiled = compile_at(batch)
    row |= {"compile_s": time.perf_counter() - t0, "memory_analysis": _analysis(compiled)}
    log(f"{run.name}: compiled in {row['compile_s']:.0f}s")
    data = random_batch(cfg, batch, seq, jax.random.fold_in(key, 2))
    times = []
    for i in range(bench["warmup"] + bench["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, params, data)
        jax.block_until_ready((state, metrics))
        if i >= bench["warmup"]:
            times.append(time.perf_counter() - t0)
    row |= timed_row(times, bench, run, batch) | {"loss": float(metrics["loss"]),
                                                  "peak_bytes": peak_memory()}
    if run.batch == 0:
        row["confirmed_batch"] = batch
    if job["predict"] and row["memory_analysis"]:  # after the peak: compiling may take scratch
        log(f"{run.name}: compiling batch 2 for the memory prediction")
        try:
            row["prediction"] = predict(row["memory_analysis"]["total"])
        except Exception as e:  # noqa: BLE001 - the measured step stands without it
            row["prediction"] = {"error": failure(e)}
    if bench["profile"]:
        log(f"{run.name}: tracing one step")
        row["profile"] = profile_step(stepper(compiled, state, params, data),
                                      allow_host=bench["cpu"])
    if bench["plan"]:  # last: its compile must not count in the run's peak
        row["plan"] = _plan(cfg, bench, run, batch)


def _plan(cfg: LlamaConfig, bench: dict, run: Run, batch: int) -> dict:
    """The planner's figures for this run's step, compiled on this device."""
    acfg = run.adapter_config()
    log(f"{run.name}: planning batch {batch}")
    p = planner.plan(cfg, batch=batch, train=True, seq_len=bench["seq"], remat=run.remat,
                     adapter=run.adapter, experts=acfg.num_experts, rank=acfg.rank,
                     top_k=acfg.top_k, attention_chunk=bench["attention_chunk"],
                     attention_impl=run.attention, loss_chunk=bench["loss_chunk"])
    return {k: v for k, v in dataclasses.asdict(p).items() if isinstance(v, (int, float))}


def timed_row(times: list[float], bench: dict, run: Run, batch: int) -> dict:
    """A run's row from its step times: median step, tokens/s, FLOPs and both MFUs."""
    cfg, seq, peak = model_config(bench["preset"]), bench["seq"], bench["peak_tflops"] * 1e12
    step_s, flops = statistics.median(times), step_flops(cfg, run, batch, seq)
    return {"status": "ok", "step_s": step_s, "step_s_all": times,
            "tokens_per_s": batch * seq / step_s, "flops": flops,
            "mfu": flops["model"] / step_s / peak, "mfu_palm": flops["palm_6nt"] / step_s / peak}


def work(job: dict, result_path: str) -> None:
    """A worker process: one run, its row written to ``result_path`` whatever happens."""
    row: dict = {}
    try:
        if job["run"]["adapter"] == "mixlora":
            work_mixlora(job, row)
        else:
            _work_jax(job, row)
    except Exception as e:  # noqa: BLE001 - the row records it; the parent runs the next one
        traceback.print_exc()
        row |= {"status": "oom" if is_oom(e) else "error", "error": failure(e)}
        if job["run"]["batch"] == 0 and row.get("batch"):
            row["confirmed_batch"] = None
    with open(result_path, "w") as f:
        json.dump(row, f)


# ------------------------------------------------------------------------------------ parent
def _spawn(job: dict, timeout: float, cpu: bool) -> dict:
    """Run one job in a fresh Python (its log goes to ours); no result file is a crash."""
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ}  # harness.reserve_device_memory
    env |= {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""} if cpu else {}
    return spawn_worker("loraswitch_jax.eval.bench.training", job, timeout, env)


def _resolve_max(run: Run, rows: list[dict], bc: BenchConfig) -> tuple[int, dict | None, str]:
    """The batch of a ``max`` run: our prediction from this run's batch-1 row (``0``: the worker
    predicts it), or for mixlora our confirmed largest batch (same remat first)."""
    if run.adapter != "mixlora":
        same = [r["prediction"] for r in rows if r["run"] == {**dataclasses.asdict(run), "batch": 1}
                and r.get("prediction", {}).get("batch")]
        return (same[0]["batch"], same[0], "") if same else (0, None, "")
    return peer_batch(run, rows, bc.ours)


def main(bc: BenchConfig) -> dict:
    """Run ``bc.runs`` in order, each in a fresh process, within ``budget_s``; write after each."""
    start = time.perf_counter()
    report = {"args": {**dataclasses.asdict(bc), "runs": [r.name for r in bc.runs]},
              "environment": None, "model": dataclasses.asdict(model_config(bc.preset)),
              "flops_formula": __doc__.split("::")[1].split("``peak``")[0].strip("\n"),
              "peak_tflops": bc.peak_tflops, "results": [], "wall_s": 0.0}
    need_predict = {(r.adapter, r.remat, r.attention) for r in bc.runs if r.batch == 0}
    log(f"{len(bc.runs)} runs, budget {bc.budget_s:.0f}s: {', '.join(r.name for r in bc.runs)}")
    for i, run in enumerate(bc.runs):
        left = bc.budget_s - (time.perf_counter() - start)
        estimate = max((r["wall_s"] for r in report["results"] if r.get("wall_s")), default=0.0)
        row = {"run": dataclasses.asdict(run), "name": run.name}
        batch, prediction, why = (run.batch, None, "") if run.batch else _resolve_max(
            run, report["results"], bc)
        if left < max(estimate, 1.0):
            row |= {"status": "skipped",
                    "error": f"budget: {left:.0f}s left, ~{estimate:.0f}s needed"}
        elif why:
            row |= {"status": "skipped", "error": why}
        else:
            log(f"[{i + 1}/{len(bc.runs)}] {run.name}, batch {batch or 'to predict'}, "
                f"{left:.0f}s left")
            t0 = time.perf_counter()
            predict = run.batch == 1 and (run.adapter, run.remat, run.attention) in need_predict
            job = {"bench": {**dataclasses.asdict(bc), "runs": []}, "run": row["run"],
                   "batch": batch, "predict": predict, "prediction": prediction}
            row |= _spawn(job, left, bc.cpu)
            row["wall_s"] = time.perf_counter() - t0
        env = row.pop("environment", None)
        if run.adapter == "mixlora":
            row["peer_environment"] = env
        else:
            report["environment"] = report["environment"] or env
        report["results"].append(row)
        log(f"{run.name}: {row.get('status')} {row.get('error', '')}")
        report["wall_s"] = time.perf_counter() - start
        write_report(report, bc.stem, markdown, plot)
    table = write_report(report, bc.stem, markdown, plot)
    log(f"wrote {bc.stem}.json, .md, .png")
    print(table, flush=True)
    return report


# ------------------------------------------------------------------------------------ command
def add_step_arguments(p: argparse.ArgumentParser, d, unit: str) -> None:
    """The arguments that this benchmark and :mod:`.training_scaling` share (``d``: the
    config's defaults; ``unit``: what ``--budget-s`` skips)."""
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--seq", type=int, default=d.seq)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument("--budget-s", type=float, default=d.budget_s,
                   help=f"skip the {unit} that would not finish within this many seconds")
    p.add_argument("--attention-chunk", type=int, default=d.attention_chunk)
    p.add_argument("--loss-chunk", type=lambda v: None if v == "none" else int(v),
                   default=d.loss_chunk, help="tokens per cross-entropy chunk; none: whole logits")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="per device")
    p.add_argument("--small", action="store_true", help="demo model, seq 64, attention chunk 16")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one job (JSON), in a subprocess
    p.add_argument("--result", help=argparse.SUPPRESS)


def step_kwargs(a: argparse.Namespace) -> dict:
    """The config fields :func:`add_step_arguments` parsed (``--small``: the demo model)."""
    small = dict(preset="demo", seq=64, attention_chunk=16) if a.small else {}
    return dict(preset=a.preset, seq=a.seq, attention_chunk=a.attention_chunk,
                loss_chunk=a.loss_chunk, steps=a.steps, warmup=a.warmup, budget_s=a.budget_s,
                peak_tflops=a.peak_tflops, seed=a.seed, out=a.out) | small


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.bench.training",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                   help="ADAPTER:REMAT:BATCH[:ATTENTION]; adapter switch|layerwise|lora|mixlora, "
                        "remat none|dots|full, batch N|max, attention xla|cudnn")
    add_step_arguments(p, d, "runs")
    p.add_argument("--bytes-limit", type=float, default=None,
                   help="bytes the largest batch must fit (default: the device's bytes_limit)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="cap on a predicted batch")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (JAX_PLATFORMS=cpu)")
    p.add_argument("--ours", default=None, help="a report whose largest batch mixlora:..:max uses")
    p.add_argument("--plan", action="store_true",
                   help="also compile each run's step with the planner (loraswitch plan) and "
                        "report its memory figure beside the measured peak")
    p.add_argument("--profile", action="store_true",
                   help="also trace one step per run: device time by kernel kind and group")
    a = p.parse_args(argv)
    if a.worker:
        return a
    try:
        return BenchConfig(runs=tuple(Run.parse(r) for r in a.runs), max_batch=a.max_batch,
                           cpu=a.cpu, ours=a.ours, plan=a.plan, profile=a.profile,
                           bytes_limit=None if a.bytes_limit is None else int(a.bytes_limit),
                           **step_kwargs(a))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if isinstance(args, BenchConfig):
        main(args)
    else:
        work(json.loads(args.worker), args.result)
