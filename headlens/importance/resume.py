"""Where a long sweep keeps what it has finished, so that a killed run resumes without
recomputing it, and the content keys that decide whether saved work still applies.

A sweep's folder holds ``sweep.json`` (checked JSON: the sweep's fingerprint) and one record per
finished unit (a layer's chunk of heads on a block of examples; :mod:`headlens.storage.records`:
``<unit>.json`` with the checksum of ``<unit>.safetensors``, the ``[len(heads), N]`` metrics). Nothing is unpickled; a
unit whose files fail their checksum is computed again, only it. The fingerprint covers the
sweep's settings, the model's weights (:func:`headlens.model.digest.state_digest`, or the key
the caller computed from the weight files) and the task's content (:func:`task_digest`), so an
edited task file or replaced weights never resume another sweep's units.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import re
from collections import abc
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from headlens.errors import HeadlensError
from headlens.files import writable_folder
from headlens.model.digest import state_digest
from headlens.storage.folders import FolderLock
from headlens.storage.records import (
    DamagedRecord,
    load_record,
    read_checked_json,
    remove_record,
    save_record,
    write_checked_json,
)

FINGERPRINT = "sweep.json"


def _plain(x):
    """``x`` as JSON-able data for hashing (tensors and arrays as lists, a column read from a file
    by its records, callables by their code, other objects by their class and data)."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if callable(x):
        code = getattr(x, "__code__", None)
        try:
            text = inspect.getsource(x)
        except (OSError, TypeError):
            text = repr(code.co_code) if code is not None else repr(x)
        return f"callable {getattr(x, '__module__', '')}.{getattr(x, '__qualname__', type(x).__name__)}: {text}"
    if isinstance(x, abc.Sequence):  # e.g. a column of a data file: its content, not its path
        return list(x)
    if hasattr(x, "__dict__"):  # an object: its class and data, not its address in memory
        return [type(x).__module__, type(x).__qualname__, {k: v for k, v in sorted(vars(x).items())
                                                           if not k.startswith("_")}]
    return re.sub(r" at 0x[0-9a-f]+", "", repr(x))


def task_digest(task) -> str:
    """sha256 of what a task computes: its class, every setting (metric, masking seed,
    max_tokens, a callable metric's source, the examples' ids) and every per-example field
    (prompts, answers, texts, ...), read one example at a time (a task read lazily from a
    file is hashed by its records, never held in memory)."""
    fields = tuple(getattr(task, "_fields", ()))
    state = {k: v for k, v in sorted(vars(task).items()) if not k.startswith("_") and k not in fields}
    h = hashlib.sha256(json.dumps([type(task).__module__, type(task).__qualname__, state], sort_keys=True,
                                  default=_plain).encode())
    for f in fields:
        values = getattr(task, f, None)
        h.update(f"\x1d{f}".encode())
        for item in (() if values is None else values):
            h.update(b"\x1e" + json.dumps(item, sort_keys=True, default=_plain).encode())
        h.update(b"\x1d" + (b"none" if values is None else b"end"))
    return h.hexdigest()


def sweep_dir_damaged(folder) -> bool:
    """Whether ``folder`` holds a ``sweep.json`` that fails its checksum (its units cannot be trusted)."""
    path = Path(folder) / FINGERPRINT
    try:
        read_checked_json(path)
    except FileNotFoundError:
        return False
    except (DamagedRecord, OSError):
        return True
    return False


@contextlib.contextmanager
def resume_lock(folder, world) -> Iterator[None]:
    """Hold ``folder``'s :class:`headlens.storage.folders.FolderLock` for the block (rank 0 of
    ``world`` holds it for the job; its ranks share the folder): a second job on the same resume
    folder stops at once, naming the first. ``folder=None``: nothing to lock."""
    if folder is None:
        yield
        return
    held = []
    world.on_main(lambda: held.append(FolderLock(folder, name="resume_dir").acquire()))
    try:
        yield
    finally:
        for lock in held:
            lock.release()


class SweepResume:
    """Finished units of a sweep in ``folder`` (a layer's chunk of heads on a block of examples),
    each a checked record written atomically, so a reader never sees half a unit; ``sweep.json``
    fingerprints the sweep so that a folder is only resumed by the same one. The ranks of a
    multi-process job share one folder: rank 0 creates it and reads what is there, each rank
    writes the units it computed (names differ, so no two ranks write one file)."""

    def __init__(self, folder, fingerprint: dict):
        self.folder = writable_folder(folder, "resume_dir")
        meta = self.folder / FINGERPRINT
        if meta.is_file():
            try:
                old = read_checked_json(meta)
            except (DamagedRecord, OSError):
                raise HeadlensError(f"resume_dir {str(folder)!r} has an unreadable {FINGERPRINT} (damaged or "
                                    "not written by this headlens): delete the folder to start the sweep again") from None
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise HeadlensError(f"resume_dir {str(folder)!r} holds a different sweep (differs in "
                                    f"{diff}): use another folder or delete it")
        else:
            write_checked_json(meta, fingerprint)

    @staticmethod
    def unit(layer: int, heads, block: int = 0) -> str:
        """The record name of a layer's chunk of heads on a block of examples, e.g.
        ``layer003_heads0-1-2_block0000``."""
        return f"layer{layer:03d}_heads{'-'.join(str(h) for h in heads)}_block{block:04d}"

    def load(self, layer: int, heads, block: int = 0, n_examples: Optional[int] = None) -> Optional[np.ndarray]:
        """The saved ``[len(heads), N]`` metrics (``N = n_examples`` when given), or None if not
        saved (or damaged, or of another shape: then it is deleted, to be computed again)."""
        name = self.unit(layer, heads, block)
        try:
            saved = load_record(self.folder, name)
        except DamagedRecord:
            saved = None
        else:
            if saved is None:
                return None
            values = saved[0]
            if isinstance(values, np.ndarray) and values.ndim == 2 and values.shape[0] == len(heads) \
                    and values.dtype == np.float64 and (n_examples is None or values.shape[1] == n_examples):
                return values
        remove_record(self.folder, name)  # damaged: compute this unit again
        return None

    def save(self, layer: int, heads, values: np.ndarray, block: int = 0) -> None:
        save_record(self.folder, self.unit(layer, heads, block), np.asarray(values, dtype=np.float64),
                    {"layer": int(layer), "heads": [int(h) for h in heads], "block": int(block)})


def sweep_fingerprint(model, task, weights: Optional[str] = None, **settings) -> dict:
    """What makes two sweeps the same: the settings, the model's name and heads, a digest of its
    weights (``weights``, when the caller has one, else :func:`state_digest`), the task's name,
    metric and content (:func:`task_digest`)."""
    return dict(settings, model=model.cfg.name, heads=repr(model.head_labels()),
                weights=weights or state_digest(model), task=task.name, metric=task.metric_name,
                examples=task_digest(task), format=2)
