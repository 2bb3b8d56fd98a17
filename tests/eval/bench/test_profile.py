"""The decode-step profiler: kernel names grouped, device stream tracks read, per-step arithmetic,
and a CPU dry run writing its report."""

from __future__ import annotations

import json
import math

import pytest

from loraswitch_jax.eval.bench import profile
from loraswitch_jax.eval.bench.profile import kernel_group, kernel_times, per_step, track_names


def meta(pid, tid, process, thread):
    return [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}]


def kernel(pid, tid, name, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": dur, "name": name}


def gpu_trace(extra=()):
    events = (meta(1, 10, "/device:GPU:0", "Stream #13(Compute)")
              + meta(1, 11, "/device:GPU:0", "XLA Ops")
              + meta(2, 20, "/host:CPU", "python"))
    events += [kernel(1, 10, "loop_add_fusion_12", 2.0), kernel(1, 10, "loop_add_fusion.3", 3.0),
               kernel(1, 10, "qkv_matmul_m16_n64_k256_s1_w4_st3", 10.0),
               kernel(1, 11, "loop_add_fusion", 5.0),  # derived op line: not counted twice
               kernel(2, 20, "PjitFunction(generate_batch)", 99.0)]  # host: not a kernel
    return events + list(extra)


def test_kernel_group_drops_suffixes_and_block_sizes():
    assert kernel_group("loop_add_fusion_12") == "loop_add_fusion"
    assert kernel_group("input_reduce_fusion.3_1") == "input_reduce_fusion"
    assert kernel_group("routed_qkv_matmul_m16_n64_k512_s1") == "routed_qkv_matmul"
    assert kernel_group("lora_shrink_group3_m16_k512_s4_w4_st3") == "lora_shrink_group3"
    assert kernel_group("gate_up_matmul_n128_k128_s1_w4_st3") == "gate_up_matmul"
    assert kernel_group("stacked_matmul_n64_k64_s4") == "stacked_matmul"


def test_kernel_times_reads_stream_tracks_only():
    times = kernel_times(gpu_trace())
    assert times == {"loop_add_fusion": {"launches": 2, "us": 5.0},
                     "qkv_matmul": {"launches": 1, "us": 10.0}}
    assert track_names(gpu_trace()) == ["Stream #13(Compute)"]


def test_kernel_times_without_stream_names_skips_derived_lines():
    events = meta(1, 10, "/device:GPU:0", "gpu kernels") + meta(1, 11, "/device:GPU:0", "XLA Ops")
    events += [kernel(1, 10, "k_1", 4.0), kernel(1, 11, "k", 4.0)]
    assert kernel_times(events) == {"k": {"launches": 1, "us": 4.0}}


def test_kernel_times_needs_device_tracks():
    host = meta(2, 20, "/host:CPU", "tf_XLAEigen/1") + [kernel(2, 20, "dot.1", 3.0)]
    with pytest.raises(RuntimeError, match="no device stream track"):
        kernel_times(host)
    assert kernel_times(host, allow_host=True) == {"dot": {"launches": 1, "us": 3.0}}


def test_per_step_subtracts_the_one_token_run():
    one = {"a": {"launches": 10, "us": 100.0}, "prefill_only": {"launches": 1, "us": 50.0}}
    many = {"a": {"launches": 50, "us": 500.0}, "prefill_only": {"launches": 1, "us": 50.0},
            "b": {"launches": 4, "us": 40.0}}
    steps = per_step(one, many, 4)
    assert steps == {"a": {"launches": 10.0, "us": 100.0}, "b": {"launches": 1.0, "us": 10.0},
                     "prefill_only": {"launches": 0.0, "us": 0.0}}
    assert list(steps) == ["a", "b", "prefill_only"]  # by time, largest first


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown modes"):
        profile.ProfileConfig(modes=("nope",))
    with pytest.raises(ValueError, match="impl must be"):
        profile.ProfileConfig(impl="cuda")
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        profile.ProfileConfig(new_tokens=1)


def test_cpu_dry_run_writes_the_report(tmp_path):
    pc = profile.parse_args(["--preset", "demo", "--impl", "xla", "--allow-host",
                                  "--context", "16", "--new-tokens", "3", "--mode", "backbone",
                                  "--out", str(tmp_path)])
    report = profile.main(pc)
    (row,) = report["modes"]
    # Wall time per step is a difference of two short CPU runs here: finite, of either sign.
    assert row["mode"] == "backbone" and math.isfinite(row["wall_us"]) and row["groups"]
    assert all(t.startswith("tf_XLA") for t in row["tracks"])
    saved = json.loads((tmp_path / "demo_b1_ctx16.json").read_text())
    assert saved["modes"][0]["groups"] == row["groups"]
    assert (tmp_path / "demo_b1_ctx16.md").read_text().startswith("Device time per decode step")
    assert (tmp_path / "demo_b1_ctx16.png").stat().st_size > 0
