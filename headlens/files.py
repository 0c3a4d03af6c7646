"""Writing a file so that no reader ever sees it half-written: through a uniquely named temporary
file in the same folder, flushed to disk, then renamed into place."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def atomic_write(path, data: Union[bytes, Callable[[Path], None]]) -> None:
    """Write ``path`` atomically. ``data``: the bytes, or a function that writes the temporary
    file it is given (e.g. ``lambda p: save_file(state, str(p))``). A failure leaves the old
    ``path`` as it was and no temporary file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def writable_folder(folder, name: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that files can be written in it; errors name the
    argument it came from (``name``, e.g. ``"resume_dir"``)."""
    from headlens.errors import HeadlensError

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise HeadlensError(f"{name} {str(folder)!r} is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise HeadlensError(f"{name} {str(folder)!r} is not writable: {e.strerror or e}") from None
    return folder
