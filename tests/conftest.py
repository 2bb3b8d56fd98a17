"""Shared fixtures: tiny random Hugging Face Llama models saved with ``save_pretrained``
(``tests/hf_models.py``), their folders and the float32 params loaded from them, built once per
session."""

from __future__ import annotations

import dataclasses
import os

# Every test process sees 8 CPU host devices, so the mesh tests run in it; the others use the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# Tiny models: compiling dominates and LLVM's optimisation passes are most of it (the suite takes
# about a third less CPU without them); subprocesses inherit the flag.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from tests.helpers import CASES, VOCAB, require


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    path: str  # folder written by transformers' save_pretrained
    hf: object  # transformers.LlamaForCausalLM (torch and transformers are imported on first use)
    params: lj.LlamaParams  # float32, loaded from `path`
    cfg: lj.LlamaConfig


_CASES: dict[str, Case] = {}


def _get_case(name: str, tmp_path_factory) -> Case:
    if name not in _CASES:
        require("torch")  # a test built on the reference models skips without torch
        require("transformers")
        from tests.hf_models import build_hf_model

        model = build_hf_model(name)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        params, cfg = lj.load_params(path, dtype=jnp.float32)
        _CASES[name] = Case(name=name, path=str(path), hf=model, params=params, cfg=cfg)
    return _CASES[name]


@pytest.fixture(scope="session", params=CASES)
def case(request, tmp_path_factory) -> Case:
    """Each case in turn."""
    return _get_case(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def llama3_case(tmp_path_factory) -> Case:
    """The grouped-query, llama3-RoPE, untied, biased case alone."""
    return _get_case("gqa_llama3", tmp_path_factory)


@pytest.fixture(scope="session")
def tokens() -> np.ndarray:
    """``[2, 40]`` random token ids; 40 positions reach past the llama3 case's original context."""
    return np.random.RandomState(0).randint(0, VOCAB, (2, 40)).astype(np.int32)


@pytest.fixture(scope="session")
def prompts() -> list[np.ndarray]:
    """Three prompts of different lengths (one compiled width for the batch, two for singles)."""
    rng = np.random.RandomState(1)
    return [rng.randint(3, VOCAB, n).astype(np.int32) for n in (12, 5, 9)]


# XLA:CPU maps memory for every program it compiles (about three mappings each); a worker that
# ran thousands of tests reached the kernel's limit (vm.max_map_count, 65530) and crashed inside
# a compile. Past this many mappings, JAX's caches of compiled programs are dropped.
_MAX_MAPPINGS = 20_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to keep under
        return 0


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After a test module, drops JAX's compiled programs if the process maps too much memory
    (:data:`_MAX_MAPPINGS`); below that, later modules keep reusing them."""
    yield
    if _mappings() > _MAX_MAPPINGS:
        jax.clear_caches()
