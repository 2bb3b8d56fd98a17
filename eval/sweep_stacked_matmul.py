"""Exploration: Pallas stacked GEMV vs XLA, inside a device loop (7B shapes)."""
import itertools, os, time, sys
import jax, jax.numpy as jnp, numpy as np
from loraswitch_jax.pallas.stacked_matmul import stacked_matmul, BlockSizes

L = int(os.environ.get("L", 32)); M = int(os.environ.get("M", 1)); R = 4
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)] if not os.environ.get("SMALL") else [(256, 256), (256, 688), (688, 256)]
BW = float(os.environ.get("BW", 2.55e12))

def timeit(f, *a, reps=5):
    jax.block_until_ready(f(*a)); ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

def loop_over_layers(mm):
    # R passes over all L layers inside a fori_loop: the layer index is data, as in decode.
    @jax.jit
    def run(x, w):
        def body(i, x):
            y = mm(x, w, i % L)
            return x + 1e-3 * y[:, : x.shape[1]].astype(x.dtype) if y.shape[1] >= x.shape[1] else x + 1e-3 * jnp.sum(y)
        return jax.lax.fori_loop(0, R * L, body, x)
    return run

def xla_unrolled_in_loop(x, w):
    def body(i, x):
        for l in range(L):
            y = x @ w[l]
            x = x + 1e-3 * (y[:, : x.shape[1]] if y.shape[1] >= x.shape[1] else jnp.sum(y))
        return x
    return jax.lax.fori_loop(0, R, body, x)

def xla_single(x, w):
    for l in range(L):
        y = x @ w[l]
        x = x + 1e-3 * (y[:, : x.shape[1]] if y.shape[1] >= x.shape[1] else jnp.sum(y))
    return x

results = {}
for K, N in SHAPES:
    w = (jax.random.normal(jax.random.key(0), (L, K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (M, K), jnp.bfloat16)
    nbytes = K * N * 2
    def rep(name, secs):
        us = secs * 1e6
        print(f"K={K:6d} N={N:6d} {name:40s} {us:8.1f} us/matmul  {nbytes/secs/1e12:5.2f} TB/s  frac {nbytes/BW/secs:.3f}", flush=True)
        return us
    rep("xla single-jit unrolled", timeit(jax.jit(xla_single), x, w) / L)
    rep("xla unrolled in fori_loop", timeit(jax.jit(xla_unrolled_in_loop), x, w) / (R * L))
    best = None
    for bn, bk, sk, nw, ns in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (4,), (3,)):
        if N % bn or K % (bk * sk) or (K // (bk * sk)) < 1:
            continue
        if (N // bn) * sk < 66 or (N // bn) * sk > 1400:
            continue
        bs = BlockSizes(block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=ns)
        try:
            f = loop_over_layers(lambda x, w, l, bs=bs: stacked_matmul(x, w, l, block_sizes=bs))
            us = timeit(f, x, w, reps=3) / (R * L) * 1e6
        except Exception as e:
            print("fail", bs, str(e)[-300:]); continue
        if best is None or us < best[0]:
            best = (us, bs)
    if best: print(f"K={K:6d} N={N:6d} best pallas {best[0]:.1f} us {nbytes/best[0]/1e6:.2f} TB/s frac {nbytes/BW/(best[0]*1e-6):.3f} {best[1]}", flush=True)
    del w
