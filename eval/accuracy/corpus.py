"""Five real-text domains from Debian packages, split into train and held-out units.

``python -m loraswitch_jax.eval.corpus --out DIR`` downloads the packages with ``apt-get download``
(or takes ``.deb`` files from ``--from-debs``), unpacks them with ``dpkg-deb -x`` and writes

* ``DIR/{domain}.train.jsonl``, ``DIR/{domain}.heldout.jsonl``: one ``{"domain", "key", "text"}``
  per unit, sorted by key; every file has these three fields only, so one loader reads them all;
* ``DIR/LICENSES/``: the notices of the texts, copied from the packages;
* ``DIR/tasks/``: the multiple-choice items, cut from the held-out units (``eval/tasks.py``);
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
  read by :func:`read_rdata`); blocks of 20 paragraphs keyed ``"{book}:{block:04d}"``, each
  paragraph on one line, paragraphs separated by a blank line.
* ``qa``: perlfaq1-9, the Python FAQ and the Debian FAQ; one question per unit,
  ``"Q: <question>\\nA: <answer>"`` with the markup reduced to plain text.

The held-out split hashes ``"{domain}:{key}"`` (:func:`is_heldout`): it depends on neither file
order nor package version, and whole units (a file, a synset, a block, a question) stay on one
side. ``eval/tasks.py`` builds its multiple-choice items from held-out units only.
``--sample OUT`` also writes a ~1.2 MB copy with ready task items (:func:`write_sample`): the
bundled ``loraswitch_jax/samples/mixture``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence

from tqdm import tqdm

__all__ = ["DOMAINS", "PACKAGES", "CorpusError", "DomainSpec", "Synset", "Unit", "build_corpus", "clean_pod",
           "clean_rst", "fetch_debs", "is_heldout", "main", "parse_wordnet_line", "read_rdata",
           "read_units", "split_gloss", "split_sentences", "write_sample"]

PYTHON = "python3.11"
AUSTEN_BLOCK = 20  # paragraphs per literature unit (the held-out split is by block)


class CorpusError(RuntimeError):
    """A package, tool or source file needed for the corpus is missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """Where a domain's text comes from and under which terms."""

    packages: tuple[str, ...]
    heldout_fraction: float
    license: str
    notices: tuple[str, ...]  # files under LICENSES/


DOMAINS: dict[str, DomainSpec] = {
    "code": DomainSpec((f"lib{PYTHON}-stdlib", f"lib{PYTHON}-minimal"), 0.05,
                       "PSF License Version 2", ("PSF-LICENSE.txt",)),
    "docs": DomainSpec((f"{PYTHON}-doc",), 0.15, "PSF License Version 2", ("PSF-LICENSE.txt",)),
    "dictionary": DomainSpec(("wordnet-base",), 0.05, "WordNet 3.0 license", ("WordNet-3.0.txt",)),
    "literature": DomainSpec(("r-cran-janeaustenr",), 0.10,
                             "novels: public domain; janeaustenr package: MIT",
                             ("janeaustenr-MIT.txt",)),
    "qa": DomainSpec(("perl-doc", f"{PYTHON}-doc", "debian-faq"), 0.20,
                     "perlfaq: same terms as Perl (GPL-1+ or Artistic); Python FAQ: PSF License "
                     "Version 2; Debian FAQ: verbatim and modified copies permitted",
                     ("perlfaq.txt", "PSF-LICENSE.txt", "debian-faq.txt")),
}
PACKAGES = tuple(dict.fromkeys(p for spec in DOMAINS.values() for p in spec.packages))


@dataclasses.dataclass(frozen=True)
class Unit:
    """One text unit: the split is decided by ``key``, which is unique within its domain."""

    key: str
    text: str


def is_heldout(domain: str, key: str, fraction: float | None = None) -> bool:
    """Whether a unit is held out: the first 8 bytes of sha256("domain:key") below ``fraction``.

    ``fraction`` defaults to the domain's share in :data:`DOMAINS`.
    """
    if fraction is None:
        fraction = DOMAINS[domain].heldout_fraction
    return _hash01(f"{domain}:{key}") < fraction


def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


# ---- text helpers -------------------------------------------------------------------------

_ABBREVIATIONS = {"mr", "mrs", "dr", "st", "messrs", "esq", "e.g", "i.e", "etc", "vs", "cf"}
_SENTENCE_END = re.compile(r"[.!?]+[\"'’”)\]_]*(?=\s+[\"'‘“(\[_`]*[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: ends at ``.!?`` (plus closing quotes) before a capital.

    Whitespace is collapsed. "Mr.", "Mrs.", "e.g." and similar abbreviations, and single capital
    initials, do not end a sentence.
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        word = text[start:m.start()].rsplit(" ", 1)[-1].lstrip("\"'‘“(_")
        if m.group()[0] == "." and (word.lower() in _ABBREVIATIONS
                                    or (len(word) == 1 and word.isupper())):
            continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


_RST_ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>`]+>`_{0,2}")


def clean_rst(text: str) -> str:
    """reST inline markup reduced to its text: roles, links, literals, emphasis."""
    def role(m: re.Match) -> str:
        body = m.group(1)
        title = re.match(r"(.*?)\s*<[^>]*>$", body)
        return (title.group(1) if title and title.group(1) else body).lstrip("~!")
    text = _RST_ROLE.sub(role, text)
    text = _RST_LINK.sub(r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"\*\*(\S.*?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S[^*]*?)\*(?![\w*])", r"\1", text)
    return re.sub(r"`([^`]+)`_{0,2}", r"\1", text)


_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}
_POD_CODE = re.compile(r"([A-Z])(?:<<+\s+(.*?)\s+>>+|<([^<>]*)>)", re.S)


def clean_pod(text: str) -> str:
    """Pod formatting codes reduced to their text (``C<x>``, ``L<text|target>``, ``E<lt>`` ...)."""
    # Escapes first, as private-use stand-ins: a "<" from E<lt> must not open a new code.
    stand_in = {"<": "\ue000", ">": "\ue001"}
    def escape(m: re.Match) -> str:
        name = m.group(1)
        char = _POD_ESCAPES.get(name, chr(int(name)) if name.isdigit() else name)
        return stand_in.get(char, char)
    text = re.sub(r"E<([a-z]+|\d+)>", escape, text)

    def code(m: re.Match) -> str:
        kind = m.group(1)
        body = m.group(2) if m.group(2) is not None else m.group(3)
        if kind in "XZ":
            return ""
        if kind == "L":
            return body.split("|", 1)[0] if "|" in body else body.replace('"', "")
        return body
    previous = None
    while previous != text:  # innermost codes first: the simple form holds no "<" or ">"
        previous, text = text, _POD_CODE.sub(code, text)
    return text.replace("\ue000", "<").replace("\ue001", ">")


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


# ---- code and docs -------------------------------------------------------------------------

def code_units(root: str) -> list[Unit]:
    """Standard library ``.py`` files, minus test suites, ``idlelib`` and ``lib2to3``."""
    lib = os.path.join(root, "usr", "lib", PYTHON)
    skip = {"test", "tests", "idlelib", "lib2to3"}
    units = []
    for path in _regular_files(lib, "**/*.py"):
        key = os.path.relpath(path, lib)
        if not skip.intersection(key.split(os.sep)[:-1]):
            units.append(Unit(key, _read_text(path)))
    return units


def docs_units(root: str) -> list[Unit]:
    """Python documentation reST sources, minus ``faq/`` and the changelog."""
    sources = _doc_sources(root)
    units = []
    for path in _regular_files(sources, "**/*.rst.txt"):
        key = os.path.relpath(path, sources).removesuffix(".txt")
        if not key.startswith("faq" + os.sep) and key != os.path.join("whatsnew", "changelog.rst"):
            units.append(Unit(key, _read_text(path)))
    return units


def _doc_sources(root: str) -> str:
    return os.path.join(root, "usr", "share", "doc", PYTHON, "html", "_sources")


# ---- dictionary ----------------------------------------------------------------------------

# WordNet 3.0 lexicographer files, by the number in each data line (wndb(5WN), lexnames(5WN)).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
POS_LABELS = {"n": "n.", "v": "v.", "a": "adj.", "s": "adj.", "r": "adv."}


@dataclasses.dataclass(frozen=True)
class Synset:
    """One WordNet synset: its offset in its data file, lexicographer file, lemmas and gloss."""

    offset: str
    lexname: str
    pos: str  # n, v, a, s (satellite adjective), r
    lemmas: tuple[str, ...]
    gloss: str

    @property
    def key(self) -> str:
        return f"{self.lexname}:{self.offset}"

    @property
    def text(self) -> str:
        return f"{', '.join(self.lemmas)} ({POS_LABELS[self.pos]}): {self.gloss}"


def parse_wordnet_line(line: str) -> Synset | None:
    """A ``data.{noun,verb,adj,adv}`` line as a :class:`Synset`; ``None`` for license header lines.

    Format (wndb(5WN)): ``offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt ...
    | gloss``; words use ``_`` for spaces and adjectives may end in a syntactic marker like ``(a)``.
    """
    if line.startswith("  ") or not line.strip():
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 6:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    count = int(fields[3], 16)
    words = fields[4:4 + 2 * count:2]
    lemmas = tuple(re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words)
    return Synset(fields[0], _LEXNAMES[int(fields[1])], fields[2], lemmas, gloss.strip())


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """A WordNet gloss as (definition, quoted examples): examples follow as ``; "..."``."""
    definition, *examples = re.split(r';\s*(?=")', gloss)
    return definition.strip(), [e.strip().strip('"') for e in examples]


def dictionary_units(root: str) -> list[Unit]:
    """One unit per WordNet synset, keyed ``lexname:offset`` (the offset is unique per file)."""
    units = []
    for name in ("noun", "verb", "adj", "adv"):
        path = os.path.join(root, "usr", "share", "wordnet", f"data.{name}")
        for line in _read_text(path, encoding="latin-1").splitlines():
            synset = parse_wordnet_line(line)
            if synset is not None:
                units.append(Unit(synset.key, synset.text))
    return units


# ---- literature: R serialization ------------------------------------------------------------

class _RReader:
    """Reads R's XDR serialization (versions 2 and 3): the vector and pairlist types only."""

    NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source, self.symbols = data, 0, source, []

    def read(self) -> object:
        if self.data[:2] != b"X\n":
            raise CorpusError(f"{self.source}: not R's binary (XDR) serialization format")
        self.pos = 2
        version = self._int()
        self.pos += 8  # writer's and minimal reader's R versions
        if version == 3:
            name_length = self._int()  # native encoding name follows
            self.pos += name_length
        elif version != 2:
            raise CorpusError(f"{self.source}: unsupported R serialization version {version}")
        return self._item()

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        return n if n != -1 else (self._int() << 32) + self._int()  # long vectors

    def _item(self) -> object:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == self.NIL:
            return None
        if kind == self.REF:
            return self.symbols[(flags >> 8 or self._int()) - 1]
        if kind == self.SYM:
            self.symbols.append(self._item())
            return self.symbols[-1]
        if kind == self.CHAR:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8")
        if kind == self.LIST:  # pairlist (attributes): returned as a dict of its tagged cells
            cells = {}
            while kind == self.LIST:
                if has_attr:
                    self._item()
                tag = self._item() if has_tag else len(cells)
                cells[tag] = self._item()
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != self.NIL:
                raise CorpusError(f"{self.source}: pairlist ends in R type {kind}")
            return cells
        if kind in (self.STR, self.VEC):
            values = [self._item() for _ in range(self._length())]
        elif kind in (self.LGL, self.INT, self.REAL):
            n, fmt = self._length(), "d" if kind == self.REAL else "i"
            values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
            self.pos += n * struct.calcsize(fmt)
        else:
            raise CorpusError(f"{self.source}: R type {kind} is not supported by this reader")
        names = (self._item() if has_attr else {}).get("names")
        return dict(zip(names, values)) if names else values


def read_rdata(stem: str) -> dict[str, object]:
    """Every variable of an R lazy-load database (``stem.rdx`` index + ``stem.rdb`` blobs).

    The index is gzip-compressed; each blob is a 4-byte big-endian length and a zlib stream.
    Character vectors come back as ``list[str | None]``, named lists as dicts.
    """
    try:
        with open(stem + ".rdx", "rb") as f:
            index = _RReader(gzip.decompress(f.read()), stem + ".rdx").read()
        with open(stem + ".rdb", "rb") as f:
            blobs = f.read()
    except (OSError, zlib.error, EOFError) as e:
        raise CorpusError(f"cannot read the R database {stem}.rdx/.rdb: {e}") from e
    if index.get("compressed") not in ([1], [True]):
        raise CorpusError(f"{stem}.rdb: only zlib-compressed R databases are supported")
    variables = {}
    for name, (offset, length) in index["variables"].items():
        blob = blobs[offset:offset + length]
        raw = zlib.decompress(blob[4:])
        if len(raw) != struct.unpack(">I", blob[:4])[0]:
            raise CorpusError(f"{stem}.rdb: variable {name!r} has the wrong length")
        variables[name] = _RReader(raw, f"{stem}.rdb[{name}]").read()
    return variables


def literature_units(root: str) -> list[Unit]:
    """Austen's novels as blocks of :data:`AUSTEN_BLOCK` paragraphs, keyed ``book:block``."""
    stem = os.path.join(root, "usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata")
    units = []
    for book, lines in read_rdata(stem).items():
        text = "\n".join(line or "" for line in lines)
        paragraphs = [" ".join(p.split()) for p in _paragraphs(text)]
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
        sections = re.split(r"^=head\d (.*)\n", _read_text(path), flags=re.M)
        for title, body in zip(sections[1::2], sections[2::2]):
            if title.rstrip().endswith("?"):
                body = re.sub(r"^=(?:over|back|begin|end|for|cut).*\n", "", body, flags=re.M)
                body = re.sub(r"^=item \*?\s*", "* ", body, flags=re.M)
                yield source, " ".join(clean_pod(title).split()), clean_pod(body).strip()


def _python_faq(root: str) -> Iterable[tuple[str, str, str]]:
    for path in _regular_files(os.path.join(_doc_sources(root), "faq"), "*.rst.txt"):
        source = "python-faq/" + os.path.basename(path).removesuffix(".rst.txt")
        lines = _read_text(path).splitlines()
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
            yield "debian-faq", question, _dedent(body).strip()


def _dedent(text: str) -> str:
    lines = text.splitlines()
    indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
    return "\n".join(l[indent:] for l in lines)


# ---- files and packages ---------------------------------------------------------------------

def _regular_files(folder: str, pattern: str) -> list[str]:
    # dpkg-deb keeps symlinks, some absolute (to the host's files): never follow them.
    return sorted(p for p in glob.glob(os.path.join(folder, pattern), recursive=True)
                  if os.path.isfile(p) and not os.path.islink(p))


def _read_text(path: str, encoding: str = "utf-8") -> str:
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

    ``apt-get download`` fetches; a package already in ``cache`` is not downloaded again. Raises :class:`CorpusError` naming
    the packages that cannot be found.
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


def _deb_info(deb: str) -> dict[str, str]:
    result = _run(["dpkg-deb", "-f", deb, "Package", "Version"])
    if result.returncode != 0:
        raise CorpusError(f"dpkg-deb cannot read {deb}: {result.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    return {"file": os.path.basename(deb), "version": fields["Version"], "sha256": _sha256(deb)}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_notices(root: str, out: str) -> None:
    """LICENSES/: the notices, copied from the unpacked packages."""
    os.makedirs(out, exist_ok=True)
    pod = sorted(glob.glob(os.path.join(root, "usr/share/perl/*/pod")))
    if not pod:
        raise CorpusError("perl-doc's pod folder is missing from the unpacked packages")
    faqs = sorted(glob.glob(os.path.join(pod[0], "perlfaq*.pod")))
    sections = (re.search(r"^=head1 AUTHOR AND COPYRIGHT\n(.*?)(?=^=|\Z)", _read_text(p),
                          re.S | re.M) for p in faqs)
    perl_notices = dict.fromkeys(m.group(1).strip() for m in sections if m)
    perl_stanza = _read_text(os.path.join(root, "usr/share/doc/perl-doc/copyright"))
    perl_stanza = re.search(r"^Files: \*\n.*?(?=^Files:)", perl_stanza, re.S | re.M).group(0)
    doc = os.path.join(root, "usr", "share", "doc")
    notices = {
        "PSF-LICENSE.txt": _read_text(os.path.join(root, "usr", "lib", PYTHON, "LICENSE.txt")),
        "WordNet-3.0.txt": _read_text(os.path.join(doc, "wordnet-base", "copyright")),
        "janeaustenr-MIT.txt": "The novels' texts (Project Gutenberg editions) are in the public "
                               "domain. The janeaustenr package that holds them:\n\n"
                               + _read_text(os.path.join(doc, "r-cran-janeaustenr", "copyright")),
        "perlfaq.txt": "perlfaq1-9 (Debian package perl-doc), AUTHOR AND COPYRIGHT sections:\n\n"
                       + "\n\n".join(clean_pod(n) for n in perl_notices)
                       + "\n\nPerl's terms (from perl-doc's copyright file):\n\n" + perl_stanza
                       + "\nThe Artistic License (perlartistic.pod):\n\n"
                       + _read_text(os.path.join(pod[0], "perlartistic.pod")),
        "debian-faq.txt": _read_text(os.path.join(doc, "debian-faq", "copyright")),
    }
    for name, text in notices.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)


_EXTRACTORS: dict[str, Callable[[str], list[Unit]]] = {
    "code": code_units, "docs": docs_units, "dictionary": dictionary_units,
    "literature": literature_units, "qa": qa_units}


def _row(domain: str, unit: Unit) -> str:
    return json.dumps({"domain": domain, "key": unit.key, "text": unit.text},
                      ensure_ascii=False) + "\n"


def _cap(domain: str, units: list[Unit], max_bytes: float,
         size: Callable[[Unit], int] = lambda u: len(u.text.encode())) -> list[Unit]:
    # Keep units in a salted-hash order, independent of the split hash, up to the byte budget.
    kept, total = [], 0
    for unit in sorted(units, key=lambda u: _hash01(f"cap:{domain}:{u.key}")):
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


def read_units(path: str) -> list[dict]:
    """The rows of a corpus ``.jsonl`` file (``domain``, ``key``, ``text``)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e


def _files_sha256(out: str) -> dict[str, str]:
    paths = {os.path.relpath(p, out): p for p in _regular_files(out, "**/*")}
    return {rel: _sha256(p) for rel, p in sorted(paths.items()) if rel != "manifest.json"}


def build_corpus(out: str, *, from_debs: str | None = None, cache: str | None = None,
                 max_mb_per_domain: float | None = None) -> dict:
    """Builds the five domains into ``out`` (see the module docstring); returns the manifest."""
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "loraswitch_jax", "debs")
    debs = fetch_debs(PACKAGES, cache, from_debs)
    os.makedirs(out, exist_ok=True)
    manifest = {"created": _now(), "builder": "python -m loraswitch_jax.eval.corpus",
                "max_mb_per_domain": max_mb_per_domain,
                "packages": {p: _deb_info(d) for p, d in debs.items()}, "domains": {}}
    with tempfile.TemporaryDirectory(prefix="loraswitch-debs-") as root:
        for package, deb in tqdm(debs.items(), desc="unpack", unit="deb"):
            result = _run(["dpkg-deb", "-x", deb, root])
            if result.returncode != 0:
                raise CorpusError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()}")
        _write_notices(root, os.path.join(out, "LICENSES"))
        for domain in tqdm(DOMAINS, desc="domains", unit="domain"):
            spec, units = DOMAINS[domain], _EXTRACTORS[domain](root)
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
    from loraswitch_jax.eval import tasks  # tasks imports this module
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
    from loraswitch_jax.eval import tasks  # tasks imports this module

    with open(os.path.join(corpus, "manifest.json"), encoding="utf-8") as f:
        source = json.load(f)
    os.makedirs(out, exist_ok=True)
    manifest = {"created": _now(),
                "builder": "python -m loraswitch_jax.eval.corpus --sample", "source": {
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
    parser = argparse.ArgumentParser(prog="python -m loraswitch_jax.eval.corpus",
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
