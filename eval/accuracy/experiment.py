"""Accuracy experiment: does routing once per token (LoRA-Switch) keep per-layer routing's accuracy?

``python -m loraswitch_jax.eval.accuracy --corpus DIR --preset {demo,cpu,gpu} --out OUT
[--seed 0]`` (presets in ``presets.py``)

1. A small Llama with a byte-level vocabulary is pretrained from scratch on the mixture of the
   corpus's train splits (all domains, natural proportions; ``pretrain.py``).
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
(PNG); with ``save_models`` (``loraswitch demo``) also ``backbone/`` (the pretrained model as a
Hugging Face folder with its byte tokenizer) and ``adapters/<name>/``. Everything is
deterministic given the seed (up to floating-point reduction order on the
device).

Primary metric: held-out loss, which resolves differences far below what a few hundred
multiple-choice items can (their intervals are several points wide).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from loraswitch_jax.adapter_io import save_adapter
from loraswitch_jax.adapters import Adapter, AdapterConfig, init_adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.eval.accuracy import scoring
from loraswitch_jax.eval.accuracy.inputs import (Corpus, EvalSet, encode_bytes, eval_set,
                                                 load_corpus, mixture_examples)
from loraswitch_jax.eval.accuracy.presets import (BOS, EOS, MAIN, PRESETS, Preset, adapter_config,
                                                  count_params)
from loraswitch_jax.eval.accuracy.pretrain import pretrain
from loraswitch_jax.eval.accuracy.report import markdown, plots, statement, summary
from loraswitch_jax.eval.accuracy.statistics import compare, summarise
from loraswitch_jax.generate import GenerateConfig, generate
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.sampling import Sampler
from loraswitch_jax.tokenizer import byte_tokenizer
from loraswitch_jax.train.data import DataConfig, TrainBatches
from loraswitch_jax.train.step import OptimConfig, init_state, train_step
from loraswitch_jax.weights import save_params

__all__ = ["BACKBONE_DIR", "PROMPTS", "SAMPLER", "adapter_dir", "check_fresh_text", "demo",
           "evaluate", "finetune", "generate_command", "main", "run"]

PROMPTS = ("def ", "apparition (n.):", "Q: How do I", "It is a truth universally")
SAMPLER = Sampler(temperature=0.8, top_k=20)  # seeded: the generations are reproducible
BACKBONE_DIR = "backbone"  # run(save_models=True) keeps the pretrained model here


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


# ---- outputs ---------------------------------------------------------------------------------

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
        progress: bool = True, save_models: bool = False) -> dict:
    """Run the whole experiment (module docstring) and write its outputs to ``out_dir``.

    Args:
      corpus_dir: a corpus folder (``corpus.py`` layout, with ``tasks/``).
      preset: a name in :data:`PRESETS` or a :class:`Preset`.
      seed: data subsets, shuffling, initialisation and bootstrap all derive from it.
      save_models: also keep the pretrained backbone (``backbone/``: HF folder with the byte
        tokenizer) and every fine-tuned adapter (``adapters/<name>/``), for
        ``loraswitch generate`` (:func:`generate_command`).
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
    if save_models:
        save_params(params, cfg, os.path.join(out_dir, BACKBONE_DIR))
        byte_tokenizer().save(os.path.join(out_dir, BACKBONE_DIR))

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
        if save_models:
            save_adapter(adapter, adapter_dir(out_dir, v.name), cfg)
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


def adapter_dir(out_dir: str, name: str) -> str:
    """Where :func:`run` with ``save_models`` keeps the adapter of variant ``name``."""
    return os.path.join(out_dir, "adapters", name.replace(" ", "_"))


def generate_command(out_dir: str, adapter: str = "switch", prompt: str = PROMPTS[0]) -> str:
    """The ``loraswitch generate`` command over a run's saved backbone and one of its adapters."""
    return shlex.join(["loraswitch", "generate", "--model", os.path.join(out_dir, BACKBONE_DIR),
                       "--adapter", adapter_dir(out_dir, adapter), "--prompt", prompt])


def demo(out_dir: str = "runs/demo-pipeline", progress: bool = True) -> dict:
    """The README's demo: the ``demo`` preset on the bundled sample (tiny model pretrained
    briefly, three adapters fine-tuned and scored, a plot and a generation); prints a summary
    and the command that generates with the kept backbone and adapters."""
    from loraswitch_jax.samples import sample_path

    report = run(sample_path("mixture"), "demo", out_dir, progress=progress, save_models=True)
    print(summary(report))
    for who, outs in report["generations"].items():
        prompt = PROMPTS[0]
        print(f"\n{who} continues {prompt!r}: {outs[prompt]!r}")
    print(f"\nreport: {os.path.join(out_dir, 'report.md')} (plots beside it)")
    print(f"backbone: {os.path.join(out_dir, BACKBONE_DIR)}; adapters: "
          f"{', '.join(adapter_dir(out_dir, m) for m in MAIN)}")
    print(f"generate with them (--adapter any of those; --temperature 0.8 --top-k 20 samples "
          f"as above):\n  {generate_command(out_dir)}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.accuracy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True,
                        help="corpus folder (python -m loraswitch_jax.eval.accuracy.corpus)")
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
