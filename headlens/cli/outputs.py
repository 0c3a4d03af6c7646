"""The files a command writes, under ``torchrun`` as in one process: rank 0 checks, locks and
writes; an error there (a folder in use, one headlens does not own) stops every rank with its
message, before any analysis (see :mod:`headlens.storage.folders` and
:mod:`headlens.runtime.distributed`)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from headlens.runtime import current_world
from headlens.storage.folders import FolderLock, OwnedFolder, check_ownable, model_output


@contextlib.contextmanager
def results_folder(path, files, name: str = "--out") -> Iterator[Optional[OwnedFolder]]:
    """The results folder ``path`` for the whole block: on rank 0 its :class:`FolderLock` held and
    its :class:`OwnedFolder` (``files``, the names the command will write, checked free of the
    user's own files); None on the other ranks, which write nothing."""
    with contextlib.ExitStack() as stack:
        box = []

        def take() -> None:
            check_ownable(path, name)  # a file or someone else's folder fails now, not after the analysis
            stack.enter_context(FolderLock(path, name=name))
            owned = OwnedFolder(path, name)
            owned.check_free(files)
            box.append(owned)

        current_world().on_main(take)
        yield box[0] if box else None


def check_model_output(folder, overwrite: bool, source, name: str) -> None:
    """:func:`headlens.storage.folders.model_output` on rank 0 (the one that saves), its error on every rank."""
    current_world().on_main(lambda: model_output(folder, overwrite, source, name) and None)
