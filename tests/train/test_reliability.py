"""Training never loses good work: divergence stops before saving, damaged checkpoints are named,
finished runs are left alone; bad configs, data files and metrics lines give one clear line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from loraswitch_jax.cli import main as cli_main
from loraswitch_jax.tokenizer import byte_tokenizer
from loraswitch_jax.train import loop
from loraswitch_jax.train.checkpoints import CheckpointError
from loraswitch_jax.train.config import ConfigFileError, load_train_config
from loraswitch_jax.train.data import DataConfig, DataError, load_data
from loraswitch_jax.train.loop import TrainingDiverged, TrainingInterrupted, train
from tests.helpers import read_metrics


def small_config(out_dir, *overrides):
    return load_train_config(None, [
        f"out_dir={out_dir}", "data.seq_len=64", "data.batch_size=8", "optim.steps=12",
        "optim.warmup_steps=2", "save_every=4", "eval_every=6", "eval_batches=2", *overrides,
    ])


def steps_on_disk(out_dir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(out_dir, "checkpoints")) if n.isdigit())


def snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# --- 1. divergence and damaged checkpoints -------------------------------------------------------


def test_divergence_stops_at_the_step_and_saves_nothing(tmp_path):
    """lr 1e30: step 1 is finite, its update is not usable; step 2's loss is NaN."""
    tc = small_config(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "save_every=1")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 2: loss nan.*step 1") as info:
        train(tc, progress=False)
    assert info.value.step == 2
    assert steps_on_disk(tmp_path) == [1]
    assert not os.path.exists(tmp_path / "adapter") and not os.path.exists(tmp_path / "summary.json")
    assert [m["step"] for m in read_metrics(tmp_path)] == [0, 1]  # the NaN step is not logged


def _poison_after(step_no: int, monkeypatch):
    """Make train_step's state NaN from step ``step_no`` on (its metrics, of the state before, stay
    finite at that step): a fault between two checks."""
    real = loop.train_step

    def poisoned(state, *args, **kwargs):
        state, metrics = real(state, *args, **kwargs)
        if int(state.step) >= step_no:
            adapter = jax.tree.map(lambda x: x * np.float32("nan"), state.adapter)
            state = type(state)(step=state.step, adapter=adapter, opt_state=state.opt_state, rng=state.rng)
        return state, metrics

    monkeypatch.setattr(loop, "train_step", poisoned)


def test_a_non_finite_state_never_replaces_good_checkpoints(tmp_path, monkeypatch):
    """keep=2: a NaN state at save step 6 must not be saved, so 2 and 4 stay."""
    tc = small_config(tmp_path, "save_every=2", "keep=2", "eval_every=100")
    _poison_after(6, monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"step 6: non-finite state in .*adapter.*step 4"):
        train(tc, progress=False)
    assert steps_on_disk(tmp_path) == [2, 4]
    monkeypatch.undo()
    train(tc, progress=False)  # resumes from 4 and finishes
    assert steps_on_disk(tmp_path) == [10, 12] and os.path.exists(tmp_path / "summary.json")


def _rewrite_state(step_dir, mutate):
    """Replace a checkpoint's ``state`` files by an orbax save of ``mutate(state)`` (a damaged copy
    written in orbax's own format, independent of its file layout)."""
    tmp = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "rewrite")
    step = int(os.path.basename(step_dir))
    reader = ocp.CheckpointManager(os.path.dirname(step_dir))
    state = reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    reader.close()
    state = jax.tree.map(np.array, state)  # writable copies
    mutate(state)
    writer = ocp.CheckpointManager(os.path.abspath(tmp), options=ocp.CheckpointManagerOptions(create=True))
    writer.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    writer.wait_until_finished()
    writer.close()
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(tmp, str(step), "state"), os.path.join(step_dir, "state"))


def _router(state) -> np.ndarray:
    leaves = [x for x in jax.tree.leaves(state["adapter"]) if x.dtype == np.float32 and x.size > 8]
    return leaves[0]


def test_a_bit_flip_in_the_latest_checkpoint_is_named(tmp_path):
    """One mantissa bit (still finite) of step 8: the checksums catch it; deleting 8 resumes."""
    tc = small_config(tmp_path)
    train(tc, stop_after=8, progress=False)
    ckpt = tmp_path / "checkpoints"

    def flip(state):
        leaf = _router(state)
        leaf.view(np.uint32).reshape(-1)[3] ^= np.uint32(1 << 4)
        assert np.isfinite(leaf).all()

    _rewrite_state(str(ckpt / "8"), flip)
    with pytest.raises(CheckpointError, match=r"checkpoint 8 .*differ from the checksums.*delete "
                       r"step 8 \(.*checkpoints/8\) to resume from step 4"):
        train(tc, progress=False)
    assert steps_on_disk(tmp_path) == [4, 8]
    shutil.rmtree(ckpt / "8")
    train(tc, progress=False)
    assert read_metrics(tmp_path)[-1]["step"] == 12


def test_a_nan_checkpoint_without_checksums_is_named(tmp_path):
    """A NaN in a checkpoint whose metadata has no checksums (written before they existed)."""
    tc = small_config(tmp_path)
    train(tc, stop_after=8, progress=False)
    step8 = tmp_path / "checkpoints" / "8"
    _rewrite_state(str(step8), lambda state: _router(state).__setitem__((..., 0), np.nan))
    meta_path = step8 / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    del meta["checksums"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoint 8 .*non-finite values in .*adapter.*"
                       r"delete step 8 .* to resume from step 4"):
        train(tc, progress=False)
    assert steps_on_disk(tmp_path) == [4, 8]


def test_damaged_checkpoint_files_give_one_message_without_noise(tmp_path, capfd):
    """Bytes flipped in the stored chunks: orbax fails mid-restore; its abandoned reads must not
    bury the message under "Event loop is closed" tracebacks."""
    tc = small_config(tmp_path)
    train(tc, stop_after=8, progress=False)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "8" / "state"):
        if os.path.basename(root) == "d":
            for name in files:
                path = os.path.join(root, name)
                data = bytearray(open(path, "rb").read())
                data[len(data) // 2] ^= 0x10
                open(path, "wb").write(data)
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=r"checkpoint 8 .*corrupt.*delete step 8 .* to resume "
                       r"from step 4") as info:
        train(tc, progress=False)
    assert "\n" not in str(info.value) and len(str(info.value)) < 800
    time.sleep(1.0)  # the abandoned reads report late
    assert "Event loop is closed" not in capfd.readouterr().err


# --- 2. a finished run ---------------------------------------------------------------------------


def test_a_finished_run_is_left_alone(tmp_path, capsys):
    tc = small_config(tmp_path, "optim.steps=4", "eval_every=4")
    first = train(tc, progress=False)
    assert np.isfinite(first["last"]["loss"]) and first["last"]["eval_loss"] is not None
    before = snapshot(tmp_path)
    capsys.readouterr()
    again = train(tc, progress=False)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "already finished (4 steps)" in out[0], out
    assert str(tmp_path / "summary.json") in out[0] and str(tmp_path / "adapter") in out[0]
    assert again["already_finished"] and again["last"] == first["last"]
    assert snapshot(tmp_path) == before
    # From the command line: exit 0, the true last loss, files untouched.
    assert cli_main(["train", f"out_dir={tmp_path}", "data.seq_len=64", "data.batch_size=8",
                     "optim.steps=4", "optim.warmup_steps=2", "save_every=4", "eval_every=4",
                     "eval_batches=2"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "nan" not in out
    assert snapshot(tmp_path) == before


def test_a_finished_run_of_another_config_is_refused(tmp_path):
    train(small_config(tmp_path, "optim.steps=4"), progress=False)
    with pytest.raises(CheckpointError, match="another config"):
        train(small_config(tmp_path, "optim.steps=4", "optim.lr=1e-3"), progress=False)


# --- 6. positions ----------------------------------------------------------------------------------


def test_seq_len_beyond_the_model_positions_is_refused(tmp_path):
    with pytest.raises(ConfigFileError, match=r"data.seq_len 2048 .* max_position_embeddings \(1024"):
        load_train_config(None, ["data.seq_len=2048"])
    load_train_config(None, ["data.seq_len=1024"])  # positions 0..1023: allowed
    folder = tmp_path / "model"  # a model folder: checked when its config.json is read
    assert cli_main(["init", "--preset", "demo", "--out", str(folder)]) == 0
    tc = load_train_config(None, [f"model={folder}", "data.seq_len=2048", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigFileError, match=r"data.seq_len 2048 .* max_position_embeddings \(1024"):
        train(tc, progress=False)


# --- 8. config, data and metrics errors, Ctrl-C ------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", r"optim.lr must be a number, got 'abc' \(str\)"),
    ("optim.lr=NaN", r"optim.lr must be a finite number"),
    ("optim.steps=1.5", r"optim.steps must be an integer, got 1.5"),
    ("adapter.rank=true", r"adapter.rank must be an integer, got True"),
    ("adapter.alpha=[1]", r"adapter.alpha must be a number, got \[1\]"),
    ("data.batch_size=x", r"data.batch_size must be an integer, got 'x'"),
    ("data.prompt_field=3", r"data.prompt_field must be a string or null, got 3"),
    ("adapter=5", r"adapter must be a JSON object"),
    ("keep=abc", r"keep must be an integer, got 'abc'"),
    ("save_every=0", r"save_every must be an integer >= 1, got 0"),
    ("fsdp=1", r"fsdp must be true or false"),
])
def test_config_errors_name_the_field_and_type(override, message):
    with pytest.raises(ConfigFileError, match=message):
        load_train_config(None, [override])


def test_cli_config_type_error_is_one_line(capsys):
    assert cli_main(["train", "optim.lr=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "loraswitch: error: optim.lr must be a number, got 'abc' (str)"


def _load(path):
    return load_data(DataConfig(path=path, seq_len=8, batch_size=2), byte_tokenizer(), bos_id=256,
                     eos_id=257)


def test_an_empty_data_file_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"the data file '{empty}' is empty"):
        _load(empty)
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=f"all 2 data files at '{tmp_path}' are empty"):
        _load(tmp_path)
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    data = _load(tmp_path)
    assert len(data.train) == 1  # empty files beside others are skipped


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    tc = small_config(tmp_path)
    train(tc, stop_after=6, progress=False)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 7, "loss": 2.')  # a kill mid-write
    train(tc, progress=False)
    assert f"dropped the torn last line of {metrics}" in capsys.readouterr().err
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(13))
    # A damaged line before the last is not guessed at: the file and line are named.
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:10]
    metrics.write_text("\n".join(lines) + "\n")
    shutil.rmtree(tmp_path / "checkpoints" / "12")
    os.remove(tmp_path / "summary.json")
    with pytest.raises(ValueError, match=f"{metrics} line 3 is not JSON"):
        train(tc, progress=False)


def test_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    real = loop.train_step

    def interrupted_at_7(state, *args, **kwargs):
        if int(state.step) == 6:
            raise KeyboardInterrupt
        return real(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_at_7)
    args = ["train", f"out_dir={tmp_path}", "data.seq_len=64", "data.batch_size=8", "optim.steps=12",
            "optim.warmup_steps=2", "save_every=4", "eval_every=6", "eval_batches=2"]
    assert cli_main(args) == 130
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("loraswitch")]  # not datasets' bars
    assert ours == [f"loraswitch: interrupted at step 7; a rerun with the same config resumes from "
                    f"step 4 ({tmp_path / 'checkpoints' / '4'})"], err
    assert "Traceback" not in err
    with pytest.raises(TrainingInterrupted, match="resumes from step 4") as info:
        train(small_config(tmp_path), progress=False)
    assert isinstance(info.value, KeyboardInterrupt)
    monkeypatch.undo()
    train(small_config(tmp_path), progress=False)
    assert read_metrics(tmp_path)[-1]["step"] == 12


def test_ctrl_c_before_the_first_checkpoint_says_a_rerun_starts_over(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate", interrupted)  # the held-out loss of step 0
    with pytest.raises(TrainingInterrupted, match=r"^interrupted; no checkpoint yet \(save_every=4\): "
                       "a rerun starts over$"):
        train(small_config(tmp_path), progress=False)


def test_ctrl_c_during_a_save_lets_it_finish(tmp_path, monkeypatch, capsys):
    """A real SIGINT while checkpoint 8 is written: the checkpoint completes, then the run stops
    and names step 8 (orbax alone would log a traceback and misreport the latest step)."""
    real_save = ocp.CheckpointManager.save

    def save_with_ctrl_c(self, step, *args, **kwargs):
        if step == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_with_ctrl_c)
    # Python's own Ctrl-C handler, as in a terminal: a library imported earlier in this worker
    # process may have replaced it (the run then never sees the signal).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted, match=r"interrupted at step 8; .* resumes from step 8 \("):
            train(small_config(tmp_path), progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps_on_disk(tmp_path) == [4, 8]
    monkeypatch.undo()
    train(small_config(tmp_path), progress=False)
    assert "resumed from step 8" in capsys.readouterr().out
    assert read_metrics(tmp_path)[-1]["step"] == 12
