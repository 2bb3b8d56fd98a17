"""The experiment's data: the corpus's text as byte ids (train mixture, held-out texts, task
items) and the sequences every model is scored on."""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Sequence

import numpy as np

from loraswitch_jax.eval.accuracy import scoring
from loraswitch_jax.eval.accuracy.domains import DOMAINS, read_units, sha256_file
from loraswitch_jax.eval.accuracy.presets import BOS, EOS, Preset
from loraswitch_jax.eval.accuracy.tasks import TASKS, baselines, load_items
from loraswitch_jax.train.data import Examples

__all__ = ["Corpus", "EvalSet", "encode_bytes", "eval_set", "load_corpus", "mixture_examples",
           "seeded_order", "spread_windows", "take_bytes"]


def encode_bytes(text: str) -> np.ndarray:
    """``byte_tokenizer().encode(text, add_special_tokens=False)``, computed directly: its ids
    0-255 are the UTF-8 bytes (~100x faster than the tokenizer on a 40 MB corpus)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def seeded_order(n: int, seed: int, name: str) -> np.ndarray:
    """A permutation of ``range(n)`` seeded by ``seed`` and ``name`` (one stream per use)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(n)


def take_bytes(texts: Sequence[str], budget: float, seed: int, name: str) -> list[str]:
    """A seeded subset of ``texts`` of about ``budget`` UTF-8 bytes (whole texts), file order."""
    kept, total = [], 0
    for i in seeded_order(len(texts), seed, name):
        if total >= budget:
            break
        kept.append(int(i))
        total += len(texts[i].encode("utf-8"))
    return [texts[i] for i in sorted(kept)]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The experiment's text: per-domain train and held-out token ids, task items, file hashes."""

    root: str
    domains: tuple[str, ...]
    train: dict[str, list[np.ndarray]]
    heldout: dict[str, list[np.ndarray]]
    tasks: dict[str, list[dict]]
    info: dict  # sizes, hashes and manifest digests for the report


def load_corpus(root: str, preset: Preset, seed: int) -> Corpus:
    """Read a corpus folder (``corpus.py`` layout, tasks from ``tasks.py``).

    Domains are those with a ``{domain}.train.jsonl`` (known domains first, in their order);
    each needs its ``.heldout.jsonl``. Tasks are the ``tasks/*.jsonl`` files.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus folder {root!r} does not exist")
    names = sorted(f[:-len(".train.jsonl")] for f in os.listdir(root) if f.endswith(".train.jsonl"))
    domains = tuple(d for d in DOMAINS if d in names) + tuple(d for d in names if d not in DOMAINS)
    if not domains:
        raise FileNotFoundError(f"no {{domain}}.train.jsonl files in corpus folder {root!r}; "
                                "build one with python -m loraswitch_jax.eval.accuracy.corpus")
    info = {"root": os.path.abspath(root), "files": {}, "domains": {}, "tasks": {}}
    manifest = os.path.join(root, "manifest.json")
    if os.path.exists(manifest):
        info["manifest_sha256"] = sha256_file(manifest)
        with open(manifest, encoding="utf-8") as f:
            m = json.load(f)
        info["manifest"] = {k: m[k] for k in ("created", "builder", "packages") if k in m}
    raw = {}
    for domain in domains:
        for split in ("train", "heldout"):
            path = os.path.join(root, f"{domain}.{split}.jsonl")
            if not os.path.exists(path):
                raise FileNotFoundError(f"corpus folder {root!r} has {domain}.train.jsonl but "
                                        f"no {domain}.{split}.jsonl")
            info["files"][os.path.basename(path)] = sha256_file(path)
            raw[domain, split] = [row["text"] for row in read_units(path)]
    total_train = sum(len(t.encode("utf-8")) for d in domains for t in raw[d, "train"])
    cap = preset.max_train_bytes
    share = 1.0 if cap is None else min(1.0, cap / total_train)
    train, heldout = {}, {}
    for domain in domains:
        texts = raw[domain, "train"]
        size = sum(len(t.encode("utf-8")) for t in texts)
        used = texts if share >= 1 else take_bytes(texts, share * size, seed, f"train:{domain}")
        train[domain] = [encode_bytes(t) for t in used if t]
        heldout[domain] = [encode_bytes(t) for t in raw[domain, "heldout"] if t]
        if not heldout[domain]:
            raise ValueError(f"{domain}.heldout.jsonl in {root!r} has no text to score")
        info["domains"][domain] = {
            "train_texts": len(texts), "train_bytes": size, "used_train_texts": len(train[domain]),
            "used_train_bytes": int(sum(t.size for t in train[domain])),
            "heldout_texts": len(heldout[domain]),
            "heldout_bytes": int(sum(t.size for t in heldout[domain]))}
    tasks = {}
    task_dir = os.path.join(root, "tasks")
    found = sorted(f[:-len(".jsonl")] for f in os.listdir(task_dir) if f.endswith(".jsonl")) \
        if os.path.isdir(task_dir) else []
    for task in [t for t in TASKS if t in found] + [t for t in found if t not in TASKS]:
        path = os.path.join(task_dir, f"{task}.jsonl")
        info["files"][f"tasks/{task}.jsonl"] = sha256_file(path)
        items = load_items(path)
        if preset.items_per_task is not None and len(items) > preset.items_per_task:
            keep = np.sort(seeded_order(len(items), seed, f"task:{task}")[:preset.items_per_task])
            items = [items[i] for i in keep]
        tasks[task] = items
        info["tasks"][task] = {"items": len(items), "units": len({i["unit"] for i in items}),
                               "baselines": baselines(items)}
    return Corpus(root, domains, train, heldout, tasks, info)


def mixture_examples(corpus: Corpus) -> Examples:
    """All domains' train texts as ``BOS + bytes + EOS`` examples (BOS is not a target)."""
    pieces = [np.concatenate([[BOS], t, [EOS]]).astype(np.int32)
              for d in corpus.domains for t in corpus.train[d]]
    lengths = np.array([p.size for p in pieces], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces)
    target_mask = np.ones(tokens.size, bool)
    target_mask[offsets[:-1]] = False
    return Examples(tokens, target_mask, offsets)


def spread_windows(owner: np.ndarray, size: np.ndarray, budget: int, seed: int, name: str
                   ) -> np.ndarray:
    """Indices of windows holding about ``budget`` scored bytes, spread over as many texts as
    possible: one random window of every text (texts in random order), then a second one of
    every text that has more, and so on. ``owner [n]``: each window's text; ``size [n]``: its
    scored bytes. Sorted indices."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shuffled = rng.permutation(len(owner))
    grouped = shuffled[np.argsort(owner[shuffled], kind="stable")]  # by text, random within
    first = np.searchsorted(owner[grouped], owner[grouped])
    rank = np.empty(len(owner), np.int64)
    rank[grouped] = np.arange(len(grouped)) - first  # round in which each window is taken
    text_order = rng.permutation(int(owner.max()) + 1)
    order = np.lexsort((text_order[owner], rank))
    taken = int(np.searchsorted(np.cumsum(size[order]), budget)) + 1
    return np.sort(order[:taken])


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Sequences to score, built once and shared by every model. Held-out intervals resample
    whole texts (``window_text``), not windows; task intervals whole source units
    (``item_unit``), not items."""

    heldout: list[scoring.TokenSequence]  # windows
    window_domain: np.ndarray  # window -> domain index
    window_text: np.ndarray  # window -> held-out text (numbered across domains)
    choices: list[scoring.TokenSequence]
    choice_bytes: dict[str, np.ndarray]  # task -> [n, 4]
    choice_rows: dict[str, slice]  # task -> its rows of `choices` (item-major, 4 per item)
    truncated: dict[str, int]
    item_unit: dict[str, np.ndarray]  # task -> [n] source unit of each item (str)
    info: dict  # per domain: texts, windows and bytes scored


def eval_set(corpus: Corpus, preset: Preset, seed: int) -> EvalSet:
    """Held-out windows of every domain (:func:`spread_windows`) and option sequences of every
    task."""
    windows, window_domain, window_text, info = [], [], [], {}
    first_text = 0  # the domain's first text number
    for i, domain in enumerate(corpus.domains):
        seqs, owner = scoring.heldout_sequences(corpus.heldout[domain], BOS, preset.seq_len)
        size = np.array([s.targets.sum() for s in seqs])
        keep = spread_windows(owner, size, preset.heldout_bytes, seed, f"heldout:{domain}")
        windows += [seqs[j] for j in keep]
        window_domain += [i] * len(keep)
        window_text += (first_text + owner[keep]).tolist()
        first_text += len(corpus.heldout[domain])
        info[domain] = {"texts": len(np.unique(owner[keep])), "windows": len(keep),
                        "bytes": int(size[keep].sum())}
    choices, choice_bytes, rows, truncated, units = [], {}, {}, {}, {}
    for task, items in corpus.tasks.items():
        seqs, num_bytes, cut = scoring.choice_sequences(items, encode_bytes, BOS, preset.seq_len)
        rows[task] = slice(len(choices), len(choices) + len(seqs))
        choices += seqs
        choice_bytes[task], truncated[task] = num_bytes, cut
        units[task] = np.array([item["unit"] for item in items], dtype=str)
    return EvalSet(windows, np.asarray(window_domain, np.int64),
                   np.asarray(window_text, np.int64), choices, choice_bytes, rows, truncated,
                   units, info)


