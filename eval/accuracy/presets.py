"""The experiment's scales (presets) and its adapters at equal trainable-parameter budgets."""

from __future__ import annotations

import dataclasses

import jax

from loraswitch_jax.adapters import AdapterConfig, init_adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.train.step import OptimConfig

__all__ = ["BOS", "EOS", "MAIN", "PAD", "PRESETS", "Preset", "Variant", "adapter_config",
           "byte_llama", "count_params", "switch_ablations"]

MAIN = ("lora", "layerwise", "switch")  # the three adapters every preset compares
BOS, EOS, PAD = 256, 257, 258  # byte_tokenizer's special ids


def byte_llama(d: int, layers: int, heads: int, kv_heads: int, ffn: int, max_len: int
               ) -> LlamaConfig:
    """A Llama over :func:`~loraswitch_jax.tokenizer.byte_tokenizer`'s 259 ids."""
    return LlamaConfig(vocab_size=259, hidden_size=d, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                       bos_token_id=BOS, eos_token_id=(EOS,), pad_token_id=PAD)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One fine-tuned adapter. ``None`` fields take the preset's main value; the rank follows
    from the budget (:func:`adapter_config`)."""

    name: str
    mode: str
    num_experts: int | None = None
    top_k: int | None = None
    router_layer: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """Sizes, steps and evaluation limits of one experiment scale.

    Attributes:
      model: the backbone architecture (byte vocabulary).
      seq_len, batch_size: rows of the pretraining and fine-tuning batches.
      pretrain, finetune: AdamW settings and schedules (fine-tuning: the same for every adapter).
      num_experts, expert_rank, top_k, router_layer: the main mixtures' shape; the single LoRA
        has rank ``num_experts * expert_rank``.
      lora_scale: ``alpha / rank`` of every adapter (alpha scales with the rank, so the adapter's
        update size does not depend on it).
      compute_dtype: the backbone's compute dtype (master weights and adapters stay float32).
      max_train_bytes: the mixture is a seeded subset of the train texts of about this size
        (each domain keeps its share); ``None``: all of it.
      heldout_bytes: held-out bytes scored per domain: windows of ``seq_len`` spread over as
        many held-out texts as possible (:func:`spread_windows`).
      items_per_task: multiple-choice items per task (a seeded subset; ``None``: all).
      eval_batch_size: rows per scoring pass.
      eval_min_width: narrowest padded scoring width (each width between it and ``seq_len`` is
        one more compiled shape per model).
      ablations: extra adapters, each compared with the main adapter of its mode.
      generate_tokens: bytes generated per prompt by the backbone and the switch adapter.
      bootstrap_resamples: resamples per bootstrap interval.
    """

    name: str
    model: LlamaConfig
    seq_len: int
    batch_size: int
    pretrain: OptimConfig
    finetune: OptimConfig
    num_experts: int
    expert_rank: int
    top_k: int = 2
    router_layer: int = 0
    lora_scale: float = 2.0
    compute_dtype: str = "float32"
    max_train_bytes: int | None = None
    heldout_bytes: int = 32_000
    items_per_task: int | None = 100
    eval_batch_size: int = 32
    eval_min_width: int = 32
    ablations: tuple[Variant, ...] = ()
    generate_tokens: int = 48
    bootstrap_resamples: int = 2000

    def __post_init__(self):
        if self.seq_len + 1 > self.model.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} does not fit the model's "
                             f"max_position_embeddings {self.model.max_position_embeddings}")
        names = [v.name for v in self.ablations]
        if len(set(names)) != len(names) or set(names) & set(MAIN):
            raise ValueError(f"ablation names must be unique and differ from {MAIN}: {names}")

    def variants(self) -> tuple[Variant, ...]:
        """The three main adapters, then the ablations."""
        return tuple(Variant(name=m, mode=m) for m in MAIN) + self.ablations


def switch_ablations(layers: int, *, ks=(1, 4), experts=(32, 128)) -> tuple[Variant, ...]:
    """Switch variants: other ``k``, other ``E`` (budget kept by the rank), router at ``L/2``."""
    return (*(Variant(name=f"switch k={k}", mode="switch", top_k=k) for k in ks),
            *(Variant(name=f"switch E={e}", mode="switch", num_experts=e) for e in experts),
            Variant(name=f"switch router_layer={layers // 2}", mode="switch",
                    router_layer=layers // 2))


PRESETS: dict[str, Preset] = {
    # README demo on the bundled sample: about a minute and a half on 2 CPU cores.
    "demo": Preset(
        name="demo", model=byte_llama(64, 2, 4, 2, 172, 256), seq_len=128, batch_size=16,
        # 260 + 60 steps of 16 x 128 bytes: within one pass over the bundled sample (328 batches).
        pretrain=OptimConfig(lr=3e-3, warmup_steps=15, steps=260, weight_decay=0.1, b2=0.95),
        finetune=OptimConfig(lr=2e-3, warmup_steps=5, steps=60), num_experts=4, expert_rank=4,
        heldout_bytes=6_000, items_per_task=24, eval_batch_size=32, generate_tokens=40,
        bootstrap_resamples=1000),
    # CPU smoke test (2 cores): ~0.9M params; ~6 minutes end to end; +-10-point task intervals.
    # E=16 rather than 32, as in the committed cpu results: E 32 then took the grouped
    # (ragged_dot) product, no longer chosen, 7x slower to train and 9x to score on a CPU.
    "cpu": Preset(
        name="cpu", model=byte_llama(128, 4, 4, 4, 344, 512), seq_len=256, batch_size=8,
        pretrain=OptimConfig(lr=3e-3, warmup_steps=20, steps=300, weight_decay=0.1, b2=0.95),
        finetune=OptimConfig(lr=2e-3, warmup_steps=8, steps=80), num_experts=8, expert_rank=4,
        max_train_bytes=4_000_000, heldout_bytes=24_000, items_per_task=100,
        ablations=switch_ablations(4, experts=(16,)), generate_tokens=64),
    # H100, JAX 0.11.2: ~25M params (d 512, 8 layers, length 512), bf16 compute. Not measured
    # (no GPU in this session). From FLOPs (5.8 TFLOP per pretraining step at 30-40 % of bf16
    # peak, plus the unfused attention's traffic) a step takes 30-40 ms; DATA.md's guess of
    # 0.3-0.6M tokens/s gives 55-110 ms. Pretraining 800 x 32k tokens (26M; with the 250
    # fine-tuning batches within one pass of the full corpus's 1,088): 0.5-1.5 min; 8 fine-tunes
    # of 250 steps: 0.1-0.5 min each plus ~20 s compiling;
    # 9 evaluations at one padded width (one compile each, ~10 s) on 5 x 400 kB and 4 x 1,000
    # items: 0.2-0.4 min each. In all about 5-9 minutes.
    "gpu": Preset(
        name="gpu", model=byte_llama(512, 8, 8, 8, 1376, 1024), seq_len=512, batch_size=64,
        pretrain=OptimConfig(lr=1e-3, warmup_steps=100, steps=800, weight_decay=0.1, b2=0.95),
        finetune=OptimConfig(lr=1e-3, warmup_steps=20, steps=250), num_experts=8,
        expert_rank=16, compute_dtype="bfloat16", heldout_bytes=400_000, items_per_task=1000,
        eval_batch_size=64, eval_min_width=512, ablations=switch_ablations(8)),
}

# ---- budgets ---------------------------------------------------------------------------------

def adapter_config(preset: Preset, variant: Variant) -> tuple[AdapterConfig, bool]:
    """The variant's adapter and whether its expert budget equals the main one exactly.

    The budget is ``E * r * La`` rank-layers (``La``: adapted layers); a variant's rank is
    ``E0 * r0 * La0 / (E * La)``, rounded up to at least 1 when that is not a whole number.
    The single LoRA is a one-expert case: rank ``E0 * r0 * La0 / La``.
    """
    L = preset.model.num_hidden_layers
    router_layer = preset.router_layer if variant.router_layer is None else variant.router_layer
    if not 0 <= router_layer < L:
        raise ValueError(f"{variant.name}: router_layer {router_layer} is not a layer of {L}")
    budget = preset.num_experts * preset.expert_rank * (L - preset.router_layer)
    experts = 1 if variant.mode == "lora" else (variant.num_experts or preset.num_experts)
    top_k = 1 if variant.mode == "lora" else (variant.top_k or preset.top_k)
    units = experts * (L - router_layer)
    rank = max(1, -(-budget // units))
    common = dict(rank=rank, alpha=preset.lora_scale * rank, router_layer=router_layer)
    if variant.mode == "lora":
        acfg = AdapterConfig.lora(**common)
    else:
        acfg = AdapterConfig(mode=variant.mode, num_experts=experts, top_k=top_k, **common)
    return acfg, rank * units == budget


def count_params(cfg: LlamaConfig, acfg: AdapterConfig) -> dict[str, int]:
    """Trainable parameters of an adapter, split into experts (A, B) and routers."""
    shapes = jax.eval_shape(lambda: init_adapter(cfg, acfg, jax.random.key(0)))
    experts = sum(x.size for x in jax.tree.leaves((shapes.a, shapes.b)))
    routers = 0 if shapes.router is None else shapes.router.size
    return {"experts": int(experts), "routers": int(routers), "total": int(experts + routers)}

