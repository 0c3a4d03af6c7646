"""Which files a model source is read from, and a content key for them: the sha256 of every file
in the source's folder (or of its one file), remembered by each file's stat
(:func:`headlens.files.file_sha256`), so that a resumed run re-reads nothing unchanged and any
edited or replaced file (weights, config, tokenizer) gives another key."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from headlens.files import file_sha256


def source_path(source) -> Optional[Path]:
    """The folder or file ``headlens.load(source)`` reads for a bundled name, a folder or a
    ``.gguf`` file (resolved); None for anything else (a hub name, an object)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    from headlens.errors import HeadlensError
    from headlens.io.bundled import bundled_models

    bundled = bundled_models().get(str(source)) if isinstance(source, str) else None
    try:
        path = (bundled.files() if bundled.files is not None else None) if bundled else Path(source).expanduser()
    except HeadlensError:  # a bundled model whose package is missing
        return None
    return path.resolve() if path is not None and path.exists() else None


def source_files(source) -> Optional[list[Path]]:
    """The files :func:`source_path` names: the file, or every regular file directly in the
    folder (hidden ones aside); None when the source is not files."""
    path = source_path(source)
    if path is None:
        return None
    if path.is_file():
        return [path.resolve()]
    return sorted(p.resolve() for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def source_digest(source, dtype=None) -> Optional[str]:
    """sha256 over the names and sha256 of :func:`source_files` and the dtype they are loaded in;
    None when the source is not files."""
    files = source_files(source)
    if files is None:
        return None
    h = hashlib.sha256(f"dtype {dtype}\n".encode())
    for path in files:
        h.update(f"{path.name} {file_sha256(path)}\n".encode())
    return h.hexdigest()
