"""The tensor-parallel decode benchmark's report (:mod:`.tensor_decode` measures): ratios to the
backbone, the issue's targets as PASS/FAIL checks, the Markdown table and the plot."""

from __future__ import annotations

from loraswitch_jax.eval.bench.harness import write_report

__all__ = ["ISSUE_SETTING", "TARGETS", "acceptance", "add_ratios", "markdown", "plot",
           "write_outputs"]

TARGETS = {"floor_b1_tensor4": 0.85, "switch_b1": 1.10, "switch_batched": 1.08}
ISSUE_SETTING = {"preset": "llama2-70b", "context": 1024}


def add_ratios(results: list[dict]) -> None:
    """``ratio_to_backbone``: ms/token over the backbone's at the same mesh and batch (both
    positive: a noisy CPU run can time N2 no slower than N1)."""
    ref = {(r["mesh"], r["batch"]): r["ms_per_token"] for r in results
           if r["mode"] == "backbone" and (r.get("ms_per_token") or 0) > 0}
    for r in results:
        if (r.get("ms_per_token") or 0) > 0 and (r["mesh"], r["batch"]) in ref:
            r["ratio_to_backbone"] = r["ms_per_token"] / ref[(r["mesh"], r["batch"])]


def acceptance(results: list[dict]) -> list[dict]:
    """The issue's targets on what was measured: the backbone's floor fraction at batch 1 on
    tensor=4 (no other axis), switch-fused / backbone at every mesh and batch."""
    checks = []
    for r in results:
        if r["mode"] == "backbone" and r["batch"] == 1 and r["mesh"] == "tensor=4" and r.get(
                "fraction"):
            t = TARGETS["floor_b1_tensor4"]
            checks.append({"check": "backbone of the per-GPU floor, batch 1, tensor=4",
                           "value": r["fraction"], "target": f">= {t}", "pass": r["fraction"] >= t})
        if r["mode"] == "switch-fused" and "ratio_to_backbone" in r:
            t = TARGETS["switch_b1" if r["batch"] == 1 else "switch_batched"]
            checks.append({"check": f"switch-fused / backbone, batch {r['batch']}, {r['mesh']}",
                           "value": r["ratio_to_backbone"], "target": f"<= {t}",
                           "pass": r["ratio_to_backbone"] <= t})
    return checks


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """Header (setting, device, JAX, date, bandwidth), the checks, one row per case."""
    env, bw, a = report["environment"], report["bandwidth"], report["args"]
    issue = all(a[k] == v for k, v in ISSUE_SETTING.items())
    lines = [
        f"Tensor-parallel decode, `{a['preset']}` random bf16 weights, context {a['context']}, "
        f"cache {report['cache_len']}: {env['device_kind']} x {env['device_count']}, JAX "
        f"{env['jax']}, {env['date'][:10]}. Generate loop over the mesh, N={a['new_tokens'][0]} "
        f"vs {a['new_tokens'][1]} new tokens, median of {a['reps']}; impl `{a['impl']}`.",
        f"Per-GPU floor: one device's bytes per step over its copy bandwidth, "
        f"{bw['copy_gbps']:.0f} GB/s (read + write, one device). All-reduce: device time per "
        f"step, mean over the mesh's devices (the max and calls per step in brackets). Whole "
        f"run {report['wall_s']:.0f} s" + ("" if issue else "; not the issue's setting "
                                       "(llama2-70b, context 1024): checks for reference") + ".",
    ]
    if report["acceptance"]:
        lines += ["", "| check | value | target | |", "|---|---:|---:|---|"]
        lines += [f"| {c['check']} | {c['value']:.3f} | {c['target']} | "
                  f"{'PASS' if c['pass'] else 'FAIL'} |" for c in report["acceptance"]]
    lines += ["", "| mesh | batch | mode | ms/token | tokens/s | per-GPU MB/step | floor ms "
              "| of floor | x backbone | all-reduce ms/step | other collectives ms | status |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = {m: i for i, m in enumerate(a["modes"])}
    for r in sorted(report["results"], key=lambda r: (r["devices"], r["mesh"], r["batch"],
                                                     order[r["mode"]])):
        c = r.get("collectives") or {}
        ar = (f"{c['all_reduce_ms']:.3f} ({c['all_reduce_ms_max']:.3f}; "
              f"{c['all_reduces']:.0f} calls)" if c else "-")
        mb = r["bytes_per_device"]["total"] / 1e6 if "bytes_per_device" in r else None
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        status += f" (trace: {r['collectives_error']})" if "collectives_error" in r else ""
        lines.append(
            f"| {r['mesh']} | {r['batch']} | {r['mode']} | {_f(r.get('ms_per_token'), '.3f')} "
            f"| {_f(r.get('tokens_per_s'), '.0f')} | {_f(mb, '.1f')} "
            f"| {_f(r.get('floor_ms'), '.3f')} | {_f(r.get('fraction'), '.2f')} "
            f"| {_f(r.get('ratio_to_backbone'), '.3f')} | {ar} "
            f"| {_f(c.get('other_collectives_ms'), '.3f')} | {status} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """ms/token (per-GPU floors dashed), ratio to the backbone and all-reduce ms against batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("ms_per_token")]
    panels = (("ms per token", lambda r: r["ms_per_token"]),
              ("ms/token / backbone (same mesh, batch)", lambda r: r.get("ratio_to_backbone")),
              ("all-reduce ms per step",
               lambda r: (r.get("collectives") or {}).get("all_reduce_ms")))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for mesh, mode in sorted({(r["mesh"], r["mode"]) for r in rows}):
        pts = sorted(((r["batch"], r) for r in rows if (r["mesh"], r["mode"]) == (mesh, mode)),
                     key=lambda p: p[0])
        for ax, (_, value) in zip(axes, panels):
            xy = [(b, value(r)) for b, r in pts if value(r) is not None]
            if xy:
                ax.plot(*zip(*xy), "o-", label=f"{mode}, {mesh}")
        if mode == "backbone":  # dashed, in the backbone's colour
            axes[0].plot([b for b, _ in pts], [r["floor_ms"] for _, r in pts], "--", lw=0.8,
                         color=axes[0].lines[-1].get_color(), label=f"per-GPU floor, {mesh}")
    axes[1].axhline(1.0, color="k", ls="--", lw=0.8)
    batches = sorted({r["batch"] for r in rows})
    for ax, (title, _) in zip(axes, panels):
        if len(batches) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set(xlabel="batch", title=title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    env, a = report["environment"], report["args"]
    fig.suptitle(f"{a['preset']}, context {a['context']}; {env['device_kind']} x "
                 f"{env['device_count']}, JAX {env['jax']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, stem: str) -> str:
    add_ratios(report["results"])
    report["acceptance"] = acceptance(report["results"])
    return write_report(report, stem, markdown, plot)
