"""The adapter benchmark's report: ratios to the backbone, the acceptance checks, a Markdown
table and a plot (ratio to the backbone per mode against batch, one panel per setting)."""

from __future__ import annotations

import math

from loraswitch_jax.eval.bench.adapter_cases import BASE_EXPERTS, BASE_TOP_K, MODES, RANK
from loraswitch_jax.eval.bench.harness import write_report

__all__ = ["TARGET_SGMM", "TARGET_SWITCH_B1", "TARGET_SWITCH_BATCHED", "acceptance",
           "add_ratios", "markdown", "plot", "write_outputs"]

TARGET_SWITCH_B1 = 1.03  # switch-fused / backbone at batch 1
TARGET_SWITCH_BATCHED = 1.08  # ... at batch > 1
TARGET_SGMM = 0.85  # SGMM merge bandwidth / copy bandwidth


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


def write_outputs(report: dict, stem: str) -> str:
    """Ratios and checks brought up to date, then ``stem``.json, .md and .png; returns the
    Markdown."""
    add_ratios(report["results"])
    report["acceptance"] = acceptance(report)
    return write_report(report, stem, markdown, plot)
