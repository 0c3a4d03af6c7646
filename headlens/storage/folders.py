"""Folders headlens writes results into: it writes only what it owns, and one run at a time.

**Manifest.** A results folder (``headlens report --out``, ``prune --out``, ``scores --out``)
carries ``.headlens-manifest.json``, checked JSON (:mod:`headlens.storage.records`) listing every file
headlens wrote there and which command wrote it. :class:`OwnedFolder` refuses a folder that is
not empty and has no manifest (whatever else it holds, e.g. a ``run.json`` of the user's), and
never deletes or overwrites a file the manifest does not list: a user's ``figures/keep.png``
stays. A damaged manifest is refused too (delete it to hand the folder over).

**Lock.** :class:`FolderLock` holds ``.headlens.lock`` (``filelock``, an OS lock that dies with
its process, SIGKILL included) while a run writes the folder; ``.headlens.lock.json`` says who
holds it. A second run waits up to ``wait`` seconds, then stops with one line naming the holder.
The ranks of one ``torchrun`` job are one run: rank 0 alone takes the lock and writes, the
others write nothing (:class:`headlens.reporting.ranks.RankFolder`, :mod:`headlens.cli.outputs`),
except their units of a sweep into the resume folder rank 0 set up.

**Model folders.** :func:`model_output` checks a folder a model is to be saved into before any
work starts (a file, or a folder that is not empty unless ``overwrite``, and never the source
model's own folder); :func:`write_model_folder` writes the model's files into a temporary
folder beside it and moves that into place, so a failure leaves the old folder as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from headlens.errors import HeadlensError
from headlens.files import atomic_write, disk_full_error, is_disk_full, same_path, writable_folder
from headlens.storage.records import DamagedRecord, read_checked_json, write_checked_json

MANIFEST = ".headlens-manifest.json"
LOCK = ".headlens.lock"
HOLDER = ".headlens.lock.json"
SCHEMA = "headlens.manifest"
VERSION = 1
INTERNAL = (MANIFEST, LOCK, HOLDER)  # a folder holding only these counts as empty


def is_internal(name: str) -> bool:
    """Whether a file name is one of :data:`INTERNAL` (or the temporary file one is written through)."""
    return name in INTERNAL or (name.startswith(".headlens") and name.endswith(".tmp"))


def _relative(folder: Path, path) -> str:
    path = Path(path)
    rel = path.relative_to(folder) if path.is_absolute() else path
    return rel.as_posix()


def _read_manifest(folder: Path, name: str) -> Optional[dict]:
    """The files a folder's manifest lists; None for a new or empty folder; HeadlensError for a
    folder headlens may not write (a file, not empty without a manifest, a damaged manifest)."""
    if folder.exists() and not folder.is_dir():
        raise HeadlensError(f"{name} {str(folder)!r} is a file, expected a folder")
    path = folder / MANIFEST
    if path.is_file():
        try:
            body = read_checked_json(path)
        except (DamagedRecord, OSError):
            raise HeadlensError(f"{name} {str(folder)!r} has a damaged {MANIFEST} (the list of the files headlens "
                                "wrote there): delete the folder, or that file, to start over") from None
        if body.get("schema") != SCHEMA or body.get("version") != VERSION or not isinstance(body.get("files"), dict):
            raise HeadlensError(f"{path} is not a headlens manifest of this version")
        return body["files"]
    if folder.is_dir() and not all(is_internal(p.name) for p in folder.iterdir()):
        raise HeadlensError(f"{name} {str(folder)!r} is not empty and was not written by headlens "
                            f"(it has no {MANIFEST}); choose a new or empty folder")
    return None


def check_ownable(folder, name: str = "out folder") -> None:
    """Refuse, writing nothing, a folder headlens may not write results into (see :class:`OwnedFolder`)."""
    _read_manifest(Path(folder).expanduser().resolve(), name)


class OwnedFolder:
    """The results folder ``folder`` and what headlens wrote in it (see the module doc).

    ``name`` is how errors call the folder (``"out folder"``, ``"--out"``). Creating one claims
    a new or empty folder (writes the manifest) and refuses any other without a manifest. Hold
    the folder's :class:`FolderLock` while changing it.
    """

    def __init__(self, folder, name: str = "out folder"):
        self.folder = Path(folder).expanduser().resolve()
        self.name = name
        files = _read_manifest(self.folder, name)
        if files is None:
            writable_folder(self.folder, name)
            self.files: dict = {}
            self._save()
        else:
            self.files = files

    def _save(self) -> None:
        write_checked_json(self.folder / MANIFEST, {"schema": SCHEMA, "version": VERSION, "files": self.files})

    def owns(self, path) -> bool:
        """Whether headlens wrote ``path`` (relative to the folder, or absolute inside it)."""
        rel = _relative(self.folder, path)
        return rel in self.files or is_internal(rel) or any(
            rel.startswith(d) for d, v in self.files.items() if d.endswith("/") and v.get("tree"))

    def foreign(self, paths: Iterable) -> list[str]:
        """Those of ``paths`` that exist and that headlens did not write (it must not replace them)."""
        return [rel for rel in map(lambda p: _relative(self.folder, p), paths)
                if (self.folder / rel).exists() and not self.owns(rel)]

    def check_free(self, paths: Iterable) -> None:
        """Refuse, before any work, to write over files that headlens did not write."""
        foreign = self.foreign(paths)
        if foreign:
            raise HeadlensError(f"{self.name} {str(self.folder)!r} holds {foreign[0]!r}, which headlens did not "
                                f"write and will not replace ({len(foreign)} such file(s)); move it away or "
                                "choose another folder")

    def claim(self, paths: Iterable, by: str, tree: bool = False) -> None:
        """Record ``paths`` as written by command ``by`` (``tree``: folders whose whole content is
        headlens', e.g. ``.resume/``), before they are written."""
        new = {}
        for p in paths:
            rel = _relative(self.folder, p) + ("/" if tree and not str(p).endswith("/") else "")
            new[rel] = dict(by=by, tree=True) if tree else dict(by=by)
        if any(self.files.get(k) != v for k, v in new.items()):
            self.files.update(new)
            self._save()

    def written_by(self, by: str) -> list[str]:
        """The files (not trees) command ``by`` wrote, as recorded."""
        return sorted(k for k, v in self.files.items() if v.get("by") == by and not v.get("tree"))

    def remove(self, paths: Iterable) -> None:
        """Delete those of ``paths`` that headlens wrote (others are never touched) and forget them."""
        changed = False
        for rel in map(lambda p: _relative(self.folder, p), paths):
            if rel in self.files:
                target = self.folder / rel
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
                del self.files[rel]
                changed = True
        if changed:
            self._save()

    def write(self, path, data, by: str) -> Path:
        """Write one file (``data``: bytes or a function of the temporary path, see
        :func:`headlens.files.atomic_write`) if headlens may, recording it first."""
        rel = _relative(self.folder, path)
        self.check_free([rel])
        self.claim([rel], by)
        target = self.folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
        return target


# --- one run per folder ------------------------------------------------------------------------------
class FolderLock:
    """The lock of one results folder (see the module doc). Use ``with FolderLock(folder):`` or
    :meth:`acquire` / :meth:`release`. ``wait``: seconds to wait for another run (0: stop at once)."""

    def __init__(self, folder, wait: float = 0, name: str = "out folder"):
        self.folder = Path(folder).expanduser().resolve()
        self.wait, self.name = wait, name
        self._lock = None

    def acquire(self) -> "FolderLock":
        from filelock import FileLock, Timeout

        writable_folder(self.folder, self.name)
        lock = FileLock(str(self.folder / LOCK), is_singleton=False, thread_local=False)
        try:
            lock.acquire(timeout=self.wait)
        except Timeout:
            raise HeadlensError(f"{self.name} {str(self.folder)!r} is in use by another headlens run "
                                f"({describe(self.holder())}); wait for it to finish or choose another folder") from None
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.folder) from None
            raise
        self._lock = lock
        try:
            atomic_write(self.folder / HOLDER, json.dumps(dict(
                pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                command=" ".join(sys.argv)[:300])).encode())
        except BaseException:
            self.release()
            raise
        return self

    def holder(self) -> dict:
        """Who holds the lock, as its holder recorded it (empty if unknown)."""
        try:
            info = json.loads((self.folder / HOLDER).read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def release(self) -> None:
        if self._lock is not None:
            (self.folder / HOLDER).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"
            + (f": {holder['command']}" if holder.get("command") else ""))


# --- model folders -----------------------------------------------------------------------------------
def model_output(folder, overwrite: bool = False, source=None, name: str = "model folder") -> Path:
    """Check, before any work, that a model may be saved to ``folder``: not a file, not the
    folder (or a file) the model was read from (``source``; refused even with ``overwrite``), and
    new or empty unless ``overwrite`` (whose meaning is: replace the folder's contents). Returns
    the resolved folder; creates nothing."""
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise HeadlensError(f"{name} {str(folder)!r} is a file, expected a folder")
    if source is not None and isinstance(source, (str, os.PathLike)):
        src = Path(source).expanduser()
        if src.exists() and (same_path(src, folder) or (src.is_file() and same_path(src.parent, folder))):
            raise HeadlensError(f"{name} {str(folder)!r} is where the model was read from; headlens does not "
                                "overwrite a model's own files: save it to another folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise HeadlensError(f"{name} {str(folder)!r} is not empty; choose a new or empty folder, or pass "
                            "overwrite=True (--overwrite) to replace its contents")
    if folder.is_dir() and not os.access(folder, os.W_OK):
        raise HeadlensError(f"{name} {str(folder)!r} is not writable")
    parent = next(p for p in folder.parents if p.exists())
    if not parent.is_dir():
        raise HeadlensError(f"{name} {str(folder)!r} is not writable: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK) and not folder.is_dir():
        raise HeadlensError(f"{name} {str(folder)!r} is not writable: {str(parent)!r} is read-only")
    return folder


def write_model_folder(folder, write: Callable[[Path], None], overwrite: bool = False, source=None,
                       name: str = "model folder") -> Path:
    """Save a model: ``write(tmp)`` writes its files into a new temporary folder beside
    ``folder`` (checked by :func:`model_output`), which then replaces ``folder``. A failure (or a
    full disk) leaves ``folder`` as it was and no temporary folder behind."""
    folder = model_output(folder, overwrite, source, name)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HeadlensError(f"{name} {str(folder)!r} is not writable: {e.strerror or e}") from None
    if not os.access(folder.parent, os.W_OK):  # an empty folder we may write in, inside one we may not
        write(writable_folder(folder, name))
        return folder
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as e:
        raise (disk_full_error(folder.parent) if is_disk_full(e) else e) from None
    old = None
    try:
        try:
            write(tmp)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(folder.parent) from None
            raise
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.replace(old, folder)
            old = None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder
