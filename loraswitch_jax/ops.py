"""The one place where model code meets kernels: ``impl`` picks XLA or a Pallas kernel.

Model code calls these functions with stacked weights and a layer index; it never imports
``loraswitch_jax.pallas`` itself, so kernel backends can change without touching the model.

Implementations:
  * ``"xla"``: slices the layer (static index: read in place outside loops) and lets XLA fuse.
  * ``"pallas"``: Triton kernels that read ``w[layer]`` in place, also inside ``while_loop``
    and ``scan`` (where XLA copies each slice first; DESIGN.md §2).
  * ``"pallas_interpret"``: the Pallas kernels in interpret mode (CPU tests).
  * ``"auto"``: ``"pallas"`` on a GPU, ``"xla"`` elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loraswitch_jax.adapters import lora_delta
from loraswitch_jax.router import Route

__all__ = ["IMPLS", "adapter_delta", "qkv_linear", "resolve_impl", "stacked_linear", "swiglu"]

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def stacked_linear(
    x: jax.Array, w: jax.Array, layer: int | jax.Array, bias: jax.Array | None, impl: str
) -> jax.Array:
    """``x [..., K] @ w[layer] (+ bias[layer])`` for a stacked ``w [L, K, N]``, in ``x.dtype``."""
    from loraswitch_jax.pallas import stacked_matmul as kernel

    if impl == "xla" or not kernel.supports(*w.shape[1:]):
        # Shapes the kernel cannot tile (not multiples of 16) take the XLA path.
        y = jnp.einsum("...k,kn->...n", x, w[layer].astype(x.dtype))
    else:
        flat = x.reshape(-1, x.shape[-1])
        y = kernel.stacked_matmul(flat, w, layer, interpret=impl == "pallas_interpret")
        y = y.reshape(*x.shape[:-1], w.shape[-1])
    return y if bias is None else y + bias[layer].astype(y.dtype)


def adapter_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    adapted_layer: int | jax.Array,
    route: Route,
    scale: float,
    impl: str,
) -> jax.Array:
    """The routed LoRA term for ``x [B, T, d_in]`` with stacked experts ``a [La, E, d_in, r]``,
    ``b [La, E, r, d_out]`` at ``adapted_layer``; every token has its own route ``[B, T, k]``."""
    del impl  # one jnp path for now; kernels plug in here
    return lora_delta(x, a[adapted_layer], b[adapted_layer], route, scale)


def qkv_linear(
    x: jax.Array, w: tuple[jax.Array, jax.Array, jax.Array], layer: int | jax.Array,
    b: tuple[jax.Array | None, ...], impl: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v`` projections of ``x [..., d]``; one fused kernel launch under Pallas."""
    from loraswitch_jax.pallas import fused_projections as kernel

    wq, wk, wv = w
    if impl == "xla" or not kernel.supports(wq.shape[1], wq.shape[2], wk.shape[2]):
        return tuple(stacked_linear(x, wi, layer, bi, impl) for wi, bi in zip(w, b))
    flat = x.reshape(-1, x.shape[-1])
    q, k, v = kernel.qkv_matmul(flat, wq, wk, wv, layer, *b, interpret=impl == "pallas_interpret")
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in (q, k, v))


def swiglu(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, layer: int | jax.Array,
    b_gate: jax.Array | None, b_up: jax.Array | None, impl: str,
) -> jax.Array:
    """``silu(x W_gate + b) * (x W_up + b)`` in float32, returned in ``x.dtype``; one fused
    kernel launch under Pallas (both weights streamed by the same programs)."""
    from loraswitch_jax.pallas import fused_projections as kernel

    if impl == "xla" or not kernel.supports(w_gate.shape[1], w_gate.shape[2]):
        gate = stacked_linear(x, w_gate, layer, b_gate, impl)
        up = stacked_linear(x, w_up, layer, b_up, impl)
        return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    act = kernel.gate_up_matmul(flat, w_gate, w_up, layer, b_gate, b_up,
                                interpret=impl == "pallas_interpret")
    return act.reshape(*x.shape[:-1], act.shape[-1])
