"""Several processes, GPUs or hosts through PyTorch's own engine (torchrun / torch.distributed).

Under ``torchrun`` every rank reads and decodes only its shard of the image list and keeps its own
streaming top-k; the ranks then merge (each rank's k candidates per channel, the global top-k kept
with the same tie-break as one process).  The attribution, feature-visualisation and occlusion
passes split their work items among the ranks and gather the pieces on rank 0
(:func:`gather_to_main`); passes that do not split their work run on rank 0 only, and only rank 0
writes the cache and the site.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``range(n)`` (contiguous keeps each rank's images in
        increasing order, which the streaming top-k relies on)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def items(self, n: int) -> range:
        """This rank's share of ``n`` independent work items (attribution, feature-vis and
        occlusion batches): every ``world``-th item, so costly and cheap items spread evenly."""
        return range(self.rank, n, self.world)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


_current = Dist()


def current() -> Dist:
    return _current


def init_from_env() -> Dist:
    """Join the process group that torchrun describes in the environment (a no-op without it)."""
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _current = Dist()
        return _current
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        store = os.environ.get("SITEGEN_STORE_FILE")  # set by `--workers N` (sitegen/launcher.py)
        if store:
            dist.init_process_group(backend=backend, init_method=f"file://{store}",
                                    rank=int(os.environ["RANK"]), world_size=world)
        else:
            dist.init_process_group(backend=backend)  # torchrun's environment
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    _current = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
    return _current


def shutdown() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Dist()


def comm_device() -> torch.device:
    """Where collective tensors live: NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate every rank's equally-shaped ``t`` along ``dim`` (rank order)."""
    dev = comm_device()
    local = t.to(dev).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=dim).to(t.device)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dev = comm_device()
    local = t.to(dev).clone()
    dist.all_reduce(local, op=op)
    return local.to(t.device)


def all_gather_objects(obj):
    """Small metadata (failed-file messages) between this job's own ranks."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (``t`` itself in one process): for small choices every rank
    must share, where float ties could be broken differently on different GPUs."""
    if not current().active:
        return t
    local = t.to(comm_device()).clone().contiguous()
    dist.broadcast(local, src=0)
    return local.to(t.device)


def gather_to_main(obj):
    """Every rank's ``obj`` on rank 0, in rank order (``None`` on the other ranks); ``[obj]`` in a
    single process.  The objects travel pickled between this job's own ranks only: never a file,
    never the user's data."""
    d = current()
    if not d.active:
        return [obj]
    out = [None] * d.world if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
