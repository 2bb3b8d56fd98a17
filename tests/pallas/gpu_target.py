"""Lowering for an NVIDIA GPU on a machine without one, on JAX 0.10 and 0.11.

JAX 0.11's Triton lowering reads the GPU's compute capability from the abstract device of the
context's abstract mesh when no GPU is attached (0.10 fell back to 9.0 by itself), and a jitted
function takes that mesh when it is traced, so both the trace and the lowering run under it.
"""

from __future__ import annotations

import re

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

__all__ = ["GPU_KIND", "lower_for_gpu", "triton_kernels"]

# Compute capability 9.0: the GPU image's H200, and the capability JAX 0.10 assumes without a GPU.
GPU_KIND = "NVIDIA H200"
# One explicit axis of size 1: jit takes a context mesh only when it has an explicit axis.
_MESH = AbstractMesh((1,), ("gpu",), (AxisType.Explicit,),
                     abstract_device=AbstractDevice(device_kind=GPU_KIND, num_cores=None,
                                                    platform="gpu"))


def lower_for_gpu(jitted, *args, **kwargs) -> jax.stages.Lowered:
    """``jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))`` for a ``GPU_KIND``.

    Args:
        jitted: a ``jax.jit``-wrapped function.
        *args: its arguments (arrays or ``jax.ShapeDtypeStruct``s).
        **kwargs: its keyword arguments (static ones included).

    Returns:
        The lowered computation, every Pallas kernel in it lowered to Triton.
    """
    with use_abstract_mesh(_MESH):
        return jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))


def triton_kernels(text: str) -> list[str]:
    """The names of the Triton kernels a lowered module's text calls, in order.

    Read from each custom call's ``name`` after its serialized Triton module, whose source
    locations (JAX 0.11) can name files of other kernels, so a plain substring test misleads.
    """
    return re.findall(r'ir = "[^"]*", name = "(\w+)"', text)
