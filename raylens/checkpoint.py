"""Checkpoints of a run: where they are kept (a folder, or Ray Train's storage) and what one
holds (sharded weights and optimizer state, each rank's RNG, the step, schedule and history).

A resume restores all of it in place, so the resumed run continues bit for bit; a checkpoint of
another run (a different config or worker count) is refused, naming the field. Each rank lists
the files it wrote with their sizes and SHA-256 (``manifest_rank<r>.json``, written last), so a
partial or damaged checkpoint is detected before it is read and the previous one is used; a
write that fails (a full disk) names the folder and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from raylens.collectives import all_gather, rank_and_world
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
    def candidates(self):
        """The complete checkpoint folders, newest first (empty: start fresh)."""
        yield self._complete()[::-1]

    def save(self, step: int, write, metrics: dict) -> None:
        """Write a checkpoint with ``write(folder)``, then drop all but the newest ``keep``.
        A failed write (``CheckpointWriteError``, naming the folder) leaves no partial folder
        and the previous checkpoints as they were."""
        tmp = self.root / f"step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
        except BaseException as exc:  # dcp's CheckpointException is a BaseException
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointWriteError(tmp, exc, self._complete()) from exc
        final = self.root / f"step_{step:06d}"
        shutil.rmtree(final, ignore_errors=True)  # a damaged one the resume went back past
        tmp.rename(final)
        for old in self._complete()[:-self.keep]:
            shutil.rmtree(old)


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a lost mount): names the folder,
    the cause and the checkpoint a resume would use instead."""

    def __init__(self, folder: Path, cause: BaseException, kept: list[Path]):
        previous = f"the previous checkpoint {kept[-1]} is intact" if kept else \
            "there is no earlier checkpoint"
        super().__init__(f"checkpoint {folder} could not be written ({_cause(cause)}); "
                         f"{previous}")


def _cause(exc: BaseException) -> str:
    """What went wrong, as ``Type: message``: dcp's ``CheckpointException`` carries each
    rank's error (and its traceback) in ``failures``."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))[0]
    return f"{type(exc).__name__}: {exc}"


class RayCheckpoints:
    """Checkpoints reported to Ray Train: each rank writes its shard to a local folder and Ray
    merges the folders into one checkpoint on the run's storage; a restarted worker group (or a
    rerun of the same run name) starts from the latest."""

    @contextlib.contextmanager
    def candidates(self):
        """Ray's checkpoints of this run as local folders, newest first: the latest one Ray
        hands back, then the older ones kept beside it (empty: start fresh)."""
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            yield []
            return
        with latest.as_directory() as folder:
            here = Path(folder)
            older = sorted((p for p in here.parent.glob("checkpoint_*")
                            if p.is_dir() and p.name < here.name), reverse=True) \
                if here.name.startswith("checkpoint_") else []
            yield [here, *older]

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
    _write_manifest(folder, rank)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(folder: Path, rank: int) -> None:
    """List the files this rank wrote (sizes, SHA-256), last: its presence marks them complete.
    Under Ray each rank writes into its own folder, merged into one checkpoint afterwards."""
    files = {p.name: [p.stat().st_size, _digest(p)] for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith("manifest_rank")}
    tmp = folder / f".manifest_rank{rank}.json"
    tmp.write_text(json.dumps(files))
    tmp.rename(folder / f"manifest_rank{rank}.json")


def checkpoint_problem(folder: Path, rank: int | None = None) -> str | None:
    """Why the checkpoint in ``folder`` cannot be used (a missing, truncated or changed file,
    a rank's manifest missing), or None when rank ``rank``'s files and rank 0's metadata are
    whole (``rank`` None: every rank's)."""
    try:
        meta = json.loads((folder / "trainer.json").read_text())
        ranks = range(int(meta["world"])) if rank is None else sorted({0, rank})
        for r in ranks:
            manifest = folder / f"manifest_rank{r}.json"
            if not manifest.is_file():
                return f"{manifest.name} is missing (rank {r} did not finish writing)"
            for name, (size, digest) in json.loads(manifest.read_text()).items():
                path = folder / name
                if not path.is_file():
                    return f"{name} is missing"
                if path.stat().st_size != size:
                    return f"{name} has {path.stat().st_size} bytes, {size} were written"
                if _digest(path) != digest:
                    return f"{name} differs from what was written (SHA-256)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def usable_checkpoint(candidates: list[Path], log=print) -> Path | None:
    """The newest of ``candidates`` every rank finds whole (each rank checks its own files and
    rank 0's, and the ranks agree); each damaged one is logged with its problem."""
    rank, _ = rank_and_world()
    for folder in candidates:
        problems = [p for p in all_gather(checkpoint_problem(folder, rank)) if p]
        if not problems:
            return folder
        log(f"checkpoint {folder} is damaged ({problems[0]}); trying the one before it")
    if candidates:
        log("no usable checkpoint: starting from step 0")
    return None


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
