"""One switch for every kernel test: interpret mode on CPUs (the default), the compiled Triton
kernels on a GPU with ``LORASWITCH_TEST_GPU=1`` (jax's ``INTERPRET`` pattern for Pallas tests)."""

from __future__ import annotations

import os

__all__ = ["IMPL", "INTERPRET"]

INTERPRET = os.environ.get("LORASWITCH_TEST_GPU") != "1"
# The ops-level name of the same choice (``ops.resolve_impl``).
IMPL = "pallas_interpret" if INTERPRET else "pallas"
