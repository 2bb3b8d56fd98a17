"""Reference models from Hugging Face ``transformers`` (torch on CPU) for the parity tests.

Two cases cover the config space the library claims (DESIGN.md §6):

* ``mha``: 4 heads, 4 kv heads, tied embeddings, default RoPE, no biases.
* ``gqa_llama3``: 4 heads, 2 kv heads, llama3 RoPE scaling with ``original_max_position_embeddings``
  small enough that the scaling bends the frequencies the test sequences use, ``rope_theta``
  500000, untied embeddings, attention and MLP biases.

Weights use a normal std large enough that greedy generations wander instead of repeating one
token (``test_hf_parity.test_greedy_generations_are_not_degenerate`` guards this).
"""

from __future__ import annotations

import numpy as np

from tests.helpers import CASES, VOCAB, WEIGHT_STD, require

# A test module that imports this one skips where the `test` extra's torch is absent.
torch = require("torch")
transformers = require("transformers")


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
