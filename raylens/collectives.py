"""raylens's own collectives (token counts, metrics, eval gathers, digests, stop flags).

They carry a few numbers or small Python objects, so they always run on CPU tensors over a gloo
side group, whatever backend trains the model. An NCCL process group has no CPU backend (a CPU
tensor in it raises "No backend type associated with device type cpu"), and moving a handful of
floats to the GPU and back each step would buy nothing. FSDP2 and DDP keep using the training
group for the gradients and weights. Every function is a no-op in one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_side: dict[int, Any] = {}
"""The gloo group of each default process group (keyed by its id), created on first use."""


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cpu_group():
    """The gloo group over every rank of the default group. Created the first time any rank
    asks; every raylens collective is called by all ranks in the same order, so the creation
    (itself collective) lines up."""
    default = dist.distributed_c10d._get_default_group()
    key = id(default)
    if key not in _side:
        _side.clear()  # a destroyed default group's side group is gone with it
        _side[key] = dist.new_group(backend="gloo")
    return _side[key]


def all_reduce_sum(values: list[float]) -> list[float]:
    """``values`` summed over ranks (float64)."""
    if rank_and_world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=cpu_group())
    return tensor.tolist()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=cpu_group())
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one: decisions that change which
    collectives come next (stop an evaluation, skip a step) are taken by all ranks together."""
    if rank_and_world()[1] == 1:
        return bool(flag)
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (CPU; other ranks pass one of the same shape and
    dtype, which is filled in place)."""
    if rank_and_world()[1] > 1:
        dist.broadcast(tensor, src=0, group=cpu_group())
    return tensor
