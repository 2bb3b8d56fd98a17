"""Folder writes are atomic as a whole (issue 17, case 7): a crash at any point leaves the old
complete folder (or, between the two renames, the old one aside and a load that says so), never
new tensors beside an old config; the next save removes what an interrupted one left; files get
the usual mode (0666 & ~umask)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax import AdapterError, WeightsError
from loraswitch_jax.config import PRESETS

CFG = PRESETS["demo"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def new_version(kind: str, seed: int):
    """What ``kind``'s writer saves, distinct per ``seed``."""
    if kind == "params":
        return lj.init_params(CFG, jax.random.key(seed), jnp.float32)
    acfg = lj.AdapterConfig.lora(rank=2) if kind == "peft" else lj.AdapterConfig(rank=2, num_experts=2)
    adapter = lj.init_adapter(CFG, acfg, jax.random.key(seed))
    # B random too (it starts at zero), so versions differ in every tensor.
    b = {p: jax.random.normal(jax.random.key(seed + 100), x.shape) for p, x in adapter.b.items()}
    return lj.Adapter(config=adapter.config, a=adapter.a, b=b, router=adapter.router)


def save(kind: str, value, folder) -> None:
    if kind == "params":
        lj.save_params(value, CFG, folder)
    elif kind == "peft":
        lj.export_peft(value, CFG, folder)
    else:
        lj.save_adapter(value, folder, CFG)


def load(kind: str, folder):
    if kind == "params":
        return lj.load_params(folder, dtype=jnp.float32)[0]
    if kind == "peft":
        return lj.import_peft(folder, CFG)
    return lj.load_adapter(folder, CFG)


def assert_same(got, want) -> None:
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def siblings(folder) -> list[str]:
    """Names beside ``folder`` that a write to it made (temporary or moved-aside folders)."""
    name = os.path.basename(folder)
    return sorted(fn for fn in os.listdir(os.path.dirname(folder)) if fn.startswith(f".{name}."))


KINDS = ("adapter", "peft", "params")

# Runs one save in a child process that dies (os._exit, as kill -9 would) at a chosen point.
CRASH = """
import os, sys
import loraswitch_jax.adapter_io as adapter_io, loraswitch_jax.weights as weights
from tests.test_atomic_io import new_version, save
kind, point, folder = sys.argv[1:4]
value = new_version(kind, 2)
real_rename = os.rename
def rename(src, dst):
    if ".saving-" in os.path.basename(src):  # tmp -> folder: the old folder is already aside
        os._exit(9)
    real_rename(src, dst)
def half_written(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"torn")
    os._exit(9)
if point == "rename":
    os.rename = rename
else:
    adapter_io.save_file = weights.save_file = half_written
save(kind, value, folder)
"""


def crash_while_saving(kind: str, point: str, folder) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", CRASH, kind, point, str(folder)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 9, run.stderr[-2000:]


@pytest.mark.parametrize("kind", KINDS)
def test_crash_while_writing_keeps_the_old_folder(tmp_path, kind):
    folder = tmp_path / "out"
    old = new_version(kind, 1)
    save(kind, old, folder)
    before = sorted(os.listdir(folder))
    crash_while_saving(kind, "write", folder)
    assert sorted(os.listdir(folder)) == before
    assert_same(load(kind, folder), old)  # old tensors with the old config, complete
    assert [fn for fn in siblings(folder) if ".saving-" in fn]  # the torn write's leftover
    new = new_version(kind, 3)
    save(kind, new, folder)
    assert siblings(folder) == []  # removed by the next save
    assert_same(load(kind, folder), new)


@pytest.mark.parametrize("kind", KINDS)
def test_crash_between_renames_is_reported_and_recoverable(tmp_path, kind):
    folder = tmp_path / "out"
    old = new_version(kind, 1)
    save(kind, old, folder)
    crash_while_saving(kind, "rename", folder)
    assert not folder.exists()
    error = WeightsError if kind == "params" else AdapterError
    with pytest.raises(error, match=r"a save to it was interrupted.*\.out\.replaced-.*rename"):
        load(kind, folder)
    aside = [fn for fn in siblings(folder) if ".replaced-" in fn]
    assert len(aside) == 1
    os.rename(tmp_path / aside[0], folder)  # what the message says to do
    assert_same(load(kind, folder), old)
    save(kind, new_version(kind, 3), folder)
    assert siblings(folder) == []


def test_save_again_after_crash_between_renames(tmp_path):
    folder = tmp_path / "out"
    save("adapter", new_version("adapter", 1), folder)
    crash_while_saving("adapter", "rename", folder)
    new = new_version("adapter", 3)
    save("adapter", new, folder)  # no folder at the path: written fresh, leftovers removed
    assert siblings(folder) == []
    assert_same(load("adapter", folder), new)


@pytest.mark.parametrize("kind", KINDS)
def test_error_between_renames_restores_the_old_folder(tmp_path, monkeypatch, kind):
    folder = tmp_path / "out"
    old = new_version(kind, 1)
    save(kind, old, folder)
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".saving-" in os.path.basename(src):
            raise OSError("simulated failure after the old folder moved aside")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        save(kind, new_version(kind, 2), folder)
    monkeypatch.undo()
    assert_same(load(kind, folder), old)
    assert siblings(folder) == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_usual_mode(tmp_path, kind, umask):
    previous = os.umask(umask)
    try:
        folder = tmp_path / "out"
        save(kind, new_version(kind, 1), folder)
        save(kind, new_version(kind, 2), folder)  # a replaced folder too
    finally:
        os.umask(previous)
    for fn in os.listdir(folder):
        assert stat.S_IMODE(os.stat(folder / fn).st_mode) == 0o666 & ~umask, fn
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask


def test_other_files_kept_and_old_leftovers_removed(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("kept")
    # What earlier versions left inside the folder when killed mid-save.
    (folder / ".saving-abc123").mkdir()
    (folder / ".saving-abc123" / "model.safetensors").write_bytes(b"x" * 100)
    params = new_version("params", 1)
    lj.save_params(params, CFG, folder, max_shard_bytes=64 * 1024)  # sharded
    lj.save_params(params, CFG, folder)  # single file: the shards go
    names = sorted(os.listdir(folder))
    assert names == ["config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert (folder / "notes" / "a.txt").read_text() == "kept"
    assert_same(load("params", folder), params)


def test_a_live_writers_folder_is_left_alone(tmp_path):
    folder = tmp_path / "out"
    host = socket.gethostname()
    live = tmp_path / f".out.saving-{os.getpid()}@{host}-live"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    dead = tmp_path / f".out.saving-{int(done.stdout)}@{host}-dead"
    live.mkdir()
    dead.mkdir()
    save("adapter", new_version("adapter", 1), folder)
    assert live.exists() and not dead.exists()


def test_save_into_the_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "here"
    save("adapter", new_version("adapter", 1), folder)
    monkeypatch.chdir(folder)
    new = new_version("adapter", 2)
    lj.save_adapter(new, ".", CFG)
    assert os.path.samefile(os.getcwd(), folder)  # follows the path, not the removed old folder
    assert_same(lj.load_adapter(".", CFG), new)


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(AdapterError, match="a file is there"):
        save("adapter", new_version("adapter", 1), tmp_path / "out")
    with pytest.raises(NotADirectoryError, match="a file is there"):
        save("params", new_version("params", 1), tmp_path / "out")
