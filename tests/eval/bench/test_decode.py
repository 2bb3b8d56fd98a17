"""The backbone decode benchmark on a CPU: a dry run through its command line, the floor's bytes
and the config's checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from loraswitch_jax import PRESETS, init_params
from loraswitch_jax.eval.bench import decode

DEMO = PRESETS["demo"]


def test_dry_run_writes_the_report(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "loraswitch_jax.eval.bench.decode", "--preset", "demo",
           "--context", "16", "--batch", "1", "2", "--new-tokens", "2", "4", "--reps", "1",
           "--steps", "2", "--impl", "xla", "--copy-gib", "0.001", "--copy-reps", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "demo_ctx16_xla.json").read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        for part in (row["step"], row["generate"]):
            assert "error" not in part and part["launches"]["launches"] > 0
            assert part["floor_ms"] > 0 and part["bytes"]["total"] > part["bytes"]["weights"]
    assert report["environment"]["jax"] == jax.__version__
    assert report["cache_len"] == 64
    table = (tmp_path / "demo_ctx16_xla.md").read_text()
    assert table.strip() in proc.stdout  # printed last, as written
    assert (tmp_path / "demo_ctx16_xla.png").read_bytes()[:4] == b"\x89PNG"


def test_decode_bytes():
    params = init_params(DEMO, jax.random.key(0))
    nbytes = decode.decode_bytes(params, DEMO, batch=2, context=10)
    item = params.embed.dtype.itemsize
    assert nbytes["kv"] == 2 * DEMO.num_hidden_layers * 2 * 10 * DEMO.kv_size * item
    assert nbytes["total"] == nbytes["weights"] + nbytes["embed_rows"] + nbytes["kv"]


def test_config_refuses_bad_input():
    with pytest.raises(ValueError, match="new_tokens"):
        decode.parse_args(["--new-tokens", "4", "2"])
    with pytest.raises(ValueError, match="unknown preset"):
        decode.DecodeConfig(preset="llama-9000")
    assert decode.parse_args(["--all"]).batch == decode.ALL_BATCHES
