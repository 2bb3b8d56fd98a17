"""Loading HF safetensors straight onto a mesh (``load_params(shardings=...)``): the arrays equal
the unsharded load, carry the asked shardings, and every read is one device's block only."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import loraswitch_jax as lj
import loraswitch_jax.weights as weights
from loraswitch_jax.sharding import MeshConfig, param_specs

MESHES = [("tensor=4", False), ("fsdp=2,tensor=2", True)]


def _shardings(cfg, mesh_text: str, shard_fsdp: bool):
    mc = MeshConfig.parse(mesh_text)
    abstract = jax.eval_shape(lambda: lj.init_params(cfg, jax.random.key(0), jnp.float32))
    specs = param_specs(abstract, mc, shard_fsdp=shard_fsdp)
    mesh = mc.make_mesh()
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P)), specs


class _Log:
    def __init__(self):
        self.reads = collections.defaultdict(list)  # hf name -> [(index, nbytes)]
        self.full = []  # names read whole through get_tensor


class _CountingSlice:
    def __init__(self, inner, name, log):
        self._inner, self._name, self._log = inner, name, log

    def get_shape(self):
        return self._inner.get_shape()

    def __getitem__(self, index):
        block = self._inner[index]
        self._log.reads[self._name].append((index, block.nbytes))
        return block


class _CountingFile:
    def __init__(self, inner, log):
        self._inner, self._log = inner, log

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def keys(self):
        return self._inner.keys()

    def get_tensor(self, name):
        self._log.full.append(name)
        return self._inner.get_tensor(name)

    def get_slice(self, name):
        return _CountingSlice(self._inner.get_slice(name), name, self._log)


@pytest.fixture
def counted(monkeypatch):
    log, real = _Log(), weights.safe_open
    monkeypatch.setattr(weights, "safe_open",
                        lambda path, framework: _CountingFile(real(path, framework=framework), log))
    return log


def _hf_leaves(params: lj.LlamaParams, cfg: lj.LlamaConfig) -> dict[str, tuple[jax.Array, bool]]:
    """HF tensor name -> (the loaded leaf it went into, whether that leaf is stacked [L, ...])."""
    out = {"model.embed_tokens.weight": (params.embed, False),
           "model.norm.weight": (params.final_norm, False)}
    if params.lm_head is not None:
        out["lm_head.weight"] = (params.lm_head, False)
    for field, suffix, _, _ in weights._layer_entries(cfg):
        for layer in range(cfg.num_hidden_layers):
            out[f"model.layers.{layer}.{suffix}"] = (getattr(params.layers, field), True)
    return out


def _blocks(x: jax.Array, stacked: bool) -> int:
    """Distinct blocks of (one layer of) ``x`` over its devices (1: replicated)."""
    dims = range(1 if stacked else 0, x.ndim)
    index = x.sharding.devices_indices_map(x.shape).values()
    return len({tuple(i[d].indices(x.shape[d])[:2] for d in dims) for i in index})


@pytest.mark.parametrize("mesh_text,shard_fsdp", MESHES)
def test_sharded_load_equals_unsharded(case, mesh_text, shard_fsdp):
    shardings, specs = _shardings(case.cfg, mesh_text, shard_fsdp)
    loaded, cfg = lj.load_params(case.path, dtype=jnp.float32, shardings=shardings)
    assert cfg == case.cfg
    got_leaves, treedef = jax.tree.flatten(loaded)
    assert treedef == jax.tree.structure(case.params)
    for got, want, spec in zip(got_leaves, jax.tree.leaves(case.params),
                               jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.spec == spec and got.dtype == jnp.float32
    # Spot checks of the rules themselves (column-parallel q, row-parallel down, vocab head).
    t = "tensor"
    f = "fsdp" if shard_fsdp else None
    assert loaded.layers.wq.sharding.spec == P(None, f, t)
    assert loaded.layers.w_down.sharding.spec == P(None, t, f)
    t_size, f_size = (2, 2) if shard_fsdp else (4, 1)
    assert loaded.layers.wq.addressable_shards[0].data.shape == (
        cfg.num_hidden_layers, cfg.hidden_size // f_size,
        cfg.num_attention_heads * cfg.head_dim // t_size)


@pytest.mark.parametrize("mesh_text,shard_fsdp", MESHES)
def test_each_read_is_one_devices_block(case, counted, mesh_text, shard_fsdp):
    shardings, _ = _shardings(case.cfg, mesh_text, shard_fsdp)
    loaded, cfg = lj.load_params(case.path, dtype=jnp.float32, shardings=shardings)
    assert counted.full == []  # no tensor is ever read whole through get_tensor
    leaves = _hf_leaves(loaded, cfg)
    assert set(counted.reads) == set(leaves)
    split = 0
    for name, (leaf, stacked) in leaves.items():
        full = int(np.prod(leaf.shape[1:] if stacked else leaf.shape)) * leaf.dtype.itemsize
        n = _blocks(leaf, stacked)
        sizes = [nbytes for _, nbytes in counted.reads[name]]
        # One read per distinct block (replicas on this process share it), each 1/n of the tensor.
        assert sizes == [full // n] * n, (name, sizes, full, n)
        assert sum(sizes) == full
        if n > 1:
            split += 1
            assert max(sizes) < full
    assert split >= 7 * cfg.num_hidden_layers  # every projection of every layer was split


def test_bad_shardings_are_refused(llama3_case):
    shardings, _ = _shardings(llama3_case.cfg, "tensor=2", False)
    no_head = dataclasses.replace(shardings, lm_head=None)
    with pytest.raises(lj.WeightsError, match=r"shardings\.lm_head must be a jax.sharding.Sharding"):
        lj.load_params(llama3_case.path, dtype=jnp.float32, shardings=no_head)
    with pytest.raises(lj.WeightsError, match="shardings must be a LlamaParams"):
        lj.load_params(llama3_case.path, dtype=jnp.float32, shardings={"embed": None})


def test_tied_model_takes_no_head_sharding(case):
    shardings, _ = _shardings(case.cfg, "tensor=2", False)
    if case.cfg.tie_word_embeddings:
        extra = jax.tree.leaves(shardings)[0]
        with pytest.raises(lj.WeightsError, match=r"shardings\.lm_head must be None"):
            lj.load_params(case.path, dtype=jnp.float32,
                           shardings=dataclasses.replace(shardings, lm_head=extra))
    else:
        assert lj.load_params(case.path, dtype=jnp.float32, shardings=shardings)[0].lm_head \
            is not None


def test_sharding_that_does_not_divide_is_named(llama3_case):
    shardings, _ = _shardings(llama3_case.cfg, "tensor=2", False)
    mesh3 = MeshConfig(tensor=3).make_mesh()
    bad = dataclasses.replace(shardings, layers=dataclasses.replace(
        shardings.layers, wq=NamedSharding(mesh3, P(None, None, "tensor"))))
    with pytest.raises(lj.WeightsError, match=r"^shardings\.layers\.wq does not fit its shape "
                                              r"\(2, 64, 64\)"):
        lj.load_params(llama3_case.path, dtype=jnp.float32, shardings=bad)
