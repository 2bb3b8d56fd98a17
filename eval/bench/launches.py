"""Kernel launches of a compiled program, counted from its HLO text (no profiler needed).

After XLA's passes every instruction left in a scheduled computation runs as its own thunk.
Fusions (loop, input, Triton/cuBLAS/cuDNN custom fusions), custom-calls (cuBLAS GEMMs) and unfused
ops (copy, scatter, sort, ...) each launch one kernel; parameter, constant, tuple plumbing and
bitcast launch nothing; of an async start/done pair only the start counts. ``call`` instructions
are followed into the called computation: on GPU, XLA outlines runs of kernels into
``command_buffer`` computations (CUDA graphs), which still launch each kernel but without a host
round trip. A cuBLAS call may launch 2 kernels (split-K), so this is a lower bound there.
"""

from __future__ import annotations

import re

__all__ = ["count_launches", "count_loop_launches", "launch_kind"]

_NO_LAUNCH = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain",
}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(to_apply|body|condition)=%?([\w.\-]+)")


def _opcode(rest: str) -> str:
    """The opcode after an instruction's result type (which may be a nested tuple)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    m = re.match(r"\s*([\w\-]+)\(", rest)
    return m.group(1) if m else "?"


def _computations(hlo: str) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """``{name: [(opcode, line)]}`` for every computation, and the entry's name."""
    comps, entry, current = {}, "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _INSTR.match(line)):
            comps[current].append((_opcode(m.group(1)), m.group(1)))
    return comps, entry


_FUSION_KIND = re.compile(r"\bkind=(k\w+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KERNEL_NAME = re.compile(r'\\?"name\\?":\s*\\?"([\w.\-]+?)(?:_m\d+_.*)?\\?"')


def launch_kind(op: str, line: str) -> str:
    """What a launching instruction runs, for the per-kind tally: ``fusion:kLoop``, a custom
    call's target (a Pallas kernel by its name, block sizes dropped), or the opcode (``copy``,
    ``scatter``, ...): enough to see where a step's launches go."""
    if op == "fusion":
        kind = _FUSION_KIND.search(line)
        return f"fusion:{kind.group(1) if kind else '?'}"
    if op == "custom-call":
        target = _TARGET.search(line)
        target = target.group(1) if target else "?"
        if "triton" in target:
            name = _KERNEL_NAME.search(line)
            return f"pallas:{name.group(1)}" if name else "pallas"
        return f"custom-call:{target}"
    return op


def count_launches(hlo: str, computation: str | None = None) -> dict:
    """Kernel launches of one run of ``computation`` (default: the entry) of compiled HLO text.

    Returns ``{"launches", "in_command_buffers", "loops", "kinds"}``; ``loops`` counts ``while`` /
    ``conditional`` instructions; ``kinds`` tallies the launches by :func:`launch_kind`. A ``while``
    counts as one launch (its body is not expanded); a ``conditional`` as one plus its largest
    branch (e.g. the merge kernels run when a route changes).
    """
    comps, entry = _computations(hlo)
    counts = {"launches": 0, "in_command_buffers": 0, "loops": 0}
    kinds: dict[str, int] = {}

    def walk(name: str, in_buffer: bool) -> None:
        for op, line in comps.get(name, []):
            if op in _NO_LAUNCH or op.endswith("-done") or op.endswith("-update"):
                continue
            if op == "call":
                target = dict(_CALLED.findall(line)).get("to_apply", "")
                walk(target, in_buffer or "command_buffer" in target)
                continue
            counts["loops"] += op in ("while", "conditional")
            counts["launches"] += 1
            counts["in_command_buffers"] += in_buffer
            kind = launch_kind(op, line)
            kinds[kind] = kinds.get(kind, 0) + 1
            if op == "conditional":
                branches = [count_launches(hlo, b) for b in _branches(line)]
                largest = max(branches, key=lambda c: c["launches"], default=None)
                for key in counts if largest else ():
                    counts[key] += largest[key]
                for kind, n in (largest["kinds"] if largest else {}).items():
                    kinds[kind] = kinds.get(kind, 0) + n

    walk(computation or entry, False)
    return {**counts, "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}


def _branches(line: str) -> list[str]:
    """The branch computations named by a ``conditional`` instruction."""
    listed = re.search(r"branch_computations=\{([^}]*)\}", line)
    if listed:
        return [b.strip().lstrip("%") for b in listed.group(1).split(",") if b.strip()]
    return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)


def count_loop_launches(hlo: str) -> dict:
    """Launches per iteration of the largest ``while`` loop (the decode loop of ``generate_batch``:
    the prefill's layer scan is the other, smaller one); body plus condition."""
    comps, _ = _computations(hlo)
    best = {"launches": 0, "in_command_buffers": 0, "loops": 0, "kinds": {}}
    for ops in comps.values():
        for op, line in ops:
            if op != "while":
                continue
            called = dict(_CALLED.findall(line))
            if "body" not in called:
                continue
            body = count_launches(hlo, called.get("body"))
            cond = count_launches(hlo, called.get("condition"))
            total = {k: body[k] + cond[k] for k in body if k != "kinds"}
            kinds = dict(body["kinds"])
            for kind, n in cond["kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
            total["kinds"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
            if total["launches"] > best["launches"]:
                best = total
    return best
