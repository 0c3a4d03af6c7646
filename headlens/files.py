"""Writing files safely: atomically (through a uniquely named temporary file in the same folder,
flushed to disk, then renamed into place), into folders checked before the work starts, with a
disk that fills up reported as one line naming the folder; and content hashes of files that are
remembered by their stat (so a large unchanged file is read once)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from headlens.errors import HeadlensError

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(HeadlensError):
    """No space left on the device (or in the quota) of a folder headlens writes."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or the user's quota) is full."""
    return (isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in FULL)
            or "No space left on device" in str(e))


def disk_full_error(folder, kept: str = "") -> DiskFullError:
    """The one-line error for a full disk under ``folder`` (``kept``: what was kept, e.g. finished work)."""
    return DiskFullError(f"the disk holding {str(folder)!r} is full (no space left on device){kept}; free some "
                         "space and run the same command again")


def atomic_write(path, data: Union[bytes, Callable[[Path], None]]) -> None:
    """Write ``path`` atomically. ``data``: the bytes, or a function that writes the temporary
    file it is given (e.g. ``lambda p: save_file(state, str(p))``). A failure leaves the old
    ``path`` as it was and no temporary file behind; a full disk raises :class:`HeadlensError`
    naming the folder."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path.parent) from None
        raise
    try:
        if isinstance(data, (bytes, bytearray)):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            data(Path(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(path.parent) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def writable_folder(folder, name: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that files can be written in it; errors name the
    argument it came from (``name``, e.g. ``"resume_dir"``)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise HeadlensError(f"{name} {str(folder)!r} is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(folder) from None
        raise HeadlensError(f"{name} {str(folder)!r} is not writable: {e.strerror or e}") from None
    return folder


def same_path(a, b) -> bool:
    """Whether ``a`` and ``b`` name the same existing file or folder."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --- content hashes remembered by stat -----------------------------------------------------------
def cache_dir() -> Path:
    """``$HEADLENS_CACHE`` or the user cache folder for headlens."""
    env = os.environ.get("HEADLENS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("headlens"))


def _stat_key(path: Path) -> str:
    s = path.stat()
    return f"{path.resolve()}|{s.st_size}|{s.st_mtime_ns}|{s.st_ctime_ns}|{s.st_ino}|{s.st_dev}"


def file_sha256(path) -> str:
    """sha256 of the file ``path``. Remembered in ``cache_dir()/file_sha256.json`` under the file's
    path, size, modification and change times and inode: any write to the file (even one that
    restores its modification time) changes its change time, so it is hashed again."""
    path = Path(path)
    key = _stat_key(path)
    cache = cache_dir() / "file_sha256.json"
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    if _stat_key(path) == key:  # unchanged while it was read
        prefix = key.split("|")[0] + "|"
        known = {k: v for k, v in list(known.items())[-2000:] if not k.startswith(prefix)}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, json.dumps(dict(known, **{key: sha}), indent=0).encode())
        except (OSError, HeadlensError):
            pass  # a cache that cannot be written only costs time
    return sha
