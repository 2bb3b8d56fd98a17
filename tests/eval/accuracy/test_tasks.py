"""Task items, the leak filter, baselines, task files and the bundled sample."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random

import pytest

from loraswitch_jax.eval.accuracy import domains, leakage, markup, task_items, tasks
from loraswitch_jax.samples import sample_path


# ---- task builders -------------------------------------------------------------------------

WORDS = ("the of a to in that with for by from as which or its an on at be "
         "house letter morning walk friend sister garden river window carriage dinner").split()


def _phrase(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _check_items(items, task):
    assert items, f"no {task} items"
    for item in items:
        assert item["task"] == task and len(item["options"]) == 4
        assert len(set(item["options"])) == 4 and 0 <= item["answer"] < 4
        assert item["unit"].split(":")[0] in domains.DOMAINS
    counts = collections.Counter(item["answer"] for item in items)
    assert max(counts[p] for p in range(4)) - min(counts[p] for p in range(4)) <= 1


def _dictionary_rows(rng):
    rows = []
    for i in range(60):
        pos, lexname = ("n", "noun.artifact") if i % 3 else ("v", "verb.motion")
        marker = "move" if pos == "v" else "thing"
        gloss = f"{marker} {_phrase(rng, rng.randint(3, 12))}; \"an example\""
        rows.append({"key": f"{lexname}:{i:08d}", "text": f"word{i}, alias{i} ({pos}.): {gloss}"})
    return rows


def test_definition_items():
    rows = _dictionary_rows(random.Random(0))
    items = task_items.definition_items(rows, seed=0)
    _check_items(items, "definition")
    by_key = {r["key"]: r for r in rows}
    for item in items:
        key = item["id"].split("/", 1)[1]
        headword, pos = by_key[key]["text"].split(",")[0], key[0]
        assert item["context"] == f"{headword} ({pos}.):" and item["unit"] == f"dictionary:{key}"
        answer = item["options"][item["answer"]]
        assert by_key[key]["text"].split("): ", 1)[1].startswith(answer) and '"' not in answer
        marker = "move" if pos == "v" else "thing"  # same part of speech only
        assert all(o.startswith(marker) for o in item["options"])
    assert task_items.definition_items(rows, seed=0) == items
    assert task_items.definition_items(rows, seed=1) != items
    assert len(task_items.definition_items(rows, seed=0, max_items=10)) == 10


def test_headword_stems():
    assert task_items.headword_stems("runner") == ("run",)  # suffix, then the doubled consonant
    assert task_items.headword_stems("idealization") == ("ideal",)
    assert task_items.headword_stems("constitutionally") == ("constitut",)  # two suffixes at most
    assert task_items.headword_stems("hisser") == ("hiss",)  # a final ss stays
    assert task_items.headword_stems("Freedom of the Seas") == ("freedom", "seas")  # no "of", "the"
    assert task_items.headword_stems("upside-down cake") == ("upsid", "down", "cake")
    assert task_items.headword_stems("so") == ()  # words of 1-2 letters carry no stem
    assert task_items.shared_stems(("run",), "someone who runs") == 1
    assert task_items.shared_stems(("run",), "to prune a tree") == 0  # a word must start with it
    assert task_items.shared_stems(("upsid", "down", "cake"), "a cake turned upside down") == 3


def test_hard_definitions_drop_the_headword_stem():
    rng = random.Random(1)
    rows = _dictionary_rows(rng)
    # Half the artifact glosses mention "garden": the headword's stem for gardening (n.).
    rows += [{"key": "noun.artifact:99999999",
              "text": "gardening (n.): thing the work of tending a plot of land"},
             {"key": "noun.artifact:99999998",  # the answer gives itself away: "run"
              "text": "runner (n.): thing someone who runs from the house to the river"},
             {"key": "noun.artifact:99999997",
              "text": "walker (n.): thing a person who walks by the garden"}]
    items = task_items.definition_items(rows, hard=True, seed=0)
    _check_items(items, "definition_hard")
    item = next(i for i in items if i["context"] == "gardening (n.):")
    distractors = [o for k, o in enumerate(item["options"]) if k != item["answer"]]
    assert not any("garden" in o for o in distractors)
    assert not {"runner (n.):", "walker (n.):"} & {i["context"] for i in items}
    for item in items:  # no option shares a stem: the stem baseline is chance
        stems = task_items.headword_stems(item["context"].rsplit(" (", 1)[0])
        assert not any(task_items.shared_stems(stems, o) for o in item["options"])
    assert tasks.baselines(items)["stem"] == 0.25
    easy = task_items.definition_items(rows, seed=0)  # the easy variant keeps the cue ...
    assert {"runner (n.):", "walker (n.):"} < {i["context"] for i in easy}
    assert tasks.baselines(easy)["stem"] > 0.25  # ... and its stem baseline shows it


def _literature_rows(rng):
    rows = []
    for book in ("emma", "persuasion"):
        for block in range(3):
            paragraphs = []
            for _ in range(6):
                sentences = [(_phrase(rng, rng.randint(4, 14)) + ".").capitalize()
                             for _ in range(rng.randint(1, 5))]
                paragraphs.append(" ".join(sentences))
            rows.append({"key": f"{book}:{block:04d}", "text": "\n\n".join(paragraphs)})
    return rows


def test_next_sentence_items_follow_the_length_rule():
    rows = _literature_rows(random.Random(2))
    items = task_items.next_sentence_items(rows, seed=0)
    _check_items(items, "next_sentence")
    texts = {r["key"]: r["text"] for r in rows}
    for item in items:
        row_key, paragraph, index = item["id"].split("/")[1:]
        assert item["unit"] == f"literature:{row_key}"  # the block, shared by its paragraphs
        sentences = markup.split_sentences(texts[row_key].split("\n\n")[int(paragraph)])
        answer = item["options"][item["answer"]]
        assert answer == sentences[int(index)]
        assert item["context"].endswith(sentences[int(index) - 1])
        book_text = " ".join(t for k, t in texts.items() if k.startswith(row_key.split(":")[0]))
        for k, option in enumerate(item["options"]):
            if k != item["answer"]:
                assert 0.6 * len(answer) <= len(option) <= 1.6 * len(answer)
                assert option in book_text and option not in sentences


DOC_RST = """\
:mod:`textwrap` --- Text wrapping
=================================

.. module:: textwrap

.. function:: wrap(text, width=70, *, initial_indent="", \\
                   max_lines=None)

   Wraps the single paragraph in *text* so every line is at most *width* long.  Returns a list.

.. class:: TextWrapper(**kwargs)

   The :class:`TextWrapper` constructor accepts a number of optional arguments.

   .. method:: fill(text)

      Wraps the single paragraph in *text*, and returns a single string.

.. function:: dedent(text)

   .. versionadded:: 3.1

   Remove any common leading whitespace from every line in *text*.
"""


def test_doc_questions_from_rst():
    found = task_items.doc_questions("library/textwrap.rst", DOC_RST)
    assert found == [
        ("library/textwrap.rst#textwrap.wrap",
         'What does `textwrap.wrap(text, width=70, *, initial_indent="", max_lines=None)` do?',
         "Wraps the single paragraph in text so every line is at most width long."),
        ("library/textwrap.rst#textwrap.TextWrapper",
         "What does `textwrap.TextWrapper(**kwargs)` do?",
         "The TextWrapper constructor accepts a number of optional arguments."),
        ("library/textwrap.rst#textwrap.TextWrapper.fill",
         "What does `textwrap.TextWrapper.fill(text)` do?",
         "Wraps the single paragraph in text, and returns a single string."),
        ("library/textwrap.rst#textwrap.dedent", "What does `textwrap.dedent(text)` do?",
         "Remove any common leading whitespace from every line in text."),
    ]


def test_qa_items_pool_faq_and_docs():
    rng = random.Random(3)
    faq = [{"key": f"perlfaq{1 + i % 9}:How do I {_phrase(rng, 4)} {i}?",
            "text": f"Q: How do I do thing {i}?\nA: (contributed by someone)\n\n"
                    f"{_phrase(rng, rng.randint(8, 20)).capitalize()}.\n\n    code();\n"}
           for i in range(12)]
    items = task_items.qa_items(faq, [{"key": "library/textwrap.rst", "text": DOC_RST}], seed=0)
    _check_items(items, "qa")
    assert collections.Counter(i["source"] == "python-docs" for i in items) == {False: 12,
                                                                                True: 4}
    # One unit per FAQ question; the documentation file is one unit for its four items.
    assert collections.Counter(i["unit"] for i in items if i["source"] == "python-docs") == \
        {"docs:library/textwrap.rst": 4}
    assert {i["unit"] for i in items if i["source"] != "python-docs"} == \
        {f"qa:{row['key']}" for row in faq}
    for item in items:
        assert item["context"].startswith("Q: ") and item["context"].endswith("\nA:")
        assert not any("contributed" in o or "code()" in o for o in item["options"])
        docs = [o.startswith(("Wraps", "The Text", "Remove")) for o in item["options"]]
        assert all(docs) or not any(docs)  # distractors come from the same source


# ---- answers repeated in training text ------------------------------------------------------

def test_training_text_leak_rule():
    training = leakage.TrainingText([
        'def median_high(data):\n    """Return the HIGH median\n    of data."""',
        "Wraps the single paragraph in ``text`` so every line is at most width long, and more.",
        "the first text ends with one two three four",
        "five six seven eight and the second starts",
    ])
    texts = [
        "Return the high median of data.",  # 6 words, all in one run: case, markup ignored
        "the high median of",  # 4 words: a common phrase, never counted
        "Return the low median of data.",  # 6 words, not one run of training text
        "Wraps the single paragraph in *text* so every line is at most width long.",
        "Wraps the single paragraph in text so every line fits in a short width.",  # 9 of 14
        "Wraps the single paragraph in text so every one of these words differs from it now.",
        "Wraps the single paragraph in text so every one of these words differs from it just now.",
        # the first 8 words found: 8 of 16 words is half (leaked), 8 of 17 less
        "ends with one two three four five six seven eight",  # would span two texts
    ]  # a text of 8 words or more: leaked when at least half its words are in found shingles
    assert training.leaked(texts) == [True, False, False, True, True, True, False, False]
    assert leakage.TrainingText([]).leaked(texts) == [False] * len(texts)


def _write_corpus(folder, heldout: dict, train: dict):
    for split, rows_by_domain in (("heldout", heldout), ("train", train)):
        for domain in domains.DOMAINS:
            rows = rows_by_domain.get(domain, [])
            with open(folder / f"{domain}.{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"domain": domain, **row}) + "\n" for row in rows)


def test_build_tasks_drops_answers_copied_into_training_text(tmp_path):
    rng = random.Random(3)
    faq = [{"key": f"perlfaq{1 + i % 9}:How do I {_phrase(rng, 4)} {i}?",
            "text": f"Q: How do I do thing {i}?\nA: {_phrase(rng, rng.randint(8, 20))}.\n"}
           for i in range(12)]
    heldout = {"dictionary": _dictionary_rows(random.Random(4)),
               "literature": _literature_rows(random.Random(2)), "qa": faq,
               "docs": [{"key": "library/textwrap.rst", "text": DOC_RST}]}
    filler = [{"key": "x.py", "text": "def nothing():\n    return 'none of these words'\n"}]
    _write_corpus(tmp_path, heldout, {domain: filler for domain in domains.DOMAINS})
    clean, clean_filters = tasks.build_tasks(str(tmp_path))
    assert all(f["leak_filter"]["dropped"] == 0 for f in clean_filters.values())
    copied = next(i for i in clean["qa"] if i["id"].startswith("qa/perlfaq"))
    answer = copied["options"][copied["answer"]]
    # A stdlib docstring repeats the FAQ answer: other case, line breaks and indentation.
    words = answer.upper().split()
    docstring = "\n    ".join(" ".join(words[i:i + 5]) for i in range(0, len(words), 5))
    _write_corpus(tmp_path, heldout, {**{d: filler for d in domains.DOMAINS},
                                      "code": [{"key": "copy.py", "text": f'"""{docstring}"""'}]})
    items, filters = tasks.build_tasks(str(tmp_path))
    assert filters["qa"] == {"leak_filter": {"checked": len(clean["qa"]), "dropped": 1}}
    assert {i["id"] for i in items["qa"]} == {i["id"] for i in clean["qa"]} - {copied["id"]}
    assert not any(answer in i["options"] for i in items["qa"])  # nor a distractor
    alone = task_items.qa_items(faq, heldout["docs"], training=leakage.TrainingText([docstring]))
    assert {i["id"] for i in alone} == {i["id"] for i in items["qa"]}
    assert items["definition"] == clean["definition"]  # the other tasks are untouched
    manifest = tasks.write_tasks(items, str(tmp_path / "tasks"), filters)
    assert manifest["qa"]["leak_filter"] == {"checked": len(clean["qa"]), "dropped": 1}
    assert manifest["qa"]["items"] == len(clean["qa"]) - 1


# ---- baselines, files, bundled sample -------------------------------------------------------

def test_baselines_on_hand_made_items():
    items = [
        {"context": "the red fox", "options": ["a", "red fox runs", "bb", "ccc"], "answer": 1},
        {"context": "blue sky", "options": ["blue", "sky", "longest of all", "z"], "answer": 3},
    ]
    result = tasks.baselines(items)
    assert result["longest"] == 0.5  # right on the first, wrong on the second
    assert result["shortest"] == 0.5  # "a": wrong on the first; "z": right on the second
    # Item 1: "red fox runs" shares 2 words: right. Item 2: "blue" and "sky" tie, answer not there.
    assert result["overlap"] == 0.5
    tie = [{"context": "x", "options": ["aa", "bb", "cc", "d"], "answer": 0}]
    assert tasks.baselines(tie)["longest"] == pytest.approx(1 / 3)
    assert result["stem"] is None and tasks.baselines(tie)["stem"] is None  # no headword
    definitions = [
        {"context": "runner (n.):", "options": ["one who runs", "a b", "c d", "e f"], "answer": 0},
        {"context": "runner (n.):", "options": ["a b", "c d", "one who runs", "x"], "answer": 1},
        {"context": "walker (n.):", "options": ["a b", "c d", "e f", "g h"], "answer": 3},
    ]
    # Right on the first, wrong on the second; no option shares "walk": a four-way tie.
    assert tasks.baselines(definitions)["stem"] == pytest.approx((1 + 0 + 1 / 4) / 3)


def test_write_and_load_items_round_trip(tmp_path):
    items = task_items.definition_items(_dictionary_rows(random.Random(4)), seed=0)
    manifest = tasks.write_tasks({"definition": items}, str(tmp_path))
    assert tasks.load_items(str(tmp_path / "definition.jsonl")) == items
    assert manifest["definition"]["items"] == len(items)
    assert manifest["definition"]["units"] == len(items)  # a synset per item
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "options": ["a", "a", "b", "c"], "answer": 0,
                               "unit": "u"}))
    with pytest.raises(task_items.TaskError, match="bad.jsonl:1"):
        tasks.load_items(str(bad))
    bad.write_text(json.dumps({"context": "x", "options": ["a", "b", "c", "d"], "answer": 0}))
    with pytest.raises(task_items.TaskError, match="source unit"):
        tasks.load_items(str(bad))


def test_bundled_sample_loads():
    folder = sample_path("mixture")
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    for name, digest in manifest["files"].items():
        with open(os.path.join(folder, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    for domain in domains.DOMAINS:
        for split in ("train", "heldout"):
            rows = domains.read_units(os.path.join(folder, f"{domain}.{split}.jsonl"))
            assert rows and all(set(r) == {"domain", "key", "text"} for r in rows)
            assert all(domains.is_heldout(domain, r["key"]) == (split == "heldout") for r in rows)
        for notice in manifest["domains"][domain]["notices"]:
            assert os.path.getsize(os.path.join(folder, notice)) > 500
    for task in tasks.TASKS:
        items = tasks.load_items(os.path.join(folder, "tasks", f"{task}.jsonl"))
        assert 100 <= len(items) <= 200
        info = manifest["tasks"][task]
        assert info["baselines"] == tasks.baselines(items)
        assert info["units"] == len({item["unit"] for item in items})
        assert (info["baselines"]["stem"] is None) == (not task.startswith("definition"))
    hard = tasks.load_items(os.path.join(folder, "tasks", "definition_hard.jsonl"))
    for item in hard:
        stems = task_items.headword_stems(item["context"].rsplit(" (", 1)[0])
        assert not any(task_items.shared_stems(stems, o) for o in item["options"]), item["id"]
    assert manifest["tasks"]["definition_hard"]["baselines"]["stem"] == 0.25
    assert manifest["tasks"]["definition"]["baselines"]["stem"] > 0.4
    # Items come from the full corpus, whose training text holds the sample's: no answer is in it.
    training = leakage.TrainingText(row["text"] for domain in domains.DOMAINS for row in
                                  domains.read_units(os.path.join(folder, f"{domain}.train.jsonl")))
    for task in tasks.TASKS:
        items = tasks.load_items(os.path.join(folder, "tasks", f"{task}.jsonl"))
        assert not any(training.leaked([item["options"][item["answer"]] for item in items]))
        leak = manifest["tasks"][task]["leak_filter"]
        assert 0 <= leak["dropped"] < leak["checked"]

