"""What ``distributed.requested`` reads from flags and the environment (no run is joined here;
``test_multiprocess.py`` joins a real one)."""

from __future__ import annotations

import pytest

from loraswitch_jax import distributed
from loraswitch_jax.distributed import DistributedError, requested

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
        "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_nothing_asked_is_single_process():
    assert requested() is None
    assert not distributed.initialize()  # a no-op: nothing to join


def test_flags_and_environment(clean_env):
    assert requested("host:1234", 2, 1) == ("host:1234", 2, 1)
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:5000")
    clean_env.setenv("JAX_NUM_PROCESSES", "4")
    clean_env.setenv("JAX_PROCESS_ID", "3")
    assert requested() == ("10.0.0.1:5000", 4, 3)
    assert requested(process_id=0) == ("10.0.0.1:5000", 4, 0)  # a flag wins over the variable


def test_one_process_asked_is_single_process():
    assert requested(num_processes=1, process_id=0) is None


@pytest.mark.parametrize("args,match", [
    (("host:1234", None, None), r"partial \(coordinator=host:1234\): also give num_processes, "
                                r"process_id"),
    ((None, 2, 0), r"partial .*also give coordinator"),
    (("host", 2, 0), "coordinator must be HOST:PORT"),
    (("host:99999", 2, 0), "coordinator must be HOST:PORT"),
    (("host:1", 2, 2), "process_id 2 is not below num_processes 2"),
    (("host:1", 0, 0), "num_processes must be an integer >= 1, got 0"),
    (("host:1", 2, -1), "process_id must be an integer >= 0, got -1"),
    (("host:1", "two", 0), "num_processes must be an integer, got 'two'"),
])
def test_bad_settings_say_what_is_wrong(args, match):
    with pytest.raises(DistributedError, match=match):
        requested(*args)
    with pytest.raises(DistributedError, match=match):
        distributed.initialize(*args)


def test_bad_environment_names_the_variable(clean_env):
    clean_env.setenv("JAX_NUM_PROCESSES", "x")
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES must be an integer, got 'x'"):
        requested()


def test_cluster_launch_leaves_the_rest_to_jax(clean_env):
    for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "node[1-2]"),
                        ("SLURM_NTASKS", "2"), ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "0")):
        clean_env.setenv(name, value)
    assert requested() == (None, None, None)
    assert requested("node1:1234") == ("node1:1234", None, None)  # no error: JAX fills the rest
    clean_env.setenv("SLURM_NTASKS", "1")  # one task: nothing to join
    assert requested() is None
