"""Plain text from the corpus's markup: sentences, reST and pod inline codes, paragraphs."""

from __future__ import annotations

import re

__all__ = ["WORD", "clean_pod", "clean_rst", "dedent", "split_paragraphs", "split_sentences"]

WORD = re.compile(r"[^\W_]+")  # runs of letters and digits

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


def split_paragraphs(text: str) -> list[str]:
    """The non-blank paragraphs of ``text`` (split at blank lines)."""
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def dedent(text: str) -> str:
    """``text`` without the indentation its non-blank lines share."""
    lines = text.splitlines()
    indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
    return "\n".join(l[indent:] for l in lines)
