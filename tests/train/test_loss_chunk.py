"""Chunked cross-entropy (``loss_chunk``) and the training ``attention_impl``: same results as the
whole-logits loss and the xla attention, less memory, clear refusals."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax.llama import forward, lm_head
from loraswitch_jax.sharding import MeshConfig
from loraswitch_jax.train.config import ConfigFileError, load_train_config
from loraswitch_jax.train.loss import chunked_cross_entropy, token_cross_entropy
from loraswitch_jax.train.placement import plan_placement
from loraswitch_jax.train.step import OptimConfig, eval_step, init_state, train_step

CFG = lj.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ACFG = lj.AdapterConfig(mode="switch", rank=4, num_experts=4, top_k=2)
OC = OptimConfig(lr=1e-2, warmup_steps=0, steps=10)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def make_batch(B: int, T: int, seed: int = 0, vocab: int = CFG.vocab_size) -> dict:
    """A ``[B, T]`` batch of two packed segments a row, some targets masked."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (B, T + 1)).astype(np.int32)
    cut = T // 3
    positions = np.concatenate([np.arange(cut), np.arange(T - cut)]).astype(np.int32)
    segments = np.where(np.arange(T) < cut, 1, 2).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": (rng.rand(B, T) > 0.25).astype(np.float32),
            "segment_ids": np.tile(segments, (B, 1)), "positions": np.tile(positions, (B, 1))}


def make_model(tied: bool):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    params = lj.init_params(cfg, jax.random.key(0), jnp.float32)
    adapter = lj.init_adapter(cfg, ACFG, jax.random.key(1))
    # B starts at zero: move it so the adapter's gradient reaches every leaf.
    b = {p: 0.05 * jax.random.normal(jax.random.key(i), x.shape)
         for i, (p, x) in enumerate(adapter.b.items())}
    adapter = dataclasses.replace(adapter, b=b)
    return cfg, params, adapter


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request):
    return make_model(request.param)


# 3 rows of 16 tokens: chunks of 1, 7 (padded to 21) and 16 positions.
@pytest.mark.parametrize("chunk", [1, 21, 1000])
def test_chunked_loss_and_gradients_equal_the_whole_logits(model, chunk):
    cfg, params, adapter = model
    batch = jax.tree.map(jnp.asarray, make_batch(3, 16))
    targets, mask = batch["targets"], batch["loss_mask"]

    def hidden_of(adapter):
        return forward(params, batch["tokens"], cfg, adapter=adapter, positions=batch["positions"],
                       segment_ids=batch["segment_ids"], return_hidden=True)

    def whole(h):
        return token_cross_entropy(lm_head(params, h), targets, mask)

    def chunked(h):
        return chunked_cross_entropy(h, functools.partial(lm_head, params), targets, mask, chunk)

    whole, chunked, hidden_of = jax.jit(whole), jax.jit(chunked), jax.jit(hidden_of)
    h = hidden_of(adapter)
    logits = forward(params, batch["tokens"], cfg, adapter=adapter, positions=batch["positions"],
                     segment_ids=batch["segment_ids"])
    assert rel_err(lm_head(params, h), logits) < 1e-6  # the head of return_hidden: the logits
    (want, want_n), (got, got_n) = whole(h), chunked(h)
    assert float(got_n) == float(want_n) == float(jnp.sum(mask))
    assert rel_err(got, want) < 1e-6
    assert rel_err(jax.grad(lambda h: chunked(h)[0])(h), jax.grad(lambda h: whole(h)[0])(h)) < 1e-5
    g_want = jax.grad(lambda a: whole(hidden_of(a))[0])(adapter)
    g_got = jax.grad(lambda a: chunked(hidden_of(a))[0])(adapter)
    for got_leaf, want_leaf in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        assert float(jnp.abs(want_leaf).max()) > 0
        assert rel_err(got_leaf, want_leaf) < 1e-5


def test_masked_padding_adds_nothing():
    """A chunk that overhangs the row pads with masked positions: a fully masked row, or a
    target whose mask is 0, changes neither the sum nor the gradient."""
    params = lj.init_params(CFG, jax.random.key(0), jnp.float32)
    h = jax.random.normal(jax.random.key(2), (2, 7, CFG.hidden_size))
    targets = jnp.asarray(np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 7)), jnp.int32)
    mask = jnp.ones((2, 7)).at[1].set(0.0)
    head = functools.partial(lm_head, params)
    total, count = chunked_cross_entropy(h, head, targets, mask, 8)  # 4 positions a chunk: 7 -> 8
    want, _ = token_cross_entropy(head(h[:1]), targets[:1], mask[:1])
    assert float(count) == 7 and rel_err(total, want) < 1e-6
    grad = jax.grad(lambda h: chunked_cross_entropy(h, head, targets, mask, 8)[0])(h)
    assert float(jnp.abs(grad[1]).max()) == 0.0 and float(jnp.abs(grad[0]).max()) > 0


def test_chunked_loss_refuses_bad_arguments():
    params = lj.init_params(CFG, jax.random.key(0), jnp.float32)
    head = functools.partial(lm_head, params)
    h, t, m = jnp.zeros((2, 4, CFG.hidden_size)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4))
    for chunk in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="loss_chunk must be an integer >= 1"):
            chunked_cross_entropy(h, head, t, m, chunk)
    with pytest.raises(ValueError, match="need hidden \\[B, T, d\\]"):
        chunked_cross_entropy(h, head, t[:, :3], m, 4)


def test_train_and_eval_steps_with_and_without_chunks():
    """Two optimizer steps (2 micro-batches, dropout) give the same losses, gradient norms and
    adapter whether the loss takes its logits whole or 10 tokens at a time (B 2, T 16)."""
    cfg, params, adapter = make_model(tied=False)
    oc = dataclasses.replace(OC, grad_accum=2)
    big = make_batch(4, 16, seed=3)
    batch = {k: jnp.asarray(v.reshape(2, 2, 16)) for k, v in big.items()}
    acfg = dataclasses.replace(ACFG, dropout=0.1)
    adapter = dataclasses.replace(adapter, config=acfg)
    runs = {}
    for loss_chunk in (None, 10):
        state, metrics = init_state(adapter, oc, 0), []
        for _ in range(2):
            state, m = train_step(state, params, batch, cfg=cfg, oc=oc, attention_chunk=8,
                                  loss_chunk=loss_chunk)
            metrics.append(m)
        runs[loss_chunk] = state, metrics
    (s0, m0), (s1, m1) = runs[None], runs[10]
    for a, b in zip(m0, m1):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-5)
        assert float(a["tokens"]) == float(b["tokens"])
    for x, y in zip(jax.tree.leaves(s0.adapter), jax.tree.leaves(s1.adapter)):
        assert rel_err(x, y) < 1e-5
    eval_batch = jax.tree.map(jnp.asarray, big)
    whole = eval_step(s0.adapter, params, eval_batch, cfg=cfg)
    chunked = eval_step(s0.adapter, params, eval_batch, cfg=cfg, loss_chunk=7)
    assert float(chunked["tokens"]) == float(whole["tokens"])
    assert rel_err(chunked["ce_sum"], whole["ce_sum"]) < 1e-6


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (tests/conftest.py: 8 on CPU)")
def test_chunked_step_on_an_fsdp_mesh_equals_one_device():
    """Rows split over ``data`` and ``fsdp``: each chunk takes every row, so the rows stay split;
    the step equals the unchunked one on one device."""
    params = lj.init_params(CFG, jax.random.key(0), jnp.float32)
    adapter = lj.init_adapter(CFG, ACFG, jax.random.key(1))
    batch = {k: v[None] for k, v in make_batch(8, 16, seed=4).items()}
    _, want = train_step(init_state(adapter, OC, 0), params, jax.tree.map(jnp.asarray, batch),
                                  cfg=CFG, oc=OC)
    state = init_state(adapter, OC, 0)
    placement = plan_placement(MeshConfig(data=2, fsdp=2), CFG, params, state, 8)
    _, got = placement.train_step(jax.device_put(state, placement.state),
                                          jax.device_put(params, placement.params),
                                          placement.put_batch(batch), cfg=CFG, oc=OC,
                                          loss_chunk=24)  # 3 positions a chunk: 16 -> 18
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    # Adam's first update is about lr * sign(g): compare the gradients through their norm.
    assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=1e-5)
    assert float(got["tokens"]) == float(want["tokens"])


def test_chunked_loss_compiles_to_less_memory():
    """The compiled step's temporaries: the whole ``[B, T, V]`` float32 logits (and their
    softmax and gradient) are gone with chunks (V 16384, 2 rows of 128 tokens: 16 MiB each)."""
    cfg = dataclasses.replace(CFG, vocab_size=16384, max_position_embeddings=128)
    params = jax.eval_shape(lambda: lj.init_params(cfg, jax.random.key(0), jnp.float32))
    state = jax.eval_shape(lambda: init_state(lj.init_adapter(cfg, ACFG, jax.random.key(1)), OC, 0))
    batch = jax.eval_shape(lambda: {k: jnp.asarray(v[None])
                                    for k, v in make_batch(2, 128, vocab=cfg.vocab_size).items()})

    def temp(loss_chunk):
        compiled = train_step.lower(state, params, batch, cfg=cfg, oc=OC,
                                    loss_chunk=loss_chunk).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits = 2 * 128 * cfg.vocab_size * 4
    whole, chunked = temp(None), temp(32)  # 16 positions a chunk: 2 MiB of logits
    print(f"temporaries: {whole / 2**20:.1f} MiB whole, {chunked / 2**20:.1f} MiB chunked")
    assert whole >= 2 * logits
    assert chunked < whole - 1.5 * logits


def test_cudnn_attention_refuses_segment_ids():
    """The fused attention cannot keep packed sequences apart: the step says so, naming the
    field, before anything runs (on any backend)."""
    params = lj.init_params(CFG, jax.random.key(0), jnp.float32)
    adapter = lj.init_adapter(CFG, ACFG, jax.random.key(1))
    batch = {k: jnp.asarray(v[None]) for k, v in make_batch(2, 16).items()}
    with pytest.raises(ValueError, match="attention_impl 'cudnn' cannot keep packed sequences "
                                         "apart, but the batch has segment_ids"):
        train_step(init_state(adapter, OC, 0), params, batch, cfg=CFG, oc=OC,
                   attention_impl="cudnn")
    with pytest.raises(ValueError, match="but the batch has segment_ids"):
        eval_step(adapter, params, {k: v[0] for k, v in batch.items()}, cfg=CFG,
                  attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        eval_step(adapter, params, {k: v[0] for k, v in batch.items()}, cfg=CFG,
                  attention_impl="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn attention needs a GPU")
def test_cudnn_step_matches_xla_on_a_gpu():
    """bf16 backbone, one sequence a row (no segment_ids): cudnn's loss and gradient norm are
    the xla attention's up to bf16 rounding."""
    cfg = dataclasses.replace(CFG, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    params = lj.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    adapter = lj.init_adapter(cfg, ACFG, jax.random.key(1))
    batch = {k: jnp.asarray(v[None]) for k, v in make_batch(2, 64).items() if k != "segment_ids"}
    batch["positions"] = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (1, 2, 64))
    out = {impl: train_step(init_state(adapter, OC, 0), params, batch, cfg=cfg, oc=OC,
                            attention_impl=impl, loss_chunk=32)[1] for impl in ("xla", "cudnn")}
    assert float(out["cudnn"]["loss"]) == pytest.approx(float(out["xla"]["loss"]), rel=1e-2)
    assert float(out["cudnn"]["grad_norm"]) == pytest.approx(float(out["xla"]["grad_norm"]),
                                                             rel=5e-2)


def test_config_fields_and_errors(tmp_path):
    tc = load_train_config(None, [f"out_dir={tmp_path}"])
    assert tc.attention_impl == "xla" and tc.loss_chunk is None  # the defaults
    tc = load_train_config(None, [f"out_dir={tmp_path}", "attention_impl=cudnn", "data.pack=false",
                                  "loss_chunk=null"])
    assert tc.attention_impl == "cudnn" and tc.loss_chunk is None
    for overrides, message in (
        (["attention_impl=flash"],
         "attention_impl must be one of \\('xla', 'cudnn'\\), got 'flash'"),
        (["attention_impl=cudnn"], "attention_impl 'cudnn' cannot keep packed sequences apart: "
                                   "set data.pack=false"),
        (["loss_chunk=0"], "loss_chunk must be an integer >= 1 or null, got 0"),
        (["loss_chunk=2.5"], "loss_chunk must be an integer or null"),
        (["loss_chunk=true"], "loss_chunk must be an integer or null"),
    ):
        with pytest.raises(ConfigFileError, match=message):
            load_train_config(None, [f"out_dir={tmp_path}", *overrides])


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU's refusal")
def test_loop_gives_cudnn_unpacked_rows_without_segment_ids(tmp_path):
    """With ``data.pack`` false the loop drops the rows' ``segment_ids`` (they mark only the
    trailing padding), so on a CPU the step stops at cudnn's need for a GPU, not at packing."""
    from loraswitch_jax.train.loop import train

    tc = load_train_config(None, [f"out_dir={tmp_path}", "data.seq_len=32", "data.batch_size=4",
                                  "optim.steps=1", "optim.warmup_steps=0", "attention_impl=cudnn",
                                  "data.pack=false"])
    with pytest.raises(ValueError, match="'cudnn' cannot run here: it needs a GPU"):
        train(tc, progress=False)
