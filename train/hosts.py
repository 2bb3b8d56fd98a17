"""Which rows of a global batch each process builds, and the global array made of them.

With several processes, every process builds only the rows its own devices hold
(:func:`local_rows`, from the batch's sharding) and :func:`to_global` joins the processes' rows
into one global array with ``jax.make_array_from_process_local_data``. In one process the rows
are all of them and the result equals ``jax.device_put(batch, sharding)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Sharding

__all__ = ["local_rows", "process_rows", "row_blocks", "to_global"]


def process_rows(blocks: Iterable[tuple[int, int, int]], process_index: int,
                 batch_size: int) -> np.ndarray:
    """The positions in a global batch of the rows that process ``process_index`` holds.

    Args:
      blocks: ``(process, start, stop)`` per device: rows ``start:stop`` of the batch are on
        the device, which belongs to ``process`` (replicas repeat a block).
      process_index: the process asking.
      batch_size: rows of the global batch.

    Returns:
      ``[n]`` int64, sorted: the process' distinct blocks back to back, the order in which
      ``jax.make_array_from_process_local_data`` maps the local rows onto its devices.

    Raises:
      ValueError: the process holds no block, or its blocks overlap or leave the batch.
    """
    mine = sorted({(int(a), int(b)) for p, a, b in blocks if p == process_index})
    if not mine:
        raise ValueError(f"process {process_index} holds no rows of the batch")
    for (a0, b0), (a1, b1) in zip(mine, mine[1:]):
        if a1 < b0:
            raise ValueError(f"row blocks {a0}:{b0} and {a1}:{b1} of process {process_index} "
                             "overlap")
    if mine[0][0] < 0 or mine[-1][1] > batch_size or any(a >= b for a, b in mine):
        raise ValueError(f"row blocks {mine} are not within a batch of {batch_size} rows")
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in mine])


def row_blocks(sharding: Sharding, shape: tuple[int, ...], axis: int
               ) -> list[tuple[int, int, int]]:
    """``(process, start, stop)`` of the rows (axis ``axis`` of ``shape``) on each device."""
    return [(d.process_index, *idx[axis].indices(shape[axis])[:2])
            for d, idx in sharding.devices_indices_map(tuple(shape)).items()]


def local_rows(sharding: Sharding, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """:func:`process_rows` of this process for a batch of ``shape`` placed by ``sharding``."""
    return process_rows(row_blocks(sharding, shape, axis), jax.process_index(), shape[axis])


def to_global(batch: dict[str, np.ndarray], sharding: Sharding,
              shape: tuple[int, ...]) -> dict[str, jax.Array]:
    """Global arrays of ``shape`` on ``sharding`` from this process' rows (:func:`local_rows`)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, shape) for k, v in batch.items()}
