"""Accuracy experiment: does routing once per token (LoRA-Switch) keep per-layer routing's accuracy?

``python -m loraswitch_jax.eval.accuracy --corpus DIR --preset {demo,cpu,gpu} --out OUT [--seed 0]``

1. A small Llama with a byte-level vocabulary is pretrained from scratch on the mixture of the
   corpus's train splits (all domains, natural proportions; ``eval/pretrain.py``).
2. From that backbone, adapters are fine-tuned with the same steps, schedule, seed and batches
   (the mixture's rows that come after the pretraining stream, new to the backbone), at equal
   trainable-parameter budgets: a single LoRA of rank ``E * r``; ``layerwise`` (E experts of rank
   r, top-k, a router per layer: MoLA/MixLoRA style); ``switch`` (same experts, one router at
   ``router_layer``). Expert parameters are equal; routers add ``d * E`` (switch) or
   ``La * d * E`` (layerwise) on top, counted and reported.
3. Every model (and the backbone alone) is scored on held-out text (nats/byte per domain) and on
   the multiple-choice tasks (accuracy on summed and on per-byte log-probability, Wilson 95 %
   intervals, trivial baselines beside them); method differences get paired bootstrap intervals
   (stratified by domain / task for the macro averages). Held-out intervals draw whole held-out
   texts (all windows of a drawn text; windows of one text are correlated), task intervals
   draw whole source units (all items of a drawn synset, Austen block, FAQ question or
   documentation file: items cut from one unit share text).
4. Ablations of the switch adapter: ``k``, ``E`` (rank
   scaled to keep ``E * r * La`` fixed, rounded up to 1 where it cannot) and ``router_layer``
   (``0``: the route depends on the token id alone; ``L/2``: on context; adapters sit on layers
   ``router_layer..L-1`` in every mode, so the rank doubles to keep the budget).

Outputs in OUT: ``report.json`` (config, seeds, data hashes, timings, every number),
``report.md`` (tables and a plain statement of the result), ``scores.npz`` (per-window and
per-item scores, with each window's domain and text and each item's source unit: enough to
recompute every interval), plots
(PNG). Everything is deterministic given the seed (up to floating-point reduction order on the
device).

Primary metric: held-out loss, which resolves differences far below what a few hundred
multiple-choice items can (their intervals are several points wide).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import sys
import time
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from loraswitch_jax.adapters import Adapter, AdapterConfig, init_adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.eval import scoring
from loraswitch_jax.eval.accuracy_report import MAIN, markdown, plots, statement, summary
from loraswitch_jax.eval.corpus import DOMAINS, read_units
from loraswitch_jax.eval.pretrain import pretrain
from loraswitch_jax.eval.tasks import TASKS, baselines, load_items
from loraswitch_jax.generate import GenerateConfig, generate
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.sampling import Sampler
from loraswitch_jax.tokenizer import byte_tokenizer
from loraswitch_jax.train.data import DataConfig, Examples, TrainBatches
from loraswitch_jax.train.step import OptimConfig, init_state, train_step

__all__ = ["PRESETS", "Preset", "Variant", "adapter_config", "byte_llama", "count_params", "demo",
           "encode_bytes", "load_corpus", "main", "run", "spread_windows"]

BOS, EOS, PAD = 256, 257, 258  # byte_tokenizer's special ids
PROMPTS = ("def ", "apparition (n.):", "Q: How do I", "It is a truth universally")
SAMPLER = Sampler(temperature=0.8, top_k=20)  # seeded: the generations are reproducible


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


def _switch_ablations(layers: int, *, ks=(1, 4), experts=(32, 128)) -> tuple[Variant, ...]:
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
    # E=16 rather than 32 here: above 16 experts the adapters take the grouped (ragged_dot)
    # product, which on a CPU measured 7x slower to train and 9x slower to score.
    "cpu": Preset(
        name="cpu", model=byte_llama(128, 4, 4, 4, 344, 512), seq_len=256, batch_size=8,
        pretrain=OptimConfig(lr=3e-3, warmup_steps=20, steps=300, weight_decay=0.1, b2=0.95),
        finetune=OptimConfig(lr=2e-3, warmup_steps=8, steps=80), num_experts=8, expert_rank=4,
        max_train_bytes=4_000_000, heldout_bytes=24_000, items_per_task=100,
        ablations=_switch_ablations(4, experts=(16,)), generate_tokens=64),
    # H100, JAX 0.11.2: ~25M params (d 512, 8 layers, length 512), bf16 compute. Not measured
    # (no GPU in this session). From FLOPs (5.8 TFLOP per pretraining step at 30-40 % of bf16
    # peak, plus the unfused attention's traffic) a step takes 30-40 ms; DATA.md's guess of
    # 0.3-0.6M tokens/s gives 55-110 ms. Pretraining 800 x 32k tokens (26M; with the 250
    # fine-tuning batches within one pass of the full corpus's 1,088): 0.5-1.5 min; 8 fine-tunes of 250 steps: 0.1-0.5 min each plus ~20 s compiling;
    # 9 evaluations at one padded width (one compile each, ~10 s) on 5 x 400 kB and 4 x 1,000
    # items: 0.2-0.4 min each. In all about 5-9 minutes.
    "gpu": Preset(
        name="gpu", model=byte_llama(512, 8, 8, 8, 1376, 1024), seq_len=512, batch_size=64,
        pretrain=OptimConfig(lr=1e-3, warmup_steps=100, steps=800, weight_decay=0.1, b2=0.95),
        finetune=OptimConfig(lr=1e-3, warmup_steps=20, steps=250), num_experts=8,
        expert_rank=16, compute_dtype="bfloat16", heldout_bytes=400_000, items_per_task=1000,
        eval_batch_size=64, eval_min_width=512, ablations=_switch_ablations(8)),
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


# ---- data ------------------------------------------------------------------------------------

def encode_bytes(text: str) -> np.ndarray:
    """``byte_tokenizer().encode(text, add_special_tokens=False)``, computed directly: its ids
    0-255 are the UTF-8 bytes (~100x faster than the tokenizer on a 40 MB corpus)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _seeded_order(n: int, seed: int, name: str) -> np.ndarray:
    return np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(n)


def _take_bytes(texts: Sequence[str], budget: float, seed: int, name: str) -> list[str]:
    """A seeded subset of ``texts`` of about ``budget`` UTF-8 bytes (whole texts), file order."""
    kept, total = [], 0
    for i in _seeded_order(len(texts), seed, name):
        if total >= budget:
            break
        kept.append(int(i))
        total += len(texts[i].encode("utf-8"))
    return [texts[i] for i in sorted(kept)]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The experiment's text: per-domain train and held-out token ids, task items, file hashes."""

    root: str
    domains: tuple[str, ...]
    train: dict[str, list[np.ndarray]]
    heldout: dict[str, list[np.ndarray]]
    tasks: dict[str, list[dict]]
    info: dict  # sizes, hashes and manifest digests for the report


def load_corpus(root: str, preset: Preset, seed: int) -> Corpus:
    """Read a corpus folder (``eval/corpus.py`` layout, tasks from ``eval/tasks.py``).

    Domains are those with a ``{domain}.train.jsonl`` (known domains first, in their order);
    each needs its ``.heldout.jsonl``. Tasks are the ``tasks/*.jsonl`` files.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus folder {root!r} does not exist")
    names = sorted(f[:-len(".train.jsonl")] for f in os.listdir(root) if f.endswith(".train.jsonl"))
    domains = tuple(d for d in DOMAINS if d in names) + tuple(d for d in names if d not in DOMAINS)
    if not domains:
        raise FileNotFoundError(f"no {{domain}}.train.jsonl files in corpus folder {root!r}; "
                                "build one with python -m loraswitch_jax.eval.corpus")
    info = {"root": os.path.abspath(root), "files": {}, "domains": {}, "tasks": {}}
    manifest = os.path.join(root, "manifest.json")
    if os.path.exists(manifest):
        info["manifest_sha256"] = _sha256(manifest)
        with open(manifest, encoding="utf-8") as f:
            m = json.load(f)
        info["manifest"] = {k: m[k] for k in ("created", "builder", "packages") if k in m}
    raw = {}
    for domain in domains:
        for split in ("train", "heldout"):
            path = os.path.join(root, f"{domain}.{split}.jsonl")
            if not os.path.exists(path):
                raise FileNotFoundError(f"corpus folder {root!r} has {domain}.train.jsonl but "
                                        f"no {domain}.{split}.jsonl")
            info["files"][os.path.basename(path)] = _sha256(path)
            raw[domain, split] = [row["text"] for row in read_units(path)]
    total_train = sum(len(t.encode("utf-8")) for d in domains for t in raw[d, "train"])
    cap = preset.max_train_bytes
    share = 1.0 if cap is None else min(1.0, cap / total_train)
    train, heldout = {}, {}
    for domain in domains:
        texts = raw[domain, "train"]
        size = sum(len(t.encode("utf-8")) for t in texts)
        used = texts if share >= 1 else _take_bytes(texts, share * size, seed, f"train:{domain}")
        train[domain] = [encode_bytes(t) for t in used if t]
        heldout[domain] = [encode_bytes(t) for t in raw[domain, "heldout"] if t]
        if not heldout[domain]:
            raise ValueError(f"{domain}.heldout.jsonl in {root!r} has no text to score")
        info["domains"][domain] = {
            "train_texts": len(texts), "train_bytes": size, "used_train_texts": len(train[domain]),
            "used_train_bytes": int(sum(t.size for t in train[domain])),
            "heldout_texts": len(heldout[domain]),
            "heldout_bytes": int(sum(t.size for t in heldout[domain]))}
    tasks = {}
    task_dir = os.path.join(root, "tasks")
    found = sorted(f[:-len(".jsonl")] for f in os.listdir(task_dir) if f.endswith(".jsonl")) \
        if os.path.isdir(task_dir) else []
    for task in [t for t in TASKS if t in found] + [t for t in found if t not in TASKS]:
        path = os.path.join(task_dir, f"{task}.jsonl")
        info["files"][f"tasks/{task}.jsonl"] = _sha256(path)
        items = load_items(path)
        if preset.items_per_task is not None and len(items) > preset.items_per_task:
            keep = np.sort(_seeded_order(len(items), seed, f"task:{task}")[:preset.items_per_task])
            items = [items[i] for i in keep]
        tasks[task] = items
        info["tasks"][task] = {"items": len(items), "units": len({i["unit"] for i in items}),
                               "baselines": baselines(items)}
    return Corpus(root, domains, train, heldout, tasks, info)


def mixture_examples(corpus: Corpus) -> Examples:
    """All domains' train texts as ``BOS + bytes + EOS`` examples (BOS is not a target)."""
    pieces = [np.concatenate([[BOS], t, [EOS]]).astype(np.int32)
              for d in corpus.domains for t in corpus.train[d]]
    lengths = np.array([p.size for p in pieces], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces)
    target_mask = np.ones(tokens.size, bool)
    target_mask[offsets[:-1]] = False
    return Examples(tokens, target_mask, offsets)


# ---- fine-tuning and evaluation --------------------------------------------------------------

def finetune(params: LlamaParams, cfg: LlamaConfig, acfg: AdapterConfig, batches: TrainBatches,
             oc: OptimConfig, *, seed: int, progress: bool, desc: str) -> tuple[Adapter, dict]:
    """Train a fresh adapter on a frozen backbone; returns it and its record (loss curve, usage,
    timings)."""
    # One compiled program instead of an eager dispatch (and compile) per initialiser op.
    init = jax.jit(lambda: init_state(init_adapter(cfg, acfg, jax.random.key(seed)), oc, seed))
    state = init()
    losses, usage, pending = [], [], []
    start, compile_seconds = time.perf_counter(), 0.0
    bar = tqdm(total=oc.steps, desc=desc, unit="step", disable=not progress, leave=False)
    for step in range(oc.steps):
        batch = {k: jnp.asarray(v[None]) for k, v in next(batches).items()}
        state, metrics = train_step(state, params, batch, cfg=cfg, oc=oc)
        pending.append(metrics)
        if step == 0:
            jax.block_until_ready(metrics)
            compile_seconds = time.perf_counter() - start
        if (step + 1) % 10 == 0 or step + 1 == oc.steps:  # read back in groups: no stall per step
            for m in jax.device_get(pending):
                losses.append(float(m["loss"]))
                if "usage" in m:
                    usage.append(np.asarray(m["usage"]))
            pending = []
            bar.update(len(losses) - bar.n)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(f"{desc}: fine-tuning loss is {losses[-1]}; lower the learning "
                                 f"rate (lr={oc.lr})")
    record = {"seconds": time.perf_counter() - start, "compile_seconds": compile_seconds,
              "losses": losses, "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):]))}
    if usage:
        record["train_usage"] = np.mean(usage, axis=0).tolist()  # [routers, E]
    return state.adapter, record


def spread_windows(owner: np.ndarray, size: np.ndarray, budget: int, seed: int, name: str
                   ) -> np.ndarray:
    """Indices of windows holding about ``budget`` scored bytes, spread over as many texts as
    possible: one random window of every text (texts in random order), then a second one of
    every text that has more, and so on. ``owner [n]``: each window's text; ``size [n]``: its
    scored bytes. Sorted indices."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shuffled = rng.permutation(len(owner))
    grouped = shuffled[np.argsort(owner[shuffled], kind="stable")]  # by text, random within
    first = np.searchsorted(owner[grouped], owner[grouped])
    rank = np.empty(len(owner), np.int64)
    rank[grouped] = np.arange(len(grouped)) - first  # round in which each window is taken
    text_order = rng.permutation(int(owner.max()) + 1)
    order = np.lexsort((text_order[owner], rank))
    taken = int(np.searchsorted(np.cumsum(size[order]), budget)) + 1
    return np.sort(order[:taken])


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Sequences to score, built once and shared by every model. Held-out intervals resample
    whole texts (``window_text``), not windows; task intervals whole source units
    (``item_unit``), not items."""

    heldout: list[scoring.TokenSequence]  # windows
    window_domain: np.ndarray  # window -> domain index
    window_text: np.ndarray  # window -> held-out text (numbered across domains)
    choices: list[scoring.TokenSequence]
    choice_bytes: dict[str, np.ndarray]  # task -> [n, 4]
    choice_rows: dict[str, slice]  # task -> its rows of `choices` (item-major, 4 per item)
    truncated: dict[str, int]
    item_unit: dict[str, np.ndarray]  # task -> [n] source unit of each item (str)
    info: dict  # per domain: texts, windows and bytes scored


def eval_set(corpus: Corpus, preset: Preset, seed: int) -> EvalSet:
    """Held-out windows of every domain (:func:`spread_windows`) and option sequences of every
    task."""
    windows, window_domain, window_text, info = [], [], [], {}
    first_text = 0  # the domain's first text number
    for i, domain in enumerate(corpus.domains):
        seqs, owner = scoring.heldout_sequences(corpus.heldout[domain], BOS, preset.seq_len)
        size = np.array([s.targets.sum() for s in seqs])
        keep = spread_windows(owner, size, preset.heldout_bytes, seed, f"heldout:{domain}")
        windows += [seqs[j] for j in keep]
        window_domain += [i] * len(keep)
        window_text += (first_text + owner[keep]).tolist()
        first_text += len(corpus.heldout[domain])
        info[domain] = {"texts": len(np.unique(owner[keep])), "windows": len(keep),
                        "bytes": int(size[keep].sum())}
    choices, choice_bytes, rows, truncated, units = [], {}, {}, {}, {}
    for task, items in corpus.tasks.items():
        seqs, num_bytes, cut = scoring.choice_sequences(items, encode_bytes, BOS, preset.seq_len)
        rows[task] = slice(len(choices), len(choices) + len(seqs))
        choices += seqs
        choice_bytes[task], truncated[task] = num_bytes, cut
        units[task] = np.array([item["unit"] for item in items], dtype=str)
    return EvalSet(windows, np.asarray(window_domain, np.int64),
                   np.asarray(window_text, np.int64), choices, choice_bytes, rows, truncated,
                   units, info)


def evaluate(params: LlamaParams, cfg: LlamaConfig, adapter: Adapter | None, data: EvalSet,
             corpus: Corpus, preset: Preset, *, progress: bool, desc: str) -> dict:
    """Held-out ``nll``/``size`` per window, routing ``usage`` per domain and ``ChoiceScores``
    per task of one model (numpy; summarised by :func:`summarise`)."""
    kwargs = dict(adapter=adapter, batch_size=preset.eval_batch_size, max_len=preset.seq_len,
                  min_width=preset.eval_min_width, progress=progress)
    held = scoring.score_sequences(params, cfg, data.heldout, desc=f"{desc} held-out", **kwargs)
    out = {"nll": -held.logprob, "size": held.count.astype(np.float64), "tasks": {}}
    if held.usage is not None:
        out["usage"] = np.stack([held.usage[data.window_domain == i].sum(0)
                                 for i in range(len(corpus.domains))])
    if data.choices:
        scores = scoring.score_sequences(params, cfg, data.choices, desc=f"{desc} tasks", **kwargs)
        for task, items in corpus.tasks.items():
            part = scoring.Scores(scores.logprob[data.choice_rows[task]],
                                  scores.count[data.choice_rows[task]], None)
            out["tasks"][task] = scoring.choice_scores(part, data.choice_bytes[task], items,
                                                       data.truncated[task])
    return out


# ---- statistics ------------------------------------------------------------------------------

def _interval(lo_hi: tuple[float, float]) -> list[float]:
    return [round(x, 6) for x in lo_hi]


def _macro_loss(nll: np.ndarray, size: np.ndarray, domain: np.ndarray, n_domains: int
                ) -> np.ndarray:
    """Mean over domains of nats/byte; works on ``[..., texts]`` arrays."""
    per = [nll[..., domain == i].sum(-1) / size[..., domain == i].sum(-1) for i in range(n_domains)]
    return np.mean(per, axis=0)


def routing_information(usage: np.ndarray) -> float:
    """Mutual information (bits) between a scored token's domain and an expert pick, from
    ``usage [domains, E]`` pick counts: 0 when every domain uses the experts alike."""
    joint = usage / usage.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log2(joint[nz] / outer[nz])))


def summarise(result: dict, data: EvalSet, corpus: Corpus) -> dict:
    """The JSON numbers of one model: nats/byte per domain, accuracies with Wilson intervals."""
    domain = data.window_domain
    heldout = {d: float(result["nll"][domain == i].sum() / result["size"][domain == i].sum())
               for i, d in enumerate(corpus.domains)}
    heldout["mean"] = float(np.mean(list(heldout.values())))
    tasks = {}
    for task, cs in result["tasks"].items():
        n = len(cs.answer)
        tasks[task] = {"items": n, "truncated_contexts": cs.truncated}
        for name, correct in (("sum", cs.correct_sum), ("norm", cs.correct_norm)):
            tasks[task][f"acc_{name}"] = float(correct.mean())
            tasks[task][f"ci_{name}"] = _interval(scoring.wilson_interval(correct.sum(), n))
    out = {"heldout_nats_per_byte": heldout, "tasks": tasks}
    if tasks:
        for name in ("sum", "norm"):
            out[f"tasks_mean_acc_{name}"] = float(np.mean([t[f"acc_{name}"]
                                                           for t in tasks.values()]))
    if "usage" in result:
        usage = result["usage"]
        share = usage / usage.sum(1, keepdims=True)
        out["routing"] = {"usage_by_domain": share.round(4).tolist(),
                          "domain_expert_information_bits": routing_information(usage)}
    return out


def _task_strata(units: Sequence[np.ndarray]) -> np.ndarray:
    """Per item (tasks concatenated), its task's stratum: the task's index, except that tasks
    sharing a source unit (the two definition tasks share synsets) form one stratum, so that a
    drawn unit brings its items in all of them."""
    parent = list(range(len(units)))

    def root(j):
        while parent[j] != j:
            j = parent[j]
        return j

    first = {}  # unit -> the first task holding it
    for j, task_units in enumerate(units):
        for unit in np.unique(task_units):
            parent[root(j)] = root(first.setdefault(unit, j))
    return np.concatenate([np.full(len(u), root(j)) for j, u in enumerate(units)])


def compare(a: dict, b: dict, data: EvalSet, domains: Sequence[str], resamples: int, seed: int
            ) -> dict:
    """``a - b``: held-out loss (macro and per domain) and task accuracies, paired bootstrap.

    Held-out intervals draw whole texts (:attr:`EvalSet.window_text`), task intervals whole
    source units (:attr:`EvalSet.item_unit`), the same for both methods; the macro averages
    draw them within domains / tasks (:func:`_task_strata`).
    """
    dom, text = data.window_domain, data.window_text

    def interval(statistic, *columns, strata=None, groups=None):
        return _interval(scoring.bootstrap(statistic, *columns, resamples=resamples, seed=seed,
                                           strata=strata, groups=groups))

    def macro_diff(nll_a, nll_b, size):  # mean over domains of the nats/byte difference
        return (_macro_loss(nll_a, size, dom, len(domains))
                - _macro_loss(nll_b, size, dom, len(domains)))

    def ratio_diff(nll_a, nll_b, size):
        return (nll_a.sum(-1) - nll_b.sum(-1)) / size.sum(-1)

    columns = (a["nll"], b["nll"], a["size"])
    out = {"heldout_mean": {"diff": float(macro_diff(*columns)),
                            "ci": interval(macro_diff, *columns, strata=dom, groups=text)},
           "heldout_by_domain": {}}
    for i, name in enumerate(domains):
        part = [c[dom == i] for c in columns]
        out["heldout_by_domain"][name] = {"diff": float(ratio_diff(*part)),
                                          "ci": interval(ratio_diff, *part, groups=text[dom == i])}
    if not a["tasks"]:
        return out
    tasks = list(a["tasks"])
    labels = np.concatenate([np.full(len(a["tasks"][t].answer), j) for j, t in enumerate(tasks)])
    units = np.concatenate([data.item_unit[t] for t in tasks])
    strata = _task_strata([data.item_unit[t] for t in tasks])

    # Accuracy differences as ratios of sums (a column of ones counts the items): the unit
    # bootstrap weights rows by how often their unit was drawn (scoring.bootstrap).
    def macro_acc_diff(x, y, ones):  # mean over tasks of the accuracy difference
        return np.mean([ratio_diff(x[..., labels == j], y[..., labels == j],
                                   ones[..., labels == j]) for j in range(len(tasks))], axis=0)

    for kind in ("sum", "norm"):
        x = {t: getattr(a["tasks"][t], f"correct_{kind}") for t in tasks}
        y = {t: getattr(b["tasks"][t], f"correct_{kind}") for t in tasks}
        out[f"acc_{kind}_by_task"] = {
            t: {"diff": float(ratio_diff(x[t], y[t], np.ones(len(x[t])))),
                "ci": interval(ratio_diff, x[t], y[t], np.ones(len(x[t])),
                               groups=data.item_unit[t])} for t in tasks}
        xs, ys = np.concatenate(list(x.values())), np.concatenate(list(y.values()))
        ones = np.ones(len(xs))
        out[f"tasks_mean_acc_{kind}"] = {
            "diff": float(macro_acc_diff(xs, ys, ones)),
            "ci": interval(macro_acc_diff, xs, ys, ones, strata=strata, groups=units)}
    return out


# ---- the statement ---------------------------------------------------------------------------

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _environment() -> dict:
    device = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": f"{device.platform} {device.device_kind}",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _save_scores(results: dict, data: EvalSet, path: str) -> None:
    # The windows' domain and text and the items' units are shared by every model: the intervals
    # group by them.
    arrays = {"heldout_domain": data.window_domain, "heldout_text": data.window_text,
              **{f"task_unit/{task}": units for task, units in data.item_unit.items()}}
    for name, r in results.items():
        arrays[f"{name}/heldout_nll"], arrays[f"{name}/heldout_bytes"] = r["nll"], r["size"]
        for task, cs in r["tasks"].items():
            arrays[f"{name}/{task}/logprob"] = cs.logprob
            arrays[f"{name}/{task}/option_bytes"] = cs.num_bytes
            arrays[f"{name}/{task}/answer"] = cs.answer
    np.savez_compressed(path, **arrays)


def _generations(params, cfg, adapters: Mapping[str, Adapter | None], n: int, seed: int) -> dict:
    tokenizer = byte_tokenizer()
    gen = GenerateConfig(max_new_tokens=n, sampler=SAMPLER, stop_tokens=(EOS,), impl="xla")
    prompts = [np.concatenate([[BOS], encode_bytes(p)]).astype(np.int32) for p in PROMPTS]
    out = {}
    for who, adapter in adapters.items():
        rows = generate(params, cfg, prompts, gen, adapter=adapter, seed=seed).as_lists()
        out[who] = {p: tokenizer.decode([t for t in row if t < 256])  # bytes only
                    for p, row in zip(PROMPTS, rows)}
    return out


# ---- the experiment --------------------------------------------------------------------------

def check_fresh_text(p: Preset, batches_per_epoch: int) -> None:
    """Pretraining and fine-tuning together must fit one pass over the training text, so that
    fine-tuning reads only text the backbone has not seen."""
    needed = p.pretrain.steps + p.finetune.steps
    if needed > batches_per_epoch:
        raise ValueError(
            f"preset {p.name!r}: {p.pretrain.steps} pretraining + {p.finetune.steps} fine-tuning "
            f"steps need {needed} batches, but one pass over this corpus has "
            f"{batches_per_epoch}: fine-tuning would reuse text the backbone has seen")


def run(corpus_dir: str, preset: str | Preset, out_dir: str, seed: int = 0,
        progress: bool = True) -> dict:
    """Run the whole experiment (module docstring) and write its outputs to ``out_dir``.

    Args:
      corpus_dir: a corpus folder (``eval/corpus.py`` layout, with ``tasks/``).
      preset: a name in :data:`PRESETS` or a :class:`Preset`.
      seed: data subsets, shuffling, initialisation and bootstrap all derive from it.
    Returns:
      The report (also written as ``report.json``).
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    os.makedirs(out_dir, exist_ok=True)
    timings, start = {}, time.perf_counter()
    corpus = load_corpus(corpus_dir, p, seed)
    examples = mixture_examples(corpus)
    data = eval_set(corpus, p, seed)
    dcfg = DataConfig(path=corpus_dir, format="jsonl", seq_len=p.seq_len,
                      batch_size=p.batch_size, seed=seed)
    batches = TrainBatches(examples, dcfg)
    check_fresh_text(p, batches.batches_per_epoch)
    timings["load"] = time.perf_counter() - start

    cfg = p.model
    pre = pretrain(cfg, batches, p.pretrain, seed=seed, compute_dtype=p.compute_dtype,
                   progress=progress)
    timings["pretrain"] = pre.seconds
    # Fine-tuning continues the mixture's stream where pretraining stopped: text the backbone
    # has not been trained on, the same batches for every adapter.
    stream = batches.state()
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(p.compute_dtype)), pre.params)

    t = time.perf_counter()
    results = {"backbone": evaluate(params, cfg, None, data, corpus, p, progress=progress,
                                    desc="backbone")}
    timings["eval backbone"] = time.perf_counter() - t
    methods, adapters = {"backbone": {}}, {}
    for v in tqdm(p.variants(), desc="adapters", unit="adapter", disable=not progress):
        acfg, exact = adapter_config(p, v)
        adapter, record = finetune(params, cfg, acfg, TrainBatches(examples, dcfg, state=stream),
                                   p.finetune, seed=seed, progress=progress, desc=v.name)
        timings[f"finetune {v.name}"] = record["seconds"]
        t = time.perf_counter()
        results[v.name] = evaluate(params, cfg, adapter, data, corpus, p, progress=progress,
                                   desc=v.name)
        timings[f"eval {v.name}"] = time.perf_counter() - t
        methods[v.name] = {"adapter": acfg.to_dict(), "budget_exact": exact,
                           "params": count_params(cfg, acfg), "finetune": record}
        if v.name == "switch":
            adapters["switch"] = adapter
    for name, r in results.items():
        methods[name].update(summarise(r, data, corpus))

    pairs = [("switch", "layerwise"), ("switch", "lora"), ("layerwise", "lora"),
             *((name, "backbone") for name in MAIN), *((v.name, v.mode) for v in p.ablations)]
    comparisons = {f"{a} vs {b}": compare(results[a], results[b], data, corpus.domains,
                                       p.bootstrap_resamples, seed) for a, b in pairs}
    t = time.perf_counter()
    generations = (_generations(params, cfg, {"backbone": None, **adapters}, p.generate_tokens,
                                seed) if p.generate_tokens else {})
    timings["generate"] = time.perf_counter() - t
    report = {
        "preset": p.name, "seed": seed,
        "reproduce": f"python -m loraswitch_jax.eval.accuracy --corpus {corpus_dir} "
                     f"--preset {p.name} --out {out_dir} --seed {seed}",
        "config": dataclasses.asdict(p), "environment": _environment(),
        "data": {**corpus.info, "mixture_tokens": int(examples.tokens.size),
                 "mixture_rows": batches.num_rows, "heldout_scored": data.info},
        "backbone": {"params": cfg.num_params(), "pretrain": {
            "steps": len(pre.losses), "tokens": pre.tokens, "seconds": pre.seconds,
            "compile_seconds": pre.compile_seconds, "tokens_per_second": pre.tokens_per_second,
            "final_loss": float(np.mean(pre.losses[-max(1, len(pre.losses) // 10):])),
            "losses": pre.losses}},
        "methods": methods, "comparisons": comparisons,
        "bootstrap_units": {"heldout": "text", "tasks": "unit"},  # what compare() resamples
        "ablations": [v.name for v in p.ablations], "generations": generations,
        "sampler": {"temperature": SAMPLER.temperature, "top_k": SAMPLER.top_k},
    }
    report["statement"] = statement(report)
    report["plots"] = plots(report, out_dir)
    _save_scores(results, data, os.path.join(out_dir, "scores.npz"))
    timings["total"] = time.perf_counter() - start
    report["timings"] = timings
    report = _jsonable(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    return report


def demo(out_dir: str = "runs/accuracy-demo", progress: bool = True) -> dict:
    """The README's demo: the ``demo`` preset on the bundled sample (tiny model pretrained
    briefly, three adapters fine-tuned and scored, a plot and a generation); prints a summary."""
    from loraswitch_jax.samples import sample_path

    report = run(sample_path("mixture"), "demo", out_dir, progress=progress)
    print(summary(report))
    for who, outs in report["generations"].items():
        prompt = PROMPTS[0]
        print(f"\n{who} continues {prompt!r}: {outs[prompt]!r}")
    print(f"\nreport: {os.path.join(out_dir, 'report.md')} (plots beside it)")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.accuracy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus folder (eval/corpus.py)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = run(args.corpus, args.preset, args.out, seed=args.seed, progress=not args.quiet)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(summary(report))
    print(f"\nreport: {os.path.join(args.out, 'report.md')}")


if __name__ == "__main__":
    main()
