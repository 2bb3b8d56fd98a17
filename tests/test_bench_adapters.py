"""eval/bench_adapters.py and eval/peers.py on a CPU: a dry run of each, grids, floor arithmetic,
launch counting, acceptance checks, and the peers' argument parsing and skip logic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraswitch_jax import PRESETS, AdapterConfig, init_adapter
from loraswitch_jax.eval import bench_adapters as ba
from loraswitch_jax.eval import peers
from loraswitch_jax.eval.bench_decode import count_launches, count_loop_launches

DEMO = PRESETS["demo"]
DRY_MODES = ("backbone", "switch-fused", "switch-merge")


# ------------------------------------------------------------------------------ bench dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """bench_adapters on the demo preset (XLA everywhere), three modes at batch 1.

    A subprocess: its XLA compiles without optimisation (the CPU compile time dominates a dry
    run), and the run goes through the module's command line as on the GPU.
    """
    out = tmp_path_factory.mktemp("adapters")
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "loraswitch_jax.eval.bench_adapters", "--preset", "demo",
           "--context", "16", "--batch", "1", "--new-tokens", "3", "--reps", "1",
           "--impl", "xla", "--copy-gib", "0.001", "--copy-reps", "1", "--out", str(out),
           "--only", f"mode={','.join(DRY_MODES)}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "bench_adapters_issue4.json") as f:
        return out, json.load(f), proc.stdout


def test_dry_run_measures_every_mode(dry_run):
    _, report, _ = dry_run
    rows = {r["mode"]: r for r in report["results"]}
    assert sorted(rows) == sorted(DRY_MODES)
    for mode, r in rows.items():
        assert "error" not in r, (mode, r["error"])
        assert r["strategy"] == ba.MODES[mode].strategy and r["impl"] == "xla"
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
    table = (out / "bench_adapters_issue4.md").read_text()
    assert table.strip() in stdout  # printed last, as written
    for mode in DRY_MODES:
        assert f"| 1 | {mode} |" in table
    ratio = next(r for r in report["results"] if r["mode"] == "switch-fused")["ratio_to_backbone"]
    assert f"| {ratio:.3f} |" in table
    assert (out / "bench_adapters_issue4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- grids
def test_issue4_grid():
    cases = ba.BenchConfig().cases()
    # ten modes at batches 1 8 32 64, switch-merge at batch 1, switch-fused-inline where the
    # slots are gathered (batch * k < E: batch 1 at E 8, k 2), switch-fused-rows up to batch 4
    assert len(cases) == 4 * 10 + 1 + 1 + 1
    assert [c.batch for c in cases if c.mode == "switch-fused-inline"] == [1]
    assert [c.batch for c in cases if c.mode == "switch-fused-rows"] == [1]
    assert {c.preset for c in cases} == {"llama2-7b"} and {c.context for c in cases} == {1024}
    assert [c.batch for c in cases if c.mode == "switch-merge"] == [1]
    # The acceptance targets' modes are measured first (a run cut short keeps them).
    first = {c.mode for c in cases[:10]}
    assert first == {"backbone", "switch-fused", "switch-fused-rows", "switch-merge"}


def test_suite_grid_varies_one_axis_at_a_time():
    cases = ba.BenchConfig(grid="suite").cases()
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


# ---------------------------------------------------------------------------- floor, launches
def test_expected_experts():
    assert ba.expected_experts(8, 2, 1) == pytest.approx(2.0)
    assert ba.expected_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert ba.expected_experts(8, 2, 64) == pytest.approx(8.0, abs=1e-6)
    assert ba.expected_experts(128, 4, 1) == pytest.approx(4.0)


def test_adapter_step_bytes():
    key = jax.random.key(0)
    lora = init_adapter(DEMO, AdapterConfig.lora(rank=4), key)
    every = sum(lora.a[p].nbytes + lora.b[p].nbytes for p in lora.config.targets)
    assert ba.adapter_step_bytes(lora, batch=8) == {"experts_touched": 1.0, "adapters": every}

    switch = init_adapter(DEMO, AdapterConfig(mode="switch", rank=4, num_experts=8, top_k=2),
                          key)
    every = sum(switch.a[p].nbytes + switch.b[p].nbytes for p in switch.config.targets)
    got = ba.adapter_step_bytes(switch, batch=1)
    assert got["adapters"] == every * 2 // 8 + switch.router.nbytes  # [d, E] router, read once


def test_sgmm_bytes():
    shapes = {"q": (4, 32, 48), "down": (4, 80, 32)}
    la, k, r = 3, 2, 16
    per_elem = 2 * la * (32 * 48 + 80 * 32)  # read the base's adapted layers, write W'
    adapters = k * la * r * ((32 + 48) + (80 + 32))  # the selected A [K, r] and B [r, N]
    assert ba.sgmm_bytes(shapes, la, k, r, itemsize=2) == 2 * (per_elem + adapters)


HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8] get-tuple-element(%p), index=1
  %f = f32[8] fusion(%x), kind=kLoop, calls=%fused_a
  %g = f32[8] custom-call(%f), custom_call_target="__cublas$gemm"
  %n = s32[] fusion(%i), kind=kLoop, calls=%fused_b
  ROOT %t = (s32[], f32[8]) tuple(%n, %g)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] fusion(%i), kind=kLoop, calls=%fused_c
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8]) tuple(%z, %a)
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_launch_counting():
    # Body: two fusions and a GEMM; condition: one fusion. Plumbing launches nothing.
    assert count_loop_launches(HLO)["launches"] == 4
    with_copy = HLO.replace("  ROOT %t = (s32[], f32[8]) tuple(%n, %g)",
                            "  %c = f32[8] copy(%g)\n  ROOT %t = (s32[], f32[8]) tuple(%n, %c)")
    assert count_loop_launches(with_copy)["launches"] == 5
    # Tallied by kind: where a step's launches go.
    assert count_loop_launches(with_copy)["kinds"] == {
        "fusion:kLoop": 3, "custom-call:__cublas$gemm": 1, "copy": 1}
    triton = ('  %k = f32[8] custom-call(%f), custom_call_target="__gpu$xla.gpu.triton", '
              'backend_config={"name":"qkv_matmul_m16_n128_k128_s1_w4_st3","ir":"..."}\n')
    with_kernel = HLO.replace("  %n = s32[]", triton + "  %n = s32[]")
    assert count_loop_launches(with_kernel)["kinds"]["pallas:qkv_matmul"] == 1


def test_conditional_counts_its_largest_branch():
    """switch-merge's merge-if-the-route-changed: the conditional plus its larger branch."""
    def f(changed, w):
        return jax.lax.cond(changed, lambda w: jnp.sin(w) @ w + 1, lambda w: w, w)

    hlo = jax.jit(f).lower(True, jnp.ones((4, 4))).compile().as_text()
    entry = count_launches(hlo)
    assert entry["loops"] == 1
    assert entry["launches"] >= 2  # the conditional and at least one kernel of its big branch


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
        "args": {"grid": "issue4", "new_tokens": 65, "reps": 3, "impl": "mode"},
        "environment": {"device_kind": "NVIDIA H100 80GB HBM3", "jax": "0.11.2",
                        "date": "2026-11-24T00:00:00+00:00"},
        "bandwidth": {"copy_gbps": 2700.0}, "results": results, "not_run": [],
        "stopped": None, "wall_s": 1.0,
        "sgmm": {"llama2-7b": {"ms": 10.0, "bytes": 2.6e10, "gbps": 2600.0, "fraction": 0.96},
                 "llama-1b": {"error": "ValueError: no"}},
    }
    table = ba.write_outputs(report, str(tmp_path))
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
    saved = json.loads((tmp_path / "bench_adapters_issue4.json").read_text())
    assert saved["results"][1]["ratio_to_backbone"] == pytest.approx(1.02)
    assert (tmp_path / "bench_adapters_issue4.png").stat().st_size > 0


# ------------------------------------------------------------------------------------ peers
def test_peers_parse_args():
    config, wheels = peers.parse_args([])
    assert (config.preset, config.context, config.peers, wheels) == (
        "llama2-7b", 1024, peers.PEERS, None)
    config, wheels = peers.parse_args(["--preset", "llama-1b", "--peers", "eager", "mixlora",
                                       "--download-wheels", "wheels"])
    assert (config.preset, config.peers, wheels) == ("llama-1b", ("eager", "mixlora"), "wheels")
    with pytest.raises(SystemExit):
        peers.parse_args(["--peers", "vllm"])
    with pytest.raises(ValueError, match="lora_dropout > 0"):
        peers.PeersConfig(dropout=0.0)


def _hide(monkeypatch, *names):
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *a: None if name in names else real(name, *a))


def test_peers_skip_reasons(monkeypatch):
    _hide(monkeypatch, "mixlora")
    reason = peers.skip_reason("mixlora", "cuda")
    assert "mixlora is not installed" in reason and "--download-wheels" in reason
    assert peers.skip_reason("eager", "cpu") is None
    assert "GPU" in peers.skip_reason("compiled", "cpu")
    assert peers.skip_reason("compiled", "cuda") is None
    _hide(monkeypatch, "peft")
    assert "peft is not installed" in peers.skip_reason("peft-lora", "cuda")


def test_peers_dry_run(tmp_path, monkeypatch):
    _hide(monkeypatch, "mixlora")
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({
        "environment": {"device_kind": "NVIDIA H100 80GB HBM3"},
        "results": [
            _row(("demo", 16), 1, "switch-fused", 0.5, prefill_ms=3.0),
            _row(("demo", 16), 8, "switch-fused", 0.9),  # another batch: left out
            _row(("demo", 32), 1, "backbone", 0.4),  # another context: left out
        ]}))
    config, _ = peers.parse_args(["--preset", "demo", "--context", "16", "--new-tokens", "3",
                                  "--reps", "1", "--ours", str(ours), "--out", str(tmp_path),
                                  "--peers", "eager", "peft-lora", "compiled", "mixlora"])
    report = peers.main(config)
    rows = {r["variant"]: r for r in report["results"]}
    for peer in ("eager", "peft-lora"):
        assert "error" not in rows[peer] and math.isfinite(rows[peer]["ms_per_token"]), peer
        assert np.isclose(np.median(rows[peer]["run_ms"][1]), rows[peer]["prefill_ms"])
    assert "not installed" in rows["mixlora"]["skipped"]
    assert "GPU" in rows["compiled"]["skipped"]
    assert [r["variant"] for r in report["ours"]] == ["switch-fused"]
    table = (tmp_path / "peers_demo.md").read_text()
    assert "| loraswitch-jax | switch-fused | 0.50 |" in table
    assert "| transformers | eager |" in table and "| 1.00 |" in table
    assert (tmp_path / "peers_demo.png").stat().st_size > 0
    assert json.loads((tmp_path / "peers_demo.json").read_text())["args"]["preset"] == "demo"
