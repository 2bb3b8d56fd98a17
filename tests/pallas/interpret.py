"""One switch for every kernel test: interpret mode on CPUs (the default), the compiled Triton
kernels on a GPU with ``LORASWITCH_TEST_GPU=1`` (jax's ``INTERPRET`` pattern for Pallas tests)."""

from __future__ import annotations

import os

__all__ = ["F32_TOL", "IMPL", "INTERPRET"]

INTERPRET = os.environ.get("LORASWITCH_TEST_GPU") != "1"
# The ops-level name of the same choice (``ops.resolve_impl``).
IMPL = "pallas_interpret" if INTERPRET else "pallas"
# float32 kernel-vs-reference tolerance: on the GPU both the kernels' and XLA's float32 dots run
# on TF32 tensor cores (10-bit mantissa; 2e-4 to 2e-3 relative seen on an H200), not in interpret mode.
F32_TOL = 1e-5 if INTERPRET else 5e-3
