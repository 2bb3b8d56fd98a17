"""Statistics of the experiment: per-model summaries (Wilson intervals) and paired method
differences (bootstrap over whole held-out texts and task source units)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loraswitch_jax.eval.accuracy import scoring
from loraswitch_jax.eval.accuracy.inputs import Corpus, EvalSet

__all__ = ["compare", "macro_loss", "rounded_interval", "routing_information", "summarise",
           "task_strata"]


def rounded_interval(lo_hi: tuple[float, float]) -> list[float]:
    """An interval as a JSON list, rounded to 6 digits."""
    return [round(x, 6) for x in lo_hi]


def macro_loss(nll: np.ndarray, size: np.ndarray, domain: np.ndarray, n_domains: int
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
            tasks[task][f"ci_{name}"] = rounded_interval(scoring.wilson_interval(correct.sum(), n))
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


def task_strata(units: Sequence[np.ndarray]) -> np.ndarray:
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
    draw them within domains / tasks (:func:`task_strata`).
    """
    dom, text = data.window_domain, data.window_text

    def interval(statistic, *columns, strata=None, groups=None):
        return rounded_interval(scoring.bootstrap(statistic, *columns, resamples=resamples,
                                                  seed=seed, strata=strata, groups=groups))

    def macro_diff(nll_a, nll_b, size):  # mean over domains of the nats/byte difference
        return (macro_loss(nll_a, size, dom, len(domains))
                - macro_loss(nll_b, size, dom, len(domains)))

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
    strata = task_strata([data.item_unit[t] for t in tasks])

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


