"""The parallelism plan of a run, decided once: how this process takes part in it.

``single``: one process. ``ddp``: LoRA in a process group, the adapter replicated and its
gradients all-reduced. ``fsdp2``: full fine-tuning in a process group (one rank included, so it
is the same code as N ranks), model and reference sharded. The loop, the run workflow and the
Ray worker ask the plan rather than testing the mode and the world size themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from raylens.collectives import all_gather, rank_and_world
from raylens.config import ConfigError, UnlearnConfig
from raylens.model import compute_context, gather_full_state_dict, load_model


def device_for(config: UnlearnConfig) -> torch.device:
    """CPU, or the GPU this process owns: Ray Train's (the one it made current, which FSDP2's
    mesh uses) inside a Ray Train worker, else the current CUDA device."""
    if not config.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu=True is invalid here: this process sees no CUDA device")
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except (ImportError, RuntimeError, AssertionError):  # not inside a Ray Train worker
        return torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class Plan:
    """This rank's part in a run: its mode of parallelism, rank, world size and device."""

    kind: Literal["single", "ddp", "fsdp2"]
    rank: int
    world: int
    device: torch.device

    @property
    def sharded(self) -> bool:
        """Whether model and reference are FSDP2 shards (built by ``model.load_sharded``)."""
        return self.kind == "fsdp2"

    def wrap(self, model):
        """The module the loop calls forward on: ``model`` itself, or its DDP wrapper."""
        if self.kind != "ddp":
            return model
        from torch.nn.parallel import DistributedDataParallel

        # the adapter of block max(L) gets no gradient: its output, hidden_states[max(L) + 1],
        # enters no loss; DDP must be told rather than wait for it
        return DistributedDataParallel(model, find_unused_parameters=True)

    def micro_batch(self, model, forward, *, last: bool):
        """The context of one micro-batch's backward: gradients are reduced across ranks only
        at the last micro-batch of a step."""
        if self.kind == "fsdp2":
            model.set_requires_gradient_sync(last)
        if self.kind == "ddp" and not last:
            return forward.no_sync()
        return contextlib.nullcontext()

    @property
    def grad_scale(self) -> int:
        """What the loss is multiplied by before backward: DDP and FSDP2 both average gradients
        over ranks, and the losses are already divided by global token counts."""
        return self.world

    def precision(self, config: UnlearnConfig):
        """The autocast context of forward passes (``model.compute_context``)."""
        return compute_context(config.model, config.mode.kind, self.device, sharded=self.sharded)

    def plain_model(self, model, config: UnlearnConfig, toyworld: Path | None,
                    dtype: torch.dtype):
        """``(model, digests)``: on rank 0 a plain module with the trained weights (FSDP2: the
        shards gathered into a fresh model in ``dtype``), and the parameter digests of the ranks
        (one, rank 0's, under FSDP2). Call on every rank; replicas that differ raise."""
        if self.sharded:
            state = gather_full_state_dict(model)
            if self.rank:
                return model, []
            # in the export's dtype: load_state_dict casts the fp32 master weights into it
            plain, _ = load_model(config.model, toyworld, dtype=dtype)
            plain.load_state_dict(state)
            return plain.eval(), [parameter_digest(plain)]
        digests = all_gather(parameter_digest(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks diverged after training: parameter digests {digests}")
        return model, digests


def plan_for(config: UnlearnConfig, device: torch.device | None = None) -> Plan:
    """The plan of ``config`` in this process (and its process group, if any)."""
    rank, world = rank_and_world()
    if world != config.scaling.num_workers:
        raise ConfigError(
            f"scaling.num_workers={config.scaling.num_workers} is invalid: this process group "
            f"has {world} ranks"
        )
    device = device or device_for(config)
    kind: Literal["single", "ddp", "fsdp2"] = "single"
    if config.mode.kind == "full" and torch.distributed.is_initialized():
        kind = "fsdp2"
    elif world > 1:
        kind = "ddp"
    return Plan(kind, rank, world, device)


def parameter_digest(model) -> str:
    """SHA-256 of the trainable parameters' bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            # the raw bytes: numpy has no bfloat16, and a cast could hide a difference
            digest.update(param.detach().cpu().contiguous().flatten().view(torch.uint8)
                          .numpy().tobytes())
    return digest.hexdigest()


def resident_bytes(*modules, optimizers=()) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards only)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        t = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for module in modules:
        for p in module.parameters():
            add(p.detach())
            if p.grad is not None:
                add(p.grad)
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                add(value)
    return total


def peak_memory_mb(use_gpu: bool) -> float:
    """This process's peak memory: allocated CUDA memory on GPU, resident set size on CPU."""
    if use_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
