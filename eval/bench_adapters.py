"""Decode latency of dynamic adapters beside the backbone, all in one run (DESIGN.md §2, §5).

Every configuration (model preset, mode, batch, context, experts E, top-k) runs the jitted
``generate_batch`` (prefill + device-side ``while_loop``) as ``bench_decode`` does: a generation of
1 new token (prefill only) and one of N, interleaved; ``(median(T_N) - median(T_1)) / (N - 1)``
is one decode step and ``batch * context / median(T_1)`` the prefill throughput (T_1 also holds
the cache's allocation, the first token and, for switch-merge, the working copy of the weights).

Modes (adapters on all seven projections, rank 16, alpha 32, ``B`` filled with small random
values so that no path can skip a zero adapter):

  backbone          no adapter; Pallas kernels
  switch-fused      LoRA-Switch, the routed LoRA term computed beside/inside the projection kernels
  switch-merge      LoRA-Switch, the SGMM kernel merges into a working copy when the route changes,
                    then the plain dense step (batch 1 only)
  backbone-xla-attention
                    the backbone with XLA's attention over cache[layer] instead of the
                    decode-attention kernel (the default)
  switch-fused-unsplit-shrink, switch-fused-xla-shrink, switch-fused-inline
                    switch-fused with x A as one grouped launch per input group without the
                    split over K, as one XLA op per projection, or recomputed inside every
                    program of the projection kernels (batch <= 8): the default placement (the
                    split grouped launch) is decided by these rows
  switch-xla        LoRA-Switch, jnp adapter terms beside XLA dots (unfused)
  layerwise-xla     per-layer top-k routing (MoLA/MixLoRA style), compiled by XLA
  layerwise-pallas  the same with the Pallas projection kernels
  lora              one LoRA (E = k = 1); Pallas kernels

Each figure is also given as a ratio to the backbone at the same preset, batch and context in the
same run, and as a fraction of the copy-bandwidth floor: the bytes one step must read (weights,
the experts a step touches, keys/values; ``decode_bytes`` + :func:`adapter_step_bytes`) over the
measured copy bandwidth. Launches per decode step come from the compiled HLO (a ``conditional``,
such as switch-merge's merge-if-the-route-changed, counts as one). For switch modes the
routes of the generated tokens are recomputed (with the router at layer 0 a token's route depends
on its id alone): distinct routes per step, in all, and how often a row's route changes.
The SGMM merge kernel is also timed alone on all seven projections (``bench_sgmm``).

Grids: ``issue4`` (Llama-2-7B, context 1024, E 8, k 2, batches 1 8 32 64, all modes) and
``suite`` (backbone, lora, layerwise-pallas, switch-merge, switch-fused; 7B and ~1B shapes;
contexts 128 1024 4096; E 8 32 128 at k 2 and k 1 2 4 at E 8, around E 8 k 2 and context 1024).
Configurations run in priority order; ``--max-minutes`` stops before one that would not finish in
time, and ``--only`` filters. JSON, Markdown and a PNG are rewritten after every configuration, so
a killed run keeps what it measured. Examples::

    python -m loraswitch_jax.eval.bench_adapters --grid issue4 --out eval/results/adapters
    python -m loraswitch_jax.eval.bench_adapters --grid suite --only preset=llama-1b
    python -m loraswitch_jax.eval.bench_adapters --preset demo --context 32 --batch 1 2 \\
        --new-tokens 5 --reps 1 --impl xla              # CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.adapters import Adapter, AdapterConfig, init_adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.eval.bench_decode import (
    _environment,
    _is_oom,
    _median_ms,
    _nbytes,
    _time_calls,
    build_params,
    count_loop_launches,
    decode_bytes,
    log,
    measure_bandwidth,
    write_report,
)
from loraswitch_jax.generate import GenerateConfig, generate_batch
from loraswitch_jax.layers import rms_norm
from loraswitch_jax.ops import Impl
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.router import compute_route
from loraswitch_jax.sampling import Sampler

__all__ = [
    "GRIDS",
    "MODES",
    "BenchConfig",
    "Case",
    "Mode",
    "acceptance",
    "adapter_step_bytes",
    "expected_experts",
    "main",
    "parse_args",
    "sgmm_bytes",
]

RANK, ALPHA = 16, 32.0
BASE_EXPERTS, BASE_TOP_K = 8, 2
B_STD = 1e-3  # small random B: the adapter term is real work but does not swamp the backbone
TARGET_SWITCH_B1 = 1.03  # switch-fused / backbone at batch 1
TARGET_SWITCH_BATCHED = 1.08  # ... at batch > 1
TARGET_SGMM = 0.85  # SGMM merge bandwidth / copy bandwidth


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a mode decodes: adapter mode (None: backbone), kernels, switch strategy, where the
    routed kernels compute ``x A`` (``ops.Impl.lora_shrink``), decode attention, and how they
    add ``(x A) B`` (``ops.Impl.lora_expand``)."""

    adapter: str | None
    impl: str
    strategy: str = "auto"
    max_batch: int | None = None
    shrink: str = "auto"
    attention: str = "auto"
    expand: str = "auto"

    def kernels(self, impl: str) -> str | Impl:
        """``impl`` (the mode's or the command line's) with this mode's shrink placement,
        attention and expansion."""
        if impl == "xla" or (self.shrink, self.attention, self.expand) == ("auto",) * 3:
            return impl
        return Impl(backend="pallas", lora_shrink=self.shrink, attention=self.attention,
                    lora_expand=self.expand)


MODES: dict[str, Mode] = {
    "backbone": Mode(None, "pallas"),
    # The backbone with XLA's attention over cache[layer] instead of the decode-attention kernel
    # (ops._DEFAULT_ATTENTION was decided by these rows, then named backbone-pallas-attention).
    "backbone-xla-attention": Mode(None, "pallas", attention="xla"),
    "switch-fused": Mode("switch", "pallas", "fused"),
    # The same with x A as one XLA op per projection, or inside the projection kernels:
    # which of the three is the default (ops._DEFAULT_SHRINK) is decided by these rows.
    "switch-fused-xla-shrink": Mode("switch", "pallas", "fused", shrink="xla"),
    # The grouped shrink without spreading K over more programs (decode has few programs then).
    "switch-fused-unsplit-shrink": Mode("switch", "pallas", "fused", shrink="pallas"),
    # Inline recomputes x A in every program, for gathered slots only (batch * k < E; ops falls
    # back to the grouped shrink otherwise, which switch-fused already measures).
    "switch-fused-inline": Mode("switch", "pallas", "fused", shrink="inline"),
    # down's x A by its own launch rather than in the gate/up kernel's epilogue.
    "switch-fused-separate-down-shrink": Mode("switch", "pallas", "fused", shrink="pallas-split"),
    # (x A) B of gather slots at up to 4 rows in registers, loads before the K loop.
    "switch-fused-rows": Mode("switch", "pallas", "fused", expand="rows", max_batch=4),
    "switch-merge": Mode("switch", "pallas", "merge", max_batch=1),
    "switch-xla": Mode("switch", "xla", "fused"),
    "layerwise-xla": Mode("layerwise", "xla"),
    "layerwise-pallas": Mode("layerwise", "pallas"),
    "lora": Mode("lora", "pallas"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration. ``experts``/``top_k`` are ignored by backbone and lora."""

    preset: str
    mode: str
    batch: int
    context: int
    experts: int = BASE_EXPERTS
    top_k: int = BASE_TOP_K

    @property
    def setting(self) -> str:
        """The plot panel / table group: everything but mode and batch."""
        return f"{self.preset}, context {self.context}, E {self.experts}, k {self.top_k}"

    @property
    def name(self) -> str:
        return f"{self.mode} batch {self.batch} ({self.setting})"

    def adapter_config(self) -> AdapterConfig | None:
        mode = MODES[self.mode].adapter
        if mode is None:
            return None
        if mode == "lora":
            return AdapterConfig.lora(rank=RANK, alpha=ALPHA)
        return AdapterConfig(mode=mode, rank=RANK, alpha=ALPHA, num_experts=self.experts,
                             top_k=self.top_k)


def _fits(case: Case) -> bool:
    mode = MODES[case.mode]
    if mode.shrink == "inline" and case.batch * case.top_k >= case.experts:
        return False
    return mode.max_batch is None or case.batch <= mode.max_batch


def issue4_grid(presets=("llama2-7b",), batches=(1, 8, 32, 64), contexts=(1024,)) -> list[Case]:
    """Every mode at E 8, k 2. The acceptance targets' modes at every batch come first."""
    first = ("backbone", "switch-fused", "switch-fused-rows", "switch-merge")
    rest = ("backbone-xla-attention", "switch-fused-unsplit-shrink", "switch-fused-inline",
            "switch-fused-xla-shrink", "switch-fused-separate-down-shrink",
            "lora",
            "layerwise-pallas", "switch-xla", "layerwise-xla")
    cases = []
    for modes in (first, rest):
        cases += [Case(p, m, b, c) for p in presets for c in contexts for b in batches
                  for m in modes]
    return [c for c in cases if _fits(c)]


def suite_grid(presets=("llama-1b", "llama2-7b"), batches=(1, 8, 32, 64),
               contexts=(128, 1024, 4096)) -> list[Case]:
    """One axis at a time around E 8, k 2, context 1024: base settings, then E, k, context."""
    base_ctx = 1024 if 1024 in contexts else contexts[0]
    settings = [(p, base_ctx, BASE_EXPERTS, BASE_TOP_K) for p in presets]
    for p in presets:
        settings += [(p, base_ctx, e, BASE_TOP_K) for e in (32, 128)]
        settings += [(p, base_ctx, BASE_EXPERTS, k) for k in (1, 4)]
    for p in presets:
        settings += [(p, c, BASE_EXPERTS, BASE_TOP_K) for c in contexts if c != base_ctx]
    cases = []
    for p, c, e, k in settings:
        base = (e, k) == (BASE_EXPERTS, BASE_TOP_K)  # backbone and lora do not depend on E, k
        modes = ("backbone", "switch-fused", "switch-merge", "lora", "layerwise-pallas") if base \
            else ("switch-fused", "switch-merge", "layerwise-pallas")
        cases += [Case(p, m, b, c, e, k) for b in batches for m in modes]
    return [c for c in cases if _fits(c)]


GRIDS = {"issue4": issue4_grid, "suite": suite_grid}
FILTER_KEYS = ("preset", "mode", "batch", "context", "experts", "top_k")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run. ``presets``/``batches``/``contexts`` replace the grid's axes when given;
    ``only`` keeps the configurations whose field is one of the listed values (as text)."""

    grid: str = "issue4"
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

    def cache_len(self, context: int) -> int:
        """One cache for both generations, a multiple of 64."""
        return -(-(context + self.new_tokens) // 64) * 64


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
def model_config(preset: str, cache_len: int) -> LlamaConfig:
    """The preset, with ``max_position_embeddings`` raised to ``cache_len`` if needed: random
    weights cost the same at positions past the trained range (the suite's context 4096)."""
    cfg = PRESETS[preset]
    if cache_len > cfg.max_position_embeddings:
        cfg = dataclasses.replace(cfg, max_position_embeddings=cache_len)
    return cfg


@functools.partial(jax.jit, static_argnums=(0, 1))
def _make_adapter(cfg: LlamaConfig, acfg: AdapterConfig, key: jax.Array) -> Adapter:
    adapter = init_adapter(cfg, acfg, key, dtype=jnp.bfloat16)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(acfg.targets))
    b = {p: (B_STD * jax.random.normal(k, adapter.b[p].shape, jnp.float32)).astype(jnp.bfloat16)
         for p, k in zip(acfg.targets, keys)}
    return dataclasses.replace(adapter, b=b)


def _bytes_limit() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return None if not stats else stats.get("bytes_limit")


def _resident_bytes(params: LlamaParams, adapter: Adapter | None, cfg: LlamaConfig, case: Case,
                    cache_len: int) -> int:
    """Weights, adapter, merge working copy (of every layer of the adapted projections, as
    ``switch.init_merged`` makes it) and the KV cache; prefill temporaries come on top."""
    total = _nbytes(params) + (0 if adapter is None else _nbytes(adapter))
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


def bench_case(case: Case, params: LlamaParams, bc: BenchConfig, bw: dict) -> dict:
    """Time one configuration; returns its row (with ``error`` instead of timings on failure)."""
    mode = MODES[case.mode]
    impl = mode.impl if bc.impl == "mode" else bc.impl
    n = bc.new_tokens
    cache_len = bc.cache_len(case.context)
    cfg = model_config(case.preset, cache_len)
    row = {**dataclasses.asdict(case), "setting": case.setting, "impl": impl,
           "lora_shrink": mode.shrink, "strategy": mode.strategy, "cache_len": cache_len}
    key = jax.random.fold_in(jax.random.key(bc.seed), case.batch)
    acfg = case.adapter_config()
    adapter = None if acfg is None else _make_adapter(cfg, acfg, key)
    need, limit = _resident_bytes(params, adapter, cfg, case, cache_len), _bytes_limit()
    row["resident_bytes"] = need
    if limit is not None and need > limit:
        row["error"] = f"needs {need / 1e9:.1f} GB resident, more than the {limit / 1e9:.1f} GB"
        return row

    rng = np.random.default_rng(bc.seed + case.batch)  # a different random prompt per row
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (case.batch, case.context), np.int32))
    lengths = jnp.full((case.batch,), case.context, jnp.int32)
    args = (params, adapter, tokens, lengths, key)
    # Sampled at temperature 1 (seeded): random weights decode greedily into repeats, whose
    # routes rarely change; sampled tokens change the route on almost every step.
    gen = GenerateConfig(max_new_tokens=n, sampler=Sampler(temperature=1.0), stop_tokens=(),
                         cache_len=cache_len, impl=mode.kernels(impl),
                         switch_strategy=mode.strategy)
    t0 = time.perf_counter()
    # One program for both lengths: it runs ``steps`` tokens (1 or N), traced.
    run = generate_batch.lower(*args, jnp.int32(n), cfg=cfg, gen=gen, cache_len=cache_len,
                          stream=None).compile()
    compile_s = time.perf_counter() - t0
    log(f"  compiled in {compile_s:.1f}s")
    jax.block_until_ready(run(*args, jnp.int32(1)))  # warm-up
    generated = np.asarray(run(*args, jnp.int32(n)))
    if (generated < 0).any():  # a PAD would mean the loop stopped early and ran fewer steps
        raise RuntimeError("generate stopped early; the step count would be wrong")
    times = {1: [], n: []}
    for _ in range(bc.reps):  # interleaved, so a drift in clocks hits both alike
        for m in (1, n):
            times[m] += _time_calls(lambda m=m: run(*args, jnp.int32(m)), 1, warmup=0)
    step_ms = (_median_ms(times[n]) - _median_ms(times[1])) / (n - 1)
    prefill_ms = _median_ms(times[1])
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
def bench_sgmm(params: LlamaParams, cfg: LlamaConfig, bw: dict, reps: int, seed: int) -> dict:
    """The SGMM merge kernel alone on all seven projections (E 8, top-2, rank 16), in place."""
    from loraswitch_jax.pallas.switch_merge import switch_merge

    acfg = AdapterConfig(mode="switch", rank=RANK, alpha=ALPHA, num_experts=BASE_EXPERTS,
                         top_k=BASE_TOP_K)
    adapter = _make_adapter(cfg, acfg, jax.random.key(seed))
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


# ----------------------------------------------------------------------------------- report
def add_ratios(results: list[dict]) -> None:
    """``ratio_to_backbone``: ms/token over the backbone's at the same preset, batch, context."""
    backbone = {(r["preset"], r["batch"], r["context"]): r["ms_per_token"] for r in results
                if r["mode"] == "backbone" and "ms_per_token" in r}
    for r in results:
        ref = backbone.get((r["preset"], r["batch"], r["context"]))
        if "ms_per_token" in r and ref:
            r["ratio_to_backbone"] = r["ms_per_token"] / ref


def acceptance(report: dict) -> list[dict]:
    """The targets, checked on whatever has been measured at the issue's setting (Llama-2-7B,
    context 1024, E 8, k 2, batches 1 8 32 64): switch-fused against the backbone, switch-fused
    against layerwise (speed-up > 1), SGMM bandwidth. The route-change fraction stands beside
    each ratio (a run whose routes rarely change would flatter the adapters)."""
    checks = []
    rows = [r for r in report["results"] if "ms_per_token" in r]
    by_key = {(r["setting"], r["batch"], r["mode"]): r for r in rows}
    for r in rows:
        issue_setting = (r["preset"], r["context"], r.get("experts"), r.get("top_k")) == (
            "llama2-7b", 1024, BASE_EXPERTS, BASE_TOP_K) and r["batch"] in (1, 8, 32, 64)
        if r["mode"] != "switch-fused" or not issue_setting:
            continue
        changes = (r.get("routes") or {}).get("route_change_fraction")
        where = f"batch {r['batch']}, {r['setting']}" + (
            "" if changes is None else f" (routes change on {changes:.0%} of steps)")
        if "ratio_to_backbone" in r:
            target = TARGET_SWITCH_B1 if r["batch"] == 1 else TARGET_SWITCH_BATCHED
            checks.append({"check": f"switch-fused / backbone, {where}",
                           "value": r["ratio_to_backbone"], "target": f"<= {target}",
                           "pass": r["ratio_to_backbone"] <= target})
        for lw in ("layerwise-pallas", "layerwise-xla"):
            other = by_key.get((r["setting"], r["batch"], lw))
            if other:
                speedup = other["ms_per_token"] / r["ms_per_token"]
                checks.append({"check": f"speed-up of switch-fused over {lw}, {where}",
                               "value": speedup, "target": "> 1", "pass": speedup > 1})
    for preset, s in report["sgmm"].items():
        if "fraction" in s:
            checks.append({"check": f"SGMM merge bandwidth / copy bandwidth, {preset}",
                           "value": s["fraction"], "target": f">= {TARGET_SGMM}",
                           "pass": s["fraction"] >= TARGET_SGMM})
    return checks


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _routes(routes: dict | None) -> str:
    if not routes:
        return "-"
    return (f"{routes['distinct_routes_per_step']:.1f} ({routes['distinct_routes_total']}; "
            f"{routes['route_change_fraction']:.0%})")


def markdown(report: dict) -> str:
    """Header (device, versions, bandwidth), acceptance checks, one table row per config."""
    env, bw, args = report["environment"], report["bandwidth"], report["args"]
    lines = [
        f"Adapter decode benchmark, grid `{args['grid']}`: {env['device_kind']}, JAX {env['jax']}, "
        f"{env['date'][:10]}. Random bf16 weights; adapters on all seven projections, rank "
        f"{RANK}; generate loop, 1 vs {args['new_tokens']} new tokens, median of "
        f"{args['reps']}; impl `{args['impl']}`.",
        f"Copy bandwidth {bw['copy_gbps']:.0f} GB/s (read + write). Floor: weights + touched "
        f"experts + keys/values over it. {len(report['results'])} configurations in "
        f"{report['wall_s']:.0f} s" + (f"; {len(report['not_run'])} not run ({report['stopped']})"
                                       if report["not_run"] else "") + ".",
    ]
    if report["sgmm"]:
        lines.append("")
    for preset, s in report["sgmm"].items():
        lines.append(f"SGMM merge alone, {preset}: " + (
            f"{s['ms']:.2f} ms, {s['bytes'] / 1e9:.2f} GB, {s['gbps']:.0f} GB/s, "
            f"{s['fraction']:.2f} of copy bandwidth" if "ms" in s else
            s.get("error") or s["skipped"]))
    if report["acceptance"]:
        lines += ["", "| check | value | target | |", "|---|---:|---:|---|"]
        lines += [f"| {c['check']} | {c['value']:.3f} | {c['target']} | "
                  f"{'PASS' if c['pass'] else 'FAIL'} |" for c in report["acceptance"]]
    lines += [
        "",
        "| setting | batch | mode | ms/token | x backbone | floor ms | of floor | launches/step "
        "| prefill tok/s | routes/step (all; changed) | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['setting']} | {r['batch']} | {r['mode']} | {_f(r.get('ms_per_token'), '.3f')} "
            f"| {_f(r.get('ratio_to_backbone'), '.3f')} | {_f(r.get('floor_ms'), '.3f')} "
            f"| {_f(r.get('fraction'), '.2f')} "
            f"| {r['launches']['launches'] if 'launches' in r else '-'} "
            f"| {_f(r.get('prefill_tokens_per_s'), '.0f')} "
            f"| {_routes(r.get('routes'))} "
            f"| {r.get('error', '')} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Ratio to the backbone per mode against batch, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "ratio_to_backbone" in r]
    settings = list(dict.fromkeys(r["setting"] for r in rows)) or ["(nothing measured yet)"]
    cols = min(3, len(settings))
    nrows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, setting in zip(axes.flat, settings):
        for mode in MODES:
            pts = sorted((r["batch"], r["ratio_to_backbone"]) for r in rows
                         if r["setting"] == setting and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), "o-", label=mode)
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        batches = sorted({r["batch"] for r in rows if r["setting"] == setting})
        if len(batches) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set(xlabel="batch", ylabel="ms/token / backbone", title=setting)
        ax.title.set_fontsize(9)
        ax.grid(True, alpha=0.3)
        if batches:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(settings):]:
        ax.axis("off")
    env = report["environment"]
    fig.suptitle(f"decode time relative to the backbone; {env['device_kind']}, JAX {env['jax']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, folder: str) -> str:
    """Ratios and checks brought up to date, then JSON, Markdown and PNG; returns the Markdown."""
    add_ratios(report["results"])
    report["acceptance"] = acceptance(report)
    stem = os.path.join(folder, f"bench_adapters_{report['args']['grid']}")
    return write_report(report, stem, markdown, plot)


# ------------------------------------------------------------------------------------- main
def _estimate_s(done: list[dict], case: Case) -> float:
    """Seconds the next configuration may take, from the slowest comparable finished one."""
    for same in (lambda r: (r["preset"], r["batch"]) == (case.preset, case.batch),
                 lambda r: r["preset"] == case.preset, lambda r: True):
        walls = [r["wall_s"] for r in done if same(r)]
        if walls:
            return max(walls)
    return 0.0


def _failure(e: Exception) -> str:
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return f"out of memory: {first}" if _is_oom(e) else f"{type(e).__name__}: {first}"


def _sgmm_entry(params: LlamaParams, preset: str, bc: BenchConfig, bw: dict) -> dict:
    """The SGMM kernel's timing for the report, or why there is none."""
    if bc.impl != "mode":
        return {"skipped": "the SGMM kernel is timed on a GPU only (--impl xla)"}
    try:
        s = bench_sgmm(params, PRESETS[preset], bw, reps=10, seed=bc.seed)
    except Exception as e:  # noqa: BLE001 - one failure must not end the run
        traceback.print_exc()
        return {"error": _failure(e)}
    log(f"SGMM merge {s['ms']:.2f} ms, {s['fraction']:.2f} of copy bandwidth")
    return s


def main(bc: BenchConfig) -> dict:
    """Run the grid in order until done or out of time; write after each config; return it."""
    # JAX takes 75 % of GPU memory by default; 7B weights plus a batch-64 cache need more. Only
    # effective before JAX's first use of the device (as under ``python -m``).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    start = time.perf_counter()
    deadline = start + 60 * bc.max_minutes
    cases = bc.cases()
    env = _environment()
    if bc.impl == "mode" and env["platform"] == "cpu":
        raise ValueError("the Pallas modes need a GPU; pass --impl xla for a CPU dry run")
    log(f"{env['device_kind']} ({env['platform']}), JAX {env['jax']}; {len(cases)} configs; {bc}")
    key = jax.random.key(bc.seed)
    gib = bc.copy_gib if bc.copy_gib is not None else (1 / 16 if env["platform"] == "cpu" else 2.0)
    # Best of three: a GPU still clocking up reads low, which would flatter every fraction.
    trials = [measure_bandwidth(gib, bc.copy_reps, jax.random.fold_in(key, i)) for i in range(3)]
    bw = max(trials, key=lambda t: t["copy_gbps"])
    bw["copy_gbps_trials"] = [t["copy_gbps"] for t in trials]
    log(f"copy {bw['copy_gbps']:.0f} GB/s, read {bw['read_gbps']:.0f} GB/s")
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
            log(f"{case.preset}: {_nbytes(params) / 1e9:.3g} GB of weights in "
                f"{time.perf_counter() - t0:.1f}s")
            if bc.sgmm and case.preset not in report["sgmm"]:
                report["sgmm"][case.preset] = _sgmm_entry(params, case.preset, bc, bw)
                gc.collect()
        log(f"[{i + 1}/{len(cases)}] {case.name}")
        t0 = time.perf_counter()
        try:
            row = bench_case(case, params, bc, bw)
        except Exception as e:  # noqa: BLE001 - record the failure, keep measuring the rest
            traceback.print_exc()
            row = {**dataclasses.asdict(case), "setting": case.setting, "error": _failure(e)}
        row["wall_s"] = time.perf_counter() - t0
        report["results"].append(row)
        gc.collect()  # this config's adapter, cache and programs go before the next allocates
        if "ms_per_token" in row:
            log(f"  {row['ms_per_token']:.3f} ms/token, {_f(row['fraction'], '.2f')} of the "
                f"floor, {row['launches']['launches']} launches/step ({row['wall_s']:.0f}s)")
        else:
            log(f"  skipped: {row['error']}")
        report["wall_s"] = time.perf_counter() - start
        write_outputs(report, bc.out)
    report["wall_s"] = time.perf_counter() - start
    table = write_outputs(report, bc.out)
    log(f"wrote {bc.out}/bench_adapters_{bc.grid}.json, .md, .png")
    print(table, flush=True)
    return report


def _filter(text: str) -> tuple[str, tuple[str, ...]]:
    key, sep, values = text.partition("=")
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"--only takes KEY=V1,V2 ..., got {text!r}")
    return key, tuple(values.split(","))


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m loraswitch_jax.eval.bench_adapters",
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
    a = p.parse_args(argv)
    return BenchConfig(
        grid=a.grid, presets=tuple(a.preset) if a.preset else None,
        batches=tuple(a.batch) if a.batch else None,
        contexts=tuple(a.context) if a.context else None, only=tuple(a.only),
        new_tokens=a.new_tokens, reps=a.reps, impl=a.impl, sgmm=not a.no_sgmm,
        max_minutes=a.max_minutes, copy_gib=a.copy_gib, copy_reps=a.copy_reps, seed=a.seed,
        out=a.out,
    )


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
