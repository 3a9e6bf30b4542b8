"""Checkpoints of a run: where they are kept (a folder, or Ray Train's storage) and what one
holds (sharded weights and optimizer state, each rank's RNG, the step, schedule and history).

A resume restores all of it in place, so the resumed run continues bit for bit; a checkpoint of
another run (a different config or worker count) is refused, naming the field.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from raylens.collectives import rank_and_world
from raylens.config import ConfigError, UnlearnConfig, to_flat

# Keys that may change between a checkpoint and its resume: they steer fault tolerance, not the run.
_RESUMABLE_CHANGES = ("scaling.checkpoint_every", "scaling.keep_checkpoints",
                      "scaling.max_failures")


class FolderCheckpoints:
    """Checkpoints of a one-process run in ``root/step_NNNNNN``: written under a temporary name
    and renamed when complete, so a crash mid-write leaves the previous one; the newest ``keep``
    stay."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def _complete(self) -> list[Path]:
        found = [p for p in self.root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
        return sorted(found)

    @contextlib.contextmanager
    def latest(self):
        """The newest complete checkpoint folder (None: start fresh)."""
        done = self._complete()
        yield done[-1] if done else None

    def save(self, step: int, write, metrics: dict) -> None:
        """Write a checkpoint with ``write(folder)``, then drop all but the newest ``keep``."""
        tmp = self.root / f"step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        tmp.rename(self.root / f"step_{step:06d}")
        for old in self._complete()[:-self.keep]:
            shutil.rmtree(old)


class RayCheckpoints:
    """Checkpoints reported to Ray Train: each rank writes its shard to a local folder and Ray
    merges the folders into one checkpoint on the run's storage; a restarted worker group (or a
    rerun of the same run name) starts from the latest."""

    @contextlib.contextmanager
    def latest(self):
        """Ray's latest checkpoint of this run, as a local folder (None: start fresh)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
        else:
            with checkpoint.as_directory() as folder:
                yield Path(folder)

    def save(self, step: int, write, metrics: dict) -> None:
        """Write this rank's shard with ``write(folder)`` and report it to Ray with ``metrics``."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix=f"raylens-step{step}-") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _state_dict_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: only the adapter (the frozen base is reloaded from its source); full: every weight
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def write_checkpoint(folder: Path, *, model, optimizers, schedulers, step: int,
                      history: list[dict], config: UnlearnConfig) -> None:
    """Everything a resume needs: sharded weights and optimizer state (torch.distributed.checkpoint,
    one file per rank), this rank's RNG, and on rank 0 the step, schedule and history (the data
    position is the step: epoch orders are a function of seed and epoch)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = rank_and_world()
    model_state, optim_state = get_state_dict(model, optimizers, options=_state_dict_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder),
             no_dist=world == 1)
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if config.scaling.use_gpu else torch.empty(0)}
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    if rank == 0:
        meta = {"step": step, "world": world, "config": to_flat(config),
                "schedulers": [sched.state_dict() for sched in schedulers], "history": history}
        (folder / "trainer.json").write_text(json.dumps(meta))


def read_checkpoint(folder: Path, *, model, optimizers, schedulers,
                     config: UnlearnConfig) -> tuple[int, list[dict]]:
    """Restore a checkpoint written by ``write_checkpoint`` in place; ``(step, history)``.
    A checkpoint of a different run (config or worker count) is refused, naming the field."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank, world = rank_and_world()
    meta = json.loads((folder / "trainer.json").read_text())
    if meta["world"] != world:
        raise ConfigError(
            f"scaling.num_workers={world} is invalid for resuming {folder}: allowed "
            f"{meta['world']}, the worker count that wrote it"
        )
    ours = to_flat(config)
    for key in sorted(set(ours) | set(meta["config"])):
        if key not in _RESUMABLE_CHANGES and ours.get(key) != meta["config"].get(key):
            raise ConfigError(
                f"{key}={ours.get(key)!r} is invalid for resuming {folder}: allowed "
                f"{meta['config'].get(key)!r}, the value of the run that wrote it (or start a "
                f"new run)"
            )
    model_state, optim_state = get_state_dict(model, optimizers, options=_state_dict_options())
    state = {"model": model_state, "optim": optim_state}
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    missing = [key for key in model_state if f"model.{key}" not in saved]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks weights {missing[:3]} (of {len(missing)})")
    # parameters that never received a gradient (the adapter of block max(L); blocks above it
    # under the L2 retain loss) have no optimizer state to restore
    dcp.load(state, checkpoint_id=str(folder),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=world == 1)
    set_state_dict(model, optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optim"],
                   options=_state_dict_options(strict=False))  # frozen weights are not in it
    for sched, sched_state in zip(schedulers, meta["schedulers"]):
        sched.load_state_dict(sched_state)
    rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if config.scaling.use_gpu:
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"], meta["history"]
