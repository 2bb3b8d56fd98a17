"""The accuracy experiment's report: the plain statement, Markdown tables, plots and a summary.

Everything here reads the ``report`` dict that ``loraswitch_jax.eval.accuracy.experiment.run``
builds (and writes as ``report.json``), so a report can be re-rendered without re-running the
experiment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from loraswitch_jax.eval.accuracy.presets import MAIN

__all__ = ["markdown", "plots", "statement", "summary"]

# The trivial rules of tasks.py's baselines(); "stem" is None for tasks without a headword.
BASELINES = ("longest", "shortest", "overlap", "stem")
# "switch matches layerwise": |switch - layerwise| held-out loss within 10 % of what layerwise
# gains over the backbone (a margin tied to the adapter effect, not to the loss itself, which
# would be about half of that effect at these scales).
EQUIVALENCE_MARGIN = 0.10


def _judge(ci: Sequence[float], margin: float | None = None) -> tuple[str, bool]:
    """A loss difference's direction from its interval (``better``: all below 0, ``worse``: all
    above, else ``unresolved``) and whether the interval lies within ``+-margin``."""
    lo, hi = ci
    direction = "better" if hi < 0 else "worse" if lo > 0 else "unresolved"
    return direction, margin is not None and -margin <= lo and hi <= margin


def statement(report: dict) -> str:
    """One paragraph: how the result compares with the paper's claim (switch ~ layerwise, both
    better than a single LoRA at equal parameters), judged on held-out loss."""
    m, c = report["methods"], report["comparisons"]
    loss = {k: m[k]["heldout_nats_per_byte"]["mean"] for k in (*MAIN, "backbone")}
    margin = EQUIVALENCE_MARGIN * abs(loss["backbone"] - loss["layerwise"])
    sl, sr, lr = (c[k]["heldout_mean"] for k in ("switch vs layerwise", "switch vs lora",
                                                  "layerwise vs lora"))
    d_sl, eq_sl = _judge(sl["ci"], margin)
    d_sr, _ = _judge(sr["ci"])
    d_lr, _ = _judge(lr["ci"])

    def fmt(x):
        return f"{x['diff']:+.4f} [{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}]"

    words = {"better": "lower (better)", "worse": "higher (worse)",
             "unresolved": "not resolved by the interval"}
    sl_words = words[d_sl] + (f", and within the ±{margin:.4f} equivalence margin (10 % of "
                              f"layerwise's gain over the backbone)" if eq_sl else "")
    p = report["config"]
    rl = m["switch"]["adapter"]["router_layer"]
    token_only = ", i.e. routes on the token id alone" if rl == 0 else ""
    text = (f"Paper's claim: routing once per token (switch) keeps the accuracy of per-layer "
            f"routing (layerwise), and both beat a single LoRA at equal trainable parameters. "
            f"Here ({p['name']} preset: a {report['backbone']['params'] / 1e6:.2f}M-parameter "
            f"byte-level Llama pretrained for {p['pretrain']['steps']} steps, adapters fine-tuned "
            f"for {p['finetune']['steps']} steps on the same mixture; "
            f"{m['switch']['params']['experts']:,} expert parameters each: LoRA of rank "
            f"{m['lora']['adapter']['rank']} for every token, mixtures of "
            f"{m['switch']['adapter']['num_experts']} experts of rank "
            f"{m['switch']['adapter']['rank']} of which {m['switch']['adapter']['top_k']} serve "
            f"a token; the switch router reads layer {rl}'s input{token_only}), mean held-out "
            f"loss over "
            f"{len(report['data']['domains'])} domains is switch {loss['switch']:.4f}, layerwise "
            f"{loss['layerwise']:.4f}, LoRA {loss['lora']:.4f} nats/byte (backbone "
            f"{loss['backbone']:.4f}). Switch minus layerwise is {fmt(sl)} (95 % CI, "
            "resampling held-out texts): "
            f"{sl_words}. Switch minus LoRA is {fmt(sr)}: {words[d_sr]}; layerwise minus "
            f"LoRA is {fmt(lr)}: {words[d_lr]}.")
    if "tasks_mean_acc_norm" in c["switch vs layerwise"]:
        acc = {k: m[k]["tasks_mean_acc_norm"] for k in MAIN}
        t = c["switch vs layerwise"]["tasks_mean_acc_norm"]
        separate = "do not separate them" if t["ci"][0] <= 0 <= t["ci"][1] else "separate them"
        text += (f" On the multiple-choice tasks (per-byte scoring, mean over "
                 f"{len(report['data']['tasks'])} tasks) switch scores {acc['switch']:.3f}, "
                 f"layerwise {acc['layerwise']:.3f}, LoRA {acc['lora']:.3f}; switch minus "
                 f"layerwise is {t['diff']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] (95 % "
                 "CI, resampling source units: synsets, text blocks, FAQ questions, "
                 f"documentation files), so the tasks {separate}.")
    parts = [  # (holds, fails, what holding means, what failing means)
        (eq_sl or d_sl == "better", d_sl == "worse" and not eq_sl,
         "switch keeps layerwise's accuracy", "switch is worse than layerwise"),
        (d_sr == "better", d_sr == "worse", "switch beats LoRA", "switch is worse than LoRA"),
        (d_lr == "better", d_lr == "worse", "layerwise beats LoRA",
         "layerwise is worse than LoRA")]
    held = [ok for holds, _, ok, _ in parts if holds]
    failed = [bad for _, fails, _, bad in parts if fails]
    open_ = [ok for holds, fails, ok, _ in parts if not holds and not fails]
    if len(held) == len(parts):
        verdict = "The claim holds at this scale."
    else:
        verdict = ("The claim does not hold at this scale: " + "; ".join(failed) if failed
                   else "The claim is only partly confirmed at this scale")
        extras = "; ".join(f"{label}: {', '.join(x)}" for label, x in
                           (("holds", held), ("unresolved", open_)) if x)
        verdict += (f" ({extras})" if extras else "") + "."
    return (text + " " + verdict + " Caveat: a tiny model, byte tokens and short fine-tuning on "
            "the pretraining mixture, far from the paper's 7B models and downstream tasks.")


# ---- report ----------------------------------------------------------------------------------

def _ci(ci: Sequence[float], digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _diff(x: Mapping, digits: int = 4) -> str:
    return f"{x['diff']:+.{digits}f} [{x['ci'][0]:+.{digits}f}, {x['ci'][1]:+.{digits}f}]"


def markdown(report: dict) -> str:
    """``report.md``: data, budgets, held-out loss, task accuracy, comparisons, ablations."""
    p, d, m = report["config"], report["data"], report["methods"]
    domains, tasks = list(d["domains"]), list(d["tasks"])
    bb = report["backbone"]
    lines = [
        f"# Accuracy experiment: LoRA-Switch vs per-layer routing vs LoRA ({p['name']} preset)",
        "", f"`{report['reproduce']}`", "",
        f"Seed {report['seed']}; {report['environment']['device']}, JAX "
        f"{report['environment']['jax']}; {report['environment']['date']}; total "
        f"{report['timings']['total']:.0f} s.", "",
        "## Statement", "", report["statement"], "",
        "## Data", "",
        "| domain | train texts used / all | train MB used (all) | held-out texts scored / all "
        "| windows | held-out kB scored |", "| --- | --- | --- | --- | --- | --- |"]
    for name, x in d["domains"].items():
        h = d["heldout_scored"][name]
        lines.append(f"| {name} | {x['used_train_texts']} / {x['train_texts']} | "
                     f"{x['used_train_bytes'] / 1e6:.2f} ({x['train_bytes'] / 1e6:.2f}) | "
                     f"{h['texts']} / {x['heldout_texts']} | {h['windows']} | "
                     f"{h['bytes'] / 1e3:.1f} |")
    lines += ["", f"Backbone: {bb['params'] / 1e6:.2f}M parameters (d {p['model']['hidden_size']}, "
              f"{p['model']['num_hidden_layers']} layers, byte vocabulary), pretrained "
              f"{bb['pretrain']['steps']} steps x {p['batch_size']} x {p['seq_len']} "
              f"({bb['pretrain']['tokens'] / 1e6:.2f}M tokens, {bb['pretrain']['seconds']:.0f} s, "
              f"{bb['pretrain']['tokens_per_second']:.0f} tokens/s), final loss "
              f"{bb['pretrain']['final_loss']:.3f} nats/byte.", "",
              "## Adapters and budgets", "",
              f"All fine-tuned {p['finetune']['steps']} steps, lr {p['finetune']['lr']} "
              f"(warmup {p['finetune']['warmup_steps']}, cosine), same batches, seed "
              f"{report['seed']}; alpha/rank = {p['lora_scale']}.", "",
              "| adapter | mode | E | rank | k | router layer | expert params | router params "
              "| % of backbone | equal budget |", "| --- | --- | --- | --- | --- | --- | --- | --- "
              "| --- | --- |"]
    for name, x in m.items():
        if name == "backbone":
            continue
        a, n = x["adapter"], x["params"]
        lines.append(f"| {name} | {a['mode']} | {a['num_experts']} | {a['rank']} | {a['top_k']} "
                     f"| {a['router_layer']} | {n['experts']:,} | {n['routers']:,} | "
                     f"{100 * n['total'] / bb['params']:.1f} | "
                     f"{'yes' if x['budget_exact'] else 'no'} |")
    rl = m["switch"]["adapter"]["router_layer"]
    moved = [name for name, x in m.items()
             if name != "backbone" and x["adapter"]["router_layer"] != rl]
    if moved:
        lines += ["", f"{', '.join(moved)}: adapters cover the layers from the router's on (a "
                  "pre-gated route exists only from there), with the rank scaled to keep the "
                  "budget, so the router's position and the adapters' coverage change together "
                  "in this ablation."]
    lines += ["", "## Held-out loss (nats/byte, lower is better)", "",
              "| model | " + " | ".join(domains) + " | mean |",
              "| --- " * (len(domains) + 2) + "|"]
    for name, x in m.items():
        h = x["heldout_nats_per_byte"]
        lines.append(f"| {name} | " + " | ".join(f"{h[k]:.4f}" for k in domains)
                     + f" | {h['mean']:.4f} |")
    if tasks:
        lines += ["", "## Multiple choice (accuracy, 95 % Wilson interval)", "",
                  "Summed log-probability / per-byte normalised. Trivial baselines beside.", "",
                  "| model | " + " | ".join(f"{t} (sum) | {t} (per byte)" for t in tasks) + " |",
                  "| --- " * (2 * len(tasks) + 1) + "|"]
        for name, x in m.items():
            cells = []
            for t in tasks:
                r = x["tasks"][t]
                cells += [f"{r['acc_sum']:.3f} {_ci(r['ci_sum'], 2)}",
                          f"{r['acc_norm']:.3f} {_ci(r['ci_norm'], 2)}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| baseline | " + " | ".join(tasks) + " |", "| --- " * (len(tasks) + 1) + "|"]
        for rule in ("chance", *BASELINES):
            cells = (d["tasks"][t]["baselines"].get(rule) for t in tasks)
            lines.append(f"| {rule} | " + " | ".join(
                "-" if x is None else f"{x:.3f}" for x in cells) + " |")
        lines += ["", "stem: the option sharing most of the headword's stems (definition tasks "
                  "only; definition_hard has no option sharing one, so it scores chance).", "",
                  "Items per task: " + ", ".join(
                      f"{t} {x['items']}" + (f" ({x['units']} source units)" if "units" in x
                                             else "")
                      for t, x in d["tasks"].items()) + "."]
    lines += ["", "## Differences (paired bootstrap 95 % intervals)", "",
              "A vs B is A minus B. Held-out loss in nats/byte (negative: A is better); accuracy "
              "as a fraction (positive: A is better); task means are macro averages. Held-out "
              "intervals resample whole held-out texts within each domain (a drawn text brings "
              "all its windows: windows cut from one text are correlated), the same texts for "
              "both methods; task intervals resample whole source units within each task (a "
              "synset, a block of 20 Austen paragraphs, an FAQ question or a documentation "
              "file: a drawn unit brings all its items, which share text), the same units for "
              "both methods, the two definition tasks (cut from the same synsets) drawing "
              "theirs together.", "",
              "| comparison | held-out mean | per-byte task mean | summed task mean |",
              "| --- | --- | --- | --- |"]
    for name, x in report["comparisons"].items():
        acc = [_diff(x[k], 3) if k in x else "-" for k in ("tasks_mean_acc_norm",
                                                            "tasks_mean_acc_sum")]
        lines.append(f"| {name} | {_diff(x['heldout_mean'])} | {acc[0]} | {acc[1]} |")
    lines += ["", "Per domain (held-out loss differences):", "",
              "| comparison | " + " | ".join(domains) + " |", "| --- " * (len(domains) + 1) + "|"]
    for name, x in report["comparisons"].items():
        lines.append(f"| {name} | " + " | ".join(
            _diff(x["heldout_by_domain"][k]) for k in domains) + " |")
    routed = {k: x["routing"] for k, x in m.items() if "routing" in x}
    if routed:
        lines += ["", "## Routing", "",
                  "Mutual information between a token's domain and its expert picks (bits; 0: "
                  "all domains use the experts alike).", "", "| adapter | bits |", "| --- | --- |"]
        lines += [f"| {k} | {r['domain_expert_information_bits']:.4f} |" for k, r in routed.items()]
    if report.get("generations"):
        lines += ["", f"## Generations (temperature {report['sampler']['temperature']}, top-k "
                  f"{report['sampler']['top_k']}, seed {report['seed']})", ""]
        for who, outs in report["generations"].items():
            for prompt, text in outs.items():
                lines.append(f"- {who}: `{prompt!r}` -> `{text!r}`")
    lines += ["", "## Timings (s)", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in report["plots"]]
    return "\n".join(lines) + "\n"


def _best_baseline(baselines: Mapping) -> float:
    return max(baselines[k] for k in BASELINES if baselines.get(k) is not None)


def plots(report: dict, out_dir: str) -> list[str]:
    """Training curves, held-out loss, task accuracy, ablations and routing, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, domains = report["methods"], list(report["data"]["domains"])
    colors = {"backbone": "0.6", "lora": "tab:blue", "layerwise": "tab:orange",
              "switch": "tab:green"}
    names = ["backbone", *MAIN]
    files = []

    def save(fig, name, rect=(0, 0, 1, 1)):
        fig.tight_layout(rect=rect)
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)

    def window(x, n=10):
        return max(1, min(n, len(x) // 5 or 1))

    def smooth(x, n):
        """Trailing moving average over n steps, plotted at the step each window ends on."""
        x = np.asarray(x, np.float64)
        return np.arange(n, len(x) + 1), np.convolve(x, np.ones(n) / n, mode="valid")

    def averaged(title, n):
        return title + (f"\n(each point: mean of the last {n} steps)" if n > 1 else "")

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
    pre = report["backbone"]["pretrain"]["losses"]
    n = window(pre)
    ax0.plot(*smooth(pre, n), color="k")
    ax0.set(title=averaged("pretraining", n), xlabel="step", ylabel="train loss (nats/byte)")
    n = window(m[MAIN[0]]["finetune"]["losses"])
    for name in MAIN:
        ax1.plot(*smooth(m[name]["finetune"]["losses"], n), color=colors[name], label=name)
    ax1.set(title=averaged("fine-tuning (same batches)", n), xlabel="step",
            ylabel="train loss (nats/byte)")
    ax1.legend()
    save(fig, "curves.png")

    # Gains over the backbone: the absolute losses differ between domains far more than between
    # adapters, so bars of absolute loss would all look alike.
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(domains) + 2), 3.5))
    width = 0.8 / len(MAIN)
    for j, name in enumerate(MAIN):
        c = report["comparisons"][f"{name} vs backbone"]
        cells = [c["heldout_by_domain"][d] for d in domains] + [c["heldout_mean"]]
        gain = np.array([-x["diff"] for x in cells])
        lo, hi = (np.array([-x["ci"][i] for x in cells]) for i in (1, 0))
        x = np.arange(len(cells)) + (j - (len(MAIN) - 1) / 2) * width
        ax.bar(x, gain, width, label=name, color=colors[name])
        ax.errorbar(x, gain, yerr=[gain - lo, hi - gain], fmt="none", ecolor="k", lw=0.8)
    ax.set_xticks(np.arange(len(domains) + 1), [*domains, "mean"])
    ax.set(ylabel="nats/byte below the backbone",
           title="held-out loss gain over the backbone (higher is better; 95 % bootstrap)")
    ax.legend(ncols=3, fontsize=8)
    save(fig, "heldout.png")

    tasks = list(report["data"]["tasks"])
    if tasks:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
        for ax, kind in zip(axes, ("sum", "norm")):
            for j, name in enumerate(names):
                acc = np.array([m[name]["tasks"][t][f"acc_{kind}"] for t in tasks])
                ci = np.array([m[name]["tasks"][t][f"ci_{kind}"] for t in tasks]).T
                x = np.arange(len(tasks)) + (j - (len(names) - 1) / 2) * width
                ax.bar(x, acc, width, color=colors[name], label=name)
                ax.errorbar(x, acc, yerr=[acc - ci[0], ci[1] - acc], fmt="none", ecolor="k",
                            lw=0.8)
            for t, task in enumerate(tasks):
                best = _best_baseline(report["data"]["tasks"][task]["baselines"])
                ax.hlines(best, t - 0.45, t + 0.45, colors="r", linestyles="--", lw=1)
            ax.axhline(0.25, color="k", lw=0.6, ls=":")
            ax.set_xticks(np.arange(len(tasks)), tasks, fontsize=8)
            ax.set_title(f"accuracy, {'summed' if kind == 'sum' else 'per-byte'} log-prob")
        axes[0].set_ylabel("accuracy (95 % Wilson)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncols=len(names), fontsize=8)
        fig.suptitle("red dashes: best trivial baseline; dotted: chance", y=0.0, va="bottom",
                     fontsize=8)
        save(fig, "tasks.png", rect=(0, 0.04, 1, 0.92))

    ablations = report["ablations"]
    if ablations:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(ablations) + 1.8))
        labels = [*MAIN, *ablations]
        vals = [m[k]["heldout_nats_per_byte"]["mean"] for k in labels]
        ax.barh(np.arange(len(labels)), vals, color=[colors.get(k, "tab:purple") for k in labels])
        ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        lo = min(vals)
        ax.set_xlim(lo - 0.5 * (max(vals) - lo) - 1e-3, max(vals) + 0.1 * (max(vals) - lo) + 1e-3)
        ax.set(xlabel="held-out nats/byte (mean over domains)", title="ablations")
        save(fig, "ablations.png")

    routed = [k for k in ("layerwise", "switch") if "routing" in m[k]]
    if routed:
        fig, axes = plt.subplots(1, len(routed), figsize=(5 * len(routed), 3), squeeze=False)
        usages = [np.array(m[name]["routing"]["usage_by_domain"]) for name in routed]
        vmax = max(float(u.max()) for u in usages)  # one colour scale for every panel
        for ax, name, usage in zip(axes[0], routed, usages):
            im = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_yticks(np.arange(len(domains)), domains)
            ax.set_xticks(np.arange(usage.shape[1]))
            ax.set(xlabel="expert", title=f"{name}: expert use per domain "
                   f"({m[name]['routing']['domain_expert_information_bits']:.3f} bits)")
            fig.colorbar(im, ax=ax, label="share of the domain's assignments")
        save(fig, "routing.png")
    return files


def summary(report: dict) -> str:
    """A short plain-text summary: held-out loss, task accuracy, the statement."""
    m = report["methods"]
    tasks = list(report["data"]["tasks"])
    lines = [f"{'model':12s} {'held-out nats/byte':>18s}"
             + "".join(f" {t[:14]:>14s}" for t in tasks)]
    for name in ("backbone", *MAIN):
        x = m[name]
        lines.append(f"{name:12s} {x['heldout_nats_per_byte']['mean']:18.4f}" + "".join(
            f" {x['tasks'][t]['acc_norm']:14.3f}" for t in tasks))
    if tasks:
        best = {t: _best_baseline(report["data"]["tasks"][t]["baselines"]) for t in tasks}
        lines.append(f"{'best trivial':12s} {'':18s}" + "".join(f" {best[t]:14.3f}" for t in tasks))
        lines.append("(task columns: accuracy on per-byte log-probability)")
    return "\n".join(lines) + "\n\n" + report["statement"]
