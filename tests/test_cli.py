"""The ``loraswitch`` command line: one-line errors for what a user can cause, tracebacks for bugs,
``generate --adapter``, ``init``'s tokenizer, and help texts."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax import cli
from loraswitch_jax.tokenizer import Tokenizer

DEMO = lj.PRESETS["demo"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("loraswitch: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A float32 demo model folder written by ``loraswitch init`` (with its byte tokenizer)."""
    folder = tmp_path_factory.mktemp("cli") / "model"
    assert cli.main(["init", "--out", str(folder), "--dtype", "float32"]) == 0
    return folder


@pytest.fixture(scope="module")
def switch_dir(model_dir):
    """A switch adapter for the demo model with nonzero B (a zero B would change nothing)."""
    acfg = lj.AdapterConfig(mode="switch", rank=4, num_experts=4, top_k=2)
    adapter = lj.init_adapter(DEMO, acfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    adapter = jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype),
                           adapter)
    folder = model_dir.parent / "switch"
    lj.save_adapter(adapter, folder, DEMO)
    return folder


def _generated(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith("--- [0]")][0]


def test_generate_with_adapter_fused_and_merge(capsys, model_dir, switch_dir):
    common = ["generate", "--model", model_dir, "--dtype", "float32", "--no-stream",
              "--max-new-tokens", "6", "--ignore-eos", "--prompt", "def "]
    rc, base, _ = run_cli(capsys, *common)
    assert rc == 0
    rc, fused, err = run_cli(capsys, *common, "--adapter", switch_dir)
    assert rc == 0, err
    assert f"adapter: {switch_dir}  (switch, 4 expert(s) of rank 4, top-2, fused)" in fused
    rc, merged, err = run_cli(capsys, *common, "--adapter", switch_dir,
                              "--switch-strategy", "merge")
    assert rc == 0, err
    assert _generated(fused) == _generated(merged) != _generated(base)


def test_adapter_errors_are_one_line(capsys, tmp_path, model_dir, switch_dir):
    other = lj.LlamaConfig(**{**DEMO.__dict__, "num_hidden_layers": 3})
    lora = lj.init_adapter(other, lj.AdapterConfig.lora(rank=2), jax.random.key(0))
    lj.save_adapter(lora, tmp_path / "other", other)
    rc, _, err = run_cli(capsys, "generate", "--model", model_dir, "--adapter", tmp_path / "other")
    assert_one_line_error(rc, err, "other", "num_hidden_layers=3")
    rc, _, err = run_cli(capsys, "generate", "--adapter", tmp_path / "missing")
    assert_one_line_error(rc, err, "adapter_config.json", "missing")
    rc, _, err = run_cli(capsys, "generate", "--switch-strategy", "merge")
    assert_one_line_error(rc, err, "--switch-strategy merge needs a switch --adapter")
    rc, _, err = run_cli(capsys, "generate", "--adapter", switch_dir, "--switch-strategy", "merge",
                         "--prompt", "a", "--prompt", "b")
    assert_one_line_error(rc, err, "batch size 2")


def test_file_errors_are_one_line(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run_cli(capsys, "init", "--out", afile)
    assert_one_line_error(rc, err, "is a file, not a folder", "afile")
    rc, _, err = run_cli(capsys, "init", "--out", afile / "sub")
    assert_one_line_error(rc, err, "Not a directory", "afile/sub")
    rc, _, err = run_cli(capsys, "generate", "--model", afile / "sub")
    assert_one_line_error(rc, err, "config.json", "afile/sub")
    rc, _, err = run_cli(capsys, "train", "--config", afile)
    assert_one_line_error(rc, err, "afile", "not valid JSON")
    rc, _, err = run_cli(capsys, "train", f"out_dir={afile / 'run'}")
    assert_one_line_error(rc, err, "Not a directory", "afile/run")
    rc, _, err = run_cli(capsys, "generate", "--max-new-tokens", "0")
    assert_one_line_error(rc, err, "max_new_tokens")


def test_tokenizer_is_checked_before_weights_load(capsys, tmp_path, model_dir, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizer was checked")

    monkeypatch.setattr(cli, "load_params", no_load)
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(model_dir / name, folder / name)
    rc, _, err = run_cli(capsys, "generate", "--model", folder)
    assert_one_line_error(rc, err, "no tokenizer.json", "copy the tokenizer.json")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')  # torn
    rc, _, err = run_cli(capsys, "generate", "--model", folder)
    assert_one_line_error(rc, err, str(folder / "tokenizer.json"), "not a valid tokenizer.json")
    big = Tokenizer.from_pretrained(model_dir)
    big._tok.add_tokens([f"extra{i}" for i in range(5)])
    big.save(folder)
    rc, _, err = run_cli(capsys, "generate", "--model", folder)
    assert_one_line_error(rc, err, "264 tokens", "vocab_size is 259")


def test_init_writes_a_tokenizer_only_for_the_byte_vocabulary(capsys, model_dir, monkeypatch):
    assert Tokenizer.from_pretrained(model_dir).vocab_size == DEMO.vocab_size
    # llama-1b (2.2 GB) without writing it: the tokenizer decision is what is tested.
    monkeypatch.setattr(cli, "init_params", lambda cfg, key, dtype: None)
    monkeypatch.setattr(cli, "save_params", lambda params, cfg, out: os.makedirs(out))
    out = model_dir.parent / "llama-1b"
    rc, text, _ = run_cli(capsys, "init", "--preset", "llama-1b", "--out", out)
    assert rc == 0 and os.listdir(out) == []
    assert "no tokenizer.json written" in text and "32000-token" in text


def test_changed_config_on_resume_is_one_line(capsys, tmp_path):
    small = [f"out_dir={tmp_path / 'run'}", "data.seq_len=32", "data.batch_size=8",
             "optim.steps=2", "optim.warmup_steps=1", "save_every=2", "eval_every=2",
             "eval_batches=1"]
    rc, _, err = run_cli(capsys, "train", *small)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "train", *small, "adapter.num_experts=8")
    assert_one_line_error(rc, err, "num_experts")


def test_interrupt_and_bugs(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_init_command", interrupted)
    rc, _, err = run_cli(capsys, "init", "--out", "x")
    assert rc == 130 and err.strip() == "loraswitch: interrupted"
    monkeypatch.setattr(cli, "_init_command", bug)
    with pytest.raises(TypeError, match="a bug"):  # programming errors keep their traceback
        cli.main(["init", "--out", "x"])


def test_help_texts():
    parser = cli.build_parser()
    top = parser.format_help()
    assert "``" not in top
    for command in ("demo", "generate", "train", "init"):
        assert f"\n  {command} " in top
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, (name, action.dest)


def test_subprocess_errors_and_help(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "loraswitch_jax.cli", "init", "--out",
                           str(afile / "sub")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("loraswitch: error: Not a directory:")
    proc = subprocess.run([sys.executable, "-m", "loraswitch_jax.cli", "generate", "--adapter",
                           str(afile)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "loraswitch_jax.cli", "--help"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "generate" in proc.stdout
