"""The corpus: held-out split, WordNet and R database readers, markup cleaners, package fetching
(no network, no apt, no dpkg)."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from loraswitch_jax.eval.accuracy import debian, domains, markup, rdata, wordnet

# ---- split ---------------------------------------------------------------------------------


def test_heldout_split_is_deterministic_and_hits_its_fraction():
    keys = [f"library/module_{i}.rst" for i in range(20000)]
    first = [domains.is_heldout("docs", k) for k in keys]
    assert first == [domains.is_heldout("docs", k) for k in keys]
    assert 0.14 < sum(first) / len(keys) < 0.16  # docs: 15 %
    tenth = [domains.is_heldout("docs", k, 0.1) for k in keys]
    assert 0.09 < sum(tenth) / len(keys) < 0.11
    # A smaller fraction holds out a subset: growing the share never moves a unit back.
    assert all(f for f, t in zip(first, tenth) if t)
    other = [domains.is_heldout("code", k, 0.15) for k in keys]  # the domain is hashed too
    assert 0.14 < sum(other) / len(keys) < 0.16 and other != first


# ---- WordNet -------------------------------------------------------------------------------

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUN = ('00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 '
        '| that which is perceived or known or inferred to have its own distinct existence '
        '(living or nonliving)  \n')
ADJ = ('00022437 00 s 02 dead-on(a) 0 caf\u00e9_au_lait 0 002 & 00021766 a 0000 ;u 07075172 n '
       '0000 | accurate and to the point; "a dead-on feel for characterization"; "she avoids '
       'big scenes"  \n')


def test_wordnet_line_parser():
    assert wordnet.parse_wordnet_line(HEADER) is None
    noun = wordnet.parse_wordnet_line(NOUN)
    assert (noun.key, noun.pos, noun.lemmas) == ("noun.Tops:00001740", "n", ("entity",))
    assert noun.text.startswith("entity (n.): that which is perceived")
    adj = wordnet.parse_wordnet_line(ADJ)
    assert adj.lemmas == ("dead-on", "caf\u00e9 au lait") and adj.lexname == "adj.all"
    definition, examples = wordnet.split_gloss(adj.gloss)
    assert definition == "accurate and to the point"
    assert examples == ["a dead-on feel for characterization", "she avoids big scenes"]
    with pytest.raises(ValueError, match="not a WordNet data line"):
        wordnet.parse_wordnet_line("00001740 03 n 01 entity 0 000\n")


def test_dictionary_units_read_latin1_and_skip_headers(tmp_path):
    folder = tmp_path / "usr" / "share" / "wordnet"
    folder.mkdir(parents=True)
    for name in ("noun", "verb", "adj", "adv"):
        lines = HEADER * 3 + {"noun": NOUN, "adj": ADJ}.get(name, "")
        (folder / f"data.{name}").write_bytes(lines.encode("latin-1"))
    units = debian.dictionary_units(str(tmp_path))
    assert [u.key for u in units] == ["noun.Tops:00001740", "adj.all:00022437"]
    assert units[1].text.startswith("dead-on, caf\u00e9 au lait (adj.): accurate")


# ---- R lazy-load database ------------------------------------------------------------------

class _RWriter:
    """R's XDR serialization (version 3) of the few types an R data database holds."""

    def __init__(self):
        self.symbols: list[str] = []

    def char(self, value: str | None) -> bytes:
        if value is None:
            return struct.pack(">ii", 9, -1)  # NA_character_
        raw = value.encode("utf-8")
        return struct.pack(">ii", 9 | (8 << 12), len(raw)) + raw  # UTF-8 flag in the levels

    def vector(self, kind: int, body: bytes, n: int, names: list[str] | None = None) -> bytes:
        out = struct.pack(">ii", kind | (1 << 9 if names else 0), n) + body
        if names:  # attributes: a pairlist cell tagged with the symbol "names"
            out += struct.pack(">i", 2 | (1 << 10)) + self.symbol("names")
            out += self.strings(names) + struct.pack(">i", 254)
        return out

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # later uses are references into the symbol table
            return struct.pack(">i", ((self.symbols.index(name) + 1) << 8) | 255)
        self.symbols.append(name)
        return struct.pack(">i", 1) + self.char(name)

    def strings(self, values, names=None) -> bytes:
        return self.vector(16, b"".join(map(self.char, values)), len(values), names)

    def ints(self, values, kind: int = 13) -> bytes:
        return self.vector(kind, struct.pack(f">{len(values)}i", *values), len(values))

    def list(self, items: list[bytes], names=None) -> bytes:
        return self.vector(19, b"".join(items), len(items), names)

    @staticmethod
    def header() -> bytes:
        return b"X\n" + struct.pack(">iiii", 3, 0x040201, 0x030500, 5) + b"UTF-8"


def _write_rdata(stem: str, variables: dict[str, list]) -> None:
    blobs, offsets = b"", []
    for lines in variables.values():
        raw = _RWriter.header() + _RWriter().strings(lines)
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets.append([len(blobs), len(blob)])
        blobs += blob
    w = _RWriter()
    index = _RWriter.header() + w.list(
        [w.list([w.ints(o) for o in offsets], names=list(variables)), w.list([]),
         w.ints([1], kind=10)], names=["variables", "references", "compressed"])
    with open(f"{stem}.rdx", "wb") as f:
        f.write(gzip.compress(index))
    with open(f"{stem}.rdb", "wb") as f:
        f.write(blobs)


def test_read_rdata_on_a_constructed_database(tmp_path):
    stem = str(tmp_path / "Rdata")
    _write_rdata(stem, {"emma": ["EMMA", "", "By Jane Austen", None, "caf\u00e9"],
                        "persuasion": ["PERSUASION"]})
    data = rdata.read_rdata(stem)
    assert data == {"emma": ["EMMA", "", "By Jane Austen", None, "caf\u00e9"],
                    "persuasion": ["PERSUASION"]}


def test_read_rdata_reports_a_damaged_file(tmp_path):
    stem = str(tmp_path / "Rdata")
    (tmp_path / "Rdata.rdx").write_bytes(b"not gzip")
    (tmp_path / "Rdata.rdb").write_bytes(b"")
    with pytest.raises(domains.CorpusError, match="cannot read the R database"):
        rdata.read_rdata(stem)


def test_literature_units_are_blocks_of_20_paragraphs(tmp_path):
    folder = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    folder.mkdir(parents=True)
    lines = []
    for p in range(45):
        lines += [f"Paragraph {p} starts here and", "goes on a little.", ""]
    _write_rdata(str(folder / "Rdata"), {"emma": lines})
    units = debian.literature_units(str(tmp_path))
    assert [u.key for u in units] == ["emma:0000", "emma:0001", "emma:0002"]
    paragraphs = units[1].text.split("\n\n")
    assert len(paragraphs) == 20
    assert paragraphs[0] == "Paragraph 20 starts here and goes on a little."


# ---- text helpers --------------------------------------------------------------------------

def test_split_sentences_keeps_abbreviations_and_quotes():
    text = ('Mr. Knightley, a sensible man, was a visitor. "Oh!" cried Emma, "it is so." '
            'She said no more.\nThey walked on.')
    assert markup.split_sentences(text) == [
        "Mr. Knightley, a sensible man, was a visitor.", '"Oh!" cried Emma, "it is so."',
        "She said no more.", "They walked on."]


def test_markup_cleaners():
    assert markup.clean_rst("Use :func:`len` or :meth:`~dict.get`, see `docs <https://x>`_, "
                            "``x + 1`` and *text*.") == \
        "Use len or dict.get, see docs, x + 1 and text."
    assert markup.clean_pod("Use C<< $a <=> $b >> or C<sort>, see L<perlfunc/sort> and "
                            "L<the FAQ|perlfaq4>, C<$x E<lt> 3>.") == \
        "Use $a <=> $b or sort, see perlfunc/sort and the FAQ, $x < 3."


def test_fetch_debs_names_the_missing_packages(tmp_path):
    (tmp_path / "wordnet-base_1%3a3.0-37_all.deb").write_bytes(b"")
    with pytest.raises(domains.CorpusError, match="no .deb for perl-doc, debian-faq"):
        debian.fetch_debs(["wordnet-base", "perl-doc", "debian-faq"], str(tmp_path / "cache"),
                          from_debs=str(tmp_path))
