"""FSDP on 8 CPU devices: each scanned layer all-gathers only its own weights over ``fsdp``, in the
forward and the backward (read from the compiled HLO), the backbone sits on each device at
1/fsdp of its size, and losses and gradients equal one device."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import loraswitch_jax as lj
from loraswitch_jax.router import balance_loss
from loraswitch_jax.layer_scan import at_rest_spec
from loraswitch_jax.sharding import MeshConfig, adapter_specs, batch_spec, param_specs, shard
from loraswitch_jax.train.loss import token_cross_entropy
from loraswitch_jax.train.placement import plan_placement
from loraswitch_jax.train.step import OptimConfig, TrainState, eval_step, init_state
from tests.helpers import make_adapter, random_params, rel_err

# hidden 64 and FFN 128 split 4 ways; 3 layers, the adapter from layer 1 (its index != layer's).
CFG = lj.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
OC = OptimConfig(lr=1e-3, warmup_steps=0, steps=10)
ACFG = lj.AdapterConfig(mode="switch", rank=4, alpha=8.0, num_experts=4, top_k=2, dropout=0.1,
                        router_layer=1)
B, T = 8, 16


# ------------------------------------------------------------------ the compiled step's HLO
def _computations(hlo: str) -> dict[str, list[str]]:
    """Instruction lines of each computation of an HLO module's text, by name."""
    comps, name = {}, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            name = re.match(r"(?:ENTRY )?%?([\w.\-]+)", line).group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line.strip())
    return comps


def _all_gathers(hlo: str) -> list[tuple[str, str, str]]:
    """``(computation, result shape, operand shape)`` of every all-gather, shapes as
    ``"f32[1,64,32]"``."""
    define = re.compile(r"%([\w.\-]+) = (\w+\[[\d,]*\])")
    gather = re.compile(r"%[\w.\-]+ = (\w+\[[\d,]*\])\S* all-gather\(%([\w.\-]+)\)")
    out = []
    for comp, lines in _computations(hlo).items():
        shapes = {m.group(1): m.group(2) for m in map(define.match, lines) if m}
        out += [(comp, m.group(1), shapes[m.group(2)]) for m in map(gather.match, lines) if m]
    return out


def _hlo_shape(shape) -> str:
    return f"f32[{','.join(map(str, shape))}]"


def _layer_gathers(tree, names, mc: MeshConfig) -> tuple[set, set]:
    """For the stacked ``[L, ...]`` leaves of ``tree`` split over fsdp: the ``(result, operand)``
    of one layer's all-gather, and the stacked leaves' shapes."""
    per_layer, stacked = set(), set()
    for name, x in zip(names, jax.tree.leaves(tree)):
        spec = at_rest_spec(name, x.shape, mc)
        if "fsdp" not in spec:
            continue
        one = (1, *x.shape[1:])
        local = list(one)
        local[tuple(spec).index("fsdp")] //= mc.fsdp
        per_layer.add((_hlo_shape(one), _hlo_shape(local)))
        stacked.add(_hlo_shape(x.shape))
    return per_layer, stacked


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _compile(mesh: str, remat: str):
    """The placed train step compiled for abstract ``[1, B, T]`` batches (nothing allocated)."""
    params = jax.eval_shape(lambda: random_params(CFG, 0, jnp.float32))
    state = jax.eval_shape(lambda: init_state(lj.init_adapter(CFG, ACFG, jax.random.key(1)), OC,
                                              0))
    placement = plan_placement(MeshConfig.parse(mesh), CFG, params, state, batch_size=B)
    batch = {k: jax.ShapeDtypeStruct((1, B, T), dt, sharding=placement.batch)
             for k, dt in (("tokens", jnp.int32), ("targets", jnp.int32),
                           ("loss_mask", jnp.float32), ("segment_ids", jnp.int32),
                           ("positions", jnp.int32))}
    compiled = placement.train_step.lower(
        _abstract(state, placement.state), _abstract(params, placement.params), batch, cfg=CFG,
        oc=OC, remat=remat, attention_chunk=8).compile()
    return compiled, params, state, batch, placement


def _layer_names(params, adapter):
    layers = [f.name for f in dataclasses.fields(params.layers)
              if getattr(params.layers, f.name) is not None]
    return layers, [f"a.{p}" for p in adapter.a] + [f"b.{p}" for p in adapter.b]


@pytest.mark.parametrize("mesh, remat", [("fsdp=4", "none"), ("fsdp=4", "dots"),
                                         ("fsdp=4", "full"), ("data=2,fsdp=4", "dots")])
def test_each_layer_gathers_only_its_own_weights(mesh, remat):
    compiled, params, state, batch, placement = _compile(mesh, remat)
    hlo = compiled.as_text()
    mc = MeshConfig.parse(mesh)
    layer_names, adapter_names = _layer_names(params, state.adapter)
    want, stacked = _layer_gathers(params.layers, layer_names, mc)
    want_a, stacked_a = _layer_gathers((state.adapter.a, state.adapter.b), adapter_names, mc)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    gathers = _all_gathers(hlo)
    assert len(want) >= 6 and len(want_a) >= 6  # wq/wo/..., and every factor (embed or rank)
    for pair in want | want_a:
        where = {comp for comp, *got in gathers if tuple(got) == pair}
        # Forward and backward: two loops (under remat too, the weights are gathered again).
        # (Layer 0, before the adapter, is a one-trip loop that XLA flattens into its caller.)
        assert len(where & bodies) >= 2, (pair, where)
    for comp, result, operand in gathers:
        if comp in bodies:  # inside the layers only weights are gathered, never activations
            assert (result, operand) in want | want_a, (comp, result, operand)
        assert result not in stacked | stacked_a, ("a whole [L, ...] stack gathered", result)

    # Per device: the backbone's layers at 1/4, the rest as placed (batch rows, replicated
    # embedding, adapter and moments split where their shapes allow).
    def per_device(tree, shardings):
        return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params.layers))
    assert per_device(params.layers, placement.params.layers) * 4 == layer_bytes
    args = [(state, placement.state), (params, placement.params),
            (batch, jax.tree.map(lambda x: x.sharding, batch))]
    placed = sum(per_device(*a) for a in args)
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state, params, batch)))
    got = compiled.memory_analysis().argument_size_in_bytes
    assert got == pytest.approx(placed, rel=0.01), (got, placed)
    assert got < whole - 0.75 * layer_bytes, (got, whole, layer_bytes)


# ------------------------------------------------------------------ equal to one device
def _batch(seed: int) -> dict:
    """``[B, T]`` rows of two packed segments and a random loss mask."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, CFG.vocab_size, (B // 2, T + 1)).astype(np.int32)
    seg = np.repeat(np.arange(2, dtype=np.int32), T // 2)
    rows = B // 2
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
                loss_mask=(rng.rand(rows, T) > 0.2).astype(np.float32),
                segment_ids=np.broadcast_to(seg, (rows, T)).copy(),
                positions=np.broadcast_to(np.tile(np.arange(T // 2, dtype=np.int32), 2),
                                          (rows, T)).copy())


def _loss(adapter, params, batch, mesh, remat, scan_layers=True):
    logits, routing = lj.forward(
        params, batch["tokens"], CFG, adapter=adapter, positions=batch["positions"],
        segment_ids=batch["segment_ids"], dropout_key=jax.random.key(3), return_routing=True,
        remat=remat, attention_chunk=8, fsdp_mesh=mesh, scan_layers=scan_layers)
    ce_sum, count = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return ce_sum / count + 0.01 * balance_loss(routing, batch["loss_mask"])


def _loss_and_grad(remat, mesh=None, scan_layers=True):
    return jax.jit(jax.value_and_grad(
        lambda adapter, params, batch: _loss(adapter, params, batch, mesh, remat, scan_layers)))


@pytest.fixture(scope="module")
def models():
    params = random_params(CFG, 0, jnp.float32)
    kw = dict(rank=4, num_experts=4, top_k=2, dropout=0.1)
    return params, {"switch": make_adapter(CFG, seed=1, mode="switch", router_layer=1, **kw),
                    "layerwise": make_adapter(CFG, seed=2, mode="layerwise", **kw)}


@pytest.mark.parametrize("mesh, remat, mode, scan_layers", [
    ("fsdp=4", "none", "switch", True), ("fsdp=4", "dots", "layerwise", True),
    ("data=2,fsdp=2,tensor=2", "full", "switch", True),
    ("data=2,fsdp=2,tensor=2", "dots", "layerwise", False),  # unrolled layers gather too
])
def test_loss_and_gradients_equal_one_device(models, mesh, remat, mode, scan_layers):
    params, adapters = models
    adapter, batch = adapters[mode], _batch(4)
    want_loss, want_grad = _loss_and_grad("none")(adapter, params, batch)
    mc = MeshConfig.parse(mesh)
    jax_mesh = mc.make_mesh()
    placed_params = shard(params, param_specs(params, mc, shard_fsdp=True), jax_mesh)
    placed_adapter = shard(adapter, adapter_specs(adapter, mc, shard_fsdp=True), jax_mesh)
    assert placed_params.layers.w_up.sharding.spec[1] == "fsdp"
    rows = jax.tree.map(lambda x: batch_spec(mc, x.shape[0], x.ndim), batch)
    placed_batch = shard(batch, rows, jax_mesh)
    loss, grad = _loss_and_grad(remat, jax_mesh, scan_layers)(placed_adapter, placed_params,
                                                               placed_batch)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
        assert rel_err(got, want) < 1e-5


def test_placements_eval_step_equals_one_device(models):
    params, adapters = models
    adapter, batch = adapters["switch"], _batch(5)
    want = eval_step(adapter, params, batch, cfg=CFG, attention_chunk=8)
    state = init_state(adapter, OC, 0)
    placement = plan_placement(MeshConfig(fsdp=4), CFG, params, state, batch_size=B // 2)
    state = jax.device_put(state, placement.state)
    got = placement.eval_step(state.adapter, jax.device_put(params, placement.params),
                              placement.put_eval_batch(batch), cfg=CFG, attention_chunk=8)
    assert float(got["tokens"]) == float(want["tokens"])
    assert float(got["ce_sum"]) == pytest.approx(float(want["ce_sum"]), rel=1e-5)


def test_fsdp_mesh_is_checked(models):
    params, adapters = models
    tokens = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="fsdp_mesh must be a jax.sharding.Mesh with axes"):
        lj.forward(params, tokens, CFG, fsdp_mesh=MeshConfig(fsdp=2))
    with pytest.raises(ValueError, match="cannot run per shard"):
        lj.forward(params, tokens, CFG, fsdp_mesh=MeshConfig(fsdp=2).make_mesh(),
                   tensor_axis="tensor")


# ------------------------------------------------------------------ optimizer-state placement
def test_every_optimizer_state_leaf_shaped_like_its_parameter_is_split():
    """Adafactor's (unfactored) second moments and a moment kept in a plain dict follow their
    parameter; its row/column statistics (another shape) and counts are replicated."""
    mc = MeshConfig(fsdp=4)
    adapter = jax.eval_shape(lambda: lj.init_adapter(CFG, ACFG, jax.random.key(1)))
    opt_state = (jax.eval_shape(optax.adafactor(1e-3, min_dim_size_to_factor=32).init, adapter),
                 {"trace": {"a": dict(adapter.a)}})
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), adapter=adapter,
                       opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    params = jax.eval_shape(lambda: random_params(CFG, 0, jnp.float32))
    specs = plan_placement(mc, CFG, params, state, batch_size=B).state
    want = adapter_specs(adapter, mc, shard_fsdp=True)
    assert want.a["q"] == P(None, None, "fsdp", None)  # [La, E, d_in, r]: embed over fsdp
    # B of q [La, E, r, d_out]: d_out belongs to tensor, so rank goes over fsdp.
    adafactor = specs.opt_state[0][0]
    assert adafactor.v.b["q"].spec == specs.adapter.b["q"].spec == P(None, None, "fsdp", None)
    assert adafactor.v.a["q"].spec == want.a["q"]
    assert adafactor.v.router.spec == want.router == P("fsdp", None)
    assert adafactor.v_row.a["q"].spec == P()  # a [1] placeholder: replicated
    assert adafactor.count.spec == P()
    assert specs.opt_state[1]["trace"]["a"]["up"].spec == want.a["up"]
    assert specs.step.spec == P() and specs.rng.spec == P()
