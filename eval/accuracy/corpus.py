"""Five real-text domains from Debian packages, split into train and held-out units.

``python -m loraswitch_jax.eval.accuracy.corpus --out DIR`` downloads the packages with
``apt-get download`` (or takes ``.deb`` files from ``--from-debs``), unpacks them with
``dpkg-deb -x`` (``debian.py``) and writes

* ``DIR/{domain}.train.jsonl``, ``DIR/{domain}.heldout.jsonl``: one ``{"domain", "key", "text"}``
  per unit, sorted by key; every file has these three fields only, so one loader reads them all;
* ``DIR/LICENSES/``: the notices of the texts, copied from the packages;
* ``DIR/tasks/``: the multiple-choice items, cut from the held-out units (``tasks.py``);
* ``DIR/manifest.json``: package versions and sha256, units and bytes per split, license per
  domain, task item counts and baselines, sha256 of every written file, build date.

Domains:

* ``code``: Python 3.11 standard library ``.py`` files (``libpython3.11-stdlib`` and
  ``libpython3.11-minimal``: the latter holds ``os``, ``re``, ``collections`` ...), without test
  suites, ``idlelib`` and ``lib2to3``; one file per unit.
* ``docs``: reST sources of the Python documentation without ``faq/`` (used by ``qa``) and the
  changelog; one file per unit.
* ``dictionary``: WordNet 3.0 synsets, one per unit: ``"apparition, phantom (n.): <gloss>"``.
* ``literature``: Jane Austen's six novels from ``r-cran-janeaustenr`` (R lazy-load database,
  read by ``rdata.py``); blocks of 20 paragraphs keyed ``"{book}:{block:04d}"``, each paragraph
  on one line, paragraphs separated by a blank line.
* ``qa``: perlfaq1-9, the Python FAQ and the Debian FAQ; one question per unit,
  ``"Q: <question>\\nA: <answer>"`` with the markup reduced to plain text.

The held-out split hashes ``"{domain}:{key}"`` (``domains.is_heldout``): it depends on neither
file order nor package version, and whole units (a file, a synset, a block, a question) stay on
one side. ``tasks.py`` builds its multiple-choice items from held-out units only.
``--sample OUT`` also writes a ~1.2 MB copy with ready task items (:func:`write_sample`): the
bundled ``loraswitch_jax/samples/mixture``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence

from tqdm import tqdm

from loraswitch_jax.eval.accuracy import tasks
from loraswitch_jax.eval.accuracy.debian import (EXTRACTORS, deb_info, fetch_debs, regular_files,
                                                 unpack_debs, write_notices)
from loraswitch_jax.eval.accuracy.domains import (DOMAINS, PACKAGES, CorpusError, Unit, hash01,
                                                  is_heldout, read_units, sha256_file)

__all__ = ["build_corpus", "main", "write_sample"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")



def _row(domain: str, unit: Unit) -> str:
    return json.dumps({"domain": domain, "key": unit.key, "text": unit.text},
                      ensure_ascii=False) + "\n"


def _cap(domain: str, units: list[Unit], max_bytes: float,
         size: Callable[[Unit], int] = lambda u: len(u.text.encode())) -> list[Unit]:
    # Keep units in a salted-hash order, independent of the split hash, up to the byte budget.
    kept, total = [], 0
    for unit in sorted(units, key=lambda u: hash01(f"cap:{domain}:{u.key}")):
        if total + size(unit) > max_bytes:
            continue
        kept.append(unit)
        total += size(unit)
    return kept


def _write_jsonl(path: str, domain: str, units: Iterable[Unit]) -> dict[str, int]:
    count = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for unit in units:
            f.write(_row(domain, unit))
            count, size = count + 1, size + len(unit.text.encode())
    return {"units": count, "text_bytes": size}


def _files_sha256(out: str) -> dict[str, str]:
    paths = {os.path.relpath(p, out): p for p in regular_files(out, "**/*")}
    return {rel: sha256_file(p) for rel, p in sorted(paths.items()) if rel != "manifest.json"}


def build_corpus(out: str, *, from_debs: str | None = None, cache: str | None = None,
                 max_mb_per_domain: float | None = None) -> dict:
    """Builds the five domains into ``out`` (see the module docstring); returns the manifest."""
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "loraswitch_jax", "debs")
    debs = fetch_debs(PACKAGES, cache, from_debs)
    os.makedirs(out, exist_ok=True)
    manifest = {"created": _now(), "builder": "python -m loraswitch_jax.eval.accuracy.corpus",
                "max_mb_per_domain": max_mb_per_domain,
                "packages": {p: deb_info(d) for p, d in debs.items()}, "domains": {}}
    with tempfile.TemporaryDirectory(prefix="loraswitch-debs-") as root:
        unpack_debs(debs.values(), root)
        write_notices(root, os.path.join(out, "LICENSES"))
        for domain in tqdm(DOMAINS, desc="domains", unit="domain"):
            spec, units = DOMAINS[domain], EXTRACTORS[domain](root)
            if not units:
                raise CorpusError(f"no {domain} text found in {', '.join(spec.packages)}")
            if max_mb_per_domain is not None:
                units = _cap(domain, units, max_mb_per_domain * 1e6)
            units.sort(key=lambda u: u.key)
            heldout = [u for u in units if is_heldout(domain, u.key)]
            train = [u for u in units if not is_heldout(domain, u.key)]
            manifest["domains"][domain] = {
                "packages": list(spec.packages), "license": spec.license,
                "notices": [f"LICENSES/{n}" for n in spec.notices],
                "heldout_fraction": spec.heldout_fraction,
                "train": _write_jsonl(os.path.join(out, f"{domain}.train.jsonl"), domain, train),
                "heldout": _write_jsonl(os.path.join(out, f"{domain}.heldout.jsonl"), domain,
                                        heldout)}
    # Rebuilt with the held-out files, so the manifest's hashes never cover stale task items.
    items, filters = tasks.build_tasks(out)
    manifest["tasks"] = tasks.write_tasks(items, os.path.join(out, "tasks"), filters)
    manifest["files"] = _files_sha256(out)
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def write_sample(corpus: str, out: str, *, train_kb: float = 150, heldout_kb: float = 30,
                 max_unit_kb: float = 12, items_per_task: int = 120, seed: int = 0) -> dict:
    """A small copy of a built corpus for the bundled demo: same layout, plus ``tasks/``.

    Per domain, units of at most ``max_unit_kb`` in a salted-hash order, up to ``train_kb`` of
    train and ``heldout_kb`` of held-out file size; ``items_per_task`` items per task built from
    the whole corpus's held-out units (so no sample train unit is in an item). Returns the
    manifest.
    """
    with open(os.path.join(corpus, "manifest.json"), encoding="utf-8") as f:
        source = json.load(f)
    os.makedirs(out, exist_ok=True)
    manifest = {"created": _now(),
                "builder": "python -m loraswitch_jax.eval.accuracy.corpus --sample", "source": {
                    k: source[k] for k in ("created", "packages")}, "domains": {}}
    for domain, spec in DOMAINS.items():
        manifest["domains"][domain] = {"license": spec.license,
                                       "notices": [f"LICENSES/{n}" for n in spec.notices]}
        for split, budget in (("train", train_kb), ("heldout", heldout_kb)):
            rows = read_units(os.path.join(corpus, f"{domain}.{split}.jsonl"))
            units = [Unit(r["key"], r["text"]) for r in rows
                     if len(r["text"].encode()) <= max_unit_kb * 1e3]
            units = _cap(domain, units, budget * 1e3,
                         size=lambda u, domain=domain: len(_row(domain, u).encode()))
            manifest["domains"][domain][split] = _write_jsonl(
                os.path.join(out, f"{domain}.{split}.jsonl"), domain,
                sorted(units, key=lambda u: u.key))
    shutil.copytree(os.path.join(corpus, "LICENSES"), os.path.join(out, "LICENSES"),
                    dirs_exist_ok=True)
    items, filters = tasks.build_tasks(corpus, max_items=items_per_task, seed=seed)
    manifest["tasks"] = tasks.write_tasks(items, os.path.join(out, "tasks"), filters)
    manifest["files"] = _files_sha256(out)
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build the corpus into ``--out`` (and a small sample with ``--sample``)."""
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.accuracy.corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the corpus")
    parser.add_argument("--from-debs", help="folder holding the .deb files (no apt-get)")
    parser.add_argument("--cache", help="download folder for apt-get "
                        "(default ~/.cache/loraswitch_jax/debs)")
    parser.add_argument("--max-mb-per-domain", type=float, help="cap each domain's text (MB)")
    parser.add_argument("--sample", help="also write a ~1 MB sample with task items here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample's task items")
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.out, from_debs=args.from_debs, cache=args.cache,
                                max_mb_per_domain=args.max_mb_per_domain)
        for domain, info in manifest["domains"].items():
            train, heldout = info["train"], info["heldout"]
            print(f"{domain:11s} train {train['units']:7d} units "
                  f"{train['text_bytes'] / 1e6:6.2f} MB   held out {heldout['units']:6d} units "
                  f"{heldout['text_bytes'] / 1e6:6.2f} MB")
        print("tasks: " + ", ".join(f"{task} {info['items']} items"
                                    for task, info in manifest["tasks"].items()))
        if args.sample:
            write_sample(args.out, args.sample, seed=args.seed)
            print(f"sample written to {args.sample}")
    except CorpusError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
