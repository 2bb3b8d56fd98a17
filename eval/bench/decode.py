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

    python -m loraswitch_jax.eval.bench.decode                       # 7B, batch 1 (< 3 min, H100)
    python -m loraswitch_jax.eval.bench.decode --all                 # batch 1 8 32 64
    python -m loraswitch_jax.eval.bench.decode --preset demo --context 64 --batch 1 2  # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.eval.bench.harness import (
    best_bandwidth,
    build_params,
    environment,
    is_oom,
    log,
    median_ms,
    nbytes,
    peak_memory,
    reserve_device_memory,
    time_calls,
    write_report,
)
from loraswitch_jax.eval.bench.launches import count_launches, count_loop_launches
from loraswitch_jax.generate import GenerateConfig, generate_batch
from loraswitch_jax.kv_cache import KVCache
from loraswitch_jax.llama import decode_step
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.sampling import Sampler

__all__ = ["ALL_BATCHES", "DecodeConfig", "decode_bytes", "main", "parse_args", "random_cache"]

ALL_BATCHES = (1, 8, 32, 64)

@dataclasses.dataclass(frozen=True)
class DecodeConfig:
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


# ------------------------------------------------------------------------------ model + cache
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
    weights = nbytes(params.layers) + params.final_norm.nbytes + head
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


def bench_decode_step(params: LlamaParams, cfg: LlamaConfig, batch: int, bc: DecodeConfig) -> dict:
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
        "ms_per_step": median_ms(synced),
        "ms_per_step_pipelined": median_ms(pipelined),
        "synced_ms_p10_p90": [1e3 * float(np.percentile(synced, q)) for q in (10, 90)],
        "pipelined_ms_all": [1e3 * t for t in pipelined],
        "launches": count_launches(hlo),
        "xla_bytes_accessed": _xla_bytes(step),
    }


# ---------------------------------------------------------------------------------- generate
def bench_generate(params: LlamaParams, cfg: LlamaConfig, batch: int, bc: DecodeConfig) -> dict:
    """``generate_batch`` with N1 and N2 new tokens, interleaved: the difference is N2 - N1
    decode steps."""
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
            times[n] += time_calls(lambda n=n: run(*args, jnp.int32(n)), 1, warmup=0)
    step_ms = (median_ms(times[n2]) - median_ms(times[n1])) / (n2 - n1)
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


def bench_batch(params, cfg: LlamaConfig, batch: int, bc: DecodeConfig, bw: dict) -> dict:
    """Both decode measurements at one batch size; an out-of-memory is recorded, not fatal."""
    row = {"batch": batch, "context": bc.context, "cache_len": bc.cache_len}
    # The implementation attends over every cache slot (masked), so it reads more than the floor.
    row["kv_bytes_full_cache"] = decode_bytes(params, cfg, batch, bc.cache_len)["kv"]
    for name, bench in (("step", bench_decode_step), ("generate", bench_generate)):
        log(f"batch {batch}: {name} loop")
        try:
            part = bench(params, cfg, batch, bc)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is tolerated
            if not is_oom(e):
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
    row["peak_bytes_in_use"] = peak_memory()
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


def write_outputs(report: dict, folder: str) -> str:
    """JSON, Markdown and PNG under ``folder``; returns the Markdown."""
    args = report["args"]
    stem = os.path.join(folder, f"{args['preset']}_ctx{args['context']}_{args['impl']}")
    table = write_report(report, stem, markdown, plot)
    log(f"wrote {stem}.json, .md, .png")
    return table


# -------------------------------------------------------------------------------------- main
def main(bc: DecodeConfig) -> dict:
    """Run every batch size of ``bc``; write and print the report; return it."""
    start = time.perf_counter()
    reserve_device_memory()
    env = environment()
    log(f"{env['device_kind']} ({env['platform']}), JAX {env['jax']}; {bc}")
    cfg = PRESETS[bc.preset]
    if bc.cache_len > cfg.max_position_embeddings:
        raise ValueError(
            f"context + N2 rounded up to 64 ({bc.cache_len}) exceeds the preset's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    key = jax.random.key(bc.seed)
    bw = best_bandwidth(bc.copy_gib, bc.copy_reps, key, env["platform"])
    gc.collect()

    t0 = time.perf_counter()
    params = jax.block_until_ready(build_params(cfg, jax.random.fold_in(key, 1)))
    param_bytes = nbytes(params)
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
        "wall_s": time.perf_counter() - start,
    }
    table = write_outputs(report, bc.out)
    print(table, flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> DecodeConfig:
    d = DecodeConfig()
    p = argparse.ArgumentParser(
        prog="python -m loraswitch_jax.eval.bench.decode",
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
    return DecodeConfig(
        preset=a.preset, batch=ALL_BATCHES if a.all else tuple(a.batch), context=a.context,
        new_tokens=tuple(a.new_tokens), reps=a.reps, steps=a.steps, copy_gib=a.copy_gib,
        copy_reps=a.copy_reps, seed=a.seed, impl=a.impl, out=a.out,
    )


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
