"""Debian packages: fetching the ``.deb`` files, unpacking them, and reading each domain's units
and license notices out of the unpacked tree (paths as in Debian bookworm)."""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence

from tqdm import tqdm

from loraswitch_jax.eval.accuracy.domains import (AUSTEN_BLOCK, PYTHON, CorpusError, Unit,
                                                  sha256_file)
from loraswitch_jax.eval.accuracy.rdata import read_rdata
from loraswitch_jax.eval.accuracy.markup import clean_pod, clean_rst, dedent, split_paragraphs
from loraswitch_jax.eval.accuracy.wordnet import parse_wordnet_line

__all__ = ["EXTRACTORS", "code_units", "deb_info", "dictionary_units", "doc_sources", "docs_units",
           "fetch_debs", "literature_units", "qa_units", "read_text", "regular_files",
           "unpack_debs", "write_notices"]


# ---- code and docs -------------------------------------------------------------------------

def code_units(root: str) -> list[Unit]:
    """Standard library ``.py`` files, minus test suites, ``idlelib`` and ``lib2to3``."""
    lib = os.path.join(root, "usr", "lib", PYTHON)
    skip = {"test", "tests", "idlelib", "lib2to3"}
    units = []
    for path in regular_files(lib, "**/*.py"):
        key = os.path.relpath(path, lib)
        if not skip.intersection(key.split(os.sep)[:-1]):
            units.append(Unit(key, read_text(path)))
    return units


def docs_units(root: str) -> list[Unit]:
    """Python documentation reST sources, minus ``faq/`` and the changelog."""
    sources = doc_sources(root)
    units = []
    for path in regular_files(sources, "**/*.rst.txt"):
        key = os.path.relpath(path, sources).removesuffix(".txt")
        if not key.startswith("faq" + os.sep) and key != os.path.join("whatsnew", "changelog.rst"):
            units.append(Unit(key, read_text(path)))
    return units


def doc_sources(root: str) -> str:
    """The Python documentation's reST sources in the unpacked tree."""
    return os.path.join(root, "usr", "share", "doc", PYTHON, "html", "_sources")



def dictionary_units(root: str) -> list[Unit]:
    """One unit per WordNet synset, keyed ``lexname:offset`` (the offset is unique per file)."""
    units = []
    for name in ("noun", "verb", "adj", "adv"):
        path = os.path.join(root, "usr", "share", "wordnet", f"data.{name}")
        for line in read_text(path, encoding="latin-1").splitlines():
            synset = parse_wordnet_line(line)
            if synset is not None:
                units.append(Unit(synset.key, synset.text))
    return units



def literature_units(root: str) -> list[Unit]:
    """Austen's novels as blocks of :data:`AUSTEN_BLOCK` paragraphs, keyed ``book:block``."""
    stem = os.path.join(root, "usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata")
    units = []
    for book, lines in read_rdata(stem).items():
        text = "\n".join(line or "" for line in lines)
        paragraphs = [" ".join(p.split()) for p in split_paragraphs(text)]
        for start in range(0, len(paragraphs), AUSTEN_BLOCK):
            block = "\n\n".join(paragraphs[start:start + AUSTEN_BLOCK])
            units.append(Unit(f"{book}:{start // AUSTEN_BLOCK:04d}", block))
    return units


# ---- question answering --------------------------------------------------------------------

def qa_units(root: str) -> list[Unit]:
    """FAQ questions as ``Q: ...\\nA: ...`` units, keyed ``source:question``."""
    pairs = [*_perlfaq(root), *_python_faq(root), *_debian_faq(root)]
    return [Unit(f"{source}:{q}", f"Q: {q}\nA: {a}") for source, q, a in pairs if a]


def _perlfaq(root: str) -> Iterable[tuple[str, str, str]]:
    for path in sorted(glob.glob(os.path.join(root, "usr/share/perl/*/pod/perlfaq[1-9].pod"))):
        source = os.path.basename(path).removesuffix(".pod")
        sections = re.split(r"^=head\d (.*)\n", read_text(path), flags=re.M)
        for title, body in zip(sections[1::2], sections[2::2]):
            if title.rstrip().endswith("?"):
                body = re.sub(r"^=(?:over|back|begin|end|for|cut).*\n", "", body, flags=re.M)
                body = re.sub(r"^=item \*?\s*", "* ", body, flags=re.M)
                yield source, " ".join(clean_pod(title).split()), clean_pod(body).strip()


def _python_faq(root: str) -> Iterable[tuple[str, str, str]]:
    for path in regular_files(os.path.join(doc_sources(root), "faq"), "*.rst.txt"):
        source = "python-faq/" + os.path.basename(path).removesuffix(".rst.txt")
        lines = read_text(path).splitlines()
        # A title is a line followed by an underline of one punctuation character, as long.
        titles = [i for i in range(len(lines) - 1) if lines[i].strip()
                  and re.fullmatch(r"([=\-~^\"'`#*+])\1*", lines[i + 1])
                  and len(lines[i + 1]) >= len(lines[i].rstrip())]
        for i, end in zip(titles, [*titles[1:], len(lines) + 1]):
            if lines[i].rstrip().endswith("?"):
                # end - 1: the line before the next title is blank or that title's overline.
                body = "\n".join(l for l in lines[i + 2:end - 1]
                                 if not re.match(r"\.\. (_[^:]*:|index::|highlight::)", l))
                yield source, clean_rst(lines[i].strip()), clean_rst(body).strip()


def _debian_faq(root: str) -> Iterable[tuple[str, str, str]]:
    path = os.path.join(root, "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read().replace("\xa0", " ")
    except OSError as e:
        raise CorpusError(f"cannot read the Debian FAQ {path}: {e}") from e
    # Headings start in column 0 ("3.1.2. Will there be ..."), may wrap, end at a blank line.
    parts = re.split(r"^(\d+(?:\.\d+)+\. .*(?:\n\S.*)*)\n", text, flags=re.M)
    for heading, body in zip(parts[1::2], parts[2::2]):
        question = " ".join(heading.split(" ", 1)[1].split())
        body = re.split(r"^(?:Chapter|Appendix) ", body, maxsplit=1, flags=re.M)[0]
        if question.endswith("?"):
            yield "debian-faq", question, dedent(body).strip()


# ---- files and packages ---------------------------------------------------------------------

def regular_files(folder: str, pattern: str) -> list[str]:
    """Sorted regular files under ``folder`` matching ``pattern`` (recursive), no symlinks."""
    # dpkg-deb keeps symlinks, some absolute (to the host's files): never follow them.
    return sorted(p for p in glob.glob(os.path.join(folder, pattern), recursive=True)
                  if os.path.isfile(p) and not os.path.islink(p))


def read_text(path: str, encoding: str = "utf-8") -> str:
    """A text file's contents; :class:`CorpusError` if it cannot be read."""
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path}: {e}") from e


def _run(args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        hint = " (or pass --from-debs with the .deb files)" if args[0] == "apt-get" else ""
        raise CorpusError(f"{args[0]} not found: it is needed to build the corpus{hint}")
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def fetch_debs(packages: Sequence[str], cache: str, from_debs: str | None = None) -> dict[str, str]:
    """The ``.deb`` file of each package: taken from ``from_debs``, or fetched into ``cache``.

    ``apt-get download`` fetches; a package already in ``cache`` is not downloaded again. Raises
    :class:`CorpusError` naming the packages that cannot be found.
    """
    folder = from_debs or cache
    os.makedirs(folder, exist_ok=True)
    found, missing = {}, []
    for package in tqdm(packages, desc="packages", unit="deb"):
        debs = sorted(glob.glob(os.path.join(folder, f"{package}_*.deb")))
        if not debs and from_debs is None:
            result = _run(["apt-get", "download", package], cwd=folder)
            if result.returncode != 0:
                raise CorpusError(f"apt-get download {package} failed: {result.stderr.strip()}"
                                  " (run `apt-get update` first?)")
            debs = sorted(glob.glob(os.path.join(folder, f"{package}_*.deb")))
        if len(debs) > 1:
            raise CorpusError(f"several versions of {package} in {folder}: {debs}; keep one")
        if debs:
            found[package] = debs[0]
        else:
            missing.append(package)
    if missing:
        raise CorpusError(f"no .deb for {', '.join(missing)} in {folder}; fetch them with "
                          f"`apt-get download {' '.join(missing)}`")
    return found


def deb_info(deb: str) -> dict[str, str]:
    """A ``.deb`` file's name, version and sha256 for the manifest."""
    result = _run(["dpkg-deb", "-f", deb, "Package", "Version"])
    if result.returncode != 0:
        raise CorpusError(f"dpkg-deb cannot read {deb}: {result.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    return {"file": os.path.basename(deb), "version": fields["Version"], "sha256": sha256_file(deb)}



def unpack_debs(debs: Iterable[str], root: str) -> None:
    """``dpkg-deb -x`` each ``.deb`` into ``root``."""
    for deb in tqdm(list(debs), desc="unpack", unit="deb"):
        result = _run(["dpkg-deb", "-x", deb, root])
        if result.returncode != 0:
            raise CorpusError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()}")


def write_notices(root: str, out: str) -> None:
    """LICENSES/: the notices, copied from the unpacked packages."""
    os.makedirs(out, exist_ok=True)
    pod = sorted(glob.glob(os.path.join(root, "usr/share/perl/*/pod")))
    if not pod:
        raise CorpusError("perl-doc's pod folder is missing from the unpacked packages")
    faqs = sorted(glob.glob(os.path.join(pod[0], "perlfaq*.pod")))
    sections = (re.search(r"^=head1 AUTHOR AND COPYRIGHT\n(.*?)(?=^=|\Z)", read_text(p),
                          re.S | re.M) for p in faqs)
    perl_notices = dict.fromkeys(m.group(1).strip() for m in sections if m)
    perl_stanza = read_text(os.path.join(root, "usr/share/doc/perl-doc/copyright"))
    perl_stanza = re.search(r"^Files: \*\n.*?(?=^Files:)", perl_stanza, re.S | re.M).group(0)
    doc = os.path.join(root, "usr", "share", "doc")
    notices = {
        "PSF-LICENSE.txt": read_text(os.path.join(root, "usr", "lib", PYTHON, "LICENSE.txt")),
        "WordNet-3.0.txt": read_text(os.path.join(doc, "wordnet-base", "copyright")),
        "janeaustenr-MIT.txt": "The novels' texts (Project Gutenberg editions) are in the public "
                               "domain. The janeaustenr package that holds them:\n\n"
                               + read_text(os.path.join(doc, "r-cran-janeaustenr", "copyright")),
        "perlfaq.txt": "perlfaq1-9 (Debian package perl-doc), AUTHOR AND COPYRIGHT sections:\n\n"
                       + "\n\n".join(clean_pod(n) for n in perl_notices)
                       + "\n\nPerl's terms (from perl-doc's copyright file):\n\n" + perl_stanza
                       + "\nThe Artistic License (perlartistic.pod):\n\n"
                       + read_text(os.path.join(pod[0], "perlartistic.pod")),
        "debian-faq.txt": read_text(os.path.join(doc, "debian-faq", "copyright")),
    }
    for name, text in notices.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)


EXTRACTORS: dict[str, Callable[[str], list[Unit]]] = {
    "code": code_units, "docs": docs_units, "dictionary": dictionary_units,
    "literature": literature_units, "qa": qa_units}


