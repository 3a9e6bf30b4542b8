"""Spawned process groups for tests: ``run_ranks`` runs a function as N gloo ranks on this
machine, without Ray, so distributed behaviour is tested at the cost of a few process starts."""

import multiprocessing as mp
import os
import socket

import pytest
import torch

SPAWN = mp.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world: int, *args, timeout: float = 180.0) -> list:
    """Run ``target(rank, world, port, *args)`` in ``world`` spawned processes; their return
    values (or ``("error", repr)``), in rank order. A process still running after ``timeout``
    (a rank stranded in a collective) fails the test."""
    port, queue = free_port(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_entry, args=(target, rank, world, port, queue, args))
             for rank in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, value = queue.get(timeout=timeout)
            results[rank] = value
    except Exception:
        pytest.fail(f"ranks {sorted(set(range(world)) - set(results))} did not finish within "
                    f"{timeout:g} s (stranded in a collective?)")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _entry(target, rank, world, port, queue, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        value = target(rank, world, *args)
    except Exception as exc:
        value = ("error", f"{type(exc).__name__}: {exc}")
    queue.put((rank, value))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
