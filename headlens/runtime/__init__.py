"""Where and how the analyses run: processes (torch.distributed under ``torchrun``), devices
(a model's blocks over several devices) and precision.

Owns: :mod:`~headlens.runtime.distributed` (the :class:`World` of processes a job runs on:
sharding items over ranks, gathering their results, running a step on rank 0 only; the world
``torchrun`` launched, :func:`from_torchrun`).
May import: :mod:`headlens.errors`, :mod:`headlens.files`. Nothing else of headlens: every stage
may import it.
Public names: ``World``, ``current_world``, ``from_torchrun``.
"""
from headlens.runtime.distributed import World, current_world, from_torchrun

__all__ = ["World", "current_world", "from_torchrun"]
