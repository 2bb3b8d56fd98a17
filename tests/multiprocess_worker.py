"""One process of the two-process CPU runs of ``test_multiprocess.py`` (not a test itself).

``python -m tests.multiprocess_worker forward COORDINATOR PROCESS_ID MODEL MESH OUT``: joins the
run, loads ``MODEL`` sharded over the mesh's global devices (each process reading only its
blocks), runs ``parallel.forward`` on fixed tokens, gathers the logits and (process 0) saves them
as ``OUT/logits.npy``, with what this process read in ``OUT/reads-<id>.json``.

``python -m tests.multiprocess_worker train PROCESSES STOP_AFTER OVERRIDES_JSON``:
``train.loop.train`` of the config the overrides give (``stop_after`` when STOP_AFTER > 0) over 4
global devices in PROCESSES processes; a run of 2 is joined from the ``JAX_COORDINATOR_ADDRESS``
/ ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment, a run of 1 is the single-process
reference (same script and XLA flags).
"""

from __future__ import annotations

import json
import os
import sys


def main(coordinator: str, process_id: int, model: str, mesh_text: str, out: str) -> None:
    import jax

    from loraswitch_jax.distributed import initialize

    assert initialize(coordinator, 2, process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import loraswitch_jax.weights as weights
    from loraswitch_jax import parallel
    from loraswitch_jax.config import LlamaConfig
    from loraswitch_jax.params import init_params
    from loraswitch_jax.sharding import MeshConfig, param_specs

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    read = {"bytes": 0, "full": 0}
    real = weights.safe_open

    class Counting:  # counts the bytes this process reads from the weight files
        def __init__(self, path, framework):
            self._f = real(path, framework=framework)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, name):
            read["full"] += 1
            return self._f.get_tensor(name)

        def get_slice(self, name):
            lazy = self._f.get_slice(name)

            class Slice:
                def get_shape(self):
                    return lazy.get_shape()

                def __getitem__(self, index):
                    block = lazy[index]
                    read["bytes"] += block.nbytes
                    return block

            return Slice()

    weights.safe_open = Counting
    cfg = LlamaConfig.from_pretrained(model)
    mc = MeshConfig.parse(mesh_text)
    mesh = mc.make_mesh()
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.float32))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(abstract, mc),
                             is_leaf=lambda s: isinstance(s, P))
    params, _ = weights.load_params(model, cfg, dtype=jnp.float32, shardings=shardings)
    assert not params.layers.wq.is_fully_addressable
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P()))
    logits = jax.jit(lambda p, t: parallel.forward(p, t, cfg, mesh=mc))(params, tokens)
    logits = multihost_utils.process_allgather(logits, tiled=True)
    with open(os.path.join(out, f"reads-{process_id}.json"), "w") as f:
        json.dump(read, f)
    if process_id == 0:
        np.save(os.path.join(out, "logits.npy"), np.asarray(logits))
    multihost_utils.sync_global_devices("done")  # neither leaves while the other still reads


def train(processes: int, stop_after: int, overrides: list[str]) -> None:
    import jax

    from loraswitch_jax.train.config import load_train_config
    from loraswitch_jax.train.loop import train as run

    run(load_train_config(None, overrides), stop_after=stop_after or None, progress=False)
    assert jax.process_count() == processes and jax.device_count() == 4


if __name__ == "__main__":
    if sys.argv[1] == "forward":
        main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    else:
        train(int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
