"""Checks of indices passed to the Pallas kernels as data (private to ``pallas``).

Only concrete indices can be checked; traced ones must be in range: they are not clamped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_adapted",
    "check_experts",
    "check_layer",
    "check_slots",
    "is_concrete",
]


def is_concrete(a) -> bool:
    """Whether ``a`` has values now (not a tracer)."""
    return not isinstance(a, jax.core.Tracer)


def check_layer(layer, num_layers: int) -> None:
    """A concrete ``layer`` indexes one of ``num_layers`` stacked layers."""
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for {num_layers} stacked layers")


def check_experts(ids: np.ndarray, num_experts: int, name: str) -> None:
    """Expert indices ``ids`` (named ``name`` in the error) are in ``[0, num_experts)``."""
    if ids.size and not (0 <= ids.min() and ids.max() < num_experts):
        raise ValueError(f"{name} must be in [0, {num_experts}), got values in "
                         f"[{ids.min()}, {ids.max()}]")


def check_adapted(adapted_layer, slot_experts, stacked: tuple[int, int]) -> None:
    """``adapted_layer`` and ``slot_experts`` in range of a ``[La, E, ...]`` stack, if concrete."""
    if isinstance(adapted_layer, (int, np.integer)) and not 0 <= adapted_layer < stacked[0]:
        raise ValueError(f"adapted_layer {adapted_layer} out of range for {stacked[0]} adapted "
                         f"layers")
    if is_concrete(slot_experts):
        check_experts(np.asarray(slot_experts), stacked[1], "slot_experts")


def check_slots(slot_experts, slot_weights=None, num_rows: int | None = None) -> None:
    """``slot_experts [S]`` integers and, when given, ``slot_weights [M = num_rows, S]``."""
    if slot_experts.ndim != 1 or not jnp.issubdtype(slot_experts.dtype, jnp.integer):
        raise ValueError(f"expected slot_experts [S] integers, got shape {slot_experts.shape} "
                         f"and dtype {slot_experts.dtype}")
    if slot_weights is not None and slot_weights.shape != (num_rows, slot_experts.shape[0]):
        raise ValueError(f"expected slot_weights [M, S] = {(num_rows, slot_experts.shape[0])}, "
                         f"got {slot_weights.shape}")
