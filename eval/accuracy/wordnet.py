"""WordNet 3.0 data files (wndb(5WN)): one synset per line."""

from __future__ import annotations

import dataclasses
import re

__all__ = ["POS_LABELS", "Synset", "parse_wordnet_line", "split_gloss"]

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

