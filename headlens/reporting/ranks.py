"""A report folder shared by the ranks of a multi-process job (see :mod:`headlens.runtime.distributed`).

Rank 0 owns the :class:`~headlens.reporting.folder.ReportFolder` (its lock -- the one run at a
time of :class:`headlens.storage.folders.FolderLock` --, manifest, staging folder, resume state
and the final move into place); the other ranks never take the lock nor write into the folder,
and an error of rank 0's (a folder in use, not headlens') stops every rank with its message. Every rank
runs every stage, because a stage's analyses shard their work over the ranks; rank 0 decides
whether a stage is computed or read back from the resume state and tells the others, and a
stage read back on rank 0 is sent to them, so that all ranks continue from the same results.
The sweep's own resume folder (``.resume/sweep``) is shared: each rank saves the units it
computed there (on several machines it must be on a shared filesystem).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from headlens.reporting.folder import ReportFolder
from headlens.runtime import World


class RankFolder:
    """What a stage of :func:`headlens.reporting.pipeline.report` sees of the report folder on
    any rank: :meth:`stage`, :meth:`sweep_resume_dir`, :meth:`publish`, :meth:`abandon` and the
    resumed stages' names and seconds. ``local`` is the ReportFolder itself (rank 0 only)."""

    def __init__(self, world: World, make: Callable[[], ReportFolder]):
        self.world = world
        self.local: Optional[ReportFolder] = None
        self._inputs = ""

        def create() -> str:
            self.local = make()
            return str(self.local.out)

        self.out = Path(world.on_main(create))

    @property
    def inputs(self) -> str:
        """The digest of what a stage reads when it gives none (see :attr:`ReportFolder.inputs`)."""
        return self._inputs

    @inputs.setter
    def inputs(self, value: str) -> None:
        self._inputs = value
        if self.local is not None:
            self.local.inputs = value

    @property
    def resumed(self) -> list:
        return self.local.resumed if self.local is not None else []

    @property
    def seconds(self) -> dict:
        return self.local.seconds if self.local is not None else {}

    def stage(self, name: str, compute: Callable[[], object], *args, **kwargs):
        """:meth:`ReportFolder.stage` on rank 0 (``args``: its ``inputs`` and ``classes``); every
        rank computes the stage when rank 0 does (its analyses are collective), and receives rank
        0's result when rank 0 resumed it."""
        world = self.world
        if world.size == 1:
            return self.local.stage(name, compute, *args, **kwargs)
        if not world.is_main:
            return compute() if world.broadcast() else world.broadcast()
        computing = []

        def announced():
            computing.append(True)
            world.broadcast(True)
            return compute()

        result = self.local.stage(name, announced, *args, **kwargs)
        if not computing:
            world.broadcast(False)
            world.broadcast(result)
        return result

    def sweep_resume_dir(self, inputs: str = ""):
        """Rank 0's :meth:`ReportFolder.sweep_resume_dir`, on every rank."""
        return self.world.broadcast(self.local.sweep_resume_dir(inputs) if self.local is not None else None)

    def publish(self, keep_resume: bool = False) -> None:
        self.world.on_main(lambda: self.local.publish(keep_resume=keep_resume))

    def abandon(self) -> None:
        """Rank 0 drops its staging folder (see :meth:`ReportFolder.abandon`); no collective, so
        a failing rank never waits for the others here."""
        if self.local is not None:
            self.local.abandon()
