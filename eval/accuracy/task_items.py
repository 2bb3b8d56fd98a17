"""How each multiple-choice task cuts its items from held-out units: answers, distractors drawn
within a length window, answer positions balanced (the tasks themselves: ``tasks.py``)."""

from __future__ import annotations

import bisect
import collections
import random
import re
from collections.abc import Iterable, Mapping, Sequence

from loraswitch_jax.eval.accuracy.leakage import TrainingText, leaked_texts
from loraswitch_jax.eval.accuracy.markup import WORD, clean_rst, dedent, split_sentences
from loraswitch_jax.eval.accuracy.wordnet import split_gloss

__all__ = ["HEADWORD_CONTEXT", "LENGTH_WINDOW", "MAX_CONTEXT_CHARS", "MIN_SENTENCE_WORDS",
           "NUM_OPTIONS", "TaskError", "definition_drafts", "definition_items", "doc_questions",
           "headword_stems", "next_sentence_drafts", "next_sentence_items", "place", "qa_drafts",
           "qa_items", "shared_stems"]

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


def place(task: str, drafts: list[dict], seed: int, max_items: int | None) -> list[dict]:
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


# ---- definition -----------------------------------------------------------------------------

_DICTIONARY_UNIT = re.compile(r"(.+?) \((n|v|adj|adv)\.\): (.*)", re.S)
HEADWORD_CONTEXT = re.compile(r"(.+?) \((?:n|v|adj|adv)\.\):")  # a definition item's context
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
    words = (w for w in WORD.findall(headword.lower())
             if len(w) >= 3 and w not in _FUNCTION_WORDS)
    return tuple(dict.fromkeys(_stem(w) for w in words))


def shared_stems(stems: Sequence[str], text: str) -> int:
    """How many of ``stems`` begin a word of ``text`` (lowercase): "run" is shared by "runs",
    "running" and "runner", not by "prune"."""
    words = WORD.findall(text.lower())
    return sum(any(w.startswith(stem) for w in words) for stem in stems)


def definition_items(rows: Sequence[Mapping], *, hard: bool = False, seed: int = 0,
                     max_items: int | None = None,
                     training: TrainingText | None = None) -> list[dict]:
    """Definition items from held-out dictionary rows (``key`` ``lexname:offset``, ``text``).

    With ``training``, definitions it finds leaked are neither answers nor distractors.
    """
    drafts, _ = definition_drafts(rows, hard, seed, training)
    return place("definition_hard" if hard else "definition", drafts, seed, max_items)


def definition_drafts(rows: Sequence[Mapping], hard: bool, seed: int,
                       training: TrainingText | None) -> tuple[list[dict], dict[str, int]]:
    """Drafts for :func:`place` and the leak filter's counts (items checked, dropped)."""
    task = "definition_hard" if hard else "definition"
    synsets = []
    for row in rows:
        m = _DICTIONARY_UNIT.fullmatch(row["text"])
        if m is None:
            raise TaskError(f"dictionary unit {row['key']!r} is not 'lemmas (pos.): gloss'")
        definition, _ = split_gloss(m.group(3))
        synsets.append((row["key"], m.group(1).split(", "), m.group(2), definition))
    leaked = leaked_texts((definition for *_, definition in synsets), training)
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
    drafts, _ = next_sentence_drafts(rows, seed, min_words, training)
    return place("next_sentence", drafts, seed, max_items)


def next_sentence_drafts(rows: Sequence[Mapping], seed: int, min_words: int,
                          training: TrainingText | None) -> tuple[list[dict], dict[str, int]]:
    """Drafts for :func:`place` and the leak filter's counts (items checked, dropped)."""
    paragraphs = []  # (book, block key, paragraph id, sentences)
    for row in rows:
        book = row["key"].split(":")[0]
        for p, paragraph in enumerate(row["text"].split("\n\n")):
            paragraphs.append((book, row["key"], f"{row['key']}/{p}", split_sentences(paragraph)))
    candidates = [s for *_, sentences in paragraphs for s in sentences
                  if len(s.split()) >= min_words]
    leaked = leaked_texts(candidates, training)
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
        answer = _first_sentence(dedent("\n".join(body)))
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
    drafts, _ = qa_drafts(faq_rows, doc_rows, seed, training)
    return place("qa", drafts, seed, max_items)


def qa_drafts(faq_rows: Sequence[Mapping], doc_rows: Sequence[Mapping], seed: int,
               training: TrainingText | None) -> tuple[list[dict], dict[str, int]]:
    """Drafts for :func:`place` and the leak filter's counts (items checked, dropped)."""
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
    leaked = leaked_texts((answer for *_, answer in questions), training)
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
