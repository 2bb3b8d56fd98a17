"""Joining a multi-process JAX run (``jax.distributed.initialize``) from flags or the environment.

One process per host (or per GPU) runs the same program; after :func:`initialize` every process
sees every device of the run (``jax.devices()``), its own through ``jax.local_devices()``, and
one mesh spans them all: JAX's SPMD partitioner does the rest.

Where the settings come from, first match wins, per setting:

* the arguments (the CLI's ``--coordinator HOST:PORT --num-processes N --process-id I``);
* ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (ours: JAX 0.10 reads no environment variable for these two);
* a SLURM step (``srun``) or an Open MPI launch (``mpirun``): JAX's own cluster detection fills
  in whatever is still unset.

With none of these, nothing happens and the run is single-process, as before.
"""

from __future__ import annotations

import os

import jax

__all__ = ["DistributedError", "initialize", "requested"]

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # JAX reads this one itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# The variables JAX's SlurmCluster and OmpiCluster require before they detect a launch.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI = ("OMPI_MCA_orte_hnp_uri",)

# The settings this process joined with (None: not joined by us).
_joined: tuple[str | None, int, int] | None = None


class DistributedError(ValueError):
    """Multi-process settings that are partial, malformed or conflict with the joined run."""


def _int_setting(value, name: str, low: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or number < low or (isinstance(value, float) and value != number):
        raise DistributedError(f"{name} must be an integer >= {low}, got {value!r}")
    return number


def _cluster_launch() -> str | None:
    """``"SLURM"`` or ``"Open MPI"`` when this process was started by one with several tasks."""
    if all(v in os.environ for v in _SLURM) and os.environ["SLURM_NTASKS"] not in ("", "1"):
        return "SLURM"
    if all(v in os.environ for v in _OMPI) and os.environ.get("OMPI_COMM_WORLD_SIZE", "") != "1":
        return "Open MPI"
    return None


def requested(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> tuple[str | None, int | None, int | None] | None:
    """The ``(coordinator, num_processes, process_id)`` asked for by the arguments and the
    environment (a cluster launch leaves the missing ones ``None`` for JAX to detect), or
    ``None`` when nothing asks for several processes.

    Raises:
      DistributedError: a malformed value, or a partial setting outside a cluster launch (e.g.
        a coordinator without a process count); the message names what is missing.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    n_name = "num_processes" if num_processes is not None else ENV_NUM_PROCESSES
    i_name = "process_id" if process_id is not None else ENV_PROCESS_ID
    n = _int_setting(num_processes if num_processes is not None
                     else os.environ.get(ENV_NUM_PROCESSES), n_name, 1)
    i = _int_setting(process_id if process_id is not None
                     else os.environ.get(ENV_PROCESS_ID), i_name, 0)
    if coordinator is not None:
        host, colon, port = str(coordinator).rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"coordinator must be HOST:PORT (process 0's address), got "
                                   f"{coordinator!r}")
    if n is not None and i is not None and i >= n:
        raise DistributedError(f"process_id {i} is not below num_processes {n}")
    given = {"coordinator": coordinator, "num_processes": n, "process_id": i}
    if all(v is None for v in given.values()):
        return (None, None, None) if _cluster_launch() else None
    if n == 1 and coordinator is None:
        return None  # one process asked for explicitly: nothing to join
    missing = [k for k, v in given.items() if v is None]
    if missing and not _cluster_launch():
        have = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
        raise DistributedError(
            f"multi-process settings are partial ({have}): also give {', '.join(missing)} "
            f"(flags, or {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}), or launch "
            "with srun / mpirun")
    return coordinator, n, i


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the multi-process run that the arguments or the environment describe (module doc).

    Call it before any other JAX call of the process. Idempotent: a second call with the same
    (or no) settings does nothing; a run that JAX already joined by other means is accepted.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordinator service (every process gives the same).
      num_processes: processes in the run.
      process_id: this process' index, ``0 <= process_id < num_processes``.

    Returns:
      Whether this process is now part of a multi-process run (False: single process).

    Raises:
      DistributedError: partial, malformed or conflicting settings (one line naming them), or
        JAX refused them (e.g. JAX computations already ran in this process).
    """
    global _joined
    asked = requested(coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        if asked is not None and _joined is not None:
            clash = [f"{name} {new} (joined with {old})" for name, new, old in
                     zip(("coordinator", "num_processes", "process_id"), asked, _joined)
                     if new is not None and old is not None and new != old]
            if clash:
                raise DistributedError("already joined a multi-process run with other settings: "
                                       + "; ".join(clash))
        return True
    if asked is None:
        return False
    coord, n, i = asked
    try:
        jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=i)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"jax.distributed.initialize(coordinator={coord!r}, "
                               f"num_processes={n}, process_id={i}) failed: {first}") from e
    _joined = (coord, jax.process_count(), jax.process_index())
    return True
