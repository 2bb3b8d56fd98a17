"""Log-likelihood scoring: held-out loss per byte, multiple-choice accuracy, confidence intervals.

Everything reduces to one primitive, :func:`score_sequences`: for token sequences with a mask of
the positions that count, the summed log-probability of those tokens given everything before
them (and, for routed adapters, how often each expert was picked for them). Sequences are sorted
by length and right-padded to a few power-of-two widths, so a model compiles a handful of shapes;
padding comes after the real tokens, so a causal model's scores do not depend on it.

* Held-out loss (:func:`heldout_sequences`): each text is ``BOS + bytes``; a text longer than
  the window is cut into windows that overlap by one token, so every byte is predicted exactly
  once (with up to ``max_len - 1`` tokens of context). With the byte-level tokenizer a token is
  a byte, so nats per token are nats per byte.
* Multiple choice (:func:`choice_sequences`, :func:`choice_scores`): option ``o`` of an item is
  scored as ``log p(" " + o | BOS + context)`` (the task files join context and option with one
  space), summed, and per byte of the continuation (length-normalised; lm-eval-harness's
  ``acc_norm``). A context too long for the window loses its oldest bytes.
* Intervals: :func:`wilson_interval` for one accuracy; :func:`bootstrap` for anything else
  (percentile bootstrap; pass several columns to resample them together, i.e. paired; pass
  ``groups`` to draw whole clusters of correlated rows, e.g. all windows of one held-out text).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from loraswitch_jax.adapters import Adapter
from loraswitch_jax.config import LlamaConfig
from loraswitch_jax.llama import forward
from loraswitch_jax.params import LlamaParams

__all__ = ["ChoiceScores", "Scores", "TokenSequence", "bootstrap", "choice_scores",
           "choice_sequences", "heldout_sequences", "score_sequences",
           "wilson_interval"]


@dataclasses.dataclass(frozen=True)
class TokenSequence:
    """Token ids ``[n]`` and ``targets [n]`` bool: True where the token is scored (never at 0)."""

    tokens: np.ndarray
    targets: np.ndarray

    def __post_init__(self):
        if self.tokens.shape != self.targets.shape or self.tokens.ndim != 1:
            raise ValueError(f"tokens and targets must be 1-D of one length, got "
                             f"{self.tokens.shape} and {self.targets.shape}")
        if self.targets.size and self.targets[0]:
            raise ValueError("the first token cannot be a target: nothing precedes it")


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per sequence: ``logprob [N]`` (summed over its targets, float64), ``count [N]`` targets,
    and ``usage [N, E]`` (expert picks on the scored positions, averaged over routers; ``None``
    without routers)."""

    logprob: np.ndarray
    count: np.ndarray
    usage: np.ndarray | None


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _score_batch(params, adapter, tokens, targets, *, cfg, impl):
    """Summed target log-probs ``[B]`` and expert picks ``[B, E]`` of one padded batch."""
    if adapter is not None:
        adapter = jax.tree.map(lambda x: x.astype(params.dtype), adapter)
    logits, routing = forward(params, tokens, cfg, adapter=adapter, impl=impl, return_routing=True)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    scored = targets[:, 1:]
    sums = jnp.sum(jnp.where(scored, token_logp, 0.0), axis=-1)
    if routing is None:
        return sums, None
    # The route at position t shapes the prediction of token t + 1: count it where that is scored.
    E = routing.probs.shape[-1]
    picks = jax.nn.one_hot(routing.expert_ids[:, :, :-1], E, dtype=jnp.float32).sum(-2)
    usage = jnp.einsum("nbte,bt->be", picks, scored.astype(jnp.float32)) / picks.shape[0]
    return sums, usage


def _width(n: int, min_width: int, max_len: int) -> int:
    return min(max(min_width, 1 << (n - 1).bit_length()), max_len)


def score_sequences(
    params: LlamaParams,
    cfg: LlamaConfig,
    sequences: Sequence[TokenSequence],
    *,
    adapter: Adapter | None = None,
    batch_size: int = 16,
    max_len: int = 512,
    min_width: int = 32,
    impl: str = "xla",
    progress: bool = False,
    desc: str = "scoring",
) -> Scores:
    """Summed log-probability of each sequence's target tokens under the model.

    Args:
      sequences: at most ``max_len`` tokens each.
      adapter: LoRA / mixture adapters (``None``: the backbone alone).
      batch_size: rows per forward pass (the last batch is padded with empty rows).
      max_len: the widest padded batch.
      min_width: the narrowest; batches are padded to a power of two between the two. Each
        width is a compiled shape: raise it where compiling costs more than padding (GPU).
    Returns:
      :class:`Scores`, in the order of ``sequences``.
    """
    if not sequences:
        raise ValueError("no sequences to score")
    lengths = np.array([s.tokens.size for s in sequences])
    if lengths.max() > max_len:
        raise ValueError(f"a sequence has {lengths.max()} tokens, more than max_len={max_len}; "
                         "cut it first (heldout_sequences / choice_sequences do)")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    order = np.argsort(lengths, kind="stable")
    logprob = np.zeros(len(sequences), np.float64)
    count = np.array([int(s.targets.sum()) for s in sequences], np.int64)
    usage, pending = None, []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        width = _width(int(lengths[rows].max()), min_width, max_len)
        tokens = np.full((batch_size, width), pad, np.int32)
        targets = np.zeros((batch_size, width), bool)
        for j, r in enumerate(rows):
            tokens[j, :lengths[r]] = sequences[r].tokens
            targets[j, :lengths[r]] = sequences[r].targets
        pending.append((rows, _score_batch(params, adapter, jnp.asarray(tokens),
                                           jnp.asarray(targets), cfg=cfg, impl=impl)))
        if len(pending) < 8 and start + batch_size < len(order):
            continue  # read back in groups: the device runs ahead of the host
        outputs = jax.device_get([out for _, out in pending])
        for (rows, _), (sums, picks) in zip(pending, outputs):
            logprob[rows] = np.asarray(sums, np.float64)[:len(rows)]
            if picks is not None:
                if usage is None:
                    usage = np.zeros((len(sequences), picks.shape[-1]), np.float64)
                usage[rows] = np.asarray(picks, np.float64)[:len(rows)]
        pending = []
    return Scores(logprob=logprob, count=count, usage=usage)


# ---- held-out loss ---------------------------------------------------------------------------

def heldout_sequences(texts: Sequence[np.ndarray], bos_id: int, max_len: int
                      ) -> tuple[list[TokenSequence], np.ndarray]:
    """Windows of ``BOS + text`` covering every text token once as a target.

    Args:
      texts: token ids of each text (no BOS/EOS).
      max_len: tokens per window; windows overlap by one token, the first one being context.
    Returns:
      The windows and ``owner [n_windows]``, the index of each window's text.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    windows, owner = [], []
    for i, text in enumerate(texts):
        ids = np.concatenate([[bos_id], np.asarray(text, np.int32)]).astype(np.int32)
        for start in range(0, max(1, ids.size - 1), max_len - 1):
            piece = ids[start:start + max_len]
            if piece.size < 2:
                continue
            targets = np.ones(piece.size, bool)
            targets[0] = False
            windows.append(TokenSequence(piece, targets))
            owner.append(i)
    return windows, np.asarray(owner, np.int64)


# ---- multiple choice -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """Per item and option: summed log-probability ``[n, 4]`` and continuation bytes ``[n, 4]``;
    ``answer [n]``; ``truncated``: items whose context lost bytes to the window."""

    logprob: np.ndarray
    num_bytes: np.ndarray
    answer: np.ndarray
    truncated: int

    @property
    def correct_sum(self) -> np.ndarray:
        """``[n]`` 1.0 where the highest summed log-probability is the answer."""
        return (np.argmax(self.logprob, axis=1) == self.answer).astype(np.float64)

    @property
    def correct_norm(self) -> np.ndarray:
        """``[n]`` 1.0 where the highest log-probability per byte is the answer."""
        return (np.argmax(self.logprob / self.num_bytes, axis=1) == self.answer).astype(np.float64)


def choice_sequences(items: Sequence[Mapping], encode: Callable[[str], Sequence[int]],
                     bos_id: int, max_len: int) -> tuple[list[TokenSequence], np.ndarray, int]:
    """One sequence per (item, option): ``BOS + context + " " + option``, the continuation scored.

    Args:
      items: ``{"context", "options", "answer"}`` (``options`` of one length for all items).
      encode: text to token ids, no special tokens.
      max_len: tokens per sequence; longer contexts keep their newest tokens (and BOS). A
        continuation longer than ``max_len - 2`` keeps its first ``max_len - 2`` tokens.
    Returns:
      ``(sequences, num_bytes [n, options], truncated)``: sequences item-major; ``num_bytes``
      each option's length in bytes (the per-byte normaliser); ``truncated``
      the number of items whose context was shortened.
    """
    sequences, num_bytes, truncated = [], [], 0
    for item in items:
        context = np.asarray(encode(item["context"]), np.int32)
        row, cut = [], False
        for option in item["options"]:
            cont = np.asarray(encode(" " + option), np.int32)[:max_len - 2]
            keep = min(context.size, max_len - 1 - cont.size)
            cut |= keep < context.size
            tokens = np.concatenate([[bos_id], context[context.size - keep:], cont])
            tokens = tokens.astype(np.int32)
            targets = np.zeros(tokens.size, bool)
            targets[tokens.size - cont.size:] = True
            sequences.append(TokenSequence(tokens, targets))
            # Per-byte scores divide by the option's own bytes (as lm-eval's acc_norm), not the
            # joining space, whose log-probability is the same for every option.
            row.append(len(option.encode()))
        truncated += cut
        num_bytes.append(row)
    return sequences, np.asarray(num_bytes, np.float64), truncated


def choice_scores(scores: Scores, num_bytes: np.ndarray, items: Sequence[Mapping],
                  truncated: int = 0) -> ChoiceScores:
    """Regroup the scores of :func:`choice_sequences`' sequences into ``[n, options]``."""
    n, k = num_bytes.shape
    return ChoiceScores(logprob=scores.logprob.reshape(n, k), num_bytes=num_bytes,
                        answer=np.array([item["answer"] for item in items], np.int64),
                        truncated=truncated)


# ---- intervals -------------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sensible at 0 and n successes too)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def bootstrap(statistic: Callable[..., np.ndarray], *columns: np.ndarray, resamples: int = 2000,
              level: float = 0.95, seed: int = 0, strata: np.ndarray | None = None,
              groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*columns)``.

    Rows are resampled with replacement, the same rows for every column (a paired bootstrap
    when the columns are two methods' scores on the same items). ``statistic`` gets the
    resampled columns as ``[resamples, n]`` arrays and reduces the last axis, e.g.
    ``lambda a, b: a.mean(-1) - b.mean(-1)`` or ``lambda nll, size: nll.sum(-1) / size.sum(-1)``.
    With ``strata [n]`` (stratum labels) rows are drawn within their stratum and stay in their
    stratum's columns, so ``statistic`` may slice the columns by stratum (e.g. a macro average).

    With ``groups [n]`` (cluster labels, e.g. the source text of each scoring window) whole
    clusters are drawn instead of rows, the same clusters for every column: as many clusters
    as there are, with replacement, within their stratum (a cluster must lie in one stratum).
    Rows of one cluster are correlated (the windows of one long file), and drawing them
    independently makes the interval too narrow. Rows stay in place and are weighted:
    ``statistic`` gets each column times the number of times the row's cluster was drawn (all
    ones reproduce the point estimate). That equals concatenating the drawn clusters' rows for
    a statistic made of column sums, such as ``nll.sum(-1) / size.sum(-1)``; write a mean as a
    ratio of sums (a column of ones counts the rows), not as ``.mean(-1)``.
    """
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"columns differ in length: {[len(c) for c in columns]}")
    if n == 0:
        return float("nan"), float("nan")
    for name, labels in (("strata", strata), ("groups", groups)):
        if labels is not None and np.shape(labels) != (n,):
            raise ValueError(f"{name} must have one label per row ({n}), got shape "
                             f"{np.shape(labels)}")
    strata = None if strata is None else np.asarray(strata)
    rng = np.random.default_rng(seed)
    if groups is not None:
        weights = _cluster_weights(rng, np.asarray(groups), strata, resamples)
        resampled = (np.asarray(c, np.float64) * weights for c in columns)
    elif strata is None:
        index = rng.integers(0, n, size=(resamples, n))
        resampled = (np.asarray(c)[index] for c in columns)
    else:
        index = np.empty((resamples, n), np.int64)
        for label in np.unique(strata):
            slots = np.flatnonzero(strata == label)
            index[:, slots] = slots[rng.integers(0, slots.size, size=(resamples, slots.size))]
        resampled = (np.asarray(c)[index] for c in columns)
    values = np.asarray(statistic(*resampled), np.float64)
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def _cluster_weights(rng: np.random.Generator, groups: np.ndarray, strata: np.ndarray | None,
                     resamples: int) -> np.ndarray:
    """``[resamples, n]``: how often each row's cluster is drawn in each resample (clusters drawn
    with replacement within their stratum, as many as the stratum has, in label order)."""
    labels, cluster = np.unique(groups, return_inverse=True)
    if strata is None:
        stratum_of = np.zeros(labels.size, np.int64)
    else:
        _, stratum = np.unique(strata, return_inverse=True)
        pairs = np.unique(np.stack([cluster, stratum]), axis=1)  # sorted by cluster
        if pairs.shape[1] != labels.size:
            spread = labels[np.bincount(pairs[0]) > 1]
            raise ValueError(f"groups {spread[:5].tolist()} span more than one stratum; each "
                             "group must lie in one stratum")
        stratum_of = pairs[1]
    counts = np.zeros(resamples * labels.size, np.int64)
    offsets = labels.size * np.arange(resamples)[:, None]
    for s in np.unique(stratum_of):
        members = np.flatnonzero(stratum_of == s)
        draws = members[rng.integers(0, members.size, size=(resamples, members.size))]
        counts += np.bincount((offsets + draws).ravel(), minlength=counts.size)
    return counts.reshape(resamples, labels.size)[:, cluster].astype(np.float64)
