"""The Flax NNX face (``loraswitch_jax.nnx``): same arrays, same logits, same training and
generation as the functional core; orbax and ``save_adapter`` checkpoints; bad input refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx

import loraswitch_jax as lj
from loraswitch_jax.generate import prepare_prompts
from loraswitch_jax.nnx import LOGICAL_AXES, AdaptedLlama, Frozen, Llama
from loraswitch_jax.train.step import OptimConfig, init_state, make_optimizer, train_step
from tests.helpers import jit_forward, random_params

CFG = lj.LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    attention_bias=True, bos_token_id=1, eos_token_id=(2,),
)
TIED = lj.LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, mlp_bias=True,
    bos_token_id=1, eos_token_id=(2,),
)
ADAPTERS = {
    "lora": lj.AdapterConfig.lora(targets=("q", "v", "o", "down"), rank=4),
    "layerwise": lj.AdapterConfig(mode="layerwise", rank=4, num_experts=4, top_k=2,
                                  targets=("q", "k", "gate", "down"), router_layer=1),
    "switch": lj.AdapterConfig(mode="switch", rank=4, num_experts=4, top_k=2, router_layer=1,
                               targets=("q", "v", "o", "up", "down")),
}
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 9)), jnp.int32)


def params_for(cfg=CFG, seed=0):
    return random_params(cfg, seed, jnp.float32)


def adapter_for(mode: str, cfg=CFG, seed=1, acfg=None) -> lj.Adapter:
    """A fresh adapter with random ``B`` (a fresh one is zero), so it changes the logits."""
    adapter = lj.init_adapter(cfg, acfg or ADAPTERS[mode], jax.random.key(seed))
    rng = np.random.RandomState(seed)
    b = {p: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32)
         for p, x in adapter.b.items()}
    return lj.Adapter(config=adapter.config, a=adapter.a, b=b, router=adapter.router)


# graph_updates=False: only mutated variables come back, so the backbone is neither copied nor
# replaced (the default graph mode returns every variable, a copy of each array).
@nnx.jit(graph_updates=False)
def nnx_logits(model, tokens):
    return model(tokens)


@nnx.jit
def nnx_logits_graph_mode(model, tokens):
    return model(tokens)


def leaves_are(tree, other) -> bool:
    a, b = jax.tree.leaves(tree), jax.tree.leaves(other)
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


# ---------------------------------------------------------------------- same arrays, same logits
@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied_qkv_bias", "tied_mlp_bias"])
def test_backbone_logits_equal_forward_and_share_arrays(cfg):
    params = params_for(cfg)
    model = Llama.from_functional(params, cfg)
    assert leaves_are(model.to_functional(), params)
    want = jit_forward()(params, TOKENS, cfg)
    np.testing.assert_array_equal(nnx_logits(model, TOKENS), want)
    assert leaves_are(model.to_functional(), params)
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    assert leaves_are(again.to_functional(), params)
    np.testing.assert_array_equal(nnx_logits(again, TOKENS), want)
    assert not nnx.state(model, nnx.Param)  # backbone weights are Frozen, never Param
    if cfg is TIED:  # the backbone's generation is the core's
        gen = lj.GenerateConfig(max_new_tokens=4)
        np.testing.assert_array_equal(model.generate([[5, 6, 7]], gen).tokens,
                                      lj.generate(params, cfg, [[5, 6, 7]], gen).tokens)


@pytest.mark.parametrize("mode", ["lora", "layerwise", "switch"])
def test_adapted_logits_equal_forward_and_share_arrays(mode):
    params, adapter = params_for(), adapter_for(mode)
    model = AdaptedLlama.from_functional(params, CFG, adapter)
    got_params, got_adapter = model.to_functional()
    assert leaves_are(got_params, params) and leaves_are(got_adapter, adapter)
    assert got_adapter.config == adapter.config and leaves_are(model.adapter(), adapter)
    want = jit_forward()(params, TOKENS, CFG, adapter=adapter)
    assert not np.allclose(want, jit_forward()(params, TOKENS, CFG), atol=1e-3)  # the adapter acts
    np.testing.assert_array_equal(nnx_logits(model, TOKENS), want)
    trainable = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
    assert sorted(map(id, trainable)) == sorted(map(id, jax.tree.leaves(adapter)))
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    assert leaves_are(again.adapter(), adapter) and again.adapter_config == adapter.config
    np.testing.assert_array_equal(nnx_logits(again, TOKENS), want)
    assert leaves_are(again.adapter(), adapter)
    if mode == "switch":  # the default graph mode: same logits, copies put in every variable
        np.testing.assert_array_equal(nnx_logits_graph_mode(again, TOKENS), want)
        for got, same in zip(jax.tree.leaves(again.to_functional()),
                             jax.tree.leaves((params, adapter))):
            np.testing.assert_array_equal(got, same)


def test_logical_axes_give_partition_specs_of_every_variable():
    model = AdaptedLlama.from_functional(params_for(), CFG, adapter_for("layerwise"))
    specs = nnx.get_partition_spec(nnx.state(model))
    flat = dict(nnx.to_flat_state(specs))
    values = dict(nnx.to_flat_state(nnx.state(model)))
    assert flat.keys() == values.keys()
    for path, spec in flat.items():
        assert len(spec.get_value()) == values[path].get_value().ndim, path
        assert all(name in {n for axes in LOGICAL_AXES.values() for n in axes}
                   for name in spec.get_value()), path
    assert flat[("backbone", "layers", "wq")].get_value() == jax.P("layers", "embed", "heads")
    assert flat[("backbone", "layers", "bk")].get_value() == jax.P("layers", "kv_heads")
    assert flat[("lora", "b", "down")].get_value() == jax.P("layers", "experts", "rank", "embed")
    assert flat[("lora", "router")].get_value() == jax.P("layers", "embed", "experts")
    assert isinstance(model.backbone.layers["wq"], Frozen)

    # Mapped to mesh axes by rules, the specs place every array (here on a one-device mesh).
    mesh = jax.make_mesh((1,), ("tensor",))
    rules = [(n, "tensor" if n in ("heads", "kv_heads", "mlp") else None)
             for n in {n for axes in LOGICAL_AXES.values() for n in axes}]
    with linen.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(nnx.state(model), mesh)
    nnx.update(model, jax.device_put(nnx.state(model), shardings))
    assert model.backbone.layers["wo"].get_value().sharding.spec == jax.P(None, "tensor", None)
    assert model.lora.a["q"].get_value().sharding.spec == jax.P(None, None, None, None)


def test_default_filters_differentiate_and_optimize_the_adapter_only():
    """Frozen is no nnx.Param: nnx.grad's default and wrt=nnx.Param reach the adapter alone."""
    model = AdaptedLlama.from_functional(params_for(), CFG, adapter_for("switch"))
    batch = {"tokens": TOKENS, "targets": TOKENS, "loss_mask": jnp.ones(TOKENS.shape)}
    grads = nnx.eval_shape(lambda m: nnx.grad(lambda m: m.loss(batch)[0])(m), model)
    paths = {path for path, _ in nnx.to_flat_state(grads)}
    assert paths == {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert all(path[0] == "lora" for path in paths) and len(paths) == 11  # 5 a, 5 b, router
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    moments = nnx.to_flat_state(nnx.state(optimizer.opt_state))
    assert moments and all("backbone" not in path for path, _ in moments)


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["lora", "switch"])  # without and with routers (loss branches)
def test_nnx_optimizer_training_equals_core_train_step(mode):
    """3 steps of nnx.Optimizer + nnx.value_and_grad give train_step's losses and experts."""
    acfg = ADAPTERS[mode]
    if mode == "switch":  # dropout on: the NNX loss takes train_step's dropout keys
        acfg = dataclasses.replace(acfg, dropout=0.1)
    params, adapter = params_for(), adapter_for(mode, acfg=acfg)
    oc = OptimConfig(lr=3e-3, warmup_steps=1, steps=3, weight_decay=0.01, aux_loss_weight=0.05)
    seed, rng = 7, np.random.RandomState(3)
    batches = []
    for _ in range(3):
        tokens = rng.randint(0, CFG.vocab_size, (2, 10)).astype(np.int32)
        mask = np.ones((2, 10), np.int32)
        mask[1, 6:] = 0
        batches.append({
            "tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask,
            "segment_ids": np.ones((2, 10), np.int32),
            "positions": np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10)).copy(),
        })

    state, core_losses = init_state(adapter, oc, seed), []
    for batch in batches:
        state, metrics = train_step(state, params, jax.tree.map(lambda x: x[None], batch),
                                    cfg=CFG, oc=oc)
        core_losses.append((float(metrics["loss"]), float(metrics["aux"])))

    model = AdaptedLlama.from_functional(params, CFG, adapter)
    optimizer = nnx.Optimizer(model, make_optimizer(oc), wrt=nnx.LoRAParam)

    @nnx.jit(graph_updates=False)
    def step(model, optimizer, batch, key):
        def loss_fn(model):
            return model.loss(batch, aux_loss_weight=oc.aux_loss_weight, dropout_key=key)

        (_, metrics), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model)
        optimizer.update(model, grads)
        return metrics

    nnx_losses = []
    for i, batch in enumerate(batches):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), 0)  # train_step's
        metrics = step(model, optimizer, batch, key)
        nnx_losses.append((float(metrics["ce"]), float(metrics["aux"])))

    np.testing.assert_allclose(nnx_losses, core_losses, rtol=0, atol=1e-6)
    assert core_losses[-1][0] < core_losses[0][0] + 1.0  # it trained, not diverged
    trained = model.adapter()
    for got, want, before in zip(jax.tree.leaves(trained), jax.tree.leaves(state.adapter),
                                 jax.tree.leaves(adapter)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert not np.array_equal(got, before)  # every expert and router moved
    assert leaves_are(model.backbone.to_functional(), params)  # untouched, not even copied
    assert int(optimizer.step[...]) == 3


# ---------------------------------------------------------------------------- generation
def test_nnx_jit_generation_equals_generate():
    params, adapter = params_for(), adapter_for("switch")
    model = AdaptedLlama.from_functional(params, CFG, adapter)
    gen = lj.GenerateConfig(max_new_tokens=6, stop_tokens=(),
                            sampler=lj.Sampler(temperature=0.8, top_k=20))
    prompts = [[5, 9, 11, 3], [7, 8]]
    want = lj.generate(params, CFG, prompts, gen, adapter=adapter, seed=4)
    tokens, lengths, cache_len = prepare_prompts(prompts, CFG, gen.max_new_tokens)

    @nnx.jit
    def run(model, tokens, lengths, key):
        return model.generate_tokens(tokens, lengths, key, gen=gen, cache_len=cache_len)

    got = run(model, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(4))
    np.testing.assert_array_equal(got, want.tokens)
    np.testing.assert_array_equal(model.generate(prompts, gen, seed=4).tokens, want.tokens)


# ---------------------------------------------------------------------------- checkpoints
def test_orbax_state_and_core_adapter_files_round_trip_exactly(tmp_path):
    params = params_for()
    model = AdaptedLlama.from_functional(params, CFG, adapter_for("switch", seed=1))
    other = AdaptedLlama.from_functional(params, CFG, adapter_for("switch", seed=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "lora", nnx.state(model, nnx.LoRAParam))
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "lora", nnx.state(other, nnx.LoRAParam))
    nnx.update(other, restored)
    for got, want in zip(jax.tree.leaves(other.adapter()), jax.tree.leaves(model.adapter())):
        np.testing.assert_array_equal(got, want)

    # The core's adapter files, both ways; same config: variables updated in place.
    lj.save_adapter(model.adapter(), tmp_path / "core", CFG)
    fresh = AdaptedLlama.from_functional(params, CFG, adapter_for("switch", seed=3))
    router_var = fresh.lora.router
    loaded = lj.load_adapter(tmp_path / "core", CFG)
    fresh.load_adapter(loaded)
    assert fresh.lora.router is router_var and leaves_are(fresh.adapter(), loaded)
    np.testing.assert_array_equal(nnx_logits(fresh, TOKENS), nnx_logits(model, TOKENS))

    # Another config replaces the adapter module.
    lora = adapter_for("lora")
    fresh.load_adapter(lora)
    assert fresh.adapter_config == lora.config and leaves_are(fresh.adapter(), lora)


def test_from_pretrained_loads_the_core_folders(tmp_path):
    params = params_for()
    lj.save_params(params, CFG, tmp_path / "model")
    acfg = ADAPTERS["layerwise"]
    model = AdaptedLlama.from_pretrained(tmp_path / "model", acfg, rngs=nnx.Rngs(5),
                                         dtype=jnp.float32)
    adapter = lj.init_adapter(CFG, acfg, nnx.Rngs(5).params())
    assert model.config == CFG
    for got, want in zip(jax.tree.leaves(model.adapter()), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(got, want)
    backbone = Llama.from_pretrained(tmp_path / "model", dtype=jnp.float32)
    for got, want in zip(jax.tree.leaves(backbone.to_functional()), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)

    trained = adapter_for("layerwise")
    lj.save_adapter(trained, tmp_path / "adapter", CFG)
    again = AdaptedLlama.from_pretrained(tmp_path / "model", tmp_path / "adapter",
                                         dtype=jnp.float32)
    np.testing.assert_array_equal(nnx_logits(again, TOKENS),
                                  jit_forward()(params, TOKENS, CFG, adapter=trained))


# ---------------------------------------------------------------------------- bad input
def one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_input_is_refused_with_one_clear_line(tmp_path):
    params = params_for()
    with pytest.raises(lj.AdapterError) as e:  # an adapter made for another model
        AdaptedLlama.from_functional(params, CFG, adapter_for("switch", cfg=TIED))
    one_line(e, "does not fit this model", "expected")
    with pytest.raises(lj.AdapterError) as e:
        AdaptedLlama.from_functional(params, CFG, adapter_for("lora")).load_adapter(
            adapter_for("lora", cfg=TIED))
    one_line(e, "does not fit this model")
    with pytest.raises(lj.AdapterError) as e:
        beyond = lj.Adapter(config=lj.AdapterConfig(router_layer=5), a={}, b={}, router=None)
        AdaptedLlama.from_functional(params, CFG, beyond)
    one_line(e, "router_layer 5", "3-layer")
    with pytest.raises(lj.WeightsError) as e:  # params of another model
        Llama.from_functional(params_for(TIED), CFG)
    one_line(e, "params.")
    with pytest.raises(TypeError) as e:
        AdaptedLlama.from_functional(params, CFG, ADAPTERS["switch"])
    one_line(e, "Adapter", "AdapterConfig")
    model = AdaptedLlama.from_functional(params, CFG, adapter_for("lora"))
    with pytest.raises(ValueError) as e:
        model(TOKENS.astype(jnp.float32))
    one_line(e, "integer array [batch, length]", "float32")
    with pytest.raises(ValueError) as e:
        model(TOKENS[0])
    one_line(e, "[batch, length]")
    with pytest.raises(KeyError) as e:
        model.loss({"tokens": TOKENS})
    one_line(e, "targets", "loss_mask")
    lj.save_params(params, CFG, tmp_path / "model")
    with pytest.raises(ValueError) as e:
        AdaptedLlama.from_pretrained(tmp_path / "model", ADAPTERS["lora"])
    one_line(e, "rngs")
    with pytest.raises(lj.GenerationError) as e:
        model.generate([[CFG.vocab_size]])
    one_line(e, "outside the vocabulary")
