"""The adapter benchmark on a CPU: a dry run through its command line, grids, filters, floor
arithmetic, acceptance checks and the written report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from loraswitch_jax import PRESETS, AdapterConfig, init_adapter
from loraswitch_jax.eval.bench import adapter_measure as measure
from loraswitch_jax.eval.bench import adapters as ba
from loraswitch_jax.eval.bench.adapter_cases import MODES, Case
from loraswitch_jax.eval.bench.adapter_report import write_outputs

DEMO = PRESETS["demo"]
DRY_MODES = ("backbone", "switch-fused", "switch-merge")


# ------------------------------------------------------------------------------ bench dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The adapter benchmark on the demo preset (XLA everywhere), three modes at batch 1.

    A subprocess: its XLA compiles without optimisation (the CPU compile time dominates a dry
    run), and the run goes through the module's command line as on the GPU.
    """
    out = tmp_path_factory.mktemp("adapters")
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "loraswitch_jax.eval.bench.adapters", "--preset", "demo",
           "--context", "16", "--batch", "1", "--new-tokens", "3", "--reps", "1",
           "--impl", "xla", "--copy-gib", "0.001", "--copy-reps", "1", "--out", str(out),
           "--only", f"mode={','.join(DRY_MODES)}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "demo_e8_r16_ctx16.json") as f:
        return out, json.load(f), proc.stdout


def test_dry_run_measures_every_mode(dry_run):
    _, report, _ = dry_run
    rows = {r["mode"]: r for r in report["results"]}
    assert sorted(rows) == sorted(DRY_MODES)
    for mode, r in rows.items():
        assert "error" not in r, (mode, r["error"])
        assert r["strategy"] == MODES[mode].strategy and r["impl"] == "xla"
        for key in ("ms_per_token", "ratio_to_backbone", "floor_ms", "prefill_tokens_per_s"):
            assert math.isfinite(r[key]), (mode, key, r[key])
        assert r["launches"]["launches"] > 0
        b = r["bytes"]
        assert b["total"] == b["weights"] + b["embed_rows"] + b["kv"] + b.get("adapters", 0)
    assert rows["backbone"]["ratio_to_backbone"] == 1.0
    # The adapter's work shows up in the compiled decode loop and in the floor.
    assert rows["switch-fused"]["launches"]["launches"] > rows["backbone"]["launches"]["launches"]
    assert rows["switch-fused"]["bytes"]["experts_touched"] == 2.0
    assert rows["switch-fused"]["floor_ms"] > rows["backbone"]["floor_ms"]
    for mode in ("switch-fused", "switch-merge"):
        routes = rows[mode]["routes"]
        assert routes["distinct_routes_per_step"] == 1.0  # batch 1: one route per step
        assert 1 <= routes["distinct_routes_total"] <= math.comb(8, 2)
    assert report["environment"]["jax"] == jax.__version__
    assert "skipped" in report["sgmm"]["demo"]  # the SGMM kernel is timed on a GPU only
    assert report["acceptance"] == []  # the targets are for Llama-2-7B at context 1024


def test_dry_run_writes_markdown_and_plot(dry_run):
    out, report, stdout = dry_run
    table = (out / "demo_e8_r16_ctx16.md").read_text()
    assert table.strip() in stdout  # printed last, as written
    for mode in DRY_MODES:
        assert f"| 1 | {mode} |" in table
    ratio = next(r for r in report["results"] if r["mode"] == "switch-fused")["ratio_to_backbone"]
    assert f"| {ratio:.3f} |" in table
    assert (out / "demo_e8_r16_ctx16.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- grids
def test_main_grid():
    bc = ba.AdaptersConfig()
    cases = bc.cases()
    # seven modes at batches 1 8 32 64, switch-merge at batch 1
    assert len(cases) == 4 * 7 + 1
    assert {c.mode for c in cases} == set(MODES)
    assert {c.preset for c in cases} == {"llama2-7b"} and {c.context for c in cases} == {1024}
    assert [c.batch for c in cases if c.mode == "switch-merge"] == [1]
    # The acceptance targets' modes are measured first (a run cut short keeps them).
    assert {c.mode for c in cases[:13]} == {"backbone", "switch-fused", "switch-ahead",
                                            "switch-merge"}
    # The report is named by what it measures.
    assert bc.stem() == "eval/results/adapters/llama2-7b_e8_r16_ctx1024"
    assert ba.AdaptersConfig(grid="suite", out="x").stem() == "x/suite"
    assert ba.AdaptersConfig(name="run", out="x").stem() == "x/run"


def test_modes_and_cases_refuse_bad_input():
    with pytest.raises(ValueError, match="Case.mode"):
        Case("llama2-7b", "switch-fast", 1, 1024)
    with pytest.raises(ValueError, match="Case sizes"):
        Case("llama2-7b", "backbone", 0, 1024)
    with pytest.raises(ValueError, match="unknown grid"):
        ba.AdaptersConfig(grid="issue4")


def test_suite_grid_varies_one_axis_at_a_time():
    cases = ba.AdaptersConfig(grid="suite").cases()
    assert {c.preset for c in cases} == {"llama2-7b", "llama-1b"}
    off_base = [c for c in cases if (c.experts, c.top_k) != (8, 2)]
    assert {(c.experts, c.top_k) for c in off_base} == {(32, 2), (128, 2), (8, 1), (8, 4)}
    assert {c.context for c in off_base} == {1024}  # E and k vary at the base context only
    assert {c.mode for c in off_base} == {"switch-fused", "switch-merge", "layerwise-pallas"}
    assert {c.context for c in cases if c.mode == "backbone"} == {128, 1024, 4096}
    assert len(set(cases)) == len(cases)


def test_filters_and_overrides():
    bc = ba.parse_args(["--grid", "suite", "--preset", "demo", "--batch", "1", "2",
                        "--only", "mode=backbone,lora", "experts=8"])
    cases = bc.cases()
    assert {(c.mode, c.batch) for c in cases} == {(m, b) for m in ("backbone", "lora")
                                                  for b in (1, 2)}
    assert {c.preset for c in cases} == {"demo"}
    # The backbone comes along (first) wherever a ratio will need it.
    cases = ba.parse_args(["--only", "mode=lora", "batch=8"]).cases()
    assert [(c.mode, c.batch) for c in cases] == [("backbone", 8), ("lora", 8)]
    cases = ba.parse_args(["--grid", "suite", "--only", "experts=128", "preset=llama-1b",
                           "batch=1"]).cases()
    assert [c.mode for c in cases] == ["backbone", "switch-fused", "switch-merge",
                                       "layerwise-pallas"]
    assert [c.experts for c in cases] == [8, 128, 128, 128]
    with pytest.raises(ValueError, match="--only key 'colour'"):
        ba.parse_args(["--only", "colour=red"])
    with pytest.raises(ValueError, match="unknown modes"):
        ba.parse_args(["--only", "mode=switch-fast"])
    with pytest.raises(ValueError, match="passes --only"):
        ba.parse_args(["--only", "batch=3"]).cases()
    with pytest.raises(SystemExit):  # argparse: not KEY=VALUES
        ba.parse_args(["--only", "mode"])


# ---------------------------------------------------------------------------------- floor
def test_expected_experts():
    assert measure.expected_experts(8, 2, 1) == pytest.approx(2.0)
    assert measure.expected_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert measure.expected_experts(8, 2, 64) == pytest.approx(8.0, abs=1e-6)
    assert measure.expected_experts(128, 4, 1) == pytest.approx(4.0)


def test_adapter_step_bytes():
    key = jax.random.key(0)
    lora = init_adapter(DEMO, AdapterConfig.lora(rank=4), key)
    every = sum(lora.a[p].nbytes + lora.b[p].nbytes for p in lora.config.targets)
    assert measure.adapter_step_bytes(lora, batch=8) == {"experts_touched": 1.0, "adapters": every}

    switch = init_adapter(DEMO, AdapterConfig(mode="switch", rank=4, num_experts=8, top_k=2),
                          key)
    every = sum(switch.a[p].nbytes + switch.b[p].nbytes for p in switch.config.targets)
    got = measure.adapter_step_bytes(switch, batch=1)
    assert got["adapters"] == every * 2 // 8 + switch.router.nbytes  # [d, E] router, read once


def test_sgmm_bytes():
    shapes = {"q": (4, 32, 48), "down": (4, 80, 32)}
    la, k, r = 3, 2, 16
    per_elem = 2 * la * (32 * 48 + 80 * 32)  # read the base's adapted layers, write W'
    adapters = k * la * r * ((32 + 48) + (80 + 32))  # the selected A [K, r] and B [r, N]
    assert measure.sgmm_bytes(shapes, la, k, r, itemsize=2) == 2 * (per_elem + adapters)


# ---------------------------------------------------------------------------------- report
def _row(setting, batch, mode, ms, **extra):
    preset, context = setting
    return {"preset": preset, "context": context, "experts": 8, "top_k": 2, "batch": batch,
            "mode": mode, "setting": f"{preset}, context {context}, E 8, k 2",
            "ms_per_token": ms, **extra}


def test_acceptance_and_outputs(tmp_path):
    a, b = ("llama2-7b", 1024), ("llama-1b", 128)
    results = [
        _row(a, 1, "backbone", 5.0), _row(a, 1, "switch-fused", 5.1),  # 1.02: pass
        _row(a, 1, "layerwise-pallas", 7.5), _row(a, 1, "layerwise-xla", 4.0),
        _row(a, 8, "backbone", 6.0), _row(a, 8, "switch-fused", 6.6),  # 1.10: fail
        _row(b, 1, "backbone", 2.0), _row(b, 1, "switch-fused", 2.1),
        {**_row(a, 64, "switch-fused", None), "error": "out of memory: ..."},
    ]
    results[-1].pop("ms_per_token")
    report = {
        "args": {"grid": "main", "new_tokens": 65, "reps": 3, "impl": "mode"},
        "environment": {"device_kind": "NVIDIA H100 80GB HBM3", "jax": "0.11.2",
                        "date": "2026-11-24T00:00:00+00:00"},
        "bandwidth": {"copy_gbps": 2700.0}, "results": results, "not_run": [],
        "stopped": None, "wall_s": 1.0,
        "sgmm": {"llama2-7b": {"ms": 10.0, "bytes": 2.6e10, "gbps": 2600.0, "fraction": 0.96},
                 "llama-1b": {"error": "ValueError: no"}},
    }
    table = write_outputs(report, str(tmp_path / "run"))
    checks = {c["check"]: c for c in report["acceptance"]}
    assert checks["switch-fused / backbone, batch 1, llama2-7b, context 1024, E 8, k 2"]["pass"]
    assert not checks["switch-fused / backbone, batch 8, llama2-7b, context 1024, E 8, k 2"][
        "pass"]
    lw = "speed-up of switch-fused over layerwise-{}, batch 1, llama2-7b, context 1024, E 8, k 2"
    assert checks[lw.format("pallas")]["value"] == pytest.approx(7.5 / 5.1)
    assert not checks[lw.format("xla")]["pass"]
    assert checks["SGMM merge bandwidth / copy bandwidth, llama2-7b"]["pass"]
    # The failed batch-64 row, the failed SGMM and the 1B setting (not the issue's) give none.
    assert len(checks) == 5
    assert "| 1.020 |" in table and "FAIL" in table and "out of memory" in table
    assert "SGMM merge alone, llama-1b: ValueError: no" in table
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["results"][1]["ratio_to_backbone"] == pytest.approx(1.02)
    assert (tmp_path / "run.png").stat().st_size > 0
