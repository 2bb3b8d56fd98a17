"""The kernel block-size sweep's pieces on a CPU: its config, grids and loop harnesses (a whole
``--small`` sweep takes minutes in interpret mode; it is run by hand)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraswitch_jax.eval.bench import kernel_sweep
from loraswitch_jax.eval.bench.kernel_groups import Group, coarse_grid, feed, groups, in_loop


def test_config():
    cfg = kernel_sweep.parse_args(["--harness", "unrolled", "--out", "d", "--small"])
    assert (cfg.harness, cfg.layers, cfg.stem) == ("unrolled", 4, "d/sweep_unrolled")
    assert kernel_sweep.SweepConfig().layers == 32
    with pytest.raises(ValueError, match="harness"):
        kernel_sweep.SweepConfig(harness="scan")
    with pytest.raises(ValueError, match="positive"):
        kernel_sweep.SweepConfig(budget=0)


@pytest.mark.parametrize("group", groups(small=False), ids=lambda g: g.name)
def test_coarse_grid_tiles_the_shapes(group):
    grid = coarse_grid(group, mp=16)
    assert grid
    for bs in grid:
        assert all(n % bs.block_n == 0 for n in group.ns)
        assert group.k % (bs.block_k * bs.split_k) == 0


def test_harnesses_agree():
    """``loop`` (one layer per iteration) and ``unrolled`` (all layers per iteration) run the
    same ``passes * L`` calls in the same order."""
    group = Group("o", 8, (8,))
    ws = (jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8)) * 0.1, jnp.float32),)
    x = jnp.ones((1, 8), jnp.float32)

    def op(x, ws, layer):
        return [x @ ws[0][layer]]

    got = {h: jax.jit(in_loop(op, 3, 2, h))(x, ws) for h in ("loop", "unrolled")}
    want = x
    for _ in range(2):
        for layer in range(3):
            want = feed(want, op(want, ws, layer))
    for h, y in got.items():
        np.testing.assert_allclose(y, want, rtol=1e-6, err_msg=h)
    assert group.weight_bytes == 2 * 8 * 8
    with pytest.raises(ValueError, match="harness"):
        in_loop(op, 3, 2, "scan")
