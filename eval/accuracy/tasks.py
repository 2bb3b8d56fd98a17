"""Four-option multiple-choice tasks built from the corpus's held-out units only.

``python -m loraswitch_jax.eval.tasks --corpus DIR --out DIR/tasks`` writes one ``{task}.jsonl``
per task and ``manifest.json`` (item counts, sha256, leak-filter counts, trivial baselines);
building a corpus (``eval/corpus.py``) runs it too. An item is ``{"task", "id", "source", "unit",
"context", "options": [4 strings], "answer": int}``; a scorer joins context and option with one
space (``context + " " + option``). ``unit`` is the held-out corpus unit the item was cut from,
``"{domain}:{key}"`` (a synset, a block of 20 Austen paragraphs, an FAQ question, a documentation
file): items of one unit share text, so intervals over items should resample whole units.

* ``definition`` (WordNet): context ``"apparition (n.):"``, answer its definition (the gloss
  without its quoted examples), distractors: definitions of other held-out synsets of the same
  part of speech that do not share the headword. The easy variant: about a third of its answers
  share the headword's stem (:func:`headword_stems`), a cue the ``stem`` baseline measures.
* ``definition_hard``: distractors from the synset's lexicographer file (``noun.artifact``, ...),
  and no option shares the headword's stem: items whose answer does are dropped, distractors that
  do are not drawn (a distractor with the stem would be a decoy, a cue pointing away from the
  answer). Its ``stem`` baseline is chance by construction.
* ``next_sentence`` (Austen): context = the earlier sentences of a paragraph (the last 600
  characters' worth, at least one sentence), answer = the next sentence, distractors =
  held-out sentences of the same book, from other paragraphs, 0.6-1.6x the answer's length.
* ``qa``: FAQ questions (perlfaq, Python FAQ, Debian FAQ; answer = its first sentences, at least
  40 characters) pooled with "what does ``module.func(sig)`` do?" from held-out documentation files
  (answer = the first sentence of its description); distractors from the same source.

Every task draws distractors 0.6-1.6x the answer's length where the pool allows (only
``next_sentence`` requires it and drops items otherwise; the others widen the window), which
keeps the longest/shortest-option baselines near chance. Answer positions are balanced: a
seeded shuffle of ``[0, 1, 2, 3, 0, 1, ...]``. Always report :func:`baselines` beside a model.

Held-out units can still repeat training text (a documentation sentence copied into a stdlib
docstring, a gloss WordNet gives two synsets), and a model fine-tuned on it may have memorised
such an answer. :func:`build_tasks` therefore drops every text that :class:`TrainingText` finds
in the training split of any domain: as an answer (the item is dropped) and as a distractor (so a
memorised option is never the wrong one either). The manifest records, per task, how many
candidate items the filter checked and dropped (before ``max_items`` sampling): on the full
corpus (2026-11) 202 of 5,845 definition items, 128 of 3,888 definition_hard, 17 of 2,174
next_sentence (short stock phrases) and 109 of 615 qa items (17.7 %, mostly docstrings).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from loraswitch_jax.eval.corpus import (DOMAINS, CorpusError, clean_rst, read_units, split_gloss,
                                        split_sentences)

__all__ = ["TASKS", "TaskError", "TrainingText", "baselines", "build_tasks", "definition_items",
           "doc_questions", "headword_stems", "load_items", "main", "next_sentence_items",
           "qa_items", "shared_stems", "write_tasks"]

TASKS = ("definition", "definition_hard", "next_sentence", "qa")
NUM_OPTIONS = 4
LENGTH_WINDOW = (0.6, 1.6)  # distractor length / answer length, in characters
MAX_CONTEXT_CHARS = 600  # next_sentence: earlier sentences kept, newest first
MIN_SENTENCE_WORDS = 4  # next_sentence: shorter sentences are neither answers nor distractors


class TaskError(ValueError):
    """A task file or item is malformed."""


# ---- distractors and placement --------------------------------------------------------------

class _Pool:
    """Candidate option texts sorted by length, for draws within a length window."""

    def __init__(self, entries: Iterable[tuple[str, object]]):
        # entries: (text, group); a draw excludes the target's group (same synset, paragraph ...)
        self.entries = sorted(set(entries), key=lambda e: (len(e[0]), e[0], str(e[1])))
        self.lengths = [len(text) for text, _ in self.entries]

    def draw(self, rng: random.Random, answer: str, *, exclude=lambda text, group: False,
             strict: bool) -> list[str] | None:
        """Three distinct texts in the length window; ``None`` if there are not enough.

        Not ``strict``: the window widens (x1.5 per step) until three are found.
        """
        low, high = LENGTH_WINDOW
        for _ in range(1 if strict else 8):
            start = bisect.bisect_left(self.lengths, low * len(answer))
            stop = bisect.bisect_right(self.lengths, high * len(answer))
            order = list(range(start, stop))
            rng.shuffle(order)
            chosen: list[str] = []
            for i in order:
                text, group = self.entries[i]
                if text != answer and text not in chosen and not exclude(text, group):
                    chosen.append(text)
                    if len(chosen) == NUM_OPTIONS - 1:
                        return chosen
            low, high = low / 1.5, high * 1.5
        return None


def _place(task: str, drafts: list[dict], seed: int, max_items: int | None) -> list[dict]:
    """Items from drafts (``answer_text``, ``distractors``): sampled, answer positions balanced."""
    rng = random.Random(f"{seed}:{task}:place")
    drafts = sorted(drafts, key=lambda d: d["id"])
    if max_items is not None and len(drafts) > max_items:
        drafts = sorted(rng.sample(drafts, max_items), key=lambda d: d["id"])
    positions = [i % NUM_OPTIONS for i in range(len(drafts))]
    rng.shuffle(positions)
    items = []
    for draft, position in zip(drafts, positions):
        options = list(draft["distractors"])
        rng.shuffle(options)
        options.insert(position, draft["answer_text"])
        items.append({"task": task, "id": draft["id"], "source": draft["source"],
                      "unit": draft["unit"], "context": draft["context"], "options": options,
                      "answer": position})
    return items


# ---- answers seen in training text ----------------------------------------------------------

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
            words = _WORD.findall(text.casefold())
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
                         for w in _WORD.findall(text.casefold())], np.uint64)

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


def _leaked_texts(texts: Iterable[str], training: TrainingText | None) -> set[str]:
    """The distinct ``texts`` that ``training`` finds leaked (none without ``training``)."""
    if training is None:
        return set()
    texts = sorted(set(texts))
    return {text for text, leaked in zip(texts, training.leaked(texts)) if leaked}


# ---- definition -----------------------------------------------------------------------------

_DICTIONARY_UNIT = re.compile(r"(.+?) \((n|v|adj|adv)\.\): (.*)", re.S)
_HEADWORD_CONTEXT = re.compile(r"(.+?) \((?:n|v|adj|adv)\.\):")  # a definition item's context
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits
_SUFFIXES = tuple(sorted(set(
    "ization isation ability ibility ically ical ations ation itions ition ments ment ness less "
    "ings ing ities ity ions ion ives ive ously ous ists ist isms ism izes ized ize ises ised ise "
    "ated ate ers er ors or ed es ies ic ial al ally ly able ible ance ence ant ent ful s y e"
    .split()), key=len, reverse=True))
_FUNCTION_WORDS = frozenset({"the", "and", "for", "with", "from", "into"})
MIN_STEM = 4  # letters a suffix removal must leave


def _stem(word: str) -> str:
    for _ in range(2):  # at most two suffixes: constitutionally -> constitution -> constitut
        suffix = next((x for x in _SUFFIXES if word.endswith(x)
                       and len(word) - len(x) >= MIN_STEM), None)
        if suffix is None:
            break
        word = word[:-len(suffix)]
    if len(word) >= 4 and word[-1] == word[-2] and word[-1] not in "aeiouylsz":  # runn -> run
        word = word[:-1]
    return word


def headword_stems(headword: str) -> tuple[str, ...]:
    """The stems of a headword's words, the cue :func:`shared_stems` looks for.

    Words are the lowercase runs of letters and digits of at least 3 characters, except a few
    function words (the, and, for, with, from, into). A word's stem: up to two rounds of removing
    its longest common English suffix (``_SUFFIXES``) that leaves at least :data:`MIN_STEM`
    letters, then a final doubled consonant other than l, s, z made single ("runner" -> "run",
    "idealization" -> "ideal", "mandibular joint" -> "mandibular", "joint").
    """
    words = (w for w in _WORD.findall(headword.lower())
             if len(w) >= 3 and w not in _FUNCTION_WORDS)
    return tuple(dict.fromkeys(_stem(w) for w in words))


def shared_stems(stems: Sequence[str], text: str) -> int:
    """How many of ``stems`` begin a word of ``text`` (lowercase): "run" is shared by "runs",
    "running" and "runner", not by "prune"."""
    words = _WORD.findall(text.lower())
    return sum(any(w.startswith(stem) for w in words) for stem in stems)


def definition_items(rows: Sequence[Mapping], *, hard: bool = False, seed: int = 0,
                     max_items: int | None = None,
                     training: TrainingText | None = None) -> list[dict]:
    """Definition items from held-out dictionary rows (``key`` ``lexname:offset``, ``text``).

    With ``training``, definitions it finds leaked are neither answers nor distractors.
    """
    drafts, _ = _definition_drafts(rows, hard, seed, training)
    return _place("definition_hard" if hard else "definition", drafts, seed, max_items)


def _definition_drafts(rows: Sequence[Mapping], hard: bool, seed: int,
                       training: TrainingText | None) -> tuple[list[dict], dict[str, int]]:
    """Drafts for :func:`_place` and the leak filter's counts (items checked, dropped)."""
    task = "definition_hard" if hard else "definition"
    synsets = []
    for row in rows:
        m = _DICTIONARY_UNIT.fullmatch(row["text"])
        if m is None:
            raise TaskError(f"dictionary unit {row['key']!r} is not 'lemmas (pos.): gloss'")
        definition, _ = split_gloss(m.group(3))
        synsets.append((row["key"], m.group(1).split(", "), m.group(2), definition))
    leaked = _leaked_texts((definition for *_, definition in synsets), training)
    pools = collections.defaultdict(list)
    for key, lemmas, pos, definition in synsets:
        if definition not in leaked:
            pools[pos].append((definition, tuple(lemmas)))
            pools[key.split(":")[0]].append((definition, tuple(lemmas)))
    pools = {name: _Pool(entries) for name, entries in pools.items()}
    rng = random.Random(f"{seed}:{task}:draw")
    drafts, leak = [], {"checked": 0, "dropped": 0}
    for key, lemmas, pos, definition in synsets:
        headword, stems = lemmas[0], headword_stems(lemmas[0])
        if hard and shared_stems(stems, definition):
            continue  # the answer gives itself away
        leak["checked"] += 1
        if definition in leaked:
            leak["dropped"] += 1
            continue
        def exclude(text, group, headword=headword, stems=stems):
            return headword in group or (hard and shared_stems(stems, text) > 0)
        distractors = None
        if hard:
            distractors = pools[key.split(":")[0]].draw(rng, definition, exclude=exclude,
                                                         strict=False)
        distractors = distractors or pools[pos].draw(rng, definition, exclude=exclude,
                                                     strict=False)
        if distractors:
            drafts.append({"id": f"{task}/{key}", "source": f"wordnet:{key.split(':')[0]}",
                           "unit": f"dictionary:{key}", "context": f"{headword} ({pos}.):",
                           "answer_text": definition, "distractors": distractors})
    return drafts, leak


# ---- next sentence --------------------------------------------------------------------------

def next_sentence_items(rows: Sequence[Mapping], *, seed: int = 0,
                        min_words: int = MIN_SENTENCE_WORDS,
                        max_items: int | None = None,
                        training: TrainingText | None = None) -> list[dict]:
    """Next-sentence items from held-out literature rows (``key`` ``book:block``, paragraphs
    separated by blank lines). Sentences of fewer than ``min_words`` words are not answers.

    With ``training``, sentences it finds leaked are neither answers nor distractors.
    """
    drafts, _ = _next_sentence_drafts(rows, seed, min_words, training)
    return _place("next_sentence", drafts, seed, max_items)


def _next_sentence_drafts(rows: Sequence[Mapping], seed: int, min_words: int,
                          training: TrainingText | None) -> tuple[list[dict], dict[str, int]]:
    """Drafts for :func:`_place` and the leak filter's counts (items checked, dropped)."""
    paragraphs = []  # (book, block key, paragraph id, sentences)
    for row in rows:
        book = row["key"].split(":")[0]
        for p, paragraph in enumerate(row["text"].split("\n\n")):
            paragraphs.append((book, row["key"], f"{row['key']}/{p}", split_sentences(paragraph)))
    candidates = [s for *_, sentences in paragraphs for s in sentences
                  if len(s.split()) >= min_words]
    leaked = _leaked_texts(candidates, training)
    pools = collections.defaultdict(list)
    for book, _, pid, sentences in paragraphs:
        pools[book].extend((s, pid) for s in sentences
                           if len(s.split()) >= min_words and s not in leaked)
    pools = {book: _Pool(entries) for book, entries in pools.items()}
    rng = random.Random(f"{seed}:next_sentence:draw")
    drafts, leak = [], {"checked": 0, "dropped": 0}
    for book, block, pid, sentences in paragraphs:
        for i in range(1, len(sentences)):
            if len(sentences[i].split()) < min_words:
                continue
            leak["checked"] += 1
            if sentences[i] in leaked:
                leak["dropped"] += 1
                continue
            first = i - 1  # the nearest earlier sentences, up to MAX_CONTEXT_CHARS
            while first > 0 and len(" ".join(sentences[first - 1:i])) <= MAX_CONTEXT_CHARS:
                first -= 1
            distractors = pools[book].draw(
                rng, sentences[i], strict=True,
                exclude=lambda text, group, pid=pid: group == pid)
            if distractors:
                drafts.append({"id": f"next_sentence/{pid}/{i}", "source": f"austen:{book}",
                               "unit": f"literature:{block}",
                               "context": " ".join(sentences[first:i]),
                               "answer_text": sentences[i], "distractors": distractors})
    return drafts, leak


# ---- question answering ---------------------------------------------------------------------

_QA_UNIT = re.compile(r"Q: (.*?)\nA: (.*)", re.S)
_DIRECTIVE = re.compile(r"( *)\.\. (function|method|classmethod|staticmethod|class|exception|"
                        r"decorator|coroutinefunction|coroutinemethod|module|currentmodule)::"
                        r"\s*(.*)")
MAX_SIGNATURE_CHARS = 120
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")  # keeps the next line's indentation


def _snippet(text: str, min_chars: int = 40, max_chars: int = 300) -> str | None:
    """The first sentences of the prose paragraphs of ``text``: at least ``min_chars``."""
    words = []
    for paragraph in re.split(_BLANK_LINES, text):
        if paragraph[:1].isspace() or re.match(r"(\* |- |\.\. )", paragraph):
            continue  # code, lists, directives
        paragraph = re.sub(r"^\((?:answer )?contributed by [^)]*\)\s*", "", paragraph)
        paragraph = re.sub(r"::$", ":", paragraph.rstrip())  # reST's "introduces a code block"
        for sentence in split_sentences(paragraph):
            if len(" ".join([*words, sentence])) > max_chars:
                return None
            words.append(sentence)
            if len(" ".join(words)) >= min_chars:
                return " ".join(words)
    return None


def doc_questions(key: str, rst: str) -> list[tuple[str, str, str]]:
    """(id, question, answer) per Python object documented in a reST file.

    The question names ``module.Class.func(signature)``; the answer is the first sentence of the
    first prose paragraph of its description.
    """
    lines = rst.splitlines()
    module, classes, found = "", [], []
    for i, line in enumerate(lines):
        m = _DIRECTIVE.fullmatch(line)
        if m is None:
            continue
        indent, kind, signature = len(m.group(1)), m.group(2), m.group(3)
        if kind in ("module", "currentmodule"):
            module = "" if signature.strip() == "None" else signature.strip()
            continue
        j = i
        while signature.endswith("\\") and j + 1 < len(lines):  # continued signature
            j += 1
            signature = signature[:-1].rstrip() + " " + lines[j].strip()
        classes = [(n, name) for n, name in classes if n < indent]
        name = signature.split("(", 1)[0].strip()
        if kind in ("class", "exception"):
            classes.append((indent, name))
        body, j = [], j + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip())
                                  > indent):
            body.append(lines[j][indent:])
            j += 1
        answer = _first_sentence(_dedent_block("\n".join(body)))
        if "(" not in signature or answer is None:
            continue
        if classes and kind not in ("class", "exception") and "." not in name:
            signature = f"{classes[-1][1]}.{signature}"
        if module and not signature.startswith(module + "."):
            signature = f"{module}.{signature}"
        if len(signature) > MAX_SIGNATURE_CHARS:
            signature = signature.split("(", 1)[0] + "(...)"
        found.append((f"{key}#{signature.split('(', 1)[0]}", f"What does `{signature}` do?",
                      answer))
    return found


def _dedent_block(text: str) -> str:
    lines = text.splitlines()
    indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
    return "\n".join(l[indent:] for l in lines)


def _first_sentence(description: str) -> str | None:
    for paragraph in re.split(_BLANK_LINES, description.lstrip("\n")):
        if not paragraph.strip() or paragraph.startswith((" ", ":", "..")):
            continue  # option lines, nested directives, literal blocks
        if paragraph.startswith(("*", "-", ">>>")):
            return None
        sentences = split_sentences(clean_rst(paragraph))
        if sentences and 20 <= len(sentences[0]) <= 300 and sentences[0].endswith("."):
            return sentences[0]
        return None
    return None


def qa_items(faq_rows: Sequence[Mapping], doc_rows: Sequence[Mapping], *, seed: int = 0,
             max_items: int | None = None, training: TrainingText | None = None) -> list[dict]:
    """QA items from held-out ``qa`` rows (``Q: ...\\nA: ...``) and held-out ``docs`` rows.

    With ``training``, answers it finds leaked are neither answers nor distractors.
    """
    drafts, _ = _qa_drafts(faq_rows, doc_rows, seed, training)
    return _place("qa", drafts, seed, max_items)


def _qa_drafts(faq_rows: Sequence[Mapping], doc_rows: Sequence[Mapping], seed: int,
               training: TrainingText | None) -> tuple[list[dict], dict[str, int]]:
    """Drafts for :func:`_place` and the leak filter's counts (items checked, dropped)."""
    questions = []  # (id, source, unit, pool names (nearest first), question, answer)
    for row in faq_rows:
        m = _QA_UNIT.fullmatch(row["text"])
        if m is None:
            raise TaskError(f"qa unit {row['key']!r} is not 'Q: ...\\nA: ...'")
        answer = _snippet(m.group(2))
        source = row["key"].split(":")[0]
        if answer:  # one pool per FAQ (perlfaq1-9 together): each FAQ has its own voice
            questions.append((f"qa/{row['key']}", source, f"qa:{row['key']}",
                              (re.sub(r"[/\d].*", "", source),), m.group(1), answer))
    for row in doc_rows:
        for item_id, question, answer in doc_questions(row["key"], row["text"]):
            # Same file first: its distractors share the module's words, as the answer does.
            questions.append((f"qa/{item_id}", "python-docs", f"docs:{row['key']}",
                              (row["key"], "python-docs"), question, answer))
    leaked = _leaked_texts((answer for *_, answer in questions), training)
    pools = collections.defaultdict(list)
    for item_id, _, _, names, _, answer in questions:
        if answer not in leaked:
            for name in names:
                pools[name].append((answer, item_id))
    pools = {name: _Pool(entries) for name, entries in pools.items()}
    rng = random.Random(f"{seed}:qa:draw")
    drafts, seen, leak = [], set(), {"checked": 0, "dropped": 0}
    for item_id, source, unit, names, question, answer in questions:
        if item_id in seen:  # a name documented twice in one file: keep the first
            continue
        seen.add(item_id)
        leak["checked"] += 1
        if answer in leaked:
            leak["dropped"] += 1
            continue
        for n, name in enumerate(names):  # the last pool may widen the length window
            distractors = pools[name].draw(rng, answer, strict=n < len(names) - 1)
            if distractors:
                drafts.append({"id": item_id, "source": source, "unit": unit,
                               "context": f"Q: {question}\nA:", "answer_text": answer,
                               "distractors": distractors})
                break
    return drafts, leak


# ---- files, baselines, command line ---------------------------------------------------------

def build_tasks(corpus: str, *, max_items: int | None = None,
                seed: int = 0) -> tuple[dict[str, list], dict[str, dict]]:
    """All tasks' items from the held-out files of a built corpus folder, and per task the leak
    filter's counts ``{"leak_filter": {"checked": n, "dropped": m}}`` for :func:`write_tasks`.

    Texts that the training files of any domain repeat (:class:`TrainingText`) are dropped; the
    counts are candidate items before ``max_items`` sampling.
    """
    def units(domain: str, split: str) -> list[dict]:
        return read_units(os.path.join(corpus, f"{domain}.{split}.jsonl"))
    training = TrainingText(row["text"] for domain in DOMAINS for row in units(domain, "train"))
    dictionary = units("dictionary", "heldout")
    drafts = {
        "definition": _definition_drafts(dictionary, False, seed, training),
        "definition_hard": _definition_drafts(dictionary, True, seed, training),
        "next_sentence": _next_sentence_drafts(units("literature", "heldout"), seed,
                                               MIN_SENTENCE_WORDS, training),
        "qa": _qa_drafts(units("qa", "heldout"), units("docs", "heldout"), seed, training),
    }
    items = {task: _place(task, task_drafts, seed, max_items)
             for task, (task_drafts, _) in drafts.items()}
    return items, {task: {"leak_filter": leak} for task, (_, leak) in drafts.items()}


def write_tasks(items_by_task: Mapping[str, list[dict]], out: str,
                filters: Mapping[str, Mapping] | None = None) -> dict:
    """Writes ``out/{task}.jsonl`` and ``out/manifest.json``; returns the manifest.

    ``filters``: per task, what the item filters dropped (from :func:`build_tasks`), recorded
    in the manifest beside the counts and baselines.
    """
    os.makedirs(out, exist_ok=True)
    manifest = {}
    for task, items in items_by_task.items():
        path = os.path.join(out, f"{task}.jsonl")
        data = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode()
        with open(path, "wb") as f:
            f.write(data)
        manifest[task] = {"items": len(items), "units": len({item["unit"] for item in items}),
                          "sha256": hashlib.sha256(data).hexdigest(),
                          **(filters or {}).get(task, {}), "baselines": baselines(items)}
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load_items(path: str) -> list[dict]:
    """The items of a task file, checked: a context, 4 distinct options, an answer index and a
    source unit."""
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                options, answer = item.get("options"), item.get("answer")
                if (not isinstance(item.get("context"), str) or not isinstance(options, list)
                        or len(options) != NUM_OPTIONS or len(set(options)) != NUM_OPTIONS
                        or not isinstance(answer, int) or not 0 <= answer < NUM_OPTIONS):
                    raise TaskError(f"{path}:{n}: an item needs a context, {NUM_OPTIONS} "
                                    "distinct options and an answer index")
                if not isinstance(item.get("unit"), str) or not item["unit"]:
                    raise TaskError(f"{path}:{n}: an item needs its source unit ('unit'); "
                                    "task files written before it was added must be rebuilt "
                                    "(python -m loraswitch_jax.eval.tasks)")
                items.append(item)
    except (OSError, ValueError) as e:
        if isinstance(e, TaskError):
            raise
        raise TaskError(f"cannot read task file {path}: {e}") from e
    return items


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def baselines(items: Sequence[Mapping]) -> dict[str, float | None]:
    """Accuracy of trivial rules: choose the longest option, the shortest, the one sharing most
    words (distinct, lowercase) with the context, or the one sharing most of the headword's stems
    (:func:`headword_stems`, :func:`shared_stems`; ``None`` for tasks whose contexts name no
    headword, i.e. all but the definition tasks). A tie among k options counts 1/k if the answer
    is among them: the expected accuracy of breaking ties at random (an item where no option
    shares a stem counts 1/4)."""
    def stems(item):
        m = _HEADWORD_CONTEXT.fullmatch(item["context"])
        return headword_stems(m.group(1)) if m else ()
    rules = {"longest": lambda item, o: len(o), "shortest": lambda item, o: -len(o),
             "overlap": lambda item, o: len(_words(o) & _words(item["context"])),
             "stem": lambda item, o: shared_stems(stems(item), o)}
    result = {"items": len(items), "chance": 1 / NUM_OPTIONS}
    for name, score in rules.items():
        credit = 0.0
        for item in items:
            scores = [score(item, option) for option in item["options"]]
            best = [i for i, s in enumerate(scores) if s == max(scores)]
            credit += (item["answer"] in best) / len(best)
        result[name] = credit / len(items) if items else float("nan")
    if not any(_HEADWORD_CONTEXT.fullmatch(item["context"]) for item in items):
        result["stem"] = None
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build the task files from a corpus folder and print the baselines."""
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.tasks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="folder built by eval.corpus")
    parser.add_argument("--out", help="task folder (default CORPUS/tasks)")
    parser.add_argument("--max-items", type=int, help="items per task at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        items, filters = build_tasks(args.corpus, max_items=args.max_items, seed=args.seed)
        manifest = write_tasks(items, args.out or os.path.join(args.corpus, "tasks"), filters)
    except (CorpusError, TaskError) as e:
        sys.exit(f"error: {e}")
    print(f"{'task':16s} {'items':>6s} {'units':>6s} {'leaked':>7s} {'longest':>8s} "
          f"{'shortest':>9s} {'overlap':>8s} {'stem':>6s}")
    for task, info in manifest.items():
        b = info["baselines"]
        stem = "-" if b["stem"] is None else f"{b['stem']:.3f}"
        print(f"{task:16s} {info['items']:6d} {info['units']:6d} "
              f"{info['leak_filter']['dropped']:7d} {b['longest']:8.3f} "
              f"{b['shortest']:9.3f} {b['overlap']:8.3f} {stem:>6s}")


if __name__ == "__main__":
    main()
