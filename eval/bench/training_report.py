"""The training benchmark's report: its Markdown tables and its plot (:mod:`.training` runs it).

Tables: one row per run (tokens/s, both MFUs, peak memory); the largest-batch predictions; the
planner's figure for each run's own step against the memory that run used (``--plan``); and,
with ``--profile``, where each run's step spent its device time.
"""

from __future__ import annotations

__all__ = ["markdown", "plot"]

GIB = 2**30


def _f(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x / scale, spec)


def markdown(report: dict) -> str:
    env, a = report["environment"] or {}, report["args"]
    lines = [f"Adapter training, `{a['preset']}` random bf16 weights, sequence {a['seq']}, one "
             f"device: {env.get('device_kind', '?')}, JAX {env.get('jax', '?')}, "
             f"{env.get('date', '?')[:10]}. MFU against {report['peak_tflops']:g} TFLOP/s (H200 "
             "dense bf16 spec); model FLOPs 4 N_mm B T + 6 L q B T^2 + 6 N_a B T (frozen base), "
             "PaLM 6 N B T.", "",
             "| run | batch | tokens/s | MFU | MFU 6NT | peak GiB | step s | compile s | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r.get('batch') or '-'} | {_f(r.get('tokens_per_s'), '.0f')} "
            f"| {_f(r.get('mfu'), '.3f')} | {_f(r.get('mfu_palm'), '.3f')} "
            f"| {_f(r.get('peak_bytes'), '.1f', GIB)} "
            f"| {_f(r.get('step_s'), '.3f')} | {_f(r.get('compile_s'), '.0f')} "
            f"| {r.get('status')}{': ' + r['error'][:120] if r.get('error') else ''} |")
    preds = [r for r in report["results"] if r.get("prediction", {}).get("batch") is not None]
    if preds:
        lines += ["", "| largest batch | predicted | confirmed | GiB/row | GiB at batch 1 "
                  "| limit GiB |", "|---|---:|---:|---:|---:|---:|"]
        for r in preds:
            p = r["prediction"]
            gib = [_f(p[k], ".1f", GIB) for k in ("bytes_per_row", "bytes_b1", "bytes_limit")]
            lines.append(f"| {r['name']} | {p['batch']}{' (cap)' if p.get('capped') else ''} "
                         f"| {r.get('confirmed_batch') or '-'} | {' | '.join(gib)} |")
    return "\n".join(lines + _plan_table(report["results"]) + _profile_table(report["results"]))


def _plan_table(rows: list[dict]) -> list[str]:
    """The planner (``loraswitch plan``, compiled on this device) against each run's own compiled
    step (``memory_analysis``) and its measured peak (``peak_bytes_in_use``; none on a CPU)."""
    rows = [r for r in rows if r.get("plan", {}).get("total")]
    if not rows:
        return []
    lines = ["", "Planner (`loraswitch_jax.planner.plan`, compiled on the same device) against the "
             "run's compiled step and its measured `peak_bytes_in_use`:", "",
             "| run | batch | planned GiB | compiled GiB | used GiB | planned / used "
             "| activations GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, used = r["plan"], r.get("peak_bytes")
        compiled = (r.get("memory_analysis") or {}).get("total")
        lines.append(f"| {r['name']} | {r['batch']} | {p['total'] / GIB:.2f} "
                     f"| {_f(compiled, '.2f', GIB)} | {_f(used, '.2f', GIB)} "
                     f"| {_f(used and p['total'] / used, '.3f')} | {p['activations'] / GIB:.2f} |")
    return lines


def _profile_table(rows: list[dict]) -> list[str]:
    """Device time of one traced step per run: kinds, then the largest kernel groups."""
    rows = [r for r in rows if r.get("profile", {}).get("busy_us")]
    if not rows:
        return []
    kinds = sorted({k for r in rows for k in r["profile"]["kinds_us"]})
    lines = ["", "Device time of one traced step (ms; `eval/bench/step_profile.py` kinds):", "",
             f"| run | wall | busy | idle | launches | {' | '.join(kinds)} |",
             "|---|" + "---:|" * (4 + len(kinds))]
    for r in rows:
        p = r["profile"]
        cells = [f"{p['kinds_us'].get(k, 0.0) / 1e3:.1f}" for k in kinds]
        lines.append(f"| {r['name']} | {p['wall_us'] / 1e3:.1f} | {p['busy_us'] / 1e3:.1f} "
                     f"| {p['idle_us'] / 1e3:.1f} | {p['launches']} | {' | '.join(cells)} |")
    for r in rows:
        lines += ["", f"Largest kernel groups, {r['name']} batch {r['batch']}:", "",
                  "| kernel group | kind | launches | ms | share of busy |",
                  "|---|---|---:|---:|---:|"]
        busy = r["profile"]["busy_us"]
        lines += [f"| `{g['group'][:70]}` | {g['kind']} | {g['launches']} | {g['us'] / 1e3:.2f} "
                  f"| {g['us'] / busy:.3f} |" for g in r["profile"]["top"]]
    return lines


def plot(report: dict, path: str) -> None:
    """tokens/s and peak memory per run (the peer in orange)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8))
    colors = ["tab:orange" if r["run"]["adapter"] == "mixlora" else "tab:blue" for r in rows]
    for ax, key, scale in ((axes[0], "tokens_per_s", 1), (axes[1], "peak_bytes", GIB)):
        ax.barh(range(len(rows)), [(r.get(key) or 0) / scale for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), [f"{r['name']} b{r['batch']}" for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="peak GiB" if scale > 1 else "tokens/s")
        ax.grid(True, axis="x", alpha=0.3)
    env = report["environment"] or {}
    fig.suptitle(f"adapter training, {report['args']['preset']}; {env.get('device_kind', '?')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


