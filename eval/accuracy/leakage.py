"""Option texts that repeat the corpus's training text, found by hashed runs of words.

A model fine-tuned on training text may have memorised such a text, so the tasks drop it as an
answer and as a distractor (:func:`~loraswitch_jax.eval.accuracy.tasks.build_tasks`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import numpy as np

from loraswitch_jax.eval.accuracy.markup import WORD

__all__ = ["LEAK_COVERAGE", "LEAK_MIN_WORDS", "LEAK_NGRAM", "TrainingText", "leaked_texts"]

LEAK_NGRAM = 8  # words per shingle
LEAK_MIN_WORDS = 5  # shorter texts are common phrases ("a weed", "How glad I am!"): never leaked
LEAK_COVERAGE = 0.5  # share of a text's words inside shingles found in training text
_UNKNOWN_WORD = np.uint64(1 << 62)  # the id of a word training text lacks: matches nothing
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def _shingle_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hashes (mod 2**64) of every run of ``n`` consecutive word ids."""
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    hashes = ids[:count].copy()
    for j in range(1, n):
        hashes = hashes * _HASH_MULTIPLIER + ids[j:j + count]
    return hashes


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    values = np.sort(values)  # sort and compare neighbours: faster than np.unique here
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _found(sorted_unique: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Which ``queries`` occur in ``sorted_unique`` (both uint64)."""
    if not len(sorted_unique):
        return np.zeros(len(queries), bool)
    at = np.searchsorted(sorted_unique, queries).clip(0, len(sorted_unique) - 1)
    return sorted_unique[at] == queries


class TrainingText:
    """The word shingles of a corpus's training text, to find option texts it repeats.

    Texts are compared as words: the casefolded runs of letters and digits, so whitespace,
    punctuation and markup (reST roles, docstring indentation) do not hide a copy; inflections
    do ("Return" and "Returns" differ). A text of at least :data:`LEAK_NGRAM` (8) words is
    *leaked* when at least :data:`LEAK_COVERAGE` (half) of its words lie in 8-word runs that
    occur verbatim in some training text; a text of :data:`LEAK_MIN_WORDS` to 7 words when all
    of it occurs as one run; a shorter one never (4 words or fewer are common phrases, not a
    memorised answer). No run spans two training texts.

    Runs of words are kept as sorted 64-bit hashes, one array per run length, built when first
    needed (8 bytes per training word and length: up to ~200 MB with the word ids for the full
    40 MB corpus, ~3 s to build; a false match has probability ~1e-8).
    """

    def __init__(self, texts: Iterable[str]):
        self._vocabulary: dict[str, int] = {}
        chunks = [np.zeros(1, np.uint64)]
        for text in texts:
            words = WORD.findall(text.casefold())
            chunks.append(np.fromiter(
                (self._vocabulary.setdefault(w, len(self._vocabulary) + 1) for w in words),
                np.uint64, len(words)))
            chunks.append(np.zeros(1, np.uint64))  # id 0 ends a text: no shingle spans two
        self._ids = np.concatenate(chunks)
        self._runs: dict[int, np.ndarray] = {}  # words -> sorted distinct hashes of all runs

    def _run_hashes(self, n: int) -> np.ndarray:
        if n not in self._runs:
            self._runs[n] = _sorted_unique(_shingle_hashes(self._ids, n))
        return self._runs[n]

    def _word_ids(self, text: str) -> np.ndarray:
        return np.array([self._vocabulary.get(w, _UNKNOWN_WORD)
                         for w in WORD.findall(text.casefold())], np.uint64)

    def leaked(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text repeats training text (the rule in the class docstring)."""
        result = [False] * len(texts)
        long, short = [], collections.defaultdict(list)  # short: words -> [(index, hash)]
        for i, text in enumerate(texts):
            ids = self._word_ids(text)
            if len(ids) >= LEAK_NGRAM:
                long.append((i, len(ids), _shingle_hashes(ids, LEAK_NGRAM)))
            elif len(ids) >= LEAK_MIN_WORDS:
                short[len(ids)].append((i, _shingle_hashes(ids, len(ids))[0]))
        if long:  # one lookup for all shingles: a lookup per text costs more than its search
            found = _found(self._run_hashes(LEAK_NGRAM), np.concatenate([h for *_, h in long]))
            start = 0
            for i, words, hashes in long:
                covered = np.zeros(words, bool)
                for first in np.flatnonzero(found[start:start + len(hashes)]):
                    covered[first:first + LEAK_NGRAM] = True
                result[i] = bool(covered.mean() >= LEAK_COVERAGE)
                start += len(hashes)
        for n, queries in short.items():
            found = _found(self._run_hashes(n), np.array([h for _, h in queries], np.uint64))
            for (i, _), hit in zip(queries, found):
                result[i] = bool(hit)
        return result


def leaked_texts(texts: Iterable[str], training: TrainingText | None) -> set[str]:
    """The distinct ``texts`` that ``training`` finds leaked (none without ``training``)."""
    if training is None:
        return set()
    texts = sorted(set(texts))
    return {text for text, leaked in zip(texts, training.leaked(texts)) if leaked}

