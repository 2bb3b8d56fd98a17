"""How one adapter-benchmark case is measured: decode time, floor, launches, routes; and the SGMM
merge kernel alone.

A case runs the jitted ``generate_batch`` (prefill + device-side ``while_loop``) as the decode
benchmark does: a generation of 1 new token (prefill only) and one of N, interleaved;
``(median(T_N) - median(T_1)) / (N - 1)`` is one decode step and ``batch * context /
median(T_1)`` the prefill throughput. The floor is the bytes one step must read (weights, the
experts a step touches, keys/values) over the measured copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.adapters import Adapter, AdapterConfig
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.eval.bench.adapter_cases import (
    ALPHA,
    BASE_EXPERTS,
    BASE_TOP_K,
    MODES,
    RANK,
    Case,
    cache_len,
    make_adapter,
    model_config,
)
from loraswitch_jax.eval.bench.decode import decode_bytes
from loraswitch_jax.eval.bench.harness import log, median_ms, nbytes, time_calls
from loraswitch_jax.eval.bench.launches import count_loop_launches
from loraswitch_jax.generate import GenerateConfig, generate_batch
from loraswitch_jax.layers import rms_norm
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.router import compute_route
from loraswitch_jax.sampling import Sampler

__all__ = ["adapter_step_bytes", "expected_experts", "measure_case", "measure_sgmm",
           "route_stats", "sgmm_bytes"]


# ---------------------------------------------------------------------------------- floor
def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a step of ``batch`` rows touches, each row picking ``top_k`` of
    ``num_experts`` uniformly: ``E (1 - (1 - k/E)^B)`` (exactly ``k`` at batch 1)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def adapter_step_bytes(adapter: Adapter, batch: int) -> dict:
    """Adapter bytes a decode step must read: the touched experts' ``A`` and ``B`` of every
    adapted projection and layer, plus the router(s). Layerwise routes differ per layer and
    depend on context, so every mixture counts the uniform-routing expectation."""
    acfg = adapter.config
    touched = 1.0 if acfg.mode == "lora" else expected_experts(
        acfg.num_experts, acfg.top_k, batch)
    expert = sum(adapter.a[p].nbytes + adapter.b[p].nbytes for p in acfg.targets)
    expert /= acfg.num_experts
    router = 0 if adapter.router is None else adapter.router.nbytes
    return {"experts_touched": touched, "adapters": int(round(expert * touched)) + router}


def sgmm_bytes(w_shapes: dict[str, tuple[int, int, int]], adapted_layers: int, top_k: int,
               rank: int, itemsize: int) -> int:
    """Bytes one SGMM merge moves: read the adapted layers of each base weight ``[L, K, N]``,
    write the working copy, read the ``top_k`` selected experts' ``A [K, r]`` and ``B [r, N]``."""
    total = 0
    for _, k, n in w_shapes.values():
        total += 2 * adapted_layers * k * n + top_k * adapted_layers * rank * (k + n)
    return total * itemsize


# ------------------------------------------------------------------------------- one case
def _bytes_limit() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return None if not stats else stats.get("bytes_limit")


def _resident_bytes(params: LlamaParams, adapter: Adapter | None, cfg: LlamaConfig, case: Case,
                    cache_len: int) -> int:
    """Weights, adapter, merge working copy (of every layer of the adapted projections, as
    ``switch.init_merged`` makes it) and the KV cache; prefill temporaries come on top."""
    total = nbytes(params) + (0 if adapter is None else nbytes(adapter))
    if MODES[case.mode].strategy == "merge":
        total += sum(params.layers.weight(p).nbytes for p in adapter.config.targets)
    kv = 2 * cfg.num_hidden_layers * case.batch * cache_len * cfg.kv_size
    return total + kv * params.dtype.itemsize


@functools.partial(jax.jit, static_argnames=("eps", "top_k"))
def _layer0_routes(embed, norm, router, tokens, *, eps, top_k):
    return compute_route(rms_norm(embed[tokens], norm, eps), router, top_k)[0]


def route_stats(params: LlamaParams, adapter: Adapter, cfg: LlamaConfig,
                generated: np.ndarray) -> dict:
    """Switch routes of the decode steps of ``generated [B, N]`` (step t reads token t - 1).

    With the router at layer 0 the route is a function of the token id alone (its normalised
    embedding), so it is recomputed here as the model computed it. ``route_change_fraction``:
    how often a row's route (ids or gates) differs from its previous step's, i.e. how often the
    merge strategy merges.
    """
    acfg = adapter.config
    if acfg.first_layer != 0:
        raise ValueError("route_stats needs the switch router at layer 0")
    route = _layer0_routes(params.embed, params.layers.attn_norm[0], adapter.router,
                           jnp.asarray(generated[:, :-1]), eps=cfg.rms_norm_eps,
                           top_k=acfg.top_k)
    raw_ids, gates = np.asarray(route.expert_ids), np.asarray(route.gates)  # [B, S, k]
    ids = np.sort(raw_ids, axis=-1)  # a route as a set of experts
    steps = ids.shape[1]
    per_step = [len({tuple(r) for r in ids[:, s]}) for s in range(steps)]
    experts = [len(np.unique(ids[:, s])) for s in range(steps)]
    changes = np.any((raw_ids[:, 1:] != raw_ids[:, :-1]) | (gates[:, 1:] != gates[:, :-1]), -1)
    return {
        "distinct_routes_per_step": float(np.mean(per_step)),
        "distinct_routes_total": len({tuple(r) for r in ids.reshape(-1, acfg.top_k)}),
        "distinct_experts_per_step": float(np.mean(experts)),
        "route_change_fraction": float(changes.mean()) if changes.size else 0.0,
    }


def measure_case(case: Case, params: LlamaParams, bw: dict, *, new_tokens: int, reps: int,
                 impl: str, seed: int) -> dict:
    """Time one configuration; returns its row (with ``error`` instead of timings when it
    cannot fit). ``impl``: ``"mode"`` (the mode's kernels) or ``"xla"`` (CPU dry runs)."""
    mode = MODES[case.mode]
    kernels = mode.ops_impl if impl == "mode" else impl
    impl = mode.impl if impl == "mode" else impl
    n = new_tokens
    length = cache_len(case.context, n)
    cfg = model_config(case.preset, length)
    row = {**dataclasses.asdict(case), "setting": case.setting, "impl": impl,
           "shrink_ahead": mode.shrink_ahead and impl == "pallas",
           "strategy": mode.strategy, "cache_len": length}
    key = jax.random.fold_in(jax.random.key(seed), case.batch)
    acfg = case.adapter_config()
    adapter = None if acfg is None else make_adapter(cfg, acfg, key)
    need, limit = _resident_bytes(params, adapter, cfg, case, length), _bytes_limit()
    row["resident_bytes"] = need
    if limit is not None and need > limit:
        row["error"] = f"needs {need / 1e9:.1f} GB resident, more than the {limit / 1e9:.1f} GB"
        return row

    rng = np.random.default_rng(seed + case.batch)  # a different random prompt per row
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (case.batch, case.context), np.int32))
    lengths = jnp.full((case.batch,), case.context, jnp.int32)
    args = (params, adapter, tokens, lengths, key)
    # Sampled at temperature 1 (seeded): random weights decode greedily into repeats, whose
    # routes rarely change; sampled tokens change the route on almost every step.
    strategy = {} if mode.strategy is None else {"switch_strategy": mode.strategy}
    gen = GenerateConfig(max_new_tokens=n, sampler=Sampler(temperature=1.0), stop_tokens=(),
                         cache_len=length, impl=kernels, **strategy)
    t0 = time.perf_counter()
    # One program for both lengths: it runs ``steps`` tokens (1 or N), traced.
    run = generate_batch.lower(*args, jnp.int32(n), cfg=cfg, gen=gen, cache_len=length,
                               stream=None).compile()
    compile_s = time.perf_counter() - t0
    log(f"  compiled in {compile_s:.1f}s")
    jax.block_until_ready(run(*args, jnp.int32(1)))  # warm-up
    generated = np.asarray(run(*args, jnp.int32(n)))
    if (generated < 0).any():  # a PAD would mean the loop stopped early and ran fewer steps
        raise RuntimeError("generate stopped early; the step count would be wrong")
    times = {1: [], n: []}
    for _ in range(reps):  # interleaved, so a drift in clocks hits both alike
        for m in (1, n):
            times[m] += time_calls(lambda m=m: run(*args, jnp.int32(m)), 1, warmup=0)
    step_ms = (median_ms(times[n]) - median_ms(times[1])) / (n - 1)
    prefill_ms = median_ms(times[1])
    row.update(
        compile_s=compile_s,
        run_ms={m: [1e3 * t for t in ts] for m, ts in times.items()},
        ms_per_token=step_ms,
        tokens_per_s=1e3 * case.batch / step_ms if step_ms > 0 else None,
        prefill_ms=prefill_ms,
        prefill_tokens_per_s=1e3 * case.batch * case.context / prefill_ms,
        launches=count_loop_launches(run.as_text()),
    )
    # The N-token run adds decode steps reading context + 1 .. context + N - 1 slots.
    nbytes = decode_bytes(params, cfg, case.batch, case.context + n / 2)
    if adapter is not None:
        nbytes.update(adapter_step_bytes(adapter, case.batch))
        nbytes["total"] += nbytes["adapters"]
        if acfg.mode == "switch":
            row["routes"] = route_stats(params, adapter, cfg, generated)
    row["bytes"] = nbytes
    row["floor_ms"] = 1e3 * nbytes["total"] / (bw["copy_gbps"] * 1e9)
    row["fraction"] = row["floor_ms"] / step_ms if step_ms > 0 else None
    return row


# -------------------------------------------------------------------------------- SGMM alone
def measure_sgmm(params: LlamaParams, cfg: LlamaConfig, bw: dict, reps: int, seed: int) -> dict:
    """The SGMM merge kernel alone on all seven projections (E 8, top-2, rank 16), in place."""
    from loraswitch_jax.pallas.switch_merge import switch_merge

    acfg = AdapterConfig(mode="switch", rank=RANK, alpha=ALPHA, num_experts=BASE_EXPERTS,
                         top_k=BASE_TOP_K)
    adapter = make_adapter(cfg, acfg, jax.random.key(seed))
    first = acfg.first_layer
    base = {p: params.layers.weight(p) for p in acfg.targets}
    work = {p: jnp.copy(w[first:]) for p, w in base.items()}  # own buffers: they are donated

    def merge_all(base, work, a, b, expert_ids, gates):
        return {p: switch_merge(base[p], work[p], a[p], b[p], expert_ids, gates,
                                first_layer=first) for p in base}

    merge = jax.jit(merge_all, donate_argnums=(1,))
    # Different routes call after call, as in decode; the scale is folded into the gates.
    routes = [(jnp.array([i % BASE_EXPERTS, (i + 3) % BASE_EXPERTS], jnp.int32),
               jnp.array([0.6, 0.4], jnp.float32) * acfg.scale) for i in range(4)]
    t0 = time.perf_counter()
    work = jax.block_until_ready(merge(base, work, adapter.a, adapter.b, *routes[0]))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(reps + 2):  # two warm-up calls
        t0 = time.perf_counter()
        work = jax.block_until_ready(merge(base, work, adapter.a, adapter.b, *routes[i % 4]))
        times.append(time.perf_counter() - t0)
    times = times[2:]
    shapes = {p: tuple(w.shape) for p, w in base.items()}
    nbytes = sgmm_bytes(shapes, acfg.num_adapted_layers(cfg), acfg.top_k, acfg.rank,
                        params.dtype.itemsize)
    seconds = statistics.median(times)
    del work, adapter
    return {
        "projections": list(acfg.targets), "experts": BASE_EXPERTS, "top_k": BASE_TOP_K,
        "rank": RANK, "bytes": nbytes, "compile_s": compile_s, "ms": 1e3 * seconds,
        "ms_all": [1e3 * t for t in times], "gbps": nbytes / seconds / 1e9,
        "fraction": nbytes / seconds / 1e9 / bw["copy_gbps"],
    }
