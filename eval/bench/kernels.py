"""Every Pallas kernel, compiled for the device, against its jnp reference, and timed.

The tests run the kernels in interpret mode on a CPU; this program runs the real lowering (Triton
on an NVIDIA GPU) at Llama-2-7B shapes: it checks each kernel's output against its reference
(bf16: relative error below 1e-2) and reports the median time and the bytes moved per second as
a fraction of the measured copy bandwidth.

    python -m loraswitch_jax.eval.bench.kernels --out eval/results/kernels        # GPU
    python -m loraswitch_jax.eval.bench.kernels --small --interpret --out /tmp/k  # CPU smoke run

Writes ``check_7b.json`` and ``check_7b.md`` (``check_small.*`` with ``--small``; device, JAX
version and date included). Block sizes are tuned by :mod:`.kernel_sweep`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from loraswitch_jax.eval.bench.harness import (
    environment,
    log,
    measure_bandwidth,
    reserve_device_memory,
    time_calls,
    write_report,
)
from loraswitch_jax.pallas import decode_attention as attention
from loraswitch_jax.pallas import fused_projections as fused
from loraswitch_jax.pallas import lora_shrink as shrink
from loraswitch_jax.pallas import routed_projections as routed
from loraswitch_jax.pallas import stacked_matmul as stacked
from loraswitch_jax.pallas import switch_merge as merge

__all__ = ["SMALL", "KernelsConfig", "Shapes", "check", "main", "parse_args"]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Model and adapter sizes: ``L`` layers, hidden ``d``, MLP ``f``, ``E`` experts of rank
    ``r``, ``k`` per token."""

    layers: int = 32
    d: int = 4096
    f: int = 11008
    num_experts: int = 8
    rank: int = 16
    top_k: int = 2
    kv_heads: int = 32
    head_dim: int = 128
    cache_len: int = 1216


SMALL = Shapes(layers=2, d=64, f=96, num_experts=8, rank=16, top_k=2, kv_heads=2, head_dim=16,
               cache_len=64)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _normal(key, shape, std):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)


def _nbytes(*arrays) -> int:
    return sum(a.size * a.dtype.itemsize for a in arrays)


def _route(key, m: int, s: Shapes):
    ids = jnp.stack([jax.random.choice(jax.random.fold_in(key, i), s.num_experts, (s.top_k,),
                                       replace=False) for i in range(m)]).astype(jnp.int32)
    ids = ids.at[0, 0].set(s.num_experts - 1)  # the largest expert index
    gates = jax.nn.softmax(jax.random.normal(key, (m, s.top_k)), axis=-1)
    return ids, gates


def check(name: str, run: Callable[[], object], reference: Callable[[], object], nbytes: int,
          reps: int, copy_gbps: float | None) -> dict:
    """Compare ``run()`` with ``reference()`` (tuples compared element by element) and time it."""
    got, want = run(), reference()
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    err = max(_rel_err(g, w) for g, w in zip(got, want))
    seconds = statistics.median(time_calls(run, reps, warmup=2))
    row = {"kernel": name, "rel_err": err, "ok": err < 1e-2, "us": 1e6 * seconds,
           "bytes": nbytes, "gbps": nbytes / seconds / 1e9}
    row["of_copy_bw"] = None if not copy_gbps else row["gbps"] / copy_gbps
    log(f"{name:48s} err {err:.1e} {'ok' if row['ok'] else 'FAIL'}  {row['us']:9.1f} us  "
        f"{row['gbps']:7.1f} GB/s")
    return row


def _cases(s: Shapes, interpret: bool, key) -> list[tuple[str, Callable, Callable, int]]:
    """(name, kernel call, reference call, bytes the kernel must move) for every kernel; the
    decode-attention kernel first (a run cut short by its time limit still checks it)."""
    keys = iter(jax.random.split(key, 64))
    L, d, f, E, r = s.layers, s.d, s.f, s.num_experts, s.rank
    layer = jnp.int32(L - 1)  # data, as in decode; the last layer
    w = {"q": _normal(next(keys), (L, d, d), d**-0.5), "k": _normal(next(keys), (L, d, d), d**-0.5),
         "v": _normal(next(keys), (L, d, d), d**-0.5), "o": _normal(next(keys), (L, d, d), d**-0.5),
         "gate": _normal(next(keys), (L, d, f), d**-0.5),
         "up": _normal(next(keys), (L, d, f), d**-0.5),
         "down": _normal(next(keys), (L, f, d), f**-0.5)}
    a = {p: _normal(next(keys), (L, E, v.shape[1], r), v.shape[1] ** -0.5) for p, v in w.items()}
    b = {p: _normal(next(keys), (L, E, r, v.shape[2]), 0.05) for p, v in w.items()}
    cases = _attention_cases(s, interpret, next(keys))
    x = _normal(next(keys), (1, d), 1.0)
    xf = _normal(next(keys), (1, f), 1.0)
    one_layer = lambda *ws: _nbytes(*(v[0] for v in ws))  # noqa: E731 - bytes of one layer each

    mm = jax.jit(functools.partial(stacked.stacked_matmul, interpret=interpret))
    for p, xin in (("q", x), ("down", xf)):
        cases.append((f"stacked_matmul {p} M=1", lambda p=p, xin=xin: mm(xin, w[p], layer),
                      lambda p=p, xin=xin: stacked.stacked_matmul_reference(xin, w[p], layer),
                      one_layer(w[p])))
    qkv = jax.jit(functools.partial(fused.qkv_matmul, interpret=interpret))
    cases.append(("qkv_matmul M=1", lambda: qkv(x, w["q"], w["k"], w["v"], layer),
                  lambda: fused.qkv_matmul_reference(x, w["q"], w["k"], w["v"], layer),
                  one_layer(w["q"], w["k"], w["v"])))
    gu = jax.jit(functools.partial(fused.gate_up_matmul, interpret=interpret))
    cases.append(("gate_up_matmul M=1", lambda: gu(x, w["gate"], w["up"], layer),
                  lambda: fused.gate_up_matmul_reference(x, w["gate"], w["up"], layer),
                  one_layer(w["gate"], w["up"])))

    for m in (1, 8, 64):
        ids, gates = _route(next(keys), m, s)
        slots, weights = shrink.route_slots(ids, gates, E, 2.0)
        xm = _normal(next(keys), (m, d), 1.0)
        xfm = _normal(next(keys), (m, f), 1.0)
        xa = {p: shrink.lora_shrink(xm if p != "down" else xfm, a[p], layer, slots, weights)
              for p in w}
        touched = np.unique(np.asarray(slots)).size
        lora_bytes = lambda *ps: sum(  # noqa: E731 - the slots' B blocks of one layer
            touched * b[p][0, 0].size * 2 for p in ps)
        rm = jax.jit(functools.partial(routed.routed_matmul, interpret=interpret))
        cases.append((f"routed_matmul down M={m} E={E}",
                      lambda xfm=xfm, xa=xa, slots=slots: rm(xfm, w["down"], layer, xa["down"],
                                                             b["down"], layer, slots),
                      lambda xfm=xfm, xa=xa, slots=slots: routed.routed_matmul_reference(
                          xfm, w["down"], layer, xa["down"], b["down"], layer, slots),
                      one_layer(w["down"]) + lora_bytes("down")))
        rq = jax.jit(functools.partial(routed.routed_qkv_matmul, interpret=interpret))
        qkv_args = lambda xm=xm, xa=xa, slots=slots: (  # noqa: E731
            xm, w["q"], w["k"], w["v"], layer, (xa["q"], xa["k"], xa["v"]),
            (b["q"], b["k"], b["v"]), layer, slots)
        cases.append((f"routed_qkv_matmul M={m} E={E}", lambda f_=qkv_args: rq(*f_()),
                      lambda f_=qkv_args: routed.routed_qkv_matmul_reference(*f_()),
                      one_layer(w["q"], w["k"], w["v"]) + lora_bytes("q", "k", "v")))
        rg = jax.jit(functools.partial(routed.routed_gate_up_matmul, interpret=interpret))
        gu_args = lambda xm=xm, xa=xa, slots=slots: (  # noqa: E731
            xm, w["gate"], w["up"], layer, (xa["gate"], xa["up"]), (b["gate"], b["up"]), layer,
            slots)
        cases.append((f"routed_gate_up_matmul M={m} E={E}", lambda f_=gu_args: rg(*f_()),
                      lambda f_=gu_args: routed.routed_gate_up_matmul_reference(*f_()),
                      one_layer(w["gate"], w["up"]) + lora_bytes("gate", "up")))

        # down's x A in the gate/up kernel's epilogue (float32 atomic adds).
        expands = ("dot", "rows") if m * s.top_k < E and m <= routed.MAX_EXPAND_ROWS else ("dot",)
        for expand in expands:
            rge = jax.jit(functools.partial(routed.routed_gate_up_matmul, expand=expand,
                                            interpret=interpret))

            def gate_up_down(f_=gu_args, weights=weights, rge=rge, m=m):
                act, xa_down = rge(*f_(), down_shrink=(a["down"], weights))
                return act, xa_down.xa[0, :m].reshape(m, -1, r).astype(act.dtype)

            tag = "" if expand == "dot" else f" expand={expand}"
            cases.append((f"routed_gate_up_matmul +down shrink M={m} E={E}{tag}",
                          gate_up_down,
                          lambda f_=gu_args, weights=weights:
                              routed.routed_gate_up_matmul_reference(
                                  *f_(), down_shrink=(a["down"], weights)),
                          one_layer(w["gate"], w["up"]) + lora_bytes("gate", "up")
                          + touched * a["down"][0, 0].size * 2))
        if "rows" in expands:
            rr = jax.jit(functools.partial(routed.routed_matmul, expand="rows",
                                           interpret=interpret))
            cases.append((f"routed_matmul down M={m} E={E} expand=rows",
                          lambda xfm=xfm, xa=xa, slots=slots: rr(
                              xfm, w["down"], layer, xa["down"], b["down"], layer, slots),
                          lambda xfm=xfm, xa=xa, slots=slots: routed.routed_matmul_reference(
                              xfm, w["down"], layer, xa["down"], b["down"], layer, slots),
                          one_layer(w["down"]) + lora_bytes("down")))
            rqr = jax.jit(functools.partial(routed.routed_qkv_matmul, expand="rows",
                                            interpret=interpret))
            cases.append((f"routed_qkv_matmul M={m} E={E} expand=rows",
                          lambda f_=qkv_args: rqr(*f_()),
                          lambda f_=qkv_args: routed.routed_qkv_matmul_reference(*f_()),
                          one_layer(w["q"], w["k"], w["v"]) + lora_bytes("q", "k", "v")))

        # x A as its own launch, one per group of projections sharing an input.
        sg = jax.jit(functools.partial(shrink.lora_shrink_group, interpret=interpret))
        group = (a["q"], a["k"], a["v"])
        cases.append((f"lora_shrink_group q,k,v M={m} E={E}",
                      lambda xm=xm, slots=slots, weights=weights: sg(
                          xm, group, layer, slots, weights),
                      lambda xm=xm, slots=slots, weights=weights:
                          shrink.lora_shrink_group_reference(xm, group, layer, slots, weights),
                      touched * 3 * a["q"][0, 0].size * 2))

    ids, gates = _route(next(keys), 1, s)
    ids, gates = ids[0], 2.0 * gates[0]
    work = {p: jnp.zeros_like(v) for p, v in w.items()}
    sm = jax.jit(functools.partial(merge.switch_merge, first_layer=0, interpret=interpret),
                 donate_argnums=1)

    def merge_all():
        for p in w:
            work[p] = sm(w[p], work[p], a[p], b[p], ids, gates)
        return tuple(work[p] for p in w)

    merge_bytes = sum(2 * _nbytes(v) + s.top_k * (a[p][:, 0].size + b[p][:, 0].size) * 2
                      for p, v in w.items())
    cases.append(("switch_merge, 7 projections x all layers", merge_all,
                  lambda: tuple(merge.switch_merge_reference(w[p], a[p], b[p], ids, gates,
                                                             first_layer=0) for p in w),
                  merge_bytes))
    return cases


def _attention_cases(s: Shapes, interpret: bool, key) -> list[tuple[str, Callable, Callable, int]]:
    """Decode attention over a stacked cache, at batch 1 (one long sequence) and 8 (ragged)."""
    heads = s.d // s.head_dim
    attend = jax.jit(functools.partial(attention.decode_attention, interpret=interpret))
    cases = []
    for batch in (1, 8):
        keys = jax.random.split(jax.random.fold_in(key, batch), 3)
        shape = (s.layers, batch, s.cache_len, s.kv_heads, s.head_dim)
        kc, vc = _normal(keys[0], shape, 1.0), _normal(keys[1], shape, 1.0)
        q = _normal(keys[2], (batch, heads, s.head_dim), 1.0)
        lengths = jnp.asarray(np.linspace(s.cache_len - 16, 1, batch).round(), jnp.int32)
        layer = jnp.int32(s.layers - 1)
        read = 2 * int(lengths.sum()) * s.kv_heads * s.head_dim * 2  # valid keys and values
        cases.append((f"decode_attention B={batch}",
                      lambda q=q, kc=kc, vc=vc, lengths=lengths: attend(q, kc, vc, layer, lengths),
                      lambda q=q, kc=kc, vc=vc, lengths=lengths:
                          attention.decode_attention_reference(q, kc, vc, layer, lengths),
                      read))
    return cases


def markdown(report: dict) -> str:
    env = report["environment"]
    bandwidth = report["bandwidth"]
    head = (f"Kernels vs references on {env['device_kind']}, JAX {env['jax']}, {env['date']}; "
            f"shapes {report['shapes']}")
    if bandwidth:
        head += f"; copy bandwidth {bandwidth['copy_gbps']:.0f} GB/s"
    if report["interpret"]:
        head += "; Pallas interpret mode (correctness only: the times mean nothing)"
    lines = [head, "", "| kernel | rel. error | ok | us | GB/s | of copy bw |",
             "|---|---:|:-:|---:|---:|---:|"]
    for row in report["rows"]:
        if "error" in row:
            first = (row["error"].splitlines() or [""])[0][:80].replace("|", "\\|")
            lines.append(f"| {row['kernel']} | - | NO | - | - | {first} |")
            continue
        frac = "" if row["of_copy_bw"] is None else f"{row['of_copy_bw']:.2f}"
        lines.append(f"| {row['kernel']} | {row['rel_err']:.1e} | {'yes' if row['ok'] else 'NO'} "
                     f"| {row['us']:.1f} | {row['gbps']:.0f} | {frac} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class KernelsConfig:
    """What to check: ``small`` shapes (CPU smoke runs), Pallas ``interpret`` mode, timed
    ``reps``, ``only`` the kernels whose name contains one of these texts."""

    out: str = "eval/results/kernels"
    small: bool = False
    interpret: bool = False
    reps: int = 20
    only: tuple[str, ...] = ()

    def __post_init__(self):
        if self.reps < 1:
            raise ValueError(f"KernelsConfig.reps must be >= 1, got {self.reps}")

    @property
    def stem(self) -> str:
        return os.path.join(self.out, "check_small" if self.small else "check_7b")


def main(kc: KernelsConfig) -> dict:
    """Check (and time) every selected kernel, writing the report after each; return it.

    Raises SystemExit when no kernel is selected or some kernel differs from its reference."""
    reserve_device_memory()
    env = environment()
    shapes = SMALL if kc.small else Shapes()
    log(f"{env['device_kind']} ({env['platform']}), JAX {env['jax']}; {shapes}")
    bandwidth = None if env["platform"] == "cpu" else measure_bandwidth(2.0, 10, jax.random.key(1))
    copy_gbps = bandwidth["copy_gbps"] if bandwidth else None
    report = {"environment": env, "shapes": dataclasses.asdict(shapes), "bandwidth": bandwidth,
              "interpret": kc.interpret, "rows": []}
    for case in _cases(shapes, kc.interpret, jax.random.key(0)):
        if kc.only and not any(text in case[0] for text in kc.only):
            continue
        try:
            row = check(*case, reps=kc.reps, copy_gbps=copy_gbps)
        except Exception as e:  # noqa: BLE001 - one kernel's failure must not hide the others
            log(f"{case[0]}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            row = {"kernel": case[0], "error": f"{type(e).__name__}: {e}"[:500], "ok": False}
        report["rows"].append(row)
        # After every kernel: a run cut short keeps its rows.
        table = write_report(report, kc.stem, markdown, None)
    rows = report["rows"]
    if not rows:
        raise SystemExit(f"no kernel name contains any of {list(kc.only)}")
    print(table, flush=True)
    if not all(row["ok"] for row in rows):
        raise SystemExit("some kernels differ from their references (see the table)")
    return report


def parse_args(argv: list[str] | None = None) -> KernelsConfig:
    d = KernelsConfig()
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.bench.kernels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=d.out)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    parser.add_argument("--reps", type=int, default=d.reps)
    parser.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                        help="check only the kernels whose name contains one of these")
    a = parser.parse_args(argv)
    return KernelsConfig(out=a.out, small=a.small, interpret=a.interpret, reps=a.reps,
                         only=tuple(a.only))


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
