"""Shared fixtures: tiny random Hugging Face Llama models saved with ``save_pretrained``.

Two cases cover the config space the library claims (DESIGN.md §6):

* ``mha``: 4 heads, 4 kv heads, tied embeddings, default RoPE, no biases.
* ``gqa_llama3``: 4 heads, 2 kv heads, llama3 RoPE scaling with ``original_max_position_embeddings``
  small enough that the scaling bends the frequencies the test sequences use, ``rope_theta``
  500000, untied embeddings, attention and MLP biases.

Models, their folders and the float32 params loaded from them are built once per session.
Weights use a normal std large enough that greedy generations wander instead of repeating one
token (``test_hf_parity.test_greedy_generations_are_not_degenerate`` guards this).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import loraswitch_jax as lj

CASES = ("mha", "gqa_llama3")
VOCAB = 160
WEIGHT_STD = 0.25  # 0.05-0.1 gives greedy repeats of one or two tokens; 0.2+ does not
MAX_NEW = 20  # greedy tokens compared with transformers


def hf_config(case: str) -> transformers.LlamaConfig:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if case == "mha":
        return transformers.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=True)
    if case == "gqa_llama3":
        return transformers.LlamaConfig(
            **common,
            num_key_value_heads=2,
            rope_theta=500000.0,
            # head_dim 16: wavelengths 6.3, 32, 167, ...; with an original context of 16 the
            # first is blended and the rest are slowed by `factor`.
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
        )
    raise ValueError(case)


def build_hf_model(case: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(case)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # not all ones: a dropped norm shows
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, WEIGHT_STD)
    return model


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    path: str  # folder written by transformers' save_pretrained
    hf: transformers.LlamaForCausalLM
    params: lj.LlamaParams  # float32, loaded from `path`
    cfg: lj.LlamaConfig


_CASES: dict[str, Case] = {}


def _get_case(name: str, tmp_path_factory) -> Case:
    if name not in _CASES:
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


@functools.cache
def jit_forward():
    return jax.jit(lj.forward, static_argnames=("cfg", "scan_layers"))


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens, np.int64))).logits.float().numpy()


def hf_greedy(model: transformers.LlamaForCausalLM, prompt: np.ndarray, n: int) -> list[int]:
    """``n`` greedy tokens from transformers, eos stopping off."""
    ids = torch.as_tensor(np.asarray(prompt, np.int64))[None]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1]:].tolist()


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def random_params(cfg: lj.LlamaConfig, seed: int, dtype) -> lj.LlamaParams:
    """Params with every leaf random (norms and biases too), so any mix-up of leaves shows.

    Drawn with numpy on the shapes of ``init_params`` (no eager jax ops to compile).
    """
    abstract = jax.eval_shape(lambda: lj.init_params(cfg, jax.random.key(0), dtype=dtype))
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(WEIGHT_STD * rng.standard_normal(x.shape), dtype), abstract
    )
