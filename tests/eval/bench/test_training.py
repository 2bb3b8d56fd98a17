"""The training benchmark on a CPU: its smoke mode through the command line (every run in its own
process), the written report's fields, FLOP arithmetic, batch prediction and argument checks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from loraswitch_jax.config import PRESETS
from loraswitch_jax.eval.bench import training as tb
from loraswitch_jax.eval.bench.step_profile import kernel_kind, summarize

RUNS = ("switch:dots:1", "switch:dots:max", "lora:full:1:cudnn", "mixlora:full:max")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``--small --cpu``: the demo model; the largest batch under a 300 MB limit, capped at 3."""
    out = tmp_path_factory.mktemp("training")
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "loraswitch_jax.eval.bench.training", "--small", "--cpu",
           "--runs", *RUNS, "--bytes-limit", "3e8", "--max-batch", "3", "--steps", "1",
           "--warmup", "0", "--plan", "--profile", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "demo_seq64.json") as f:
        return out, json.load(f), proc.stdout


def test_smoke_report_fields(smoke):
    out, report, stdout = smoke
    assert report["environment"]["platform"] == "cpu" and report["environment"]["jax"]
    assert report["peak_tflops"] == tb.H200_BF16_TFLOPS and "6 L q B T^2" in report["flops_formula"]
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["switch:dots:1:xla", "switch:dots:max:xla", "lora:full:1:cudnn",
                          "mixlora:full:max:xla"]
    b1, top = rows["switch:dots:1:xla"], rows["switch:dots:max:xla"]
    for r in (b1, top):
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 64 / r["step_s"])
        assert r["mfu"] > 0 and r["mfu_palm"] > 0
        assert r["flops"]["model"] == r["flops"]["base"] + r["flops"]["attention"] + r["flops"]["adapter"]
        assert r["memory_analysis"]["total"] > 0 and r["loss"] > 0
    for r in (b1, top):  # the planner compiles the same step: the same bytes
        assert r["plan"]["total"] == pytest.approx(r["memory_analysis"]["total"], rel=0.01)
        prof = r["profile"]
        assert prof["launches"] > 0 and prof["top"] and prof["busy_us"] > 0
        assert sum(prof["kinds_us"].values()) == pytest.approx(prof["busy_us"])
    assert "| planned GiB |" in (out / "demo_seq64.md").read_text()
    # Batch 1 predicted the largest batch (capped at 3), which the max run confirmed.
    p = b1["prediction"]
    assert p["bytes_b2"] > p["bytes_b1"] and p["bytes_limit"] == 300_000_000
    assert p["batch"] == 3 and p["capped"] and p["fits"] > 3
    assert top["batch"] == top["confirmed_batch"] == 3 and top["prediction"] == p
    assert top["flops"]["model"] == pytest.approx(3 * b1["flops"]["model"])
    # cudnn needs a GPU: recorded as an error row, and the run went on.
    assert rows["lora:full:1:cudnn"]["status"] == "error"
    assert "cudnn" in rows["lora:full:1:cudnn"]["error"]
    peer = rows["mixlora:full:max:xla"]
    if importlib.util.find_spec("mixlora") is None:
        assert peer["status"] == "skipped" and "not installed" in peer["error"]
    else:  # our confirmed largest batch, with gradient checkpointing
        assert peer["status"] == "ok" and peer["batch"] == 3 and peer["checkpointing"], peer
        assert peer["trainable_params"] > 0 and peer["peer_environment"]["torch"]
    table = (out / "demo_seq64.md").read_text()
    assert "| switch:dots:max:xla | 3 |" in table and "| largest batch |" in table
    assert (out / "demo_seq64.png").stat().st_size > 0
    assert stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last


def test_step_profile_kinds_and_summary():
    groups = {"sm90_xmma_gemm_bf16bf16": {"launches": 64, "us": 700.0},
              "cudnn_generated_fort_native_sdpa": {"launches": 32, "us": 200.0},
              "loop_multiply_fusion": {"launches": 10, "us": 60.0},
              "input_reduce_fusion": {"launches": 5, "us": 30.0},
              "MemcpyD2D": {"launches": 2, "us": 10.0}}
    assert [kernel_kind(g) for g in groups] == ["matmul", "attention", "elementwise", "reduction",
                                                "copy"]
    s = summarize(groups, wall_s=1.2e-3, top=2)
    assert (s["busy_us"], s["launches"]) == (1000.0, 113)
    assert s["idle_us"] == pytest.approx(200.0)
    assert list(s["kinds_us"]) == ["matmul", "attention", "elementwise", "reduction", "copy"]
    assert [t["group"] for t in s["top"]] == ["sm90_xmma_gemm_bf16bf16",
                                             "cudnn_generated_fort_native_sdpa"]


def test_step_flops_llama3_8b():
    cfg = tb.model_config("llama3-8b")
    f = tb.step_flops(cfg, tb.Run.parse("switch:dots:1"), 1, 2048)
    assert 7.4e9 < f["n_matmul"] < 7.6e9 and 8.0e9 < f["n_params"] < 8.1e9
    assert f["attention"] == 6 * 32 * 4096 * 2048**2
    # switch: k 2 experts of rank 16 on q, k, v, o, gate, up, down in 32 layers, one router
    per_expert = 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    assert f["n_adapter_active"] == 2 * 32 * per_expert + 4096 * 8
    lora = tb.step_flops(cfg, tb.Run.parse("lora:dots:1"), 1, 2048)
    assert lora["n_adapter_active"] * 2 + 4096 * 8 == f["n_adapter_active"]
    layerwise = tb.step_flops(cfg, tb.Run.parse("layerwise:dots:1"), 1, 2048)
    assert layerwise["n_adapter_active"] - f["n_adapter_active"] == 31 * 4096 * 8
    assert tb.step_flops(cfg, tb.Run.parse("switch:dots:1"), 4, 2048)["model"] == 4 * f["model"]


def test_predict_batch():
    p = tb.predict_batch(10, 14, 30, cap=100)
    assert (p["batch"], p["bytes_per_row"], p["capped"]) == (6, 4, False)  # 10 + 5 * 4 = 30
    assert tb.predict_batch(10, 14, 30, cap=4)["batch"] == 4
    assert tb.predict_batch(40, 44, 30, cap=4)["batch"] == 0
    assert "error" in tb.predict_batch(10, 10, 30, cap=4)


def test_parse_args_and_refusals():
    bc = tb.parse_args([])
    assert [r.name for r in bc.runs] == [tb.Run.parse(r).name for r in tb.DEFAULT_RUNS]
    assert (bc.preset, bc.seq, bc.budget_s) == ("llama3-8b", 2048, 450.0)
    small = tb.parse_args(["--small", "--runs", "layerwise:none:2", "mixlora:none:max"])
    assert (small.preset, small.seq, small.runs[1].batch) == ("demo", 64, 0)
    for bad in ("switch:dots", "switch:sometimes:1", "moe:dots:1", "switch:dots:0",
                "mixlora:dots:1", "switch:dots:1:flash", "switch:dots:two"):
        with pytest.raises(SystemExit):
            tb.parse_args(["--runs", bad])
    with pytest.raises(ValueError, match="positions"):
        tb.BenchConfig(preset="demo", seq=PRESETS["demo"].max_position_embeddings + 1)
    with pytest.raises(ValueError, match="unknown preset"):
        tb.BenchConfig(preset="gpt2")
