"""R lazy-load databases (``.rdx`` index + ``.rdb`` blobs), the format the janeaustenr package
keeps the novels in: a short reader of R's XDR serialization, no R needed."""

from __future__ import annotations

import gzip
import struct
import zlib

from loraswitch_jax.eval.accuracy.domains import CorpusError

__all__ = ["read_rdata"]


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

