"""A job of several processes on torch.distributed, launched by ``torchrun``.

    torchrun --standalone --nproc-per-node 2 -m headlens report --model smollm2 --out rep
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint node0:29500 --rdzv-id job7 -m headlens importance ...   # on each node

Every rank runs the same command. Work that splits into independent items is sharded over the
ranks (the sweep's units of heads, the batches of a gradient or pattern pass): each rank computes
its items and :meth:`World.map` gathers all results, in item order, on every rank, so that what
follows runs on the same numbers everywhere; files are written by rank 0 only
(:meth:`World.on_main`). A :class:`~headlens.errors.HeadlensError` raised on one rank inside
:meth:`World.map` or :meth:`World.on_main` is raised on every rank: one clear message, and no
rank left waiting for the others.

The backend is gloo on CPUs and NCCL on GPUs (each rank then uses ``cuda:LOCAL_RANK``). Outside a
job (no ``torchrun``, or one process) :func:`current_world` is the one-process world, whose
methods cost nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Iterator, Optional, Sequence

import torch

from headlens.errors import HeadlensError

TIMEOUT_ENV = "HEADLENS_DIST_TIMEOUT_MIN"  # how long a rank waits for the others (default: a day)


class World:
    """The processes of a job: ``rank`` of ``size``, ``local_rank`` on its machine.

    ``World()`` is the one-process world. The collectives (:meth:`gather`, :meth:`broadcast`,
    :meth:`map`, :meth:`on_main`, :meth:`barrier`) must be called by every rank, in the same order.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, backend: Optional[str] = None):
        self.rank, self.size, self.local_rank, self.backend = rank, size, local_rank, backend

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device):
        """The device this rank uses for ``device``: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a
        multi-process job; anything else is returned as it is."""
        if self.size > 1 and device is not None and str(device) == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    # --- collectives ----------------------------------------------------------------------
    def gather(self, obj) -> list:
        """Every rank's ``obj`` (any picklable object), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj=None, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank (the others' ``obj`` is ignored)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    # --- sharding -------------------------------------------------------------------------
    def owner(self, i: int) -> int:
        """The rank that computes item ``i`` of a round-robin shard."""
        return i % self.size

    def assign(self, costs: Sequence[float]) -> list[int]:
        """A rank for each item, balancing the summed ``costs`` (longest first onto the least
        loaded rank; deterministic, so every rank computes the same assignment)."""
        load = [0.0] * self.size
        ranks = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            ranks[i] = r
            load[r] += costs[i]
        return ranks

    def run_shards(self, fn: Callable[[], object]) -> list:
        """``fn()`` on every rank (its own share of a sharded job, run under the one-process world);
        every rank's result, in rank order, on every rank. A HeadlensError on one rank is raised
        on all of them."""
        if self.size == 1:
            return [fn()]
        result, error = None, None
        with _local():
            try:
                result = fn()
            except HeadlensError as e:
                error = str(e)
        parts = self.gather((error, result))
        errors = [e for e, _ in parts if e is not None]
        if errors:
            raise HeadlensError(errors[0])
        return [part for _, part in parts]

    def map(self, fn: Callable[[int], object], n: int, owners: Optional[Sequence[int]] = None) -> list:
        """``[fn(i) for i in range(n)]`` on every rank, each ``fn(i)`` computed by one rank
        (``owners[i]``, default round-robin) and gathered (see :meth:`run_shards`)."""
        if self.size == 1:
            return [fn(i) for i in range(n)]
        owners = [self.owner(i) for i in range(n)] if owners is None else list(owners)
        merged = {}
        for part in self.run_shards(lambda: {i: fn(i) for i in range(n) if owners[i] == self.rank}):
            merged.update(part)
        return [merged[i] for i in range(n)]

    def on_main(self, fn: Callable[[], object]):
        """``fn()`` run on rank 0 only; its result (or its HeadlensError) on every rank."""
        if self.size == 1:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                with _local():
                    result = fn()
            except HeadlensError as e:
                error = str(e)
            except BaseException as e:  # tell the others before failing here
                self.broadcast((f"rank 0 failed: {type(e).__name__}: {e}", None))
                raise
        error, result = self.broadcast((error, result))
        if error is not None:
            raise HeadlensError(error)
        return result


_SINGLE = World()
_STACK: list[World] = []


def current_world() -> World:
    """The world the analyses shard over: the innermost :func:`from_torchrun` (or
    :func:`activate`) job, else the one-process world."""
    return _STACK[-1] if _STACK else _SINGLE


@contextlib.contextmanager
def activate(world: World) -> Iterator[World]:
    """Make ``world`` the current one inside the block."""
    _STACK.append(world)
    try:
        yield world
    finally:
        _STACK.pop()


def _local():
    return activate(_SINGLE)


def _timeout() -> datetime.timedelta:
    minutes = os.environ.get(TIMEOUT_ENV, str(24 * 60))
    try:
        return datetime.timedelta(minutes=float(minutes))
    except ValueError:
        raise HeadlensError(f"{TIMEOUT_ENV} must be a number of minutes, got {minutes!r}") from None


def _store(rank: int, size: int, timeout: datetime.timedelta):
    """The rendezvous store at ``MASTER_ADDR:MASTER_PORT`` (torchrun's agent hosts it; else rank 0),
    its keys prefixed by the attempt: torchrun keeps one store over ``--max-restarts``, and without
    the prefix a restarted rank could read a dead rank's address and wait for it forever."""
    import torch.distributed as dist

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise HeadlensError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun") from None
    store = dist.TCPStore(addr, port, size, is_master=not agent and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"headlens/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@contextlib.contextmanager
def from_torchrun(device=None) -> Iterator[World]:
    """The job ``torchrun`` launched this process in (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    the rendezvous it set), as the current world inside the block; the one-process world when
    there is none. The process group (NCCL when ``device`` is CUDA, else gloo) is created here and
    destroyed on exit; one the caller already created is used as it is and left alone."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not dist.is_initialized():
        with activate(_SINGLE) as world:
            yield world
        return
    own = not dist.is_initialized()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if own:
        cuda = device is not None and str(device).startswith("cuda")
        if cuda:
            if not torch.cuda.is_available():
                raise HeadlensError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
            torch.cuda.set_device(local)
        rank, timeout = int(os.environ["RANK"]), _timeout()
        dist.init_process_group("nccl" if cuda else "gloo", store=_store(rank, size, timeout), rank=rank,
                                world_size=size, timeout=timeout, device_id=torch.device("cuda", local) if cuda else None)
    world = World(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    try:
        with activate(world):
            yield world
    finally:
        if own:
            dist.destroy_process_group()
