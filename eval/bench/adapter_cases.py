"""What the adapter benchmark runs: its modes, one configuration (a case), and its grids.

Modes (adapters on all seven projections, rank 16, alpha 32, ``B`` filled with small random
values so that no path can skip a zero adapter):

  backbone          no adapter; Pallas kernels
  switch-fused      LoRA-Switch, the routed LoRA term computed beside/inside the projection kernels
  switch-ahead      switch-fused with shrink-ahead (ops.Impl.shrink_ahead): each x A from the launch
                    before its consumer (o's from attention, gate/up's from o, q/k/v's from down)
  switch-merge      LoRA-Switch, the SGMM kernel merges into a working copy when the route changes,
                    then the plain dense step (batch 1 only)
  switch-xla        LoRA-Switch, jnp adapter terms beside XLA dots (unfused)
  layerwise-xla     per-layer top-k routing (MoLA/MixLoRA style), compiled by XLA
  layerwise-pallas  the same with the Pallas projection kernels
  lora              one LoRA (E = k = 1); Pallas kernels
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from loraswitch_jax.adapters import Adapter, AdapterConfig, init_adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.ops import Impl

__all__ = [
    "ALPHA",
    "BASE_EXPERTS",
    "BASE_TOP_K",
    "B_STD",
    "FILTER_KEYS",
    "GRIDS",
    "MODES",
    "RANK",
    "Case",
    "Mode",
    "cache_len",
    "main_grid",
    "make_adapter",
    "model_config",
    "suite_grid",
]

RANK, ALPHA = 16, 32.0
BASE_EXPERTS, BASE_TOP_K = 8, 2
B_STD = 1e-3  # small random B: the adapter term is real work but does not swamp the backbone


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a mode decodes: adapter mode (None: backbone), kernels (``"pallas"`` or ``"xla"``),
    switch strategy (None: not a switch adapter) and the largest batch it runs at."""

    adapter: str | None
    impl: str
    strategy: str | None = None
    max_batch: int | None = None
    shrink_ahead: bool = False  # ops.Impl.shrink_ahead: each x A from the launch before it

    def __post_init__(self):
        if self.impl not in ("pallas", "xla"):
            raise ValueError(f"Mode.impl must be 'pallas' or 'xla', got {self.impl!r}")
        if self.strategy not in (None, "fused", "merge"):
            raise ValueError(f"Mode.strategy must be None, 'fused' or 'merge', got "
                             f"{self.strategy!r}")
        if self.shrink_ahead and self.impl != "pallas":
            raise ValueError("Mode.shrink_ahead needs impl 'pallas'")

    @property
    def ops_impl(self) -> str | Impl:
        """What ``GenerateConfig.impl`` takes: the name, or an ``ops.Impl`` with shrink-ahead."""
        return Impl(backend="pallas", shrink_ahead=True) if self.shrink_ahead else self.impl


MODES: dict[str, Mode] = {
    "backbone": Mode(None, "pallas"),
    "switch-fused": Mode("switch", "pallas", "fused"),
    "switch-ahead": Mode("switch", "pallas", "fused", shrink_ahead=True),
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

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Case.mode {self.mode!r} is not one of {sorted(MODES)}")
        if self.preset not in PRESETS:
            raise ValueError(f"Case.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        if min(self.batch, self.context, self.experts, self.top_k) < 1:
            raise ValueError(f"Case sizes must be positive: {self}")

    @property
    def setting(self) -> str:
        """The plot panel / table group: everything but mode and batch."""
        return f"{self.preset}, context {self.context}, E {self.experts}, k {self.top_k}"

    @property
    def name(self) -> str:
        return f"{self.mode} batch {self.batch} ({self.setting})"

    def fits(self) -> bool:
        """Whether the mode runs at this batch (switch-merge: batch 1 only)."""
        limit = MODES[self.mode].max_batch
        return limit is None or self.batch <= limit

    def adapter_config(self) -> AdapterConfig | None:
        mode = MODES[self.mode].adapter
        if mode is None:
            return None
        if mode == "lora":
            return AdapterConfig.lora(rank=RANK, alpha=ALPHA)
        return AdapterConfig(mode=mode, rank=RANK, alpha=ALPHA, num_experts=self.experts,
                             top_k=self.top_k)


def main_grid(presets=("llama2-7b",), batches=(1, 8, 32, 64), contexts=(1024,)) -> list[Case]:
    """Every mode at E 8, k 2. The acceptance targets' modes at every batch come first."""
    first = ("backbone", "switch-fused", "switch-ahead", "switch-merge")
    rest = ("lora", "layerwise-pallas", "switch-xla", "layerwise-xla")
    cases = []
    for modes in (first, rest):
        cases += [Case(p, m, b, c) for p in presets for c in contexts for b in batches
                  for m in modes]
    return [c for c in cases if c.fits()]


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
    return [c for c in cases if c.fits()]


GRIDS = {"main": main_grid, "suite": suite_grid}
FILTER_KEYS = ("preset", "mode", "batch", "context", "experts", "top_k")


def cache_len(context: int, new_tokens: int) -> int:
    """One cache for both generations (1 and N new tokens), a multiple of 64."""
    return -(-(context + new_tokens) // 64) * 64


def model_config(preset: str, cache_len: int) -> LlamaConfig:
    """The preset, with ``max_position_embeddings`` raised to ``cache_len`` if needed: random
    weights cost the same at positions past the trained range (the suite's context 4096)."""
    cfg = PRESETS[preset]
    if cache_len > cfg.max_position_embeddings:
        cfg = dataclasses.replace(cfg, max_position_embeddings=cache_len)
    return cfg


@functools.partial(jax.jit, static_argnums=(0, 1))
def make_adapter(cfg: LlamaConfig, acfg: AdapterConfig, key: jax.Array) -> Adapter:
    """A bf16 adapter with random ``A`` and small random ``B`` (``B_STD``), made on the device."""
    adapter = init_adapter(cfg, acfg, key, dtype=jnp.bfloat16)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(acfg.targets))
    b = {p: (B_STD * jax.random.normal(k, adapter.b[p].shape, jnp.float32)).astype(jnp.bfloat16)
         for p, k in zip(acfg.targets, keys)}
    return dataclasses.replace(adapter, b=b)
