"""Real two-process runs on CPU: two processes of 2 devices each join one run
(``jax.distributed.initialize`` on localhost, gloo collectives), load the tiny model split over the
4 global devices (each reading only its own blocks) and compute a forward equal to the
single-process one; and train on a 4-device mesh, stop, resume from the orbax checkpoint and
export, equal to the same run in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import loraswitch_jax as lj
from loraswitch_jax.sharding import MeshConfig, param_specs
from tests.helpers import assert_same_run, jit_forward, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _expected_bytes(cfg: lj.LlamaConfig, mesh_text: str, process: int) -> int:
    """Bytes (float32) of the blocks the devices of ``process`` hold (each distinct block once),
    the 4 devices in process order, 2 per process, as in the workers."""
    abstract = jax.eval_shape(lambda: lj.init_params(cfg, jax.random.key(0), jnp.float32))
    mc = MeshConfig.parse(mesh_text)
    mesh = mc.make_mesh(jax.devices()[:mc.size])
    position = {d: i for i, d in enumerate(mesh.devices.flat)}
    total = 0
    for x, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(
            param_specs(abstract, mc), is_leaf=lambda s: isinstance(s, P))):
        index = NamedSharding(mesh, spec).devices_indices_map(x.shape)
        blocks = {d: tuple(s.indices(n)[:2] for s, n in zip(i, x.shape)) for d, i in index.items()}
        mine = {b for d, b in blocks.items() if position[d] // 2 == process}
        total += int(np.prod(x.shape)) * 4 * len(mine) // len(set(blocks.values()))
    return total


def _worker_env(devices: int) -> dict[str, str]:
    """The environment of a worker: this one's, less any multi-process launch settings, with
    this process's XLA flags (the suite's optimisation level included, so workers and in-process
    references compile alike) but ``devices`` CPU host devices."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "OMPI_")) and k != "XLA_FLAGS"}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return env


def _run_workers(n: int, args, env_of=lambda i: {}, devices: int = 2,
                 timeout: int = 300) -> None:
    """Run ``n`` processes of ``tests.multiprocess_worker`` at once (``args(i)`` for process
    ``i``), each with ``devices`` CPU devices."""
    env = _worker_env(devices)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", *args(i)],
                              cwd=ROOT, env={**env, **env_of(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{text[-3000:]}"


def _run_two(args, env_of=lambda i: {}, timeout: int = 300) -> None:
    """Two processes of 2 devices each (one run of 4 global devices)."""
    _run_workers(2, args, env_of, devices=2, timeout=timeout)


@pytest.mark.parametrize("mesh_text", ["tensor=4", "data=2,tensor=2"])
def test_two_processes_forward_equals_one(llama3_case, tmp_path, mesh_text):
    case = llama3_case
    coordinator = f"localhost:{_free_port()}"
    _run_two(lambda i: ["forward", coordinator, str(i), case.path, mesh_text, str(tmp_path)])

    tokens = np.random.RandomState(0).randint(0, case.cfg.vocab_size, (2, 24)).astype(np.int32)
    want = np.asarray(jit_forward()(case.params, tokens, case.cfg))
    got = np.load(tmp_path / "logits.npy")
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5

    # Each process read exactly the blocks its two devices hold, never a whole split tensor.
    whole = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(case.params))
    for i in range(2):
        r = json.loads((tmp_path / f"reads-{i}.json").read_text())
        assert r["full"] == 0
        assert r["bytes"] == _expected_bytes(case.cfg, mesh_text, i), r
    if mesh_text == "tensor=4":  # the weights are split across the processes
        assert r["bytes"] < 0.75 * whole


@pytest.mark.long  # ~100 s of CPU: 2 x 2 processes and one reference process, each compiling a step
def test_two_processes_train_resume_and_export_like_one(tmp_path):
    small = ["data.seq_len=32", "data.batch_size=8", "optim.steps=4", "optim.warmup_steps=1",
             "save_every=2", "eval_every=2", "eval_batches=1", "mesh=fsdp=2,tensor=2"]
    two = [f"out_dir={tmp_path / 'two'}", *small]

    def env_of(i):  # joined from the environment, as srun/mpirun-less launches do
        return {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i)}

    coordinator = f"localhost:{_free_port()}"
    _run_two(lambda i: ["train", "2", "2", json.dumps(two)], env_of)  # stops after step 2
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2"]
    coordinator = f"localhost:{_free_port()}"
    _run_two(lambda i: ["train", "2", "0", json.dumps(two)], env_of)  # resumes from the checkpoint

    # The reference runs in a worker too (one process of 4 devices, unbroken): the same script
    # and XLA flags as the two, so only the process split differs between the runs.
    one = [f"out_dir={tmp_path / 'one'}", *small]
    _run_workers(1, lambda i: ["train", "1", "0", json.dumps(one)], devices=4)
    assert_same_run(tmp_path / "two", tmp_path / "one", steps=4)
