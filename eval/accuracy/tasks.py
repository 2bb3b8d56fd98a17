"""Four-option multiple-choice tasks built from the corpus's held-out units only.

``python -m loraswitch_jax.eval.accuracy.tasks --corpus DIR --out DIR/tasks`` writes one
``{task}.jsonl`` per task and ``manifest.json`` (item counts, sha256, leak-filter counts, trivial
baselines); building a corpus (``corpus.py``) runs it too; ``task_items.py`` cuts the items.
An item is ``{"task", "id", "source", "unit", "context", "options": [4 strings], "answer":
int}``; a scorer joins context and option with one space (``context + " " + option``). ``unit``
is the held-out corpus unit the item was cut from, ``"{domain}:{key}"`` (a synset, a block of 20
Austen paragraphs, an FAQ question, a documentation file): items of one unit share text, so
intervals over items should resample whole units.

* ``definition`` (WordNet): context ``"apparition (n.):"``, answer its definition (the gloss
  without its quoted examples), distractors: definitions of other held-out synsets of the same
  part of speech that do not share the headword. The easy variant: about a third of its answers
  share the headword's stem (``task_items.headword_stems``), a cue the ``stem`` baseline measures.
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
such an answer. :func:`build_tasks` therefore drops every text that ``leakage.TrainingText`` finds
in the training split of any domain: as an answer (the item is dropped) and as a distractor (so a
memorised option is never the wrong one either). The manifest records, per task, how many
candidate items the filter checked and dropped (before ``max_items`` sampling): on the full
corpus (2026-11) 202 of 5,845 definition items, 128 of 3,888 definition_hard, 17 of 2,174
next_sentence (short stock phrases) and 109 of 615 qa items (17.7 %, mostly docstrings).
"""


from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

from loraswitch_jax.eval.accuracy.domains import DOMAINS, CorpusError, read_units
from loraswitch_jax.eval.accuracy.task_items import (HEADWORD_CONTEXT, MIN_SENTENCE_WORDS,
                                                NUM_OPTIONS, TaskError, definition_drafts,
                                                headword_stems, next_sentence_drafts, place,
                                                qa_drafts, shared_stems)
from loraswitch_jax.eval.accuracy.leakage import TrainingText

__all__ = ["TASKS", "baselines", "build_tasks", "load_items", "main", "write_tasks"]

TASKS = ("definition", "definition_hard", "next_sentence", "qa")



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
        "definition": definition_drafts(dictionary, False, seed, training),
        "definition_hard": definition_drafts(dictionary, True, seed, training),
        "next_sentence": next_sentence_drafts(units("literature", "heldout"), seed,
                                               MIN_SENTENCE_WORDS, training),
        "qa": qa_drafts(units("qa", "heldout"), units("docs", "heldout"), seed, training),
    }
    items = {task: place(task, task_drafts, seed, max_items)
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
                                    "(python -m loraswitch_jax.eval.accuracy.tasks)")
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
    (``task_items.headword_stems``, ``task_items.shared_stems``; ``None`` for tasks whose contexts
    name no headword, i.e. all but the definition tasks). A tie among k options counts 1/k if the
    answer is among them: the expected accuracy of breaking ties at random (an item where no
    option shares a stem counts 1/4)."""
    def stems(item):
        m = HEADWORD_CONTEXT.fullmatch(item["context"])
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
    if not any(HEADWORD_CONTEXT.fullmatch(item["context"]) for item in items):
        result["stem"] = None
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build the task files from a corpus folder and print the baselines."""
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.accuracy.tasks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="folder built by eval.accuracy.corpus")
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
