"""Decode latency of the backbone against the copy-bandwidth floor (DESIGN.md §2, §5).

For each batch size, on one model with random bf16 weights made on the device:

* **generate loop**: the jitted ``generate_batch`` (prefill + device-side ``while_loop``) run with
  ``N1`` and ``N2`` new tokens on the same cache length; ``(median(N2) - median(N1)) / (N2 - N1)``
  is the time of one decode step, prefill cancelling out.
* **decode_step loop**: ``decode_step`` + greedy argmax jitted with the cache donated, called from a
  Python loop; timed per step with a sync (dispatch + launch latency visible) and pipelined
  (``steps`` calls, one sync at the end).
* **floor**: the bytes one step must read (weights except the embedding table, ``B`` embedding
  rows, ``lm_head``, the valid keys/values) over the measured device copy bandwidth.
* **launches**: kernel-launching instructions per step, from the compiled HLO.

Writes JSON, a Markdown table and a plot to ``--out``; prints the table last. Examples::

    python -m loraswitch_jax.eval.bench_decode                       # 7B, batch 1 (< 3 min, H100)
    python -m loraswitch_jax.eval.bench_decode --all                 # batch 1 8 32 64
    python -m loraswitch_jax.eval.bench_decode --preset demo --context 64 --batch 1 2  # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.generate import GenerateConfig, generate_batch
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.llama import decode_step
from loraswitch_jax.params import LlamaParams, init_params
from loraswitch_jax.sampling import Sampler

__all__ = ["BenchConfig", "count_launches", "decode_bytes", "main", "parse_args"]

ALL_BATCHES = (1, 8, 32, 64)
_T0 = time.perf_counter()


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run. ``copy_gib=None``: 2 GiB on a GPU, 64 MiB on a CPU (dry runs stay quick)."""

    preset: str = "llama2-7b"
    batch: tuple[int, ...] = (1,)
    context: int = 1024
    new_tokens: tuple[int, int] = (32, 160)
    reps: int = 5
    steps: int = 128
    copy_gib: float | None = None
    copy_reps: int = 20
    seed: int = 0
    impl: str = "auto"  # decode kernels: see loraswitch_jax.ops
    out: str = "eval/results/decode"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        n1, n2 = self.new_tokens
        if not 1 <= n1 < n2:
            raise ValueError(f"new_tokens must satisfy 1 <= N1 < N2, got {self.new_tokens}")
        if min(self.batch) < 1 or self.context < 1 or self.reps < 1 or self.steps < 2:
            raise ValueError(f"sizes must be positive (steps >= 2): {self}")

    @property
    def cache_len(self) -> int:
        """One cache length for both generate runs (and the step loop), a multiple of 64."""
        return -(-(self.context + self.new_tokens[1]) // 64) * 64


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _time_calls(fn: Callable[[], jax.Array], reps: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return None if not stats else stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------------- HLO
# Counting kernel launches from compiled HLO (a heuristic, no profiler needed). After XLA's
# passes every instruction left in a scheduled computation runs as its own thunk. Fusions (loop,
# input, Triton/cuBLAS/cuDNN custom fusions), custom-calls (cuBLAS GEMMs), and unfused ops (copy,
# scatter, sort, ...) each launch one kernel; parameter, constant, tuple plumbing and bitcast
# launch nothing; of an async start/done pair only the start counts. ``call`` instructions are
# followed into the called computation: on GPU, XLA outlines runs of kernels into
# ``command_buffer`` computations (CUDA graphs), which still launch each kernel but without a host
# round trip. A cuBLAS call may launch 2 kernels (split-K), so this is a lower bound there.
_NO_LAUNCH = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain",
}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(to_apply|body|condition)=%?([\w.\-]+)")


def _opcode(rest: str) -> str:
    """The opcode after an instruction's result type (which may be a nested tuple)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    m = re.match(r"\s*([\w\-]+)\(", rest)
    return m.group(1) if m else "?"


def _computations(hlo: str) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """``{name: [(opcode, line)]}`` for every computation, and the entry's name."""
    comps, entry, current = {}, "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _INSTR.match(line)):
            comps[current].append((_opcode(m.group(1)), m.group(1)))
    return comps, entry


_FUSION_KIND = re.compile(r"\bkind=(k\w+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KERNEL_NAME = re.compile(r'\\?"name\\?":\s*\\?"([\w.\-]+?)(?:_m\d+_.*)?\\?"')


def _kind(op: str, line: str) -> str:
    """What a launching instruction runs, for the per-kind tally: ``fusion:kLoop``, a custom
    call's target (a Pallas kernel by its name, block sizes dropped), or the opcode (``copy``,
    ``scatter``, ...): enough to see where a step's launches go."""
    if op == "fusion":
        kind = _FUSION_KIND.search(line)
        return f"fusion:{kind.group(1) if kind else '?'}"
    if op == "custom-call":
        target = _TARGET.search(line)
        target = target.group(1) if target else "?"
        if "triton" in target:
            name = _KERNEL_NAME.search(line)
            return f"pallas:{name.group(1)}" if name else "pallas"
        return f"custom-call:{target}"
    return op


def count_launches(hlo: str, computation: str | None = None) -> dict:
    """Kernel launches of one run of ``computation`` (default: the entry) of compiled HLO text.

    Returns ``{"launches", "in_command_buffers", "loops", "kinds"}``; ``loops`` counts ``while`` /
    ``conditional`` instructions; ``kinds`` tallies the launches by :func:`_kind`. A ``while``
    counts as one launch (its body is not expanded); a ``conditional`` as one plus its largest
    branch (e.g. the merge kernels run when a route changes).
    """
    comps, entry = _computations(hlo)
    counts = {"launches": 0, "in_command_buffers": 0, "loops": 0}
    kinds: dict[str, int] = {}

    def walk(name: str, in_buffer: bool) -> None:
        for op, line in comps.get(name, []):
            if op in _NO_LAUNCH or op.endswith("-done") or op.endswith("-update"):
                continue
            if op == "call":
                target = dict(_CALLED.findall(line)).get("to_apply", "")
                walk(target, in_buffer or "command_buffer" in target)
                continue
            counts["loops"] += op in ("while", "conditional")
            counts["launches"] += 1
            counts["in_command_buffers"] += in_buffer
            kind = _kind(op, line)
            kinds[kind] = kinds.get(kind, 0) + 1
            if op == "conditional":
                branches = [count_launches(hlo, b) for b in _branches(line)]
                largest = max(branches, key=lambda c: c["launches"], default=None)
                for key in counts if largest else ():
                    counts[key] += largest[key]
                for kind, n in (largest["kinds"] if largest else {}).items():
                    kinds[kind] = kinds.get(kind, 0) + n

    walk(computation or entry, False)
    return {**counts, "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}


def _branches(line: str) -> list[str]:
    """The branch computations named by a ``conditional`` instruction."""
    listed = re.search(r"branch_computations=\{([^}]*)\}", line)
    if listed:
        return [b.strip().lstrip("%") for b in listed.group(1).split(",") if b.strip()]
    return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)


def count_loop_launches(hlo: str) -> dict:
    """Launches per iteration of the largest ``while`` loop (the decode loop of ``generate_batch``:
    the prefill's layer scan is the other, smaller one); body plus condition."""
    comps, _ = _computations(hlo)
    best = {"launches": 0, "in_command_buffers": 0, "loops": 0, "kinds": {}}
    for ops in comps.values():
        for op, line in ops:
            if op != "while":
                continue
            called = dict(_CALLED.findall(line))
            if "body" not in called:
                continue
            body = count_launches(hlo, called.get("body"))
            cond = count_launches(hlo, called.get("condition"))
            total = {k: body[k] + cond[k] for k in body if k != "kinds"}
            kinds = dict(body["kinds"])
            for kind, n in cond["kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
            total["kinds"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
            if total["launches"] > best["launches"]:
                best = total
    return best


# ---------------------------------------------------------------------------------- bandwidth
@jax.jit
def _copy(x: jax.Array, scale: jax.Array) -> jax.Array:
    # ``x + 0`` or a bare copy may be simplified away; a product by a runtime scalar (1.0) must
    # read and write every element.
    return x * scale.astype(x.dtype)


@jax.jit
def _read(x: jax.Array) -> jax.Array:
    return jnp.sum(x, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnums=(1,))
def _random_bf16(key: jax.Array, n: int) -> jax.Array:
    return jax.random.normal(key, (n,), jnp.bfloat16)


def _pointer(a: jax.Array) -> int | None:
    try:
        return a.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 - a check only; not every backend exposes the pointer
        return None


def measure_bandwidth(gib: float, reps: int, key: jax.Array) -> dict:
    """Device copy bandwidth (bytes read + written) and read-only (reduction) bandwidth, GB/s."""
    n = int(gib * 2**30) // 2
    x = _random_bf16(key, n)
    one = jnp.float32(1.0)
    launches = count_launches(_copy.lower(x, one).compile().as_text())["launches"]
    y = _copy(x, one)
    # The copy really happened: a kernel in the program, a new buffer, the same values.
    same_buffer = _pointer(x) is not None and _pointer(x) == _pointer(y)
    if launches < 1 or same_buffer:
        raise RuntimeError("the copy kernel was elided; the bandwidth would be meaningless")
    if not bool(jnp.array_equal(x, y)):
        raise RuntimeError("the copy kernel produced wrong values")
    del y
    copy_s = _time_calls(lambda: _copy(x, one), reps, warmup=3)
    read_s = _time_calls(lambda: _read(x), reps, warmup=3)
    nbytes = x.nbytes
    del x
    return {
        "array_bytes": nbytes,
        "copy_ms": _median_ms(copy_s),
        "copy_gbps": 2 * nbytes / statistics.median(copy_s) / 1e9,
        "read_ms": _median_ms(read_s),
        "read_gbps": nbytes / statistics.median(read_s) / 1e9,
    }


# ------------------------------------------------------------------------------ model + cache
def build_params(cfg: LlamaConfig, key: jax.Array) -> LlamaParams:
    """Random bf16 weights created on the device (the host never holds them)."""
    return jax.jit(functools.partial(init_params, cfg, dtype=jnp.bfloat16))(key)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_stack(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    # One layer of random values at a time: the temporaries stay one layer big, not a whole cache.
    def fill(i, out):
        return out.at[i].set(jax.random.normal(jax.random.fold_in(key, i), shape[1:], dtype))

    return jax.lax.fori_loop(0, shape[0], fill, jnp.empty(shape, dtype))


def random_cache(cfg: LlamaConfig, batch: int, cache_len: int, context: int, key) -> KVCache:
    """A cache holding ``context`` valid (random, never zero) keys/values per sequence."""
    shape = (cfg.num_hidden_layers, batch, cache_len, cfg.num_key_value_heads, cfg.head_dim)
    k_key, v_key = jax.random.split(key)
    return KVCache(
        k=_random_stack(k_key, shape, jnp.bfloat16),
        v=_random_stack(v_key, shape, jnp.bfloat16),
        lengths=jnp.full((batch,), context, jnp.int32),
    )


# ------------------------------------------------------------------------------------- floor
def _nbytes(tree) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(tree))


def decode_bytes(params: LlamaParams, cfg: LlamaConfig, batch: int, context: float) -> dict:
    """Fewest bytes one decode step reads at ``context`` valid positions per sequence.

    Every layer weight, the final norm and the output projection once; only ``batch`` rows of the
    embedding table (all of it when tied, as the output projection); keys and values of the valid
    context. The step's writes (one new key/value per layer and sequence) are < 0.01 %: left out.
    """
    row = params.embed.nbytes // params.embed.shape[0]
    if params.lm_head is None:
        head = params.embed.nbytes
        embed_rows = 0
    else:
        head = params.lm_head.nbytes
        embed_rows = min(batch, params.embed.shape[0]) * row
    weights = _nbytes(params.layers) + params.final_norm.nbytes + head
    # The cache has the weights' dtype (``generate_batch`` makes it with ``params.dtype``).
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.kv_size * params.embed.dtype.itemsize
    return {
        "weights": weights,
        "embed_rows": embed_rows,
        "kv": int(kv),
        "total": int(weights + embed_rows + kv),
    }


# -------------------------------------------------------------------------------- decode_step
def _greedy_step(params, cache, tokens, cfg, impl):
    # Greedy feedback as in the generate loop, so both loops do the same work per step.
    logits, cache = decode_step(params, cache, tokens, cfg, impl=impl)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


_STEP = jax.jit(_greedy_step, static_argnames=("cfg", "impl"), donate_argnums=(1,))


def _run_steps(step, params, cache, tokens, n: int, sync: bool):
    """``n`` steps from Python; seconds per step (each synced) or one mean (one sync at the end)."""
    times = []
    t0 = time.perf_counter()
    for _ in range(n):
        tokens, cache = step(params, cache, tokens)
        if sync:
            tokens.block_until_ready()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
    if not sync:
        tokens.block_until_ready()
        times.append((time.perf_counter() - t0) / n)
    return times, tokens, cache


def _xla_bytes(compiled) -> float | None:
    """XLA's own estimate of the bytes a program accesses (extra information only)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["bytes accessed"])
    except Exception:  # noqa: BLE001 - optional; absent on some backends and versions
        return None


def bench_decode_step(params: LlamaParams, cfg: LlamaConfig, batch: int, bc: BenchConfig) -> dict:
    """The jitted, cache-donating decode step called from a Python loop."""
    steps = min(bc.steps, bc.cache_len - bc.context)
    key = jax.random.fold_in(jax.random.key(bc.seed), 100 + batch)
    cache = random_cache(cfg, batch, bc.cache_len, bc.context, key)
    tokens = jax.random.randint(key, (batch,), 0, cfg.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    step = _STEP.lower(params, cache, tokens, cfg=cfg, impl=bc.impl).compile()
    compile_s = time.perf_counter() - t0
    hlo = step.as_text()

    def reset(c):  # back to `context` valid slots, so every timed run sees the same lengths
        return KVCache(c.k, c.v, jnp.full((batch,), bc.context, jnp.int32))

    _, tokens, cache = _run_steps(step, params, cache, tokens, 3, sync=True)  # warm-up
    synced, tokens, cache = _run_steps(step, params, reset(cache), tokens, steps, sync=True)
    pipelined = []
    for _ in range(bc.reps):
        t, tokens, cache = _run_steps(step, params, reset(cache), tokens, steps, sync=False)
        pipelined += t
    del cache, tokens
    return {
        "steps": steps,
        "context_mean": bc.context + (steps + 1) / 2,  # valid slots read, averaged over steps
        "compile_s": compile_s,
        "ms_per_step": _median_ms(synced),
        "ms_per_step_pipelined": _median_ms(pipelined),
        "synced_ms_p10_p90": [1e3 * float(np.percentile(synced, q)) for q in (10, 90)],
        "pipelined_ms_all": [1e3 * t for t in pipelined],
        "launches": count_launches(hlo),
        "xla_bytes_accessed": _xla_bytes(step),
    }


# ---------------------------------------------------------------------------------- generate
def bench_generate(params: LlamaParams, cfg: LlamaConfig, batch: int, bc: BenchConfig) -> dict:
    """``generate_batch`` with N1 and N2 new tokens, interleaved; the difference is N2 - N1 steps."""
    rng = np.random.default_rng(bc.seed + batch)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, bc.context), dtype=np.int32))
    lengths = jnp.full((batch,), bc.context, jnp.int32)
    key = jax.random.key(bc.seed)
    n1, n2 = bc.new_tokens
    gen = GenerateConfig(max_new_tokens=n2, sampler=Sampler(), stop_tokens=(),
                         cache_len=bc.cache_len, impl=bc.impl)
    args = (params, None, tokens, lengths, key)
    t0 = time.perf_counter()
    # One program for both lengths: it runs ``steps`` tokens (N1 or N2), traced.
    run = generate_batch.lower(*args, jnp.int32(n2), cfg=cfg, gen=gen, cache_len=bc.cache_len,
                          stream=None).compile()
    compile_s = time.perf_counter() - t0
    log(f"  generate N={n1}/{n2}: compiled in {compile_s:.1f}s")
    out = np.asarray(run(*args, jnp.int32(n2)))  # warm-up, and a check:
    if (out < 0).any():  # a PAD would mean the loop stopped early and ran fewer steps
        raise RuntimeError("generate stopped early; the step count would be wrong")
    times = {n: [] for n in bc.new_tokens}
    for _ in range(bc.reps):  # interleaved, so a drift in clocks hits both alike
        for n in bc.new_tokens:
            times[n] += _time_calls(lambda n=n: run(*args, jnp.int32(n)), 1, warmup=0)
    step_ms = (_median_ms(times[n2]) - _median_ms(times[n1])) / (n2 - n1)
    return {
        # The runs differ in the decode steps at cache lengths C+N1-1 .. C+N2-2 (+1 slot read).
        "context_mean": bc.context + (n1 + n2 - 1) / 2,
        "compile_s": compile_s,
        "ms_per_step": step_ms,
        "run_ms": {n: [1e3 * t for t in ts] for n, ts in times.items()},
        "launches": count_loop_launches(run.as_text()),
    }


# ------------------------------------------------------------------------------------ a batch
def _add_floor(part: dict, params, cfg, batch: int, bw: dict) -> None:
    """Floor and fractions of one measurement, at the context it actually read."""
    nbytes = decode_bytes(params, cfg, batch, part["context_mean"])
    part["bytes"] = nbytes
    part["floor_ms"] = 1e3 * nbytes["total"] / (bw["copy_gbps"] * 1e9)
    part["floor_read_ms"] = 1e3 * nbytes["total"] / (bw["read_gbps"] * 1e9)
    for suffix in ("", "_pipelined"):
        if f"ms_per_step{suffix}" in part:
            ms = part[f"ms_per_step{suffix}"]
            part[f"fraction{suffix}"] = part["floor_ms"] / ms
            part[f"fraction_read{suffix}"] = part["floor_read_ms"] / ms


def bench_batch(params, cfg: LlamaConfig, batch: int, bc: BenchConfig, bw: dict) -> dict:
    """Both decode measurements at one batch size; an out-of-memory is recorded, not fatal."""
    row = {"batch": batch, "context": bc.context, "cache_len": bc.cache_len}
    # The implementation attends over every cache slot (masked), so it reads more than the floor.
    row["kv_bytes_full_cache"] = decode_bytes(params, cfg, batch, bc.cache_len)["kv"]
    for name, bench in (("step", bench_decode_step), ("generate", bench_generate)):
        log(f"batch {batch}: {name} loop")
        try:
            part = bench(params, cfg, batch, bc)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is tolerated
            if not _is_oom(e):
                raise
            part = {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
            log(f"batch {batch}: {name} loop ran out of memory; skipped")
        else:
            _add_floor(part, params, cfg, batch, bw)
            log(
                f"batch {batch}: {name} loop {part['ms_per_step']:.3f} ms/step, "
                f"{part['fraction']:.2f} of the floor ({part['floor_ms']:.3f} ms), "
                f"{part['launches']['launches']} launches/step"
            )
        row[name] = part
        gc.collect()  # drop this measurement's cache before the next one allocates its own
    row["peak_bytes_in_use"] = _peak_memory()
    return row


# ------------------------------------------------------------------------------------ report
def _fmt(part: dict, key: str, spec: str) -> str:
    return format(part[key], spec) if key in part else "-"


def markdown(report: dict) -> str:
    """The results as a Markdown table with a header naming device, versions and bandwidth."""
    env, bw, args = report["environment"], report["bandwidth"], report["args"]
    lines = [
        f"Decode, `{args['preset']}` random bf16 weights ({report['param_bytes'] / 1e9:.3g} GB), "
        f"context {args['context']}, cache {report['cache_len']}, impl `{args['impl']}`; "
        f"{env['device_kind']}, "
        f"JAX {env['jax']}, {env['date'][:10]}.",
        f"Copy bandwidth {bw['copy_gbps']:.0f} GB/s (read + write), "
        f"read-only {bw['read_gbps']:.0f} GB/s. Generate loop: N={args['new_tokens'][0]} vs "
        f"{args['new_tokens'][1]} new tokens; step loop: Python loop, synced / pipelined. "
        f"Whole run {report['wall_s']:.0f} s.",
        "",
        "| batch | generate loop ms/step | step loop ms (synced) | step loop ms (pipelined) "
        "| tokens/s | floor ms | of floor: generate | of floor: step synced "
        "| of read-bw floor: generate | launches/step (step / loop) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        g, s = row["generate"], row["step"]
        tps = f"{1e3 * row['batch'] / g['ms_per_step']:.0f}" if "ms_per_step" in g else "-"
        launches = "/".join(
            str(p["launches"]["launches"]) if "launches" in p else "-" for p in (s, g)
        )
        floor = g if "floor_ms" in g else s  # the step loop's floor if generate failed
        lines.append(
            f"| {row['batch']} | {_fmt(g, 'ms_per_step', '.3f')} | {_fmt(s, 'ms_per_step', '.3f')} "
            f"| {_fmt(s, 'ms_per_step_pipelined', '.3f')} | {tps} "
            f"| {_fmt(floor, 'floor_ms', '.3f')} | {_fmt(g, 'fraction', '.2f')} "
            f"| {_fmt(s, 'fraction', '.2f')} | {_fmt(g, 'fraction_read', '.2f')} | {launches} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """ms per step and fraction of the floor against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    series = {
        "generate loop": ("generate", "ms_per_step", "fraction"),
        "step loop, synced": ("step", "ms_per_step", "fraction"),
        "step loop, pipelined": ("step", "ms_per_step_pipelined", "fraction_pipelined"),
    }
    fig, (ax_ms, ax_frac) = plt.subplots(1, 2, figsize=(11, 4))
    top = 1.05
    for label, (part, ms_key, frac_key) in series.items():
        pts = [(r["batch"], r[part]) for r in rows if ms_key in r[part]]
        ax_ms.plot([b for b, _ in pts], [p[ms_key] for _, p in pts], "o-", label=label)
        ax_frac.plot([b for b, _ in pts], [p[frac_key] for _, p in pts], "o-", label=label)
        top = max([top] + [1.05 * p[frac_key] for _, p in pts])
    pts = [(r["batch"], r["generate"]) for r in rows if "floor_ms" in r["generate"]]
    floor = [p["floor_ms"] for _, p in pts]
    ax_ms.plot([b for b, _ in pts], floor, "k--", label="copy-bandwidth floor")
    ax_ms.set(xlabel="batch", ylabel="ms per decode step", title="decode step time")
    ax_frac.set(xlabel="batch", ylabel="floor / measured", title="fraction of the floor")
    ax_frac.set_ylim(0, top)
    batches = [r["batch"] for r in rows]
    for ax in (ax_ms, ax_frac):
        if len(rows) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    env = report["environment"]
    title = f"{report['args']['preset']} on {env['device_kind']}, JAX {env['jax']}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, stem: str, markdown: Callable[[dict], str],
                 plot: Callable[[dict, str], None]) -> str:
    """``stem.json`` (replaced atomically: a kill mid-write keeps the last good file), ``stem.md``
    and ``stem.png``; returns the Markdown. A failing plot is logged, never fatal: it must not
    lose the measured numbers. Shared by the benchmark programs."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json.tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(stem + ".json.tmp", stem + ".json")
    table = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    try:
        plot(report, stem + ".png")
    except Exception as e:  # noqa: BLE001 - see the docstring
        log(f"plot failed: {e!r}")
    return table


def write_outputs(report: dict, folder: str) -> str:
    """JSON, Markdown and PNG under ``folder``; returns the Markdown."""
    stem = os.path.join(folder, f"bench_decode_{report['args']['preset']}_{report['args']['impl']}")
    table = write_report(report, stem, markdown, plot)
    log(f"wrote {stem}.json, .md, .png")
    return table


# -------------------------------------------------------------------------------------- main
def _environment() -> dict:
    import jaxlib

    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
    }


def main(bc: BenchConfig) -> dict:
    """Run every batch size of ``bc``; write and print the report; return it."""
    # JAX takes 75 % of GPU memory by default; 7B weights plus a batch-64 cache need more. Only
    # effective before JAX's first use of the device (as under ``python -m``); can be overridden.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env = _environment()
    log(f"{env['device_kind']} ({env['platform']}), JAX {env['jax']}; {bc}")
    cfg = PRESETS[bc.preset]
    if bc.cache_len > cfg.max_position_embeddings:
        raise ValueError(
            f"context + N2 rounded up to 64 ({bc.cache_len}) exceeds the preset's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    key = jax.random.key(bc.seed)
    gib = bc.copy_gib if bc.copy_gib is not None else (1 / 16 if env["platform"] == "cpu" else 2.0)
    # The best of three (each a median): a GPU that is still clocking up reads low at first, and a
    # low bandwidth would flatter every fraction of the floor.
    trials = [measure_bandwidth(gib, bc.copy_reps, jax.random.fold_in(key, i)) for i in range(3)]
    bw = max(trials, key=lambda t: t["copy_gbps"])
    bw["copy_gbps_trials"] = [t["copy_gbps"] for t in trials]
    log(f"copy {bw['copy_gbps']:.0f} GB/s, read {bw['read_gbps']:.0f} GB/s ({gib:g} GiB array)")
    gc.collect()

    t0 = time.perf_counter()
    params = jax.block_until_ready(build_params(cfg, jax.random.fold_in(key, 1)))
    param_bytes = _nbytes(params)
    made_s = time.perf_counter() - t0
    log(f"{bc.preset}: {param_bytes / 1e9:.3g} GB of weights made on the device in {made_s:.1f}s")
    results = [bench_batch(params, cfg, batch, bc, bw) for batch in bc.batch]
    del params
    gc.collect()

    report = {
        "args": dataclasses.asdict(bc),
        "environment": env,
        "cache_len": bc.cache_len,
        "param_bytes": param_bytes,
        "bandwidth": bw,
        "results": results,
        "wall_s": time.perf_counter() - _T0,
    }
    table = write_outputs(report, bc.out)
    print(table, flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m loraswitch_jax.eval.bench_decode",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, nargs="+", default=list(d.batch), help="batch sizes")
    p.add_argument("--all", action="store_true",
                   help=f"batch sizes {' '.join(map(str, ALL_BATCHES))} (overrides --batch)")
    p.add_argument("--context", type=int, default=d.context, help="prompt tokens per sequence (C)")
    p.add_argument("--new-tokens", type=int, nargs=2, default=list(d.new_tokens),
                   metavar=("N1", "N2"),
                   help="generate-loop lengths; their difference gives one decode step")
    p.add_argument("--reps", type=int, default=d.reps,
                   help="timed generate runs per N; step-loop repeats")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="steps per step-loop run (capped by the cache's free slots)")
    p.add_argument("--copy-gib", type=float, default=None,
                   help="GiB copied; None: 2 on a GPU, 1/16 on a CPU")
    p.add_argument("--copy-reps", type=int, default=d.copy_reps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--impl", default=d.impl, choices=("auto", "xla", "pallas"),
                   help="decode kernels (auto: pallas on a GPU)")
    p.add_argument("--out", default=d.out, help="output folder")
    a = p.parse_args(argv)
    return BenchConfig(
        preset=a.preset, batch=ALL_BATCHES if a.all else tuple(a.batch), context=a.context,
        new_tokens=tuple(a.new_tokens), reps=a.reps, steps=a.steps, copy_gib=a.copy_gib,
        copy_reps=a.copy_reps, seed=a.seed, impl=a.impl, out=a.out,
    )


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
