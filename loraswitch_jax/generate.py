"""Jitted batched generation: prefill, then a device-side decode loop.

The whole loop is one ``lax.while_loop`` inside one jit: no host round trip per token unless a
streaming callback is given (then each step calls back to the host through ``io_callback``).
Prompts of different lengths are right-padded; each sequence keeps its own length in the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from loraswitch_jax.adapters import Adapter, check_adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.kv_cache import init_cache
from loraswitch_jax.llama import decode_step, decode_step_merged, prefill
from loraswitch_jax.ops import Impl
from loraswitch_jax.params import LlamaParams
from loraswitch_jax.sampling import Sampler, sample
from loraswitch_jax.sharding import MeshConfig, MeshError
from loraswitch_jax.switch import STRATEGIES, init_merged, resolve_strategy

__all__ = [
    "PAD",
    "GenerateConfig",
    "Generation",
    "GenerationError",
    "generate",
    "generate_batch",
    "prefill_chunk",
    "prepare_prompts",
]

# Marks the positions after a sequence stopped in Generation.tokens.
PAD = -1


class GenerationError(ValueError):
    """Bad generation input: empty prompts, ids outside the vocabulary, too long for the cache."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What to generate. ``stop_tokens=None`` means the model's ``eos_token_id``; ``()`` never stops.

    ``cache_len=None`` sizes the cache to the longest prompt plus ``max_new_tokens``.
    ``impl`` is the decode step's kernel choice: a name or an ``ops.Impl`` (see
    ``loraswitch_jax.ops``);
    ``switch_strategy`` how a ``switch`` adapter decodes: ``"fused"`` or ``"merge"`` (batch 1;
    see ``loraswitch_jax.switch``);
    ``prefill_tokens`` the most prompt tokens (batch x length) one prefill pass takes: longer
    batches are prefilled in chunks of the prompt (``llama.prefill``), a power of two of at
    least 16 tokens per prompt; ``None``: one pass. The default keeps 64 prompts of 1024 tokens
    of Llama-2-7B within an 80 GB GPU.
    ``mesh``: a ``sharding.MeshConfig`` (or its text, ``"data=2,tensor=4"``) to run the model
    over many devices (``loraswitch_jax.parallel``); ``None``: one device.
    """

    max_new_tokens: int = 32
    sampler: Sampler = Sampler()
    stop_tokens: tuple[int, ...] | None = None
    cache_len: int | None = None
    impl: str | Impl = "auto"
    switch_strategy: str = "fused"
    prefill_tokens: int | None = 8192
    mesh: MeshConfig | None = None

    def __post_init__(self):
        if isinstance(self.mesh, str):
            try:
                object.__setattr__(self, "mesh", MeshConfig.parse(self.mesh))
            except MeshError as e:
                raise GenerationError(f"mesh: {e}") from None
        if self.mesh is not None and not isinstance(self.mesh, MeshConfig):
            raise GenerationError(f"mesh must be a MeshConfig, its text or None, got {self.mesh!r}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prefill_tokens is not None and (
                not isinstance(self.prefill_tokens, int) or self.prefill_tokens < 16):
            raise GenerationError(f"prefill_tokens must be >= 16 or None, got {self.prefill_tokens}")
        if self.switch_strategy not in STRATEGIES:
            raise GenerationError(
                f"unknown switch_strategy {self.switch_strategy!r}; expected one of {STRATEGIES}"
            )


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated tokens ``[B, max_new_tokens]`` (``PAD`` after a stop) and counts ``[B]``.

    A stop token that ended a sequence is included in its tokens and its count.
    """

    tokens: np.ndarray
    lengths: np.ndarray

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def _bucket(n: int, cap: int) -> int:
    """Pad prompt lengths to powers of two (>= 8) so a few compiled shapes serve all prompts."""
    return min(max(8, 1 << (n - 1).bit_length()), cap)


def prepare_prompts(
    prompts: Sequence[Sequence[int]] | np.ndarray, cfg: LlamaConfig, max_new_tokens: int,
    cache_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate and right-pad prompts. Returns ``(tokens [B, T], lengths [B], cache_len)``."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        prompts = [prompts]
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    if not rows:
        raise GenerationError("no prompts given")
    for i, row in enumerate(rows):
        if row.size == 0:
            raise GenerationError(f"prompt {i} is empty; it needs at least one token")
        if not np.issubdtype(row.dtype, np.integer):
            raise GenerationError(f"prompt {i} holds {row.dtype} values, not integer token ids")
        bad = row[(row < 0) | (row >= cfg.vocab_size)]
        if bad.size:
            raise GenerationError(
                f"prompt {i} has token id {int(bad[0])} outside the vocabulary [0, {cfg.vocab_size})"
            )
    longest = max(r.size for r in rows)
    needed = longest + max_new_tokens
    if cache_len is not None and cache_len > cfg.max_position_embeddings:
        raise GenerationError(
            f"cache_len {cache_len} is more than max_position_embeddings "
            f"({cfg.max_position_embeddings}): positions past it were never trained"
        )
    limit = cache_len if cache_len is not None else cfg.max_position_embeddings
    name = "the cache length" if cache_len is not None else "max_position_embeddings"
    if needed > limit:
        raise GenerationError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is "
            f"{needed} tokens, more than {name} ({limit})"
        )
    if cache_len is None:
        cache_len = min(-(-needed // 64) * 64, cfg.max_position_embeddings)
    width = _bucket(longest, cache_len)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : row.size] = row
    return tokens, np.array([r.size for r in rows], np.int32), cache_len


def prefill_chunk(prefill_tokens: int | None, batch: int) -> int | None:
    """Tokens per prompt in one prefill pass: the largest power of two (>= 16) whose ``batch``
    rows fit ``prefill_tokens``; ``None`` (one pass) when ``prefill_tokens`` is."""
    if prefill_tokens is None:
        return None
    return max(16, 1 << (max(prefill_tokens // batch, 1).bit_length() - 1))


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "cache_len", "stream"))
def generate_batch(params, adapter, tokens, lengths, key, steps=None, *, cfg, gen, cache_len, stream):
    """The jitted core of :func:`generate` over prompts already padded by :func:`prepare_prompts`.

    Args:
      params, adapter: as for :func:`generate` (``adapter`` may be ``None``).
      tokens: ``[B, T] int32`` right-padded prompts; ``lengths [B] int32`` their lengths.
      key: the sampling key.
      steps: optional traced ``int32`` (>= 1): stop after that many tokens, the rest staying
        ``PAD``, so one compiled program serves every shorter generation (benchmarks time 1
        against N tokens with it). The first token comes from the prefill.
      cfg, gen, cache_len, stream: static; as :func:`generate` and :func:`prepare_prompts` give
        them. Inputs are not validated here: :func:`generate` does that.

    Returns:
      ``[B, gen.max_new_tokens] int32`` new tokens, ``PAD`` after a row stops.
    """
    B = tokens.shape[0]
    n_new = gen.max_new_tokens
    limit = n_new if steps is None else jnp.minimum(steps, n_new)
    stop_tokens = cfg.eos_token_id if gen.stop_tokens is None else gen.stop_tokens
    stop = jnp.asarray(stop_tokens if stop_tokens else [-1], jnp.int32)

    steps_ = _steps(gen.mesh)
    cache = steps_.init_cache(cfg, B, cache_len, params.dtype)
    logits, cache = steps_.prefill(params, cache, tokens, lengths, cfg, adapter=adapter,
                                   chunk=prefill_chunk(gen.prefill_tokens, B))

    def emit(step, token, done, out):
        token = jnp.where(done, PAD, token)
        if stream is not None:
            io_callback(stream, None, step, token, ordered=True)
        return out.at[:, step].set(token), done | jnp.isin(token, stop)

    out = jnp.full((B, n_new), PAD, jnp.int32)
    first = sample(logits, jax.random.fold_in(key, 0), gen.sampler)
    out, done = emit(0, first, jnp.zeros((B,), bool), out)

    merge = adapter is not None and adapter.config.mode == "switch" and (
        resolve_strategy(gen.switch_strategy, B) == "merge")

    def cond(state):
        return (state[0] < limit) & ~jnp.all(state[4])

    def body(state):
        step, token, cache, out, done, merged = state
        # Finished rows keep decoding a harmless token (fixed shapes); their output stays PAD.
        token = jnp.where(token == PAD, 0, token)
        if merge:
            logits, cache, merged = steps_.decode_step_merged(
                params, cache, merged, token, cfg, adapter=adapter, impl=gen.impl
            )
        else:
            logits, cache = steps_.decode_step(params, cache, token, cfg, adapter=adapter,
                                               impl=gen.impl)
        token = sample(logits, jax.random.fold_in(key, step), gen.sampler)
        out, done = emit(step, token, done, out)
        return step + 1, jnp.where(done, PAD, token), cache, out, done, merged

    merged = steps_.init_merged(params.layers, adapter) if merge else None
    state = (jnp.int32(1), jnp.where(done, PAD, first), cache, out, done, merged)
    out = jax.lax.while_loop(cond, body, state)[3]
    return out


def generate(
    params: LlamaParams,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    gen: GenerateConfig = GenerateConfig(),
    *,
    adapter: Adapter | None = None,
    seed: int = 0,
    stream: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Generation:
    """Generate up to ``gen.max_new_tokens`` tokens for each prompt (a batch of token-id lists).

    Args:
      params: model weights (their dtype is the compute dtype).
      cfg: the model config.
      prompts: token ids, one sequence per prompt; lengths may differ.
      gen: sampler, stop tokens, length limits.
      adapter: LoRA or mixture adapters; each token routes itself (``None``: the backbone).
      seed: sampling seed (ignored by greedy decoding).
      stream: called on the host as ``stream(step, tokens [B])`` after each step, in order.

    Raises:
      GenerationError: empty prompts, ids outside the vocabulary, or a prompt plus
        ``max_new_tokens`` longer than the cache.
    """
    tokens, lengths, cache_len = prepare_prompts(prompts, cfg, gen.max_new_tokens, gen.cache_len)
    if adapter is not None:
        check_adapter(adapter, cfg)
    _check_strategy(gen.switch_strategy, adapter, len(tokens))
    if gen.mesh is not None:
        from loraswitch_jax import parallel

        try:
            params, adapter = parallel.place(params, adapter, cfg, gen.mesh)
        except MeshError as e:
            raise GenerationError(f"mesh {gen.mesh}: {e}") from None
    out = generate_batch(
        params, adapter, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
        cfg=cfg, gen=gen, cache_len=cache_len, stream=stream,
    )
    out = np.asarray(out)
    stop_tokens = cfg.eos_token_id if gen.stop_tokens is None else gen.stop_tokens
    counts = np.array([_count(row, stop_tokens) for row in out], np.int32)
    return Generation(tokens=out, lengths=counts)


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The model functions the loop calls: ``llama``'s, or ``parallel``'s bound to a mesh."""

    init_cache: Callable
    prefill: Callable
    decode_step: Callable
    decode_step_merged: Callable
    init_merged: Callable


def _steps(mesh: MeshConfig | None) -> _Steps:
    if mesh is None:
        return _Steps(init_cache, prefill, decode_step, decode_step_merged, init_merged)
    from loraswitch_jax import parallel

    return _Steps(*(functools.partial(f, mesh=mesh) for f in (
        parallel.init_cache, parallel.prefill, parallel.decode_step,
        parallel.decode_step_merged, parallel.init_merged)))


def _check_strategy(strategy: str, adapter: Adapter | None, batch_size: int) -> None:
    mode = None if adapter is None else adapter.config.mode
    if strategy == "merge" and mode != "switch":
        raise GenerationError(
            f"switch_strategy 'merge' applies to switch adapters, not {mode or 'no adapter'!r}; "
            "merge a single LoRA once with loraswitch_jax.merge_lora instead"
        )
    if mode == "switch":
        try:
            resolve_strategy(strategy, batch_size)
        except ValueError as e:
            raise GenerationError(str(e)) from None


def _count(row: np.ndarray, stop_tokens: Sequence[int]) -> int:
    """Tokens up to and including the first stop token (or all non-PAD)."""
    for i, token in enumerate(row):
        if token == PAD:
            return i
        if token in stop_tokens:
            return i + 1
    return len(row)
