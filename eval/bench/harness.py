"""What every benchmark shares: timing, the environment, copy bandwidth, random weights, reports.

Nothing here runs at import: the jitted helpers compile on first call.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.eval.bench.launches import count_launches
from loraswitch_jax.params import LlamaParams, init_params

__all__ = [
    "best_bandwidth",
    "build_params",
    "environment",
    "failure",
    "is_oom",
    "log",
    "measure_bandwidth",
    "median_ms",
    "nbytes",
    "peak_memory",
    "reserve_device_memory",
    "spawn_worker",
    "time_calls",
    "write_report",
]

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """``msg`` with the seconds since this module was imported, flushed (logs of killed runs)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def time_calls(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def failure(e: Exception) -> str:
    """One line for a report row: out of memory, or the exception's type and first line."""
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return f"out of memory: {first}" if is_oom(e) else f"{type(e).__name__}: {first}"


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return None if not stats else stats.get("peak_bytes_in_use")


def reserve_device_memory() -> None:
    """Let JAX take 95 % of GPU memory (75 % by default): 7B weights plus a batch-64 cache need
    more. Only effective before JAX's first use of the device (as under ``python -m``)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")


def environment() -> dict:
    """Device, versions and date: the header of every report."""
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


def nbytes(tree) -> int:
    """Bytes of every array leaf of ``tree``."""
    return sum(a.nbytes for a in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------- bandwidth
@jax.jit
def _copy(x: jax.Array, scale: jax.Array) -> jax.Array:
    # A product by a runtime scalar (1.0) must read and write every element; ``x + 0`` may not.
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
    copy_s = time_calls(lambda: _copy(x, one), reps, warmup=3)
    read_s = time_calls(lambda: _read(x), reps, warmup=3)
    size = x.nbytes
    del x
    return {
        "array_bytes": size,
        "copy_ms": median_ms(copy_s),
        "copy_gbps": 2 * size / statistics.median(copy_s) / 1e9,
        "read_ms": median_ms(read_s),
        "read_gbps": size / statistics.median(read_s) / 1e9,
    }


def best_bandwidth(gib: float | None, reps: int, key: jax.Array, platform_name: str) -> dict:
    """The best of three :func:`measure_bandwidth` trials (each a median): a GPU still clocking
    up reads low at first, and a low bandwidth would flatter every fraction of the floor.
    ``gib=None``: 2 GiB on a GPU, 1/16 on a CPU (dry runs stay quick)."""
    gib = gib if gib is not None else (1 / 16 if platform_name == "cpu" else 2.0)
    trials = [measure_bandwidth(gib, reps, jax.random.fold_in(key, i)) for i in range(3)]
    bw = max(trials, key=lambda t: t["copy_gbps"])
    bw["copy_gbps_trials"] = [t["copy_gbps"] for t in trials]
    log(f"copy {bw['copy_gbps']:.0f} GB/s, read {bw['read_gbps']:.0f} GB/s ({gib:g} GiB array)")
    return bw


# ------------------------------------------------------------------------------------ weights
def build_params(cfg: LlamaConfig, key: jax.Array) -> LlamaParams:
    """Random bf16 weights created on the device (the host never holds them)."""
    return jax.jit(functools.partial(init_params, cfg, dtype=jnp.bfloat16))(key)


# ------------------------------------------------------------------------------------ reports
def spawn_worker(module: str, job: dict, timeout: float, env: dict) -> dict:
    """Run one ``job`` of ``module`` (``python -m module --worker JOB --result PATH``) in a fresh
    Python with ``env`` (its log goes to ours) and return the row it wrote; a timeout or no
    result file (a crash, an OOM kill) is a row of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", module, "--worker", json.dumps(job), "--result", path]
        try:
            code = subprocess.run(cmd, env=env, timeout=max(timeout, 1.0)).returncode
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"killed after {timeout:.0f}s (--budget-s)"}
        if not os.path.exists(path):
            return {"status": "crashed", "error": f"exit code {code} and no result (log above)"}
        with open(path) as f:
            return json.load(f)


def write_report(report: dict, stem: str, markdown: Callable[[dict], str],
                 plot: Callable[[dict, str], None] | None) -> str:
    """``stem.json`` (replaced atomically: a kill mid-write keeps the last good file), ``stem.md``
    and ``stem.png``; returns the Markdown. A failing plot is logged, never fatal: it must not
    lose the measured numbers."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json.tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(stem + ".json.tmp", stem + ".json")
    table = markdown(report)
    with open(stem + ".md.tmp", "w") as f:
        f.write(table + "\n")
    os.replace(stem + ".md.tmp", stem + ".md")
    if plot is not None:
        try:
            plot(report, stem + ".png")
        except Exception as e:  # noqa: BLE001 - see the docstring
            log(f"plot failed: {e!r}")
    return table
