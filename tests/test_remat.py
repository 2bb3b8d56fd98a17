"""Remat of the layers: every policy gives the gradients of no remat, and "full" needs less
scratch memory than "none"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax.llama import REMAT_POLICIES
from tests.helpers import make_adapter, random_params, rel_err

CFG = lj.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _loss_grad(cfg, params, tokens, *, remat, scan_layers=True, segment_ids=None, chunk=512):
    def loss(adapter):
        logits = lj.forward(params, tokens, cfg, adapter=adapter, remat=remat,
                            scan_layers=scan_layers, segment_ids=segment_ids,
                            attention_chunk=chunk, dropout_key=jax.random.key(7))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.grad(loss))


# Unrolled layers under remat: tests/train/test_fsdp.py (layerwise, dots, against no remat).
@pytest.mark.parametrize("mode, scan_layers", [("switch", True)])
def test_every_policy_gives_the_gradients_of_no_remat(mode, scan_layers):
    params = random_params(CFG, 0, jnp.float32)
    adapter = make_adapter(CFG, seed=1, mode=mode, num_experts=4, top_k=2, dropout=0.1)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, CFG.vocab_size, (2, 24)), jnp.int32)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], 8, axis=1).repeat(2, axis=0), jnp.int32)
    # chunk 8 < 24: the blockwise attention runs inside the rematerialised layers too.
    want = _loss_grad(CFG, params, tokens, remat="none", scan_layers=scan_layers,
                      segment_ids=seg, chunk=8)(adapter)
    for remat in ("dots", "full"):
        got = _loss_grad(CFG, params, tokens, remat=remat, scan_layers=scan_layers,
                         segment_ids=seg, chunk=8)(adapter)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert rel_err(g, w) < 1e-6, remat


def test_full_remat_shrinks_the_compiled_train_steps_scratch():
    """``temp_size_in_bytes`` of the compiled train step (abstract shapes: nothing allocated)."""
    from loraswitch_jax.train.step import OptimConfig, init_state, train_step

    cfg = lj.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    oc = OptimConfig()
    params = jax.eval_shape(lambda: lj.init_params(cfg, jax.random.key(0), jnp.float32))
    acfg = lj.AdapterConfig(mode="switch", rank=4, alpha=8.0, num_experts=4, top_k=2)
    state = jax.eval_shape(lambda: init_state(lj.init_adapter(cfg, acfg, jax.random.key(1)), oc, 0))
    batch = {k: jax.ShapeDtypeStruct((1, 2, 256), dt) for k, dt in (
        ("tokens", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32),
        ("segment_ids", jnp.int32), ("positions", jnp.int32))}

    def temp(remat):
        compiled = train_step.lower(state, params, batch, cfg=cfg, oc=oc, remat=remat).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    sizes = {remat: temp(remat) for remat in REMAT_POLICIES}
    print({k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()})
    assert sizes["full"] < 0.5 * sizes["none"], sizes
    assert sizes["dots"] < sizes["none"], sizes


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown remat 'some'"):
        lj.forward(random_params(CFG, 0, jnp.float32), jnp.zeros((1, 4), jnp.int32), CFG,
                   remat="some")
