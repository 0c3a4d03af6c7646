"""Texts and records from files of any size, read lazily: a data set is never held in memory.

:func:`open_texts` and :func:`open_records` give a :class:`Column`, a sequence (``len``, indexing,
iteration; every iteration reads the file again) of one field of every record of

- a ``.txt`` file: its non-empty lines, stripped (field ignored);
- a ``.jsonl`` file: one JSON object per non-empty line;
- a ``.parquet`` file: its rows, read one row group at a time (pyarrow);
- a folder written by ``datasets.Dataset.save_to_disk`` (memory-mapped Arrow), or a
  ``datasets.Dataset`` object, when ``datasets`` is installed.

Indexing a text or JSONL file uses a table of line offsets built by one pass over the file
(8 bytes per record); iteration needs none. ``Column.take(indices)`` is a view of some records.
"""
from __future__ import annotations

import json
import os
from array import array
from collections import abc
from pathlib import Path
from typing import Iterator, Optional, Sequence

from headlens.errors import HeadlensError, check

SUFFIXES = (".txt", ".jsonl", ".parquet")


class Column(abc.Sequence):
    """Field ``field`` (None: the whole record) of the records of a :class:`_Source`, or of the
    records at ``indices`` of it."""

    def __init__(self, source: "_Source", field: Optional[str], indices: Optional[Sequence[int]] = None):
        self.source, self.field, self.indices = source, field, indices

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def _get(self, record):
        if self.field is None or isinstance(record, str):
            return record
        if not isinstance(record, dict) or self.field not in record:
            raise HeadlensError(f"{self.source.name}: a record has no field {self.field!r}")
        return record[self.field]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        n = len(self)
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise IndexError(f"record {i} of {n}")
        return self._get(self.source.record(i if self.indices is None else self.indices[i]))

    def __iter__(self) -> Iterator:
        if self.indices is None:
            yield from (self._get(r) for r in self.source.records())
        else:
            yield from (self[i] for i in range(len(self)))

    def take(self, indices: Sequence[int]) -> "Column":
        """The records at ``indices`` (positions in this column), lazily."""
        base = range(len(self.source)) if self.indices is None else self.indices
        return Column(self.source, self.field, [base[int(i)] for i in indices])

    def where(self, i: int) -> str:
        """Record ``i``'s place in its file, for messages: ``line 12`` (text, JSONL), ``row 3``."""
        return self.source.where(i if self.indices is None else self.indices[i])

    def column(self, field: str) -> "Column":
        """Another field of the same records."""
        return Column(self.source, field, self.indices)

    def __repr__(self) -> str:
        return f"Column({self.source.name!r}, field={self.field!r}, n={len(self)})"


class _Source:
    name = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, i: int):
        raise NotImplementedError

    def records(self) -> Iterator:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Record ``i``'s place in the source, for messages (a line, a row)."""
        return f"row {i + 1}"


class _LineFile(_Source):
    """A text (``jsonl=False``) or JSONL file: one record per non-empty line. A line that is not
    UTF-8 (or, in JSONL, not JSON) is a :class:`HeadlensError` naming the file and the line."""

    def __init__(self, path: Path, jsonl: bool, what: str = "data file"):
        self.path, self.jsonl, self.name = path, jsonl, str(path)
        self.what = what
        self._offsets: Optional[array] = None

    def _parse(self, raw: bytes, number):
        """The record of line ``number`` (a callable giving it, looked up only for a message)."""
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise HeadlensError(f"{self.what} {self.name!r}, line {number()}: not UTF-8 text ({e.reason} at byte "
                                f"{e.start}); save the file as UTF-8") from None
        if not self.jsonl:
            return line
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise HeadlensError(f"{self.what} {self.name!r}, line {number()} is not valid JSONL (one JSON object "
                                f"per line): {e.msg} (column {e.colno})") from None

    def offsets(self) -> array:
        if self._offsets is None:
            offsets, at = array("q"), 0
            with open(self.path, "rb") as f:
                for raw in f:
                    if raw.strip():
                        offsets.append(at)
                    at += len(raw)
            self._offsets = offsets
        return self._offsets

    def line_number(self, i: int) -> int:
        """The line (from 1) of record ``i``: read from the file, for messages only."""
        end, n = self.offsets()[i], 1
        with open(self.path, "rb") as f:
            while end > 0:
                chunk = f.read(min(end, 1 << 20))
                if not chunk:
                    break
                n, end = n + chunk.count(b"\n"), end - len(chunk)
        return n

    def where(self, i: int) -> str:
        return f"line {self.line_number(i)}"

    def __len__(self) -> int:
        return len(self.offsets())

    def record(self, i: int):
        with open(self.path, "rb") as f:
            f.seek(self.offsets()[i])
            return self._parse(f.readline(), lambda: self.line_number(i))

    def records(self) -> Iterator:
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    yield self._parse(raw, lambda: n)


class _Parquet(_Source):
    def __init__(self, path: Path):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise HeadlensError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several kinds for a damaged file
            raise HeadlensError(f"{path} is not a readable Parquet file: {e}") from None
        self.name = str(path)
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = [sum(sizes[:g]) for g in range(len(sizes) + 1)]
        self._group: tuple = (None, None)

    def __len__(self) -> int:
        return self.starts[-1]

    def record(self, i: int):
        import bisect

        g = bisect.bisect_right(self.starts, i) - 1
        if self._group[0] != g:
            self._group = (g, self.file.read_row_group(g).to_pylist())
        return self._group[1][i - self.starts[g]]

    def records(self) -> Iterator:
        for batch in self.file.iter_batches(batch_size=1024):
            yield from batch.to_pylist()


class _Dataset(_Source):
    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, i: int):
        return self.dataset[int(i)]

    def records(self) -> Iterator:
        yield from self.dataset


def _source(source, what: str = "data file") -> _Source:
    if type(source).__name__ == "Dataset" and hasattr(source, "features"):
        return _Dataset(source, "datasets.Dataset")
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
            raise HeadlensError(f"folder {str(path)!r} is not a dataset saved by datasets' save_to_disk")
        try:
            import datasets
        except ImportError:
            raise HeadlensError(f"reading the dataset folder {str(path)!r} needs datasets (pip install datasets)") from None
        return _Dataset(datasets.load_from_disk(str(path)), str(path))
    check(path.is_file(), f"{what} {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _Parquet(path)
    return _LineFile(path, jsonl=suffix == ".jsonl", what=what)


def open_records(source, what: str = "data file") -> Column:
    """Every record of ``source`` (a file or dataset, see the module doc): dicts (JSONL,
    Parquet, datasets) or strings (text files). ``what`` names the file in messages (e.g.
    ``"task file"``)."""
    return Column(_source(source, what), None)


def open_texts(source, field: str = "text", limit: Optional[int] = None) -> Column:
    """Field ``field`` of every record of ``source`` (a text file's lines), the first ``limit``
    of them if given; a source without records is refused."""
    column = Column(_source(source), field)
    check(limit is None or limit >= 1, f"limit must be >= 1 or None, got {limit}")
    if limit is not None and limit < len(column):
        column = column.take(range(limit))
    check(len(column) > 0, f"{column.source.name} holds no records")
    return column


def is_data_file(source) -> bool:
    """Whether ``source`` names a file or folder :func:`open_texts` reads."""
    if not isinstance(source, (str, os.PathLike)):
        return type(source).__name__ == "Dataset" and hasattr(source, "features")
    path = Path(os.fspath(source)).expanduser()
    return path.is_dir() or (path.is_file() and path.suffix.lower() in SUFFIXES)
