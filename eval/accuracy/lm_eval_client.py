"""An lm-evaluation-harness (``lm_eval`` 0.4.x) model: a Llama, optionally with loraswitch adapters.

Importing this module registers :class:`LoraSwitchLM` as the ``loraswitch`` model.
``lm_eval`` 0.4.x looks models up in its own registry only: its command line neither reads entry
points nor imports modules named by ``--include_path`` (that flag adds task YAML folders). So run
its command line through this module, which registers the model first::

    python -m loraswitch_jax.eval.accuracy.lm_eval_client --model loraswitch \\
        --model_args model=DIR,adapter=ADIR,dtype=bfloat16,batch_size=8 \\
        --tasks TASKS --include_path TASK_YAML_DIR

Every ``lm_eval`` command line flag works as usual (``--limit``, ``--num_fewshot``,
``--output_path``, ...); ``--device`` is ignored (JAX uses its default backend; set
``JAX_PLATFORMS=cpu`` for the CPU) and ``batch_size`` in ``model_args`` wins over ``--batch_size``.
``model_args`` (``model=demo`` is the built-in random demo model with the byte tokenizer, as in
``loraswitch generate``):

    model=DIR|demo  adapter=DIR  dtype=bfloat16|float32  batch_size=N  max_length=N
    max_gen_toks=N  impl=auto|xla|pallas  seed=N

From Python, pass an instance (or ``model="loraswitch"`` once this module is imported)::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from loraswitch_jax.eval.accuracy.lm_eval_client import LoraSwitchLM

    lm = LoraSwitchLM.load(model="DIR", adapter="ADIR")   # or LoraSwitchLM(params, cfg, tokenizer)
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"],
                            task_manager=TaskManager(include_path="TASK_YAML_DIR"))

Scoring (``loglikelihood``, ``loglikelihood_rolling``) runs the jitted full-sequence
:func:`loraswitch_jax.forward` with XLA dots (compute bound; the Pallas kernels are decode kernels).
Rows are right-padded to power-of-two lengths and every batch has ``batch_size`` rows, so jit
compiles about ``log2(max_length)`` shapes. ``generate_until`` runs :func:`loraswitch_jax.generate`
(``impl`` picks its decode-step kernels), always for ``max_gen_toks`` tokens or until EOS, then cuts
the text at the first ``until`` string on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import (
        get_rolling_token_windows,
        make_disjoint_window,
        simple_parse_args_string,
    )
except ImportError as e:
    raise ImportError(
        "the lm_eval client needs lm-evaluation-harness 0.4.x: pip install 'lm_eval>=0.4.13,<0.5'"
    ) from e

from loraswitch_jax import ops
from loraswitch_jax.adapter_io import load_adapter
from loraswitch_jax.adapters import Adapter, check_adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.generate import GenerateConfig, generate
from loraswitch_jax.llama import forward
from loraswitch_jax.params import LlamaParams, init_params
from loraswitch_jax.sampling import Sampler
from loraswitch_jax.tokenizer import Tokenizer, byte_tokenizer
from loraswitch_jax.weights import load_params

__all__ = ["LoraSwitchLM", "main"]

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# Generation arguments honoured by generate_until (after lm_eval's normalize_gen_kwargs).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
# lm_eval run settings passed beside model_args that do not apply: JAX places arrays on its
# default device (JAX_PLATFORMS=cpu forces the CPU) and there is no automatic batch size.
_IGNORED_SETTINGS = ("device", "max_batch_size")


def _bucket(n: int, cap: int) -> int:
    """Pad lengths to powers of two (>= 16, at most ``cap``): a few compiled shapes serve all."""
    return min(max(16, 1 << (n - 1).bit_length()), cap)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(params, adapter, inputs, targets, *, cfg):
    """Log-probability of each target token and whether it is the argmax, both ``[B, T]``.

    Reduced on the device so that only ``[B, T]`` (not the ``[B, T, V]`` logits) reaches the host.
    """
    logits = forward(params, inputs, cfg, adapter=adapter, impl="xla")  # [B, T, V] float32
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@dataclasses.dataclass(frozen=True)
class _Row:
    """One scoring row: ``inputs`` predict ``targets`` (shifted by one); the last ``n_scored``
    targets are summed."""

    inputs: list[int]
    targets: list[int]
    n_scored: int


@register_model("loraswitch")
class LoraSwitchLM(TemplateLM):
    """A Llama (and optional adapter) as an ``lm_eval`` model.

    Args:
      params: model weights; their dtype is the compute dtype.
      cfg: the model config.
      tokenizer: text <-> ids; encoding adds BOS where the tokenizer's post-processor does.
      adapter: LoRA or mixture-of-LoRA adapter for ``params`` (``None``: the backbone alone).
      batch_size: rows per compiled call (scoring and generation).
      max_length: longest sequence the model sees (default ``max_position_embeddings``); longer
        contexts are cut from the left.
      max_gen_toks: new tokens per request when a task does not say.
      impl: decode-step kernels for ``generate_until`` (``auto``: Pallas on a GPU, else XLA).
      seed: sampling seed for ``generate_until`` with ``do_sample``.
    """

    def __init__(
        self,
        params: LlamaParams,
        cfg: LlamaConfig,
        tokenizer: Tokenizer,
        adapter: Adapter | None = None,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        impl: str = "auto",
        seed: int = 0,
    ):
        super().__init__()
        if adapter is not None:
            check_adapter(adapter, cfg)
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(
                f"batch_size={batch_size!r} is not supported (no automatic batch size): give a "
                "number of rows, e.g. batch_size=8"
            )
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        max_length = cfg.max_position_embeddings if max_length is None else int(max_length)
        if not 2 <= max_length <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_length must be in [2, {cfg.max_position_embeddings}] (the model's "
                f"max_position_embeddings), got {max_length}"
            )
        if int(max_gen_toks) < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        ops.resolve_impl(impl)  # raises on an unknown name
        prefix = cfg.bos_token_id
        if prefix is None:
            prefix = next(iter(cfg.eos_token_id), None)
        if prefix is None:
            raise ValueError(
                "the model config has neither bos_token_id nor eos_token_id: one is needed to "
                "condition the first token of a scored string"
            )
        self.params, self.cfg, self.tokenizer, self.adapter = params, cfg, tokenizer, adapter
        self.batch_size, self._max_length = batch_size, max_length
        self.max_gen_toks, self.impl, self.seed = int(max_gen_toks), impl, int(seed)
        self._prefix = prefix
        self._generate_calls = 0

    # ------------------------------------------------------------------ construction from strings
    @classmethod
    def load(
        cls,
        model: str = "demo",
        adapter: str | None = None,
        dtype: str = "bfloat16",
        **kwargs,
    ) -> LoraSwitchLM:
        """Load a Hugging Face Llama folder (or ``"demo"``) and an optional adapter folder.

        Args:
          model: folder with ``config.json``, safetensors and ``tokenizer.json``, or ``"demo"``
            (the random-weight demo model and byte tokenizer of ``loraswitch generate``).
          adapter: folder written by :func:`loraswitch_jax.save_adapter`.
          dtype: ``"bfloat16"`` or ``"float32"`` (params and adapter).
          **kwargs: the constructor's keyword arguments (``batch_size``, ``max_length``, ...).
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        jdtype = DTYPES[dtype]
        if model == "demo":
            cfg = PRESETS["demo"]
            params, tokenizer = init_params(cfg, jax.random.key(0), jdtype), byte_tokenizer()
        else:
            params, cfg = load_params(model, dtype=jdtype)
            tokenizer = Tokenizer.from_pretrained(model)
        weights = None if adapter is None else load_adapter(adapter, cfg, dtype=jdtype)
        return cls(params, cfg, tokenizer, weights, **kwargs)

    @classmethod
    def _from_settings(cls, model_args: dict, run_settings: dict | None) -> LoraSwitchLM:
        """``model_args`` plus lm_eval's run settings (``batch_size`` from ``--batch_size``...)."""
        args = dict(model_args)
        for key, value in (run_settings or {}).items():
            if value is None or key in _IGNORED_SETTINGS:
                continue
            args.setdefault(key, value)  # model_args win over lm_eval's defaults
        known = (
            "model", "adapter", "dtype", "batch_size", "max_length", "max_gen_toks", "impl", "seed"
        )
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(
                f"unsupported loraswitch model_args {unknown}; supported: {', '.join(known)}"
            )
        return cls.load(**args)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> LoraSwitchLM:
        """From ``"model=DIR,adapter=ADIR,..."`` (``--model_args``) and lm_eval's run settings."""
        return cls._from_settings(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict, additional_config: dict | None = None
    ) -> LoraSwitchLM:
        """From a ``model_args`` dict and lm_eval's run settings."""
        return cls._from_settings(arg_dict, additional_config)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        """The first EOS id (BOS if the model has none)."""
        return next(iter(self.cfg.eos_token_id), self._prefix)

    @property
    def prefix_token_id(self) -> int:
        """The token that conditions a string's first token: BOS, else EOS."""
        return self._prefix

    @property
    def max_length(self) -> int:
        """Longest input the model sees; longer contexts are cut from the left."""
        return self._max_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Token ids; ``add_special_tokens=None`` adds them unless ``string`` starts with BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.decode([self._prefix], skip_special_tokens=False)
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``, special tokens left out."""
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _score_rows(
        self, rows: list[_Row], desc: str, disable_tqdm: bool
    ) -> list[tuple[float, bool]]:
        """``(sum of scored log-probs, all scored targets greedy)`` per row, in batches."""
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        # Longest first: rows of similar length share a batch (and a padded width).
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].inputs))
        with tqdm(total=len(rows), desc=desc, disable=disable_tqdm) as pbar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = _bucket(max(len(rows[i].inputs) for i in chunk), self.max_length)
                inputs = np.zeros((self.batch_size, width), np.int32)
                targets = np.zeros((self.batch_size, width), np.int32)
                for j, i in enumerate(chunk):
                    n = len(rows[i].inputs)
                    inputs[j, :n], targets[j, :n] = rows[i].inputs, rows[i].targets
                self._check_ids(inputs, targets)
                picked, greedy = _score(self.params, self.adapter, jnp.asarray(inputs),
                                        jnp.asarray(targets), cfg=self.cfg)
                picked, greedy = np.asarray(picked, np.float64), np.asarray(greedy)
                for j, i in enumerate(chunk):
                    n = len(rows[i].inputs)
                    scored = slice(n - rows[i].n_scored, n)
                    results[i] = (float(picked[j, scored].sum()), bool(greedy[j, scored].all()))
                pbar.update(len(chunk))
        return results

    def _check_ids(self, *arrays: np.ndarray) -> None:
        """Out-of-vocabulary ids would be clamped silently by the embedding gather: refuse them."""
        for a in arrays:
            if a.size and a.max() >= self.cfg.vocab_size:
                raise ValueError(
                    f"token id {int(a.max())} is outside the model's vocabulary "
                    f"[0, {self.cfg.vocab_size}): the tokenizer does not belong to this model"
                )

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Score ``(key, context_ids, continuation_ids)`` requests; contexts are cut from the left
        so that context + continuation fit ``max_length + 1`` tokens (inputs are one shorter)."""
        rows = []
        for key, context, continuation in requests:
            if not continuation:
                raise ValueError(f"request {key!r} has an empty continuation: nothing to score")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than max_length "
                    f"({self.max_length}); it cannot be scored in one window"
                )
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append(_Row(inputs=whole[:-1], targets=whole[1:], n_scored=len(continuation)))
        results = self._score_rows(rows, "Running loglikelihood requests", disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood given ``prefix_token_id``, in disjoint windows of
        ``max_length`` predicted tokens (the last window keeps a full-length context)."""
        windows, owners = [], []
        for i, (string,) in enumerate(
            tqdm([r.args for r in requests], desc="Windowing strings", disable=disable_tqdm)
        ):
            tokens = self.tok_encode(string, add_special_tokens=False)
            rolling = get_rolling_token_windows(
                tokens, self.prefix_token_id, self.max_length, context_len=1
            )
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, Sampler]:
        """``(until strings, max new tokens, sampler)`` from a request's generation arguments."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(
                f"generation arguments must be a dict, got {type(gen_kwargs).__name__}"
            )
        kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks)
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(
                f"generation arguments {unknown} are not supported by loraswitch; supported: "
                f"{', '.join(GEN_KWARGS)} (and lm_eval's aliases of max_gen_toks)"
            )
        until = kwargs["until"]
        if not all(isinstance(s, str) for s in until):
            raise ValueError(f"'until' must be strings, got {until!r}")
        if kwargs["max_gen_toks"] >= self.max_length:
            raise ValueError(
                f"max_gen_toks={kwargs['max_gen_toks']} leaves no room for a prompt in "
                f"max_length={self.max_length}"
            )
        temperature = kwargs.get("temperature", 1.0)  # lm_eval omits it with do_sample alone
        if kwargs["do_sample"] and temperature > 0:
            sampler = Sampler(
                temperature=temperature,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
        else:
            sampler = Sampler()  # greedy
        return until, kwargs["max_gen_toks"], sampler

    def _generate_batch(
        self, prompts: list[list[int]], max_new: int, sampler: Sampler
    ) -> list[list[int]]:
        """New tokens per prompt (EOS dropped); the batch is padded to ``batch_size`` rows."""
        n = len(prompts)
        padded = prompts + [prompts[0]] * (self.batch_size - n)
        needed = max(len(p) for p in prompts) + max_new
        cache_len = min(max(64, 1 << (needed - 1).bit_length()), self.cfg.max_position_embeddings)
        gen = GenerateConfig(
            max_new_tokens=max_new, sampler=sampler, cache_len=cache_len, impl=self.impl
        )
        out = generate(self.params, self.cfg, padded, gen, adapter=self.adapter,
                       seed=self.seed + self._generate_calls)
        self._generate_calls += 1
        stop = set(self.cfg.eos_token_id)
        return [[t for t in row if t not in stop] for row in out.as_lists()[:n]]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until an ``until`` string, EOS or ``max_gen_toks`` new tokens.

        The device loop stops at EOS or ``max_gen_toks``; the text is then cut before the first
        ``until`` string.
        """
        prepared = []
        for context, gen_kwargs in (r.args for r in requests):
            until, max_new, sampler = self._gen_settings(gen_kwargs)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            prepared.append((ids[-(self.max_length - max_new) :], until, max_new, sampler))
        # Batch requests that share settings, longest prompt first.
        groups: dict[tuple[int, Sampler], list[int]] = {}
        for i in sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0])):
            groups.setdefault(prepared[i][2:], []).append(i)
        texts: list[str | None] = [None] * len(requests)
        desc = "Running generate_until requests"
        with tqdm(total=len(requests), desc=desc, disable=disable_tqdm) as pbar:
            for (max_new, sampler), members in groups.items():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    new = self._generate_batch([prepared[i][0] for i in chunk], max_new, sampler)
                    for i, tokens in zip(chunk, new):
                        texts[i] = _cut(self.tok_decode(tokens), prepared[i][1])
                        self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
                    pbar.update(len(chunk))
        return texts


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any non-empty ``until`` string."""
    ends = [text.find(s) for s in until if s]
    ends = [e for e in ends if e >= 0]
    return text[: min(ends)] if ends else text


def main() -> None:
    """``lm_eval``'s command line with the ``loraswitch`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
