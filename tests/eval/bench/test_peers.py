"""The peers benchmark on a CPU: argument parsing, skip reasons and a dry run of the eager and
peft peers (MixLoRA hidden, the compiled peer needs a GPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loraswitch_jax.eval.bench import peers
from tests.helpers import require


def _row(setting, batch, mode, ms, **extra):
    preset, context = setting
    return {"preset": preset, "context": context, "experts": 8, "top_k": 2, "batch": batch,
            "mode": mode, "setting": f"{preset}, context {context}, E 8, k 2",
            "ms_per_token": ms, **extra}


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


def _installed(monkeypatch, *names):
    """The peers' packages look installed exactly when named, whatever this machine has."""
    packages = {m for required in peers.REQUIRES.values() for m in required}
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *a: (object() if name in names else None)
                        if name in packages else real(name, *a))


def test_peers_skip_reasons(monkeypatch):
    _installed(monkeypatch, "torch", "transformers", "peft")
    reason = peers.skip_reason("mixlora", "cuda")
    assert "mixlora is not installed" in reason and "--download-wheels" in reason
    assert peers.skip_reason("eager", "cpu") is None
    assert "GPU" in peers.skip_reason("compiled", "cpu")
    assert peers.skip_reason("compiled", "cuda") is None
    assert peers.skip_reason("peft-lora", "cuda") is None
    _installed(monkeypatch, "torch", "transformers")
    assert "peft is not installed" in peers.skip_reason("peft-lora", "cuda")
    _installed(monkeypatch, "transformers")
    assert peers.skip_reason("eager", "cpu") == "package torch is not installed"


def test_peers_dry_run(tmp_path, monkeypatch):
    for name in ("torch", "transformers", "peft"):  # the eager and peft peers run
        require(name)
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
    table = (tmp_path / "demo_ctx16.md").read_text()
    assert "| loraswitch-jax | switch-fused | 0.50 |" in table
    assert "| transformers | eager |" in table and "| 1.00 |" in table
    assert (tmp_path / "demo_ctx16.png").stat().st_size > 0
    assert json.loads((tmp_path / "demo_ctx16.json").read_text())["args"]["preset"] == "demo"
