"""The SGMM switch-merge kernel (interpret mode) against its jnp reference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import rel_err
from tests.pallas.gpu_target import lower_for_gpu
from tests.pallas.interpret import F32_TOL, INTERPRET
from loraswitch_jax.pallas.switch_merge import (
    BlockSizes,
    default_block_sizes,
    supports,
    switch_merge,
    switch_merge_reference,
)

TOL = {jnp.float32: F32_TOL, jnp.bfloat16: 1e-2}


def operands(L, K, N, E, r, first_layer, w_dtype, ad_dtype, seed):
    """Random base ``[L, K, N]`` and experts with a delta of the order of the base (numpy draws:
    no eager jax ops to compile)."""
    rng = np.random.RandomState(seed)
    la = L - first_layer
    w_base = jnp.asarray(rng.standard_normal((L, K, N)), w_dtype)
    a = jnp.asarray(rng.standard_normal((la, E, K, r)) / np.sqrt(r), ad_dtype)
    b = jnp.asarray(rng.standard_normal((la, E, r, N)), ad_dtype)
    return w_base, a, b


def poisoned(w_base, first_layer):
    """A working copy full of NaN: any element the kernel fails to write shows."""
    shape = (w_base.shape[0] - first_layer, *w_base.shape[1:])
    return jnp.asarray(np.full(shape, np.nan, w_base.dtype))


reference = jax.jit(switch_merge_reference, static_argnames="first_layer")


# (L, K, N, E, r, first_layer, expert_ids, gates, block_sizes); every route holds E-1.
CASES = [
    # K, N not powers of two, tiled by 16; 3 row steps per program.
    (3, 48, 80, 8, 16, 1, [7, 2], [0.6, -0.4],
     BlockSizes(block_n=16, block_k=16, split_k=1)),
    # 128 experts, k = 1, all layers adapted, K split over two programs.
    (2, 64, 32, 128, 32, 0, [127], [1.5], BlockSizes(block_n=32, block_k=16, split_k=2)),
    # rank 48 (three dots of inner size 16), k = 3, default blocks.
    (4, 32, 64, 8, 48, 2, [3, 7, 0], [0.5, 0.3, 0.2], None),
]


@pytest.mark.parametrize("case,w_dtype,ad_dtype", [
    *((case, dtype, dtype) for case in range(len(CASES)) for dtype in (jnp.float32, jnp.bfloat16)),
    (0, jnp.float32, jnp.bfloat16),  # adapters cast to the weight dtype inside the kernel
    (0, jnp.bfloat16, jnp.float32),
])
def test_matches_reference(case, w_dtype, ad_dtype):
    L, K, N, E, r, first_layer, ids, gates, bs = CASES[case]
    w_base, a, b = operands(L, K, N, E, r, first_layer, w_dtype, ad_dtype, seed=case)
    ids, gates = jnp.array(ids, jnp.int32), jnp.array(gates, jnp.float32)
    got = switch_merge(w_base, poisoned(w_base, first_layer), a, b, ids, gates,
                       first_layer=first_layer, block_sizes=bs, interpret=INTERPRET)
    want = reference(w_base, a, b, ids, gates, first_layer=first_layer)
    assert got.shape == (L - first_layer, K, N) and got.dtype == w_dtype
    assert np.isfinite(np.asarray(got, np.float32)).all(), "some elements were not written"
    assert rel_err(got, want) < TOL[w_dtype]


def test_reference_is_base_plus_routed_delta():
    """The spec itself, spelled out with numpy for one layer and two experts."""
    w_base, a, b = operands(3, 16, 32, 4, 16, 1, jnp.float32, jnp.float32, seed=5)
    ids, gates = jnp.array([3, 1], jnp.int32), jnp.array([0.7, 0.2], jnp.float32)
    got = reference(w_base, a, b, ids, gates, first_layer=1)
    w, a, b = (np.asarray(x, np.float64) for x in (w_base, a, b))
    want = w[2] + 0.7 * a[1, 3] @ b[1, 3] + 0.2 * a[1, 1] @ b[1, 1]
    assert rel_err(got[1], want) < F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_many_switches_do_not_drift(dtype):
    """1000 random switches, w_work carried through one jitted loop, equal one fresh merge of
    the last route bit for bit (where ``W += d_new - d_old`` would drift)."""
    L, K, N, E, r, first_layer, k = 3, 32, 32, 8, 16, 1, 2
    w_base, a, b = operands(L, K, N, E, r, first_layer, dtype, dtype, seed=7)
    bs = BlockSizes(block_n=16, block_k=16, split_k=1)
    scale = 2.0  # alpha / r folded into the gates

    def route(i):
        kid, kg = jax.random.split(jax.random.fold_in(jax.random.key(11), i))
        ids = jax.random.choice(kid, E, (k,), replace=False).astype(jnp.int32)
        return ids, scale * jax.nn.softmax(jax.random.normal(kg, (k,)))

    def switch(w_work, i):
        ids, gates = route(i)
        return switch_merge(w_base, w_work, a, b, ids, gates, first_layer=first_layer,
                            block_sizes=bs, interpret=INTERPRET)

    run = jax.jit(lambda w: jax.lax.fori_loop(0, 1000, lambda i, w: switch(w, i), w),
                  donate_argnums=0)
    got = run(poisoned(w_base, first_layer))
    fresh, ids, gates = jax.jit(lambda w: (switch(w, 999), *route(999)))(
        poisoned(w_base, first_layer))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(fresh, np.float32))
    want = reference(w_base, a, b, ids, gates, first_layer=first_layer)
    assert rel_err(got, want) < TOL[dtype]


def test_whole_model_working_copy_keeps_unadapted_layers():
    """A ``[L, K, N]`` working copy: layers from first_layer on are merged, earlier ones kept."""
    L, first_layer = 3, 1
    w_base, a, b = operands(L, 32, 48, 8, 16, first_layer, jnp.float32, jnp.float32, seed=4)
    ids, gates = jnp.array([7, 2], jnp.int32), jnp.array([0.6, 0.4], jnp.float32)
    work = jnp.asarray(np.full(w_base.shape, np.nan, np.float32)).at[0].set(w_base[0])
    got = switch_merge(w_base, work, a, b, ids, gates, first_layer=first_layer, interpret=INTERPRET)
    assert got.shape == w_base.shape
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(w_base[0]))
    want = reference(w_base, a, b, ids, gates, first_layer=first_layer)
    assert rel_err(got[first_layer:], want) < TOL[jnp.float32]


def test_write_flag_false_leaves_the_working_copy():
    """A repeated route is skipped inside the kernel (no cond around it): nothing is written."""
    w_base, a, b = operands(2, 32, 48, 4, 16, 0, jnp.float32, jnp.float32, seed=12)
    ids, gates = jnp.array([3, 0], jnp.int32), jnp.array([0.9, 0.1], jnp.float32)
    merge = jax.jit(lambda w_work, write: switch_merge(
        w_base, w_work, a, b, ids, gates, first_layer=0, write=write, interpret=INTERPRET))
    work = jnp.full(w_base.shape, 7.0, jnp.float32)
    np.testing.assert_array_equal(np.asarray(merge(work, False)), np.asarray(work))
    want = reference(w_base, a, b, ids, gates, first_layer=0)
    assert rel_err(merge(work, True), want) < F32_TOL


def test_donated_working_copy():
    w_base, a, b = operands(2, 32, 48, 4, 16, 0, jnp.bfloat16, jnp.bfloat16, seed=3)
    ids, gates = jnp.array([3, 0], jnp.int32), jnp.array([0.9, 0.1], jnp.float32)
    merge = jax.jit(lambda w_work, ids, gates: switch_merge(
        w_base, w_work, a, b, ids, gates, first_layer=0, interpret=INTERPRET), donate_argnums=0)
    got = merge(poisoned(w_base, 0), ids, gates)
    want = reference(w_base, a, b, ids, gates, first_layer=0)
    assert rel_err(got, want) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("w_dtype,rank", [(jnp.bfloat16, 64), (jnp.float32, 48)])
def test_triton_lowering_is_one_aliased_launch(w_dtype, rank):
    """Lowered for CUDA (no GPU needed): Triton accepts the tiles of a Llama-2-7B projection
    with 128 experts, w_work (operand 6, after the write flag) is the output's buffer, and no
    other op touches W."""
    L, K, N, E, k, first_layer = 32, 4096, 11008, 128, 2, 4
    la = L - first_layer
    args = (jax.ShapeDtypeStruct((L, K, N), w_dtype), jax.ShapeDtypeStruct((la, K, N), w_dtype),
            jax.ShapeDtypeStruct((la, E, K, rank), jnp.bfloat16),
            jax.ShapeDtypeStruct((la, E, rank, N), jnp.bfloat16),
            jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.float32))
    merge = jax.jit(lambda *xs: switch_merge(*xs, first_layer=first_layer), donate_argnums=1)
    text = lower_for_gpu(merge, *args).as_text()
    text = re.sub(r'ir = "[^"]*"', "ir = ...", text)  # drop the serialized Triton module
    ops = [op for op in re.findall(r"= stablehlo\.(\w+)", text) if op != "constant"]
    assert ops == ["custom_call"]
    assert "switch_merge_n" in text
    assert re.search(r"output_operand_alias<output_tuple_indices = \[\], operand_index = 6,", text)


def test_traced_out_of_range_ids_are_clamped():
    """Bad ids cannot be checked under jit; they are clamped as in the reference, never read
    outside the experts."""
    w_base, a, b = operands(2, 16, 16, 4, 16, 0, jnp.float32, jnp.float32, seed=4)
    ids, gates = jnp.array([9, -3], jnp.int32), jnp.array([0.5, 0.5], jnp.float32)
    got = jax.jit(lambda ids: switch_merge(w_base, poisoned(w_base, 0), a, b, ids, gates,
                                           first_layer=0, interpret=INTERPRET))(ids)
    clamped = jnp.array([3, 0], jnp.int32)
    want = reference(w_base, a, b, clamped, gates, first_layer=0)
    assert rel_err(got, want) < TOL[jnp.float32]


@pytest.mark.parametrize("la,k,n,r", [(32, 4096, 4096, 16), (32, 4096, 11008, 64),
                                      (32, 11008, 4096, 128), (1, 4096, 1024, 16),
                                      (2, 48, 80, 48)])
def test_default_block_sizes_tile(la, k, n, r):
    bs = default_block_sizes(la, k, n, r)
    assert n % bs.block_n == 0 and k % (bs.block_k * bs.split_k) == 0


def test_supports():
    assert supports(4096, 11008, 16) and supports(48, 80, 48)
    assert not supports(4096, 4096, 8) and not supports(40, 4096, 16)
    assert not supports(4096, 4100, 16)


# Each bad argument alone, keyed by a fragment its error message must hold.
BAD_INPUTS = {
    "expected w_work": lambda w_base, a, b: dict(w_work=poisoned(w_base, 0)[:, :16]),
    "w_work.dtype": lambda w_base, a, b: dict(w_work=poisoned(w_base, 1).astype(jnp.bfloat16)),
    "first_layer=3": lambda w_base, a, b: dict(first_layer=3),
    "expected w_base": lambda w_base, a, b: dict(w_base=w_base[0]),
    "w_base.dtype": lambda w_base, a, b: dict(w_base=w_base.astype(jnp.int8)),
    "a and b must be floating": lambda w_base, a, b: dict(b=b.astype(jnp.int8)),
    "expected a": lambda w_base, a, b: dict(a=a[:, :, :16]),
    "expected b": lambda w_base, a, b: dict(b=b[:, :3]),
    "1 <= k <= E": lambda w_base, a, b: dict(expert_ids=jnp.arange(5, dtype=jnp.int32),
                                             gates=jnp.ones(5)),
    "must be int32": lambda w_base, a, b: dict(expert_ids=np.array([3, 1], np.int64)),
    "gates must match": lambda w_base, a, b: dict(gates=jnp.ones(3)),
    "out of range": lambda w_base, a, b: dict(expert_ids=jnp.array([4, 0], jnp.int32)),
    "multiples of 16": lambda w_base, a, b: dict(a=a[..., :8], b=b[:, :, :8]),
    "does not tile": lambda w_base, a, b: dict(
        block_sizes=BlockSizes(block_n=64, block_k=16, split_k=1)),
}


@pytest.mark.parametrize("message", list(BAD_INPUTS))
def test_rejects_bad_input(message):
    w_base, a, b = operands(3, 32, 32, 4, 16, 1, jnp.float32, jnp.float32, seed=6)
    good = dict(w_base=w_base, w_work=poisoned(w_base, 1), a=a, b=b, first_layer=1,
                expert_ids=jnp.array([3, 1], jnp.int32), gates=jnp.array([0.5, 0.5]))
    switch_merge(**good, interpret=INTERPRET)  # the baseline is accepted
    with pytest.raises(ValueError, match=re.escape(message)):
        switch_merge(**{**good, **BAD_INPUTS[message](w_base, a, b)}, interpret=INTERPRET)
