"""Where a long sweep keeps what it has finished, so that a killed run resumes without
recomputing it: one ``.npy`` per unit, written atomically, under a fingerprint of the sweep."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from headlens.errors import HeadlensError
from headlens.files import atomic_write, writable_folder


class SweepResume:
    """Finished units of a sweep, one ``.npy`` per unit (a layer's chunk of heads on a block of
    examples), written atomically, so a reader never sees half a unit; ``sweep.json``
    fingerprints the sweep so a folder is only resumed by the same one. The ranks of a
    multi-process job share one folder: each writes the units it computed."""

    def __init__(self, folder, fingerprint: dict):
        self.folder = writable_folder(folder, "resume_dir")
        meta = self.folder / "sweep.json"
        if meta.is_file():
            try:
                old = json.loads(meta.read_text())
            except (OSError, ValueError):
                raise HeadlensError(f"resume_dir {str(folder)!r} has an unreadable sweep.json: "
                                    "delete the folder to start the sweep again") from None
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise HeadlensError(f"resume_dir {str(folder)!r} holds a different sweep (differs in "
                                    f"{diff}): use another folder or delete it")
        else:
            atomic_write(meta, json.dumps(fingerprint, sort_keys=True).encode())

    def _path(self, layer: int, heads, block: int = 0) -> Path:
        return self.folder / f"layer{layer:03d}_heads{'-'.join(str(h) for h in heads)}_block{block:04d}.npy"

    def load(self, layer: int, heads, block: int = 0, n_examples: Optional[int] = None) -> Optional[np.ndarray]:
        """The saved ``[len(heads), N]`` metrics (``N = n_examples`` when given), or None if not
        saved (or unreadable, or of another shape: then it is deleted, to be computed again)."""
        path = self._path(layer, heads, block)
        if not path.is_file():
            return None
        try:
            values = np.load(path)
        except (OSError, ValueError, EOFError):
            values = None
        if (values is None or values.ndim != 2 or values.shape[0] != len(heads)
                or (n_examples is not None and values.shape[1] != n_examples)):
            path.unlink(missing_ok=True)  # damaged: compute this unit again
            return None
        return values

    def save(self, layer: int, heads, values: np.ndarray, block: int = 0) -> None:
        buffer = io.BytesIO()
        np.save(buffer, values)
        atomic_write(self._path(layer, heads, block), buffer.getvalue())


def sweep_fingerprint(model, task, **settings) -> dict:
    """What makes two sweeps the same: the settings, the model's name, heads and a hash of its
    first weights, the task's name, metric and examples."""
    probe = torch.cat([p.detach().flatten()[:64].double().cpu() for p in model.parameters()])
    return dict(settings, model=model.cfg.name, heads=model.head_labels().__repr__(),
                weights=hashlib.sha1(probe.numpy().tobytes()).hexdigest(), task=task.name,
                metric=task.metric_name, examples=hashlib.sha1(repr(task.ids).encode()).hexdigest())
