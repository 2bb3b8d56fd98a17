"""Training data: local text files -> fixed-shape, packed, resumable numpy batches.

:func:`load_data` reads the files of a :class:`DataConfig` with ``datasets`` (local builders,
nothing cached outside a temporary folder), tokenizes, and holds out examples by a hash of their
content (or of a ``split_key`` column): the split depends on neither file order nor seed.
:class:`TrainBatches` is an infinite, resumable iterator; :class:`EvalBatches` a finite one.

Packing: an example of n tokens gives n - 1 (input, target) pairs, packed greedily (first fit
over the newest rows) into rows of ``seq_len``; an example of more than ``seq_len + 1`` tokens is
split into chunks, each its own segment. Pairs are cut within an example, so no target crosses a
segment boundary. Rows are packed once (example order shuffled by ``seed``), then shuffled each
epoch by ``default_rng([seed, epoch])``: batches per epoch are fixed and ``(epoch, step)`` is the
whole resume state. Segments do not see each other (``segment_ids``), so row-mates do not matter.

A batch is a dict of numpy arrays ``[batch_size, seq_len]``:

* ``tokens`` int32: inputs; 0 in padding.
* ``targets`` int32: the next token of the same example; 0 in padding.
* ``loss_mask`` float32: 1 where the target counts (not padding, not a prompt token).
* ``segment_ids`` int32: 1, 2, ... per packed segment in a row; 0 = padding. Padding attends only
  to earlier padding of its row (``layers.attention_mask`` compares ids), so it never yields NaN.
* ``positions`` int32: 0, 1, ... restarting in each segment; 0 in padding.

Several processes: each builds only the rows of every batch that its devices hold (``rows=``,
positions within the global batch: ``train.hosts.process_rows``); the global batches do not
depend on the process count.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from loraswitch_jax.tokenizer import Tokenizer

__all__ = ["DataConfig", "DataError", "DataSplits", "DataState", "EvalBatches", "Examples",
           "TrainBatches", "load_data"]

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

_BUILDERS = {"json": "json", "jsonl": "json", "text": "text", "txt": "text", "parquet": "parquet"}
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text",
               ".parquet": "parquet"}
_SAMPLE_BY = ("line", "paragraph", "document")
# First fit over the 16 newest rows: ~94 % of slots filled for lengths uniform in [5, 600] at
# seq_len 512 (next-fit: 75 %), 0.3 s per 200k pieces; the packing is computed once.
_OPEN_ROWS = 16
_PACK_STREAM = 0x7061636B  # "pack": packing order's seed stream, apart from the epochs' [seed, e]


class DataError(ValueError):
    """The data config, files or columns are unusable."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the data is and how it becomes batches. Frozen and hashable.

    Attributes:
      path: a file, a folder (its files with a known extension, sorted) or a glob.
      seq_len: tokens per row (inputs; each row reads ``seq_len + 1`` tokens of its examples).
      batch_size: rows per batch.
      format: ``json`` / ``jsonl`` (JSON lines or a JSON array), ``text`` / ``txt``, ``parquet``;
        ``None`` infers it from the file extensions.
      text_field: column of plain-text examples (``text`` files always have ``text``).
      prompt_field, response_field: both given: prompt/response examples, loss on the response.
      pack: pack several examples per row; otherwise one per row, truncated to ``seq_len + 1``.
      add_bos, add_eos: wrap each example in the BOS / EOS ids given to :func:`load_data`.
      shuffle: shuffle packing order once and rows every epoch; otherwise file order.
      seed: shuffling seed; the validation split does not depend on it.
      validation_fraction: share of examples held out, by a hash of content or ``split_key``.
      split_key: column whose value decides the split (e.g. a file path or document id), so all
        examples of one unit land on the same side; ``None``: the example's own text.
      sample_by: for ``text`` files: one example per ``line``, ``paragraph`` or ``document``.
    """

    path: str
    seq_len: int
    batch_size: int
    format: str | None = None
    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    pack: bool = True
    add_bos: bool = True
    add_eos: bool = True
    shuffle: bool = True
    seed: int = 0
    validation_fraction: float = 0.0
    split_key: str | None = None
    sample_by: str = "line"
    files: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
    builder: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        for name, low in (("seq_len", 2), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(f"validation_fraction must be in [0, 1), got "
                            f"{self.validation_fraction}")
        if (self.prompt_field is None) != (self.response_field is None):
            raise DataError("give both prompt_field and response_field, or neither: "
                            f"{self.prompt_field=}, {self.response_field=}")
        if self.prompt_field is not None and self.prompt_field == self.response_field:
            raise DataError(f"prompt_field and response_field are the same: {self.prompt_field!r}")
        for name, known in (("format", _BUILDERS), ("sample_by", _SAMPLE_BY)):
            if (value := getattr(self, name)) not in (None, *known):
                raise DataError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        files, builder = _find_files(self.path, self.format)
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "builder", builder)

    @property
    def fields(self) -> tuple[str, ...]:
        """The text columns an example is made of (the last one is what the loss sees)."""
        pair = (self.prompt_field, self.response_field)
        return pair if self.prompt_field is not None else (self.text_field,)


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _find_files(path: str, fmt: str | None) -> tuple[tuple[str, ...], str]:
    """The data files at ``path`` (file, folder or glob) and the ``datasets`` builder for them."""
    if os.path.isdir(path):
        wanted = {e for e, b in _EXTENSIONS.items() if fmt is None or b == _BUILDERS[fmt]}
        names = sorted(glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True))
        files = [f for f in names if os.path.isfile(f) and _suffix(f) in wanted]
        if not files:
            raise DataError(f"no data files ({', '.join(sorted(wanted))}) in folder {path!r}")
    elif glob.has_magic(path):
        files = [f for f in sorted(glob.glob(path, recursive=True)) if os.path.isfile(f)]
        if not files:
            raise DataError(f"no files match {path!r}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"no such file or folder: {path!r}")
    if fmt is not None:
        return tuple(files), _BUILDERS[fmt]
    found = {_EXTENSIONS.get(_suffix(f)) for f in files}
    if None in found:
        unknown = [f for f in files if _suffix(f) not in _EXTENSIONS]
        raise DataError(f"cannot infer the format of {unknown[:3]}; set format= to one of "
                        f"{', '.join(_BUILDERS)}")
    if len(found) > 1:
        raise DataError(f"files of several formats ({', '.join(sorted(found))}) at {path!r}")
    return tuple(files), found.pop()


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """Tokenized examples stored flat.

    Attributes:
      tokens: ``[N]`` int32, all examples back to back.
      target_mask: ``[N]`` bool, True where the token counts as a target (not BOS, not prompt).
      offsets: ``[n + 1]`` int64; example i is ``tokens[offsets[i]:offsets[i + 1]]``.
    """

    tokens: np.ndarray
    target_mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """``[n]`` tokens per example."""
        return np.diff(self.offsets)

    def select(self, index: np.ndarray) -> Examples:
        """The examples at ``index`` (ints or a bool mask), in that order."""
        index = np.arange(len(self))[index]
        lengths = self.lengths[index]
        src = _ranges(self.offsets[index], lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Examples(self.tokens[src], self.target_mask[src], offsets)


class DataSplits(NamedTuple):
    """The training examples and the held-out ones."""

    train: Examples
    validation: Examples


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorized."""
    lengths = np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, np.int64) - (ends - lengths), lengths) + np.arange(
        ends[-1] if len(ends) else 0, dtype=np.int64)


def load_data(cfg: DataConfig, tokenizer: Tokenizer, *, bos_id: int | None,
              eos_id: int | Sequence[int] | None) -> DataSplits:
    """Reads, tokenizes and splits the files of ``cfg``.

    Args:
      tokenizer: encodes text (``encode(text, add_special_tokens=False)``); BOS/EOS are added here.
      bos_id, eos_id: e.g. ``LlamaConfig.bos_token_id`` / ``eos_token_id`` (a tuple: its first id).

    Returns:
      Train and validation :class:`Examples`, without those whose text (or response) is empty.

    Raises:
      DataError: a field is missing or not text, a file cannot be parsed, or an id is missing.
    """
    if eos_id is not None and not isinstance(eos_id, (int, np.integer)):
        eos_id = eos_id[0] if len(eos_id) else None
    for name, add, token in (("bos", cfg.add_bos, bos_id), ("eos", cfg.add_eos, eos_id)):
        if add and token is None:
            raise DataError(f"add_{name}=True but {name}_id is None")
    # Imported here, not at the top: datasets brings pyarrow, which the in-memory paths
    # (Examples, TrainBatches; the accuracy experiment) do not need.
    import datasets

    kwargs = {"sample_by": cfg.sample_by} if cfg.builder == "text" else {}
    # datasets fails on an empty file with a bare StopIteration or an Arrow message: name it.
    files = [f for f in cfg.files if not _is_blank(f)]
    if not files:
        raise DataError(f"the data file {cfg.files[0]!r} is empty" if len(cfg.files) == 1 else
                        f"all {len(cfg.files)} data files at {cfg.path!r} are empty")
    # The builder writes Arrow files to cache_dir; the dataset is read into memory, so the
    # folder can go at once and nothing lands in ~/.cache or beside the data.
    with tempfile.TemporaryDirectory(prefix="loraswitch_data_") as cache_dir:
        try:
            ds = datasets.load_dataset(cfg.builder, data_files=files, split="train",
                                       cache_dir=cache_dir, keep_in_memory=True, **kwargs)
        except (datasets.exceptions.DatasetGenerationError, StopIteration) as e:
            cause = e.__cause__ or e
            raise DataError(f"cannot read {files[:3]} as {cfg.builder}: "
                            f"{cause or type(cause).__name__}") from e
    _check_columns(ds, cfg)
    head, tail = [bos_id] * cfg.add_bos, [eos_id] * cfg.add_eos
    fields, holdout, split_field = cfg.fields, cfg.validation_fraction, cfg.split_key

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        out = {"input_ids": [], "target_mask": [], "holdout": []}
        for i, parts in enumerate(zip(*(batch[f] for f in fields))):
            parts = ["" if p is None else p for p in parts]
            key = "\x00".join(parts) if split_field is None else str(batch[split_field][i])
            out["holdout"].append(holdout > 0 and _unit_hash(key) < holdout)
            ids = [tokenizer.encode(p, add_special_tokens=False) for p in parts]
            prompt = head + (ids[0] if len(ids) == 2 else [])
            target = ids[-1] + tail if parts[-1] else []  # empty text: dropped below
            prompt = prompt if target else []
            out["input_ids"].append(prompt + target)
            out["target_mask"].append([False] * len(prompt) + [True] * len(target))
        return out

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "target_mask": datasets.List(datasets.Value("bool")),
                                  "holdout": datasets.Value("bool")})
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, features=features,
                keep_in_memory=True, desc="tokenizing",
                new_fingerprint=hashlib.sha1(repr((cfg, bos_id, eos_id)).encode()).hexdigest())
    tokens, offsets = _list_column(ds, "input_ids")
    examples = Examples(tokens.astype(np.int32), _list_column(ds, "target_mask")[0], offsets)
    is_val = np.asarray(ds.data.column("holdout").to_numpy(zero_copy_only=False), bool)
    usable = examples.lengths >= 2
    splits = DataSplits(examples.select(usable & ~is_val), examples.select(usable & is_val))
    log.info("%s: %d train / %d validation examples", cfg.path, *map(len, splits))
    return splits


def _is_blank(path: str, chunk: int = 1 << 16) -> bool:
    """Whether the file holds nothing but whitespace (reads only up to its first other byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _check_columns(ds: datasets.Dataset, cfg: DataConfig) -> None:
    import datasets

    columns = ds.column_names
    names = cfg.fields + ((cfg.split_key,) if cfg.split_key is not None else ())
    for name in names:
        if name not in columns:
            raise DataError(f"field {name!r} is not in the dataset ({cfg.path}); "
                            f"available columns: {columns}")
    for name in cfg.fields:
        feature = ds.features[name]
        if not (isinstance(feature, datasets.Value) and "string" in feature.dtype):
            raise DataError(f"field {name!r} must hold text, but its type is {feature}")


def _unit_hash(key: str) -> float:
    """A stable hash of ``key`` in ``[0, 1)`` (not Python's ``hash``, which is salted per run)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _list_column(ds: datasets.Dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as flat values ``[N]`` and int64 offsets ``[n + 1]``."""
    # Chunk by chunk (no combine_chunks): Arrow's int32 list offsets overflow past 2**31 values.
    chunks = ds.data.column(name).chunks
    values = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks]
    lengths = [c.value_lengths().to_numpy(zero_copy_only=False) for c in chunks]
    lengths = np.concatenate(lengths) if chunks else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return (np.concatenate(values) if chunks else np.zeros(0, np.int32)), offsets


class _Layout(NamedTuple):
    """Where each piece (a run of pairs of one example) sits: row, first column, source."""

    source: np.ndarray  # [P] index in Examples.tokens of the piece's first input token
    length: np.ndarray  # [P] pairs in the piece
    col: np.ndarray  # [P] first column in its row
    row_start: np.ndarray  # [R + 1] pieces of row r are row_start[r]:row_start[r + 1]
    num_rows: int


def _layout(examples: Examples, order: np.ndarray, seq_len: int, pack: bool) -> _Layout:
    pairs = examples.lengths[order] - 1
    order, pairs = order[pairs >= 1], pairs[pairs >= 1]
    if pack:  # chunks of seq_len pairs; chunk j starts at token j * seq_len
        n_chunks = -(-pairs // seq_len)
        chunk = _ranges(np.zeros_like(n_chunks), n_chunks)
        start = chunk * seq_len
        length = np.minimum(seq_len, np.repeat(pairs, n_chunks) - start)
        source = np.repeat(examples.offsets[order], n_chunks) + start
        row, col = np.empty(len(length), np.int64), np.empty(len(length), np.int64)
        open_rows: list[list[int]] = []  # [row, used] of the newest rows, oldest first
        num_rows = 0
        for i, n in enumerate(length.tolist()):  # first fit over the open rows
            slot = next((s for s in open_rows if s[1] + n <= seq_len), None)
            if slot is None:
                slot, num_rows = [num_rows, 0], num_rows + 1
                open_rows = [*open_rows[-_OPEN_ROWS + 1:], slot]
            row[i], col[i] = slot
            slot[1] += n
        by_row = np.lexsort((col, row))
        source, length, row, col = source[by_row], length[by_row], row[by_row], col[by_row]
    else:
        length = np.minimum(pairs, seq_len)
        source = examples.offsets[order]
        row, col = np.arange(len(length)), np.zeros(len(length), np.int64)
        num_rows = len(length)
    row_start = np.searchsorted(row, np.arange(num_rows + 1)).astype(np.int64)
    return _Layout(source.astype(np.int64), length.astype(np.int64), col, row_start, num_rows)


def _check_positions(rows: np.ndarray | None, batch_size: int) -> np.ndarray | None:
    """``rows`` as sorted distinct positions in ``[0, batch_size)``; ``None``: all rows."""
    if rows is None:
        return None
    rows = np.asarray(rows)
    if (rows.ndim != 1 or not len(rows) or not np.issubdtype(rows.dtype, np.integer)
            or rows[0] < 0 or rows[-1] >= batch_size or np.any(np.diff(rows) <= 0)):
        raise DataError(f"rows must be sorted distinct positions in [0, {batch_size}), got "
                        f"{np.asarray(rows).tolist()[:8]}")
    return rows.astype(np.int64)


def _assemble(examples: Examples, layout: _Layout, rows: np.ndarray, cfg: DataConfig,
              positions: np.ndarray | None = None) -> Batch:
    """The batch of ``rows``; missing rows (``len(rows) < batch_size``) are padding. With
    ``positions`` only those rows of the batch (sorted, so the padding stays last)."""
    B, T = cfg.batch_size, cfg.seq_len
    if positions is not None:
        B, rows = len(positions), rows[positions[positions < len(rows)]]
    count = layout.row_start[rows + 1] - layout.row_start[rows]
    pieces = _ranges(layout.row_start[rows], count)
    segment = pieces - np.repeat(layout.row_start[rows], count) + 1
    n = layout.length[pieces]
    within = _ranges(np.zeros_like(n), n)
    src = np.repeat(layout.source[pieces], n) + within
    b = np.repeat(np.repeat(np.arange(len(rows)), count), n)
    t = np.repeat(layout.col[pieces], n) + within
    values = {"tokens": examples.tokens[src], "targets": examples.tokens[src + 1],
              "loss_mask": examples.target_mask[src + 1], "segment_ids": np.repeat(segment, n),
              "positions": within}
    batch = {}
    for name, value in values.items():
        batch[name] = np.zeros((B, T), np.float32 if name == "loss_mask" else np.int32)
        batch[name][b, t] = value
    return batch


@dataclasses.dataclass(frozen=True)
class DataState:
    """Where :class:`TrainBatches` stands: the next batch is batch ``step`` of epoch ``epoch``."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-ready; ``DataState(**d)`` or ``TrainBatches(..., state=d)`` reads it back."""
        return {"epoch": self.epoch, "step": self.step}


class TrainBatches:
    """Infinite, deterministic, resumable iterator of batches (format: module docstring).

    An epoch is ``batches_per_epoch`` batches of rows shuffled by ``default_rng([seed, epoch])``;
    the rows left over (fewer than a batch) wait for another epoch's shuffle. With fewer rows than
    ``batch_size``, an epoch is one batch padded with ``loss_mask`` 0.

    Resume: save ``state().to_dict()`` with the checkpoint and pass it back as ``state=``; the
    next batch is the one an uninterrupted run would give (same files and config).

    ``rows``: positions within each batch to build (``hosts.process_rows``), ``[len(rows), T]``
    leaves; ``None``: all ``batch_size`` rows.
    """

    def __init__(self, examples: Examples, cfg: DataConfig, *,
                 state: DataState | Mapping[str, int] | None = None,
                 rows: np.ndarray | None = None):
        order = (np.random.default_rng([_PACK_STREAM, cfg.seed]).permutation(len(examples))
                 if cfg.shuffle else np.arange(len(examples)))
        self._examples, self._cfg = examples, cfg
        self._positions = _check_positions(rows, cfg.batch_size)
        self._layout = _layout(examples, order, cfg.seq_len, cfg.pack)
        if self._layout.num_rows == 0:
            raise DataError(f"no training examples with 2 or more tokens in {cfg.path!r}")
        self.batches_per_epoch = max(1, self._layout.num_rows // cfg.batch_size)
        state = state if isinstance(state, DataState) else DataState(**(state or {}))
        if state.epoch < 0 or not 0 <= state.step < self.batches_per_epoch:
            raise DataError(f"resume state {state} is outside the data "
                            f"({self.batches_per_epoch} batches per epoch)")
        self._epoch, self._step = state.epoch, state.step
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    @property
    def num_rows(self) -> int:
        """Packed rows per epoch (before dropping the last partial batch)."""
        return self._layout.num_rows

    @property
    def fill(self) -> float:
        """Share of the row slots that hold tokens (packing efficiency)."""
        return float(self._layout.length.sum() / (self._layout.num_rows * self._cfg.seq_len))

    def state(self) -> DataState:
        """The position of the next batch."""
        return DataState(epoch=self._epoch, step=self._step)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._perm_epoch != self._epoch:
            n = self._layout.num_rows
            self._perm = (np.random.default_rng([self._cfg.seed, self._epoch]).permutation(n)
                          if self._cfg.shuffle else np.arange(n))
            self._perm_epoch = self._epoch
        B = self._cfg.batch_size
        rows = self._perm[self._step * B:(self._step + 1) * B]
        batch = _assemble(self._examples, self._layout, rows, self._cfg, self._positions)
        self._step += 1
        if self._step == self.batches_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch


class EvalBatches:
    """Finite, deterministic batches over examples in order (e.g. the validation split).

    Same format as :class:`TrainBatches` (``rows`` too); the last batch is padded with
    ``loss_mask`` 0. Iterate as often as you like; ``len()`` is the number of batches (0 for no
    examples).
    """

    def __init__(self, examples: Examples, cfg: DataConfig, *, rows: np.ndarray | None = None):
        self._examples, self._cfg = examples, cfg
        self._positions = _check_positions(rows, cfg.batch_size)
        self._layout = _layout(examples, np.arange(len(examples)), cfg.seq_len, cfg.pack)

    def __len__(self) -> int:
        return -(-self._layout.num_rows // self._cfg.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        B = self._cfg.batch_size
        for i in range(len(self)):
            rows = np.arange(i * B, min((i + 1) * B, self._layout.num_rows))
            yield _assemble(self._examples, self._layout, rows, self._cfg, self._positions)
