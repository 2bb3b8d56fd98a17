"""The training scaling benchmark on 8 CPU host devices: its smoke run through the command line
(each mesh in its own process), the report's measured fields, placed random weights, the trace's
collective time and argument refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys

import jax
import numpy as np
import pytest

from loraswitch_jax.adapters import init_adapter
from loraswitch_jax.config import PRESETS
from loraswitch_jax.eval.bench import training as tb
from loraswitch_jax.eval.bench import training_scaling as ts
from loraswitch_jax.sharding import MeshConfig
from loraswitch_jax.train.placement import plan_placement
from loraswitch_jax.train.step import OptimConfig, init_state

MESHES = ("data=2", "fsdp=2", "fsdp=4", "data=16")  # the one-device baseline is put first


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``--small --cpu`` (demo model, seq 64) on 8 host devices, 3 steps per mesh."""
    out = tmp_path_factory.mktemp("scaling")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                                     "--xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "loraswitch_jax.eval.bench.training_scaling", "--small", "--cpu",
           "--meshes", *MESHES, "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = out / "demo_seq64_switch_dots_b1"
    with open(f"{stem}.json") as f:
        return stem, json.load(f), proc.stdout


def _check_smoke_rows_and_efficiency(smoke):
    stem, report, stdout = smoke
    env = report["environment"]
    assert (env["platform"], env["device_count"]) == ("cpu", 8) and env["jax"] == jax.__version__
    rows = {r["mesh"]: r for r in report["results"]}
    assert list(rows) == ["one", "data=2", "fsdp=2", "fsdp=4", "data=16"]
    base = rows["one"]
    for name, devices in (("one", 1), ("data=2", 2), ("fsdp=2", 2), ("fsdp=4", 4)):
        r = rows[name]
        assert r["status"] == "ok", r
        assert (r["devices"], r["batch"]) == (devices, devices)  # one row per device
        assert len(r["step_s_all"]) == 2 and r["step_s"] == statistics.median(r["step_s_all"])
        assert r["tokens_per_s"] == pytest.approx(devices * 64 / r["step_s"])
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / devices)
        assert r["scaling_efficiency"] == pytest.approx(
            r["tokens_per_s_per_device"] / base["tokens_per_s_per_device"])
        assert r["meets_target"] == (r["scaling_efficiency"] >= ts.TARGET)
        assert r["flops"]["model"] == pytest.approx(devices * base["flops"]["model"])
        # MFU over the mesh's peak: n devices' worth.
        assert r["mfu"] == pytest.approx(r["flops"]["model"] / r["step_s"]
                                         / (devices * ts.H200_BF16_TFLOPS * 1e12))
        assert r["peak_bytes"] is None and r["compile_s"] > 0  # no memory_stats on a CPU
        assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"])) and min(r["losses"]) > 0
    assert base["scaling_efficiency"] == 1.0
    assert report["baseline_tokens_per_s"] == base["tokens_per_s_per_device"]
    skipped = rows["data=16"]  # known too large from the first row's device count: never spawned
    assert skipped["status"] == "skipped" and skipped["error"] == "needs 16 devices, 8 visible"
    assert "wall_s" not in skipped


def _check_smoke_meshes_differ_but_compute_the_same(smoke):
    _, report, _ = smoke
    rows = {r["mesh"]: r for r in report["results"]}
    # The compiled steps: no collective on one device; data parallelism reduces the gradients;
    # FSDP gathers each layer's weights (forward and backward) and reduce-scatters gradients.
    assert rows["one"]["collectives"] == {}
    assert rows["data=2"]["collectives"].get("all-reduce", 0) >= 1
    assert "reduce-scatter" not in rows["data=2"]["collectives"]
    for name in ("fsdp=2", "fsdp=4"):
        c = rows[name]["collectives"]
        assert c.get("reduce-scatter", 0) >= 1
        assert c.get("all-gather", 0) > rows["data=2"]["collectives"].get("all-gather", 0)
    # Same global batch, data and weights: the same losses, step after step (training too).
    np.testing.assert_allclose(rows["data=2"]["losses"], rows["fsdp=2"]["losses"], rtol=1e-4)
    assert set(report["loss_spread"]) == {"2"} and report["loss_spread"]["2"] < 1e-4
    assert rows["fsdp=4"]["losses"][0] != pytest.approx(rows["fsdp=2"]["losses"][0], rel=1e-6)


def _check_smoke_report_files(smoke):
    stem, _, stdout = smoke
    table = stem.with_suffix(".md").read_text()
    assert "8 x cpu, JAX " in table and "target >= 0.90" in table
    assert "| fsdp=4 | 4 | 4 |" in table and "skipped: needs 16 devices, 8 visible" in table
    assert stem.with_suffix(".png").stat().st_size > 0
    assert stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last


def test_smoke_run(smoke):
    """One test over the smoke fixture's run, so that pytest-xdist runs it once, on one
    worker (tests sharing a module fixture on two workers ran it twice)."""
    _check_smoke_rows_and_efficiency(smoke)
    _check_smoke_meshes_differ_but_compute_the_same(smoke)
    _check_smoke_report_files(smoke)


def test_random_params_placed_by_shardings_equal_one_device():
    """Made in fsdp=4's shardings: each device holds a quarter of a weight, and the values are
    training's one-device draw."""
    cfg, key = PRESETS["demo"], jax.random.key(3)
    shapes = jax.eval_shape(lambda k: tb.random_params(cfg, k), key)
    acfg, oc = tb.Run.parse("switch:dots:4").adapter_config(), OptimConfig()
    state = jax.eval_shape(lambda k: init_state(init_adapter(cfg, acfg, k), oc, 0), key)
    placement = plan_placement(MeshConfig(fsdp=4), cfg, shapes, state, 4)
    placed = tb.random_params(cfg, key, placement.params)
    whole = tb.random_params(cfg, key)
    for got, want, sharding in zip(jax.tree.leaves(placed), jax.tree.leaves(whole),
                                   jax.tree.leaves(placement.params)):
        assert got.sharding == sharding and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    wq = placed.layers.wq  # [L, d, q]: d over fsdp
    assert wq.addressable_shards[0].data.shape == (wq.shape[0], wq.shape[1] // 4, wq.shape[2])


def test_collective_profile_per_device():
    """Two GPUs' stream tracks in a Perfetto trace: NCCL and gemm kernels, mean per device."""
    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": f"/device:GPU:{p}"}}
            for p in (1, 2)]
    meta += [{"ph": "M", "name": "thread_name", "pid": p, "tid": 7, "args": {"name": "Stream #7"}}
             for p in (1, 2)]
    kernels = [("ncclDevKernel_AllGather_RING_LL", 30.0), ("ncclDevKernel_ReduceScatter_RING", 10.0),
               ("sm90_xmma_gemm_bf16", 100.0)]
    events = meta + [{"ph": "X", "pid": p, "tid": 7, "name": n, "dur": us}
                     for p in (1, 2) for n, us in kernels]
    prof = ts.collective_profile(events, 2, allow_host=False)
    assert prof["busy_us_per_device"] == pytest.approx(140.0)
    assert prof["collective_us_per_device"] == pytest.approx(40.0)
    assert list(prof["collective_groups"]) == ["ncclDevKernel_AllGather_RING_LL",
                                               "ncclDevKernel_ReduceScatter_RING"]


def test_hlo_collectives_counts_async_pairs_once():
    hlo = ("  %ag = bf16[4,8] all-gather-start(%p), dimensions={0}\n"
           "  %d = bf16[4,8] all-gather-done(%ag)\n"
           "  %rs = f32[2] reduce-scatter(%g), dimensions={0}\n"
           "  %ar = f32[] all-reduce(%l), to_apply=%add\n  %ar2 = f32[] all-reduce(%m)\n")
    assert ts.hlo_collectives(hlo) == {"all-gather": 1, "all-reduce": 2, "reduce-scatter": 1}


def test_efficiency_needs_the_baseline():
    rows = [{"mesh": "one", "status": "error"},
            {"mesh": "data=2", "status": "ok", "tokens_per_s_per_device": 90.0}]
    assert ts.add_efficiency(rows) is None and "scaling_efficiency" not in rows[1]


def test_parse_args_and_refusals():
    sc = ts.parse_args([])
    assert sc.meshes == ts.DEFAULT_MESHES and (sc.preset, sc.seq) == ("llama3-8b", 2048)
    assert (sc.adapter, sc.remat, sc.batch_per_device) == ("switch", "dots", 1)
    assert [ts.mesh_label(ts.parse_mesh(m)) for m in sc.meshes] == [
        "one", "data=2", "fsdp=2", "data=4", "fsdp=4", "data=8", "fsdp=8"]
    small = ts.parse_args(["--small", "--meshes", "fsdp=2", "data=2,fsdp=2",
                           "--batch-per-device", "2"])
    assert small.meshes == ("1", "fsdp=2", "data=2,fsdp=2")  # the baseline first
    assert (small.preset, small.seq, small.attention_chunk) == ("demo", 64, 16)
    assert small.run(ts.parse_mesh("data=2,fsdp=2")).batch == 8
    assert small.stem.endswith("demo_seq64_switch_dots_b2")
    for bad in (["--meshes", "pipe=2"], ["--meshes", "data=0"], ["--meshes", "data=two"],
                ["--meshes", "data=2", "data=2"], ["--meshes", "1", "data=1"],
                ["--batch-per-device", "0"], ["--adapter", "mixlora"], ["--remat", "sometimes"],
                ["--steps", "0"], ["--warmup", "-1"], ["--budget-s", "0"], ["--preset", "gpt2"],
                ["--seq", "9000"], ["--peak-tflops", "0"]):
        with pytest.raises(SystemExit):
            ts.parse_args(bad)
    with pytest.raises(ValueError, match="mesh axis data must be a positive integer"):
        ts.ScalingConfig(meshes=("data=0",))
    with pytest.raises(ValueError, match="each once"):
        ts.ScalingConfig(meshes=())
    with pytest.raises(ValueError, match="batch_per_device"):
        dataclasses.replace(ts.ScalingConfig(), batch_per_device=True)
    with pytest.raises(ValueError, match="positions"):
        ts.ScalingConfig(preset="demo", seq=PRESETS["demo"].max_position_embeddings + 1)
