"""The corpus's domains and its files: where each domain's text comes from, the held-out split,
and reading the ``{domain}.{train,heldout}.jsonl`` unit files."""

from __future__ import annotations

import dataclasses
import hashlib
import json

__all__ = ["AUSTEN_BLOCK", "DOMAINS", "PACKAGES", "PYTHON", "CorpusError", "DomainSpec", "Unit",
           "hash01", "is_heldout", "read_units", "sha256_file"]

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
    return hash01(f"{domain}:{key}") < fraction


def hash01(text: str) -> float:
    """A uniform number in [0, 1) from sha256(text): the split and sampling orders."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def read_units(path: str) -> list[dict]:
    """The rows of a corpus ``.jsonl`` file (``domain``, ``key``, ``text``)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e



def sha256_file(path: str) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

