"""Saved results that run no code when they are read, and that say when they are damaged.

A *record* ``NAME`` in a folder is up to three kinds of file, none of which can execute code:

    NAME.json         the value's structure (JSON), its metadata, and the sha256 of every file below
    NAME.safetensors  its arrays and tensors (safetensors: a JSON header and raw bytes)
    NAME.<i>.parquet  its tables (``pandas.DataFrame``), one Parquet file each

``NAME.json`` is *checked JSON* (:func:`write_checked_json`): it holds the sha256 of its own
canonical text and must equal that text byte for byte, so any change to it is seen; the other
files must match the sha256 it lists. :func:`load_record` raises :class:`DamagedRecord` on any
mismatch, unknown field or unknown type -- the caller computes the value again and never uses
a damaged one. Nothing is unpickled: the value types are JSON scalars, lists, tuples, dicts
(any keys of these types), numpy arrays and scalars, torch tensors, DataFrames (with their
``attrs``) and instances of classes the caller names (their ``__dict__`` is stored; reading one
back builds it with ``cls.__new__`` and sets that dict, as pickle would, but only for those
classes and only from data).

The data files are written first and the JSON last (each atomically), so a record whose JSON
is there is complete; a run killed in between leaves the previous record, whose checksums no
longer match, or none.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np

from headlens.files import atomic_write

SCHEMA = "headlens.record"
VERSION = 1


class DamagedRecord(Exception):
    """A saved file that fails its checksum or schema: compute the value again."""


# --- checked JSON ---------------------------------------------------------------------------------
def _canonical(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def checked_json_bytes(body: dict) -> bytes:
    """``body`` plus ``"sha256"`` (of ``body``'s canonical text) as canonical JSON text."""
    if "sha256" in body:
        raise ValueError("a checked JSON body cannot have its own 'sha256' key")
    return _canonical(dict(body, sha256=hashlib.sha256(_canonical(body)).hexdigest()))


def write_checked_json(path, body: dict) -> None:
    """Write ``body`` as checked JSON, atomically (see :func:`read_checked_json`)."""
    atomic_write(path, checked_json_bytes(body))


def parse_checked_json(data: bytes, where: str = "file") -> dict:
    """The body of checked JSON text; :class:`DamagedRecord` unless the text is exactly the
    canonical form of an object whose ``sha256`` is the hash of the rest."""
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise DamagedRecord(f"{where} is not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("sha256"), str):
        raise DamagedRecord(f"{where} has no checksum")
    body = {k: v for k, v in obj.items() if k != "sha256"}
    if _canonical(obj) != data or hashlib.sha256(_canonical(body)).hexdigest() != obj["sha256"]:
        raise DamagedRecord(f"{where} fails its checksum")
    return body


def read_checked_json(path) -> dict:
    """The body of a file written by :func:`write_checked_json`: :class:`DamagedRecord` if it was
    changed in any byte (``FileNotFoundError`` if it is missing)."""
    path = Path(path)
    return parse_checked_json(path.read_bytes(), str(path))


# --- values <-> JSON + tensors + tables -----------------------------------------------------------
class _Encoder:
    def __init__(self, classes: dict):
        self.classes = {cls: name for name, cls in classes.items()}
        self.tensors: dict = {}
        self.tables: list = []

    def tensor(self, kind: str, value) -> dict:
        name = f"t{len(self.tensors)}"
        self.tensors[name] = value
        return {kind: name}

    def __call__(self, x):
        import pandas as pd
        import torch

        if isinstance(x, np.generic):  # before float: np.float64 is a float
            return {"~np": x.dtype.str, "value": x.item()} if x.dtype.kind in "biuf" else self._unknown(x)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x if type(x) in (type(None), bool, int, float, str) else self._unknown(x)  # no subclasses
        if isinstance(x, list):
            return [self(v) for v in x]
        if isinstance(x, tuple) and type(x) is tuple:
            return {"~tuple": [self(v) for v in x]}
        if isinstance(x, dict) and type(x) is dict:  # [key, value] pairs: any keys, in order
            return {"~dict": [[self(k), self(v)] for k, v in x.items()]}
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf":
                return self._unknown(x)
            return self.tensor("~array", torch.from_numpy(np.ascontiguousarray(x).copy()))
        if isinstance(x, torch.Tensor):
            return self.tensor("~tensor", x.detach().cpu().contiguous())
        if isinstance(x, pd.DataFrame) and type(x) is pd.DataFrame:
            self.tables.append(x)
            return {"~table": len(self.tables) - 1, "attrs": self(dict(x.attrs))}
        if type(x) in self.classes:
            return {"~object": self.classes[type(x)], "state": self(dict(vars(x)))}
        return self._unknown(x)

    @staticmethod
    def _unknown(x):
        raise TypeError(f"headlens.storage.records cannot store a {type(x).__module__}.{type(x).__qualname__}")


class _Decoder:
    def __init__(self, classes: dict, tensors: dict, tables: list, where: str):
        self.classes, self.tensors, self.tables, self.where = classes, tensors, tables, where

    def bad(self, what: str):
        raise DamagedRecord(f"{self.where}: {what}")

    def __call__(self, x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [self(v) for v in x]
        if not isinstance(x, dict) or len(x) not in (1, 2):
            self.bad("unknown value")
        tag = next(k for k in x if k.startswith("~")) if any(k.startswith("~") for k in x) else None
        v = x.get(tag)
        if tag == "~tuple" and isinstance(v, list) and len(x) == 1:
            return tuple(self(i) for i in v)
        if tag == "~dict" and isinstance(v, list) and len(x) == 1:
            if not all(isinstance(p, list) and len(p) == 2 for p in v):
                self.bad("malformed pairs")
            out = {}
            for k, i in v:
                k = self(k)
                try:
                    out[k] = self(i)
                except TypeError:  # an unhashable key
                    self.bad("malformed key")
            return out
        if tag in ("~array", "~tensor") and len(x) == 1:
            if v not in self.tensors:
                self.bad(f"missing tensor {v!r}")
            t = self.tensors[v]
            return t.numpy() if tag == "~array" else t
        if tag == "~np" and set(x) == {"~np", "value"} and isinstance(v, str):
            try:
                dtype = np.dtype(v)
            except TypeError:
                self.bad("unknown numpy type")
            if dtype.kind not in "biuf" or not isinstance(x["value"], (bool, int, float)):
                self.bad("unknown numpy type")
            return dtype.type(x["value"])
        if tag == "~table" and set(x) == {"~table", "attrs"} and isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v < len(self.tables):
                self.bad(f"missing table {v}")
            df = self.tables[v].copy()
            attrs = self(x["attrs"])
            if not isinstance(attrs, dict):
                self.bad("malformed table attributes")
            df.attrs = attrs
            return df
        if tag == "~object" and set(x) == {"~object", "state"} and v in self.classes:
            state = self(x["state"])
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                self.bad("malformed object state")
            obj = self.classes[v].__new__(self.classes[v])
            obj.__dict__.update(state)
            return obj
        self.bad(f"unknown value type {tag!r}")


# --- records --------------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _table_bytes(df) -> bytes:
    if not all(isinstance(c, str) for c in df.columns):
        raise TypeError("headlens.storage.records stores tables with string column names only")
    buffer = io.BytesIO()
    df.to_parquet(buffer)
    data = buffer.getvalue()
    back = _read_table(data)
    back.attrs = df.attrs
    if not (back.columns.equals(df.columns) and back.index.equals(df.index)
            and list(back.dtypes) == list(df.dtypes) and back.equals(df)):
        raise TypeError("headlens.storage.records cannot store this table exactly in Parquet")
    return data


def _read_table(data: bytes):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(data))


def save_record(folder, name: str, value, meta: Optional[dict] = None, classes: Optional[dict] = None) -> None:
    """Save ``value`` as record ``name`` in ``folder`` with ``meta`` (JSON). ``classes``:
    ``{name: class}`` whose instances may appear in ``value``. Raises ``TypeError`` for a value
    of any other type (nothing is written then)."""
    from safetensors.torch import save

    folder = Path(folder)
    enc = _Encoder(classes or {})
    tree = enc(value)
    files = {}
    if enc.tensors:
        files[f"{name}.safetensors"] = save(enc.tensors)
    for i, df in enumerate(enc.tables):
        files[f"{name}.{i}.parquet"] = _table_bytes(df)
    for file, data in files.items():
        atomic_write(folder / file, data)
    body = {"schema": SCHEMA, "version": VERSION, "name": name, "meta": meta or {}, "value": tree,
            "files": {file: _sha(data) for file, data in files.items()}}
    write_checked_json(folder / f"{name}.json", body)


def load_record(folder, name: str, classes: Optional[dict] = None) -> Optional[tuple]:
    """``(value, meta)`` of record ``name`` in ``folder``; None when there is none;
    :class:`DamagedRecord` when any of its files fails its checksum or schema."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    path = folder / f"{name}.json"
    try:
        body = read_checked_json(path)
    except FileNotFoundError:
        return None
    files = body.get("files")
    if (body.get("schema") != SCHEMA or body.get("version") != VERSION or body.get("name") != name
            or not isinstance(files, dict) or not isinstance(body.get("meta"), dict)):
        raise DamagedRecord(f"{path} is not a headlens record of this version")
    tensors, tables = {}, []
    expected = ({f"{name}.safetensors"} if f"{name}.safetensors" in files else set()) | {
        f"{name}.{i}.parquet" for i in range(len(files) - (f"{name}.safetensors" in files))}
    if set(files) != expected:
        raise DamagedRecord(f"{path} lists unexpected files")
    for file in sorted(files):
        try:
            data = (folder / file).read_bytes()
        except FileNotFoundError:
            raise DamagedRecord(f"{folder / file} is missing") from None
        if _sha(data) != files[file]:
            raise DamagedRecord(f"{folder / file} fails its checksum")
        try:
            if file.endswith(".safetensors"):
                tensors = load(data)
            else:
                tables.append((int(file.split(".")[-2]), _read_table(data)))
        except (SafetensorError, OSError, ValueError) as e:  # checksum right, content unreadable
            raise DamagedRecord(f"{folder / file} cannot be read: {e}") from None
    tables = [df for _, df in sorted(tables, key=lambda t: t[0])]
    return _Decoder(classes or {}, tensors, tables, str(path))(body["value"]), body["meta"]


def record_files(name: str, folder) -> list[Path]:
    """The files of record ``name`` that exist in ``folder`` (its JSON and data files)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"{name}.*")
                  if p.name == f"{name}.json" or p.name == f"{name}.safetensors"
                  or (p.suffix == ".parquet" and p.name[len(name) + 1:-len(".parquet")].isdigit()))


def remove_record(folder, name: str) -> None:
    """Delete record ``name``'s files (its JSON first, so that a half-removed record is absent)."""
    files = record_files(name, folder)
    for p in sorted(files, key=lambda p: p.suffix != ".json"):
        p.unlink(missing_ok=True)


def value_digest(value, classes: Optional[dict] = None) -> str:
    """A sha256 of ``value``'s content as :func:`save_record` stores it (equal values, equal digest)."""
    enc = _Encoder(classes or {})
    tree = enc(value)
    h = hashlib.sha256(_canonical(tree))
    for name, t in sorted(enc.tensors.items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    for df in enc.tables:
        import pandas as pd

        h.update(repr((list(df.columns), [str(d) for d in df.dtypes], list(df.index))).encode())
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
        for c in df.columns:  # hash_pandas_object does not tell -0.0 from 0.0 or NaN payloads apart
            if df[c].dtype.kind == "f":
                h.update(df[c].to_numpy().tobytes())
    return h.hexdigest()
