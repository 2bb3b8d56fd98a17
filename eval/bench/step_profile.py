"""Where one training step's device time goes: kernel groups and coarse kinds, from a trace.

:mod:`.training` measures how fast a step is; this says what the device did meanwhile. One
step is traced with ``jax.profiler`` (after one untraced call), and the kernels on the device's
stream tracks are grouped by name (:func:`.profile.kernel_group`) and sorted into kinds by name
(:data:`KINDS`, first match wins): matrix multiplies (cuBLAS / cuBLASLt / XLA's Triton GEMMs,
including the blockwise attention's score and value products), fused attention (cuDNN), copies,
reductions and the rest (XLA's elementwise fusions). ``busy`` is the sum of kernel time; ``wall``
minus busy is the device idling between launches.
"""

from __future__ import annotations

import re
import tempfile

from loraswitch_jax.eval.bench.profile import kernel_times, trace_events

__all__ = ["KINDS", "kernel_kind", "profile_step", "stepper", "summarize"]

# Kernel-name patterns of each kind, tried in order (names as the CUDA profiler reports them).
KINDS = (
    ("attention", re.compile(r"sdpa|flash|fmha|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|wgmma|matmul|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose|dynamic.update|dynamic.slice", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
)


def kernel_kind(group: str) -> str:
    """The kind of a kernel group (:data:`KINDS`), ``"elementwise"`` when none matches."""
    return next((kind for kind, pattern in KINDS if pattern.search(group)), "elementwise")


def summarize(groups: dict[str, dict], wall_s: float, top: int = 12) -> dict:
    """Busy and idle microseconds, time per kind and the ``top`` groups of one traced step."""
    busy = sum(g["us"] for g in groups.values())
    kinds: dict[str, float] = {}
    for name, g in groups.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + g["us"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1]["us"])
    return {"wall_us": 1e6 * wall_s, "busy_us": busy, "idle_us": 1e6 * wall_s - busy,
            "launches": sum(g["launches"] for g in groups.values()),
            "kinds_us": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"group": name, "kind": kernel_kind(name), **g} for name, g in ranked[:top]]}


def profile_step(run, top: int = 12, allow_host: bool = False) -> dict:
    """Trace one call of ``run`` (a function that runs one step and returns its outputs; it is
    called twice, the first untraced) and :func:`summarize` its device kernels; ``allow_host``:
    a CPU run, whose trace has no device tracks, reads the host's XLA threads instead."""
    with tempfile.TemporaryDirectory() as tmp:
        events, wall = trace_events(run, tmp)
    return summarize(kernel_times(events, allow_host), wall, top)


def stepper(compiled, state, *args):
    """A call of ``compiled(state, *args) -> (state, out)`` with no arguments that threads the
    (donated) state from one call to the next and returns ``out``: what tracing calls twice."""
    holder = [state]

    def one_step():
        holder[0], out = compiled(holder[0], *args)
        return out

    return one_step
