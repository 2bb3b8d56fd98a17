"""The one place where model code meets kernels: ``impl`` picks XLA or a Pallas kernel.

Model code calls these functions with stacked weights and a layer index; it never imports
``loraswitch_jax.pallas`` itself, so kernel backends can change without touching the model.

``impl`` is a name or an :class:`Impl`:
  * ``"xla"``: slices the layer (static index: read in place outside loops) and lets XLA fuse;
    an adapter's term is the jnp product ``adapters.lora_delta`` added after the projection.
  * ``"pallas"``: Triton kernels that read ``w[layer]`` in place, also inside ``while_loop``
    and ``scan`` (where XLA copies each slice first; DESIGN.md §2). With an adapter the routed
    kernels add ``(x A) B`` inside the projection's own launch: the expand (``B``) rides along
    with ``W``; the small shrink (``x A``) is one split launch per input group, and the down
    projection's is computed in the gate/up kernel's epilogue. Decode attends with the
    decode-attention kernel; with ``Impl(shrink_ahead=True)`` and gather slots it also computes
    the o projection's shrink (:func:`cached_attention_shrink_ahead`), and o's routed kernel
    adds the residual and computes gate's and up's (:func:`residual_linear_shrink_ahead`); not
    yet timed on a GPU, so off by default. These paths were measured fastest: ``pallas/tuned.py``.
  * ``"pallas_interpret"``: the Pallas kernels in interpret mode (CPU tests).
  * ``"auto"``: ``"pallas"`` on a GPU, ``"xla"`` elsewhere.
"""

from loraswitch_jax.ops.operands import IMPLS, Impl, LoraTerm, resolve_impl, shared_slots
from loraswitch_jax.ops.projections import (cached_attention, mlp, qkv_linear, stacked_linear,
                                            swiglu, switch_merge)
from loraswitch_jax.ops.shrink_ahead import (cached_attention_shrink_ahead,
                                             mlp_residual_shrink_ahead,
                                             residual_linear_shrink_ahead)

__all__ = ["IMPLS", "Impl", "LoraTerm", "cached_attention", "cached_attention_shrink_ahead", "mlp",
           "mlp_residual_shrink_ahead", "qkv_linear", "residual_linear_shrink_ahead",
           "resolve_impl", "shared_slots", "stacked_linear", "swiglu", "switch_merge"]
