"""Training: loss goes down, experts stay balanced, exact resume, accumulation, several devices."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax.cli import main as cli_main
from loraswitch_jax.train.checkpoints import CheckpointError
from loraswitch_jax.train.config import ConfigFileError, load_train_config
from loraswitch_jax.train.loop import train
from loraswitch_jax.train.step import OptimConfig, init_state, train_step
from tests.helpers import read_metrics


SMALL = ["data.seq_len=64", "data.batch_size=8", "optim.steps=12", "optim.warmup_steps=2",
         "save_every=4", "eval_every=6", "eval_batches=2"]


def small_config(out_dir, *overrides):
    return load_train_config(None, [f"out_dir={out_dir}", *SMALL, *overrides])


def test_training_lowers_held_out_loss_with_balanced_experts(tmp_path, capsys):
    tc = small_config(tmp_path, "optim.steps=60", "eval_every=30", "eval_batches=4",
                      "optim.aux_loss_weight=0.05")
    summary = train(tc, progress=False)
    evals = [m["eval_loss"] for m in read_metrics(tmp_path) if m.get("eval_loss") is not None]
    assert evals[-1] < evals[0] - 0.05, evals
    usage = np.asarray(summary["usage"])  # [1, E] for switch
    print("expert usage:", usage.round(3))
    assert usage.shape == (1, 4) and usage.min() > 0.1, usage
    assert os.path.exists(tmp_path / "usage.png")
    adapter = lj.load_adapter(tmp_path / "adapter")
    assert adapter.config == tc.adapter


def test_kill_and_resume_gives_the_same_losses(tmp_path):
    """Stop after 6 steps (last checkpoint at 4), resume: every step's metrics equal a full run."""
    opts = ("adapter.dropout=0.1", "optim.grad_accum=2")
    full = small_config(tmp_path / "full", *opts)
    train(full, progress=False)
    cut = small_config(tmp_path / "cut", *opts)
    train(cut, stop_after=6, progress=False)
    assert len([m for m in read_metrics(tmp_path / "cut") if m["step"] > 0]) == 6
    train(cut, progress=False)  # resumes from step 4; steps 5-6 run again
    want, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for key in ("loss", "aux", "grad_norm", "eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (b["step"], key)
    a1 = lj.load_adapter(tmp_path / "full" / "adapter")
    a2 = lj.load_adapter(tmp_path / "cut" / "adapter")
    for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_resume_with_another_config_is_refused(tmp_path):
    train(small_config(tmp_path), stop_after=4, progress=False)
    with pytest.raises(CheckpointError, match="adapter.rank: checkpoint 8 vs now 4"):
        train(small_config(tmp_path, "adapter.rank=4"), progress=False)


def test_corrupt_checkpoint_is_reported_and_earlier_ones_kept(tmp_path):
    train(small_config(tmp_path), stop_after=8, progress=False)
    ckpt = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["4", "8"]
    for root, _, files in os.walk(ckpt / "8" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0")
    with pytest.raises(CheckpointError, match="checkpoint 8 .* incomplete or corrupt.*delete step 8"):
        train(small_config(tmp_path), progress=False)
    assert sorted(os.listdir(ckpt)) == ["4", "8"]
    shutil.rmtree(ckpt / "8")
    train(small_config(tmp_path), progress=False)  # the one before still resumes
    assert read_metrics(tmp_path)[-1]["step"] == 12


def test_accumulation_equals_one_large_batch():
    """2 micro-batches of 2 rows = 1 batch of 4 rows (token-weighted losses; lora: no aux)."""
    cfg = lj.PRESETS["demo"]
    params = lj.init_params(cfg, jax.random.key(0), jnp.float32)
    adapter = lj.init_adapter(cfg, lj.AdapterConfig.lora(rank=4), jax.random.key(1))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, (4, 17)).astype(np.int32)
    mask = (rng.rand(4, 16) > 0.3).astype(np.float32)
    big = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask,
               segment_ids=np.ones((4, 16), np.int32), positions=np.tile(np.arange(16, dtype=np.int32), (4, 1)))
    results = []
    for a in (1, 2):
        oc = OptimConfig(lr=1e-2, warmup_steps=0, steps=10, grad_accum=a)
        batch = {k: jnp.asarray(v.reshape(a, 4 // a, 16)) for k, v in big.items()}
        state = init_state(adapter, oc, 0)
        for _ in range(2):
            state, metrics = train_step(state, params, batch, cfg=cfg, oc=oc)
        results.append((float(metrics["loss"]), state.adapter))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for x, y in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigFileError, match=r"unknown keys \['lr_typo'\] in optim\."):
        load_train_config(None, ["optim.lr_typo=1"])
    with pytest.raises(ConfigFileError, match="not of the form key=value"):
        load_train_config(None, ["steps"])
    with pytest.raises(ConfigFileError, match="no config file"):
        load_train_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigFileError, match="not valid JSON"):
        load_train_config(bad)
    with pytest.raises(lj.AdapterError, match="top_k"):
        load_train_config(None, ["adapter.top_k=5"])


def test_cli_train_with_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.json"
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) for i in range(40))
    )
    config.write_text(json.dumps({
        "model": "demo", "out_dir": str(tmp_path / "out"),
        "adapter": {"mode": "layerwise", "rank": 4, "num_experts": 2, "top_k": 1},
        "data": {"path": "data.jsonl", "seq_len": 32, "batch_size": 4, "validation_fraction": 0.2},
        "optim": {"steps": 4, "warmup_steps": 1}, "eval_every": 2, "save_every": 2,
    }))
    assert cli_main(["train", "--config", str(config), "log_every=2"]) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "router 1:" in out  # layerwise: one router per layer
    assert cli_main(["train", "--config", str(config), "optim.nope=1"]) == 2
    assert "unknown keys ['nope']" in capsys.readouterr().err


def test_bf16_backbone_keeps_float32_adapter_master_weights():
    cfg = lj.PRESETS["demo"]
    params = lj.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    adapter = lj.init_adapter(cfg, lj.AdapterConfig(rank=4, num_experts=4), jax.random.key(1))
    oc = OptimConfig(lr=1e-2, warmup_steps=0, steps=4)
    tokens = np.random.RandomState(0).randint(0, 256, (1, 2, 17)).astype(np.int32)
    batch = dict(tokens=tokens[..., :-1], targets=tokens[..., 1:], loss_mask=np.ones((1, 2, 16), np.float32),
                 segment_ids=np.ones((1, 2, 16), np.int32),
                 positions=np.tile(np.arange(16, dtype=np.int32), (1, 2, 1)))
    state = init_state(adapter, oc, 0)
    state, metrics = train_step(state, params, jax.tree.map(jnp.asarray, batch), cfg=cfg, oc=oc)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.adapter))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    # B moved off zero in float32 (a bf16 master would round small updates away).
    assert float(jnp.abs(state.adapter.b["q"]).max()) > 0
