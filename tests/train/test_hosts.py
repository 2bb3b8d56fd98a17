"""Several processes, simulated: each builds only its devices' rows of every batch, and the rows
of all processes put together are the single-process batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from loraswitch_jax.sharding import MeshConfig, batch_spec
from loraswitch_jax.train.data import DataConfig, DataError, EvalBatches, Examples, TrainBatches
from loraswitch_jax.train.hosts import local_rows, process_rows, row_blocks, to_global

B, T = 8, 16


def _examples(n: int, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, n)
    tokens = rng.integers(3, 250, lengths.sum()).astype(np.int32)
    mask = rng.random(lengths.sum()) < 0.8
    return Examples(tokens, mask, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def _data_cfg(tmp_path, batch_size: int = B, **kw) -> DataConfig:
    path = tmp_path / "unused.txt"  # DataConfig checks the path; the examples are made here
    path.write_text("x\n")
    return DataConfig(path=str(path), seq_len=T, batch_size=batch_size, **kw)


def _simulated_rows(mesh_text: str, num_processes: int, batch_size: int) -> list[np.ndarray]:
    """Each simulated process' rows of the batch sharding of ``mesh_text`` over the 8 devices,
    devices assigned to processes in order (``jax.devices()`` is ordered by process)."""
    mc = MeshConfig.parse(mesh_text)
    sharding = NamedSharding(mc.make_mesh(), batch_spec(mc, batch_size))
    per = mc.size // num_processes
    blocks = [(d.id // per, *idx[0].indices(batch_size)[:2])
              for d, idx in sharding.devices_indices_map((batch_size, T)).items()]
    assert sorted(b[1:] for b in blocks) == sorted(b[1:] for b in row_blocks(
        sharding, (batch_size, T), 0))
    return [process_rows(blocks, p, batch_size) for p in range(num_processes)]


@pytest.mark.parametrize("mesh_text,num_processes", [
    ("data=8", 2), ("data=8", 8), ("data=2,fsdp=2,tensor=2", 2), ("data=2,fsdp=2,tensor=2", 4),
    ("fsdp=4,tensor=2", 4),
])
def test_process_rows_partition_the_batch(mesh_text, num_processes):
    rows = _simulated_rows(mesh_text, num_processes, B)
    together = np.concatenate(rows)
    assert sorted(together.tolist()) == list(range(B))  # disjoint, and all of them
    assert all(len(r) == B // num_processes for r in rows)


def test_tensor_across_processes_replicates_rows():
    # tensor=2 spans processes of one device each: both halves of a pair hold the same rows.
    rows = _simulated_rows("data=2,fsdp=2,tensor=2", 8, B)
    assert [r.tolist() for r in rows[::2]] == [r.tolist() for r in rows[1::2]]
    assert sorted(np.concatenate(rows[::2]).tolist()) == list(range(B))


def test_process_rows_refuses_bad_blocks():
    with pytest.raises(ValueError, match="holds no rows"):
        process_rows([(0, 0, 4)], 1, 4)
    with pytest.raises(ValueError, match="overlap"):
        process_rows([(0, 0, 4), (0, 2, 6)], 0, 8)
    with pytest.raises(ValueError, match="not within a batch of 4 rows"):
        process_rows([(0, 2, 6)], 0, 4)


@pytest.mark.parametrize("num_rows_examples", [300, 5])  # many batches; one padded batch
@pytest.mark.parametrize("num_processes", [2, 4])
def test_process_batches_join_to_the_single_process_batch(tmp_path, num_rows_examples,
                                                          num_processes):
    cfg = _data_cfg(tmp_path)
    examples = _examples(num_rows_examples)
    whole = TrainBatches(examples, cfg)
    parts = [TrainBatches(examples, cfg, rows=r)
             for r in _simulated_rows("data=2,fsdp=2,tensor=2", num_processes, B)]
    for _ in range(2 * whole.batches_per_epoch + 1):  # past an epoch's reshuffle
        want = next(whole)
        got = [next(p) for p in parts]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
            assert all(g[k].dtype == want[k].dtype for g in got)
    evals = [list(EvalBatches(examples, cfg, rows=r))
             for r in _simulated_rows("data=8", num_processes, B)]
    for i, want in enumerate(EvalBatches(examples, cfg)):
        for k in want:
            np.testing.assert_array_equal(np.concatenate([e[i][k] for e in evals]), want[k])


def test_rows_are_checked(tmp_path):
    cfg = _data_cfg(tmp_path)
    for bad in ([3, 1], [0, 8], [], [1, 1]):
        with pytest.raises(DataError, match=r"rows must be sorted distinct positions in \[0, 8\)"):
            TrainBatches(_examples(50), cfg, rows=np.array(bad, np.int64))


def test_one_process_global_batch_is_device_put(tmp_path):
    mc = MeshConfig.parse("data=2,fsdp=2,tensor=2")
    mesh = mc.make_mesh()
    sharding = NamedSharding(mesh, P(None, *batch_spec(mc, B)))
    rows = local_rows(sharding, (2, B, T), axis=1)
    assert rows.tolist() == list(range(B))  # one process holds every row
    batches = TrainBatches(_examples(300), _data_cfg(tmp_path), rows=rows)
    host = {k: np.stack([v, v + 1]) for k, v in next(batches).items()}
    placed = to_global(host, sharding, (2, B, T))
    for k, v in host.items():
        assert placed[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(placed[k]), v)
        np.testing.assert_array_equal(np.asarray(placed[k]),
                                      np.asarray(jax.device_put(v, sharding)))
