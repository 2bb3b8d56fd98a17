"""The tensor-parallel decode benchmark on 8 CPU host devices: a dry run through its command line
(the demo model over tensor=2 and tensor=4, a mesh too large for the host), the report's fields
and arithmetic, the collective accounting on GPU-style trace events, and argument refusals."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from loraswitch_jax.config import PRESETS
from loraswitch_jax.eval.bench import tensor_decode as td
from loraswitch_jax.eval.bench import tensor_decode_report as tdr

N1, N2 = 1, 17
DRY_MODES = ("backbone", "switch-fused")  # the targets' modes (lora and layerwise: same path)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``--small --cpu`` at batch 1, the targets' modes; XLA compiles without optimisation."""
    out = tmp_path_factory.mktemp("tensor_decode")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "
               "--xla_force_host_platform_device_count=8")
    argv = ["--small", "--cpu", "--mesh", "tensor=2", "tensor=4", "tensor=16", "--batch", "1",
            "--mode", *DRY_MODES,
            "--new-tokens", str(N1), str(N2), "--out", str(out)]
    cmd = [sys.executable, "-m", "loraswitch_jax.eval.bench.tensor_decode", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = td.parse_args(argv)[0].stem()
    assert stem == str(out / "demo_ctx64_tensor2+tensor4+tensor16_b1")
    with open(stem + ".json") as f:
        return stem, json.load(f), proc.stdout


def _check_dry_run_rows_and_arithmetic(dry_run):
    _, report, _ = dry_run
    rows = {(r["mesh"], r["mode"]): r for r in report["results"]}
    assert len(rows) == len(report["results"]) == 6
    assert set(rows) == {(m, mode) for m in ("tensor=2", "tensor=4", "tensor=16")
                         for mode in DRY_MODES}
    copy_gbps = report["bandwidth"]["copy_gbps"]
    layers = PRESETS["demo"].num_hidden_layers
    for mesh, tensor in (("tensor=2", 2), ("tensor=4", 4)):
        backbone = rows[(mesh, "backbone")]
        for mode in DRY_MODES:
            r = rows[(mesh, mode)]
            assert r["status"] == "ok", r
            assert (r["tensor"], r["devices"], r["impl"]) == (tensor, tensor, "xla")
            run_ms = r["run_ms"]  # the step time is the difference of the two run lengths
            step = (statistics.median(run_ms[str(N2)]) - statistics.median(run_ms[str(N1)]))
            assert r["ms_per_token"] == pytest.approx(step / (N2 - N1))
            if min(r["ms_per_token"], backbone["ms_per_token"]) > 0:
                assert r["ratio_to_backbone"] == pytest.approx(r["ms_per_token"]
                                                               / backbone["ms_per_token"])
            else:  # a noisy CPU run timed N2 no slower than N1: no ratio
                assert "ratio_to_backbone" not in r
            b = r["bytes_per_device"]
            assert b["total"] == b["weights"] + b["embed_rows"] + b["kv"] + b.get("adapters", 0)
            assert r["floor_ms"] == pytest.approx(1e3 * b["total"] / (copy_gbps * 1e9))
            assert r["fraction"] == (pytest.approx(r["floor_ms"] / r["ms_per_token"])
                                     if r["ms_per_token"] > 0 else None)
            c = r["collectives"]
            assert c["devices"] == tensor and "psum" in c["groups"]
            assert c["all_reduces"] == pytest.approx(2 * layers)  # after o and after down
            assert math.isfinite(c["all_reduce_ms"])
            assert c["all_reduce_ms_max"] >= c["all_reduce_ms"]
        assert backbone.get("ratio_to_backbone", 1.0) == 1.0
        assert rows[(mesh, "switch-fused")]["bytes_per_device"]["experts_touched"] == 2.0
    two, four = rows[("tensor=2", "backbone")], rows[("tensor=4", "backbone")]
    assert four["bytes_per_device"]["weights"] < two["bytes_per_device"]["weights"]
    assert four["bytes_per_device"]["total"] < two["bytes_per_device"]["total"]
    # demo has 2 KV heads: at tensor=4 each is copied twice, one per device either way.
    assert four["bytes_per_device"]["kv"] == two["bytes_per_device"]["kv"] > 0
    assert report["meshes"]["tensor=4"]["param_bytes_per_device"] < \
        report["meshes"]["tensor=2"]["param_bytes_per_device"]
    for mode in DRY_MODES:
        r = rows[("tensor=16", mode)]
        assert r["status"] == "skipped" and "needs 16 devices, 8 visible" in r["error"]
    checks = {c["check"]: c for c in report["acceptance"]}
    for mesh in ("tensor=2", "tensor=4"):  # one check per switch-fused ratio
        c = checks.pop(f"switch-fused / backbone, batch 1, {mesh}", None)
        ratio = rows[(mesh, "switch-fused")].get("ratio_to_backbone")
        assert (c and c["value"]) == ratio
        assert c is None or c["pass"] == (c["value"] <= tdr.TARGETS["switch_b1"])
    floor = checks.pop("backbone of the per-GPU floor, batch 1, tensor=4", None)
    assert (floor and floor["value"]) == rows[("tensor=4", "backbone")]["fraction"]
    assert checks == {}
    assert report["environment"]["device_count"] == 8


def _check_dry_run_writes_table_and_plot(dry_run):
    stem, report, stdout = dry_run
    table = open(stem + ".md").read()
    assert stdout.rstrip().endswith(table.rstrip())  # printed last
    assert f"JAX {report['environment']['jax']}" in table and "not the issue's setting" in table
    row = next(r for r in report["results"] if (r["mesh"], r["mode"]) == (
        "tensor=4", "switch-fused"))
    assert f"| tensor=4 | 1 | switch-fused | {row['ms_per_token']:.3f} |" in table
    assert "skipped: mesh tensor=16 needs 16 devices" in table
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Sorted by mesh, batch and mode, whatever the run order.
    body = [line.split(" | ")[:3] for line in table.splitlines() if line.startswith("| tensor=")]
    assert body == [[f"| {m}", "1", mode] for m in ("tensor=2", "tensor=4", "tensor=16")
                    for mode in DRY_MODES]


def test_dry_run(dry_run):
    """One test over the dry_run fixture's run, so that pytest-xdist runs it once, on one
    worker (tests sharing a module fixture on two workers ran it twice)."""
    _check_dry_run_rows_and_arithmetic(dry_run)
    _check_dry_run_writes_table_and_plot(dry_run)


# ------------------------------------------------------------------ traces of several GPUs
def _gpu_trace(kernels: dict[int, list[tuple[str, float]]]) -> list[dict]:
    """A Perfetto-style trace: one process per GPU with one stream track, plus the host."""
    events = [{"ph": "M", "name": "process_name", "pid": 99, "args": {"name": "/host:CPU"}},
              {"ph": "X", "name": "ncclHostWork_AllReduce", "pid": 99, "tid": 1, "dur": 500.0}]
    for gpu, names in kernels.items():
        events += [{"ph": "M", "name": "process_name", "pid": gpu,
                    "args": {"name": f"/device:GPU:{gpu}"}},
                   {"ph": "M", "name": "thread_name", "pid": gpu, "tid": 7,
                    "args": {"name": "Stream #7(Compute)"}}]
        events += [{"ph": "X", "name": n, "pid": gpu, "tid": 7, "dur": us} for n, us in names]
    return events


def test_collectives_per_device_from_gpu_trace():
    ar = "ncclDevKernel_AllReduce_Sum_bf16_RING_LL"
    gather = "ncclDevKernel_AllGather_RING_LL"
    one = _gpu_trace({0: [("gemm_fusion", 10.0)], 1: [("gemm_fusion", 10.0)], 2: []})
    many = _gpu_trace({0: [("gemm_fusion", 30.0), (ar, 40.0), (ar, 40.0), (gather, 4.0)],
                       1: [("gemm_fusion", 30.0), (ar, 80.0), (ar, 80.0), (gather, 4.0)],
                       2: []})  # GPU 2 is outside the mesh: no kernels
    c = td.collective_times(td._device_groups(one, False, 2), td._device_groups(many, False, 2),
                            steps=2)
    assert c["devices"] == 2 and c["all_reduces"] == 1.0
    assert c["all_reduce_ms"] == pytest.approx((80 + 160) / 2 / 2 / 1e3)
    assert c["all_reduce_ms_max"] == pytest.approx(160 / 2 / 1e3)
    assert c["other_collectives_ms"] == pytest.approx(4 / 2 / 1e3)
    assert c["groups"] == sorted([gather, ar])
    with pytest.raises(RuntimeError, match="devices with kernels"):
        td.collective_times([], [], steps=2)


def test_acceptance_targets():
    rows = [{"mesh": "tensor=4", "batch": 1, "mode": "backbone", "ms_per_token": 10.0,
             "fraction": 0.9},
            {"mesh": "tensor=4", "batch": 1, "mode": "switch-fused", "ms_per_token": 10.9},
            {"mesh": "tensor=8", "batch": 8, "mode": "backbone", "ms_per_token": 10.0,
             "fraction": 0.5},
            {"mesh": "tensor=8", "batch": 8, "mode": "switch-fused", "ms_per_token": 10.9}]
    tdr.add_ratios(rows)
    checks = {c["check"]: c["pass"] for c in tdr.acceptance(rows)}
    assert checks == {"backbone of the per-GPU floor, batch 1, tensor=4": True,
                      "switch-fused / backbone, batch 1, tensor=4": True,    # 1.09 <= 1.10
                      "switch-fused / backbone, batch 8, tensor=8": False}   # 1.09 > 1.08


# ----------------------------------------------------------------------------- arguments
def test_defaults_are_the_issue_setting():
    bc, cpu = td.parse_args([])
    assert (bc.preset, bc.context, bc.meshes, bc.batches) == (
        "llama2-70b", 1024, ("tensor=4", "tensor=8"), (1, 8, 32, 64))
    assert bc.modes == td.DEFAULT_MODES and bc.impl == "mode" and not cpu
    cases = bc.cases()  # the targets' modes at every batch and mesh first, batch 1 first
    assert cases[:4] == [("tensor=4", 1, "backbone"), ("tensor=4", 1, "switch-fused"),
                         ("tensor=8", 1, "backbone"), ("tensor=8", 1, "switch-fused")]
    assert {m for _, _, m in cases[:16]} == {"backbone", "switch-fused"} and len(cases) == 32
    assert bc.stem() == "eval/results/tensor_decode/llama2-70b_ctx1024_tensor4+tensor8_b1-8-32-64"
    small, cpu = td.parse_args(["--small", "--cpu", "--context", "32", "--mode", "lora"])
    assert (small.preset, small.context, small.impl, cpu) == ("demo", 32, "xla", True)
    assert small.modes == ("backbone", "lora")  # the ratios' reference always runs
    assert small.stem().endswith("demo_ctx32_tensor2+tensor4_b1-2")


def test_budget_estimate():
    done = [{"mesh": "tensor=4", "batch": 1, "wall_s": 40.0},
            {"mesh": "tensor=8", "batch": 1, "wall_s": 30.0},
            {"mesh": "tensor=4", "batch": 8, "wall_s": 50.0}, {"mesh": "tensor=8", "batch": 8}]
    assert td._estimate_s([], "tensor=4", 1) == 0.0
    assert td._estimate_s(done, "tensor=8", 1) == 30.0  # same mesh and batch
    assert td._estimate_s(done, "tensor=8", 8) == 50.0  # same batch (the skipped row has none)
    assert td._estimate_s(done, "tensor=4", 32) == 75.0  # a larger batch: 1.5 x the slowest


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "tensr=4"], "bad mesh item"),
    (["--mesh", "tensor=0"], "positive integer"),
    (["--new-tokens", "5", "5"], "1 <= N1 < N2"),
    (["--batch", "0"], "must be positive"),
    (["--budget-s", "0"], "must be positive"),
    (["--profile-steps", "-1"], "profile_steps >= 0"),
    (["--batch", "1", "8", "1"], "batches has duplicates"),
    (["--mode", "lora", "lora"], "modes has duplicates"),
])
def test_bad_arguments_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        td.parse_args(argv)


def test_unknown_mode_and_preset_are_refused(capsys):
    for argv in (["--mode", "nope"], ["--preset", "gpt2"]):
        with pytest.raises(SystemExit):
            td.parse_args(argv)
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown or empty"):
        td.TensorDecodeConfig(modes=("nope",))


def test_pallas_modes_refused_on_cpu(tmp_path):
    bc = td.TensorDecodeConfig(preset="demo", out=str(tmp_path))
    with pytest.raises(ValueError, match="need a GPU"):
        td.main(bc)
    assert list(tmp_path.iterdir()) == []
